"""Where torch has a message for a bad argument, ours contains torch's text (PyTorch's own tests match it),
checked against the message torch gives at test time; and convolutions of inputs with no channels, which
torch accepts, are accepted with torch's shapes and gradients."""
import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg

tf = tmg.functional


def rn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# name -> a call taking the functional module (ours or torch.nn.functional)
CASES = {
    "conv1d-kernel-larger-than-input": lambda f: f.conv1d(rn(1, 3, 4), rn(33, 3, 10)),
    "conv2d-kernel-larger-than-input": lambda f: f.conv2d(rn(1, 3, 1, 1), rn(33, 3, 10, 10)),
    "conv2d-dilated-kernel-larger-than-padded-input": lambda f: f.conv2d(rn(1, 1, 4, 4), rn(1, 1, 3, 3), dilation=2, padding=(0, 1)),
    "conv2d-empty-spatial-input": lambda f: f.conv2d(rn(1, 3, 0, 4), rn(6, 3, 1, 1)),
    "conv2d-empty-spatial-input-padded": lambda f: f.conv2d(rn(1, 3, 0, 4), rn(6, 3, 1, 1), padding=1),
    "conv2d-input-5d": lambda f: f.conv2d(rn(1, 10, 1, 28, 28), rn(6, 1, 5, 5)),
    "conv1d-input-4d": lambda f: f.conv1d(rn(3, 3, 3, 3), rn(6, 3, 3)),
    "conv1d-negative-stride": lambda f: f.conv1d(rn(1, 3, 4), rn(6, 3, 3), stride=-1),
    "conv2d-zero-stride": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), stride=0),
    "conv2d-negative-padding": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), padding=(0, -1)),
    "conv2d-zero-dilation": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), dilation=0),
    "conv2d-negative-dilation": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), dilation=-1),
    "conv2d-zero-groups": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), groups=0),
    "conv2d-channels": lambda f: f.conv2d(rn(1, 2, 4, 4), rn(6, 1, 3, 3)),
    "conv2d-channels-groups": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 1, 3, 3), groups=2),
    "conv1d-channels-empty-weight": lambda f: f.conv1d(rn(2, 1, 5), rn(8, 0, 2)),
    "conv2d-out-channels-not-divisible": lambda f: f.conv2d(rn(1, 4, 4, 4), rn(5, 2, 3, 3), groups=2),
    "conv2d-fewer-out-channels-than-groups": lambda f: f.conv2d(rn(1, 4, 4, 4), rn(1, 2, 3, 3), groups=2),
    "conv1d-fewer-out-channels-than-groups": lambda f: f.conv1d(rn(1, 6, 4), rn(2, 2, 3), groups=3),
    "conv2d-no-out-channels": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(0, 3, 3, 3)),
    "conv2d-empty-kernel": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 0, 3)),
    "conv2d-bias-shape": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), rn(5)),
    "conv2d-weight-dtype": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3, dtype=torch.float64)),
    "conv2d-weight-complex": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3, dtype=torch.complex64)),
    "conv2d-complex-weight-complex128": lambda f: f.conv2d(rn(1, 3, 4, 4, dtype=torch.complex64), rn(6, 3, 3, 3, dtype=torch.complex128)),
    "conv1d-complex-weight-real": lambda f: f.conv1d(rn(1, 3, 4, dtype=torch.complex128), rn(6, 3, 3, dtype=torch.float64)),
    "conv2d-bias-dtype": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), rn(6, dtype=torch.float64)),
    # both wrong: torch names the bias (its transposed convolution the weight)
    "conv2d-weight-and-bias-dtype": lambda f: f.conv2d(rn(1, 3, 4, 4, dtype=torch.float64), rn(6, 3, 3, 3), rn(6)),
    "conv_transpose2d-weight-and-bias-dtype": lambda f: f.conv_transpose2d(rn(1, 3, 4, 4, dtype=torch.float64),
                                                                           rn(3, 6, 3, 3), rn(6)),
    "conv2d-complex-bias-real": lambda f: f.conv2d(rn(1, 3, 4, 4, dtype=torch.complex64), rn(6, 3, 3, 3, dtype=torch.complex64), rn(6)),
    "conv2d-stride-length": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), stride=(1, 1, 1)),
    "conv2d-padding-length": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), padding=(1, 1, 1)),
    "conv2d-same-strided": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), padding="same", stride=2),
    "conv2d-padding-string": lambda f: f.conv2d(rn(1, 3, 4, 4), rn(6, 3, 3, 3), padding="foo"),
    "max_pool2d-zero-stride": lambda f: f.max_pool2d(rn(1, 2, 4, 4), 2, stride=0),
    "max_pool2d-zero-kernel-default-stride": lambda f: f.max_pool2d(rn(1, 2, 4, 4), 0),
    "max_pool2d-zero-kernel": lambda f: f.max_pool2d(rn(1, 2, 4, 4), (2, 0), 1),
    "max_pool2d-negative-stride": lambda f: f.max_pool2d(rn(1, 2, 9, 9), 2, (1, -1)),
    "max_pool2d-negative-padding": lambda f: f.max_pool2d(rn(1, 2, 4, 4), 2, padding=-1),
    "max_pool2d-padding-over-half-effective-kernel": lambda f: f.max_pool2d(rn(1, 2, 9, 9), (4, 2), 1, (1, 2)),
    "max_pool2d-padding-over-half-kernel": lambda f: f.max_pool2d(rn(1, 2, 9, 9), 2, 1, 2, 3),
    "max_pool2d-zero-dilation": lambda f: f.max_pool2d(rn(1, 2, 9, 9), 2, 1, 0, (1, 0)),
    "max_pool2d-output-too-small": lambda f: f.max_pool2d(rn(1, 1, 4, 4), 3, stride=2, dilation=2),
    "max_pool2d-no-channels": lambda f: f.max_pool2d(rn(1, 0, 50, 32), 3, 2),
    "max_pool2d-empty-height": lambda f: f.max_pool2d(rn(1, 2, 0, 32), 3, 2, return_indices=True),
    "max_pool2d-input-5d": lambda f: f.max_pool2d(rn(1, 1, 2, 5, 5), 3, 2),
    "max_pool2d-kernel-length": lambda f: f.max_pool2d(rn(1, 2, 4, 4), (2, 2, 2)),
    "max_pool2d-stride-length": lambda f: f.max_pool2d(rn(1, 2, 4, 4), 2, (1, 1, 1)),
    "max_pool2d-padding-length": lambda f: f.max_pool2d(rn(1, 2, 4, 4), 2, 1, (0, 0, 0)),
    "max_pool2d-dilation-length": lambda f: f.max_pool2d(rn(1, 2, 4, 4), 2, 1, 0, (1, 1, 1)),
    "max_pool2d-bool": lambda f: f.max_pool2d(rn(1, 2, 4, 4) > 0, 2),
    "max_pool2d-complex": lambda f: f.max_pool2d(rn(1, 2, 4, 4, dtype=torch.complex64), 2),
    "max_pool1d-zero-stride": lambda f: f.max_pool1d(rn(1, 2, 4), 2, stride=0),
    "max_pool1d-negative-stride": lambda f: f.max_pool1d(rn(1, 2, 4), 2, -1),
    "max_pool1d-zero-kernel": lambda f: f.max_pool1d(rn(1, 2, 4), 0, 1),
    "max_pool1d-negative-padding": lambda f: f.max_pool1d(rn(1, 2, 4), 2, 1, -1),
    "max_pool1d-padding-over-half-kernel": lambda f: f.max_pool1d(rn(1, 2, 4), 2, padding=2),
    "max_pool1d-zero-dilation": lambda f: f.max_pool1d(rn(1, 2, 4), 2, 1, 0, 0),
    "max_pool1d-output-too-small": lambda f: f.max_pool1d(rn(1, 1, 4), 3, stride=2, dilation=2),
    "max_pool1d-no-channels": lambda f: f.max_pool1d(rn(1, 0, 50), 3, 2),
    "max_pool1d-input-4d": lambda f: f.max_pool1d(rn(1, 1, 5, 5), 3, 2),
    "max_pool1d-kernel-length": lambda f: f.max_pool1d(rn(1, 2, 4), (2, 2)),
    "max_pool1d-stride-length": lambda f: f.max_pool1d(rn(1, 2, 4), 2, (1, 1)),
    "conv3d-input-3d": lambda f: f.conv3d(rn(3, 4, 4), rn(6, 3, 1, 1, 1)),
    "conv3d-input-6d": lambda f: f.conv3d(rn(1, 1, 3, 4, 4, 4), rn(6, 3, 1, 1, 1)),
    "conv3d-unbatched-channels": lambda f: f.conv3d(rn(2, 3, 4, 4), rn(6, 3, 1, 1, 1)),
    "conv3d-kernel-larger-than-input": lambda f: f.conv3d(rn(1, 3, 2, 4, 4), rn(6, 3, 3, 3, 3)),
    "conv3d-channels-groups": lambda f: f.conv3d(rn(1, 3, 4, 4, 4), rn(6, 1, 3, 3, 3), groups=2),
    "conv3d-bias-shape": lambda f: f.conv3d(rn(1, 3, 4, 4, 4), rn(6, 3, 3, 3, 3), rn(5)),
    "conv3d-negative-padding": lambda f: f.conv3d(rn(1, 3, 4, 4, 4), rn(6, 3, 3, 3, 3), padding=(0, 0, -1)),
    "conv3d-zero-stride": lambda f: f.conv3d(rn(1, 3, 4, 4, 4), rn(6, 3, 3, 3, 3), stride=(1, 0, 1)),
    "conv3d-zero-dilation": lambda f: f.conv3d(rn(1, 3, 4, 4, 4), rn(6, 3, 3, 3, 3), dilation=0),
    "conv3d-stride-length": lambda f: f.conv3d(rn(1, 3, 4, 4, 4), rn(6, 3, 3, 3, 3), stride=(1, 1)),
    "conv3d-dilation-length": lambda f: f.conv3d(rn(1, 3, 4, 4, 4), rn(6, 3, 3, 3, 3), dilation=(1, 1, 1, 1)),
    "conv3d-same-strided": lambda f: f.conv3d(rn(1, 3, 4, 4, 4), rn(6, 3, 3, 3, 3), padding="same", stride=2),
    "conv3d-weight-dtype": lambda f: f.conv3d(rn(1, 3, 4, 4, 4), rn(6, 3, 3, 3, 3, dtype=torch.float64)),
    "max_pool3d-input-3d": lambda f: f.max_pool3d(rn(2, 4, 4), 2),
    "max_pool3d-kernel-length": lambda f: f.max_pool3d(rn(1, 2, 4, 4, 4), (2, 2)),
    "max_pool3d-stride-length": lambda f: f.max_pool3d(rn(1, 2, 4, 4, 4), 2, (2, 2)),
    "max_pool3d-padding-length": lambda f: f.max_pool3d(rn(1, 2, 4, 4, 4), 2, 2, (1, 1)),
    "max_pool3d-dilation-length": lambda f: f.max_pool3d(rn(1, 2, 4, 4, 4), 2, 2, 0, (1, 1)),
    "max_pool3d-zero-stride": lambda f: f.max_pool3d(rn(1, 2, 4, 4, 4), 2, (1, 0, 1)),
    "max_pool3d-padding-over-half-kernel": lambda f: f.max_pool3d(rn(1, 2, 4, 4, 4), 2, 1, (0, 2, 0)),
    "max_pool3d-output-too-small": lambda f: f.max_pool3d(rn(1, 1, 4, 4, 4), 3, stride=2, dilation=2),
    # transposed convolutions' dilation: torch names each entry (a 1-d one as 2-d of height 1)
    "conv_transpose1d-zero-dilation": lambda f: f.conv_transpose1d(rn(1, 2, 5), rn(2, 3, 3), dilation=0),
    "conv_transpose2d-zero-dilation": lambda f: f.conv_transpose2d(rn(1, 2, 5, 5), rn(2, 3, 3, 3), dilation=(1, 0)),
    "conv_transpose1d-output-too-small": lambda f: f.conv_transpose1d(rn(2, 2, 1, dtype=torch.float64),
                                                                      rn(2, 2, 1, dtype=torch.float64), stride=2,
                                                                      padding=2, dilation=2),
    "conv_transpose3d-negative-dilation": lambda f: f.conv_transpose3d(rn(1, 2, 4, 4, 4), rn(2, 3, 2, 2, 2), dilation=-2),
}


