"""Shared sample generators (curated lists and hypothesis strategies), tensor factories and tolerances for the tests."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional, Tuple, Union

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st

IntOrTuple = Union[int, Tuple[int, ...]]

CUDA_AVAILABLE = torch.cuda.is_available()

# Every test takes a `device` parameter; the CUDA variant is collected but skipped when no GPU is present.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available"),
    ),
]

FLOAT_DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float64, id="float64"),
]

# Memory layouts a test tensor can be given; all but "contiguous" produce non-contiguous strides.
LAYOUTS = ("contiguous", "transposed", "sliced", "channels_last")


def tolerances(dtype: torch.dtype) -> dict:
    """rtol/atol for comparing our kernels with torch's (different summation order, same math)."""
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    return dict(rtol=1e-4, atol=1e-4)


def ntuple(value: IntOrTuple, dim: int) -> Tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        assert len(value) == dim, (value, dim)
        return tuple(int(v) for v in value)
    return (int(value),) * dim


def fmt(value) -> str:
    """Compact, -k friendly text for test ids: 3 -> "3", (3, 2) -> "3x2", (3,) -> "3x", "same" -> "same"."""
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value) + ("x" if len(value) == 1 else "")
    return str(value)


def make_generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def apply_layout(make_storage, shape, layout: str, device, dtype, requires_grad: bool) -> torch.Tensor:
    """Build a leaf tensor of `shape` whose strides follow `layout`.

    `make_storage(storage_shape)` returns a CPU tensor of values; the values are laid out so that the
    resulting view still has shape `shape` but (except for "contiguous") is not contiguous.
    """
    shape = tuple(shape)
    ndim = len(shape)
    if layout == "channels_last" and ndim != 4:
        layout = "transposed"
    if layout == "transposed" and ndim < 2:
        layout = "sliced"
    if layout == "contiguous" or ndim == 0:
        t = make_storage(shape).to(device=device, dtype=dtype)
    elif layout == "transposed":
        storage_shape = shape[:-2] + (shape[-1], shape[-2])
        t = make_storage(storage_shape).to(device=device, dtype=dtype).transpose(-1, -2)
    elif layout == "sliced":
        storage_shape = shape[:-1] + (2 * shape[-1] + 1,)
        t = make_storage(storage_shape).to(device=device, dtype=dtype)[..., 1::2]
    elif layout == "channels_last":
        t = make_storage(shape).to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        raise AssertionError(f"unknown layout {layout}")
    assert t.shape == shape
    return t.detach().requires_grad_(requires_grad)


def randn_tensor(shape, device, dtype, gen: torch.Generator, layout="contiguous", requires_grad=False):
    return apply_layout(
        lambda s: torch.randn(s, generator=gen, dtype=torch.float64), shape, layout, device, dtype, requires_grad
    )


