"""Both copies of the hand-vectorised CPU kernels, whatever this CPU is: depthwise_cpu.cpp and grouped_cpu.cpp are
compiled with 64-byte vectors (for CPUs with AVX-512) and again with 32-byte ones (for AVX2: 64-byte register blocks
spilled to the stack there), and the channels-last small-K forward (a stem's) is a template over the two widths
(csrc/cpu/vectorize.h). TORCH_MANUALGRAD_VECTOR_BYTES picks one at each call, so the tests below, from the suites
that reach those kernels, run here once for each: values against torch (float64 and float32), the bits at 1, 2
and 3 threads, the two layouts' bits where they are promised equal, and the non-finite cases."""
import pytest
import torch

import torch_manualgrad as tmg
from common import ConvCase
from test_bounded_memory import test_depthwise_nchw_gradients_match_torch  # noqa: F401
from test_channels_last import (  # noqa: F401
    test_channels_last_bit_identical_across_thread_counts,
    test_channels_last_depthwise_7x7_is_the_nchw_bits_and_skips_padding_for_infinite_weights,
    test_channels_last_values_and_gradients,
    test_nchw_small_images_take_the_channels_last_kernels,
)
from test_determinism import test_conv_bit_identical_across_thread_counts  # noqa: F401
from test_grouped import (  # noqa: F401
    test_grouped_channels_last_forward_and_input_gradient_are_the_nchw_bits,
    test_grouped_channels_last_non_finite_values_give_torchs_nan_and_inf,
    test_grouped_float32_is_as_close_to_float64_as_torchs,
    test_grouped_matches_torch_in_float64,
    test_grouped_non_finite_values_give_torchs_nan_and_inf,
)


@pytest.fixture(autouse=True, params=["32", "64"], ids=lambda b: f"{b}-byte vectors")
def vector_bytes(request, monkeypatch):
    monkeypatch.setenv("TORCH_MANUALGRAD_VECTOR_BYTES", request.param)
    return int(request.param)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", [
    (3, 64, 7, 2, 3, 27),  # a ResNet stem: K = 147 terms (small-K kernel), 64 outputs: whole blocks of vectors
    (3, 20, 3, 2, 1, 27),  # a MobileNet stem, partial vectors of outputs
    (8, 12, 1, 1, 0, 21),  # pointwise, few terms (channels-last)
], ids=str)
def test_small_k_forward_matches_torch_and_the_other_width(case, layout, vector_bytes, monkeypatch,
                                                            restore_num_threads):
    """The small-K forward of both widths against torch's float64 result, torch's float32 error, and each other:
    the same terms in the same order, so they differ only by the fused multiply-adds the CPU has. (NCHW images this
    small take the channels-last kernels too.)"""
    c_in, c_out, k, stride, padding, size = case
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, c_in, size, size, generator=gen).contiguous(memory_format=layout)
    w = torch.randn(c_out, c_in, k, k, generator=gen)
    b = torch.randn(c_out, generator=gen)
    exact = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), stride, padding)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(tmg.functional.conv2d(x, w, b, stride, padding))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    err = ((outs[0].double() - exact).norm() / exact.norm()).item()
    err_torch = ((torch.nn.functional.conv2d(x, w, b, stride, padding).double() - exact).norm() / exact.norm()).item()
    assert err <= 2 * err_torch + 4 * torch.finfo(torch.float32).eps
    monkeypatch.setenv("TORCH_MANUALGRAD_VECTOR_BYTES", "64" if vector_bytes == 32 else "32")
    other = tmg.functional.conv2d(x, w, b, stride, padding)
    torch.testing.assert_close(outs[0], other, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k, stride, padding, size", [(3, 2, 1, 37), (3, 1, 1, 20), (7, 2, 3, 41), (5, 3, 0, 30)], ids=str)
def test_small_k_pixel_blocks_are_the_same_bits(k, stride, padding, size, dtype, restore_num_threads):
    """Up to two vectors of outputs (a 3x3 stem's 32) run 8 pixels at a time, more run 4: the same terms in the same
    order, so the first outputs of a wider layer are the narrow layer's bits (and the image's edges, one pixel at a
    time from an im2col row, too), at every thread count."""
    gen = torch.Generator().manual_seed(13)
    # a 64-byte vector's lanes: 3 vectors step 4 pixels, 2 or fewer 8 (with 32-byte vectors, up to 16 channels step 8)
    lanes = 16 if dtype == torch.float32 else 8
    x = torch.randn(3, 3, size, size + 3, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3 * lanes, 3, k, k, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
    b = torch.randn(3 * lanes, generator=gen, dtype=dtype)
    wide = tmg.functional.conv2d(x, w, b, stride, padding)
    exact = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), stride, padding)
    tol = 1e-4 if dtype == torch.float32 else 1e-11  # sums of 27-147 terms of size ~1
    torch.testing.assert_close(wide.double(), exact, rtol=tol, atol=tol)
    for threads in (1, 3):
        torch.set_num_threads(threads)
        for outs in (2 * lanes, lanes, lanes - 3):
            narrow = tmg.functional.conv2d(x, w[:outs].contiguous(memory_format=torch.channels_last), b[:outs], stride,
                                           padding)
            assert torch.equal(narrow, wide[:, :outs]), (outs, threads)


