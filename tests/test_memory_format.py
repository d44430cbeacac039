"""Output layouts: our conv and max-pool results have torch's strides (channels-last by torch's
suggest_memory_format rule) for many input and weight layouts, with torch's values. Leaf gradients (.grad,
laid out by autograd's AccumulateGrad) are in torch's memory format too; where a dimension of size 1
makes both formats apply, their strides may differ on that dimension alone, as the ops return their
gradients contiguous where torch's backward returns them channels-last."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg
from torch_manualgrad.functional import _suggests_channels_last

tf = tmg.functional
CL = torch.channels_last


def layouts_4d(shape):
    """(name, tensor) for one 4-d shape in many layouts: contiguous, channels-last, a channel slice of a
    channels-last tensor, H and W swapped, NHWC permuted, N and C swapped, expanded channels."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    yield "contiguous", base
    yield "channels_last", base.contiguous(memory_format=CL)
    yield "channel_slice_of_channels_last", torch.randn(n, 2 * c, h, w, generator=g).double().contiguous(memory_format=CL)[:, ::2]
    yield "h_w_transposed", base.transpose(2, 3).contiguous().transpose(2, 3)
    yield "nhwc_permuted", base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    yield "n_c_transposed", base.transpose(0, 1).contiguous().transpose(0, 1)
    yield "expanded_channels", base[:, :1].expand(n, c, h, w)


SHAPES = [(2, 3, 6, 7), (2, 1, 6, 6), (1, 4, 5, 5), (3, 2, 1, 1), (2, 3, 1, 6)]


