"""3-d layers: functional.conv3d, conv_transpose3d and max_pool3d, nn.Conv3d, ConvTranspose3d and MaxPool3d.
Values and every gradient against torch's over a configuration matrix and random configurations, gradcheck and
gradgradcheck in float64, float16/bfloat16 against torch's float32 result, autocast, channels_last_3d layouts
(torch's strides, including where torch's own 3-d CPU kernel returns contiguous results), torch.compile and
torch.export, opcheck of the raw ops with 3-d arguments, vmap and forward mode, modules with convert/revert and
everywhere(), bad arguments named in the error, and bits across thread counts. (Transposed convolution's own
tests, 3-d cases included, are in test_conv_transpose.py.)"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_manualgrad as tmg
from torch_manualgrad import functional as tf

ops = torch.ops.manualgrad
CL3 = torch.channels_last_3d

# (batch, in_channels, out_channels, kernel, size, stride, padding, dilation, groups, bias); batch None: unbatched
CONV_CASES = [
    (2, 2, 3, 3, (4, 5, 4), 1, 1, 1, 1, True),
    (1, 4, 4, (2, 3, 1), (5, 6, 6), (2, 1, 2), (1, 0, 0), (1, 2, 1), 2, False),
    (None, 3, 2, 2, (3, 4, 5), 1, "same", (2, 1, 1), 1, True),  # unbatched; 'same' with an even dilated kernel
    (2, 2, 2, 3, (4, 4, 5), 2, "valid", 1, 1, True),
    (2, 4, 4, 3, (3, 5, 4), 1, 1, 1, 4, True),  # depthwise
    (3, 2, 4, 1, (3, 2, 3), 1, 0, 1, 1, True),  # 1x1x1
    (1, 3, 2, (1, 2, 3), (2, 6, 5), (1, 3, 2), (0, 1, 2), (1, 2, 1), 1, True),
    (0, 2, 3, 2, (3, 3, 3), 1, 0, 1, 1, True),  # an empty batch
]

# The same kinds of configuration, smaller, for gradcheck's finite differences over every element
GRADCHECK_CASES = [
    (1, 2, 2, 2, (3, 3, 3), 1, 1, 1, 1, True),
    (1, 4, 2, (2, 3, 1), (4, 5, 3), (2, 1, 2), (1, 0, 0), (1, 2, 1), 2, False),
    (None, 2, 2, 2, (3, 3, 4), 1, "same", (2, 1, 1), 1, True),
    (2, 2, 2, 3, (3, 4, 4), 2, "valid", 1, 1, True),
    (1, 2, 2, 2, (2, 3, 3), 1, 1, 1, 2, True),  # depthwise
    (2, 2, 2, 1, (2, 2, 2), 1, 0, 1, 1, True),  # 1x1x1
    (1, 2, 2, (1, 2, 3), (2, 5, 5), (1, 3, 2), (0, 1, 2), (1, 2, 1), 1, True),
]


def _triple(v):
    return tuple(v) if isinstance(v, tuple) else (v,) * 3


def _conv_tensors(case, dtype=torch.float64, seed=0):
    n, c_in, c_out, k, size, stride, padding, dilation, groups, bias = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(((n,) if n is not None else ()) + (c_in,) + size, generator=g, dtype=torch.float64)
    w = torch.randn((c_out, c_in // groups) + _triple(k), generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x.to(dtype), w.to(dtype), (b.to(dtype) if bias else None), kwargs


def _values_and_grads(fn, tensors, grad_seed=1, grad_dtype=None):
    """fn's output and the gradients of every tensor, at a fixed random output gradient (its values those of
    grad_dtype where given)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors if t is not None]
    it = iter(leaves)
    out = fn(*[next(it) if t is not None else None for t in tensors])
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    go = go.to(grad_dtype or out.dtype).to(out.dtype)
    return out, torch.autograd.grad(out, leaves, go)


def _rounded(values_and_grads, dtype):
    out, grads = values_and_grads
    return out.to(dtype), tuple(g.to(dtype) for g in grads)


def _assert_like_torch(ours, theirs, **tol):
    (out, grads), (ref, ref_grads) = ours, theirs
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, **tol)


# --- conv3d: values and gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_conv3d_values_and_gradients_match_torch(case, dtype):
    x, w, b, kwargs = _conv_tensors(case, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    _assert_like_torch(_values_and_grads(lambda *t: tf.conv3d(*t, **kwargs), (x, w, b)),
                       _values_and_grads(lambda *t: F.conv3d(*t, **kwargs), (x, w, b)), **tol)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_conv3d_gradcheck_and_gradgradcheck(case):
    x, w, b, kwargs = _conv_tensors(case, seed=2)
    leaves = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)

    def fn(*args):
        return tf.conv3d(args[0], args[1], args[2] if len(args) > 2 else None, **kwargs)

    assert torch.autograd.gradcheck(fn, leaves)
    # the second order in fast mode (random projections of the Jacobian of the Jacobian): the full one takes
    # minutes in 3-d
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