@pytest.mark.parametrize("case", [
    ConvCase(2, 2, 144, 160, (3, 3), (14, 14), stride=2, padding=1),  # 7x7 outputs, too many channels for via_nhwc
    ConvCase(2, 1, 136, 136, (3, 3), (9, 11), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False),
    ConvCase(3, 2, 4, 6, (3, 3, 3), (5, 6, 7), stride=2, padding=1),  # a small volume
    ConvCase(1, 3, 8, 4, (5,), (30,), stride=2, padding=2),  # 15 outputs
    ConvCase(2, 3, 32, 160, (3, 3), (26, 26), stride=2, padding=1),  # forward tiles from mid-row (even_tasks)
    ConvCase(2, 8, 32, 160, (3, 3), (14, 14), stride=2, padding=1),  # blocks of 2 images
    ConvCase(2, 2, 136, 136, (3, 3), (40, 33), stride=2, padding=1),  # rows of 17: im2col's runs either way
], ids=str)
def test_small_image_columns_are_the_same_bits_either_way(case, vector_bytes, monkeypatch):
    """NCHW im2col of small output images takes AVX-512 gathers where the CPU has them (conv_cpu.cpp, GatherPlan),
    else runs of each output row: a copy either way, so the forward and the weight gradient are the same bits with
    32-byte vectors as with 64, and as close to float64 as torch's."""
    x, w, b = case.make_tensors("cpu", torch.float32, requires_grad=True, seed=11)
    go = case.make_grad_output("cpu", torch.float32, seed=12)
    conv, theirs = getattr(tmg.functional, f"conv{case.dim}d"), getattr(torch.nn.functional, f"conv{case.dim}d")
    leaves = [t for t in (x, w, b) if t is not None]
    def run():
        y = conv(x, w, b, **case.kwargs())
        return [y, *torch.autograd.grad(y, leaves, go)]
    ours = run()
    monkeypatch.setenv("TORCH_MANUALGRAD_VECTOR_BYTES", "64" if vector_bytes == 32 else "32")
    assert all(torch.equal(a, o) for a, o in zip(ours, run()))
    wide = [t.detach().double().requires_grad_() for t in leaves]
    y64 = theirs(wide[0], wide[1], wide[2] if b is not None else None, **case.kwargs())
    y32 = theirs(x, w, b, **case.kwargs())
    for o, t, exact in zip(ours, [y32, *torch.autograd.grad(y32, leaves, go)],
                           [y64, *torch.autograd.grad(y64, wide, go.double())]):
        error, torch_error = ((o.double() - exact).norm() / exact.norm()).item(), ((t.double() - exact).norm() / exact.norm()).item()
        assert error <= 4 * torch_error + 8 * torch.finfo(torch.float32).eps
