"""Transposed convolution (functional.conv_transpose1d/2d/3d, nn.ConvTranspose1d/2d/3d): a convolution's input gradient,
computed by our conv_backward op. Values and gradients against torch's (float64 and float32), gradcheck and
gradgradcheck, the identity with conv's input gradient, torch's argument checks and words, the modules'
output_size, convert/revert/everywhere, layouts, forward mode and vmap, thread counts."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_manualgrad as tmg
from common import DEVICES
from torch_manualgrad import functional as ours

OURS = {1: ours.conv_transpose1d, 2: ours.conv_transpose2d, 3: ours.conv_transpose3d}
TORCHS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# (dims, batch, in_channels, out_channels, kernel, size, stride, padding, output_padding, groups, dilation, bias)
CASES = [
    (1, 2, 4, 6, 3, 7, 1, 0, 0, 1, 1, True),
    (1, 2, 4, 6, 3, 7, 2, 1, 1, 2, 1, True),
    (1, 1, 6, 3, 4, 5, 3, 2, 2, 3, 1, False),
    (1, None, 3, 5, 3, 6, 1, 2, 1, 1, 2, True),  # unbatched; output_padding past the stride (dilation 2)
    (2, 2, 4, 6, 3, 5, 1, 0, 0, 1, 1, True),
    (2, 2, 4, 6, (3, 2), (5, 6), (2, 1), (1, 0), (1, 0), 2, 1, True),
    (2, 1, 6, 6, 4, 4, 2, 1, 0, 6, 1, True),  # depthwise-like (groups = in_channels)
    (2, 2, 3, 5, 3, (6, 5), 1, 2, (1, 0), 1, (2, 1), False),
    (2, 3, 2, 4, 2, 3, 3, 0, 2, 2, 1, True),
    (2, None, 4, 3, 3, 4, 2, 1, 1, 1, 1, True),
    (2, 0, 4, 3, 3, 4, 2, 1, 1, 1, 1, True),  # an empty batch
    (3, 2, 2, 2, 2, (2, 3, 2), 2, 0, 1, 1, 1, True),
    (3, 1, 4, 2, (2, 1, 2), (3, 2, 2), (1, 2, 2), (1, 0, 0), (0, 1, 0), 2, (1, 1, 2), False),
    (3, None, 2, 2, 2, 2, 1, 1, (0, 1, 1), 1, 2, True),  # unbatched; output_padding past the stride (dilation 2)
    (3, 0, 2, 2, 2, 2, 2, 0, 0, 1, 1, True),  # an empty batch
]


def _pair(v, dims):
    return tuple(v) if isinstance(v, tuple) else (v,) * dims


def _make(case, dtype, seed=0, device="cpu"):
    dims, n, c_in, c_out, k, size, stride, padding, out_pad, groups, dilation, bias = case
    g = torch.Generator().manual_seed(seed)
    shape = ((n,) if n is not None else ()) + (c_in,) + _pair(size, dims)
    x = torch.randn(shape, generator=g, dtype=dtype)
    w = torch.randn((c_in, c_out // groups) + _pair(k, dims), generator=g, dtype=dtype)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    kwargs = dict(stride=stride, padding=padding, output_padding=out_pad, groups=groups, dilation=dilation)
    return x.to(device), w.to(device), (b.to(device) if b is not None else None), kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_values_and_gradients_match_torch(case, dtype, device):
    dims = case[0]
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("torch's CUDA float32 convolutions may use TF32 (cuDNN's allow_tf32): compared in float64")
    x, w, b, kwargs = _make(case, dtype, device=device)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    out = OURS[dims](x, w, b, **kwargs)
    ref = TORCHS[dims](x, w, b, **kwargs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    for g_ours, g_ref in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, leaves, go)):
        torch.testing.assert_close(g_ours, g_ref, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [c for c in CASES if c[1] != 0], ids=str)
def test_gradcheck_and_gradgradcheck(case, device):
    dims = case[0]
    x, w, b, kwargs = _make(case, torch.float64, seed=2, device=device)
    leaves = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)

    def fn(*args):
        return OURS[dims](args[0], args[1], args[2] if len(args) > 2 else None, **kwargs)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


def test_the_conv1d_examples_input_gradient():
    """The tutorial's conv1d example: deltas [-0.1, 0.2] through the filter [0.3, 0.5] give the input gradient
    [-0.03, 0.01, 0.1]; the transposed convolution of those deltas is that gradient."""
    deltas = torch.tensor([[[-0.1, 0.2]]], dtype=torch.float64)
    w = torch.tensor([[[0.3, 0.5]]], dtype=torch.float64)
    expected = torch.tensor([[[-0.03, 0.01, 0.1]]], dtype=torch.float64)
    torch.testing.assert_close(ours.conv_transpose1d(deltas, w), expected)
    x = torch.zeros(1, 1, 3, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(ours.conv1d(x, w), x, deltas)
    torch.testing.assert_close(ours.conv_transpose1d(deltas, w), grad_x)


def test_it_is_the_convolutions_input_gradient_and_upsamples():
    """Stride 2: the transposed convolution is conv2d's input gradient, bit for bit, and doubles the size."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    out = ours.conv2d(x, w, stride=2, padding=1)
    deltas = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (grad_x,) = torch.autograd.grad(out, x, deltas)
    up = ours.conv_transpose2d(deltas, w, stride=2, padding=1)
    assert up.shape == (2, 3, 9, 9) and deltas.shape == (2, 4, 5, 5)
    assert torch.equal(up, grad_x)


