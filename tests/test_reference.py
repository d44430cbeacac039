"""The kernels (through functional and through the registered ops) against the loop-level torch_manualgrad.reference oracle."""
import pytest
import torch

import torch_manualgrad  # noqa: F401  (importing it registers torch.ops.manualgrad.*)
from common import ntuple, tiny_conv_samples, tiny_pool_samples

pytestmark = pytest.mark.reference

CONV_CASES = tiny_conv_samples()
POOL_CASES = tiny_pool_samples()
DTYPE = torch.float64
EXACT = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def reference():
    try:
        from torch_manualgrad import reference
    except ImportError as exc:  # a missing oracle must show up as a failure, not as silence
        pytest.fail(f"torch_manualgrad.reference cannot be imported: {exc}")
    return reference


def conv_int_args(case):
    return (
        ntuple(case.stride, case.dim),
        case.symmetric_padding(),
        ntuple(case.dilation, case.dim),
        case.groups,
    )


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_forward_matches_reference(case, reference, device):
    x, w, b = case.make_tensors(device, DTYPE)
    expected = reference.conv_forward(x, w, b, *conv_int_args(case))
    assert tuple(expected.shape) == case.output_shape
    torch.testing.assert_close(case.tmg_fn()(x, w, b, **case.kwargs()), expected, **EXACT)
    stride, padding, dilation, groups = conv_int_args(case)
    op_out = torch.ops.manualgrad.conv_forward(x, w, b, list(stride), list(padding), list(dilation), groups)
    torch.testing.assert_close(op_out, expected, **EXACT)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_backward_matches_reference(case, reference, device):
    x, w, b = case.make_tensors(device, DTYPE, requires_grad=True)
    grad_output = case.make_grad_output(device, DTYPE)
    expected_gi, expected_gw, expected_gb = reference.conv_backward(grad_output, x.detach(), w.detach(), *conv_int_args(case))

    out = case.tmg_fn()(x, w, b, **case.kwargs())
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], grad_output)
    torch.testing.assert_close(grads[0], expected_gi, **EXACT)
    torch.testing.assert_close(grads[1], expected_gw, **EXACT)
    if case.bias:
        torch.testing.assert_close(grads[2], expected_gb, **EXACT)

    stride, padding, dilation, groups = conv_int_args(case)
    gi, gw, gb = torch.ops.manualgrad.conv_backward(
        grad_output, x.detach(), w.detach(), list(stride), list(padding), list(dilation), groups, [True, True, True]
    )
    torch.testing.assert_close(gi, expected_gi, **EXACT)
    torch.testing.assert_close(gw, expected_gw, **EXACT)
    torch.testing.assert_close(gb, expected_gb, **EXACT)


@pytest.mark.parametrize("case", CONV_CASES[::3], ids=str)
def test_reference_conv_matches_torch(case, reference, device):
    """Sanity check of the oracle itself, so that a disagreement above can be blamed on the right side."""
    x, w, b = case.make_tensors(device, DTYPE, requires_grad=True)
    out = case.torch_fn()(x, w, b, **case.kwargs())
    torch.testing.assert_close(reference.conv_forward(x.detach(), w.detach(), None if b is None else b.detach(), *conv_int_args(case)), out.detach(), **EXACT)
    grad_output = case.make_grad_output(device, DTYPE)
    grads = torch.autograd.grad(out, [x, w], grad_output)
    gi, gw, gb = reference.conv_backward(grad_output, x.detach(), w.detach(), *conv_int_args(case))
    torch.testing.assert_close(gi, grads[0], **EXACT)
    torch.testing.assert_close(gw, grads[1], **EXACT)
    torch.testing.assert_close(gb, grad_output.sum(dim=[0] + list(range(2, grad_output.dim()))), **EXACT)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_max_pool_matches_reference(case, values, reference, device):
    x = case.make_input(device, DTYPE, values=values, requires_grad=True)
    kernel, stride, padding, dilation = case.tuples()
    expected_out, expected_idx = reference.max_pool_forward(x.detach(), kernel, stride, padding, dilation, case.ceil_mode)
    out, idx = case.tmg_fn()(x, **case.kwargs(return_indices=True))
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    assert torch.equal(idx, expected_idx)

    op_out, op_idx = torch.ops.manualgrad.max_pool_forward(
        x.detach(), list(kernel), list(stride), list(padding), list(dilation), case.ceil_mode
    )
    torch.testing.assert_close(op_out, expected_out, rtol=0, atol=0)
    assert torch.equal(op_idx, expected_idx)

    grad_output = case.make_grad_output(device, DTYPE)
    expected_grad = reference.max_pool_backward(grad_output, expected_idx, tuple(x.shape))
    (grad,) = torch.autograd.grad(out, x, grad_output)
    torch.testing.assert_close(grad, expected_grad, **EXACT)
    op_grad = torch.ops.manualgrad.max_pool_backward(
        grad_output, idx, list(x.shape), list(kernel), list(stride), list(padding), list(dilation)
    )
    torch.testing.assert_close(op_grad, expected_grad, **EXACT)


@pytest.mark.parametrize("case", POOL_CASES[::3], ids=str)
def test_reference_max_pool_matches_torch(case, reference, device):
    x = case.make_input(device, DTYPE, values="ties", requires_grad=True)
    kernel, stride, padding, dilation = case.tuples()
    out, idx = case.torch_fn()(x, **case.kwargs(return_indices=True))
    ref_out, ref_idx = reference.max_pool_forward(x.detach(), kernel, stride, padding, dilation, case.ceil_mode)
    torch.testing.assert_close(ref_out, out.detach(), rtol=0, atol=0)
    assert torch.equal(ref_idx, idx)
    grad_output = case.make_grad_output(device, DTYPE)
    (grad,) = torch.autograd.grad(out, x, grad_output)
    torch.testing.assert_close(reference.max_pool_backward(grad_output, idx, tuple(x.shape)), grad, **EXACT)
