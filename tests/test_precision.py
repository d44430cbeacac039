"""float16 and bfloat16 (accumulated in float32) against torch within tolerances of the dtype's own
precision, and torch.autocast: our conv runs in the autocast dtype where torch's does, max-pool keeps its
input's dtype, and gradients reach float32 parameters as float32."""
import copy

import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg

HALF_TYPES = [torch.float16, torch.bfloat16]
# about two units in the last place of the dtype, relative to values of order 1-10
TOL = {torch.float16: dict(rtol=4e-3, atol=2e-2), torch.bfloat16: dict(rtol=3e-2, atol=1e-1)}


def leaves(device, dtype, *shapes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("dims", (1, 2, 3))
def test_half_forward_on_the_cpu_is_rounded_once(dtype, dims):
    """On the CPU a float16/bfloat16 convolution is computed in float32 and rounded once, a transposed one's bias
    included (it is added after the op: added to the rounded result, about 30% of the outputs were a unit in the last
    place off, more near 0): the exact result of the rounded arguments, rounded to the dtype, but where the float32
    sums' own error crosses a rounding boundary (rare: then a unit in the last place off, or that error near 0)."""
    size = ((40,), (9, 8), (4, 5, 6))[dims - 1]
    x, w, b = leaves("cpu", dtype, (2, 8, *size), (8, 6, *(3,) * dims), (6,))
    bits = {torch.float16: 11, torch.bfloat16: 8}[dtype]  # the significand's, with the implicit one
    for ours, exact in (
        (getattr(tmg.functional, f"conv_transpose{dims}d")(x, w, b, stride=2),
         getattr(F, f"conv_transpose{dims}d")(x.double(), w.double(), b.double(), stride=2)),
        (getattr(tmg.functional, f"conv{dims}d")(x, w.transpose(0, 1)[:6], b, padding=1),
         getattr(F, f"conv{dims}d")(x.double(), w.transpose(0, 1)[:6].double(), b.double(), padding=1)),
    ):
        ours, exact = ours.detach(), exact.detach()
        assert (ours == exact.to(dtype)).double().mean() >= 0.995
        ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - bits)
        float32_error = 1e-5 * exact.abs().max()  # of sums that cancel to near 0
        assert ((ours.double() - exact).abs() <= ulp + float32_error).all()


@pytest.mark.parametrize("dtype", HALF_TYPES)
@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2), (6, 1)])
def test_half_conv_matches_torch_at_its_own_tolerances(dtype, groups, stride, device):
    x, w, b = leaves(device, dtype, (2, 6, 9, 8), (6, 6 // groups, 3, 3), (6,))
    y = tmg.functional.conv2d(x, w, b, stride, 1, 1, groups)
    assert y.dtype == dtype
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
    exact_y = F.conv2d(xf, wf, bf, stride, 1, 1, groups)
    if device == "cpu":
        # Both compute in float32 and round once: assert_close's defaults for a dtype are the
        # tolerances torch itself uses for it.
        torch.testing.assert_close(y, F.conv2d(x, w, b, stride, 1, 1, groups))
    else:
        # On the GPU the matrix products take half inputs (accumulating in float32) and the bias is
        # added in the half type, as cuDNN's may do it differently: both are held to the float32 result.
        torch.testing.assert_close(y, exact_y.to(dtype), **TOL[dtype])
        torch.testing.assert_close(F.conv2d(x, w, b, stride, 1, 1, groups), exact_y.to(dtype), **TOL[dtype])
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = torch.autograd.grad(y, (x, w, b), go)
    # The gradients are float32 sums rounded once on the CPU. torch's own float16 CPU backward sums in
    # float16 and misses these tolerances, so the reference is the float32 computation on the same
    # inputs, rounded. On the GPU the products' inputs are half too, so the dtype's tolerance applies.
    exact = torch.autograd.grad(exact_y, (xf, wf, bf), go.float())
    for g, e in zip(grads, exact):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e.to(dtype), **({} if device == "cpu" else TOL[dtype]))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_max_pool_matches_torch_exactly(dtype, device):
    (x,) = leaves(device, dtype, (2, 3, 9, 8))
    out, idx = tmg.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)
    go = torch.randn(out.shape).to(device, dtype)
    grad = torch.autograd.grad(out, x, go)[0]
    assert grad.dtype == dtype
    # overlapping windows add in float32 here, so compare with float32 sums rounded once, and with torch's
    xf = x.detach().float().requires_grad_()
    exact = torch.autograd.grad(F.max_pool2d(xf, 3, 2, 1), xf, go.float())[0]
    torch.testing.assert_close(grad, exact.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(grad.float(), torch.autograd.grad(ref, x, go)[0].float(), **TOL[dtype])


def test_autocast_follows_torch(device):
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 2, 3)).to(device)
    ours = tmg.convert(copy.deepcopy(theirs))
    x = torch.randn(2, 3, 10, 10, device=device)
    with torch.autocast(device_type=device):
        lower = torch.get_autocast_dtype(device)
        y_ours, y_theirs = ours(x), theirs(x)
        assert y_ours.dtype == y_theirs.dtype == lower
        # max-pool keeps the dtype it is given, as torch's does
        assert tmg.functional.max_pool2d(x, 2).dtype == F.max_pool2d(x, 2).dtype == torch.float32
        assert ours[0](x).dtype == lower
        assert ours[1](ours[0](x)).dtype == lower
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), **TOL[lower])
    y_ours.float().sum().backward()
    y_theirs.float().sum().backward()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-1)