def _raises(fn, *words):
    with pytest.raises((RuntimeError, TypeError, ValueError)) as info:
        fn()
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    return info.value


@pytest.mark.parametrize("dims", (1, 2, 3))
def test_bad_arguments_get_torchs_words(dims):
    f, t = OURS[dims], TORCHS[dims]
    sp = (5,) * dims
    x, w = torch.randn(1, 4, *sp), torch.randn(4, 3, *(3,) * dims)
    bad = {
        "channels": (lambda fn: fn(torch.randn(1, 5, *sp), w), "expected input"),
        "groups": (lambda fn: fn(torch.randn(1, 3, *sp), torch.randn(3, 2, *(3,) * dims), groups=2),
                   "expected weight to be divisible by 2 at dimension 0"),
        "output_padding": (lambda fn: fn(x, w, stride=2, output_padding=2),
                           "output padding must be smaller than either stride or dilation"),
        "bias": (lambda fn: fn(x, w, torch.randn(5)), "expected bias to be 1-dimensional with 3 elements"),
        "too small": (lambda fn: fn(torch.randn(1, 4, *(1,) * dims), w, padding=3), "Output size is too small"),
        "stride": (lambda fn: fn(x, w, stride=0), "non-positive stride is not supported"),
        "padding": (lambda fn: fn(x, w, padding=-1), "negative padding is not supported"),
        "negative output_padding": (lambda fn: fn(x, w, output_padding=-1), "negative output_padding is not supported"),
        "groups 0": (lambda fn: fn(x, w, groups=0), "non-positive groups is not supported"),
        "no output channels": (lambda fn: fn(x.double(), torch.randn(4, 0, *(3,) * dims, dtype=torch.float64)),
                               "tensor expected" + (" for weight" if dims == 3 else "") + ", but got: [4, 0"),
        "no input channels": (lambda fn: fn(torch.randn(1, 0, *sp), torch.randn(0, 3, *(3,) * dims)),
                              "expected weight to be at least 1 at dimension 0"),
        "input rank": (lambda fn: fn(torch.randn(4), w), "input to conv_transpose"),
        "zero size": (lambda fn: fn(torch.randn(1, 4, *(0,) + (5,) * (dims - 1)), w),
                      "Only zero batch or zero channel inputs are supported"),
    }
    for name, (call, words) in bad.items():
        _raises(lambda: call(t), words)  # the words are torch's own
        _raises(lambda: call(f), words)
    _raises(lambda: f(x, w, padding="same"), "must be tuple of ints, not str")
    _raises(lambda: f(x, w, stride=(1,) * (dims + 1)), "stride")
    # devices and dtypes: the op's checks (csrc/shape_checks.h), named after the function called
    op = f"conv_transpose{dims}d"
    _raises(lambda: f(x, w.double()), f"{op}: expected scalar type Float but found Double")
    _raises(lambda: f(x, w, torch.randn(3, dtype=torch.float64)), f"{op}: Input type (float) and bias type (double)")
    # an output too large to count is named, with the arguments that make it so (torch: a bare overflow, or its
    # stride wrapped to 0)
    _raises(lambda: f(x, w, stride=2 ** 62), f"{op}: the output of shape", "more elements than int64 can count",
            f"stride=[{2 ** 62}")
    _raises(lambda: f(x.long(), w.long()), f"{op}: expected a floating-point input", "Long")
    _raises(lambda: f(x, w.to("meta")), f"{op}: expected input and weight to be on the same device")


