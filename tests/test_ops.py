"""The registered torch.ops.manualgrad ops called directly: values vs torch, output_mask, their own autograd
(gradients, gradgradcheck), and torch.library.opcheck on every sample with and without requires_grad."""
import itertools
import warnings

import pytest
import torch
import torch_manualgrad  # noqa: F401  (importing it registers torch.ops.manualgrad.*)
from common import ntuple, tiny_conv_samples, tiny_pool_samples, tolerances

CONV_CASES = tiny_conv_samples()
POOL_CASES = tiny_pool_samples()


def conv_op_args(case, x, w, b):
    return (
        x,
        w,
        b,
        list(ntuple(case.stride, case.dim)),
        list(case.symmetric_padding()),
        list(ntuple(case.dilation, case.dim)),
        case.groups,
    )


def pool_op_args(case, x):
    kernel, stride, padding, dilation = case.tuples()
    return (x, list(kernel), list(stride), list(padding), list(dilation), case.ceil_mode)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_ops_match_torch(case, device, dtype):
    x, w, b = case.make_tensors(device, dtype, requires_grad=True)
    expected = case.torch_fn()(x, w, b, **case.kwargs())
    out = torch.ops.manualgrad.conv_forward(*conv_op_args(case, x.detach(), w.detach(), None if b is None else b.detach()))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected.detach(), **tolerances(dtype))

    grad_output = case.make_grad_output(device, dtype)
    gx, gw = torch.autograd.grad(expected, [x, w], grad_output)
    gb = grad_output.sum(dim=[0] + list(range(2, grad_output.dim())))
    stride, padding, dilation = (list(a) for a in conv_op_args(case, x, w, b)[3:6])
    for mask in itertools.product([False, True], repeat=3):
        result = torch.ops.manualgrad.conv_backward(
            grad_output, x.detach(), w.detach(), stride, padding, dilation, case.groups, list(mask)
        )
        assert len(result) == 3
        for wanted, got, ref, name in zip(mask, result, (gx, gw, gb), ("grad_input", "grad_weight", "grad_bias")):
            if not wanted:
                assert got is None, f"{name} was not asked for in output_mask={mask}"
            else:
                assert got is not None, f"{name} missing for output_mask={mask}"
                assert got.shape == ref.shape and got.dtype == dtype
                torch.testing.assert_close(got, ref, **tolerances(dtype))


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_ops_match_torch(case, device, dtype):
    x = case.make_input(device, dtype, values="ties", requires_grad=True)
    ref_out, ref_idx = case.torch_fn()(x, **case.kwargs(return_indices=True))
    out, idx = torch.ops.manualgrad.max_pool_forward(*pool_op_args(case, x.detach()))
    torch.testing.assert_close(out, ref_out.detach(), rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)
    grad_output = case.make_grad_output(device, dtype)
    (ref_grad,) = torch.autograd.grad(ref_out, x, grad_output)
    grad = torch.ops.manualgrad.max_pool_backward(grad_output, idx, list(x.shape), *pool_op_args(case, x)[1:5])
    assert grad.shape == x.shape and grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, **tolerances(dtype))


@pytest.mark.parametrize("case", POOL_CASES[::2], ids=str)
def test_max_pool_forward_without_indices(case, device, dtype):
    """compute_indices=False gives the same maxima (ties and NaN included) and an empty int64 tensor."""
    x = case.make_input(device, dtype, values="ties")
    if x.numel() > 2:
        x.view(-1)[1] = float("nan")
    args = pool_op_args(case, x)
    out, _ = torch.ops.manualgrad.max_pool_forward(*args)
    out_only, none = torch.ops.manualgrad.max_pool_forward(*args, compute_indices=False)
    torch.testing.assert_close(out_only, out, rtol=0, atol=0, equal_nan=True)
    assert none.numel() == 0 and none.dtype == torch.long and none.device == x.device
    # opcheck compares outputs without equal_nan, so it gets NaN-free input; with requires_grad the
    # backward finds the argmax again from the saved input
    for requires_grad in (False, True):
        clean = pool_op_args(case, case.make_input(device, dtype, values="distinct", requires_grad=requires_grad))
        torch.library.opcheck(torch.ops.manualgrad.max_pool_forward.default, (*clean, False))


def test_ops_are_registered():
    for name in ("conv_forward", "conv_backward", "max_pool_forward", "max_pool_backward"):
        assert hasattr(torch.ops.manualgrad, name), name


# With requires_grad, opcheck also runs each op's registered autograd (autograd.py's formulas), forward and
# backward, eagerly and traced by AOTAutograd with dynamic shapes (test_aot_dispatch_dynamic).
REQUIRES_GRAD = pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])


@REQUIRES_GRAD
@pytest.mark.parametrize("case", CONV_CASES[::2], ids=str)
def test_conv_forward_opcheck(case, requires_grad, device):
    x, w, b = case.make_tensors(device, torch.float64, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.manualgrad.conv_forward.default, conv_op_args(case, x, w, b))