def message(call, module):
    with pytest.raises(Exception) as info:
        call(module)
    return info.type, str(info.value).splitlines()[0]


@pytest.mark.parametrize("name", CASES)
def test_our_message_contains_torchs(name):
    torch_type, torch_text = message(CASES[name], F)
    our_type, our_text = message(CASES[name], tf)
    assert torch_text in our_text, f"torch: {torch_text!r}\nours:  {our_text!r}"
    # the same kind of error (torch's NotImplementedError for a dtype is a RuntimeError; an unknown padding
    # string is our ValueError, as torch.nn's modules raise, where torch.nn.functional raises RuntimeError)
    assert issubclass(our_type, torch_type) or (name == "conv2d-padding-string" and our_type is ValueError)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("batch", [0, 2])
def test_conv_of_an_input_with_no_channels(dims, groups, batch, device):
    """torch returns an output with no channels (not the bias) and zero gradients for weight and bias."""
    spatial = {1: (15,), 2: (9, 12), 3: (4, 9, 6)}[dims]
    kernel = {1: (2,), 2: (3, 2), 3: (2, 3, 2)}[dims]
    x = torch.randn(batch, 0, *spatial, device=device, requires_grad=True)
    w = torch.randn(8, 0, *kernel, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    conv = getattr(tf, f"conv{dims}d")
    ours = conv(x, w, b, stride=2, groups=groups)
    theirs = getattr(F, f"conv{dims}d")(x.cpu(), w.cpu(), b.cpu(), stride=2, groups=groups)
    assert ours.shape == theirs.shape and ours.device == x.device
    grads = torch.autograd.grad(ours, (x, w, b), torch.ones_like(ours))
    for grad, t in zip(grads, (x, w, b)):
        assert grad.shape == t.shape and not grad.any()
    module = getattr(tmg.nn, f"Conv{dims}d")(0, 8, kernel, stride=2, device=device)
    assert module(x).shape == theirs.shape
    with pytest.raises(RuntimeError, match="Given groups=1, weight"):  # torch's test_conv_empty_channel
        module(torch.randn(2, 1, *(0,) * dims, device=device))


@pytest.mark.parametrize("dims, kernel, dilation, warns", [
    (1, 4, 1, True), (2, (3, 2), 1, True), (3, (2, 3, 3), 3, True),  # even kernel, odd dilation: a padded copy
    (2, 3, 1, False), (2, 2, 2, False), (1, 5, 3, False),  # odd kernel or even dilation: symmetric, no copy
])
def test_uneven_same_padding_warns_as_torch_does(monkeypatch, dims, kernel, dilation, warns):
    """torch warns, once a process, that 'same' with an even kernel and odd dilation copies the input padded;
    ours gives torch's text once too, and nothing where the padding is symmetric."""
    import warnings
    kernel = (kernel,) * dims if isinstance(kernel, int) else kernel
    x, w = rn(1, 2, *(9,) * dims), rn(3, 2, *kernel)
    conv = getattr(tf, f"conv{dims}d")
    monkeypatch.setattr(tmg.functional, "_warned_same_padding_copy", False)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = conv(x, w, padding="same", dilation=dilation)
        expected = getattr(F, f"conv{dims}d")(x, w, padding="same", dilation=dilation)
        torch.testing.assert_close(out, expected)
        texts = [str(c.message) for c in caught]
        want = warns and _ == 0
        ours = [c for c in caught if "Using padding='same' with even kernel lengths and odd dilation" in str(c.message)]
        assert len(ours) == int(want), texts