@st.composite
def _conv_configs(draw):
    groups = draw(st.sampled_from((1, 2)))
    each = lambda lo, hi: tuple(draw(st.integers(lo, hi)) for _ in range(3))  # noqa: E731
    stride, dilation, kernel = each(1, 2), each(1, 2), each(1, 3)
    padding = draw(st.sampled_from(("same", "valid", None))) if all(s == 1 for s in stride) else None
    return dict(batch=draw(st.sampled_from((None, 1, 2))), c_in=groups * draw(st.integers(1, 2)),
                c_out=groups * draw(st.integers(1, 2)), kernel=kernel, size=each(1, 5), stride=stride,
                padding=padding if padding is not None else each(0, 2), dilation=dilation, groups=groups,
                bias=draw(st.booleans()), dtype=draw(st.sampled_from((torch.float64, torch.float32))),
                x_layout=draw(st.booleans()), w_layout=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


def _same_strides(a, b):
    """torch's strides, except on dimensions of size 1, where any stride describes the same layout."""
    return [s for s, n in zip(a.stride(), a.shape) if n > 1] == [s for s, n in zip(b.stride(), b.shape) if n > 1]


@given(c=_conv_configs())
@settings(max_examples=40, deadline=None)
def test_conv3d_random_configurations_agree_with_torch(c):
    """Output, layout, gradients (and their layouts) or the error, against torch's, over random arguments."""
    g = torch.Generator().manual_seed(c["seed"])
    dtype = c["dtype"]
    x = torch.randn(((c["batch"],) if c["batch"] else ()) + (c["c_in"],) + c["size"], generator=g).to(dtype)
    w = torch.randn((c["c_out"], c["c_in"] // c["groups"]) + c["kernel"], generator=g).to(dtype)
    b = torch.randn(c["c_out"], generator=g).to(dtype) if c["bias"] else None
    if c["x_layout"] and x.dim() == 5:
        x = x.contiguous(memory_format=CL3)
    if c["w_layout"]:
        w = w.contiguous(memory_format=CL3)
    kwargs = {k: c[k] for k in ("stride", "padding", "dilation", "groups")}
    try:
        theirs = _values_and_grads(lambda *t: F.conv3d(*t, **kwargs), (x, w, b))
    except RuntimeError as exc:
        with pytest.raises(RuntimeError) as ours_exc:
            tf.conv3d(x, w, b, **kwargs)
        assert str(exc).splitlines()[0] in str(ours_exc.value)
        return
    ours = _values_and_grads(lambda *t: tf.conv3d(*t, **kwargs), (x, w, b))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    _assert_like_torch(ours, theirs, **tol)
    assert _same_strides(ours[0], theirs[0])
    for g_ours, g_theirs in zip(ours[1], theirs[1]):
        assert _same_strides(g_ours, g_theirs)


# --- layouts -----------------------------------------------------------------------------------------------


def _layout(t, channels_last):
    return t.contiguous(memory_format=CL3) if channels_last else t


@pytest.mark.parametrize("transposed", (False, True), ids=("conv3d", "conv_transpose3d"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("batch", (1, 2))
@pytest.mark.parametrize("kernel", (1, 3))
@pytest.mark.parametrize("threads", (1, 2))
def test_channels_last_3d_layouts_are_torchs(transposed, dtype, batch, kernel, threads, restore_num_threads):
    """torch's strides for every input/weight layout: channels_last_3d in, channels_last_3d out where torch's
    oneDNN kernel computes the convolution; contiguous where its own kernel does (float64, and float32 1x1x1 or
    small single-image convolutions, by thread count), as conv_keeps_channels_last predicts."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 3, 5, 4, generator=g).to(dtype)
    w = torch.randn(*((4, 6) if transposed else (6, 4)), kernel, kernel, kernel, generator=g).to(dtype)
    fn = tf.conv_transpose3d if transposed else tf.conv3d
    ref_fn = F.conv_transpose3d if transposed else F.conv3d
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for x_cl, w_cl in ((True, False), (False, True), (True, True), (False, False)):
        xx, ww = _layout(x, x_cl), _layout(w, w_cl)
        ours = _values_and_grads(lambda a, b: fn(a, b, padding=kernel // 2), (xx, ww))
        theirs = _values_and_grads(lambda a, b: ref_fn(a, b, padding=kernel // 2), (xx, ww))
        # bfloat16 values against torch's float32 computation on the same inputs, rounded (ours: float32 sums
        # rounded once); torch's own bfloat16 input gradient sums in bfloat16 on CPUs without AVX-512 (a Zen 3:
        # 0.34 from the float64 result where ours is 0.09). Its strides are still the ones to match.
        exact = theirs if dtype != torch.bfloat16 else _rounded(
            _values_and_grads(lambda a, b: ref_fn(a, b, padding=kernel // 2), (xx.float(), ww.float()), grad_dtype=dtype),
            dtype)
        _assert_like_torch(ours, exact, **tol)
        assert ours[0].stride() == theirs[0].stride(), (x_cl, w_cl)
        for g_ours, g_theirs in zip(ours[1], theirs[1]):  # a 1x1x1 weight's gradient: any stride on its kernel
            assert _same_strides(g_ours, g_theirs), (x_cl, w_cl, g_ours.stride(), g_theirs.stride())


def test_unbatched_and_empty_layouts_are_torchs():
    w = torch.randn(6, 4, 2, 1, 3).contiguous(memory_format=CL3)
    for x in (torch.randn(4, 3, 5, 4), torch.randn(0, 4, 3, 5, 4).contiguous(memory_format=CL3)):
        ours, theirs = tf.conv3d(x, w, padding=1), F.conv3d(x, w, padding=1)
        assert ours.shape == theirs.shape and ours.stride() == theirs.stride()
        torch.testing.assert_close(ours, theirs)


# --- other dtypes and autocast ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)], ids=("float16", "bfloat16"))
@pytest.mark.parametrize("fn", ("conv3d", "conv_transpose3d"))
def test_half_precision_against_torchs_float32(fn, dtype, tol):
    """Computed in float32 and rounded once: within the dtype's rounding of torch's float32 result, gradients too."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 3, 5, 4, generator=g).to(dtype)
    w = (torch.randn(4, 4, 3, 2, 3, generator=g) / 6).to(dtype)
    b = torch.randn(4, generator=g).to(dtype)
    kwargs = dict(stride=(1, 2, 1), padding=1)
    out, grads = _values_and_grads(lambda *t: getattr(tf, fn)(*t, **kwargs), (x, w, b))
    ref, ref_grads = _values_and_grads(lambda *t: getattr(F, fn)(*t, **kwargs), [t.float() for t in (x, w, b)])
    assert out.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    for ours, theirs in zip((out, *grads), (ref, *ref_grads)):
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours.float(), theirs, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("fn", ("conv3d", "conv_transpose3d"))
def test_autocast_runs_in_the_autocast_dtype(fn):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 4, 4, generator=g)
    w = torch.randn(3, 3, 2, 2, 2, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = getattr(tf, fn)(x, w, stride=2)
        theirs = getattr(F, fn)(x, w, stride=2)
        double = getattr(tf, fn)(x.double(), w.detach().double(), stride=2)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and double.dtype == torch.float64
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)
    (grad,) = torch.autograd.grad(ours.float().sum(), w)
    (ref_grad,) = torch.autograd.grad(theirs.float().sum(), w)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=5e-2)


# --- transforms, compile, export, opcheck -----------------------------------------------------------------


def test_vmap_and_forward_mode():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 2, 4, 3, 4, generator=g, dtype=torch.float64)  # a vmapped dimension in front
    w = torch.randn(3, 4, 1, 2, 1, 2, generator=g, dtype=torch.float64)
    vmap = torch.func.vmap
    for in_dims in ((0, None), (0, 0), (None, 0)):
        xs = x if in_dims[0] is not None else x[0]
        ws = w if in_dims[1] is not None else w[0]
        torch.testing.assert_close(vmap(lambda a, b: tf.conv3d(a, b, padding=(1, 0, 1), groups=2), in_dims)(xs, ws),
                                   vmap(lambda a, b: F.conv3d(a, b, padding=(1, 0, 1), groups=2), in_dims)(xs, ws))
    x0, w0 = x[0], torch.randn(2, 2, 2, 1, 2, generator=g, dtype=torch.float64)
    dx, dw = torch.randn_like(x0), torch.randn_like(w0)
    for ours, theirs in ((tf.conv3d, F.conv3d), (tf.conv_transpose3d, F.conv_transpose3d)):
        out, tangent = torch.func.jvp(lambda a, b: ours(a, b, stride=2), (x0, w0), (dx, dw))
        ref, expected = torch.func.jvp(lambda a, b: theirs(a, b, stride=2), (x0, w0), (dx, dw))
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(tangent, expected)


def test_per_sample_gradients_with_torch_func():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2, 2, 2, 2, 2, generator=g, dtype=torch.float64)

    def loss(conv):
        return lambda w, x: conv(x.unsqueeze(0), w, padding=1).square().sum()

    ours = torch.func.vmap(torch.func.grad(loss(tf.conv3d)), in_dims=(None, 0))(w, x)
    theirs = torch.func.vmap(torch.func.grad(loss(F.conv3d)), in_dims=(None, 0))(w, x)
    torch.testing.assert_close(ours, theirs)


def _small_3d_model():
    return torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.ConvTranspose3d(4, 3, 2, stride=2), torch.nn.ReLU(),
                               torch.nn.Conv3d(3, 2, (1, 3, 3), padding="same", padding_mode="replicate"))


