"""Forward-mode AD through our Functions (their jvp): tangents against torch.nn.functional's through
torch.func.jvp and torch.autograd.forward_ad, gradcheck with forward- and reverse-mode checks in float64
over the sample matrix, the backward Functions' tangents (jvp of a gradient), jacfwd against jacrev,
vmap of jvp, forward-over-reverse Hessian-vector products, and a converted model under jvp."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import torch_manualgrad as tmg
from torch_manualgrad.autograd import ConvBackwardFunction, MaxPoolBackwardFunction, MaxPoolFunction
from common import conv_samples, ntuple, pool_samples, pool_values_tensor, make_generator

ops = torch.ops.manualgrad
CONV_CASES = conv_samples()
POOL_CASES = pool_samples()
TOL = dict(rtol=1e-9, atol=1e-9)


def conv_fn(case, module):
    fn = (module.conv1d if case.dim == 1 else module.conv2d)
    kwargs = case.kwargs()
    return lambda x, w, b=None: fn(x, w, b, **kwargs)


def pool_fn(case, module):
    fn = (module.max_pool1d if case.dim == 1 else module.max_pool2d)
    kwargs = case.kwargs(return_indices=False)
    return lambda x: fn(x, **kwargs)


def tangents_like(tensors, seed=2):
    gen = make_generator(seed)
    return tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for t in tensors)


def forward_ad_tangent(fn, primals, tangents):
    with forward_ad.dual_level():
        out = fn(*(forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)))
        return forward_ad.unpack_dual(out).tangent


# --- tangents against torch's -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize("case", CONV_CASES[::2], ids=str)
def test_conv_tangent_matches_torch(case, mode, device):
    """tangent = conv(dx, w) + conv(x, dw) + db, for every argument moving at once."""
    x, w, b = case.make_tensors(device, torch.float64)
    primals = (x, w) if b is None else (x, w, b)
    tangents = tangents_like(primals)
    ours, theirs = conv_fn(case, tmg.functional), conv_fn(case, F)
    if mode == "func.jvp":
        out, tangent = jvp(ours, primals, tangents)
        expected_out, expected = jvp(theirs, primals, tangents)
        torch.testing.assert_close(out, expected_out, **TOL)
    else:
        tangent = forward_ad_tangent(ours, primals, tangents)
        expected = forward_ad_tangent(theirs, primals, tangents)
    assert tangent is not None and tangent.shape == case.output_shape
    torch.testing.assert_close(tangent, expected, **TOL)


@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize("case", POOL_CASES[::2], ids=str)
def test_max_pool_tangent_matches_torch(case, mode, device):
    """The input's tangent read at each argmax; with ties the argmax is torch's (the first maximum), so
    the tangents agree exactly."""
    x = case.make_input(device, torch.float64, values="ties")
    (t,) = tangents_like((x,))
    ours, theirs = pool_fn(case, tmg.functional), pool_fn(case, F)
    if mode == "func.jvp":
        tangent, expected = jvp(ours, (x,), (t,))[1], jvp(theirs, (x,), (t,))[1]
    else:
        tangent, expected = forward_ad_tangent(ours, (x,), (t,)), forward_ad_tangent(theirs, (x,), (t,))
    torch.testing.assert_close(tangent, expected, rtol=0, atol=0)


def test_tangents_of_only_some_arguments(device):
    """An argument without a tangent contributes nothing (and no work)."""
    case = next(c for c in CONV_CASES if c.bias and c.batch and c.dim == 2 and c.groups > 1)
    x, w, b = case.make_tensors(device, torch.float64)
    tx, tw, tb = tangents_like((x, w, b))
    ours, theirs = conv_fn(case, tmg.functional), conv_fn(case, F)
    for moving in ((0,), (1,), (2,), (0, 2), (1, 2)):
        def partial(fn):
            def f(*moved):
                args = [x, w, b]
                for i, m in zip(moving, moved):
                    args[i] = m
                return fn(*args)
            return f
        primals = tuple((x, w, b)[i] for i in moving)
        tangents = tuple((tx, tw, tb)[i] for i in moving)
        torch.testing.assert_close(jvp(partial(ours), primals, tangents)[1], jvp(partial(theirs), primals, tangents)[1], **TOL)


def test_window_without_argmax_has_zero_tangent(device):
    """A window whose taps all fall in the padding has index -1: its output is -inf and stays so, so its
    tangent is 0 (torch reads the tangent at an index outside the window there)."""
    x = torch.randn(1, 2, 1, dtype=torch.float64, device=device)  # length 1, kernel 2, padding 1, dilation 2
    t = torch.randn_like(x)
    out, tangent = jvp(lambda x: tmg.functional.max_pool1d(x, 2, 1, 1, 2), (x,), (t,))
    assert torch.isneginf(out).all()
    assert torch.equal(tangent, torch.zeros_like(out))
    x2 = torch.randn(2, 3, 2, 2, dtype=torch.float64, device=device)  # README's 2-d example
    (t2,) = tangents_like((x2,))
    out2, idx2 = ops.max_pool_forward(x2, [2, 2], [3, 3], [1, 1], [1, 3], False)
    tangent2 = jvp(lambda x: tmg.functional.max_pool2d(x, 2, 3, 1, (1, 3)), (x2,), (t2,))[1]
    assert (idx2 == -1).all() and torch.equal(tangent2, torch.zeros_like(out2))
    # and the tangent of the backward on those indices is 0 too
    go = torch.randn_like(out2)
    d_grad = jvp(lambda g: MaxPoolBackwardFunction.apply(g, idx2, list(x2.shape), [2, 2], [3, 3], [1, 1], [1, 3], True),
                 (go,), (torch.ones_like(go),))[1]
    assert torch.equal(d_grad, torch.zeros_like(x2))


def test_max_pool_without_indices_still_has_a_tangent(device):
    """MaxPoolFunction called with compute_indices=False (as the op may be) finds the argmax again."""
    case = next(c for c in POOL_CASES if c.dim == 2 and c.ceil_mode and c.batch)
    x = case.make_input(device, torch.float64, values="distinct")
    (t,) = tangents_like((x,))
    geometry = [list(v) for v in case.tuples()]
    with_indices = jvp(lambda x: MaxPoolFunction.apply(x, *geometry, case.ceil_mode, True)[0], (x,), (t,))[1]
    without = jvp(lambda x: MaxPoolFunction.apply(x, *geometry, case.ceil_mode, False)[0], (x,), (t,))[1]
    torch.testing.assert_close(without, with_indices, rtol=0, atol=0)


# --- gradcheck with forward-mode checks -------------------------------------------------------------
# check_batched_grad/check_batched_forward_grad run our backward and jvp under vmap (the ops' vmap rules).
# fast_mode compares random projections of the Jacobians instead of every column: enough to catch a wrong
# formula, and several times faster over the whole matrix (test_gradcheck.py checks the reverse-mode
# Jacobians column by column; the tangent tests above compare tangents with torch's element by element).


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_gradcheck_forward_and_backward_mode(case, device):
    x, w, b = case.make_tensors(device, torch.float64, requires_grad=True)
    inputs = (x, w) if b is None else (x, w, b)
    batched = case.batch != 0  # vmap over an empty batch has nothing to compare
    assert torch.autograd.gradcheck(conv_fn(case, tmg.functional), inputs, check_forward_ad=True, check_backward_ad=True,
                                    check_batched_grad=batched, check_batched_forward_grad=batched, fast_mode=True)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_gradcheck_forward_and_backward_mode(case, device):
    x = case.make_input(device, torch.float64, values="distinct", requires_grad=True)
    batched = case.batch != 0
    assert torch.autograd.gradcheck(pool_fn(case, tmg.functional), (x,), check_forward_ad=True, check_backward_ad=True,
                                    check_batched_grad=batched, check_batched_forward_grad=batched, fast_mode=True)


@pytest.mark.parametrize("case", [c for c in CONV_CASES if c.batch != 0][::3], ids=str)
def test_conv_gradgradcheck_forward_over_reverse(case, device):
    x, w, b = case.make_tensors(device, torch.float64, requires_grad=True)
    inputs = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradgradcheck(conv_fn(case, tmg.functional), inputs, check_fwd_over_rev=True,
                                        check_rev_over_rev=True, fast_mode=True)


@pytest.mark.parametrize("case", [c for c in POOL_CASES if c.batch != 0][::3], ids=str)
def test_max_pool_gradgradcheck_forward_over_reverse(case, device):
    x = case.make_input(device, torch.float64, values="distinct", requires_grad=True)
    assert torch.autograd.gradgradcheck(pool_fn(case, tmg.functional), (x,), check_fwd_over_rev=True,
                                        check_rev_over_rev=True, fast_mode=True)


# --- the backward Functions' tangents (jvp of a gradient) --------------------------------------------


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, False], [False, False, True],
                                  [True, True, False]], ids=str)
@pytest.mark.parametrize("case", [c for c in CONV_CASES if c.batch in (1, 2) and c.symmetric_padding()][::4], ids=str)
def test_conv_backward_function_forward_mode(case, mask, device):
    """conv_backward is bilinear: in grad_output and the weight (grad_input), in grad_output and the input
    (grad_weight), and linear in grad_output (grad_bias)."""
    x, w, _ = case.make_tensors(device, torch.float64, requires_grad=True)
    go = case.make_grad_output(device, torch.float64).requires_grad_()
    geometry = (list(ntuple(case.stride, case.dim)), list(case.symmetric_padding()),
                list(ntuple(case.dilation, case.dim)), case.groups)

    def backward(go, x, w):
        return tuple(g for g in ConvBackwardFunction.apply(go, x, w, *geometry, mask) if g is not None)

    # fast_mode: the Jacobian of three outputs by three inputs column by column takes tens of seconds
    assert torch.autograd.gradcheck(backward, (go, x, w), check_forward_ad=True, check_backward_ad=True,
                                    check_batched_grad=True, check_batched_forward_grad=True, fast_mode=True)


@pytest.mark.parametrize("case", [c for c in POOL_CASES if c.batch][::4], ids=str)
def test_max_pool_backward_function_forward_mode(case, device):
    x = case.make_input(device, torch.float64, values="distinct")
    geometry = [list(v) for v in case.tuples()]
    _, indices = ops.max_pool_forward(x, *geometry, case.ceil_mode)
    go = case.make_grad_output(device, torch.float64).requires_grad_()
    backward = lambda go: MaxPoolBackwardFunction.apply(go, indices, list(x.shape), *geometry, True)  # noqa: E731
    assert torch.autograd.gradcheck(backward, (go,), check_forward_ad=True, check_backward_ad=True,
                                    check_batched_grad=True, check_batched_forward_grad=True)


# --- torch.func: jacfwd, vmap of jvp, forward-over-reverse --------------------------------------------


def small_net(conv2d, max_pool2d):
    def f(w1, b1, w2, x):
        y = max_pool2d(torch.tanh(conv2d(x, w1, b1, 1, 1)), 3, 2, 1, ceil_mode=True)
        return torch.tanh(conv2d(y, w2, None, 2, 0, (1, 2), 2)).square().sum()
    return f


def net_arguments(device, batch=2):
    gen = make_generator(3)
    shapes = [(4, 3, 3, 3), (4,), (2, 2, 2, 2), (batch, 3, 9, 8)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]


def test_jacfwd_matches_jacrev_and_torch(device):
    w, x = [torch.randn(s, dtype=torch.float64, generator=make_generator(4)).to(device) for s in ((3, 2, 2, 2), (1, 2, 5, 5))]
    ours = lambda x: tmg.functional.max_pool2d(tmg.functional.conv2d(x, w, None, 1, 1), 2, 1, 1)  # noqa: E731
    theirs = lambda x: F.max_pool2d(F.conv2d(x, w, None, 1, 1), 2, 1, 1)  # noqa: E731
    forward = jacfwd(ours)(x)
    torch.testing.assert_close(forward, jacrev(ours)(x), **TOL)
    torch.testing.assert_close(forward, jacfwd(theirs)(x), **TOL)
    wrt_weight = jacfwd(lambda w: tmg.functional.conv1d(x[0, :, 0], w[:, :, 0], None, 1, 1))(w)
    torch.testing.assert_close(wrt_weight, jacrev(lambda w: F.conv1d(x[0, :, 0], w[:, :, 0], None, 1, 1))(w), **TOL)


def test_vmap_of_jvp(device):
    """Many tangents at once (vmap over the tangents), and many primals (vmap over both)."""
    w1, b1, w2, x = net_arguments(device, batch=1)
    f, g = small_net(tmg.functional.conv2d, tmg.functional.max_pool2d), small_net(F.conv2d, F.max_pool2d)
    tangents = torch.randn(5, *w1.shape, dtype=torch.float64, device=device)

    def along(fn):
        return lambda t: jvp(lambda w: fn(w, b1, w2, x), (w1,), (t,))[1]

    torch.testing.assert_close(vmap(along(f))(tangents), vmap(along(g))(tangents), **TOL)
    xs = torch.randn(4, 1, 3, 9, 8, dtype=torch.float64, device=device)
    txs = torch.randn_like(xs)

    def per_sample(fn):
        return lambda x, t: jvp(lambda x: fn(w1, b1, w2, x), (x,), (t,))[1]

    torch.testing.assert_close(vmap(per_sample(f))(xs, txs), vmap(per_sample(g))(xs, txs), **TOL)


@pytest.mark.parametrize("order", ["forward-over-reverse", "reverse-over-forward"])
def test_hessian_vector_product_matches_torch(order, device):
    """H·v of a loss through our conv and max-pool, both argument positions, against torch.nn.functional's:
    jvp of grad (forward-over-reverse) and grad of jvp (reverse-over-forward)."""
    args = net_arguments(device)
    vectors = tangents_like(args, seed=5)
    f, g = small_net(tmg.functional.conv2d, tmg.functional.max_pool2d), small_net(F.conv2d, F.max_pool2d)
    argnums = (0, 1, 2, 3)

    def hvp(fn):
        if order == "forward-over-reverse":
            return jvp(grad(fn, argnums=argnums), tuple(args), vectors)[1]
        return grad(lambda *a: jvp(fn, a, vectors)[1], argnums=argnums)(*args)

    for ours, theirs in zip(hvp(f), hvp(g)):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_forward_over_reverse_with_forward_ad_and_autograd_grad(device):
    """The same product through torch.autograd: a dual input, then torch.autograd.grad (no create_graph)."""
    w1, b1, w2, x = net_arguments(device)
    v = torch.randn_like(w1)
    f, g = small_net(tmg.functional.conv2d, tmg.functional.max_pool2d), small_net(F.conv2d, F.max_pool2d)

    def hvp(fn):
        with forward_ad.dual_level():
            w = forward_ad.make_dual(w1.clone().requires_grad_(), v)
            (gw,) = torch.autograd.grad(fn(w, b1, w2, x), w)
            return forward_ad.unpack_dual(gw).tangent

    torch.testing.assert_close(hvp(f), hvp(g), **TOL)


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 4, 2, padding="same"), torch.nn.Tanh(),
        torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3),
    ).double()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
def test_converted_model_under_jvp(memory_format, device):
    """A converted model pushes tangents of its input and of its parameters (torch.func.functional_call)."""
    torch.manual_seed(0)
    theirs = cnn().to(device)
    ours = tmg.convert(copy.deepcopy(theirs))
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, device=device).contiguous(memory_format=memory_format)
    (t,) = tangents_like((x,))
    torch.testing.assert_close(jvp(ours, (x,), (t,))[1], jvp(theirs, (x,), (t,))[1], **TOL)
    params = dict(theirs.named_parameters())
    directions = dict(zip(params, tangents_like(list(params.values()), seed=6)))

    def along(model):
        return jvp(lambda p: torch.func.functional_call(model, p, (x,)), (params,), (directions,))[1]

    torch.testing.assert_close(along(ours), along(theirs), **TOL)


def test_tangent_in_unbatched_and_1d_calls(device):
    x = pool_values_tensor((3, 11), device, torch.float64, make_generator(7))
    w = torch.randn(2, 3, 3, dtype=torch.float64, device=device)
    tx, tw = tangents_like((x, w))
    for ours, theirs in (
        (lambda x, w: tmg.functional.max_pool1d(tmg.functional.conv1d(x, w, None, 1, 2, 2), 3, 2, 1, 2, True),
         lambda x, w: F.max_pool1d(F.conv1d(x, w, None, 1, 2, 2), 3, 2, 1, 2, True)),
        (lambda x, w: tmg.functional.max_pool2d(x[None], 2, 1), lambda x, w: F.max_pool2d(x[None], 2, 1)),
    ):
        torch.testing.assert_close(jvp(ours, (x, w), (tx, tw))[1], jvp(theirs, (x, w), (tx, tw))[1], **TOL)


def test_forward_mode_over_vmap(device):
    """jvp of a vmapped call (and so hessian, jacfwd of jacrev): torch.func's generated vmap rule lines up each
    argument's tangent with its in_dims flattened as a pytree, which list arguments (stride, padding, ...)
    threw off; this crashed (torch 2.13)."""
    gen = make_generator(8)
    x, w = (torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in ((3, 1, 2, 5, 5), (2, 2, 3, 3)))
    (t,) = tangents_like((x,))
    for ours, theirs in (
        (lambda x: tmg.functional.conv2d(x, w, None, 1, 1), lambda x: F.conv2d(x, w, None, 1, 1)),
        (lambda x: tmg.functional.conv1d(x[:, :, 0], w[..., 0]), lambda x: F.conv1d(x[:, :, 0], w[..., 0])),
        (lambda x: tmg.functional.max_pool2d(x, 2, 1, 1, ceil_mode=True), lambda x: F.max_pool2d(x, 2, 1, 1, ceil_mode=True)),
        (lambda x: tmg.functional.max_pool1d(x[:, :, 0], 3), lambda x: F.max_pool1d(x[:, :, 0], 3)),
    ):
        torch.testing.assert_close(jvp(vmap(ours), (x,), (t,)), jvp(vmap(theirs), (x,), (t,)), **TOL)
    loss = lambda conv2d: lambda w: conv2d(x[0], w, None, 1, 1).tanh().sum()  # noqa: E731
    torch.testing.assert_close(torch.func.hessian(loss(tmg.functional.conv2d))(w), torch.func.hessian(loss(F.conv2d))(w), **TOL)


def test_nested_forward_mode_is_refused_not_wrong(device):
    """jvp of jvp (and jacfwd of jacfwd) would lose the outer tangent inside any Function's jvp, giving
    zeros where torch gives 2·t1·t2 at the argmax: it raises instead. One forward level over reverse mode
    (jvp of grad, hessian = jacfwd of jacrev) still matches torch."""
    gen = torch.Generator().manual_seed(3)
    x, t1, t2 = (torch.randn(1, 2, 4, 6, generator=gen, dtype=torch.float64).to(device) for _ in range(3))
    w = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64).to(device)
    pool = lambda f: lambda x: f(x * x, (1, 2))  # noqa: E731
    conv = lambda f: lambda x: f(x * x, w)  # noqa: E731
    for make in (pool, conv):
        ours = make(tmg.functional.max_pool2d if make is pool else tmg.functional.conv2d)
        with pytest.raises(RuntimeError, match="forward-mode AD nested inside forward-mode AD"):
            jvp(lambda x: jvp(ours, (x,), (t1,))[1], (x,), (t2,))
        with pytest.raises(RuntimeError, match="forward-mode AD nested inside forward-mode AD"):
            torch.func.jacfwd(torch.func.jacfwd(lambda x: ours(x).sum()))(x[..., :2])
    f_ours = lambda x: tmg.functional.max_pool2d(tmg.functional.conv2d(x * x, w), (1, 2)).sum()  # noqa: E731
    f_torch = lambda x: F.max_pool2d(F.conv2d(x * x, w), (1, 2)).sum()  # noqa: E731
    torch.testing.assert_close(jvp(torch.func.grad(f_ours), (x,), (t1,))[1],
                               jvp(torch.func.grad(f_torch), (x,), (t1,))[1])
    torch.testing.assert_close(torch.func.hessian(f_ours)(x), torch.func.hessian(f_torch)(x))


# --- batched gradients of channels-last inputs --------------------------------------------------------
# autograd.grad(is_grads_batched=True) and gradcheck(check_batched_grad=True) run the backward under a vmap
# whose batched tensors cannot be asked their layout: laying the gradient out channels-last there raised
# "NYI: querying is_contiguous inside of vmap" (found by fuzzing).

def _channels_last_calls():
    g = torch.Generator().manual_seed(3)

    def cl(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return t.contiguous(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)

    w2, w3, wt = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4, 3, 3, 3), (4, 3, 2, 2, 2), (3, 2, 3, 3)))
    w1 = torch.randn(4, 3, 3, generator=g, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
    return [
        ("conv1d", lambda f, x: f.conv1d(x, w1, None, 1, 1), torch.randn(2, 3, 7, generator=g, dtype=torch.float64)),
        ("conv2d", lambda f, x: f.conv2d(x, w2, None, 2, 1), cl(2, 3, 6, 5)),
        ("conv3d", lambda f, x: f.conv3d(x, w3, None, 1, 0), cl(2, 3, 4, 3, 3)),
        ("conv_transpose2d", lambda f, x: f.conv_transpose2d(x, wt, None, 2, 1), cl(2, 3, 4, 4)),
        ("max_pool2d", lambda f, x: f.max_pool2d(x, 3, 2, 1), cl(2, 3, 7, 6)),
        ("max_pool3d", lambda f, x: f.max_pool3d(x, 2), cl(2, 3, 4, 4, 4)),
    ]


@pytest.mark.parametrize("call", _channels_last_calls(), ids=lambda c: c[0])
def test_batched_gradients_of_channels_last_inputs_match_torch(call):
    _, fn, x0 = call
    grads = []
    for f in (F, tmg.functional):
        x = x0.clone().requires_grad_()
        y = fn(f, x)
        v = torch.randn(4, *y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
        (g,) = torch.autograd.grad(y, x, v, is_grads_batched=True)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    x = x0.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(tmg.functional, t), (x,), check_batched_grad=True, fast_mode=True)
