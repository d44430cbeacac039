"""Numerical gradient checks (torch.autograd.gradcheck, float64) of conv1d/2d and max_pool1d/2d over the sample matrix."""
import dataclasses

import pytest
import torch

from common import conv_samples, pool_samples

CONV_CASES = conv_samples()
POOL_CASES = pool_samples()


def _conv_fn(case):
    fn = case.tmg_fn()
    kwargs = case.kwargs()
    if case.bias:
        return lambda x, w, b: fn(x, w, b, **kwargs)
    return lambda x, w: fn(x, w, None, **kwargs)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_gradcheck(case, device):
    x, w, b = case.make_tensors(device, torch.float64, requires_grad=True)
    inputs = (x, w, b) if case.bias else (x, w)
    assert torch.autograd.gradcheck(_conv_fn(case), inputs, check_batched_grad=False)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_gradcheck(case, device):
    # a permutation of integers has no ties, so the argmax (and hence the gradient) is well-defined
    x = case.make_input(device, torch.float64, values="distinct", requires_grad=True)
    fn = case.tmg_fn()
    kwargs = case.kwargs()
    assert torch.autograd.gradcheck(lambda t: fn(t, **kwargs), (x,), check_batched_grad=False)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c.batch == 0], ids=str)
def test_conv_batch0_shapes(case, device):
    x, w, b = case.make_tensors(device, torch.float64, requires_grad=True)
    out = case.tmg_fn()(x, w, b, **case.kwargs())
    assert out.shape == case.output_shape
    assert out.device == x.device and out.dtype == x.dtype
    grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], torch.ones_like(out))
    assert grads[0].shape == x.shape
    assert grads[1].shape == w.shape
    assert torch.equal(grads[1], torch.zeros_like(w))  # nothing in the batch, nothing accumulated
    if case.bias:
        assert grads[2].shape == b.shape
        assert torch.equal(grads[2], torch.zeros_like(b))


@pytest.mark.parametrize("case", [c for c in POOL_CASES if c.batch == 0], ids=str)
def test_max_pool_batch0_shapes(case, device):
    x = case.make_input(device, torch.float64, requires_grad=True)
    result = case.tmg_fn()(x, **case.kwargs(return_indices=True))
    out, indices = result
    assert out.shape == case.output_shape
    assert indices.shape == case.output_shape
    assert indices.dtype == torch.int64
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert grad.shape == x.shape


def test_gradcheck_covers_matrix():
    """The curated sample lists really contain every argument value the matrix asks for."""
    for dim in (1, 2):
        convs = [c for c in CONV_CASES if c.dim == dim]
        assert {c.batch for c in convs} >= {0, 1, 2, 3, None}
        assert {c.bias for c in convs} == {True, False}
        assert {str(c.padding) for c in convs} >= {"0", "1", "same", "valid"}
        assert any(isinstance(c.padding, tuple) for c in convs)
        assert any(c.padding == "same" and any(k % 2 == 0 for k in c.kernel_size) for c in convs)
        assert any(c.groups == c.in_channels > 1 for c in convs), "depthwise"
        assert any(1 < c.groups < c.in_channels for c in convs), "grouped"
        assert {str(c.stride) for c in convs} >= {"1", "2"} and any(isinstance(c.stride, tuple) for c in convs)
        assert {str(c.dilation) for c in convs} >= {"1", "2"} and any(isinstance(c.dilation, tuple) for c in convs)
        pools = [c for c in POOL_CASES if c.dim == dim]
        assert {c.ceil_mode for c in pools} == {True, False}
        assert {c.return_indices for c in pools} == {True, False}
        assert {c.batch for c in pools} >= {0, 1, 2, None}
        assert {str(c.dilation) for c in pools} >= {"1", "2"}
        assert {str(c.padding) for c in pools} >= {"0", "1"}
        assert any(c.stride is None for c in pools) and any(c.stride == 1 for c in pools)
        # ceil_mode actually changes the output size somewhere
        assert any(
            c.ceil_mode and c.output_spatial() != dataclasses.replace(c, ceil_mode=False).output_spatial()
            for c in pools
        )
