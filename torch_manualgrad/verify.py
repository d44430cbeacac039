"""verify(model, example_inputs): does a model converted to our layers compute what the torch.nn one does, layer by layer?

Two deep copies of the model are made (the caller's model, its gradients and buffers are left alone):
a reference with torch.nn's layers (revert) and a converted one (convert). Both run forward and backward
on the same inputs, from the same RNG state (so dropout draws the same masks; train/eval mode is kept
as given), and the backward is a fixed random projection of every floating output.

Each converted conv/max-pool layer is then checked *in isolation*: forward hooks in the reference run
record the input of every call, and the torch.nn layer and ours are both run on that very input and
differentiated against the same random output gradient; their outputs and their input and parameter
gradients are compared. So an error shows up in the layer that makes it, not in every layer after it.
End to end, the model's outputs, the gradient of the inputs and of every parameter are compared too,
and for each layer how far its output drifted in the full run is reported (for information).

A difference passes when  max|ours - torch| <= atol + rtol * max|torch|  (tolerances scale with the size
of the tensor compared, since a convolution's rounding error does too); "rel" in the report is
max|ours - torch| / max|torch|. Default tolerances follow the dtype of the tensors compared.

    python -m torch_manualgrad verify my_models:build_net --input-shape 8,3,32,32
"""
import copy
import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import sys
from typing import List, Optional

import torch

from . import nn as ours_nn
from .convert import convert, revert

__all__ = ["verify", "VerifyResult", "LayerRecord", "Comparison", "default_tolerances", "add_parser", "run"]

_OUR_LAYERS = (ours_nn.Conv1d, ours_nn.Conv2d, ours_nn.MaxPool1d, ours_nn.MaxPool2d)

# (rtol, atol) for tensors of each dtype, relative to the largest magnitude of the reference tensor.
_TOLERANCES = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


def default_tolerances(dtype):
    """The (rtol, atol) verify uses for tensors of `dtype` when none are given."""
    return _TOLERANCES.get(dtype, _TOLERANCES[torch.float32])


@dataclasses.dataclass
class Comparison:
    """The largest difference between two sets of tensors (ours vs torch.nn's)."""

    name: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    tolerance_used: float = 0.0  # max over the tensors of max|diff| / (atol + rtol * max|torch|); ok when <= 1
    ok: bool = True
    worst: str = ""  # the tensor with the largest tolerance_used, e.g. "weight"


@dataclasses.dataclass
class LayerRecord:
    """One converted layer: its qualified name, its torch.nn type, and how ours compared with torch.nn's.

    output_*: the layer's output, ours vs torch.nn's on the same input. grad_*: the gradients of the
    layer's input and parameters for the same output gradient (grad_worst names the worst of them).
    tolerance_used: the largest of max|diff| / (atol + rtol * max|torch|) over them; ok means <= 1.
    drift_rel: how far the layer's output differed in the full end-to-end runs (accumulated from the
    layers before it; informational, not part of ok). None where there was nothing to compare.
    """

    name: str
    type: str
    calls: int = 0
    output_max_abs: Optional[float] = None
    output_max_rel: Optional[float] = None
    grad_max_abs: Optional[float] = None
    grad_max_rel: Optional[float] = None
    grad_worst: str = ""
    drift_rel: Optional[float] = None
    tolerance_used: Optional[float] = None  # worst max|diff| / (atol + rtol * max|torch|) of output and grads
    ok: bool = True
    note: str = ""


