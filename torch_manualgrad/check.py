"""`python -m torch_manualgrad check`: gradcheck (float64) of our conv, transposed conv and max-pool functions over
a matrix of configurations.

Every configuration is checked twice: the backward against finite differences of our own forward
(gradcheck), and our forward against torch.nn.functional's on the same tensors (a consistent but wrong
forward/backward pair would pass gradcheck alone). Max-pool inputs are a random permutation scaled to
distinct values, so no window has a tie and the gradient is well-defined.

    python -m torch_manualgrad check            # the full matrix (a few seconds on a CPU)
    python -m torch_manualgrad check --quick    # one option changed at a time, plus a few mixed cases
    python -m torch_manualgrad check --device cuda
"""
import dataclasses
import itertools
import time
import warnings
from typing import Optional

import torch

from . import functional
from . import _cli

__all__ = ["CheckConfig", "CheckResult", "configurations", "run_config", "run_checks", "add_parser", "run"]

# Small, non-square shapes (N, C, *spatial): big enough for strides, dilation and ceil_mode to matter,
# small enough that finite differences over every element take milliseconds.
_BATCH, _C_IN, _C_OUT = 2, 2, 4
_CONV_SPATIAL = {1: (7,), 2: (5, 6), 3: (5, 4, 6)}
_POOL_SPATIAL = {1: (9,), 2: (6, 7), 3: (4, 6, 5)}
_POOL_CHANNELS = 2


@dataclasses.dataclass
class CheckConfig:
    """One call of one op: which op, on what shapes, with which keyword arguments."""

    name: str
    op: str                               # conv1d/2d/3d, conv_transpose1d/2d/3d or max_pool1d/2d/3d
    input_shape: tuple
    kwargs: dict
    weight_shape: Optional[tuple] = None  # conv only (transposed: in_channels first)
    bias: bool = False                    # conv only

    @property
    def is_conv(self):
        return self.op.startswith("conv")

    def make_inputs(self, device="cpu", seed=0):
        """The float64 leaf tensors gradcheck differentiates: (input, weight[, bias]) or (input,)."""
        gen = torch.Generator().manual_seed(seed)
        if self.is_conv:
            tensors = [torch.randn(self.input_shape, generator=gen, dtype=torch.float64),
                       torch.randn(self.weight_shape, generator=gen, dtype=torch.float64)]
            if self.bias:
                out_channels = (self.weight_shape[1] * self.kwargs["groups"] if self.op.startswith("conv_transpose")
                                else self.weight_shape[0])
                tensors.append(torch.randn(out_channels, generator=gen, dtype=torch.float64))
        else:
            numel = torch.Size(self.input_shape).numel()
            # distinct values 0.1 apart: far more than gradcheck's eps, so no perturbation moves an argmax
            values = torch.randperm(numel, generator=gen).to(torch.float64) * 0.1 - 0.05 * numel
            tensors = [values.reshape(self.input_shape)]
        return [t.to(device).requires_grad_() for t in tensors]

    def call(self, module, *tensors):
        """Run the op from `module` (torch_manualgrad.functional or torch.nn.functional)."""
        fn = getattr(module, self.op)
        if self.is_conv:
            x, w = tensors[:2]
            b = tensors[2] if self.bias else None
            return fn(x, w, b, **self.kwargs)
        return fn(tensors[0], **self.kwargs)


@dataclasses.dataclass
class CheckResult:
    config: CheckConfig
    passed: bool
    seconds: float
    message: str = ""

    @property
    def name(self):
        return self.config.name


def _fmt(value):
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)