def test_fake_kernel_never_guesses_a_layout_for_an_unknown_batch():
    """A batch size with no value yet (data-dependent, under torch.compile) cannot tell whether the channels-last
    rule's tie-breaks apply. The fake kernel must then either raise or give the strides the real kernel gives,
    never contiguous strides for a channels-last result (Inductor trusts a custom op's fake strides)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    op = torch.ops.manualgrad.conv_forward
    args = (None, [1, 1], [0, 0], [1, 1], 1)
    eager = op(torch.randn(4, 8, 8, 3).permute(0, 3, 1, 2), torch.randn(5, 3, 3, 3), *args)
    assert eager.stride()[1] == 1
    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):
        batch = env.create_unbacked_symint()
        torch._check(batch >= 0)
        x = torch.empty(batch, 8, 8, 3).permute(0, 3, 1, 2)
        try:
            fake = op(x, torch.empty(5, 3, 3, 3), *args)
        except RuntimeError:  # GuardOnDataDependentSymNode: torch.compile then asks for a hint or breaks the graph
            return
        assert fake.stride()[1:] == eager.stride()[1:]


def test_suggest_rule_is_torchs():
    """Our Python reading of ATen's suggest_memory_format against torch's own Python one."""
    prims = pytest.importorskip("torch._prims_common")
    for shape in SHAPES + [(1, 1, 1, 1), (4, 1, 1, 1), (1, 3, 1, 1), (2, 0, 3, 3)]:
        for name, t in layouts_4d(shape) if 0 not in shape else [("empty", torch.empty(shape))]:
            expected = prims.suggest_memory_format(t) == torch.channels_last
            assert _suggests_channels_last(t) == expected, (shape, name, t.stride())
    for sizes in itertools.product([1, 2, 3], repeat=4):  # every permutation of the strides of small shapes
        base = torch.empty(sizes)
        for order in itertools.permutations(range(4)):
            t = base.permute(order).contiguous().permute([order.index(i) for i in range(4)])
            assert _suggests_channels_last(t) == (prims.suggest_memory_format(t) == torch.channels_last), (sizes, order)


def test_suggest_rule_is_torchs_in_5d():
    """The same reading for 5-d tensors, against channels_last_3d: every order of the strides of small shapes."""
    prims = pytest.importorskip("torch._prims_common")
    shapes = list(itertools.product([1, 2], repeat=5)) + [(2, 3, 1, 2, 3), (3, 2, 2, 3, 1), (1, 3, 2, 2, 2)]
    for sizes in shapes:
        base = torch.empty(sizes)
        for order in itertools.permutations(range(5)):
            t = base.permute(order).contiguous().permute([order.index(i) for i in range(5)])
            expected = prims.suggest_memory_format(t) == torch.channels_last_3d
            assert _suggests_channels_last(t) == expected, (sizes, order)
    assert not _suggests_channels_last(torch.empty(2, 0, 3, 3, 3).contiguous(memory_format=torch.channels_last_3d))


def same_format(a, b):
    """The same memory format: both or neither contiguous, both or neither channels-last."""
    formats = [torch.contiguous_format] + ([CL] if a.dim() == 4 else [])
    return all(a.is_contiguous(memory_format=f) == b.is_contiguous(memory_format=f) for f in formats)


def _check_conv(x, w, dims, **kwargs):
    conv_ours, conv_theirs = getattr(tf, f"conv{dims}d"), getattr(F, f"conv{dims}d")
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    w1, w2 = w.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    x1.data = x.detach()  # keep the tested strides (clone() may not)
    x2.data = x.detach()
    w1.data, w2.data = w.detach(), w.detach()
    ours, theirs = conv_ours(x1, w1, **kwargs), conv_theirs(x2, w2, **kwargs)
    assert ours.stride() == theirs.stride(), (x.stride(), w.stride())
    torch.testing.assert_close(ours, theirs)
    grad = torch.ones_like(theirs)
    ours.backward(grad)
    theirs.backward(grad)
    for ours_grad, theirs_grad in ((x1.grad, x2.grad), (w1.grad, w2.grad)):
        assert same_format(ours_grad, theirs_grad), (ours_grad.stride(), theirs_grad.stride())
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_conv2d_output_layout_follows_input_and_weight(shape):
    c = shape[1]
    for (x_name, x), (w_name, w) in itertools.product(layouts_4d(shape), layouts_4d((4, c, 1, 1) if shape[2] == 1 else (4, c, 2, 1))):
        _check_conv(x, w, 2)
    # torch's test_conv_thnn_nhwc: one input channel, a channels-last weight, a channels-last output
    x = torch.randn(2, 1, 10, 10, dtype=torch.float64)
    _check_conv(x, torch.randn(8, 1, 3, 3, dtype=torch.float64).contiguous(memory_format=CL), 2)
    # depthwise and unbatched
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).contiguous(memory_format=CL)
    _check_conv(x, torch.randn(6, 1, 3, 3, dtype=torch.float64), 2, groups=3)
    _check_conv(torch.randn(3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=CL), 2)


def test_conv1d_output_layout_follows_the_weight():
    """torch makes a 1-d input contiguous before convolving, so only the weight decides."""
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    for x_layout in (x, x.transpose(1, 2).contiguous().transpose(1, 2), x.permute(2, 1, 0).contiguous().permute(2, 1, 0)):
        for w in (torch.randn(4, 3, 3, dtype=torch.float64), torch.randn(4, 3, 3, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)):
            _check_conv(x_layout, w, 1)


@pytest.mark.parametrize("transposed", [False, True], ids=["conv1d", "conv_transpose1d"])
def test_conv1d_input_that_is_contiguous_through_a_size_of_1_keeps_its_strides(transposed):
    """...but contiguous() keeps the strides of an input that counts as contiguous through a length or a channel
    count of 1, and torch's kernel then reads those as the 4-d tensor of height 1 they are: a (N, 1, L) input
    with channel stride 1 gives a channels-last-strided output."""
    conv_ours, conv_theirs = (tf.conv_transpose1d, F.conv_transpose1d) if transposed else (tf.conv1d, F.conv1d)
    cases = [
        (torch.randn(3, 5, 1, dtype=torch.float64).transpose(1, 2), 1, 3),  # one channel, channel stride 1
        (torch.randn(2, 1, 4, dtype=torch.float64).transpose(1, 2), 4, 3),  # length 1, channels side by side
        (torch.randn(2, 1, 4, dtype=torch.float64).transpose(1, 2), 4, 1),
        (torch.randn(3, 1, 5, dtype=torch.float64), 1, 3),  # plainly contiguous: contiguous results
    ]
    for x, c_in, c_out in cases:
        w = torch.randn(c_in, c_out, 2, dtype=torch.float64) if transposed else torch.randn(c_out, c_in, 2, dtype=torch.float64)
        assert x.is_contiguous()
        padding = 0 if transposed else 1
        ours, theirs = conv_ours(x, w, padding=padding), conv_theirs(x, w, padding=padding)
        assert ours.stride() == theirs.stride(), (x.stride(), theirs.stride())
        torch.testing.assert_close(ours, theirs)


def test_conv_output_layout_empty_input():
    x, w = torch.randn(0, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=CL)
    assert tf.conv2d(x, w).stride() == F.conv2d(x, w).stride()


@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 2, 2)], ids=str)
@pytest.mark.parametrize("return_indices", [False, True])
def test_max_pool_output_layout_follows_input(shape, return_indices):
    kernel = (min(2, shape[2]), min(2, shape[3]))
    for name, x in layouts_4d(shape):
        ours = tf.max_pool2d(x, kernel, return_indices=return_indices)
        theirs = F.max_pool2d(x, kernel, return_indices=return_indices)
        for o, t in zip(ours if return_indices else [ours], theirs if return_indices else [theirs]):
            assert o.stride() == t.stride(), (name, x.stride())
            torch.testing.assert_close(o, t)
    x = torch.randn(3, 6, 6, dtype=torch.float64).permute(1, 2, 0).contiguous().permute(2, 0, 1)  # unbatched
    assert tf.max_pool2d(x, 2).stride() == F.max_pool2d(x, 2).stride()


def test_max_pool1d_output_layout():
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    for layout in (x, x.transpose(1, 2).contiguous().transpose(1, 2), x.permute(2, 1, 0).contiguous().permute(2, 1, 0), x[0].t().contiguous().t()):
        for return_indices, grad in ((False, False), (True, False), (False, True)):  # torch's two CPU paths
            layout = layout.detach().requires_grad_(grad)
            ours = tf.max_pool1d(layout, 2, return_indices=return_indices)
            theirs = F.max_pool1d(layout, 2, return_indices=return_indices)
            for o, t in zip(ours if return_indices else [ours], theirs if return_indices else [theirs]):
                assert o.stride() == t.stride(), layout.stride()
                torch.testing.assert_close(o, t)
            if grad:  # and the gradient handed back, laid out as torch's 2-d backward lays it out
                ours, theirs = (torch.autograd.grad(out.sum(), layout)[0] for out in (ours, theirs))
                assert ours.stride() == theirs.stride(), layout.stride()


def test_unbatched_max_pool1d_of_length_1_with_channel_stride_1_is_contiguous():
    """An unbatched (C, 1) input with channel stride 1 counts as contiguous; torch pools it as an unbatched 2-d
    input, whose results are never channels-last, where the batched (N, C, 1) one gives channels-last ones."""
    for c, kernel, padding in ((3, 2, 1), (24, 4, 2), (24, 1, 0)):
        x = torch.randn(1, c, dtype=torch.float64).t()
        for return_indices, grad in ((False, False), (True, False), (False, True)):
            x = x.detach().requires_grad_(grad)
            ours = tf.max_pool1d(x, kernel, 1, padding, return_indices=return_indices)
            theirs = F.max_pool1d(x, kernel, 1, padding, return_indices=return_indices)
            for o, t in zip(ours if return_indices else [ours], theirs if return_indices else [theirs]):
                assert o.stride() == t.stride(), (c, kernel, return_indices, grad)
                torch.testing.assert_close(o, t)
        xb = x.detach().unsqueeze(0)  # batched: channels-last, torch's and ours
        ours, theirs = tf.max_pool1d(xb, kernel, 1, padding, return_indices=True), F.max_pool1d(xb, kernel, 1, padding, return_indices=True)
        assert ours[0].stride() == theirs[0].stride() and ours[1].stride() == theirs[1].stride()


def test_max_pool_leaf_gradient_layouts():
    for name, x in layouts_4d((2, 4, 6, 6)):
        x1, x2 = x.detach().requires_grad_(), x.detach().clone().requires_grad_()
        x2.data = x.detach()
        tf.max_pool2d(x1, 2).sum().backward()
        F.max_pool2d(x2, 2).sum().backward()
        assert same_format(x1.grad, x2.grad), name
        torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("x_layout,w_layout", [("cl", "contiguous"), ("contiguous", "cl"), ("cl", "cl")])
def test_gradients_passed_on_have_torchs_memory_format(x_layout, w_layout):
    """The gradients handed to the layer before (torch.autograd.grad, no AccumulateGrad to fix them up) are
    channels-last where torch's are: a channels-last network's batch-norm and activation backward take
    slow paths when their incoming gradient's layout differs from their saved input's."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 9, 9, generator=g, dtype=torch.float64)
    w = torch.randn(8, 6, 3, 3, generator=g, dtype=torch.float64)
    if x_layout == "cl":
        x = x.contiguous(memory_format=CL)
    if w_layout == "cl":
        w = w.contiguous(memory_format=CL)
    x.requires_grad_(), w.requires_grad_()
    ours = torch.autograd.grad(tf.conv2d(x, w, padding=1).sum(), [x, w])
    theirs = torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), [x, w])
    for o, t in zip(ours, theirs):
        assert o.is_contiguous(memory_format=CL) == t.is_contiguous(memory_format=CL)
        assert o.is_contiguous() == t.is_contiguous()
        torch.testing.assert_close(o, t)
    xp = x.detach().requires_grad_()
    (ours,) = torch.autograd.grad(tf.max_pool2d(xp, 3, 2).sum(), [xp])
    (theirs,) = torch.autograd.grad(F.max_pool2d(xp, 3, 2).sum(), [xp])
    assert ours.is_contiguous(memory_format=CL) == theirs.is_contiguous(memory_format=CL)
    torch.testing.assert_close(ours, theirs)


