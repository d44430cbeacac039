"""Complex convolutions (complex64/complex128) through the functional API and the modules: values, layouts and
gradients against torch's, gradcheck and gradgradcheck in complex128, and the accuracy of the four real products."""
import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg

tf = tmg.functional
COMPLEX = [torch.complex64, torch.complex128]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.complex64 else dict(rtol=1e-10, atol=1e-10)


def rand(*shape, dtype, device, gen):
    real = torch.randn(*shape, generator=gen, dtype=torch.float64)
    imag = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return torch.complex(real, imag).to(device=device, dtype=dtype)


# (dims, input shape, weight shape, bias?, kwargs): 'same' with odd and even kernels, strides, dilation,
# groups, depthwise, unbatched
CASES = [
    (1, (2, 3, 11), (4, 3, 3), True, {}),
    (1, (2, 4, 12), (6, 2, 4), True, dict(padding="same", dilation=2, groups=2)),
    (1, (3, 10), (2, 3, 3), False, dict(stride=2, padding=1)),  # unbatched
    (2, (2, 3, 7, 8), (4, 3, 3, 2), True, dict(stride=(2, 1), padding=(1, 0))),
    (2, (1, 2, 9, 10), (3, 2, 4, 4), True, dict(padding="same")),  # even kernel: one more zero on the right
    (2, (2, 4, 6, 20), (8, 1, 3, 5), False, dict(stride=(1, 10), groups=4)),  # depthwise, multiplier 2
    (2, (3, 6, 6), (2, 3, 3, 3), True, dict(padding="valid", dilation=(2, 1))),  # unbatched
    (2, (2, 0, 5, 5), (3, 0, 3, 3), True, {}),  # no input channels: torch's empty output
    (3, (2, 2, 3, 4, 4), (4, 2, 2, 3, 2), True, dict(stride=(1, 2, 1), padding=(1, 0, 1))),
    (3, (2, 3, 4, 5), (2, 2, 2, 2, 2), False, dict(padding="same", dilation=(1, 2, 1))),  # unbatched
]


def conv(dims, which):
    return getattr(tf if which == "ours" else F, f"conv{dims}d")


@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-{list(c[1])}-{list(c[2])}")
def test_values_and_gradients_match_torch(case, dtype, device):
    dims, x_shape, w_shape, has_bias, kwargs = case
    gen = torch.Generator().manual_seed(0)
    x = rand(*x_shape, dtype=dtype, device=device, gen=gen).requires_grad_()
    w = rand(*w_shape, dtype=dtype, device=device, gen=gen).requires_grad_()
    b = rand(w_shape[0], dtype=dtype, device=device, gen=gen).requires_grad_() if has_bias else None
    ours = conv(dims, "ours")(x, w, b, **kwargs)
    theirs = conv(dims, "torch")(x, w, b, **kwargs)
    assert ours.shape == theirs.shape and ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, **tol(dtype))
    grad_output = rand(*ours.shape, dtype=dtype, device=device, gen=gen)
    tensors = [t for t in (x, w, b) if t is not None]
    our_grads = torch.autograd.grad(ours, tensors, grad_output, allow_unused=True)
    their_grads = torch.autograd.grad(theirs, tensors, grad_output, allow_unused=True)
    for g_ours, g_theirs in zip(our_grads, their_grads):
        torch.testing.assert_close(g_ours, g_theirs, **tol(dtype))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_gradcheck_and_gradgradcheck_complex128(dims, device):
    gen = torch.Generator().manual_seed(1)
    spatial = {1: (4,), 2: (3, 3), 3: (2, 3, 2)}[dims]
    kernel = {1: (2,), 2: (2, 2), 3: (2, 2, 1)}[dims]
    x = rand(1, 2, *spatial, dtype=torch.complex128, device=device, gen=gen).requires_grad_()
    w = rand(2, 1, *kernel, dtype=torch.complex128, device=device, gen=gen).requires_grad_()
    b = rand(2, dtype=torch.complex128, device=device, gen=gen).requires_grad_()

    def fn(x, w, b):
        return conv(dims, "ours")(x, w, b, padding=1, groups=2)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    # the second order in fast mode (random projections): the full Jacobian of the Jacobian takes minutes
    assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