def _conv_config(dims, kernel, stride, padding, dilation, groups, bias):
    kernel_t = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)
    weight_shape = (_C_OUT, _C_IN // groups) + kernel_t
    name = (f"conv{dims}d k{_fmt(kernel)} s{_fmt(stride)} p{_fmt(padding)} d{_fmt(dilation)} g{groups} "
            + ("bias" if bias else "nobias"))
    return CheckConfig(
        name=name, op=f"conv{dims}d", input_shape=(_BATCH, _C_IN) + _CONV_SPATIAL[dims],
        kwargs=dict(stride=stride, padding=padding, dilation=dilation, groups=groups),
        weight_shape=weight_shape, bias=bias,
    )


def _transposed_config(dims, kernel, stride, padding, output_padding, dilation, groups, bias):
    weight_shape = (_C_IN * 2, _C_OUT // groups) + (kernel,) * dims
    name = (f"conv_transpose{dims}d k{kernel} s{stride} p{padding} op{output_padding} d{dilation} g{groups} "
            + ("bias" if bias else "nobias"))
    return CheckConfig(
        name=name, op=f"conv_transpose{dims}d", input_shape=(_BATCH, _C_IN * 2) + _CONV_SPATIAL[dims],
        kwargs=dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups),
        weight_shape=weight_shape, bias=bias,
    )


# Transposed convolution (a convolution's input gradient, functional.py): a short list, each option changed at
# least once; output padding past the stride (allowed when the dilation is larger) in the fourth.
_TRANSPOSED = [
    (3, 1, 0, 0, 1, 1, True),
    (3, 2, 1, 1, 1, 1, True),
    (4, 2, 1, 0, 1, 2, False),
    (3, 1, 2, 1, 2, 1, True),
    (2, 3, 0, 2, 1, 2, True),
]


def _pool_config(dims, kernel, stride, padding, dilation, ceil_mode, return_indices):
    name = (f"max_pool{dims}d k{_fmt(kernel)} s{_fmt(stride) if stride is not None else '=k'} p{_fmt(padding)} "
            f"d{_fmt(dilation)}" + (" ceil" if ceil_mode else "") + (" indices" if return_indices else ""))
    return CheckConfig(
        name=name, op=f"max_pool{dims}d", input_shape=(_BATCH, _POOL_CHANNELS) + _POOL_SPATIAL[dims],
        kwargs=dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                    ceil_mode=ceil_mode, return_indices=return_indices),
    )


# Each axis lists its "base" value first. The full matrix is the product of the axes; --quick takes the
# base configuration, every one-option-changed neighbour of it, and the all-options-changed one.
# Conv's padding and kernel size form one axis, so that 'same' is checked with an odd and an even kernel.
_CONV_AXES = dict(
    stride=[1, 2],
    padding_kernel=[(1, 3), (0, 3), ("valid", 3), ("same", 3), ("same", 2)],
    dilation=[1, 2],
    groups=[1, 2],
    bias=[True, False],
)
_POOL_AXES = dict(
    kernel=[3, 2],
    stride=[2, 1],
    padding=[1, 0],
    dilation=[1, 2],
    ceil_mode=[False, True],
    return_indices=[False, True],
)


def _combinations(axes, quick):
    names = list(axes)
    if not quick:
        for values in itertools.product(*(axes[n] for n in names)):
            yield dict(zip(names, values))
        return
    base = {n: axes[n][0] for n in names}
    yield dict(base)
    for n in names:
        for value in axes[n][1:]:
            yield dict(base, **{n: value})
    yield {n: axes[n][-1] for n in names}


def _conv_valid(c):
    return not (c["padding_kernel"][0] == "same" and c["stride"] != 1)  # torch: 'same' needs stride 1


def configurations(quick=False):
    """The configurations `check` runs, in order (the full matrix, or the --quick subset of it). 3-d takes the
    quick subset of its axes in both: each option is still changed once, at a fraction of the time."""
    configs = []
    for dims in (1, 2, 3):
        subset = quick or dims == 3
        for c in _combinations(_CONV_AXES, subset):
            if not _conv_valid(c):
                # in the quick list, the all-changed conv combination pairs 'same' with stride 1 instead
                if not subset:
                    continue
                c = dict(c, stride=1)
            padding, kernel = c["padding_kernel"]
            configs.append(_conv_config(dims, kernel, c["stride"], padding, c["dilation"], c["groups"], c["bias"]))
        for c in _combinations(_POOL_AXES, subset):
            configs.append(_pool_config(dims, c["kernel"], c["stride"], c["padding"], c["dilation"],
                                        c["ceil_mode"], c["return_indices"]))
        configs += [_transposed_config(dims, *t) for t in _TRANSPOSED]
    # Mixed per-dimension values (catch a swapped height/width) and torch's default pool stride.
    configs += [
        _conv_config(2, (2, 3), (2, 1), (1, 0), (1, 2), 1, True),
        _conv_config(2, (2, 3), 1, "same", (2, 1), 2, False),
        _conv_config(1, 4, 1, "same", 1, 1, True),
        _pool_config(2, (2, 3), (1, 2), (1, 0), (2, 1), True, True),
        _pool_config(2, 2, None, 0, 1, False, False),
        _pool_config(1, 3, None, 1, 1, True, False),
        _conv_config(3, (2, 3, 1), (2, 1, 1), (1, 0, 0), (1, 1, 2), 1, True),
        _pool_config(3, (2, 3, 2), (1, 2, 2), (1, 0, 1), (2, 1, 1), True, True),
    ]
    seen, unique = set(), []
    for config in configs:  # the quick neighbours can repeat one another
        if config.name not in seen:
            seen.add(config.name)
            unique.append(config)
    return unique