@dataclasses.dataclass
class VerifyResult:
    """What verify() found. Truthy when every layer and every end-to-end comparison is within tolerance."""

    ok: bool
    layers: List[LayerRecord]
    end_to_end: List[Comparison]
    rtol: Optional[float] = None  # None: the per-dtype defaults
    atol: Optional[float] = None
    error: str = ""  # set when the converted model raised where the torch.nn one did not

    def __bool__(self):
        return self.ok

    @property
    def failed(self):
        """The records of the layers beyond tolerance."""
        return [layer for layer in self.layers if not layer.ok]

    def report(self):
        """A printable table: one row per converted layer, then the end-to-end comparisons and a verdict."""
        def num(value):
            return "-" if value is None else f"{value:.2e}"

        header = ("layer", "type", "calls", "out abs", "out rel", "grad abs", "grad rel", "worst grad",
                  "drift rel", "tol used", "status")
        rows = [(layer.name or "(model)", layer.type, str(layer.calls), num(layer.output_max_abs),
                 num(layer.output_max_rel), num(layer.grad_max_abs), num(layer.grad_max_rel),
                 layer.grad_worst or "-", num(layer.drift_rel),
                 "-" if layer.tolerance_used is None else f"{layer.tolerance_used:.2g}",
                 ("ok" if layer.ok else "FAIL") + (f" ({layer.note})" if layer.note else ""))
                for layer in self.layers]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = []
        if rows:
            out += [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
        else:
            out.append("no torch.nn Conv1d/Conv2d/MaxPool1d/MaxPool2d layers to convert in this model")
        if self.end_to_end:
            out.append("")
            out.append("end to end (whole model, torch.nn layers vs ours):")
            width = max(len(c.name) for c in self.end_to_end)
            for c in self.end_to_end:
                where = f"  worst: {c.worst}" if c.worst else ""
                out.append(f"  {c.name.ljust(width)}  abs {num(c.max_abs)}  rel {num(c.max_rel)}  "
                           f"tol used {c.tolerance_used:.2g}  {'ok' if c.ok else 'FAIL'}{where}")
        if self.error:
            out += ["", f"error: {self.error}"]
        tol = ("default per dtype (float64 rtol 1e-9, float32 rtol 1e-4)" if self.rtol is None and self.atol is None
               else f"rtol {self.rtol if self.rtol is not None else 'default'}, "
                    f"atol {self.atol if self.atol is not None else 'default'}")
        out.append("")
        if self.ok and not self.layers:
            out.append(f"verify: OK, nothing converted; outputs and gradients agree (tolerance: {tol})")
        elif self.ok:
            out.append(f"verify: OK, {len(self.layers)} layers agree with torch.nn (tolerance: {tol})")
        else:
            bad = ", ".join(layer.name for layer in self.failed) or "end-to-end comparison"
            out.append(f"verify: FAILED ({bad}) (tolerance: {tol})")
        return "\n".join(out)

    def __str__(self):
        return self.report()


# ---------------------------------------------------------------------------------------------------
# Comparing tensors
# ---------------------------------------------------------------------------------------------------

def _tensors(obj):
    """The tensors in a (nested) output: a tensor, tuple/list, dict or dataclass-like object."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _floating(tensors):
    return [t for t in tensors if t is not None and (t.is_floating_point() or t.is_complex())]


def _difference(ours, theirs, rtol, atol):
    """(max abs diff, max abs diff / max |theirs|, max abs diff / (atol + rtol * max|theirs|)) of two
    same-shaped tensors; the last is <= 1 when they agree within tolerance."""
    if ours.shape != theirs.shape:
        return math.inf, math.inf, math.inf
    if rtol is None or atol is None:
        default_rtol, default_atol = default_tolerances(theirs.dtype)
        rtol = default_rtol if rtol is None else rtol
        atol = default_atol if atol is None else atol
    a, b = ours.detach().to(torch.float64), theirs.detach().to(torch.float64)
    diff = (a - b).abs()
    # the same inf or nan in the same place is agreement; a non-finite value anywhere else is not
    same_nonfinite = ((a == b) | (a.isnan() & b.isnan())) & ~torch.isfinite(b)
    diff = torch.where(same_nonfinite, torch.zeros_like(diff), diff).nan_to_num(nan=math.inf)
    max_abs = diff.max().item() if diff.numel() else 0.0
    finite_b = b[torch.isfinite(b)].abs()
    scale = finite_b.max().item() if finite_b.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    allowed = atol + rtol * scale
    used = max_abs / allowed if allowed > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, max_rel, used


def _compare(name, pairs, rtol, atol):
    """A Comparison over several (label, ours, theirs) tensor pairs; the worst relative one names it."""
    result = Comparison(name)
    for label, ours, theirs in pairs:
        if ours is None and theirs is None:
            continue
        if ours is None or theirs is None:
            max_abs, max_rel, used = math.inf, math.inf, math.inf
        else:
            max_abs, max_rel, used = _difference(ours, theirs, rtol, atol)
        _merge(result, Comparison(name, max_abs, max_rel, used, used <= 1.0, label))
    return result


# ---------------------------------------------------------------------------------------------------
# Running the two models
# ---------------------------------------------------------------------------------------------------

def _as_args(example_inputs):
    """example_inputs → (args, kwargs): a tensor is one argument, a tuple/list several, a dict keywords."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _fresh_leaves(obj):
    """A copy of the inputs in which every floating tensor is a new leaf that requires grad."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().clone()
        return t.requires_grad_() if (t.is_floating_point() or t.is_complex()) else t
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_fresh_leaves(o) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fresh_leaves(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _fresh_leaves(v) for k, v in obj.items()}
    return obj


def _cuda_devices(model, inputs):
    devices = {t.device.index or 0 for t in list(model.parameters()) + list(model.buffers()) + _tensors(inputs)
               if t.device.type == "cuda"}
    return sorted(devices)


def _projection(tensors, seed):
    """Fixed random tensors to weight the outputs with: the backward is of sum(output * projection)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
            for t in tensors]


