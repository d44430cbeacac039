"""The CPU's Winograd F(2x2, 3x3) path for float32 3x3 stride-1 convolutions (csrc/cpu/winograd_cpu.cpp): values and
both gradients against a float64 truth and against the im2col kernels, its accuracy against torch's, where it is
taken, and bit-identical results at every thread count."""
import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg

pytestmark = pytest.mark.threads

# (batch, C_in, C_out, H, W, padding): odd and even sizes, non-square, every padding the input gradient takes,
# blocks of tiles that span images, and images wide enough for the one-task-per-block split.
CASES = [
    (1, 16, 16, 14, 14, 1),
    (2, 17, 33, 15, 20, 1),
    (3, 32, 16, 16, 16, 0),
    (2, 24, 40, 14, 17, 2),
    (1, 16, 24, 16, 16, (0, 2)),
    (4, 64, 64, 28, 28, 1),
    (2, 48, 20, 57, 31, 1),
    (8, 32, 32, 30, 30, 1),
    (1, 130, 200, 16, 18, 1),
    (2, 16, 16, 7, 7, 1),  # small images: computed channels-last, NCHW through copies
    (2, 200, 232, 14, 14, 1),  # many channels: likewise
    (3, 24, 40, 28, 29, 1),  # NCHW computed as it lies
]
LAYOUTS = ["nchw", "channels_last"]


def ids(case):
    return "N{}-{}to{}-{}x{}-p{}".format(*case)


def make(case, seed=0, layout="nchw"):
    n, c, k, h, w, p = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (9 * c) ** 0.5
    bias = torch.randn(k, generator=gen)
    return x, weight, bias, p