def _compare_forward(config, tensors):
    """None if our forward matches torch.nn.functional's (values, and indices when returned), else why not."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice about 'same' with an even kernel
        ours = config.call(functional, *tensors)
        theirs = config.call(torch.nn.functional, *tensors)
    if isinstance(theirs, tuple):
        (ours, our_idx), (theirs, their_idx) = ours, theirs
        if our_idx.shape != their_idx.shape or not torch.equal(our_idx, their_idx):
            return "indices differ from torch.nn.functional's"
    if ours.shape != theirs.shape:
        return f"output shape {list(ours.shape)} but torch.nn.functional gives {list(theirs.shape)}"
    if not torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12):
        return f"output differs from torch.nn.functional's by up to {(ours - theirs).abs().max().item():.3g}"
    return None


def run_config(config, device="cpu", seed=0, fast_mode=True):
    """gradcheck one configuration and compare its forward with torch's; returns a CheckResult.

    fast_mode (gradcheck's own option) compares one random projection u^T J v of the analytical and the
    numerical Jacobians instead of every entry: the same test of the backward formula, at a fraction of
    the cost. fast_mode=False builds both Jacobians in full.
    """
    start = time.perf_counter()
    try:
        tensors = config.make_inputs(device, seed)
        problem = _compare_forward(config, tensors)
        if problem is None:
            def fn(*ts):
                out = config.call(functional, *ts)
                return out[0] if isinstance(out, tuple) else out  # the indices are not differentiable

            nondet_tol = 0.0 if torch.device(device).type == "cpu" else 1e-10  # GPU atomics may reorder sums
            torch.autograd.gradcheck(fn, tuple(tensors), eps=1e-6, atol=1e-5, rtol=1e-3,
                                     nondet_tol=nondet_tol, fast_mode=fast_mode, raise_exception=True)
    except Exception as exc:  # a failed gradcheck, or an op that raised
        first_line = (str(exc).strip().splitlines() or [""])[0].rstrip(",:")
        problem = f"{type(exc).__name__}: {first_line}"
    seconds = time.perf_counter() - start
    return CheckResult(config, problem is None, seconds, problem or "")


def run_checks(configs=None, device="cpu", quick=False, seed=0, fast_mode=True, out=print):
    """Run every configuration, printing one line each and a summary; returns the list of CheckResults."""
    configs = configurations(quick) if configs is None else configs
    width = max((len(c.name) for c in configs), default=0)
    results = []
    started = time.perf_counter()
    for config in configs:
        result = run_config(config, device, seed, fast_mode)
        results.append(result)
        line = f"{config.name:<{width}}  {'PASS' if result.passed else 'FAIL'}  {result.seconds:6.3f}s"
        if result.message:
            line += f"  {result.message}"
        out(line)
    failed = sum(not r.passed for r in results)
    out(f"check: {len(results) - failed} passed, {failed} failed ({time.perf_counter() - started:.1f}s on {device})")
    return results


def add_parser(commands):
    p = commands.add_parser(
        "check", help="gradcheck (float64) every op over a matrix of strides, paddings, dilations, groups...",
        description="torch.autograd.gradcheck in float64 over a matrix of configurations of conv1d/2d/3d, "
                    "conv_transpose1d/2d/3d and max_pool1d/2d/3d; each forward is also compared with "
                    "torch.nn.functional's.",
    )
    p.add_argument("--device", type=_cli.device, default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--quick", action="store_true", help="a smaller subset: one option changed at a time")
    p.add_argument("--full-jacobian", action="store_true",
                   help="compare every Jacobian entry (gradcheck fast_mode=False); much slower")
    p.add_argument("--seed", type=int, default=0, help="seed for the random test tensors (default 0)")
    return p


def run(args):
    device = torch.device(args.device)  # an existing cpu or cuda[:N], as the option's type checked
    configs = configurations(args.quick)
    mode = "full Jacobians" if args.full_jacobian else "fast mode"
    print(f"gradcheck (float64, {mode}) of {len(configs)} configurations on {device}")
    results = run_checks(configs, device=str(device), seed=args.seed, fast_mode=not args.full_jacobian)
    return 0 if all(r.passed for r in results) else 1