def _run_model(model, args, kwargs, layer_names, seed, keep_inputs):
    """Forward + backward of a fixed random projection; returns outputs, input grads, param grads and
    per-layer captures ({name: {"inputs": [...], "outputs": [...]}})."""
    modules = dict(model.named_modules())
    captured = {name: {"inputs": [], "outputs": []} for name in layer_names}
    handles = []

    def hook(name):
        def record(module, inputs, output):
            if keep_inputs and inputs and isinstance(inputs[0], torch.Tensor):
                captured[name]["inputs"].append(inputs[0].detach().clone())
            captured[name]["outputs"].append([t.detach().clone() for t in _floating(_tensors(output))])
        return record

    for name in layer_names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    args, kwargs = _fresh_leaves(args), _fresh_leaves(kwargs)
    input_leaves = [t for t in _floating(_tensors([args, kwargs])) if t.requires_grad]
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model, [args, kwargs])), torch.enable_grad():
            torch.manual_seed(seed)
            output = model(*args, **kwargs)
            outputs = [t for t in _floating(_tensors(output)) if t.requires_grad]
            grads = [None] * (len(input_leaves) + len(named_params))
            if outputs:
                weights = _projection(outputs, seed + 1)
                loss = sum((o * w).sum() for o, w in zip(outputs, weights))
                grads = list(torch.autograd.grad(loss, input_leaves + [p for _, p in named_params],
                                                 allow_unused=True))
    finally:
        for handle in handles:
            handle.remove()
    all_outputs = [t.detach() for t in _floating(_tensors(output))]
    input_grads = grads[:len(input_leaves)]
    param_grads = {n: g for (n, _), g in zip(named_params, grads[len(input_leaves):])}
    return all_outputs, input_grads, param_grads, captured


def _layer_alone(module, x, seed):
    """One layer on one input: (outputs, [("input", grad), (param name, grad), ...]) for a fixed output gradient."""
    x = x.detach().clone()
    if x.is_floating_point():
        x.requires_grad_()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []), \
            torch.enable_grad():
        torch.manual_seed(seed)
        outputs = _floating(_tensors(module(x)))
    wrt = ([("input", x)] if x.requires_grad else []) + params
    differentiable = [o for o in outputs if o.requires_grad]
    if not differentiable or not wrt:
        return [o.detach() for o in outputs], []
    grads = torch.autograd.grad(differentiable, [t for _, t in wrt], grad_outputs=_projection(differentiable, seed + 2),
                                allow_unused=True)
    return [o.detach() for o in outputs], [(label, g) for (label, _), g in zip(wrt, grads)]


