"""Grouped convolutions with few channels a group, which the CPU computes directly from phase planes, or for
channels-last outputs from pixel planes with vectors over a group's output channels (csrc/cpu/grouped_cpu.cpp):
values and gradients against torch in float64 across strides, paddings, dilations, layouts and 1-d; gradcheck;
the non-finite cases where the planes' dropped columns would differ from torch's sums; float32 results against
torch's; and the two layouts' forwards and input gradients bit for bit."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg

# (batch, groups, in a group, out a group, kernel, input size, stride, padding, dilation, channels_last)
CASES = [
    (2, 32, 4, 4, (3, 3), (14, 14), 1, 1, 1, False),  # ResNeXt-50's first stage, narrow
    (2, 32, 8, 8, (3, 3), (9, 9), 2, 1, 1, False),  # its stride-2 blocks: four phase planes
    (1, 8, 32, 32, (3, 3), (7, 7), 1, 1, 1, True),  # its last stage, channels-last
    (3, 4, 3, 5, (3, 2), (11, 13), (2, 3), (1, 2), (2, 1), False),  # in and out a group differ; every knob
    (2, 2, 16, 8, (5, 5), (6, 8), 1, 4, 1, True),  # padding past the kernel's reach: the input gradient crops
    (2, 4, 2, 6, (3, 3), (5, 5), 3, 0, 2, False),
    (1, 2, 16, 16, (3, 3), (150, 40), 1, 1, 1, False),  # planes of several bands of rows
    (5, 16, 2, 2, (1, 1), (8, 8), 2, 0, 1, True),  # pointwise with a stride: phases no tap reads
    (2, 4, 4, 4, (1, 2), (10, 9), 3, 0, 1, False),  # ...as rows of phases, in NCHW
    (1, 2, 16, 16, (3, 3), (301, 41), 2, 1, 1, False),  # the input gradient's phases in several bands of rows
    # channels-last with a group's channels no whole vector: the plane kernels, their rows gathered and scattered
    # 4 channels x 4 pixels at a time (the rest one by one)
    (2, 8, 4, 4, (3, 3), (13, 13), 1, 1, 1, True),  # ResNeXt-50's first stage
    (2, 4, 6, 6, (3, 3), (10, 11), 2, 1, 1, True),  # 4 channels and 2 more, a stride
    (2, 4, 4, 4, (7,), (50,), 1, 3, 1, False),  # 1-d
    (2, 3, 5, 2, (4,), (33,), 3, 2, 2, False),
    # channels-last outputs whose group's output channels fill whole vectors: the pixel kernels (64-byte vectors
    # of 16 floats or 8 doubles, 32-byte ones of 8 floats), blocks of groups, several vectors a group, bands
    (2, 4, 16, 16, (3, 3), (9, 9), 1, 1, 1, True),
    (2, 2, 8, 16, (3, 3), (11, 11), 2, 1, 1, True),  # input gradient: 8 a group, 32-byte vectors in float32
    (1, 2, 48, 48, (3, 3), (7, 7), 1, 1, 1, True),  # three vectors a group
    (1, 2, 64, 64, (3, 3), (6, 5), 1, 1, 1, True),  # four
    (2, 2, 8, 24, (3, 2), (10, 13), (2, 3), (2, 1), (2, 1), True),
    # the weight gradient's blocks of terms (8 for one vector of output channels, 6 for two): 45 terms, two tasks
    # a group (24 and 21 terms), the second ending in terms one at a time; 27 terms over one 32-byte vector
    (2, 2, 5, 16, (3, 3), (9, 10), 1, 1, 1, True),
    (2, 2, 3, 8, (3, 3), (9, 10), 1, 1, 1, True),
    (2, 5, 16, 16, (3, 3), (12, 11), 2, 1, 1, True),  # strided: a task's 4 groups copied together, then 1
    # strided 3x3 over 64 channels a task: the weight gradient by whole input channels (pixel_weight_taps), 27
    # terms and 9, two vectors a group one after the other
    (1, 4, 32, 32, (3, 3), (15, 17), 2, 1, 1, True),
    (1, 2, 4, 8, (3, 3), (8, 40), 1, 1, 1, True),  # one vector, few dropped columns: the forward's blocks by step
    (1, 2, 16, 16, (3, 3), (150, 40), 1, 1, 1, True),  # bands of rows
]


def _tensors(case, dtype, seed=0):
    batch, groups, cin, cout, kernel, size, *_, channels_last = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, groups * cin, *size, generator=gen, dtype=dtype)
    w = torch.randn(groups * cout, cin, *kernel, generator=gen, dtype=dtype)
    b = torch.randn(groups * cout, generator=gen, dtype=dtype)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    return x, w, b


def _run(conv, case, x, w, b, grad_output=None, grad_layout=None):
    """Output and gradients; a new grad_output is laid out as the output is (as a channels-last model's gradient
    arrives: the pixel kernels' weight gradient needs it), or as grad_layout says."""
    *_, stride, padding, dilation, _cl = case
    groups = case[1]
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = conv(*leaves, stride, padding, dilation, groups)
    if grad_output is None:
        grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
        if grad_layout is None and y.dim() == 4 and not y.is_contiguous():
            grad_layout = torch.channels_last
        grad_output = grad_output.contiguous(memory_format=grad_layout or torch.contiguous_format)
    return [y, *torch.autograd.grad(y, leaves, grad_output)], grad_output


def _convs(case):
    return (tmg.functional.conv1d, F.conv1d) if len(case[4]) == 1 else (tmg.functional.conv2d, F.conv2d)


@pytest.mark.parametrize("grad_layout", [None, torch.contiguous_format], ids=["grad_as_output", "grad_nchw"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_grouped_matches_torch_in_float64(case, grad_layout):
    if grad_layout is not None and not case[-1]:
        pytest.skip("an NCHW output's grad_output is NCHW already")
    ours_conv, torch_conv = _convs(case)
    x, w, b = _tensors(case, torch.float64)
    theirs, go = _run(torch_conv, case, x, w, b, grad_layout=grad_layout)
    ours, _ = _run(ours_conv, case, x, w, b, go)
    for name, a, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)
    if case[-1]:  # channels-last in, channels-last out, as torch's
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layouts", ["x nchw, w cl, go nchw", "x cl, w nchw, go nchw", "x nchw, w cl, go cl"])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_mixed_layouts_match_torch(layouts, stride):
    """A channels-last weight with an NCHW input (or grad_output) makes a channels-last output: the pixel kernels
    then read a tensor whose channels are strided, in float64 against torch."""
    fmt = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
    xl, wl, gl = (fmt[part.split()[1]] for part in layouts.split(", "))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, 9, 9, generator=gen, dtype=torch.float64)
    w = torch.randn(64, 8, 3, 3, generator=gen, dtype=torch.float64)
    go = torch.randn(2, 64, (9 + 2 - 3) // stride + 1, (9 + 2 - 3) // stride + 1, generator=gen, dtype=torch.float64)
    results = []
    for conv, x_, w_ in ((F.conv2d, x, w), (tmg.functional.conv2d, x.contiguous(memory_format=xl),
                                            w.contiguous(memory_format=wl))):
        leaves = [t.detach().clone().requires_grad_() for t in (x_, w_)]
        y = conv(*leaves, None, stride, 1, 1, 4)
        results.append([y, *torch.autograd.grad(y, leaves, go.contiguous(memory_format=gl))])
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_grouped_on_a_strided_view_matches_torch():
    x = torch.randn(2, 24, 12, 20, dtype=torch.float64)[:, 4:20, :, ::2]  # channels and columns of a larger tensor
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    y = tmg.functional.conv2d(x, w, None, 1, 1, 1, 4)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1, 1, 4), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_gradcheck(stride):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: tmg.functional.conv2d(*t, stride, (1, 2), (2, 1), 2), (x, w, b))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_grouped_non_finite_values_give_torchs_nan_and_inf(stride, dtype):
    """An infinite or NaN input pixel, an infinite output gradient at the border, an infinite weight: NaN and inf
    land exactly where torch's do. (The planes' dropped columns read input pixels that a tap never meets in torch's
    sums; 0 × inf there would be NaN, so a band with a value that is not finite is summed exactly.)"""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 7, 7, generator=gen, dtype=dtype)
    w = torch.randn(8, 2, 3, 3, generator=gen, dtype=dtype)
    x[0, 1, 6, 6], x[1, 4, 0, 3] = math.inf, math.nan
    case = (2, 4, 2, 2, (3, 3), (7, 7), stride, 1, 1, False)
    go = torch.randn(F.conv2d(x, w, None, stride, 1, 1, 4).shape, generator=gen, dtype=dtype)
    go[0, 0, 0, 0] = math.inf
    w_inf = w.clone()
    w_inf[3, 1, 0, 0] = math.inf
    for weight, x_used in ((w, x), (w_inf, torch.randn(x.shape, generator=gen, dtype=dtype))):
        b = torch.zeros(8, dtype=dtype)
        theirs, _ = _run(F.conv2d, case, x_used, weight, b, go)
        ours, _ = _run(tmg.functional.conv2d, case, x_used, weight, b, go)
        for a, e in zip(ours, theirs):
            assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf())
            torch.testing.assert_close(a.nan_to_num(0, 0, 0), e.nan_to_num(0, 0, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_grouped_channels_last_non_finite_values_give_torchs_nan_and_inf(stride, dtype):
    """The same through the pixel kernels (16 output channels a group, 8 input channels: both vector widths in
    float32): an infinite and a NaN input pixel, an infinite output gradient at the border, an infinite weight.
    Against torch's float64 results: its float32 kernels skip the padding for some shapes (no 0 × inf there) and
    not for others, so their NaN at the border depend on the shape; ours, in both dtypes, are float64's."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 16, 9, 9, generator=gen, dtype=torch.float64)
    w = torch.randn(32, 8, 3, 3, generator=gen, dtype=torch.float64)
    x[0, 1, 8, 8], x[1, 12, 0, 3] = math.inf, math.nan
    case = (2, 2, 8, 16, (3, 3), (9, 9), stride, 1, 1, True)
    go = torch.randn(F.conv2d(x, w, None, stride, 1, 1, 2).shape, generator=gen, dtype=torch.float64)
    go[0, 3, 0, 0] = -math.inf
    go = go.contiguous(memory_format=torch.channels_last)
    w_inf = w.clone()
    w_inf[20, 5, 2, 1] = math.inf
    for weight, x_used in ((w, x), (w_inf, torch.randn(x.shape, generator=gen, dtype=torch.float64))):
        cl = [t.contiguous(memory_format=torch.channels_last) for t in (x_used, weight)]
        b = torch.zeros(32, dtype=torch.float64)
        theirs, _ = _run(F.conv2d, case, *cl, b, go)
        ours, _ = _run(tmg.functional.conv2d, case, *[t.to(dtype) for t in (*cl, b, go)][:3], go.to(dtype))
        for a, e in zip(ours, theirs):
            assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.isinf(), e.isinf())
            torch.testing.assert_close(a.double().nan_to_num(0, 0, 0), e.nan_to_num(0, 0, 0), rtol=1e-4, atol=1e-4)


def _output_and_input_gradient_in_both_layouts(case, x, w, b):
    """Our 2-d output and input gradient with x and w NCHW, then channels-last (the same grad_output in each layout),
    and that grad_output."""
    go = None
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        inputs = [t.contiguous(memory_format=layout) if t.dim() == 4 else t for t in (x, w, b)]
        (y, gx, _, _), go = _run(tmg.functional.conv2d, case, *inputs,
                                 None if go is None else go.contiguous(memory_format=layout))
        results.append((y, gx))
    return results[0], results[1], go


@pytest.mark.parametrize("case", [c for c in CASES if c[-1] and len(c[4]) == 2], ids=str)
def test_grouped_channels_last_forward_and_input_gradient_are_the_nchw_bits(case):
    """The pixel kernels add each output's terms in the order, and in the runs, the plane kernels do (a weight
    vector times a broadcast input instead of a weight times an input vector): the same float32 bits in either
    layout. (The weight gradients differ: the plane kernels add lanes, the pixel kernels images.)"""
    nchw, channels_last, _ = _output_and_input_gradient_in_both_layouts(case, *_tensors(case, torch.float32, seed=2))
    for a, e in zip(channels_last, nchw):
        assert torch.equal(a, e)


@pytest.mark.parametrize("vector_bytes", ["64", "32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("groups, per_group, stride", [(4, 16, 1), (4, 16, 2), (2, 32, 1), (8, 8, 1), (8, 8, 2)],
                         ids=str)
def test_grouped_channels_last_row_runs_are_the_nchw_bits(groups, per_group, stride, dtype, vector_bytes,
                                                          monkeypatch):
    """Where a task's input channels fill the planes (64 a pixel) and a group's output channels are one or two
    vectors, the channels-last forward takes each output row in runs of up to 14 outputs (pixel_forward_rows): rows
    of 1 to 45 outputs, so every run length, give the NCHW (plane kernels') bits for the forward and the input
    gradient, and torch's values."""
    monkeypatch.setenv("TORCH_MANUALGRAD_VECTOR_BYTES", vector_bytes)
    for width in (*range(1, 16), 29, 45):
        case = (2, groups, per_group, per_group, (3, 3), (3, stride * (width - 1) + 1), stride, 1, 1, True)
        x, w, b = _tensors(case, dtype, seed=width)
        nchw, channels_last, go = _output_and_input_gradient_in_both_layouts(case, x, w, b)
        assert channels_last[0].shape[-1] == width
        for a, e in zip(channels_last, nchw):
            assert torch.equal(a, e)
        expected, _ = _run(F.conv2d, case, *(t.double() for t in (x, w, b)), go.double())
        for a, e in zip(channels_last, expected):
            torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan_in_one_group"])
@pytest.mark.parametrize("case", [(2, 8, 4, 4, (3, 3), (13, 13), 1, 1, 1, True),  # blocks of 4 groups
                                  (2, 4, 6, 6, (3, 3), (10, 11), 2, 1, 1, True),  # blocks of 2 (4 do not fill 3)
                                  (3, 6, 2, 5, (3, 3), (9, 8), 1, 1, 1, True),  # all 6 groups: 8 would fill
                                  # few groups: the weight gradient's tasks split each group's output channels
                                  # and sum the images in chunks (fewer than the batch), in either layout
                                  (8, 4, 6, 6, (3, 3), (28, 28), 1, 1, 1, True)],
                         ids=str)
def test_grouped_channels_last_plane_kernels_are_the_nchw_bits(case, nan):
    """Channels-last groups of fewer channels than a cache line take the plane kernels a block of groups a task
    (whole lines copied and written), NCHW one group a task: each group's sums are the same, so all three results
    are the same bits in either layout, also where one group's input holds a NaN (that group's weight gradient is
    summed exactly, the others' as before)."""
    x, w, b = _tensors(case, torch.float32, seed=3)
    if nan:
        x[1, case[2] + 1, 4, 5] = math.nan  # the second group's second channel
    go = None
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        inputs = [t.contiguous(memory_format=layout) if t.dim() == 4 else t for t in (x, w, b)]
        got, go = _run(tmg.functional.conv2d, case, *inputs, None if go is None else go.contiguous(memory_format=layout))
        results.append(got)
    for a, e in zip(results[1], results[0]):
        assert torch.equal(a.isnan(), e.isnan())
        assert torch.equal(a.nan_to_num(0, 0, 0), e.nan_to_num(0, 0, 0))
    expected, _ = _run(F.conv2d, case, *(t.double() for t in (x, w, b)), go.double())
    for a, e in zip(results[1], expected):
        assert torch.equal(a.isnan(), e.isnan())
        torch.testing.assert_close(a.double().nan_to_num(0, 0, 0), e.nan_to_num(0, 0, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES[:4] + CASES[-11:-1], ids=str)
def test_grouped_float32_is_as_close_to_float64_as_torchs(case):
    """Our float32 output and gradients against the float64 truth: no more than twice torch's float32 error."""
    ours_conv, torch_conv = _convs(case)
    x, w, b = _tensors(case, torch.float64, seed=1)
    truth, go = _run(torch_conv, case, x, w, b)
    f = [t.float() for t in (x, w, b)]
    ours, _ = _run(ours_conv, case, *f, go.float())
    theirs, _ = _run(torch_conv, case, *f, go.float())
    for name, a, e, t in zip(("output", "grad_input", "grad_weight", "grad_bias"), ours, theirs, truth):
        ours_err, torch_err = (a.double() - t).norm(), (e.double() - t).norm()
        assert ours_err <= 2 * torch_err + 1e-6 * t.norm(), (name, ours_err.item(), torch_err.item())


def test_strided_input_gradient_whose_phases_together_pass_the_task_bound_matches_torch():
    """Stride 4x4, 64 input channels but one output channel a group, 4100 wide: every phase's tile of a band together
    would pass a task's bound (4M elements), so the phases run one after another; the values are torch's."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 128, 16, 4100, generator=gen)
    w = torch.randn(2, 64, 4, 4, generator=gen)
    go = torch.randn(1, 2, 4, 1025, generator=gen)
    ours = torch.ops.manualgrad.conv_backward(go, x, w, [4, 4], [0, 0], [1, 1], 2, [True, False, False])[0]
    theirs = torch.ops.aten.convolution_backward(go, x, w, None, [4, 4], [0, 0], [1, 1], False, [0, 0], 2,
                                                 [True, False, False])[0]
    torch.testing.assert_close(ours, theirs)


# ---- 3x3 stride-1 groups of 16 channels and more: Winograd's F(2x2, 3x3) (float32) ----
# (batch, groups, in a group, out a group, input size, padding, layout)
# Forward and input gradient from 14x14 outputs (of the forward, and of the input gradient's: the input), the weight
# gradient from 7x7 (grouped_cpu.cpp's winograd_group_applies).
WINOGRAD_CASES = [
    (2, 4, 16, 16, (14, 14), 1, "nchw"),  # a block of tile rows spans both images
    (2, 4, 16, 16, (14, 14), 1, "channels_last"),
    (3, 2, 16, 16, (14, 14), 1, "channels_last"),  # blocks of 17 and 4 tile rows
    (1, 2, 32, 32, (7, 7), 1, "channels_last"),  # ResNeXt-50's last stage: the weight gradient only
    (2, 3, 16, 32, (15, 20), 1, "nchw"),  # odd and non-square: tiles past the output
    (1, 2, 16, 16, (150, 40), 1, "nchw"),  # many blocks in one image
    (2, 2, 64, 64, (16, 18), 0, "channels_last"),
    (2, 2, 16, 16, (14, 15), 2, "nchw"),  # the input gradient's padding 0
    (1, 2, 16, 16, (16, 16), 3, "nchw"),  # ...and -1: it crops
    (2, 2, 48, 16, (8, 9), 1, "nchw"),  # in and out a group differ; the weight gradient only
]


def _winograd_tensors(case, seed=0):
    batch, groups, cin, cout, size, padding, layout = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, groups * cin, *size, generator=gen)
    w = torch.randn(groups * cout, cin, 3, 3, generator=gen) / (9 * cin) ** 0.5
    b = torch.randn(groups * cout, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


def _winograd_run(case, x, w, b, go=None, conv=tmg.functional.conv2d, dtype=torch.float32):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    y = conv(*leaves, 1, case[5], 1, case[1])
    if go is None:
        go = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
        if case[-1] == "channels_last":
            go = go.contiguous(memory_format=torch.channels_last)
    return [y.detach(), *torch.autograd.grad(y, leaves[:2], go.to(dtype))], go


@pytest.fixture
def winograd_on(monkeypatch):
    """The test runs with TORCH_MANUALGRAD_WINOGRAD=1: Winograd wherever it applies, also where this CPU's default
    takes the pixel kernels' rows (channels-last forwards on Intel CPUs with AVX-512)."""
    monkeypatch.setenv("TORCH_MANUALGRAD_WINOGRAD", "1")


@pytest.fixture
def winograd_off(monkeypatch):
    """Runs a function with TORCH_MANUALGRAD_WINOGRAD=0: the direct kernels."""

    def run(fn, *args, **kwargs):
        before = os.environ.get("TORCH_MANUALGRAD_WINOGRAD")
        monkeypatch.setenv("TORCH_MANUALGRAD_WINOGRAD", "0")
        try:
            return fn(*args, **kwargs)
        finally:
            if before is None:
                monkeypatch.delenv("TORCH_MANUALGRAD_WINOGRAD")
            else:
                monkeypatch.setenv("TORCH_MANUALGRAD_WINOGRAD", before)

    return run


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=str)
def test_grouped_winograd_against_float64_and_the_direct_kernels(case, winograd_on, winograd_off):
    """Forward and both gradients by Winograd where it applies: its sums regrouped, close to the direct kernels' but
    in other bits, within float32's rounding of the float64 truth."""
    x, w, b = _winograd_tensors(case)
    ours, go = _winograd_run(case, x, w, b)
    direct, _ = winograd_off(_winograd_run, case, x, w, b, go)
    truth, _ = _winograd_run(case, x, w, b, go, F.conv2d, torch.float64)
    for i, (a, d, t) in enumerate(zip(ours, direct, truth)):
        assert a.shape == t.shape and a.is_contiguous(memory_format=torch.channels_last) == d.is_contiguous(
            memory_format=torch.channels_last)
        assert ((a.double() - t).norm() / t.norm()).item() < 1e-6
        torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-5 * max(1.0, d.abs().max().item()))
        out_side = min(s + 2 * case[5] - 2 for s in case[4])
        winograd = (out_side >= 14, min(case[4]) >= 14, out_side >= 7)[i]
        assert torch.equal(a, d) != winograd, i


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("where", ["input", "weight", "grad_output"])
def test_grouped_winograd_values_that_are_not_finite_take_the_direct_sums(where, layout, winograd_on, winograd_off):
    """An infinity spreads through the transforms (inf - inf) to outputs a direct sum keeps finite or infinite: a
    piece with a value that is not finite is the direct kernels' own, bit for bit, NaN and infinities where torch's
    float64 sums have them. (An infinite weight sends the input gradient to im2col: grouped_backward_input_applies.)"""
    case = (2, 2, 16, 16, (14, 15), 1, layout)
    x, w, b = _winograd_tensors(case, seed=4)
    go = torch.randn(2, 32, 14, 15, generator=torch.Generator().manual_seed(5))
    if where == "input":
        x[0, 3, 4, 4], x[1, 20, 0, 14] = math.inf, math.nan
    elif where == "weight":
        w[5, 2, 0, 1] = -math.inf
    else:
        go[1, 17, 13, 0] = math.inf
    if layout == "channels_last":
        x, go = x.contiguous(memory_format=torch.channels_last), go.contiguous(memory_format=torch.channels_last)
    ours, _ = _winograd_run(case, x, w, b, go)
    direct, _ = winograd_off(_winograd_run, case, x, w, b, go)
    truth, _ = _winograd_run(case, x, w, b, go, F.conv2d, torch.float64)
    reads = {"input": (0, 2), "weight": (0, 1), "grad_output": (1, 2)}[where]
    for i, (a, d, t) in enumerate(zip(ours, direct, truth)):
        assert torch.equal(a.isnan(), t.isnan()) and torch.equal(a.isinf(), t.isinf()), i
        if i in reads:
            assert not a.isfinite().all()
            torch.testing.assert_close(a, d, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grouped_winograd_takes_a_strided_input_gradients_3x3_phases(layout, winograd_on, winograd_off):
    """A 5x5/2 layer's input gradient is a forward per phase of the input; the even-even phase's taps {4, 2, 0} in
    both dimensions make a 3x3 stride-1 forward over 15x15 outputs, which Winograd computes into the strided phase
    (the channels-last one; NCHW rows take the phases together, one kernel): float64's values, and in
    channels-last other bits than the direct kernels'."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 32, 30, 30, generator=gen)
    w = torch.randn(32, 16, 5, 5, generator=gen) / 20
    go = torch.randn(2, 32, 15, 15, generator=gen)
    if layout == "channels_last":
        x, go = x.contiguous(memory_format=torch.channels_last), go.contiguous(memory_format=torch.channels_last)

    def grad_input(dtype=torch.float32, conv=tmg.functional.conv2d):
        xs = x.to(dtype).requires_grad_()
        y = conv(xs, w.to(dtype), None, 2, 2, 1, 2)
        return torch.autograd.grad(y, xs, go.to(dtype))[0]

    ours, direct, truth = grad_input(), winograd_off(grad_input), grad_input(torch.float64, F.conv2d)
    assert ((ours.double() - truth).norm() / truth.norm()).item() < 1e-6
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-5 * direct.abs().max().item())
    assert torch.equal(ours, direct) == (layout == "nchw")


@pytest.mark.parametrize("case", [WINOGRAD_CASES[0], WINOGRAD_CASES[2], WINOGRAD_CASES[3], WINOGRAD_CASES[5]], ids=str)
def test_grouped_winograd_bit_identical_at_every_thread_count(case, restore_num_threads, winograd_on):
    x, w, b = _winograd_tensors(case, seed=6)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(_winograd_run(case, x, w, b)[0])
    for other in results[1:]:
        assert all(torch.equal(a, e) for a, e in zip(results[0], other))


@pytest.mark.parametrize("route", ["default", "winograd"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grouped_winograd_error_no_worse_than_torchs(layout, route, monkeypatch):
    """ResNeXt-50's 3x3 over 32 groups of 16 at 14x14, batch 8: forward and both gradients in float32 against the
    float64 truth, normwise, at most torch's float32 error; the weight gradient at most 1.25x it (on this seed torch's
    channels-last one is 2.00e-7 relative, ours 1.98e-7, the direct kernels' 2.41e-7; torch's NCHW one 6.8e-7). By
    Winograd, and by what this CPU takes by default (on Intel's, the pixel kernels' rows for channels-last)."""
    if route == "winograd":
        monkeypatch.setenv("TORCH_MANUALGRAD_WINOGRAD", "1")
    case = (8, 32, 16, 16, (14, 14), 1, layout)
    x, w, b = _winograd_tensors(case, seed=8)
    truth, go = _winograd_run(case, x, w, b, None, F.conv2d, torch.float64)
    ours, _ = _winograd_run(case, x, w, b, go)
    theirs, _ = _winograd_run(case, x, w, b, go, F.conv2d)
    for i in (0, 1, 2):
        ours_err, torch_err = (ours[i].double() - truth[i]).norm(), (theirs[i].double() - truth[i]).norm()
        assert ours_err <= (1.25 if i == 2 else 1.0) * torch_err, (i, ours_err.item(), torch_err.item())


def _intel_running_the_64_byte_copy():
    """As csrc/cpu/vectorize.h decides: an Intel CPU, and the 64-byte copy (TORCH_MANUALGRAD_VECTOR_BYTES, else
    AVX-512F)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's vendor from")
    choice = os.environ.get("TORCH_MANUALGRAD_VECTOR_BYTES")
    wide = choice == "64" or (choice != "32" and " avx512f" in info)
    return "GenuineIntel" in info and wide


@pytest.mark.parametrize("case, rows_on_intel", [(WINOGRAD_CASES[1], True),
                                                 ((1, 2, 32, 32, (14, 14), 1, "channels_last"), True),  # 2 vectors
                                                 (WINOGRAD_CASES[2], False),  # 32 channels: a task's planes hold 64
                                                 (WINOGRAD_CASES[6], False)],  # 4 vectors of output channels
                         ids=str)
def test_grouped_channels_last_forward_route_follows_the_cpu(case, rows_on_intel, winograd_off, monkeypatch):
    """Channels-last forwards and input gradients that Winograd could take and the pixel kernels' rows could too (a
    group's output channels one or two 64-byte vectors, 64 input channels side by side) go, by default, to those
    rows on Intel CPUs with AVX-512 (the direct kernels' bits), to Winograd elsewhere (its bits); the weight
    gradient stays Winograd's everywhere. TORCH_MANUALGRAD_WINOGRAD=1 gives Winograd all three."""
    x, w, b = _winograd_tensors(case, seed=3)
    default, go = _winograd_run(case, x, w, b)
    direct, _ = winograd_off(_winograd_run, case, x, w, b, go)
    monkeypatch.setenv("TORCH_MANUALGRAD_WINOGRAD", "1")
    winograd, _ = _winograd_run(case, x, w, b, go)
    rows = rows_on_intel and _intel_running_the_64_byte_copy()
    for i in (0, 1):
        assert not torch.equal(winograd[i], direct[i]), i  # the two routes differ in bits here
        assert torch.equal(default[i], direct[i] if rows else winograd[i]), i
    assert torch.equal(default[2], winograd[2]) and not torch.equal(winograd[2], direct[2])
