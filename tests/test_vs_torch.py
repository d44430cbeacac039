"""Values and gradients of torch_manualgrad.functional against torch.nn.functional on random configurations (hypothesis)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import torch_manualgrad as tmg
from common import LAYOUTS, ConvCase, PoolCase, conv_cases, pool_cases, tolerances

layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**31 - 1)


def _grads(out, tensors, grad_output):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, tensors, grad_output, allow_unused=False)


# --------------------------------------------------------------------------------------------------
# convolution
# --------------------------------------------------------------------------------------------------


def check_conv_against_torch(case: ConvCase, device, dtype, seed=0, layouts=("contiguous",) * 4):
    x, w, b = case.make_tensors(device, dtype, requires_grad=True, seed=seed, layouts=layouts[:3])
    ours = case.tmg_fn()(x, w, b, **case.kwargs())
    # torch on contiguous copies is the oracle: torch 2.13's CPU conv2d can segfault on some
    # channels-last inputs (e.g. input (3, 3, 3, 1), kernel (4, 1), stride (1, 2), padding 1, dilation (1, 2))
    ref = [None if t is None else t.detach().contiguous().requires_grad_() for t in (x, w, b)]
    theirs = case.torch_fn()(*ref, **case.kwargs())
    assert ours.shape == theirs.shape == case.output_shape
    assert ours.dtype == dtype and ours.device == x.device
    torch.testing.assert_close(ours, theirs, **tolerances(dtype))

    grad_output = case.make_grad_output(device, dtype, seed=seed + 1, layout=layouts[3])
    our_grads = _grads(ours, (x, w, b), grad_output)
    their_grads = _grads(theirs, ref, grad_output.contiguous())
    for name, g_ours, g_theirs in zip(("input", "weight", "bias"), our_grads, their_grads):
        assert g_ours.shape == g_theirs.shape, name
        torch.testing.assert_close(g_ours, g_theirs, **tolerances(dtype), msg=lambda m: f"grad_{name}: {m}")


@given(case=conv_cases(), seed=seeds, layout=st.tuples(layouts, layouts, layouts, layouts))
def test_conv_matches_torch(case, seed, layout, device, dtype):
    check_conv_against_torch(case, device, dtype, seed, layout)


@pytest.mark.parametrize(
    "case",
    [
        ConvCase(2, 2, 4, 6, (3, 3), (9, 8), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        ConvCase(2, 1, 3, 3, (2, 4), (6, 7), padding="same", dilation=(3, 1), groups=3, bias=False),
        ConvCase(1, 3, 2, 4, (4,), (10,), padding="same", dilation=1),
        ConvCase(1, None, 3, 6, (3,), (8,), stride=2, padding=1, groups=3),
        ConvCase(2, None, 2, 2, (1, 1), (5, 5), padding="valid"),
        ConvCase(2, 2, 2, 3, (5, 5), (5, 5), padding=0),  # kernel exactly the input size
        ConvCase(2, 1, 2, 3, (3, 3), (2, 2), padding=1),  # input smaller than kernel, rescued by padding
        ConvCase(2, 1, 1, 1, (1, 1), (1, 1), padding=0),
        ConvCase(1, 2, 2, 2, (3,), (4,), padding=3, stride=2),  # outputs that see only padding (bias only)
        # kernel taps that fall in the padding at every output position (dilation steps over the input)
        ConvCase(1, 1, 1, 1, (3,), (1,), padding=2, dilation=2),
        ConvCase(1, 2, 2, 2, (4,), (2,), padding=3, dilation=2, stride=2),
        ConvCase(2, 1, 2, 3, (4, 3), (3, 1), padding=(2, 2), dilation=(2, 2)),
        # small images' weight gradient in tasks of the columns' rows, two a group (1152 rows each)
        ConvCase(1, 3, 256, 64, (9,), (40,), stride=2, padding=4, groups=2),
    ],
    ids=str,
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_edge_cases_match_torch(case, layout, device, dtype):
    check_conv_against_torch(case, device, dtype, seed=3, layouts=(layout,) * 4)


def test_conv_unbatched_matches_batched(device, dtype):
    """An unbatched (C, H, W) input behaves exactly like a batch of one."""
    case = ConvCase(2, None, 2, 3, (3, 2), (6, 5), padding="same")
    x, w, b = case.make_tensors(device, dtype)
    fn = case.tmg_fn()
    out = fn(x, w, b, padding="same")
    assert out.shape == (3, 6, 5)
    torch.testing.assert_close(out, fn(x.unsqueeze(0), w, b, padding="same")[0], rtol=0, atol=0)


def test_conv_padding_forms_agree(device):
    """int, tuple and list paddings, and 'valid' == 0, give the same results."""
    case = ConvCase(2, 2, 2, 3, (3, 3), (6, 6))
    x, w, b = case.make_tensors(device, torch.float64)
    f = tmg.functional.conv2d
    torch.testing.assert_close(f(x, w, b, padding=1), f(x, w, b, padding=(1, 1)), rtol=0, atol=0)
    torch.testing.assert_close(f(x, w, b, padding=1), f(x, w, b, padding=[1, 1]), rtol=0, atol=0)
    torch.testing.assert_close(f(x, w, b, padding=0), f(x, w, b, padding="valid"), rtol=0, atol=0)
    torch.testing.assert_close(f(x, w, b, padding=1), f(x, w, b, padding="same"), rtol=0, atol=0)


def test_conv_does_not_modify_inputs(device):
    case = ConvCase(2, 2, 4, 4, (3, 3), (6, 6), padding="same", groups=2)
    x, w, b = case.make_tensors(device, torch.float32, requires_grad=True, layouts=("transposed",) * 3)
    copies = [t.detach().clone() for t in (x, w, b)]
    out = case.tmg_fn()(x, w, b, **case.kwargs())
    out.backward(torch.ones_like(out))
    for t, c in zip((x, w, b), copies):
        assert torch.equal(t.detach(), c)


# --------------------------------------------------------------------------------------------------
# max-pool
# --------------------------------------------------------------------------------------------------


def check_pool_against_torch(case: PoolCase, device, dtype, values, seed=0, layout="contiguous"):
    x = case.make_input(device, dtype, values=values, requires_grad=True, seed=seed, layout=layout)
    kwargs = case.kwargs(return_indices=True)
    out, idx = case.tmg_fn()(x, **kwargs)
    # torch on a contiguous copy is the oracle (its channels-last kernel is a different code path)
    x_ref = x.detach().contiguous().requires_grad_()
    ref_out, ref_idx = case.torch_fn()(x_ref, **kwargs)
    assert out.shape == ref_out.shape == case.output_shape
    assert idx.dtype == torch.int64 and idx.shape == ref_idx.shape
    assert out.dtype == dtype and out.device == x.device
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0, equal_nan=True)  # max is exact
    assert torch.equal(idx, ref_idx), f"indices differ:\nours={idx}\ntorch={ref_idx}\ninput={x}"

    grad_output = case.make_grad_output(device, dtype, seed=seed + 1, layout=layout)
    (grad,) = torch.autograd.grad(out, x, grad_output)
    (ref_grad,) = torch.autograd.grad(ref_out, x_ref, grad_output)
    torch.testing.assert_close(grad, ref_grad, **tolerances(dtype))
    return x, out, idx


@given(case=pool_cases(), seed=seeds, layout=layouts, values=st.sampled_from(["distinct", "normal", "ties", "nan"]))
def test_max_pool_matches_torch(case, seed, layout, values, device, dtype):
    check_pool_against_torch(case, device, dtype, values, seed, layout)


@given(case=pool_cases(allow_unbatched=False), seed=seeds)
def test_max_pool_ties_give_torch_indices(case, seed, device, dtype):
    """Integer-valued inputs (many ties in each window): the first maximum in scan order wins, like torch."""
    check_pool_against_torch(case, device, dtype, "ties", seed)


@given(case=pool_cases(allow_unbatched=False), seed=seeds)
def test_max_pool_nan_gives_torch_indices(case, seed, device, dtype):
    check_pool_against_torch(case, device, dtype, "nan", seed)


@given(case=pool_cases(), seed=seeds)
def test_max_pool_without_indices_returns_tensor(case, seed, device):
    x = case.make_input(device, torch.float32, values="normal", seed=seed)
    out = case.tmg_fn()(x, **case.kwargs(return_indices=False))
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, case.torch_fn()(x, **case.kwargs(return_indices=False)), rtol=0, atol=0)


@given(case=pool_cases(dims=(1,)), seed=seeds, values=st.sampled_from(["normal", "ties", "nan"]))
def test_max_pool1d_inference_matches_torch(case, seed, values, device, dtype):
    """Without indices a 1-d plane takes its own path (maxima straight from the input row)."""
    x = case.make_input(device, dtype, values=values, seed=seed)
    with torch.no_grad():
        out = case.tmg_fn()(x, **case.kwargs(return_indices=False))
    torch.testing.assert_close(out, case.torch_fn()(x, **case.kwargs(return_indices=False)), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil_mode", [
    (3, 1, 1, 1, False), (3, 2, 1, 1, False), (2, 2, 0, 1, True), (5, 3, 2, 2, True), (4, 1, 2, 3, False), (1, 4, 0, 1, True)
], ids=str)
def test_max_pool1d_inference_on_long_rows(kernel, stride, padding, dilation, ceil_mode, device):
    """Rows long enough for the vectorised sweeps, with NaNs and ties sprinkled in."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 50, (2, 3, 1001), generator=gen).float()
    x[torch.rand(x.shape, generator=gen) < 0.01] = float("nan")
    x = x.to(device)
    args = (kernel, stride, padding, dilation, ceil_mode)
    out = tmg.functional.max_pool1d(x, *args)
    torch.testing.assert_close(out, F.max_pool1d(x, *args), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kernel, stride, padding", [((2, 3), 1, (1, 1)), ((3, 2), (1, 2), (1, 0))], ids=str)
def test_max_pool2d_inference_on_a_one_row_input(kernel, stride, padding, device):
    """A 2-d input of height 1 is not a 1-d pool: padding can give it several output rows."""
    x = torch.randn(2, 3, 1, 9, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        out = tmg.functional.max_pool2d(x, kernel, stride, padding)
    torch.testing.assert_close(out, F.max_pool2d(x, kernel, stride, padding), rtol=0, atol=0)


@given(case=pool_cases(), seed=seeds, values=st.sampled_from(["distinct", "ties"]))
def test_max_unpool_accepts_our_indices(case, seed, values, device):
    x = case.make_input(device, torch.float64, values=values, seed=seed)
    kernel, stride, padding, _ = case.tuples()
    size = x.shape[-case.dim:]
    # F.max_unpool only accepts an output_size within one stride of the size its own formula
    # predicts (which ignores dilation and ceil_mode); other configurations are not unpoolable.
    for n, o, k, s, p in zip(size, case.output_spatial(), kernel, stride, padding):
        default = (o - 1) * s + k - 2 * p
        assume(default - s < n < default + s)
    assume(x.numel() > 0)
    out, idx = case.tmg_fn()(x, **case.kwargs(return_indices=True))
    ref_out, ref_idx = case.torch_fn()(x, **case.kwargs(return_indices=True))
    unpool = F.max_unpool1d if case.dim == 1 else F.max_unpool2d
    ours = unpool(out, idx, kernel, stride, padding, output_size=size)
    theirs = unpool(ref_out, ref_idx, kernel, stride, padding, output_size=size)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # every selected position holds exactly the pooled value
    flat = x.reshape(*x.shape[: -case.dim], -1)
    gathered = torch.gather(flat, -1, idx.reshape(*idx.shape[: -case.dim], -1)).reshape(out.shape)
    torch.testing.assert_close(gathered, out, rtol=0, atol=0)


def test_max_pool_nan_and_ties_handpicked(device):
    """Hand-written windows: ties go to the first maximum, NaN counts as the maximum (both as torch does)."""
    nan = float("nan")
    x = torch.tensor([[[1.0, 3.0, 3.0, 2.0, nan, 5.0, 4.0, 4.0]]], device=device)
    out, idx = tmg.functional.max_pool1d(x, 2, return_indices=True)
    ref_out, ref_idx = F.max_pool1d(x, 2, return_indices=True)
    assert idx.tolist() == [[[1, 2, 4, 6]]]
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, ref_out, equal_nan=True, rtol=0, atol=0)

    x2 = torch.tensor([[[[7.0, 7.0], [7.0, 7.0]], [[nan, 1.0], [nan, 2.0]]]], device=device)
    out2, idx2 = tmg.functional.max_pool2d(x2, 2, return_indices=True)
    ref_out2, ref_idx2 = F.max_pool2d(x2, 2, return_indices=True)
    assert idx2.flatten()[0].item() == 0
    assert torch.equal(idx2, ref_idx2)
    torch.testing.assert_close(out2, ref_out2, equal_nan=True, rtol=0, atol=0)


def test_max_pool_infinities(device, dtype):
    x = torch.tensor([[[-float("inf"), -float("inf"), float("inf"), 1.0, -float("inf"), -1e30]]], device=device, dtype=dtype)
    for kwargs in (dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=2, ceil_mode=True, stride=4)):
        out, idx = tmg.functional.max_pool1d(x, return_indices=True, **kwargs)
        ref_out, ref_idx = F.max_pool1d(x, return_indices=True, **kwargs)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        assert torch.equal(idx, ref_idx), kwargs