def verify(model, example_inputs, rtol=None, atol=None, *, seed=0):
    """Compare `model` converted to our layers with the same model on torch.nn's, layer by layer.

    model: a torch.nn.Module (left untouched: both runs use deep copies, in the train/eval mode given).
    example_inputs: a tensor, a tuple/list of positional arguments, or a dict of keyword arguments.
    rtol, atol: tolerances on  max|ours - torch| <= atol + rtol * max|torch|; None picks them per dtype
    (float64 rtol 1e-9, float32 rtol 1e-4, float16 1e-2, bfloat16 5e-2).
    seed: the RNG seed both runs start from (dropout masks) and of the random output projections.

    Returns a VerifyResult (truthy when everything agrees; .report() prints the table).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"verify: expected model to be a torch.nn.Module, but got {type(model).__name__}")
    try:
        reference = revert(copy.deepcopy(model))
        converted = convert(copy.deepcopy(model))
    except Exception as exc:
        raise RuntimeError(f"verify: could not deep-copy the model ({type(exc).__name__}: {exc})") from exc
    layer_names = [name for name, module in converted.named_modules() if isinstance(module, _OUR_LAYERS)]
    ref_modules, our_modules = dict(reference.named_modules()), dict(converted.named_modules())
    args, kwargs = _as_args(example_inputs)

    ref_out, ref_in_grads, ref_param_grads, ref_captured = _run_model(reference, args, kwargs, layer_names, seed, True)
    try:
        our_out, our_in_grads, our_param_grads, our_captured = _run_model(converted, args, kwargs, layer_names,
                                                                          seed, False)
    except Exception as exc:
        our_error = f"the converted model raised {type(exc).__name__}: {exc}"
    else:
        our_error = ""

    layers = []
    for index, name in enumerate(layer_names):
        record = LayerRecord(name=name, type=_torch_type_name(our_modules[name]))
        inputs = ref_captured[name]["inputs"]
        record.calls = len(inputs)
        if not inputs:
            record.note = "not called"
            layers.append(record)
            continue
        out_cmp, grad_cmp = Comparison("output"), Comparison("grad")
        for call, x in enumerate(inputs):
            call_seed = seed + 1000 * (index + 1) + call
            try:
                theirs_out, theirs_grads = _layer_alone(ref_modules[name], x, call_seed)
                mine_out, mine_grads = _layer_alone(our_modules[name], x, call_seed)
            except Exception as exc:
                record.ok = False
                record.note = f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                break
            _merge(out_cmp, _compare("output", [(f"output {i}", m, t) for i, (m, t)
                                                in enumerate(zip(mine_out, theirs_out))], rtol, atol))
            if len(mine_out) != len(theirs_out):
                out_cmp.ok = False
            _merge(grad_cmp, _compare("grad", [(label, m, t) for (label, m), (_, t)
                                              in zip(mine_grads, theirs_grads)], rtol, atol))
        else:
            record.output_max_abs, record.output_max_rel = out_cmp.max_abs, out_cmp.max_rel
            if grad_cmp.worst:
                record.grad_max_abs, record.grad_max_rel, record.grad_worst = (
                    grad_cmp.max_abs, grad_cmp.max_rel, grad_cmp.worst)
            record.tolerance_used = max(out_cmp.tolerance_used, grad_cmp.tolerance_used)
            record.ok = out_cmp.ok and grad_cmp.ok
        if not our_error:
            our_outs, ref_outs = our_captured[name]["outputs"], ref_captured[name]["outputs"]
            if len(our_outs) == len(ref_outs):
                drift = _compare("drift", [("output", m, t) for mo, to in zip(our_outs, ref_outs)
                                           for m, t in zip(mo, to)], rtol, atol)
                record.drift_rel = drift.max_rel
        layers.append(record)

    end_to_end = []
    if not our_error:
        end_to_end.append(_compare("model output", [(f"output {i}", m, t) for i, (m, t)
                                                    in enumerate(zip(our_out, ref_out))], rtol, atol))
        if ref_in_grads:
            end_to_end.append(_compare("input gradient", [(f"input {i}", m, t) for i, (m, t)
                                                          in enumerate(zip(our_in_grads, ref_in_grads))],
                                       rtol, atol))
        if ref_param_grads:
            end_to_end.append(_compare("parameter gradients", [(n, our_param_grads.get(n), g)
                                                               for n, g in ref_param_grads.items()], rtol, atol))
    ok = not our_error and all(layer.ok for layer in layers) and all(c.ok for c in end_to_end)
    return VerifyResult(ok=ok, layers=layers, end_to_end=end_to_end, rtol=rtol, atol=atol, error=our_error)


def _torch_type_name(module):
    """The torch.nn class a converted layer stands for, e.g. "Conv2d"."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn"):
            return cls.__name__
    return type(module).__name__