def test_non_contiguous_and_channels_last(device):
    """A discontiguous weight (torch's issue 55781 test) and channels-last tensors: torch's values and layouts."""
    x = torch.ones(4, 16, 6, 6, dtype=torch.complex64, device=device)
    w = torch.arange(0, 1.0, 1 / 2.0**10).reshape(32, 16, 1, 2).to(device=device, dtype=torch.complex64)[:, :, :, ::2]
    assert not w.is_contiguous()
    torch.testing.assert_close(tf.conv2d(x, w), F.conv2d(x, w))
    gen = torch.Generator().manual_seed(2)
    x = rand(2, 3, 6, 6, dtype=torch.complex64, device=device, gen=gen).contiguous(memory_format=torch.channels_last)
    w = rand(4, 3, 3, 3, dtype=torch.complex64, device=device, gen=gen)
    ours, theirs = tf.conv2d(x, w), F.conv2d(x, w)
    torch.testing.assert_close(ours, theirs, **tol(torch.complex64))
    assert ours.stride() == theirs.stride()


def test_module_with_complex_parameters(device):
    torch.manual_seed(3)
    theirs = torch.nn.Conv2d(3, 4, 3, padding="same", dtype=torch.complex64, device=device)
    ours = tmg.nn.Conv2d(3, 4, 3, padding="same", dtype=torch.complex64, device=device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 7, 7, dtype=torch.complex64, device=device)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, **tol(torch.complex64))
    y_ours.abs().sum().backward()
    y_theirs.abs().sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
    converted = tmg.convert(torch.nn.Sequential(theirs))
    torch.testing.assert_close(converted(x), y_theirs, **tol(torch.complex64))


def test_four_products_are_accurate_where_gauss_is_not():
    """Imaginary parts 1000 times smaller than the real ones: Gauss's trick (torch's) loses about three
    digits of the imaginary part to cancellation; the four real products keep float32's."""
    gen = torch.Generator().manual_seed(4)

    def part(*shape, scale):
        return torch.randn(*shape, generator=gen) * scale

    x = torch.complex(part(4, 8, 16, 16, scale=1.0), part(4, 8, 16, 16, scale=1e-3))
    w = torch.complex(part(16, 8, 3, 3, scale=1.0), part(16, 8, 3, 3, scale=1e-3))
    truth = F.conv2d(x.to(torch.complex128), w.to(torch.complex128), padding=1)

    def imag_error(y):
        return ((y.to(torch.complex128).imag - truth.imag).abs().max() / truth.imag.abs().max()).item()

    ours = imag_error(tf.conv2d(x, w, padding=1))
    xr, xi, wr, wi = x.real, x.imag, w.real, w.imag
    t1, t2 = tf.conv2d(xr, wr, padding=1), tf.conv2d(xi, wi, padding=1)
    gauss = imag_error(torch.complex(t1 - t2, tf.conv2d(xr + xi, wr + wi, padding=1) - t1 - t2))
    assert ours < 2e-6, ours
    assert gauss > 100 * ours, (gauss, ours)


def test_mixed_dtypes_are_refused_with_torchs_words():
    x = torch.randn(1, 2, 5, 5, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="expected scalar type ComplexFloat but found Float"):
        tf.conv2d(x, torch.randn(3, 2, 3, 3))
    with pytest.raises(RuntimeError, match=r"Input type \(c10::complex<float>\) and bias type \(float\) should be the same"):
        tf.conv2d(x, torch.randn(3, 2, 3, 3, dtype=torch.complex64), torch.randn(3))
    with pytest.raises(RuntimeError, match="complex convolutions are computed by torch_manualgrad.functional"):
        torch.ops.manualgrad.conv_forward(x, torch.randn(3, 2, 3, 3, dtype=torch.complex64), None, [1, 1], [0, 0], [1, 1], 1)