_CL = {2: torch.channels_last, 3: torch.channels_last_3d}


@pytest.mark.parametrize("dims", (1, 2, 3))
@pytest.mark.parametrize("transposed", (False, True))
@pytest.mark.parametrize("batch", (0, 2))
@pytest.mark.parametrize("grad_layout", ("contiguous", "channels_last"))
def test_gradient_strides_through_autograd_grad_are_torchs(dims, transposed, batch, grad_layout):
    """torch.autograd.grad hands back the gradients as the backward laid them out (.backward() would re-lay them
    out like the leaves): ours must be laid out as torch's, for every input and weight layout, an empty batch
    included (there torch's follow the input's and the weight's own strides, a permuted weight's too), whatever
    the incoming gradient's layout (torch's ignore it; a transposed convolution's kernels start from it)."""
    name = f"conv_transpose{dims}d" if transposed else f"conv{dims}d"
    ours, theirs = getattr(tmg.functional, name), getattr(F, name)
    def channels_last(t):  # a 3-d tensor as torch's 1-d kernels see it: channels last, as the 4-d one of height 1
        return t.transpose(1, 2).contiguous().transpose(1, 2) if dims == 1 else t.contiguous(memory_format=_CL[dims])

    x_layouts = ("contiguous", "channels_last")
    w_layouts = ("contiguous", "channels_last") + (() if dims == 1 else ("permuted",))
    for x_layout, w_layout in itertools.product(x_layouts, w_layouts):
        x = torch.randn(batch, 3, *(4,) * dims)
        w = torch.randn(3, 3, *(2,) * dims)
        x = channels_last(x) if x_layout == "channels_last" else x
        w = {"channels_last": lambda: channels_last(w), "permuted": lambda: w.transpose(-1, -2),
             "contiguous": lambda: w}[w_layout]()
        strides = []
        for fn in (theirs, ours):
            xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
            y = fn(xs, ws)
            grad = torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).remainder(5)
            grad = channels_last(grad) if grad_layout == "channels_last" else grad
            gx, gw = torch.autograd.grad(y, (xs, ws), grad)
            strides.append((y.stride(), gx.stride(), gw.stride()))
        assert strides[1] == strides[0], (x_layout, w_layout, strides)