def _merge(total, part):
    """Fold Comparison `part` into `total` (maxima, and the worst tensor by tolerance used)."""
    if not part.worst:
        return
    if part.tolerance_used > total.tolerance_used or not total.worst:
        total.worst = part.worst
    total.max_abs = max(total.max_abs, part.max_abs)
    total.max_rel = max(total.max_rel, part.max_rel)
    total.tolerance_used = max(total.tolerance_used, part.tolerance_used)
    total.ok = total.ok and part.ok


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _load_factory(target):
    """"package.module:factory" or "path/to/file.py:factory" (attribute may be dotted) → the callable."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. my_models:build_net), got {target!r}")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise ImportError(f"no such file: {module_name}")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` does for the working directory
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    factory = functools.reduce(getattr, attr.split("."), module)
    if not callable(factory):
        raise TypeError(f"{target} is a {type(factory).__name__}, not a callable")
    return factory


def _parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(v < 0 for v in shape):
        raise ValueError(f"expected --input-shape as comma-separated sizes, e.g. 1,3,32,32, got {text!r}")
    return shape


def _move(obj, device, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if (dtype is not None and obj.is_floating_point()) else None)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj


def add_parser(commands):
    p = commands.add_parser(
        "verify", help="compare a model converted to our layers with the torch.nn original, layer by layer",
        description="Build a model from MODULE:FACTORY, convert a copy to torch_manualgrad's layers, run both "
                    "forward and backward on the same input and compare every converted layer's output and "
                    "gradients. Exit status 0 when everything agrees within tolerance, 1 otherwise.",
    )
    p.add_argument("target", metavar="MODULE:FACTORY",
                   help="a callable returning a model, or (model, example_input); MODULE may be a dotted module "
                        "name (importable from the working directory) or a path to a .py file")
    p.add_argument("--input-shape", default=None, help="random example input of this shape, e.g. 1,3,32,32 "
                                                       "(required unless the factory returns an example input)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="cast the model and input to this dtype (default: as the factory made them)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--eval", action="store_true", help="put the model in eval mode first (default: as returned)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: by dtype)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default: by dtype)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random input, dropout and projections")
    return p


def run(args):
    try:
        factory = _load_factory(args.target)
        shape = _parse_shape(args.input_shape) if args.input_shape else None
        device = torch.device(args.device)
    except Exception as exc:
        print(f"verify: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("verify: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    made = factory()
    example = None
    if isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, example = made
    if not isinstance(made, torch.nn.Module):
        print(f"verify: {args.target} returned a {type(made).__name__}, expected a torch.nn.Module "
              "or (module, example_input)", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype] if args.dtype else None
    model = made.to(device=device, dtype=dtype) if dtype else made.to(device=device)
    if args.eval:
        model.eval()
    if shape is not None:
        input_dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        gen = torch.Generator().manual_seed(args.seed)
        example = torch.randn(shape, generator=gen, dtype=input_dtype).to(device)
    elif example is None:
        print(f"verify: {args.target} returned no example input: pass --input-shape", file=sys.stderr)
        return 2
    else:
        example = _move(example, device, dtype)
    result = verify(model, example, rtol=args.rtol, atol=args.atol, seed=args.seed)
    print(result.report())
    return 0 if result.ok else 1