def pool_values_tensor(shape, device, dtype, gen, values="distinct", layout="contiguous", requires_grad=False):
    """Input for max-pool tests.

    distinct: a random permutation of integers (no ties anywhere, so the max is unique and gradcheck is
              well-defined: neighbouring values differ by 1, far more than gradcheck's eps);
    ties:     small random integers, many equal values inside a window;
    nan:      normal values with some NaNs sprinkled in;
    normal:   plain standard normal values.
    """

    def make(storage_shape):
        n = math.prod(storage_shape)
        if values == "distinct":
            return (torch.randperm(n, generator=gen).to(torch.float64) - n // 2).reshape(storage_shape)
        if values == "ties":
            return torch.randint(0, 3, storage_shape, generator=gen).to(torch.float64)
        out = torch.randn(storage_shape, generator=gen, dtype=torch.float64)
        if values == "nan":
            mask = torch.rand(storage_shape, generator=gen) < 0.2
            out[mask] = float("nan")
        return out

    return apply_layout(make, shape, layout, device, dtype, requires_grad)


def conv_output_size(size, kernel, stride, pad_total, dilation):
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(size, kernel, stride, pad, dilation, ceil_mode):
    numerator = size + 2 * pad - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-numerator // stride) + 1
        # the last window must start inside the input or the left padding
        if (out - 1) * stride >= size + pad:
            out -= 1
    else:
        out = numerator // stride + 1
    return out


# --------------------------------------------------------------------------------------------------
# Convolution samples
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvCase:
    dim: int
    batch: Optional[int]  # None means an unbatched input (C, *spatial)
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    input_size: Tuple[int, ...]  # spatial
    stride: IntOrTuple = 1
    padding: Union[IntOrTuple, str] = 0
    dilation: IntOrTuple = 1
    groups: int = 1
    bias: bool = True

    def __str__(self):
        b = "unbatched" if self.batch is None else f"N{self.batch}"
        return (
            f"conv{self.dim}d-{b}-C{self.in_channels}to{self.out_channels}-k{fmt(self.kernel_size)}"
            f"-in{fmt(self.input_size)}-s{fmt(self.stride)}-p{fmt(self.padding)}-d{fmt(self.dilation)}"
            f"-g{self.groups}-{'bias' if self.bias else 'nobias'}"
        )

    # shapes ---------------------------------------------------------------------------------------
    @property
    def input_shape(self):
        lead = () if self.batch is None else (self.batch,)
        return lead + (self.in_channels,) + tuple(self.input_size)

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups) + tuple(self.kernel_size)

    def kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def pads(self):
        """(left, right) padding per spatial dim, resolving 'same' (extra padding on the right) and 'valid'."""
        dil = ntuple(self.dilation, self.dim)
        if self.padding == "valid":
            return [(0, 0)] * self.dim
        if self.padding == "same":
            out = []
            for k, d in zip(self.kernel_size, dil):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return out
        return [(p, p) for p in ntuple(self.padding, self.dim)]

    def symmetric_padding(self) -> Optional[Tuple[int, ...]]:
        pads = self.pads()
        if any(l != r for l, r in pads):
            return None
        return tuple(l for l, _ in pads)

    def output_spatial(self):
        st_ = ntuple(self.stride, self.dim)
        dil = ntuple(self.dilation, self.dim)
        return tuple(
            conv_output_size(n, k, s, l + r, d)
            for n, k, s, (l, r), d in zip(self.input_size, self.kernel_size, st_, self.pads(), dil)
        )

    @property
    def output_shape(self):
        lead = () if self.batch is None else (self.batch,)
        return lead + (self.out_channels,) + self.output_spatial()

    def is_valid(self):
        if self.in_channels % self.groups or self.out_channels % self.groups:
            return False
        if self.padding == "same" and any(s != 1 for s in ntuple(self.stride, self.dim)):
            return False
        return all(o >= 1 for o in self.output_spatial())

    # functions ------------------------------------------------------------------------------------
    def torch_fn(self):
        return F.conv1d if self.dim == 1 else F.conv2d

    def tmg_fn(self):
        import torch_manualgrad

        return torch_manualgrad.functional.conv1d if self.dim == 1 else torch_manualgrad.functional.conv2d

    # tensors --------------------------------------------------------------------------------------
    def make_tensors(self, device, dtype, requires_grad=False, seed=0, layouts=("contiguous",) * 3):
        gen = make_generator(seed)
        x = randn_tensor(self.input_shape, device, dtype, gen, layouts[0], requires_grad)
        w = randn_tensor(self.weight_shape, device, dtype, gen, layouts[1], requires_grad)
        b = randn_tensor((self.out_channels,), device, dtype, gen, layouts[2], requires_grad) if self.bias else None
        return x, w, b

    def make_grad_output(self, device, dtype, seed=1, layout="contiguous"):
        return randn_tensor(self.output_shape, device, dtype, make_generator(seed), layout)


def _conv_base(dim):
    if dim == 1:
        return dict(dim=1, kernel_size=(3,), input_size=(7,))
    # non-square kernel and input catch H/W mix-ups
    return dict(dim=2, kernel_size=(3, 2), input_size=(6, 5))


