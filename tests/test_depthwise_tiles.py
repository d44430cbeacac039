"""Depthwise convolutions on tiles (csrc/cpu/depthwise_cpu.cpp). NCHW: the forward, and the stride-1 input gradient
as a forward of grad_output, on zero-padded channels-last tiles of a band of rows and one vector of channels; the
weight gradient on whole-image tiles. Channels-last 5x5 and 7x7 kernels of stride 1 over rows under 32 wide: the
forward and the stride-1 input gradient on zero-padded tiles of a few vectors of channels. Held to torch's float64
values and our reference implementation, to the channels-last kernels' bits (the same sums in the same order), to
the same bits at every thread count and at both vector widths' lanes, and to torch's NaN and infinity where the
weights are not finite (the tiles' zero padding would turn inf x 0 into NaN, so those layers keep the kernels that
skip the padding)."""
import pytest
import torch
import torch.nn.functional as F

from torch_manualgrad import reference

ops = torch.ops.manualgrad
CL = torch.channels_last

# (channels, height, width, kernel, stride, padding, dilation): channel counts around the vector widths (8 and 16
# floats, 4 and 8 doubles), short rows (7, 14), rows of several bands (60 rows of a 32-wide tile), 7-wide and
# non-square kernels, strides 2 and 3, dilation, asymmetric padding larger and smaller than the kernel's reach.
CASES = [
    (5, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1)),
    (16, 14, 14, (5, 5), (1, 1), (2, 2), (1, 1)),
    (21, 14, 13, (3, 3), (2, 2), (1, 1), (1, 1)),
    (37, 7, 7, (5, 5), (1, 1), (2, 2), (1, 1)),
    (9, 60, 30, (3, 3), (1, 1), (1, 1), (1, 1)),
    (12, 11, 19, (7, 7), (1, 1), (3, 3), (1, 1)),
    (8, 15, 12, (1, 9), (3, 1), (0, 4), (1, 1)),
    (17, 16, 16, (3, 5), (2, 3), (2, 0), (2, 1)),
    (3, 9, 9, (2, 4), (1, 1), (3, 1), (1, 2)),
    # whole vectors of channels, 5x5 and 7x7 of stride 1 over short rows: channels-last tensors take tiles too
    (32, 7, 7, (5, 5), (1, 1), (2, 2), (1, 1)),
    (48, 14, 14, (7, 7), (1, 1), (3, 3), (1, 1)),
    (32, 9, 12, (5, 5), (1, 1), (1, 3), (2, 1)),
]


def _inputs(case, dtype, gen):
    c, h, w, k, s, p, d = case
    x = torch.randn(3, c, h, w, generator=gen, dtype=dtype)
    wt = torch.randn(c, 1, *k, generator=gen, dtype=dtype)
    b = torch.randn(c, generator=gen, dtype=dtype)
    args = (list(s), list(p), list(d), c)
    go = torch.randn(F.conv2d(x, wt, b, s, p, d, c).shape, generator=gen, dtype=dtype)
    return x, wt, b, go, args