@pytest.mark.parametrize("dims", (1, 2, 3))
def test_modules_output_size_state_and_convert(dims):
    torch_cls = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}[dims]
    ours_cls = {1: tmg.nn.ConvTranspose1d, 2: tmg.nn.ConvTranspose2d, 3: tmg.nn.ConvTranspose3d}[dims]
    torch.manual_seed(4)
    ref = torch_cls(4, 6, 3, stride=2, padding=1, groups=2, dilation=1)
    model = torch.nn.Sequential(ref)
    converted = tmg.convert(torch.nn.Sequential(torch_cls(4, 6, 3, stride=2, padding=1, groups=2)))
    converted.load_state_dict(model.state_dict())
    layer = converted[0]
    assert type(layer) is ours_cls and isinstance(layer, torch_cls)
    x = torch.randn(2, 4, *(5,) * dims)
    for size in (None, [9] * dims, [10] * dims, [2, 6, *([10] * dims)]):
        torch.testing.assert_close(layer(x, output_size=size), ref(x, output_size=size))
    with pytest.raises(ValueError, match="requested an output size"):
        layer(x, output_size=[12] * dims)
    assert tmg.unconverted(converted) == []
    tmg.revert(converted)
    assert type(converted[0]) is torch_cls
    refl = torch_cls(4, 6, 3, padding_mode="zeros")
    refl.padding_mode = "reflect"
    with pytest.raises(ValueError) as theirs:
        refl(x)
    refl.__class__ = ours_cls
    with pytest.raises(ValueError) as ours:  # torch's words, its quoting included
        refl(x)
    assert str(ours.value) == str(theirs.value)


def test_everywhere_routes_torchs_function():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    with tmg.everywhere() as mode:
        out = F.conv_transpose2d(x, w, stride=2)
        out1 = F.conv_transpose1d(x[..., 0], w[..., 0])
    assert mode.served == {"F.conv_transpose2d": 1, "F.conv_transpose1d": 1}
    torch.testing.assert_close(out, F.conv_transpose2d(x, w, stride=2))
    torch.testing.assert_close(out1, F.conv_transpose1d(x[..., 0], w[..., 0]))


def test_channels_last_layout_as_torchs():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3)
    for xx, ww in ((x, w), (x.contiguous(), w.contiguous(memory_format=torch.channels_last)), (x.contiguous(), w)):
        out, ref = ours.conv_transpose2d(xx, ww, stride=2), F.conv_transpose2d(xx, ww, stride=2)
        torch.testing.assert_close(out, ref)
        assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(memory_format=torch.channels_last)
        assert out.is_contiguous() == ref.is_contiguous()


def test_complex_input_matches_torch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.complex128)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.complex128)
    b = torch.randn(2, generator=g, dtype=torch.complex128)
    torch.testing.assert_close(ours.conv_transpose2d(x, w, b, stride=2), F.conv_transpose2d(x, w, b, stride=2))


def test_forward_mode_and_vmap():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    dx, dw = torch.randn_like(x), torch.randn_like(w)
    _, tangent = torch.func.jvp(lambda a, b: ours.conv_transpose2d(a, b, stride=2), (x, w), (dx, dw))
    _, expected = torch.func.jvp(lambda a, b: F.conv_transpose2d(a, b, stride=2), (x, w), (dx, dw))
    torch.testing.assert_close(tangent, expected)
    batched = torch.func.vmap(lambda a: ours.conv_transpose2d(a, w, padding=1))(x.unsqueeze(1))
    torch.testing.assert_close(batched.squeeze(1), F.conv_transpose2d(x, w, padding=1))