@REQUIRES_GRAD
@pytest.mark.parametrize("case", CONV_CASES[::2], ids=str)
def test_conv_backward_opcheck(case, requires_grad, device):
    x, w, b = case.make_tensors(device, torch.float64, requires_grad=requires_grad)
    stride, padding, dilation = (list(a) for a in conv_op_args(case, x, w, b)[3:6])
    grad_output = case.make_grad_output(device, torch.float64).requires_grad_(requires_grad)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(
            torch.ops.manualgrad.conv_backward.default, (grad_output, x, w, stride, padding, dilation, case.groups, mask)
        )


@REQUIRES_GRAD
@pytest.mark.parametrize("case", POOL_CASES[::2], ids=str)
def test_max_pool_opcheck(case, requires_grad, device):
    x = case.make_input(device, torch.float64, values="distinct", requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.manualgrad.max_pool_forward.default, pool_op_args(case, x))
    out, idx = torch.ops.manualgrad.max_pool_forward(*pool_op_args(case, x.detach()))
    grad_output = case.make_grad_output(device, torch.float64).requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.manualgrad.max_pool_backward.default, (grad_output, idx, list(x.shape), *pool_op_args(case, x)[1:5]))


# --- the ops' own autograd ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONV_CASES[::3], ids=str)
def test_conv_ops_are_differentiable(case, device):
    """conv_forward and conv_backward called directly: gradients, and gradients of gradients, through the
    formulas registered on them, with no warning that autograd is missing."""
    x, w, b = case.make_tensors(device, torch.float64, requires_grad=True)
    leaves = (x, w) if b is None else (x, w, b)
    args = conv_op_args(case, x, w, b)
    geometry = args[3:]
    forward = torch.ops.manualgrad.conv_forward
    grad_output = case.make_grad_output(device, torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autograd kernel was not registered")
        out = forward(*args)
        assert out.grad_fn is not None
        grads = torch.autograd.grad(out, leaves, grad_output)
    expected = torch.autograd.grad(case.torch_fn()(x, w, b, **case.kwargs()), leaves, grad_output)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, **tolerances(torch.float64))
    # fast_mode (random projections of the Jacobians): test_double_backward.py checks every column through
    # the Functions, which run the same formulas
    assert torch.autograd.gradgradcheck(lambda x, w, *b: forward(x, w, *(b or [None]), *geometry), leaves, fast_mode=True)
    grad_output = case.make_grad_output(device, torch.float64).requires_grad_()
    backward = torch.ops.manualgrad.conv_backward
    assert torch.autograd.gradgradcheck(lambda g, x, w: backward(g, x, w, *geometry, [True, True, True]), (grad_output, x, w),
                                        fast_mode=True)


@pytest.mark.parametrize("case", POOL_CASES[::3], ids=str)
def test_max_pool_ops_are_differentiable(case, device):
    x = case.make_input(device, torch.float64, values="distinct", requires_grad=True)
    geometry = pool_op_args(case, x)[1:]
    forward = torch.ops.manualgrad.max_pool_forward
    for compute_indices in (True, False):  # without indices the backward finds the argmax again
        assert torch.autograd.gradgradcheck(lambda t: forward(t, *geometry, compute_indices)[0], (x,))
    _, idx = forward(x.detach(), *geometry)
    grad_output = case.make_grad_output(device, torch.float64).requires_grad_()
    size = list(x.shape)
    assert torch.autograd.gradgradcheck(
        lambda g: torch.ops.manualgrad.max_pool_backward(g, idx, size, *geometry[:4]), (grad_output,)
    )


def test_ops_record_the_functions_formulas(device):
    """One definition, two entries: a double backward through the raw ops records the same backward
    Functions as one through the functional API."""
    x = torch.randn(1, 2, 6, 6, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.ops.manualgrad.conv_forward(x, w, None, [1, 1], [1, 1], [1, 1], 1)
    p, _ = torch.ops.manualgrad.max_pool_forward(y, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert type(y.grad_fn).__name__.startswith("GeneratedBackwardFor_manualgrad_conv_forward")
    (gx,) = torch.autograd.grad(p.square().sum(), x, create_graph=True)
    names, stack = set(), [gx.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    assert {"ConvBackwardFunctionBackward", "MaxPoolBackwardFunctionBackward"} <= names, names


def test_functional_works_under_torch_compile(device):
    """The fake (meta) implementations let the ops be traced; results equal eager."""
    from torch_manualgrad import functional as tf

    def model(x, w):
        return tf.max_pool2d(torch.relu(tf.conv2d(x, w, padding="same")), 2)

    x = torch.randn(2, 3, 8, 8, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w), model(x, w), rtol=1e-5, atol=1e-5)
    meta = model(x.to("meta"), w.to("meta"))
    assert meta.shape == (2, 4, 4, 4) and meta.device.type == "meta"