@pytest.fixture(params=["32", "64"], ids=lambda b: f"{b}-byte vectors")
def vector_bytes(request, monkeypatch):
    monkeypatch.setenv("TORCH_MANUALGRAD_VECTOR_BYTES", request.param)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_values_match_torch_and_the_reference_in_float64(case, layout, vector_bytes):
    gen = torch.Generator().manual_seed(3)
    x, wt, b, go, args = _inputs(case, torch.float64, gen)
    x, go = x.contiguous(memory_format=layout), go.contiguous(memory_format=layout)
    out = ops.conv_forward(x, wt, b, *args)
    gi, gw, gb = ops.conv_backward(go, x, wt, *args, [True, True, True])
    assert out.is_contiguous(memory_format=layout) and gi.is_contiguous(memory_format=layout)
    x_t, w_t, b_t = (t.clone().requires_grad_() for t in (x, wt, b))
    out_t = F.conv2d(x_t, w_t, b_t, *args)
    torch.testing.assert_close(out, out_t, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip((gi, gw, gb), torch.autograd.grad(out_t, (x_t, w_t, b_t), go)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, reference.conv_forward(x, wt, b, *args), rtol=1e-12, atol=1e-12)
    ref_gi, ref_gw, _ = reference.conv_backward(go, x, wt, *args)
    torch.testing.assert_close(gi, ref_gi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bits_are_the_channels_last_kernels_at_every_thread_count(case, dtype, vector_bytes, restore_num_threads):
    """The tiles add each output's and each weight gradient entry's terms in the channels-last kernels' order (the
    padding's w x 0 = +-0 changes no sum that starts at +0), whatever the band, channel block or thread."""
    gen = torch.Generator().manual_seed(4)
    x, wt, b, go, args = _inputs(case, dtype, gen)
    out = ops.conv_forward(x, wt, b, *args)
    gi, gw, _ = ops.conv_backward(go, x, wt, *args, [True, True, False])
    cl_out = ops.conv_forward(x.contiguous(memory_format=CL), wt, b, *args)
    cl_gi, cl_gw, _ = ops.conv_backward(go.contiguous(memory_format=CL), x.contiguous(memory_format=CL), wt, *args,
                                        [True, True, False])
    assert torch.equal(out, cl_out)
    assert torch.equal(gi, cl_gi)
    assert torch.equal(gw, cl_gw)
    for threads in (1, 3):
        torch.set_num_threads(threads)
        assert torch.equal(ops.conv_forward(x, wt, b, *args), out)
        again = ops.conv_backward(go, x, wt, *args, [True, True, False])
        assert torch.equal(again[0], gi) and torch.equal(again[1], gw)


def test_float32_error_no_worse_than_torchs(vector_bytes):
    """EfficientNet's 5x5 at 14x14 and MobileNet's 3x3 at 7x7, batch 4: the float32 forward and input gradient within
    torch's own error against float64 (ours sums each output's taps, then the bias, as torch does)."""
    gen = torch.Generator().manual_seed(5)
    for c, size, k in ((96, 14, 5), (160, 7, 3)):
        x = torch.randn(4, c, size, size, generator=gen)
        wt = torch.randn(c, 1, k, k, generator=gen)
        b = torch.randn(c, generator=gen)
        args = ([1, 1], [k // 2] * 2, [1, 1], c)
        exact = F.conv2d(x.double(), wt.double(), b.double(), 1, k // 2, 1, c)
        go = torch.randn(exact.shape, generator=gen)
        exact_gi = torch.nn.grad.conv2d_input(x.shape, wt.double(), go.double(), 1, k // 2, 1, c)

        def err(t, ref):
            return ((t.double() - ref).norm() / ref.norm()).item()

        eps = torch.finfo(torch.float32).eps
        assert err(ops.conv_forward(x, wt, b, *args), exact) <= 1.05 * err(F.conv2d(x, wt, b, 1, k // 2, 1, c), exact) + eps
        gi = ops.conv_backward(go, x, wt, *args, [True, False, False])[0]
        torch_gi = torch.nn.grad.conv2d_input(x.shape, wt, go, 1, k // 2, 1, c)
        assert err(gi, exact_gi) <= 1.05 * err(torch_gi, exact_gi) + eps


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=str)
def test_non_finite_weights_give_torchs_values(value, vector_bytes):
    """An infinite weight at a corner tap: torch's float32 kernels skip the taps in the padding, so the outputs whose
    corner tap falls there stay finite (its float64 depthwise kernel pads with zeros and gives NaN there). The tiles
    would add inf x 0 = NaN, so such weights take the kernels that skip the padding."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 12, 7, 7, generator=gen)
    wt = torch.randn(12, 1, 3, 3, generator=gen)
    wt[5, 0, 0, 0] = value
    go = torch.randn(2, 12, 7, 7, generator=gen)
    args = ([1, 1], [1, 1], [1, 1], 12)
    out = ops.conv_forward(x, wt, None, *args)
    torch.testing.assert_close(out, F.conv2d(x, wt, None, 1, 1, 1, 12), equal_nan=True)
    assert torch.isfinite(out[:, 5, 0, :]).all() and torch.isfinite(out[:, 5, :, 0]).all()
    gi = ops.conv_backward(go, x, wt, *args, [True, False, False])[0]
    torch_gi = torch.nn.grad.conv2d_input(x.shape, wt, go, 1, 1, 1, 12)
    torch.testing.assert_close(gi, torch_gi, equal_nan=True)


def test_non_finite_gradients_stay_out_of_the_padding(vector_bytes):
    """An infinite grad_output at a border output: the weight gradient's taps that saw the padding there get no
    term from it (the weight-gradient tiles are not padded), as in torch's float32 kernels."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 10, 14, 14, generator=gen)
    wt = torch.randn(10, 1, 3, 3, generator=gen)
    go = torch.randn(2, 10, 14, 14, generator=gen)
    go[1, 3, 0, 0] = float("inf")
    gw = ops.conv_backward(go, x, wt, [1, 1], [1, 1], [1, 1], 10, [False, True, False])[1]
    torch_gw = torch.nn.grad.conv2d_weight(x, wt.shape, go, 1, 1, 1, 10)
    torch.testing.assert_close(gw, torch_gw, equal_nan=True)
    assert not torch.isnan(gw[3]).any() and torch.isinf(gw[3]).any() and torch.isfinite(gw[3, 0, 0]).all()


def test_gradcheck_through_the_functional_api():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 9, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(9, 1, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    from torch_manualgrad import functional
    assert torch.autograd.gradcheck(lambda *t: functional.conv2d(*t, padding=2, groups=9), (x, wt, b))


# The tiles' rows (forward_band's row_block): every output width below kShortTileRows (blocks of 1 to 8 outputs),
# kernels 3, 5 and 7 wide (3x3 takes tiles in NCHW only), kernel rows partly or wholly in the padding (those rows are
# skipped), a kernel-row dilation, and images shorter than the kernel.
ROW_CASES = [(w, k, k // 2, 1, 5) for k in (3, 5, 7) for w in range(1, 32)]
ROW_CASES += [(9, 5, 6, 1, 3), (14, 7, 3, 2, 9), (12, 5, 1, 2, 9), (10, 7, 2, 2, 16), (7, 7, 5, 1, 2), (16, 5, 0, 1, 6),
              (11, 7, 9, 1, 4)]
# wider rows: channels-last 3x3 and 5x5 interiors, and 7x7 on zero-padded bands or (less padding in the row: a
# sixth entry) their interiors, by forward_nhwc_adjacent
ROW_CASES += [(40, 5, 2, 1, 6), (57, 3, 1, 1, 4), (45, 5, 2, 2, 9), (33, 3, 0, 1, 3), (40, 7, 3, 1, 8), (35, 7, 0, 1, 9),
              (40, 7, 3, 1, 8, 0), (30, 7, 2, 1, 9, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tile_rows_are_the_other_kernels_bits(dtype, vector_bytes):
    """The first 31 channels' forward and stride-1 input gradient are the same bits with 32 channels as with 31. With
    32 (whole vectors) the tiles' rows compute them, or forward_nhwc_adjacent's; with 31, the last channels are the
    scalar channel tail's, tap by tap, and the edges skip the padding. Both layouts (the NCHW tiles share the rows)."""
    gen = torch.Generator().manual_seed(9)
    for width, k, pad_h, dil_h, height, *pad_w in ROW_CASES:
        x = torch.randn(2, 32, height, width, generator=gen, dtype=dtype)
        wt = torch.randn(32, 1, k, k, generator=gen, dtype=dtype)
        b = torch.randn(32, generator=gen, dtype=dtype)
        args = ([1, 1], [pad_h, pad_w[0] if pad_w else k // 2], [dil_h, 1])
        go = torch.randn(F.conv2d(x, wt, b, *args, 32).shape, generator=gen, dtype=dtype)
        few = [t[:, :31].contiguous(memory_format=CL) for t in (x, go)] + [wt[:31].contiguous(memory_format=CL)]
        out_few = ops.conv_forward(few[0], few[2], b[:31], *args, 31)
        gi_few = ops.conv_backward(few[1], few[0], few[2], *args, 31, [True, False, False])[0]
        torch.testing.assert_close(out_few, F.conv2d(x[:, :31], wt[:31], b[:31], *args, 31))
        for layout in (CL, torch.contiguous_format):
            xs, gos, ws = (t.contiguous(memory_format=layout) for t in (x, go, wt))
            out = ops.conv_forward(xs, ws, b, *args, 32)
            gi = ops.conv_backward(gos, xs, ws, *args, 32, [True, False, False])[0]
            case = (width, k, pad_h, dil_h, height, layout)
            assert torch.equal(out[:, :31], out_few), case
            assert torch.equal(gi[:, :31], gi_few), case