def _compiles_and_exports_as_torch(reference, x, targets):
    """A converted copy of `reference` under torch.compile(fullgraph=True) gives torch's outputs and gradients,
    and torch.export records `targets` (our ops) and no convolution of torch's."""
    model = tmg.convert(copy.deepcopy(reference))
    x = x.detach().clone().requires_grad_()
    out = torch.compile(model, fullgraph=True)(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference(x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-4)
    program = torch.export.export(model.eval(), (x.detach(),))
    found = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert set(targets) <= found and not any("convolution" in t for t in found), found
    torch.testing.assert_close(program.module()(x.detach()), reference.eval()(x.detach()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", (False, True), ids=("contiguous", "channels_last_3d"))
def test_compile_fullgraph_and_export(channels_last):
    """In channels_last_3d too, where the layout rule (conv_keeps_channels_last) is traced."""
    torch.manual_seed(8)
    _compiles_and_exports_as_torch(_small_3d_model(), _layout(torch.randn(2, 2, 3, 4, 3), channels_last),
                                   ("manualgrad.conv_forward.default", "manualgrad.conv_backward.default"))


@pytest.mark.parametrize("requires_grad", (False, True), ids=("plain", "requires_grad"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("contiguous", "channels_last_3d"))
def test_opcheck_conv_ops_with_3d_arguments(requires_grad, channels_last):
    """The fake kernels' shapes and layouts (channels_last_3d results on the CPU), the registered autograd."""
    g = torch.Generator().manual_seed(9)
    x = _layout(torch.randn(2, 4, 3, 5, 4, generator=g, dtype=torch.float64), channels_last).requires_grad_(requires_grad)
    w = torch.randn(6, 2, 2, 3, 1, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    geometry = ([1, 2, 1], [1, 0, 1], [2, 1, 1], 2)
    torch.library.opcheck(ops.conv_forward.default, (x, w, b, *geometry))
    out = ops.conv_forward(x.detach(), w.detach(), b.detach(), *geometry)
    assert out.is_contiguous(memory_format=CL3 if channels_last else torch.contiguous_format)
    grad_output = torch.randn(out.shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    for mask in ([True, True, True], [True, False, False], [False, True, False]):
        torch.library.opcheck(ops.conv_backward.default, (grad_output, x, w, *geometry, mask))
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fx, fw, fgo = (mode.from_tensor(t.detach()) for t in (x, w, grad_output))
    with mode:
        fake = ops.conv_forward(fx, fw, None, *geometry)
        fake_grads = ops.conv_backward(fgo, fx, fw, *geometry, [True, True, True])
    real_grads = ops.conv_backward(grad_output.detach(), x.detach(), w.detach(), *geometry, [True, True, True])
    assert fake.shape == out.shape and fake.stride() == out.stride()
    for f, r in zip(fake_grads, real_grads):
        assert f.shape == r.shape and f.stride() == r.stride()


# --- modules, convert, everywhere ---------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ("zeros", "reflect", "replicate", "circular"))
def test_conv3d_module_padding_modes(padding_mode):
    torch.manual_seed(10)
    theirs = torch.nn.Conv3d(2, 3, (3, 2, 3), stride=(1, 2, 1), padding=(1, 1, 2), padding_mode=padding_mode,
                             dtype=torch.float64)
    ours = tmg.nn.Conv3d(2, 3, (3, 2, 3), stride=(1, 2, 1), padding=(1, 1, 2), padding_mode=padding_mode,
                         dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.Conv3d) and repr(ours) == repr(theirs)
    x = torch.randn(2, 2, 4, 5, 4, dtype=torch.float64)
    _assert_like_torch(_values_and_grads(lambda x, w: ours._conv_forward(x, w, ours.bias), (x, ours.weight)),
                       _values_and_grads(lambda x, w: theirs._conv_forward(x, w, theirs.bias), (x, theirs.weight)))
    torch.testing.assert_close(ours(x[0]), theirs(x[0]))  # unbatched


def test_convert_revert_unconverted_and_everywhere():
    torch.manual_seed(11)
    model = _small_3d_model()
    x = torch.randn(2, 2, 3, 4, 3)
    ref = model(x)
    converted = tmg.convert(copy.deepcopy(model), strict=True)
    assert [type(m) for m in converted if not isinstance(m, torch.nn.ReLU)] == [
        tmg.nn.Conv3d, tmg.nn.ConvTranspose3d, tmg.nn.Conv3d]
    assert tmg.unconverted(converted) == [] and tmg.unconverted(model) == []
    torch.testing.assert_close(converted(x), ref)
    tmg.revert(converted)
    assert [type(m) for m in converted if not isinstance(m, torch.nn.ReLU)] == [
        torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.Conv3d]
    with tmg.everywhere() as mode:
        out = model(x)
        out_t = F.conv_transpose3d(x, model[0].weight[:2].transpose(0, 1).contiguous(), stride=2)
    assert dict(mode.served) == {"F.conv3d": 2, "F.conv_transpose3d": 2} and not mode.left
    torch.testing.assert_close(out, ref)
    result = tmg.verify(model, x)  # every layer checked alone and end to end against torch.nn's
    assert result.ok and len(result.layers) == 3, result.report()
    torch.testing.assert_close(out_t, F.conv_transpose3d(x, model[0].weight[:2].transpose(0, 1).contiguous(), stride=2))


def test_onnx_export_and_jit_trace_paths_use_torchs_functions(monkeypatch):
    """While exporting to ONNX the functions compute with torch's conv3d/conv_transpose3d (which the exporters
    translate); while tracing, the transposed convolution does (its op's bool[3] cannot be traced)."""
    from torch_manualgrad import _exporting

    calls = []
    for name in ("conv3d", "conv_transpose3d"):
        original = getattr(F, name)
        monkeypatch.setitem(tf._TORCH_CONV if name == "conv3d" else tf._TORCH_CONV_TRANSPOSE, 3,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x, w = torch.randn(1, 2, 3, 3, 3), torch.randn(2, 2, 2, 2, 2)
    monkeypatch.setattr(_exporting, "exporting_to_onnx", lambda: True)
    torch.testing.assert_close(tf.conv3d(x, w), F.conv3d(x, w))
    torch.testing.assert_close(tf.conv_transpose3d(x, w), F.conv_transpose3d(x, w))
    assert calls == ["conv3d", "conv_transpose3d"]
    monkeypatch.undo()
    model = tmg.convert(torch.nn.Sequential(torch.nn.Conv3d(2, 2, 2), torch.nn.ConvTranspose3d(2, 2, 2)))
    traced = torch.jit.trace(model, x)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "manualgrad::conv_forward" in kinds and "aten::_convolution" in kinds
    torch.testing.assert_close(traced(x), model(x))


# --- bad input ---------------------------------------------------------------------------------------------


def _raises(call, *words, kind=(RuntimeError, TypeError, ValueError)):
    with pytest.raises(kind) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_conv3d_bad_arguments_are_named():
    x, w = torch.randn(1, 2, 4, 4, 4), torch.randn(3, 2, 2, 2, 2)
    _raises(lambda: tf.conv3d(x, w, stride=(1, 2)), "list of 3 values", "stride=[1, 2]")
    _raises(lambda: tf.conv3d(x, w, padding=(1, 1, 1, 1)), "padding=[1, 1, 1, 1]")
    _raises(lambda: tf.conv3d(x, w, dilation=(1, 1)), "dilation=[1, 1]")
    _raises(lambda: tf.conv3d(x, w, stride=1.5), "stride=1.5", kind=TypeError)
    _raises(lambda: tf.conv3d(x, w, groups=True), "groups=True", kind=TypeError)
    _raises(lambda: tf.conv3d(x, w, padding="full"), "Invalid padding string", "'full'", kind=ValueError)
    _raises(lambda: tf.conv3d(x, w, padding="same", stride=(1, 1, 2)), "padding='same'", "stride=[1, 1, 2]")
    _raises(lambda: tf.conv3d(x[0, 0], w), "Expected 4D (unbatched) or 5D (batched) input to conv3d",
            "conv3d: expected input to be 4-D (unbatched) or 5-D (batched)", "[4, 4, 4]")
    _raises(lambda: tf.conv3d(x.numpy(), w), "expected input to be a Tensor", kind=TypeError)
    _raises(lambda: tf.conv3d(x, w, torch.randn(4)), "bias")
    _raises(lambda: tf.conv3d(x, w, padding=-1), "padding")
    _raises(lambda: tf.conv3d(x, w, stride=(1, 0, 1)), "stride")
    _raises(lambda: tf.conv3d(x, w[:, :1]), "weight", "input")
    _raises(lambda: tf.conv3d(x, w.double()), "weight", "Double")
    _raises(lambda: tf.conv3d(x[:, :, :1], w), "Kernel size can't be greater than actual input size", "input of shape")


def test_raw_ops_with_3d_arguments_name_the_bad_one():
    x, w = torch.randn(1, 2, 4, 4, 4), torch.randn(3, 2, 2, 2, 2)
    one = [1, 1, 1]
    _raises(lambda: ops.conv_forward(x, w, None, one, [0, 0], one, 1), "padding", "[0, 0]")
    _raises(lambda: ops.conv_forward(x, w, None, [1, 1], [0, 0], [1, 1], 1), "input")  # rank: len(stride)
    _raises(lambda: ops.conv_forward(x, w, None, one, [0, 0, -1], one, 1), "padding")
    _raises(lambda: ops.conv_forward(x, w, None, one, [0, 0, 0], [1, 0, 1], 1), "dilation")
    _raises(lambda: ops.conv_forward(x, w[..., 0], None, one, [0, 0, 0], one, 1), "weight")
    _raises(lambda: ops.conv_forward(x[0], w, None, one, [0, 0, 0], one, 1), "input")
    go = torch.randn(1, 3, 3, 3, 3)
    _raises(lambda: ops.conv_backward(go[:, :2], x, w, one, [0, 0, 0], one, 1, [True, True, True]), "grad_output")
    _raises(lambda: ops.max_pool_forward(x, [2, 2], [2, 2, 2], [0, 0, 0], one, False), "kernel_size")
    _raises(lambda: ops.max_pool_forward(x, [2, 2, 2], [2, 2, 2], [0, 0, 3], one, False), "padding")


# --- determinism -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ("conv3d", "conv_transpose3d"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("contiguous", "channels_last_3d"))
def test_bit_identical_across_thread_counts(fn, channels_last, restore_num_threads):
    g = torch.Generator().manual_seed(12)
    x = _layout(torch.randn(3, 8, 5, 6, 7, generator=g), channels_last)
    w = torch.randn(8, 8, 3, 2, 3, generator=g)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out, grads = _values_and_grads(lambda a, b: getattr(tf, fn)(a, b, stride=(1, 2, 2), padding=1), (x, w))
        results.append([out.detach(), *grads])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# --- max_pool3d ----------------------------------------------------------------------------------------------

# (batch, channels, size, kernel, stride, padding, dilation, ceil_mode); batch None: unbatched
POOL_CASES = [
    (2, 3, (4, 5, 6), 2, None, 0, 1, False),
    (1, 2, (5, 6, 5), 3, 2, 1, 1, True),
    (None, 2, (4, 5, 5), (2, 3, 2), (1, 2, 2), (1, 0, 1), (2, 1, 1), True),  # unbatched
    (2, 2, (6, 4, 5), 2, 1, 1, 2, False),
    (1, 1, (3, 7, 4), (3, 1, 2), (2, 1, 3), (1, 0, 1), 1, True),
    (0, 2, (3, 3, 3), 2, 1, 0, 1, False),  # an empty batch
]


def _pool_input(case, dtype=torch.float64, values="distinct", seed=0):
    n, c, size = case[:3]
    shape = ((n,) if n is not None else ()) + (c,) + size
    g = torch.Generator().manual_seed(seed)
    count = torch.Size(shape).numel()
    if values == "distinct":  # no ties: one maximum per window, a well-defined gradient
        x = (torch.randperm(count, generator=g).to(torch.float64) - count // 2).reshape(shape)
    elif values == "ties":
        x = torch.randint(0, 3, shape, generator=g).to(torch.float64)
    else:  # normal values with NaNs among them
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        x[torch.rand(shape, generator=g) < 0.2] = float("nan")
    return x.to(dtype)


def _pool_kwargs(case):
    kernel, stride, padding, dilation, ceil_mode = case[3:]
    return dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
@pytest.mark.parametrize("values", ("distinct", "ties", "nan"))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_max_pool3d_values_indices_and_gradients_are_torchs(case, values, dtype):
    """Bit for bit: the maximum is exact in any dtype, ties go to the first, NaN wins; the gradient reaches
    each window's argmax, overlapping windows add (float16/bfloat16 sums in float32, rounded once: torch's float32
    gradient rounded, where torch's own adds in the narrow dtype)."""
    x = _pool_input(case, dtype, values)
    kwargs = _pool_kwargs(case)
    results = []
    wide = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    for fn, xx in ((tf.max_pool3d, x), (F.max_pool3d, x), (F.max_pool3d, wide)):
        leaf = xx.clone().requires_grad_()
        out, idx = fn(leaf, **kwargs, return_indices=True)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(xx.dtype)
        results.append((out, idx, torch.autograd.grad(out, leaf, go)[0].to(dtype)))
    (out, idx, grad), (ref, ref_idx, _), (_, _, ref_grad) = results
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    plain = tf.max_pool3d(x, **kwargs)  # without indices (nothing to record): the same values
    torch.testing.assert_close(plain, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", [c for c in POOL_CASES if c[0] != 0], ids=str)
def test_max_pool3d_gradcheck_and_gradgradcheck(case):
    x = (_pool_input(case) / 10).requires_grad_()  # distinct values 0.1 apart: far more than gradcheck's eps
    kwargs = _pool_kwargs(case)

    def fn(x):
        return tf.max_pool3d(x, **kwargs)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_max_pool3d_of_integers_and_under_autocast():
    x = torch.randint(-50, 50, (2, 3, 4, 5, 4), generator=torch.Generator().manual_seed(2))
    for dtype in (torch.int64, torch.int32, torch.uint8):
        ours, ours_idx = tf.max_pool3d(x.to(dtype).abs() if dtype == torch.uint8 else x.to(dtype), 2, 1,
                                       return_indices=True)
        ref, ref_idx = F.max_pool3d(x.to(dtype).abs() if dtype == torch.uint8 else x.to(dtype), 2, 1,
                                    return_indices=True)
        assert ours.dtype == dtype and torch.equal(ours, ref) and torch.equal(ours_idx, ref_idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tf.max_pool3d(x.float(), 2).dtype == F.max_pool3d(x.float(), 2).dtype == torch.float32


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("batch", (None, 1, 2))
def test_max_pool3d_channels_last_3d_layouts_are_torchs(dtype, batch):
    x = _pool_input((batch, 4, (4, 6, 5)), dtype)
    if batch is not None:
        x = x.contiguous(memory_format=CL3)
    for return_indices in (False, True):
        outs = []
        for fn in (tf.max_pool3d, F.max_pool3d):
            leaf = x.clone().requires_grad_()
            result = fn(leaf, 3, 2, 1, return_indices=return_indices)
            out = result[0] if return_indices else result
            outs.append((result, torch.autograd.grad(out, leaf, torch.ones_like(out))[0]))
        (result, grad), (ref, ref_grad) = outs
        for a, b in zip(result if return_indices else (result,), ref if return_indices else (ref,)):
            assert torch.equal(a, b) and a.stride() == b.stride()
        assert torch.equal(grad, ref_grad) and grad.stride() == ref_grad.stride()


def test_max_pool3d_indices_unpool():
    x = _pool_input((2, 2, (4, 6, 6)), torch.float32)
    out, idx = tf.max_pool3d(x, 2, return_indices=True)
    torch.testing.assert_close(F.max_unpool3d(out, idx, 2), F.max_unpool3d(*F.max_pool3d(x, 2, return_indices=True), 2))


def test_max_pool3d_vmap_and_forward_mode():
    x = _pool_input((3, 2, (2, 4, 5, 4)))  # a vmapped dimension in front
    kwargs = dict(kernel_size=(2, 3, 2), stride=(1, 2, 2), padding=(1, 1, 0), ceil_mode=True)
    torch.testing.assert_close(torch.func.vmap(lambda a: tf.max_pool3d(a, **kwargs))(x),
                               torch.func.vmap(lambda a: F.max_pool3d(a, **kwargs))(x))
    dx = torch.randn_like(x[0])
    out, tangent = torch.func.jvp(lambda a: tf.max_pool3d(a, **kwargs), (x[0],), (dx,))
    ref, expected = torch.func.jvp(lambda a: F.max_pool3d(a, **kwargs), (x[0],), (dx,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tangent, expected)


@pytest.mark.parametrize("requires_grad", (False, True), ids=("plain", "requires_grad"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("contiguous", "channels_last_3d"))
def test_opcheck_max_pool_ops_with_3d_arguments(requires_grad, channels_last):
    x = _layout(_pool_input((2, 3, (4, 5, 6))), channels_last).requires_grad_(requires_grad)
    geometry = ([2, 3, 2], [1, 2, 2], [1, 1, 0], [1, 1, 2])
    torch.library.opcheck(ops.max_pool_forward.default, (x, *geometry, True))
    out, idx = ops.max_pool_forward(x.detach(), *geometry, True)
    assert out.is_contiguous(memory_format=CL3 if channels_last else torch.contiguous_format)
    grad_output = torch.randn(out.shape, dtype=torch.float64).requires_grad_(requires_grad)
    torch.library.opcheck(ops.max_pool_backward.default, (grad_output, idx, list(x.shape), *geometry))


def test_max_pool3d_bad_arguments_are_named():
    x = torch.randn(1, 2, 4, 4, 4)
    _raises(lambda: tf.max_pool3d(x, (2, 2)), "tuple of three ints", "kernel_size=(2, 2)")
    _raises(lambda: tf.max_pool3d(x, 2, (2, 2)), "stride=(2, 2)")
    _raises(lambda: tf.max_pool3d(x, 2, 2, (1, 1)), "padding=(1, 1)")
    _raises(lambda: tf.max_pool3d(x, 2, 2, 0, (1, 1)), "dilation=(1, 1)")
    _raises(lambda: tf.max_pool3d(x, 2.5), "kernel_size=2.5", kind=TypeError)
    _raises(lambda: tf.max_pool3d(x[0, 0], 2), "non-empty 4D or 5D (batch mode) tensor expected for input",
            "max_pool3d: expected input to be 4-D (unbatched) or 5-D (batched)")
    _raises(lambda: tf.max_pool3d(x, 2, padding=(0, 2, 0)), "pad should be at most half", "padding")
    _raises(lambda: tf.max_pool3d(x, 2, stride=(1, 0, 1)), "stride")
    _raises(lambda: tf.max_pool3d(x, 5), "Output size is too small")


@pytest.mark.parametrize("channels_last", (False, True), ids=("contiguous", "channels_last_3d"))
def test_max_pool3d_bit_identical_across_thread_counts(channels_last, restore_num_threads):
    x = _layout(_pool_input((3, 8, (6, 7, 8)), torch.float32, values="ties"), channels_last)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        leaf = x.clone().requires_grad_()
        out, idx = tf.max_pool3d(leaf, 3, 2, 1, return_indices=True)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        results.append([out.detach(), idx, torch.autograd.grad(out, leaf, go)[0]])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# --- a small 3-d U-Net: every 3-d layer together ------------------------------------------------------------


class UNet3d(torch.nn.Module):
    """Two levels: conv, pool down, conv, transposed conv up, the skip connection joined, a 1x1x1 conv out."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU())
        self.pool = torch.nn.MaxPool3d(2)
        self.bottom = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3, padding=1, padding_mode="reflect"), torch.nn.ReLU())
        self.up = torch.nn.ConvTranspose3d(8, 4, 2, stride=2)
        self.out = torch.nn.Conv3d(8, 2, 1)

    def forward(self, x):
        skip = self.down(x)
        y = self.up(self.bottom(self.pool(skip)), output_size=skip.shape[2:])
        return self.out(torch.cat([y, skip], 1))


def test_unet_converted_gives_torchs_outputs_and_gradients():
    torch.manual_seed(13)
    reference = UNet3d().double()
    converted = tmg.convert(copy.deepcopy(reference), strict=True)
    assert {type(m) for m in converted.modules()} >= {tmg.nn.Conv3d, tmg.nn.MaxPool3d, tmg.nn.ConvTranspose3d}
    x = torch.randn(2, 2, 4, 6, 6, dtype=torch.float64)
    results = []
    for model in (converted, reference):
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        results.append((out, torch.autograd.grad(out.square().sum(), [leaf, *model.parameters()])))
    _assert_like_torch(*results)
    tmg.revert(converted)
    assert not any(type(m).__module__.startswith("torch_manualgrad") for m in converted.modules())
    result = tmg.verify(tmg.convert(copy.deepcopy(reference)).float(), x.float())
    assert result.ok, result.report()


def test_unet_compile_fullgraph_export_and_everywhere():
    torch.manual_seed(14)
    reference = UNet3d()
    x = torch.randn(2, 2, 4, 4, 6).contiguous(memory_format=CL3)
    _compiles_and_exports_as_torch(reference, x, ("manualgrad.conv_forward.default",
                                                  "manualgrad.max_pool_forward.default",
                                                  "manualgrad.conv_backward.default"))
    ref = reference(x)
    with tmg.everywhere() as mode:
        out = reference(x)
    assert dict(mode.served) == {"F.conv3d": 3, "F.max_pool3d": 1, "F.conv_transpose3d": 1} and not mode.left
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