def test_bit_identical_across_thread_counts(restore_num_threads):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 8, 9, 9, generator=g)
    w = torch.randn(8, 6, 4, 4, generator=g)
    go = torch.randn(3, 6, 18, 18, generator=g)
    results = []
    for threads in (1, 2, 3, 8):
        torch.set_num_threads(threads)
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = ours.conv_transpose2d(xl, wl, stride=2, padding=1)
        results.append([out.detach(), *torch.autograd.grad(out, (xl, wl), go)])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_compile_and_export():
    """torch.compile traces the conv_backward op (its fake kernel and registered autograd); torch.export keeps it."""
    torch.manual_seed(8)
    model = tmg.convert(torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1), torch.nn.ReLU()))
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    out = torch.compile(model, fullgraph=True)(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref = F.relu(F.conv_transpose2d(x_ref, model[0].weight, model[0].bias, stride=2, padding=1))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, torch.autograd.grad(ref.sum(), x_ref)[0])
    exported = torch.export.export(model, (torch.randn(2, 4, 5, 5),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "manualgrad.conv_backward.default" in targets
    torch.testing.assert_close(exported.module()(x.detach()), ref.detach())


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_an_output_without_positions(dtype):
    """Refused for a non-empty input in every dtype (torch's check; its float32 oneDNN path returns an empty
    tensor instead, README); for an empty batch, an empty output with torch's strides and zero gradients."""
    w = torch.randn(4, 1, 1, 1, dtype=dtype, requires_grad=True)
    kwargs = dict(padding=1, output_padding=(0, 1), dilation=(1, 2))  # height 2 - 2 + 1 = 1, width -2 + 1 + 1 = 0
    x = torch.randn(1, 4, 3, 1, dtype=dtype)
    _raises(lambda: ours.conv_transpose2d(x, w, **kwargs), "Output size is too small")
    with pytest.raises(RuntimeError, match="Output size is too small"):
        F.conv_transpose2d(x.double(), w.detach().double(), **kwargs)
    empty = torch.randn(0, 4, 3, 1, dtype=dtype, requires_grad=True)
    b = torch.randn(1, dtype=dtype, requires_grad=True)
    out, ref = ours.conv_transpose2d(empty, w, b, **kwargs), F.conv_transpose2d(empty, w, b, **kwargs)
    assert out.shape == ref.shape == (0, 1, 1, 0) and out.stride() == ref.stride()
    grads = torch.autograd.grad(out.sum(), (empty, w, b))
    assert grads[0].shape == empty.shape and not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("dims", (1, 2, 3))
def test_an_empty_batch_of_inputs_without_positions(dims):
    """An empty batch whose input has a size of 0 still has positions in its output (the kernel's): torch returns
    that empty output; the convolution the op would run has no valid shape then. A batch that is not empty is
    refused, as torch refuses it."""
    w = torch.randn(4, 3, *(3, 2, 2)[:dims], dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn, ref_fn = (getattr(m, f"conv_transpose{dims}d") for m in (ours, F))
    for size in ((0, 2, 1)[:dims], (1, 0, 2)[:dims] if dims > 1 else (0,)):
        x = torch.randn(0, 4, *size, dtype=torch.float64, requires_grad=True)
        out, ref = fn(x, w, b, stride=2), ref_fn(x, w, b, stride=2)
        assert out.shape == ref.shape and out.numel() == 0
        grads = torch.autograd.grad(out.sum(), (x, w, b))
        assert grads[0].shape == x.shape and not grads[1].any() and not grads[2].any()
        full = torch.randn(2, 4, *size, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="Only zero batch or zero channel inputs are supported"):
            ref_fn(full, w.detach())
        _raises(lambda: fn(full, w), "Only zero batch or zero channel inputs are supported")


@st.composite
def _random_configs(draw):
    dims = draw(st.sampled_from((1, 2, 3)))
    groups = draw(st.sampled_from((1, 2, 3)))
    each = lambda lo, hi: tuple(draw(st.integers(lo, hi - (dims == 3))) for _ in range(dims))  # noqa: E731
    stride, dilation = each(1, 3), each(1, 3)
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    return dict(dims=dims, batch=draw(st.sampled_from((None, 1, 2))), c_in=groups * draw(st.integers(1, 3)),
                c_out=groups * draw(st.integers(1, 3)), kernel=each(1, 4), size=each(1, 6), stride=stride,
                padding=each(0, 3), output_padding=output_padding, dilation=dilation, groups=groups,
                bias=draw(st.booleans()), channels_last=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


@given(c=_random_configs())
@settings(max_examples=80, deadline=None)
def test_random_configurations_agree_with_torch(c):
    """Output, gradients and errors against torch in float64 over random arguments (an output without positions
    included: both refuse it in float64)."""
    dims = c["dims"]
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(((c["batch"],) if c["batch"] else ()) + (c["c_in"],) + c["size"], generator=g, dtype=torch.float64)
    if c["channels_last"] and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w = torch.randn((c["c_in"], c["c_out"] // c["groups"]) + c["kernel"], generator=g, dtype=torch.float64)
    b = torch.randn(c["c_out"], generator=g, dtype=torch.float64) if c["bias"] else None
    kwargs = {k: c[k] for k in ("stride", "padding", "output_padding", "groups", "dilation")}
    try:
        ref = TORCHS[dims](x, w, b, **kwargs)
    except RuntimeError as exc:
        with pytest.raises(RuntimeError) as ours_exc:
            OURS[dims](x, w, b, **kwargs)
        assert str(exc).splitlines()[0].split(" (")[0] in str(ours_exc.value)
        return
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    out = OURS[dims](*leaves[:2], leaves[2] if b is not None else None, **kwargs)
    assert out.shape == ref.shape
    # torch's strides, except on dimensions of size 1, where any stride describes the same layout
    assert [st_ for st_, n in zip(out.stride(), out.shape) if n > 1] == [st_ for st_, n in zip(ref.stride(), ref.shape) if n > 1]
    torch.testing.assert_close(out, ref)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    ref = TORCHS[dims](*ref_leaves[:2], ref_leaves[2] if b is not None else None, **kwargs)
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for ours_grad, ref_grad in zip(torch.autograd.grad(out, leaves, go), torch.autograd.grad(ref, ref_leaves, go)):
        torch.testing.assert_close(ours_grad, ref_grad)


@pytest.mark.parametrize("dims", (1, 2, 3))
@pytest.mark.parametrize("stride", (2, 3, 4))
@pytest.mark.parametrize("dilation", (1, 2))
def test_strided_rows_of_every_width_match_torch(dims, stride, dilation):
    """A stride over the width: col2im adds each tap into the rows' phases, then interleaves them. Every output
    width's remainder by the stride (output_padding), kernels shorter and longer than the stride, against torch in
    float64 (the channels keep it off the grouped and depthwise kernels, the 2-d size off conv_backward_nhwc)."""
    g = torch.Generator().manual_seed(stride * 10 + dilation + dims)
    for kernel in (stride - 1, stride + 1, 2 * stride):
        for extra in range(stride):  # output_padding < stride
            size = (15, 15) if dims == 2 else (3,) * (dims - 1) + (5,)  # 2-d: past the small images' NHWC path
            x = torch.randn((2, 6) + size, generator=g, dtype=torch.float64)
            w = torch.randn((6, 5) + (2,) * (dims - 1) + (kernel,), generator=g, dtype=torch.float64)
            kwargs = dict(stride=(1,) * (dims - 1) + (stride,), padding=(0,) * (dims - 1) + (1,),
                          output_padding=(0,) * (dims - 1) + (extra,), dilation=(1,) * (dims - 1) + (dilation,))
            torch.testing.assert_close(OURS[dims](x, w, **kwargs), TORCHS[dims](x, w, **kwargs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_runs_repeat_bit_for_bit(device):
    """Deterministic by construction on both devices (no atomics in conv_backward's input gradient, nor in the
    convolution and weight gradient its backward calls): repeated runs give the same bits."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 16, 9, 9, generator=g).to(device)
    w = torch.randn(16, 8, 4, 4, generator=g).to(device)
    go = torch.randn(4, 8, 18, 18, generator=g).to(device)
    results = []
    for _ in range(3):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = ours.conv_transpose2d(xl, wl, stride=2, padding=1)
        results.append([out.detach(), *torch.autograd.grad(out, (xl, wl), go)])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("size", (5, 20), ids=("small image (NHWC route)", "larger image"))
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_conv_backward_reads_the_input_only_for_the_weight_gradient(size, layout):
    """What the transposed convolution relies on: asked for the input gradient alone, conv_backward takes its
    input tensor for the shape and layout only. A NaN-filled input gives the same bits as a zero one."""
    ops = torch.ops.manualgrad
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    g = torch.Generator().manual_seed(10)
    w = torch.randn(6, 4, 3, 3, generator=g)
    zeros = torch.zeros(2, 4, size, size).contiguous(memory_format=fmt)
    nans = torch.full_like(zeros, float("nan"))
    out_size = (size + 2 - 3) // 2 + 1
    delta = torch.randn(2, 6, out_size, out_size, generator=g)
    args = ([2, 2], [1, 1], [1, 1], 1, [True, False, False])
    from_zeros = ops.conv_backward(delta, zeros, w, *args)[0]
    from_nans = ops.conv_backward(delta, nans, w, *args)[0]
    assert torch.equal(from_zeros, from_nans) and not from_nans.isnan().any()
    assert from_nans.is_contiguous(memory_format=fmt)


def test_jit_trace_records_torchs_transposed_convolution():
    """The tracer cannot record conv_backward's bool[3] argument: while tracing, torch's conv_transpose runs."""
    torch.manual_seed(11)
    model = tmg.convert(torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3, padding=1),
                                            torch.nn.ConvTranspose1d(4, 2, 4, stride=2, padding=1)))
    x = torch.randn(2, 3, 8)
    traced = torch.jit.trace(model, x)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "manualgrad::conv_forward" in kinds and "aten::_convolution" in kinds
    torch.testing.assert_close(traced(x), model(x))