def _relative_error(value, truth):
    return ((value.double() - truth).norm() / truth.norm()).item()


# im2col shapes of the bench (benchmarks/bench.py), smaller batches: K = C_in * taps from 64 to 4608.
FLOAT32_FORWARD_CASES = [
    ((2, 128, 28, 28), (128, 128, 3, 3), dict(stride=2, padding=1)),
    ((2, 512, 7, 7), (512, 512, 3, 3), dict(padding=1)),
    ((2, 3, 112, 112), (64, 3, 7, 7), dict(stride=2, padding=3)),
    ((2, 64, 28, 28), (256, 64, 1, 1), {}),
    # pointwise with long sums (ResNet-50's 1024->256 and 2048->512), where channels-last runs are longer
    ((2, 1024, 14, 14), (256, 1024, 1, 1), {}),
    ((2, 2048, 7, 7), (512, 2048, 1, 1), {}),
    ((2, 256, 512), (256, 256, 3), dict(padding=1)),
    ((2, 96, 14, 14), (48, 96, 5, 5), dict(padding=2)),
    # depthwise (depthwise_cpu.cpp): the taps summed first, then the bias, as torch does
    ((2, 144, 28, 28), (144, 1, 3, 3), dict(padding=1, groups=144)),
    ((2, 96, 14, 14), (96, 1, 5, 5), dict(stride=2, padding=2, groups=96)),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("x_shape, w_shape, kwargs", FLOAT32_FORWARD_CASES, ids=str)
def test_float32_forward_error_no_worse_than_torchs(x_shape, w_shape, kwargs, channels_last):
    """The im2col forward sums its products in short runs (blas.h's forward_chunk; channels-last, nhwc_forward_chunk's
    longer ones, where torch's own error is larger): its float32 error against float64 stays at torch's (one NCHW
    product over K = C_in * taps was 1.3-2x torch's); so does the depthwise kernels'."""
    if channels_last and len(x_shape) != 4:
        pytest.skip("channels_last is a 4-d layout")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(x_shape, generator=gen)
    w = torch.randn(w_shape, generator=gen) / (torch.Size(w_shape)[1:].numel()) ** 0.5
    b = torch.randn(w_shape[0], generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = {3: F.conv1d, 4: F.conv2d}[x.dim()]
    ours = {3: tmg.functional.conv1d, 4: tmg.functional.conv2d}[x.dim()](x, w, b, **kwargs)
    truth = conv(x.double(), w.double(), b.double(), **kwargs)
    assert _relative_error(ours, truth) <= 1.15 * _relative_error(conv(x, w, b, **kwargs), truth)