@pytest.mark.parametrize(
    "case",
    [
        PoolCase(1, 2, 2, (1,), 2, stride=1, padding=1, dilation=2),
        PoolCase(1, 1, 1, (2,), 2, stride=1, padding=1, dilation=3, ceil_mode=True),
        PoolCase(2, 1, 2, (1, 3), 2, stride=1, padding=1, dilation=2),
    ],
    ids=str,
)
def test_max_pool_window_in_padding(case, device, dtype):
    """Windows whose dilated taps all land in the padding select nothing: the output is -inf (as in torch),
    no input element receives gradient from it, and backward must not fail."""
    assert case.has_empty_window()
    x = case.make_input(device, dtype, values="distinct", requires_grad=True)
    out = case.tmg_fn()(x, **case.kwargs(return_indices=False))
    ref_out = case.torch_fn()(x, **case.kwargs(return_indices=False))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert torch.isneginf(out).all()  # in these configurations every window is empty
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(grad, torch.zeros_like(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "case",
    [
        PoolCase(2, 2, 3, (7, 6), 3, stride=2, padding=1, ceil_mode=True),
        PoolCase(2, 1, 2, (8, 9), (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 3), ceil_mode=True),
        PoolCase(2, None, 2, (5, 5), 2),
        PoolCase(1, None, 3, (11,), 4, stride=3, padding=2, dilation=2, ceil_mode=True),
        PoolCase(1, 2, 2, (5,), 1),  # kernel 1 is the identity
        PoolCase(2, 1, 1, (4, 4), 4),  # one window covers everything
        PoolCase(1, 1, 1, (6,), 2, stride=5, ceil_mode=True),
    ],
    ids=str,
)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("values", ["distinct", "ties", "nan"])
def test_max_pool_edge_cases_match_torch(case, layout, values, device, dtype):
    check_pool_against_torch(case, device, dtype, values, seed=5, layout=layout)