def forward_and_grads(x, weight, bias, padding, grad_seed=1):
    """(output, grad_input, grad_output, grad_weight) of our conv2d."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = tmg.functional.conv2d(x, weight, bias, padding=padding)
    gen = torch.Generator().manual_seed(grad_seed)
    go = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    if out.is_contiguous(memory_format=torch.channels_last):
        go = go.contiguous(memory_format=torch.channels_last)
    gi, gw = torch.autograd.grad(out, (x, weight), go)
    return out.detach(), gi, go, gw


def relative_error(value, truth):
    return ((value.double() - truth).norm() / truth.norm()).item()


@pytest.fixture
def winograd_off(monkeypatch):
    """Runs a function with the Winograd path switched off (TORCH_MANUALGRAD_WINOGRAD=0): the im2col kernels."""

    def run(fn, *args):
        monkeypatch.setenv("TORCH_MANUALGRAD_WINOGRAD", "0")
        try:
            return fn(*args)
        finally:
            monkeypatch.delenv("TORCH_MANUALGRAD_WINOGRAD")

    return run


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_values_and_input_gradient_against_float64(case, layout):
    x, weight, bias, p = make(case, layout=layout)
    out, gi, go, gw = forward_and_grads(x, weight, bias, p)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and gi.is_contiguous(memory_format=fmt)  # laid out as torch's
    assert gw.is_contiguous(memory_format=fmt)  # as our im2col kernels lay it out in each layout
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    out64 = F.conv2d(x64, w64, bias.double(), padding=p)
    gi64, gw64 = torch.autograd.grad(out64, (x64, w64), go.double())
    assert out.shape == out64.shape and gi.shape == x.shape and gw.shape == weight.shape
    for value, truth in ((out, out64), (gi, gi64), (gw, gw64)):
        # a weight gradient's entries are sums over every position: tolerances scale with them
        torch.testing.assert_close(value.double(), truth, rtol=1e-5, atol=1e-5 * max(1.0, truth.abs().max().item()))
        assert relative_error(value, truth) < 1e-6


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES[:5] + CASES[-3:], ids=ids)
def test_agrees_with_the_im2col_kernels_and_differs_in_bits(case, layout, winograd_off):
    x, weight, bias, p = make(case, seed=3, layout=layout)
    wino = forward_and_grads(x, weight, bias, p)
    im2col = winograd_off(forward_and_grads, x, weight, bias, p)
    input_gradient_too = min(wino[0].shape[-2:]) >= 14  # below, with these cases' channels, it is im2col's
    for i, (a, b) in enumerate(zip(wino[:2] + wino[3:], im2col[:2] + im2col[3:])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
        # Winograd's sums round in another order; below 14x14 (few channels) the input gradient is im2col's own
        assert torch.equal(a, b) if i == 1 and not input_gradient_too else not torch.equal(a, b)


@pytest.mark.parametrize(
    "n, c, k, h, w, kwargs",
    [
        (2, 16, 16, 6, 6, dict(padding=1)),  # images too small
        (1, 256, 256, 9, 9, dict(padding=1)),  # small images with many channels
        (2, 8, 16, 16, 16, dict(padding=1)),  # too few input channels
        (2, 16, 16, 16, 16, dict(padding=1, stride=2)),
        (2, 16, 16, 16, 16, dict(padding=2, dilation=2)),
        (2, 32, 32, 16, 16, dict(padding=1, groups=4)),  # 8 channels a group (16 and more: test_grouped.py)
    ],
)
def test_not_taken_outside_its_shapes(n, c, k, h, w, kwargs, winograd_off):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(k, c // kwargs.get("groups", 1), 3, 3, generator=gen)
    def run():
        xg, wg = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = tmg.functional.conv2d(xg, wg, None, **kwargs)
        return (out, *torch.autograd.grad(out, (xg, wg), torch.ones_like(out)))

    assert all(torch.equal(a, b) for a, b in zip(run(), winograd_off(run)))


def test_padding_over_two_takes_im2col_for_the_input_gradient(winograd_off):
    x, weight, bias, _ = make((2, 16, 16, 14, 14, 3))
    out, gi, _, gw = forward_and_grads(x, weight, bias, 3)
    out0, gi0, _, gw0 = winograd_off(forward_and_grads, x, weight, bias, 3)
    assert not torch.equal(out, out0) and not torch.equal(gw, gw0)  # the forward and weight gradient take any padding
    assert torch.equal(gi, gi0)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_channels_on_small_images_take_it_with_a_batch_of_tiles(layout, winograd_off):
    """More than 384 channels in and out at 7x7 (272 -> 240 here, as ResNet's 512 -> 512): with a batch of 8 (128
    tiles) the forward and both gradients are Winograd's; with a batch of 2, all three are im2col's. With fewer
    channels (64 -> 64) the forward and weight gradient are Winograd's at any batch, the input gradient im2col's."""
    x, weight, bias, p = make((8, 272, 240, 7, 7, 1), seed=4, layout=layout)
    out, gi, _, gw = forward_and_grads(x, weight, bias, p)
    out0, gi0, _, gw0 = winograd_off(forward_and_grads, x, weight, bias, p)
    assert not torch.equal(out, out0) and not torch.equal(gi, gi0) and not torch.equal(gw, gw0)
    torch.testing.assert_close(out, out0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gi, gi0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw0, rtol=1e-5, atol=1e-4)
    out, gi, _, gw = forward_and_grads(x[:2], weight, bias, p)
    out0, gi0, _, gw0 = winograd_off(forward_and_grads, x[:2], weight, bias, p)
    assert torch.equal(out, out0) and torch.equal(gi, gi0) and torch.equal(gw, gw0)
    x, weight, bias, p = make((8, 64, 64, 7, 7, 1), seed=4, layout=layout)
    out, gi, _, gw = forward_and_grads(x, weight, bias, p)
    out0, gi0, _, gw0 = winograd_off(forward_and_grads, x, weight, bias, p)
    assert not torch.equal(out, out0) and torch.equal(gi, gi0) and not torch.equal(gw, gw0)


def errors_against_float64(made, winograd_off):
    """Relative errors against float64 of our forward and input gradient, torch's, and the im2col kernels' input
    gradient, for make()'s (x, weight, bias, padding)."""
    x, weight, bias, p = made
    out, gi, go, _ = forward_and_grads(x, weight, bias, p)
    x64 = x.double().requires_grad_()
    out64 = F.conv2d(x64, weight.double(), bias.double(), padding=p)
    (gi64,) = torch.autograd.grad(out64, x64, go.double())
    xt = x.detach().requires_grad_()
    out_t = F.conv2d(xt, weight, bias, padding=p)
    (gi_t,) = torch.autograd.grad(out_t, xt, go)
    _, gi_im2col, _, _ = winograd_off(forward_and_grads, x, weight, bias, p)
    return {"forward": relative_error(out, out64), "torch forward": relative_error(out_t, out64),
            "input gradient": relative_error(gi, gi64), "torch input gradient": relative_error(gi_t, gi64),
            "im2col input gradient": relative_error(gi_im2col, gi64)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [(8, 64, 64, 56, 56, 1), (8, 128, 128, 28, 28, 1), (8, 128, 32, 14, 14, 1),
                                  (8, 256, 256, 14, 14, 1)], ids=ids)
