"""torch.func with our ops: vmap over inputs, over weights and over both; grad; per-sample gradients
(vmap of grad) and jacrev; all against torch.nn.functional. Forward mode (jvp, jacfwd): test_forward_ad.py."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import torch_manualgrad as tmg

TOL = dict(rtol=1e-9, atol=1e-9)


def tensors(device, *shapes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes]


@pytest.mark.parametrize("dims", [(0, None, None), (None, 0, 0), (0, 0, 0), (1, 0, None)])
def test_vmap_conv2d(dims, device):
    x_shape = {0: (4, 2, 3, 7, 6), None: (2, 3, 7, 6), 1: (2, 4, 3, 7, 6)}[dims[0]]
    w_shape = (4, 6, 1, 3, 2) if dims[1] == 0 else (6, 1, 3, 2)
    b_shape = (4, 6) if dims[2] == 0 else (6,)
    x, w, b = tensors(device, x_shape, w_shape, b_shape)
    ours = vmap(lambda x, w, b: tmg.functional.conv2d(x, w, b, (2, 1), 1, (1, 2), 3), in_dims=dims)(x, w, b)
    theirs = vmap(lambda x, w, b: F.conv2d(x, w, b, (2, 1), 1, (1, 2), 3), in_dims=dims)(x, w, b)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_vmap_conv1d_and_max_pools(device):
    (x1,) = tensors(device, (3, 2, 4, 11))
    w1 = tensors(device, (5, 4, 3))[0]
    torch.testing.assert_close(
        vmap(lambda x: tmg.functional.conv1d(x, w1, None, 2, 1))(x1), vmap(lambda x: F.conv1d(x, w1, None, 2, 1))(x1), **TOL
    )
    torch.testing.assert_close(
        vmap(lambda x: tmg.functional.max_pool1d(x, 3, 2, 1, ceil_mode=True))(x1),
        vmap(lambda x: F.max_pool1d(x, 3, 2, 1, ceil_mode=True))(x1), **TOL,
    )
    (x2,) = tensors(device, (3, 2, 4, 9, 8))
    ours = vmap(lambda x: tmg.functional.max_pool2d(x, 3, 2, 1, return_indices=True))(x2)
    theirs = vmap(lambda x: F.max_pool2d(x, 3, 2, 1, return_indices=True))(x2)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    assert torch.equal(ours[1], theirs[1])


def loss(conv, pool):
    def f(w, b, x):
        return pool(torch.tanh(conv(x, w, b, 1, 1)), 2, 2).square().sum()
    return f


def test_grad_and_per_sample_grads(device):
    w, b, x = tensors(device, (4, 3, 3, 3), (4,), (5, 2, 3, 8, 8))
    ours, theirs = loss(tmg.functional.conv2d, tmg.functional.max_pool2d), loss(F.conv2d, F.max_pool2d)
    for a, c in zip(grad(ours, argnums=(0, 1))(w, b, x[0]), grad(theirs, argnums=(0, 1))(w, b, x[0])):
        torch.testing.assert_close(a, c, **TOL)
    per_sample = vmap(grad(ours, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)
    expected = vmap(grad(theirs, argnums=(0, 1)), in_dims=(None, None, 0))(w, b, x)
    for a, c in zip(per_sample, expected):
        assert a.shape[0] == 5
        torch.testing.assert_close(a, c, **TOL)


def test_jacrev(device):
    w, x = tensors(device, (2, 3, 2, 2), (1, 3, 4, 4))
    ours = jacrev(lambda x: tmg.functional.max_pool2d(tmg.functional.conv2d(x, w, None, 1, 1), 2))(x)
    theirs = jacrev(lambda x: F.max_pool2d(F.conv2d(x, w, None, 1, 1), 2))(x)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("argnums", [0, 1, 2, (0, 1, 2)])
def test_grad_of_vmap(argnums, device):
    """vmap inside grad: inside vmap a tensor's requires_grad is False even though the grad outside tracks
    it, so a call that skipped autograd there would give zeros. Every argument in turn, then all."""
    w, b, x = tensors(device, (4, 3, 3, 3), (4,), (5, 2, 3, 8, 8))

    def batched_loss(conv, pool):
        inner = lambda w, b, x: pool(conv(x, w, b, 1, 1).tanh(), 3, 2, 1).pow(2).sum()  # noqa: E731
        return lambda w, b, x: vmap(inner, in_dims=(None, None, 0))(w, b, x).sum()

    ours = grad(batched_loss(tmg.functional.conv2d, tmg.functional.max_pool2d), argnums=argnums)(w, b, x)
    theirs = grad(batched_loss(F.conv2d, F.max_pool2d), argnums=argnums)(w, b, x)
    for a, c in zip(*(r if isinstance(r, tuple) else (r,) for r in (ours, theirs))):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, c, **TOL)
    # and jacrev of a vmapped conv1d + max_pool1d
    (x1,) = tensors(device, (3, 2, 4, 9))
    w1 = tensors(device, (5, 4, 3))[0]
    f = lambda conv, pool: lambda x: vmap(lambda xb: pool(conv(xb, w1), 2))(x)  # noqa: E731
    torch.testing.assert_close(jacrev(f(tmg.functional.conv1d, tmg.functional.max_pool1d))(x1),
                               jacrev(f(F.conv1d, F.max_pool1d))(x1), **TOL)


def test_channels_last_tensors_under_transforms(device):
    """A channels-last weight or input under vmap, jacfwd, vmap of grad, grad of vmap: inside vmap a
    layout can be neither read nor set, and our outputs' layout rule must not try (values as torch's)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64).to(device).contiguous(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    cases = {
        "jacfwd over a channels-last weight": lambda conv, pool: jacfwd(lambda w: conv(x, w))(w),
        "vmap of grad": lambda conv, pool: vmap(grad(lambda xb: conv(xb[None], w).sum()))(x),
        "grad of vmap": lambda conv, pool: grad(lambda x: vmap(lambda xb: conv(xb[None], w))(x).sum())(x),
        "vmap of jvp": lambda conv, pool: vmap(lambda xb: jvp(lambda xb: conv(xb[None], w), (xb,), (xb,))[1])(x),
        "jacfwd of a pool": lambda conv, pool: jacfwd(lambda x: pool(x, (2, 1)))(xc[:, :, :4, :1]),
        "vmap of a pool": lambda conv, pool: vmap(lambda xb: pool(xb, 2))(xc[None]),
    }
    for name, run in cases.items():
        torch.testing.assert_close(run(tmg.functional.conv2d, tmg.functional.max_pool2d), run(F.conv2d, F.max_pool2d),
                                   **TOL, msg=name)


# A vmap over an empty dimension (what jacrev and jacfwd make for an empty output or input): the vmap rules folded
# the vmapped dimension into the batch and read the batch back by division (ZeroDivisionError), and the backward's
# rule, slice by slice, had no slice (IndexError); found by fuzzing. Each result is as a vmap of size 1 over the
# same slice would have it, but with no slices. (torch's own vmap rule for max_pool2d and conv2d loses the inner
# batch there: (0, 0, ...) for (0, 2, ...).)
def test_vmap_over_an_empty_dimension():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(0, 2, 1, 5, 5, generator=g, dtype=torch.float64)
    w, wt = torch.randn(3, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64)
    ws = torch.randn(0, 3, 1, 3, 3, dtype=torch.float64)
    calls = [(lambda a: tmg.functional.max_pool2d(a, 2), (x,)),
             (lambda a: tmg.functional.max_pool2d(a, 2, return_indices=True)[1], (x,)),
             (lambda a: tmg.functional.conv2d(a, w), (x,)),
             (lambda a, b: tmg.functional.conv2d(a, b), (x, ws)),
             (lambda a: tmg.functional.conv_transpose2d(a, wt, stride=2), (x,))]
    for fn, args in calls:
        one = vmap(fn)(*(torch.zeros(1, *a.shape[1:], dtype=a.dtype) for a in args))
        none = vmap(fn)(*args)
        assert none.shape == (0, *one.shape[1:]) and none.dtype == one.dtype


@pytest.mark.parametrize("name", ["max_pool2d", "conv2d", "conv_transpose2d"])
def test_jacobians_of_an_empty_batch_match_torch(name):
    g = torch.Generator().manual_seed(1)
    xe = torch.randn(0, 1, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64)
    extra = {"max_pool2d": (2,), "conv2d": (w.transpose(0, 1),), "conv_transpose2d": (w,)}[name]
    for transform in (jacrev, jacfwd):
        theirs = transform(lambda a: getattr(F, name)(a, *extra))(xe)
        ours = transform(lambda a: getattr(tmg.functional, name)(a, *extra))(xe)
        assert ours.shape == theirs.shape
    ours = jacfwd(jacrev(lambda a: (tmg.functional.max_pool2d(a, 2) ** 3).sum()))(xe)
    assert ours.shape == (0, 1, 5, 5, 0, 1, 5, 5)
    # and the weight's Jacobian, through the backward's rule (torch's own raises here: "expected weight to be at
    # least 1 at dimension 0, but got weight of size [0, 1, 3, 3]")
    ours = jacrev(lambda v: tmg.functional.conv2d(xe, v))(w.transpose(0, 1))
    assert ours.shape == (0, 3, 3, 3, 3, 1, 3, 3)