def conv_samples(dims=(1, 2)):
    """Curated convolution cases for gradcheck/opcheck: every value of every argument appears, and the
    important combinations (padding x stride x groups) are crossed; dilation, bias and batch are cycled."""
    cases = []
    channel_options = [
        # (in_channels, out_channels, groups)
        (2, 3, 1),
        (4, 2, 2),  # grouped: 2 input and 1 output channel per group
        (3, 6, 3),  # depthwise with channel multiplier 2
    ]
    counter = itertools.count()
    batches = [2, 1, 0, None]
    for dim in dims:
        base = _conv_base(dim)
        paddings = [
            (0, None),
            (1, None),
            ((1, 0) if dim == 2 else (2,), None),  # tuple padding
            ("same", None),  # odd kernel
            ("same", (2,) * dim),  # even kernel -> asymmetric padding
            ("same", (2, 3) if dim == 2 else (4,)),  # even kernel along one dim
            ("valid", None),
        ]
        strides = [1, 2, (2, 1) if dim == 2 else (3,)]
        dilations = [1, 2, (1, 2) if dim == 2 else (2,)]
        for (padding, kernel), stride, (cin, cout, groups) in itertools.product(paddings, strides, channel_options):
            if padding == "same" and stride != 1:
                continue
            i = next(counter)
            case = ConvCase(
                dim=dim,
                batch=batches[i % len(batches)],
                in_channels=cin,
                out_channels=cout,
                kernel_size=kernel if kernel is not None else base["kernel_size"],
                input_size=base["input_size"],
                stride=stride,
                padding=padding,
                dilation=dilations[i % len(dilations)],
                groups=groups,
                bias=bool(i % 2),
            )
            assert case.is_valid(), case
            cases.append(case)
        # bias x batch crossed explicitly on the plain configuration
        for batch, bias in itertools.product([0, 1, 3, None], [True, False]):
            cases.append(ConvCase(batch=batch, in_channels=2, out_channels=3, bias=bias, padding=1, **base))
    return list(dict.fromkeys(cases))  # drop repeats, keep order


def tiny_conv_samples(dims=(1, 2)):
    """Small cases with symmetric padding (the form the loop-level reference and the registered op take)."""
    return [c for c in conv_samples(dims) if c.batch in (1, 2) and c.symmetric_padding() is not None]


@st.composite
def conv_cases(draw, dims=(1, 2), allow_unbatched=True, max_batch=3):
    """Random valid convolution configurations."""
    dim = draw(st.sampled_from(dims))
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dim))

    def int_or_tuple(lo, hi):
        return draw(st.one_of(st.integers(lo, hi), st.tuples(*[st.integers(lo, hi)] * dim)))

    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = 1 if padding_kind == "same" else int_or_tuple(1, 3)
    dilation = int_or_tuple(1, 3)
    if padding_kind == "int":
        padding = draw(st.integers(0, 3))
    elif padding_kind == "tuple":
        padding = tuple(draw(st.integers(0, 3)) for _ in range(dim))
    else:
        padding = padding_kind
    pads = ConvCase(dim, 1, cin, cout, kernel, (1,) * dim, stride, padding, dilation, groups).pads()
    dil = ntuple(dilation, dim)
    input_size = tuple(
        max(1, d * (k - 1) + 1 - (l + r)) + draw(st.integers(0, 4)) for k, d, (l, r) in zip(kernel, dil, pads)
    )
    if allow_unbatched:
        batch = draw(st.one_of(st.none(), st.integers(0, max_batch)))
    else:
        batch = draw(st.integers(0, max_batch))
    case = ConvCase(dim, batch, cin, cout, kernel, input_size, stride, padding, dilation, groups, draw(st.booleans()))
    assert case.is_valid(), case
    return case


