"""max_pool3d on the CPU through the raw ops (torch.ops.manualgrad.max_pool_forward / max_pool_backward with 3-entry
arguments) against torch.nn.functional.max_pool3d and its autograd backward: values bit for bit, indices equal,
gradients, channels_last_3d layouts, integer and reduced-precision dtypes, thread counts, gradcheck, and the
backward's refusal of indices that no window could have given."""
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import torch_manualgrad  # noqa: F401  (registers torch.ops.manualgrad)

ops = torch.ops.manualgrad
CL3D = torch.channels_last_3d
INTEGERS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


@dataclass
class Pool3d:
    size: tuple  # (D, H, W)
    kernel: tuple
    stride: tuple
    padding: tuple = (0, 0, 0)
    dilation: tuple = (1, 1, 1)
    ceil_mode: bool = False
    batch: int = 2
    channels: int = 3

    def args(self):
        return [list(self.kernel), list(self.stride), list(self.padding), list(self.dilation)]

    def input_shape(self):
        return (self.batch, self.channels, *self.size)

    def __str__(self):
        return (f"in{self.size}-k{self.kernel}-s{self.stride}-p{self.padding}-d{self.dilation}"
                f"{'-ceil' if self.ceil_mode else ''}-n{self.batch}").replace(" ", "")


def ours(x, cfg, compute_indices=True):
    return ops.max_pool_forward(x, *cfg.args(), cfg.ceil_mode, compute_indices)


def theirs(x, cfg):
    return F.max_pool3d(x, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation, ceil_mode=cfg.ceil_mode, return_indices=True)


def backward(grad_output, indices, x, cfg, check_indices=True):
    return ops.max_pool_backward(grad_output, indices, list(x.shape), *cfg.args(), check_indices)


def same_layout(a, b):
    return a.is_contiguous() == b.is_contiguous() and a.is_contiguous(memory_format=CL3D) == b.is_contiguous(memory_format=CL3D)


def bits(t):
    """The tensor's bits, as integers of its width: -0.0 differs from 0.0, and in float32/float64 NaN equals only
    NaN of the same bits. float16/bfloat16 are pooled in float32 and converted back, and ATen's conversions give
    NaN bits of their own (0x7fff, 0xffff; torch's 2-d max-pool ours alike): there any NaN equals any NaN."""
    if not t.dtype.is_floating_point:
        return t.contiguous()
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    b = t.contiguous().view(width)
    if t.element_size() == 2:
        b = b.masked_fill(t.contiguous().isnan(), -1)
    return b