def test_forward_error_no_worse_than_torchs(case, layout, winograd_off):
    """The products are summed in chunks of 32 channels so that the float32 error matches torch's direct
    convolution (one long GEMM over 9 * C_in was 1.3-1.5x torch's). The input gradient's too, but for its
    transforms' own rounding: torch's error there depends on the CPU (64 -> 64 at 56x56, NCHW: on a Zen 3 with
    AVX2 torch's is 1.61e-7, ours 2.02e-7 by Winograd and 1.55e-7 by im2col; with AVX-512 torch's was larger), so
    ours is held to torch's or to 1.35x the im2col product's error, whichever is larger."""
    e = errors_against_float64(make(case, seed=7, layout=layout), winograd_off)
    assert e["forward"] <= 1.1 * e["torch forward"]
    assert e["input gradient"] <= 1.1 * max(e["torch input gradient"], 1.35 * e["im2col input gradient"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_channels_error_no_worse_than_torchs(layout, winograd_off):
    """512 -> 512 at 7x7, batch 8, all three Winograd's: the forward's error within torch's, the input gradient's
    within torch's or 1.35x the im2col product's, as for the layers above (on a Zen 4 2.35e-7, im2col's 2.9e-7,
    torch's NCHW 2.3e-7)."""
    e = errors_against_float64(make((8, 512, 512, 7, 7, 1), seed=7, layout=layout), winograd_off)
    assert e["forward"] <= 1.1 * e["torch forward"]
    assert e["input gradient"] <= 1.1 * max(e["torch input gradient"], 1.35 * e["im2col input gradient"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [CASES[0], CASES[6], CASES[7], CASES[8], CASES[10], (8, 272, 240, 7, 7, 1)], ids=ids)
def test_bit_identical_at_every_thread_count(case, layout):
    x, weight, bias, p = make(case, seed=9, layout=layout)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, gi, _, gw = forward_and_grads(x, weight, bias, p)
            results.append((out, gi, gw))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_3d"])
@pytest.mark.parametrize("shape", [(2, 16, 16, 6, 28, 28), (1, 24, 16, 3, 14, 14)], ids=["blocks", "shared-blocks"])
def test_conv3d_bit_identical_at_every_thread_count(shape, layout):
    """The 3-d Winograd path in its one-task-per-block and shared-block modes (and the weight gradient's slots)."""
    n, c, k, d, h, w = shape
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(n, c, d, h, w, generator=gen)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(k, c, 3, 3, 3, generator=gen) / (c * 27) ** 0.5
    bias = torch.randn(k, generator=gen)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            xs, ws = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
            out = tmg.functional.conv3d(xs, ws, bias, padding=1)
            go = torch.randn(out.shape, generator=torch.Generator().manual_seed(24))
            results.append((out.detach(), *torch.autograd.grad(out, (xs, ws), go)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


WEIGHT_LAYOUTS = {
    "taps-transposed": lambda w: w.transpose(2, 3).contiguous().transpose(2, 3),
    "channels-last": lambda w: w.contiguous(memory_format=torch.channels_last),
    "sliced": lambda w: torch.zeros(2 * w.shape[0], w.shape[1] + 5, 4, 5)[::2, 3:-2, 1:, 1:4].copy_(w),
    "channels-outermost": lambda w: w.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
}


@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS)
def test_non_contiguous_operands(weight_layout):
    """The filters are read, and the input gradient's flipped, where they lie (any strides): the same bits as from
    contiguous operands, for all three results (each Winograd's here: a 20x18 output)."""
    x, weight, bias, p = make((2, 32, 24, 20, 18, 1), seed=11)
    xs = torch.randn(2, 64, 20, 18)[:, ::2]  # sliced channels
    xs.copy_(x)
    ws = WEIGHT_LAYOUTS[weight_layout](weight)
    assert torch.equal(ws, weight) and not ws.is_contiguous()
    out, gi, _, gw = forward_and_grads(xs, ws, bias, p)
    ref, gref, _, gwref = forward_and_grads(x.contiguous(), weight.contiguous(), bias, p)
    assert torch.equal(out, ref) and torch.equal(gi, gref) and torch.equal(gw, gwref)


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_3d"])
def test_conv3d_weight_read_where_it_lies(layout):
    """A 3-d weight's depth taps (the input gradient's flipped too) read through its strides: a weight sliced out of
    a larger one gives the bits of its contiguous copy."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 5, 9, 10, generator=gen)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    big = torch.randn(40, 20, 4, 3, 3, generator=gen)
    ws = big[::2, 2:18, 1:]  # (20, 16, 3, 3, 3)
    results = []
    for w in (ws, ws.contiguous()):
        xs, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        out = tmg.functional.conv3d(xs, w, padding=1)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
        results.append((out.detach(), *torch.autograd.grad(out, (xs, w), go)))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    truth = F.conv3d(x.double(), ws.double(), padding=1)
    assert relative_error(results[0][0], truth) < 1e-6


def test_reduced_precision_goes_through_float32():
    x, weight, bias, p = make((2, 32, 32, 16, 16, 1), seed=13)
    for dtype in (torch.bfloat16, torch.float16):
        out = tmg.functional.conv2d(x.to(dtype), weight.to(dtype), bias.to(dtype), padding=p)
        ref = F.conv2d(x.to(dtype).float(), weight.to(dtype).float(), bias.to(dtype).float(), padding=p)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [(8, 64, 64, 56, 56, 1), (8, 256, 256, 14, 14, 1), (8, 128, 32, 14, 14, 1)], ids=ids)
def test_weight_gradient_error(case, layout):
    """The weight gradient's float32 error: about 5e-7 normwise, against torch's 0.7-2e-6 in NCHW and 2-4e-7 in
    channels-last (benchmarks/NOTES.md)."""
    x, weight, bias, p = make(case, seed=17, layout=layout)
    _, _, go, gw = forward_and_grads(x, weight, bias, p)
    w64 = weight.double().requires_grad_()
    (gw64,) = torch.autograd.grad(F.conv2d(x.double(), w64, bias.double(), padding=p), w64, go.double())
    assert relative_error(gw, gw64) < 6e-7


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_3d"])
@pytest.mark.parametrize(
    "n, c, k, d, h, w, kernel, kwargs",
    [
        (2, 16, 24, 5, 14, 15, (3, 3, 3), dict(padding=1)),
        (2, 16, 16, 6, 15, 16, (3, 3, 3), dict(padding=(2, 0, 1), dilation=(2, 1, 1))),
        (1, 20, 16, 4, 16, 14, (2, 3, 3), dict(padding=(3, 1, 2))),  # depth padding beyond the kernel's reach
        (2, 16, 17, 3, 14, 14, (1, 3, 3), dict(padding=(0, 1, 1))),
        (1, 20, 16, 4, 16, 14, (2, 3, 3), dict(padding=(0, 1, 1), stride=(2, 1, 1))),  # depth stride 2
    ],
)
def test_conv3d(n, c, k, d, h, w, kernel, kwargs, layout, winograd_off):
    """A 3-d convolution whose kernel is 3x3 and stride 1 in the plane and in depth runs through Winograd with its depth
    taps as extra input channels, whatever its depth kernel, dilation and padding. With a depth stride, the
    channels-last one sums 2-d Winograd convolutions over its depth taps (depth_taps.h) and the NCDHW one takes the
    volume im2col."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(n, c, d, h, w, generator=gen)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(k, c, *kernel, generator=gen) / (c * 27) ** 0.5
    bias = torch.randn(k, generator=gen)

    def run(dtype=None):
        xs, ws = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        fn = tmg.functional.conv3d if dtype is None else F.conv3d
        if dtype is not None:
            xs, ws = xs.detach().to(dtype).requires_grad_(), ws.detach().to(dtype).requires_grad_()
        out = fn(xs, ws, bias if dtype is None else bias.to(dtype), **kwargs)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float32).to(out.dtype)
        return (out.detach(), *torch.autograd.grad(out, (xs, ws), go))

    ours, im2col, truth = run(), winograd_off(run), run(torch.float64)
    winograd = kwargs.get("stride", 1) == 1 or layout == "channels_last_3d"
    for a, b, t in zip(ours, im2col, truth):
        assert relative_error(a, t) < 1e-6
        assert a.is_contiguous(memory_format=torch.channels_last_3d) == b.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
        assert torch.equal(a, b) != winograd


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_3d"])
def test_conv3d_huge_depth_padding_and_dilation(layout):
    """Depth padding and dilation of 2**61: only the centre depth tap lands inside, and no depth index may overflow
    (the sanitizer run checks the arithmetic; the values are the 2-d convolution of each depth)."""
    gen = torch.Generator().manual_seed(25)
    x = torch.randn(2, 16, 4, 14, 14, generator=gen)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(16, 16, 3, 3, 3, generator=gen) / 12
    out = tmg.functional.conv3d(x, weight, None, 1, (2**61, 1, 1), (2**61, 1, 1))
    planes = x.permute(0, 2, 1, 3, 4).reshape(8, 16, 14, 14)
    expected = F.conv2d(planes, weight[:, :, 1], padding=1).reshape(2, 4, 16, 14, 14).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


NON_FINITE_CASES = [
    ((2, 32, 14, 14), "nchw"),
    ((2, 32, 14, 14), "channels_last"),
    ((3, 24, 28, 29), "nchw"),  # NCHW computed as it lies
    ((8, 200, 7, 7), "nchw"),  # many channels at 7x7: all three pieces
    ((2, 16, 4, 14, 14), "ncdhw"),
    ((2, 16, 4, 14, 14), "channels_last_3d"),
]


@pytest.mark.parametrize("where", ["input", "weight", "grad_output"])
@pytest.mark.parametrize("shape, layout", NON_FINITE_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_values_that_are_not_finite_take_the_direct_sums(shape, layout, where, winograd_off):
    """An infinity in a tile spreads through the transforms (inf - inf) to outputs that a direct sum keeps infinite or
    finite: where a Winograd result has a value that is not finite, that piece is computed by the kernels a
    TORCH_MANUALGRAD_WINOGRAD=0 run takes, bit for bit theirs, with the NaN and infinities of torch's float64 sums."""
    gen = torch.Generator().manual_seed(31)
    c = shape[1]
    x = torch.randn(*shape, generator=gen)
    weight = torch.randn(c, c, *(3,) * (len(shape) - 2), generator=gen) / (9 * c) ** 0.5
    go = torch.randn(*shape, generator=gen)  # padding 1: the output has the input's shape
    spot = (0, 3) + (2,) * (len(shape) - 2)
    if where == "input":
        x[spot] = float("inf")
        x[(1, 5) + (0,) * (len(shape) - 2)] = float("nan")
    elif where == "weight":
        weight[(2, 1) + (0,) * (len(shape) - 2)] = -float("inf")
    else:
        go[spot] = float("inf")
    fmt = {"channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}.get(layout)
    if fmt is not None:
        x, go = x.contiguous(memory_format=fmt), go.contiguous(memory_format=fmt)
    conv = {4: (tmg.functional.conv2d, F.conv2d), 5: (tmg.functional.conv3d, F.conv3d)}[len(shape)]

    def run(fn=conv[0], dtype=torch.float32):
        xs, ws = x.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        out = fn(xs, ws, None, padding=1)
        return (out.detach(), *torch.autograd.grad(out, (xs, ws), go.to(dtype)))

    ours, direct, truth = run(), winograd_off(run), run(conv[1], torch.float64)
    reads = {"input": (0, 2), "weight": (0, 1), "grad_output": (1, 2)}[where]  # the pieces that meet the value
    for i, (a, b, t) in enumerate(zip(ours, direct, truth)):
        if i in reads:
            assert not a.isfinite().all()
            if layout != "channels_last_3d":
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"piece {i}: {m}")
            else:  # a sum of 2-d convolutions over the depth taps, whose finite ones are Winograd's
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.nan_to_num(0, 0, 0).abs().max().item()),
                                           equal_nan=True)
        else:  # Winograd's own, finite
            assert a.isfinite().all()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
        # (not channels-last 3-d: its sums over the depth taps skip the depth padding, where torch multiplies an
        # infinite weight or output gradient by the padding's zeros, NaN; depth_taps.h, the same without Winograd)
        if layout != "channels_last_3d":
            assert torch.equal(a.isnan(), t.isnan()) and torch.equal(a.isinf(), t.isinf())