# --------------------------------------------------------------------------------------------------
# Max-pool samples
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PoolCase:
    dim: int
    batch: Optional[int]
    channels: int
    input_size: Tuple[int, ...]
    kernel_size: IntOrTuple
    stride: Optional[IntOrTuple] = None
    padding: IntOrTuple = 0
    dilation: IntOrTuple = 1
    ceil_mode: bool = False
    return_indices: bool = False

    def __str__(self):
        b = "unbatched" if self.batch is None else f"N{self.batch}"
        return (
            f"pool{self.dim}d-{b}-C{self.channels}-in{fmt(self.input_size)}-k{fmt(self.kernel_size)}"
            f"-s{fmt(self.stride)}-p{fmt(self.padding)}-d{fmt(self.dilation)}-{'ceil' if self.ceil_mode else 'floor'}"
            f"{'-indices' if self.return_indices else ''}"
        )

    @property
    def input_shape(self):
        lead = () if self.batch is None else (self.batch,)
        return lead + (self.channels,) + tuple(self.input_size)

    def kwargs(self, return_indices=None):
        return dict(
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices if return_indices is None else return_indices,
        )

    def tuples(self):
        """kernel, stride, padding, dilation as tuples of length dim (stride defaults to kernel)."""
        k = ntuple(self.kernel_size, self.dim)
        s = k if self.stride is None else ntuple(self.stride, self.dim)
        return k, s, ntuple(self.padding, self.dim), ntuple(self.dilation, self.dim)

    def output_spatial(self):
        k, s, p, d = self.tuples()
        return tuple(
            pool_output_size(n, kk, ss, pp, dd, self.ceil_mode) for n, kk, ss, pp, dd in zip(self.input_size, k, s, p, d)
        )

    @property
    def output_shape(self):
        lead = () if self.batch is None else (self.batch,)
        return lead + (self.channels,) + self.output_spatial()

    def is_valid(self):
        k, s, p, d = self.tuples()
        if any(pp > kk // 2 for kk, pp in zip(k, p)):
            return False
        return all(o >= 1 for o in self.output_spatial())

    def has_empty_window(self):
        """True if some window's taps all fall in the padding (possible with dilation: the taps step over
        the input). Such a window has no argmax inside the input; see test_max_pool_window_in_padding."""
        k, s, p, d = self.tuples()
        for n, out, kk, ss, pp, dd in zip(self.input_size, self.output_spatial(), k, s, p, d):
            for o in range(out):
                start = o * ss - pp
                if not any(0 <= start + j * dd < n for j in range(kk)):
                    return True
        return False

    def torch_fn(self):
        return F.max_pool1d if self.dim == 1 else F.max_pool2d

    def tmg_fn(self):
        import torch_manualgrad

        return torch_manualgrad.functional.max_pool1d if self.dim == 1 else torch_manualgrad.functional.max_pool2d

    def make_input(self, device, dtype, values="distinct", requires_grad=False, seed=0, layout="contiguous"):
        return pool_values_tensor(self.input_shape, device, dtype, make_generator(seed), values, layout, requires_grad)

    def make_grad_output(self, device, dtype, seed=1, layout="contiguous"):
        return randn_tensor(self.output_shape, device, dtype, make_generator(seed), layout)


def pool_samples(dims=(1, 2)):
    """Curated max-pool cases for gradcheck: kernel x stride x padding crossed, dilation/ceil_mode/
    return_indices/batch cycled so every value appears."""
    cases = []
    counter = itertools.count()
    batches = [2, 1, 0, None]
    for dim in dims:
        input_size = (9,) if dim == 1 else (7, 6)
        kernels = [2, 3] + ([(3, 2)] if dim == 2 else [(4,)])
        strides = [None, 1, 2] + ([(1, 2)] if dim == 2 else [(3,)])
        paddings = [0, 1] + ([(1, 0)] if dim == 2 else [(2,)])
        dilations = [1, 2, (2, 1) if dim == 2 else (3,)]
        for kernel, stride, padding in itertools.product(kernels, strides, paddings):
            i = next(counter)
            for ceil_mode in (False, True):
                case = PoolCase(
                    dim=dim,
                    batch=batches[i % len(batches)],
                    channels=2,
                    input_size=input_size,
                    kernel_size=kernel,
                    stride=stride,
                    padding=padding,
                    dilation=dilations[(i + ceil_mode) % len(dilations)],
                    ceil_mode=ceil_mode,
                    return_indices=bool((i + ceil_mode) % 2),
                )
                if case.is_valid() and not case.has_empty_window():
                    cases.append(case)
    return cases


def tiny_pool_samples(dims=(1, 2)):
    return [c for c in pool_samples(dims) if c.batch is not None and c.batch <= 2]


@st.composite
def pool_cases(draw, dims=(1, 2), allow_unbatched=True, max_batch=3):
    """Random valid max-pool configurations."""
    dim = draw(st.sampled_from(dims))

    def int_or_tuple(lo, hi):
        return draw(st.one_of(st.integers(lo, hi), st.tuples(*[st.integers(lo, hi)] * dim)))

    kernel = int_or_tuple(1, 4)
    k = ntuple(kernel, dim)
    stride = draw(st.one_of(st.none(), st.integers(1, 4), st.tuples(*[st.integers(1, 4)] * dim)))
    if draw(st.booleans()):
        padding = draw(st.integers(0, min(k) // 2))
    else:
        padding = tuple(draw(st.integers(0, kk // 2)) for kk in k)
    dilation = int_or_tuple(1, 3)
    p = ntuple(padding, dim)
    d = ntuple(dilation, dim)
    input_size = tuple(
        max(1, dd * (kk - 1) + 1 - 2 * pp) + draw(st.integers(0, 5)) for kk, pp, dd in zip(k, p, d)
    )
    if allow_unbatched:
        batch = draw(st.one_of(st.none(), st.integers(0, max_batch)))
    else:
        batch = draw(st.integers(0, max_batch))
    case = PoolCase(dim, batch, draw(st.integers(1, 3)), input_size, kernel, stride, padding, dilation, draw(st.booleans()), True)
    assert case.is_valid(), case
    assume(not case.has_empty_window())
    return case