def make_input(cfg, dtype=torch.float32, values="normal", layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = cfg.input_shape()
    n = 1
    for s in shape:
        n *= s
    if dtype in INTEGERS:
        info = torch.iinfo(dtype)
        start = info.min if values == "lowest" else max(info.min, -3)
        x = torch.randint(start, start + 4, shape, generator=gen, dtype=torch.int64).to(dtype)
    else:
        if values == "distinct":  # no ties: gradcheck's small steps cannot move an argmax
            x = torch.randperm(n, generator=gen).to(torch.float64).reshape(shape) * 0.25
        elif values == "ties":
            x = torch.randint(0, 3, shape, generator=gen).to(torch.float64)
        else:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
        if values == "nan" and n > 0:
            x.view(-1)[torch.randperm(n, generator=gen)[: max(1, n // 7)]] = float("nan")
        x = x.to(dtype)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=CL3D)
    elif layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.stack([x, torch.zeros_like(x)], dim=-1)
        x = wide[..., 0]
    return x


def torch_pool(x, cfg):
    """torch's max_pool3d of x. For integers, that of a contiguous copy, put in the layout torch gives a float32
    copy of x: torch 2.13's channels-last integer kernel refuses 8-bit volumes of more positions than the dtype
    counts, and for a window of nothing but the lowest value whose first depth tap lies in the padding it names a
    position outside the window (its contiguous kernel, and ours, the window's first tap inside)."""
    if x.dtype.is_floating_point:
        return theirs(x, cfg)
    ref, ref_idx = theirs(x.contiguous(), cfg)
    layout_of = theirs(x.to(torch.float32), cfg)[0]
    return torch.empty_like(layout_of, dtype=x.dtype).copy_(ref), torch.empty_like(layout_of, dtype=torch.int64).copy_(ref_idx)


def check_forward(x, cfg):
    out, idx = ours(x, cfg)
    ref, ref_idx = torch_pool(x, cfg)
    assert out.shape == ref.shape and out.dtype == x.dtype and idx.dtype == torch.int64
    assert torch.equal(bits(out), bits(ref))
    # -1: a window with no tap in the input (possible with dilation), whose index torch leaves arbitrary
    inside = idx >= 0
    assert torch.equal(idx[inside], ref_idx[inside])
    lowest = -float("inf") if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
    assert (out[~inside] == lowest).all()
    # channels_last_3d inputs give channels_last_3d results, as torch's
    assert same_layout(out, ref) and same_layout(idx, ref_idx)
    values_only, no_idx = ours(x, cfg, compute_indices=False)
    assert torch.equal(bits(values_only), bits(ref)) and no_idx.numel() == 0
    assert same_layout(values_only, ref)
    return out, idx


def check_backward(x, cfg, seed=1):
    """Our backward of our indices against torch's autograd, when no window is empty (torch's index for one is
    arbitrary, so its gradient lands somewhere ours does not send it)."""
    out, idx = ours(x.detach(), cfg)
    if (idx < 0).any():
        return
    gen = torch.Generator().manual_seed(seed)
    # in the output's layout, as autograd would pass it
    grad_output = torch.empty_like(out).copy_(torch.randn(out.shape, generator=gen, dtype=torch.float64))
    grad_input = backward(grad_output, idx, x, cfg)
    assert grad_input.shape == x.shape and grad_input.dtype == x.dtype
    if x.dtype in (torch.float16, torch.bfloat16):
        # ours adds overlapping windows in float32 and rounds once: torch's float64 sums, rounded (the argmax is
        # the same, every half value being exact in float64)
        leaf = x.detach().double().requires_grad_()
        (expected,) = torch.autograd.grad(theirs(leaf, cfg)[0], leaf, grad_output.double())
        torch.testing.assert_close(grad_input, expected.to(x.dtype))
    else:  # the same sums in the same (output) order: the same bits
        leaf = x.detach().clone().requires_grad_()
        (expected,) = torch.autograd.grad(theirs(leaf, cfg)[0], leaf, grad_output)
        assert torch.equal(bits(grad_input), bits(expected))
    assert same_layout(grad_input, expected)
    # the registered autograd of the forward op gives the same gradient
    leaf = x.detach().clone().requires_grad_()
    (through_op,) = torch.autograd.grad(ours(leaf, cfg)[0], leaf, grad_output)
    assert torch.equal(bits(through_op), bits(grad_input))


# Windows of every kind: overlapping and not, the phase sweep (stride near the kernel) and the direct loop
# (stride far above the kernel; a dilation that is a multiple of the stride), padding along each dimension,
# ceil_mode windows hanging over the end, odd sizes, a kernel of one along some dimension, a single depth.
CONFIGS = [
    Pool3d((4, 4, 4), (2, 2, 2), (2, 2, 2)),
    Pool3d((7, 9, 11), (3, 3, 3), (2, 2, 2), (1, 1, 1)),
    Pool3d((5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1)),
    Pool3d((5, 8, 9), (2, 3, 2), (1, 2, 3), (1, 0, 1), (2, 1, 1), ceil_mode=True),
    Pool3d((6, 7, 8), (3, 2, 2), (2, 1, 1), (1, 1, 0), (1, 2, 3), ceil_mode=True),
    Pool3d((9, 10, 40), (2, 2, 2), (5, 5, 17), (1, 1, 1)),
    Pool3d((6, 12, 12), (2, 3, 3), (2, 2, 2), (0, 1, 1), (3, 1, 4), ceil_mode=True),
    Pool3d((1, 5, 6), (1, 3, 3), (1, 2, 2), (0, 1, 1)),
    Pool3d((8, 1, 5), (3, 1, 2), (2, 1, 1), (1, 0, 1), ceil_mode=True),
    Pool3d((5, 5, 5), (5, 5, 5), (1, 1, 1)),
    Pool3d((3, 4, 5), (1, 1, 1), (2, 3, 1)),
    Pool3d((4, 3, 700), (2, 2, 3), (2, 1, 2), (1, 1, 1), batch=1, channels=2),
    Pool3d((3, 2, 9000), (2, 2, 5), (1, 1, 3), (1, 1, 2), batch=1, channels=1),  # wider than one chunk of the sweep
    # a ring of row copies too small for the window's 3 × 3 rows (2 depths × 4 heights fit): rows evict one another
    Pool3d((4, 6, 20000), (3, 3, 2), (1, 1, 1), (1, 1, 0), batch=1, channels=1),
    Pool3d((6, 6, 6), (2, 2, 2), (2, 2, 2), batch=0),
]
LAYOUTS = ["contiguous", "channels_last_3d", "strided"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("values", ["normal", "ties", "nan"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_float32_matches_torch(cfg, values, layout):
    x = make_input(cfg, torch.float32, values, layout)
    check_forward(x, cfg)
    check_backward(x, cfg)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS[1:9] + CONFIGS[-1:], ids=str)
def test_other_float_dtypes_match_torch(cfg, dtype, layout):
    for values in ("ties", "nan"):
        x = make_input(cfg, dtype, values, layout)
        check_forward(x, cfg)
        check_backward(x, cfg)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("values", ["small", "lowest"])
@pytest.mark.parametrize("dtype", INTEGERS)
@pytest.mark.parametrize("cfg", CONFIGS[1:7] + CONFIGS[-2:-1], ids=str)
def test_integers_match_torch(cfg, dtype, values, layout):
    """Windows of nothing but the type's lowest value keep their first tap inside; padding never wins."""
    check_forward(make_input(cfg, dtype, values, layout), cfg)


def test_empty_window_gives_minus_one():
    """A dilated window whose taps all miss the input: -inf and index -1, and its gradient goes nowhere."""
    cfg = Pool3d((2, 4, 4), (2, 1, 1), (1, 1, 1), (1, 0, 0), (3, 1, 1), batch=1, channels=2)
    for layout in ("contiguous", "channels_last_3d"):
        x = make_input(cfg, torch.float32, "normal", layout)
        out, idx = ours(x, cfg)
        assert out.is_contiguous(memory_format=CL3D if layout == "channels_last_3d" else torch.contiguous_format)
        ref, _ = theirs(x, cfg)
        assert torch.equal(bits(out), bits(ref))
        assert out.shape[2] == 1
        # the one window along the depth has its taps at -1 and 2, an input of depth 2 between them
        assert (idx == -1).all() and (out == -float("inf")).all()
        grad = backward(torch.ones_like(out), idx, x, cfg)
        assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.threads
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("cfg", [
    Pool3d((9, 20, 21), (3, 3, 3), (1, 1, 1), (1, 1, 1), batch=2, channels=6),  # overlapping: backward adds
    Pool3d((8, 17, 19), (3, 2, 3), (2, 2, 1), (1, 1, 0), (1, 2, 1), ceil_mode=True, batch=3, channels=4),
    Pool3d((7, 12, 13), (2, 2, 2), (4, 3, 5), (1, 1, 1), (3, 1, 1), batch=2, channels=5),  # the direct loop
], ids=str)
def test_thread_counts_give_the_same_bits(cfg, layout, restore_num_threads):
    def run(threads):
        torch.set_num_threads(threads)
        x = make_input(cfg, torch.float32, "ties", layout, seed=5)
        out, idx = ours(x, cfg)
        values_only, _ = ours(x, cfg, compute_indices=False)
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
        return [out, idx, values_only, backward(grad_output, idx, x, cfg)]

    two = run(2)
    for a, b in zip(two, run(1)):
        assert torch.equal(bits(a), bits(b))
    for a, b in zip(two, run(2)):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("cfg", [
    Pool3d((4, 5, 5), (2, 3, 2), (1, 2, 2), (1, 1, 1), batch=2, channels=2),
    Pool3d((5, 4, 6), (3, 2, 2), (2, 1, 2), (1, 0, 1), (1, 2, 1), ceil_mode=True, batch=1, channels=2),
], ids=str)
def test_gradcheck_float64(cfg, layout):
    x = make_input(cfg, torch.float64, "distinct", layout).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ours(t, cfg)[0], (x,))

    class ByHand(torch.autograd.Function):  # the two ops wired together directly, no registered autograd
        @staticmethod
        def forward(ctx, t):
            out, idx = ours(t, cfg)
            ctx.save_for_backward(idx)
            ctx.input_shape = t.shape
            return out

        @staticmethod
        def backward(ctx, grad_output):
            (idx,) = ctx.saved_tensors
            return ops.max_pool_backward(grad_output, idx, list(ctx.input_shape), *cfg.args(), True)

    assert torch.autograd.gradcheck(ByHand.apply, (x,))


def test_backward_refuses_a_foreign_index():
    cfg = Pool3d((6, 6, 6), (2, 2, 2), (2, 2, 2), batch=2, channels=3)
    x = make_input(cfg, torch.float32, "normal")
    out, idx = ours(x, cfg)
    bad = idx.clone()
    bad[1, 2, 1, 0, 2] = 0  # inside the volume, but not in window (1, 0, 2)
    with pytest.raises(RuntimeError, match=re.escape("max_pool3d backward: indices[1, 2, 1, 0, 2] = 0 is not a position")):
        backward(torch.ones_like(out), bad, x, cfg)
    for layout_bad in (bad.contiguous(memory_format=CL3D),):  # the same element named, whatever the layout
        with pytest.raises(RuntimeError, match=re.escape("indices[1, 2, 1, 0, 2] = 0")):
            backward(torch.ones_like(out).contiguous(memory_format=CL3D), layout_bad, x, cfg)
    # unchecked, an index inside the volume is followed; one outside it is refused all the same
    grad = backward(torch.ones_like(out), bad, x, cfg, check_indices=False)
    assert grad[1, 2].view(-1)[0] == 1 + (idx[1, 2] == 0).sum()
    outside = idx.clone()
    outside[0, 1, 0, 0, 0] = 6 * 6 * 6
    with pytest.raises(RuntimeError, match="out of range"):
        backward(torch.ones_like(out), outside, x, cfg, check_indices=False)
    with pytest.raises(RuntimeError, match=re.escape(f"indices[0, 1, 0, 0, 0] = {6 * 6 * 6}")):
        backward(torch.ones_like(out), outside, x, cfg)


def test_indices_feed_max_unpool3d():
    cfg = Pool3d((6, 8, 10), (2, 2, 2), (2, 2, 2))
    x = make_input(cfg, torch.float32, "distinct")
    out, idx = ours(x, cfg)
    ref, ref_idx = theirs(x, cfg)
    assert torch.equal(F.max_unpool3d(out, idx, 2, 2, output_size=cfg.size), F.max_unpool3d(ref, ref_idx, 2, 2, output_size=cfg.size))


# ---- random configurations ----

@st.composite
def pool3d_configs(draw):
    def triple(lo, hi):
        one = st.integers(lo, hi)
        return draw(st.one_of(one.map(lambda v: (v, v, v)), st.tuples(one, one, one)))

    kernel = triple(1, 4)
    stride = triple(1, 4)
    dilation = triple(1, 3)
    padding = tuple(draw(st.integers(0, k // 2)) for k in kernel)
    size = tuple(max(1, d * (k - 1) + 1 - 2 * p) + draw(st.integers(0, 5)) for k, p, d in zip(kernel, padding, dilation))
    return Pool3d(size, kernel, stride, padding, dilation, draw(st.booleans()), draw(st.integers(0, 3)),
                  draw(st.integers(1, 4)))


@given(cfg=pool3d_configs(), values=st.sampled_from(["normal", "ties", "nan"]), layout=st.sampled_from(LAYOUTS),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_random_configurations_match_torch(cfg, values, layout, dtype, seed):
    x = make_input(cfg, dtype, values, layout, seed)
    check_forward(x, cfg)
    check_backward(x, cfg, seed + 1)


@given(cfg=pool3d_configs(), dtype=st.sampled_from(INTEGERS), low=st.booleans(), channels_last=st.booleans())
def test_random_integer_configurations_match_torch(cfg, dtype, low, channels_last):
    x = make_input(cfg, dtype, "lowest" if low else "small", "channels_last_3d" if channels_last else "contiguous")
    check_forward(x, cfg)