@pytest.mark.parametrize("dims", (1, 2, 3))
def test_max_pool_gradient_layout_follows_the_input_not_grad_output(dims):
    """torch lays a max-pool's input gradient out as the input, whatever the incoming gradient's layout; the
    kernels follow grad_output's, so the Function gives them one in the input's."""
    pool, theirs = getattr(tf, f"max_pool{dims}d"), getattr(F, f"max_pool{dims}d")
    def channels_last(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2) if dims == 1 else t.contiguous(memory_format=_CL[dims])
    g = torch.Generator().manual_seed(dims)
    for x_cl, grad_cl in itertools.product((False, True), repeat=2):
        x = torch.randn(2, 3, *(6,) * dims, generator=g, dtype=torch.float64)
        x = channels_last(x) if x_cl else x
        results = []
        for fn in (theirs, pool):
            xs = x.detach().requires_grad_()
            y = fn(xs, 2)
            grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
            (gx,) = torch.autograd.grad(y, xs, channels_last(grad) if grad_cl else grad)
            results.append(gx)
        assert results[1].stride() == results[0].stride(), (x_cl, grad_cl)
        torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_layouts_with_sizes_of_1_as_torchs():
    """Tensors whose sizes of 1 carry channels-last strides count as contiguous, yet suggest channels-last: an
    unbatched (C, 1, 1, 1) max_pool3d input, a max-pool's incoming gradient of 1x1 outputs, a transposed
    convolution's gradients at 1x1 inputs. torch's results then have its contiguous strides."""
    x = torch.randn(64, dtype=torch.float64).as_strided((4, 1, 1, 1), (1, 4, 4, 4))
    for ours, theirs in zip(tf.max_pool3d(x, 1, 1, return_indices=True), F.max_pool3d(x, 1, 1, return_indices=True)):
        assert ours.stride() == theirs.stride() and torch.equal(ours, theirs)
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(64, dtype=torch.float64).as_strided((2, 4, 1, 1), (4, 1, 4, 4))
    (ours,), (theirs,) = (torch.autograd.grad(fn(x, 2), x, grad) for fn in (tf.max_pool2d, F.max_pool2d))
    assert ours.stride() == theirs.stride() and torch.equal(ours, theirs)
    x = torch.randn(2, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (tf.conv_transpose2d, F.conv_transpose2d):
        y = fn(x, w)
        results.append(torch.autograd.grad(y, (x, w), y.detach().contiguous(memory_format=CL).mul(0).add(1)))
    for ours, theirs in zip(*results):
        assert ours.stride() == theirs.stride()
        torch.testing.assert_close(ours, theirs)


def test_unbatched_max_pool3d_of_a_channels_last_3d_slice_is_laid_out_as_torchs():
    """torch pools an unbatched (C, D, H, W) input whose memory runs C, W, H, D (one image of a channels_last_3d
    batch) in that layout, and every other layout it accepts contiguous. Every order of the four dimensions,
    sizes of 1 included. (The input gradient's layout is not compared: torch's unbatched 3-d backward follows
    the incoming gradient's, where its batched one follows the input's.)"""
    checked = 0
    for shape in [(4, 6, 7, 5), (4, 1, 7, 5), (3, 2, 2, 2)]:
        for order in itertools.permutations(range(4)):
            base = torch.randn(*[shape[d] for d in order], dtype=torch.float64)
            x = base.permute([order.index(d) for d in range(4)])
            for kernel in (1, 2):
                try:
                    y_t, i_t = F.max_pool3d(x, kernel, 1, return_indices=True)
                except RuntimeError:  # torch refuses a 4-d channels-last one: "Unsupported memory format"
                    continue
                y_o, i_o = tf.max_pool3d(x, kernel, 1, return_indices=True)
                assert (y_o.stride(), i_o.stride()) == (y_t.stride(), i_t.stride()), (shape, order, kernel)
                assert torch.equal(y_o, y_t) and torch.equal(i_o, i_t)
                xs = x.detach().requires_grad_()
                (gx,) = torch.autograd.grad(tf.max_pool3d(xs, kernel, 1), xs, torch.ones(y_t.shape, dtype=x.dtype))
                (gx_t,) = torch.autograd.grad(F.max_pool3d(xs, kernel, 1), xs, torch.ones(y_t.shape, dtype=x.dtype))
                assert torch.equal(gx, gx_t)
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("x_cl, w_cl", [(True, False), (False, True), (True, True)])
def test_transposed_3d_with_output_padding_past_the_stride_is_contiguous_as_torchs(x_cl, w_cl):
    """output_padding >= stride (allowed by a larger dilation): torch's CPU computes it with its own kernel,
    whose output and gradients are contiguous whatever the layouts; ours must be laid out the same."""
    x, w = torch.randn(2, 4, 5, 5, 5), torch.randn(4, 3, 2, 2, 2)
    x = x.contiguous(memory_format=torch.channels_last_3d) if x_cl else x
    w = w.contiguous(memory_format=torch.channels_last_3d) if w_cl else w
    results = []
    for fn in (F.conv_transpose3d, tmg.functional.conv_transpose3d):
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = fn(xs, ws, stride=(1, 1, 2), dilation=2, output_padding=1)
        gx, gw = torch.autograd.grad(y, (xs, ws), torch.ones(y.shape))
        results.append((y, gx, gw))
    for theirs, ours in zip(*results):
        assert ours.stride() == theirs.stride()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# Inputs whose size-1 dimensions carry channels-last strides (torch.empty(..., memory_format=channels_last) of
# (N, C, 1, 1) gives (C, 1, C, C)): contiguous() keeps them, so they still suggest channels-last after it. The CPU's
# depthwise-with-a-multiplier kernels, which take channels-last inputs through their NCHW path, recursed on such
# an input until the stack overflowed (a segfault). Values and gradients against torch.
@pytest.mark.parametrize("size,stride,padding", [((1, 1), (3, 2), (2, 1)), ((1, 1), 1, (1, 0)), ((1, 5), 1, 1),
                                                 ((4, 1), (1, 2), (1, 0))])
@pytest.mark.parametrize("batch", [1, 2])
def test_ambiguous_channels_last_strides_of_size_one_dimensions(size, stride, padding, batch):
    gen = torch.Generator().manual_seed(0)
    x = torch.empty((batch, 3, *size), dtype=torch.float64, memory_format=torch.channels_last)
    x.copy_(torch.randn(x.shape, generator=gen, dtype=torch.float64))
    w = torch.randn(6, 1, 3, 1, generator=gen, dtype=torch.float64)  # 3 groups, 2 output channels each
    if size == (1, 1):  # both layouts at once (the shapes beside it: channels-last only, for contrast)
        assert x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() for _ in range(2)]
    outs = [f(xi, wi, None, stride, padding, 1, 3) for f, xi, wi in zip((F.conv2d, tmg.functional.conv2d), xs, ws)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    g = torch.randn(outs[0].shape, generator=gen, dtype=torch.float64)
    grads = [torch.autograd.grad(o, [xi, wi], g) for o, xi, wi in zip(outs, xs, ws)]
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    # the transposed convolution runs the same kernel with a channels-last stand-in of its output's shape
    y = torch.empty((batch, 6, *size), dtype=torch.float64, memory_format=torch.channels_last)
    y.copy_(torch.randn(y.shape, generator=gen, dtype=torch.float64))
    try:
        want = F.conv_transpose2d(y, w, None, stride, padding, 0, 3)
    except RuntimeError:
        return  # torch refuses the geometry (an output size below 1)
    torch.testing.assert_close(tmg.functional.conv_transpose2d(y, w, None, stride, padding, 0, 3), want,
                               rtol=1e-12, atol=1e-12)
