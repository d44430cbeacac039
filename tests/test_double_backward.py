"""Double backward through our ops: gradgradcheck (float64) for conv (input, weight, bias) and max-pool,
a check that second-order gradients run through torch.ops.manualgrad, and Hessian-vector products of a
small CNN made of our layers against torch.nn's."""
import copy

import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg
from common import conv_samples, pool_samples

CONV_CASES = [c for c in conv_samples() if c.batch != 0][::3]
POOL_CASES = pool_samples()[::3]


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_gradgradcheck(case, device):
    x, w, b = case.make_tensors(device, torch.float64, requires_grad=True)
    fn, kwargs = case.tmg_fn(), case.kwargs()
    if case.bias:
        assert torch.autograd.gradgradcheck(lambda x, w, b: fn(x, w, b, **kwargs), (x, w, b), check_batched_grad=False)
    else:
        assert torch.autograd.gradgradcheck(lambda x, w: fn(x, w, None, **kwargs), (x, w), check_batched_grad=False)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_gradgradcheck(case, device):
    x = case.make_input(device, torch.float64, values="distinct", requires_grad=True)
    fn, kwargs = case.tmg_fn(), case.kwargs()
    assert torch.autograd.gradgradcheck(lambda t: fn(t, **kwargs), (x,), check_batched_grad=False)


def test_second_order_runs_through_our_ops(device):
    """The graph of a gradient (create_graph=True) is built from our ops, not torch's convolution."""
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    y = tmg.functional.max_pool2d(tmg.functional.conv2d(x, w, padding=1), 2)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    names = set()

    seen = set()

    def walk(fn):
        if fn is None or fn in seen:
            return
        seen.add(fn)
        names.add(type(fn).__name__)
        for nxt, _ in fn.next_functions:
            walk(nxt)

    walk(gx.grad_fn)
    assert {"ConvBackwardFunctionBackward", "MaxPoolBackwardFunctionBackward"} <= names, names
    assert not any(n.startswith(("Convolution", "MaxPool2DWithIndices")) for n in names), names


def small_cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 3, 3, stride=2, padding=1), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 2),
    ).double()


def test_hessian_vector_product_matches_torch_nn(device):
    torch.manual_seed(0)
    theirs = small_cnn().to(device)
    ours = tmg.convert(copy.deepcopy(theirs))
    x = torch.randn(3, 2, 8, 8, device=device, dtype=torch.float64)
    target = torch.randn(3, 2, device=device, dtype=torch.float64)
    vectors = [torch.randn_like(p) for p in theirs.parameters()]

    def hvp(model):
        params = list(model.parameters())
        loss = torch.nn.functional.mse_loss(model(x), target)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vectors))
        return torch.autograd.grad(dot, params)

    for a, b in zip(hvp(ours), hvp(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# An empty batch: the first gradients are laid out like their tensors (zeros for the weight), and they were made
# anew, cutting the graph: with create_graph=True a second derivative raised "element 0 of tensors does not require
# grad" where torch's works (found by fuzzing).
@pytest.mark.parametrize("name,x_shape,w_shape,kwargs", [
    ("conv1d", (0, 2, 7), (3, 2, 3), dict(padding=1)),
    ("conv2d", (0, 2, 5, 4), (3, 2, 3, 2), dict(stride=2)),
    ("conv3d", (0, 2, 3, 4, 3), (3, 2, 2, 2, 2), {}),
    ("conv_transpose2d", (0, 2, 3, 4), (2, 3, 3, 3), dict(stride=2, output_padding=1)),
])
def test_second_derivatives_through_an_empty_batch(name, x_shape, w_shape, kwargs):
    results = []
    for f in (F, tmg.functional):
        x = torch.zeros(x_shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(w_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
        y = getattr(f, name)(x, w, None, **kwargs)
        gx, gw = torch.autograd.grad(y.sum(), (x, w), create_graph=True)
        assert gx.requires_grad and gw.requires_grad
        results.append((gx, gw, *torch.autograd.grad(gw.sum() + gx.sum(), (w,), allow_unused=True, materialize_grads=True)))
    for ours, theirs in zip(results[1], results[0]):
        assert ours.shape == theirs.shape and ours.stride() == theirs.stride()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
