"""The CPU's channels-last (NHWC) paths (csrc/cpu/conv_cpu.cpp, conv_*_nhwc; csrc/cpu/max_pool_cpu.cpp,
max_pool_*_nhwc): a channels-last input is computed in its own layout and the results come back
channels-last. Values and gradients against torch's float64 results (max-pool: exactly torch's, indices
included), gradcheck, the layouts against the fake kernels', bit-identical across thread counts and to
the NCHW kernels' results."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torch_manualgrad as tmg
from common import ConvCase

CL = torch.channels_last
ops = torch.ops.manualgrad

# Every branch of the NHWC path: im2col tiles, the whole-batch weight gradient and its partial slots, pointwise
# products (tiles of rows across images), groups, stride, dilation, padding, no bias, and the depthwise
# layer that keeps its NCHW kernel.
CASES = [
    ConvCase(2, 3, 8, 12, (3, 3), (11, 10), padding=1),
    ConvCase(2, 2, 6, 4, (3, 2), (13, 12), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
    ConvCase(2, 2, 8, 12, (3, 3), (9, 9), padding=1, groups=4),
    ConvCase(2, 4, 16, 24, (1, 1), (20, 21)),  # pointwise
    ConvCase(2, 3, 8, 16, (1, 1), (15, 15), stride=2),  # 1x1 strided: columns
    ConvCase(2, 2, 8, 8, (3, 3), (12, 12), padding=1, groups=8),  # depthwise: its direct NHWC kernel
    ConvCase(2, 3, 70, 70, (7, 7), (9, 8), padding=3, groups=70),  # ConvNeXt's: channel blocks of 64 and a rest
    ConvCase(2, 2, 6, 6, (3, 3), (11, 11), stride=2, padding=1, dilation=2, groups=6, bias=False),
    ConvCase(2, 2, 4, 8, (3, 3), (10, 10), padding=1, groups=4),  # multiplier 2: the NCHW kernel, converted
    ConvCase(2, 2, 16, 32, (3, 3), (96, 96), padding=1),  # float32: Winograd (test_winograd.py)
    ConvCase(2, 2, 16, 32, (5, 5), (96, 96), padding=2),  # columns beyond one workspace: partial slots
    ConvCase(2, 1, 3, 8, (4, 4), (32, 32), stride=4),  # a ConvNeXt stem
    ConvCase(2, 2, 5, 7, (3, 3), (2, 2), padding=2),  # windows mostly in the padding
    ConvCase(2, 9, 12, 20, (3, 3), (7, 7), stride=1, padding=1),  # input gradient: blocks of 2 images and a last of 1
    ConvCase(2, 2, 3, 20, (7, 7), (23, 22), stride=2, padding=3),  # few terms (K = 147): small_k_rows, a partial vector
    ConvCase(2, 3, 5, 40, (3, 3), (13, 17), stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=False),  # K = 45
    # fewer than 512 rows: the tasks split the output channels (two of 80 here; one per group below)
    ConvCase(2, 2, 32, 160, (3, 3), (9, 9), stride=2, padding=1),
    ConvCase(2, 1, 64, 96, (1, 1), (7, 7), groups=2, bias=False),
    # pointwise: tiles of rows fewer where the weight outweighs a tile (2 here); one tile of rows, where the input
    # gradient's tasks split the input channels (5 of 128)
    ConvCase(2, 2, 256, 64, (1, 1), (14, 14)),
    ConvCase(2, 1, 640, 48, (1, 1), (7, 7)),
    ConvCase(2, 1, 512, 160, (1, 1), (7, 7), groups=2),  # ...two tasks a group: the second group's offsets
    # a batch of one at 14x14: two tiles of 98 rows, each one blocked product (small products of 40 rows would cut
    # it in three)
    ConvCase(2, 1, 192, 128, (1, 1), (14, 14)),
    # a batch of one: the input gradient's tasks split the input channels (two of 80 and of 16 here), a product per
    # tap; with fewer than 32 channels one task of the whole image
    ConvCase(2, 1, 160, 24, (3, 3), (9, 8), stride=2, padding=1, dilation=(1, 2)),
    ConvCase(2, 1, 32, 20, (5, 5), (7, 6), padding=2),
    ConvCase(2, 1, 12, 20, (5, 5), (7, 6), padding=2),
    # ...and so for 3 or 5 image tasks where the input channels make pieces of 128 (two here)
    ConvCase(2, 3, 256, 24, (3, 3), (7, 7), padding=1),
    ConvCase(2, 5, 256, 16, (3, 3), (9, 8), stride=2, padding=1, bias=False),
    # ...and the weight gradient's tasks split the columns' 1152 columns (two of 576)
    ConvCase(2, 1, 128, 16, (3, 3), (20, 20), stride=2, padding=1),
    # 7-wide depthwise kernels (depthwise_cpu.cpp's forward_nhwc_rows): ConvNeXt's 7x7 over zero-padded rows, a 3x7
    # with a stride, a 1x7 with a dilation (the runs that step through the row one tap at a time)
    ConvCase(2, 2, 20, 20, (7, 7), (16, 16), padding=3, groups=20),
    ConvCase(2, 2, 20, 20, (3, 7), (12, 23), stride=2, padding=(1, 3), groups=20),
    ConvCase(2, 2, 20, 20, (1, 7), (9, 30), dilation=(1, 2), padding=(0, 6), groups=20),
    # depthwise rows whose interior runs keep the taps' weights in registers (3x3 and 5x5), with a channel tail
    # past the last full vector, stride, dilation and padding that leaves no interior
    ConvCase(2, 2, 40, 40, (3, 3), (9, 13), padding=1, groups=40),
    ConvCase(2, 3, 20, 20, (5, 5), (12, 11), stride=2, padding=2, groups=20),
    ConvCase(2, 2, 18, 18, (3, 3), (10, 12), padding=2, dilation=2, groups=18, bias=False),
    ConvCase(2, 2, 17, 17, (5, 5), (4, 4), padding=2, groups=17),
    # grouped, with whole vectors of output channels a group: the pixel kernels of grouped_cpu.cpp (16 a group in
    # and out; 8 in and 16 out with a stride, whose input gradient has 32-byte vectors in float32; 48 a group)
    ConvCase(2, 2, 64, 64, (3, 3), (9, 9), padding=1, groups=4),
    ConvCase(2, 3, 16, 32, (3, 3), (11, 10), stride=2, padding=1, groups=2),
    ConvCase(2, 2, 96, 96, (3, 3), (7, 7), padding=1, groups=2, bias=False),
    # pointwise with few channels: where the BLAS has small-matrix kernels (OpenBLAS on AVX-512), the forward and
    # the input gradient as products of a few dozen rows (small_product_rows: 61 rows a product here, the last one
    # shorter; 162 and 138 below, the forward in runs of 256 and 44 terms)
    ConvCase(2, 4, 256, 64, (1, 1), (20, 21)),
    ConvCase(2, 2, 300, 24, (1, 1), (16, 16), bias=False),
    # ...and columns: a 3x3 stride 2 (K = 288: products of 81 rows in runs of 256 and 32 terms; input gradient 72)
    ConvCase(2, 4, 32, 48, (3, 3), (30, 29), stride=2, padding=1),
]


def _cl_tensors(case, dtype, seed):
    x, w, b = case.make_tensors("cpu", dtype, requires_grad=False, seed=seed)
    x = x.contiguous(memory_format=CL).requires_grad_()
    w = w.contiguous(memory_format=CL).requires_grad_()
    return x, w, (b.requires_grad_() if b is not None else None)


def _normwise(t, truth):
    return ((t.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_channels_last_values_and_gradients(case):
    x, w, b = _cl_tensors(case, torch.float32, seed=1)
    go = case.make_grad_output("cpu", torch.float32, seed=2).contiguous(memory_format=CL)
    leaves = [t for t in (x, w, b) if t is not None]
    ours = tmg.functional.conv2d(x, w, b, **case.kwargs())
    theirs = F.conv2d(x, w, b, **case.kwargs())
    wide = [t.detach().double().requires_grad_() for t in leaves]
    truth = F.conv2d(*wide, **case.kwargs()) if b is not None else F.conv2d(wide[0], wide[1], None, **case.kwargs())
    results = [(ours, theirs, truth)]
    results += zip(torch.autograd.grad(ours, leaves, go), torch.autograd.grad(theirs, leaves, go),
                   torch.autograd.grad(truth, wide, go.double()))
    for o, t, exact in results:
        # torch's memory format (strides may differ on a dimension of size 1, where both formats apply)
        assert o.is_contiguous(memory_format=CL) == t.is_contiguous(memory_format=CL)
        assert o.is_contiguous() == t.is_contiguous()
        assert _normwise(o, exact) <= 4 * _normwise(t, exact) + 8 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("case", CASES[:9], ids=str)
def test_ops_return_channels_last_and_match_their_fake_kernels(case):
    x, w, b = _cl_tensors(case, torch.float64, seed=3)
    def pair(v):
        return list(v) if isinstance(v, tuple) else [v, v]

    args = (pair(case.stride), pair(case.padding), pair(case.dilation), case.groups)
    out = ops.conv_forward(x, w, b, *args)
    assert out.is_contiguous(memory_format=CL)
    go = torch.randn_like(out)
    grads = ops.conv_backward(go, x, w, *args, [True, True, True])
    assert grads[0].is_contiguous(memory_format=CL) and grads[1].is_contiguous(memory_format=CL)
    opcheck(ops.conv_forward, (x.detach(), w.detach(), b, *args))
    opcheck(ops.conv_backward, (go, x.detach(), w.detach(), *args, [True, True, True]))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4], CASES[5], CASES[7]], ids=str)
def test_channels_last_gradcheck(case):
    small = ConvCase(2, 2, case.in_channels, case.out_channels, case.kernel_size, (6, 5), case.stride,
                     case.padding, case.dilation, case.groups, case.bias)
    x, w, b = _cl_tensors(small, torch.float64, seed=4)
    inputs = tuple(t for t in (x, w, b) if t is not None)
    fn = (lambda x, w, b: tmg.functional.conv2d(x, w, b, **small.kwargs())) if b is not None else \
        (lambda x, w: tmg.functional.conv2d(x, w, None, **small.kwargs()))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 1), (1, 2)], ids=str)
def test_channels_last_batch_of_one_gradcheck(stride, dilation):
    """A batch of one, whose input gradient's tasks split the input channels: gradcheck in float64."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 32, 5, 4, generator=g, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(5, 32, 3, 3, generator=g, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    fn = lambda x, w: tmg.functional.conv2d(x, w, None, stride=stride, padding=1, dilation=dilation)
    assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_channels_last_bit_identical_across_thread_counts(case, restore_num_threads):
    results = []
    for threads in (1, 2, 3, 8):
        torch.set_num_threads(threads)
        x, w, b = _cl_tensors(case, torch.float32, seed=5)
        out = tmg.functional.conv2d(x, w, b, **case.kwargs())
        go = case.make_grad_output("cpu", torch.float32, seed=6).contiguous(memory_format=CL)
        results.append([out.detach(), *torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], go)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --- NCHW tensors computed on channels-last copies (conv_cpu.cpp, via_nhwc) ------------------------------------
# (in_channels, out_channels, size, stride, forward via NHWC, backward via NHWC): on both sides of each bound
# (kSmallOutput = 14x14 output positions, kSmallImage = 28x28 input positions, kViaColumns = 512*9 columns,
# kViaOutputChannels = 128: output channels for the forward, the fewer of input and output for the backward).
VIA = [
    (8, 128, 14, 1, True, True),
    (8, 129, 14, 1, False, True),
    (128, 129, 7, 1, False, True),
    (129, 129, 7, 1, False, False),
    (8, 32, 15, 1, False, False),
    (4, 16, 28, 2, True, True),
    (4, 16, 29, 2, False, False),
    (512, 8, 7, 1, True, True),
    (513, 8, 7, 1, True, False),
]


@pytest.mark.parametrize("via", VIA, ids=str)
def test_nchw_small_images_take_the_channels_last_kernels(via, restore_num_threads):
    c_in, c_out, size, stride, forward_via, backward_via = via
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, c_in, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    args = ([stride, stride], [1, 1], [1, 1], 1)
    out = ops.conv_forward(x, w, b, *args)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = ops.conv_backward(go, x, w, *args, [True, True, True])
    # NCHW in, NCHW out, torch's values
    assert out.is_contiguous() and grads[0].is_contiguous() and grads[1].is_contiguous()
    x_t, w_t, b_t = (t.clone().requires_grad_() for t in (x, w, b))
    out_t = F.conv2d(x_t, w_t, b_t, stride, 1)
    torch.testing.assert_close(out, out_t)
    for ours, theirs in zip(grads, torch.autograd.grad(out_t, (x_t, w_t, b_t), go)):
        torch.testing.assert_close(ours, theirs)
    # the route: the channels-last kernels' bits exactly where the shapes send NCHW tensors to them
    cl_out = ops.conv_forward(x.contiguous(memory_format=CL), w, b, *args)
    cl_grads = ops.conv_backward(go.contiguous(memory_format=CL), x.contiguous(memory_format=CL), w, *args,
                                 [True, True, True])
    if forward_via:
        assert torch.equal(out, cl_out)
    if backward_via:
        assert torch.equal(grads[0], cl_grads[0]) and torch.equal(grads[1], cl_grads[1])
    # and the same bits for every thread count
    for threads in (1, 3):
        torch.set_num_threads(threads)
        assert torch.equal(ops.conv_forward(x, w, b, *args), out)
        again = ops.conv_backward(go, x, w, *args, [True, True, True])
        assert all(torch.equal(a, r) for a, r in zip(again, grads))


def test_nchw_small_images_in_small_products_match_torch(restore_num_threads):
    """float32 NCHW tensors on the channels-last kernels (via_nhwc) whose products are cut for BLAS's
    small-matrix kernels where it has them (784 rows in tiles of 98, each within the forward's 325 rows a product
    at the NCHW caller's runs of 64 terms; 72 rows a product in the input gradient): torch's values, and the same
    bits for every thread count."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 32, 28, 28, generator=g).requires_grad_()
    w = (torch.randn(48, 32, 3, 3, generator=g) / 10).requires_grad_()
    b = torch.randn(48, generator=g).requires_grad_()
    go = torch.randn(4, 48, 14, 14, generator=g)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        out = tmg.functional.conv2d(x, w, b, stride=2, padding=1)
        results.append([out.detach(), *torch.autograd.grad(out, (x, w, b), go)])
    assert all(torch.equal(a, r) for other in results[1:] for a, r in zip(results[0], other))
    wide = [t.detach().double().requires_grad_() for t in (x, w, b)]
    truth = F.conv2d(*wide, stride=2, padding=1)
    theirs = F.conv2d(x, w, b, stride=2, padding=1)
    exact = [truth, *torch.autograd.grad(truth, wide, go.double())]
    torch_results = [theirs, *torch.autograd.grad(theirs, (x, w, b), go)]
    for o, t, e in zip(results[0], torch_results, exact):
        assert o.is_contiguous()
        assert _normwise(o, e) <= 4 * _normwise(t, e) + 8 * torch.finfo(torch.float32).eps


# --- max-pool ---------------------------------------------------------------------------------------------
# (shape, kernel_size, stride, padding, dilation, ceil_mode): windows in the padding, overlapping and
# disjoint windows, dilation, ceil_mode's partial windows, channel counts below, at and above the backward's
# block of 64, a batch of one.
POOLS = [
    ((2, 5, 11, 10), 3, 2, 1, 1, False),
    ((1, 64, 12, 12), 3, 2, 1, 1, True),
    ((2, 70, 8, 9), 2, 2, 0, 1, False),
    ((2, 130, 7, 6), (3, 2), (1, 2), (1, 0), (2, 1), True),
    ((3, 3, 5, 5), 5, 1, 2, 1, False),
    ((2, 4, 9, 9), 2, 3, 1, 1, True),
]


def _pool_input(shape, dtype=torch.float32, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    # ties (a window of equal values: the first wins), -inf, and NaN (it wins wherever it is)
    x[0, 0, :2, :3] = 1.5
    x.view(-1)[5] = float("-inf")
    x[-1, -1, 1, 1] = float("nan")
    return x.contiguous(memory_format=CL)


def _pool_args(kernel, stride, padding, dilation):
    two = (lambda v: list(v) if isinstance(v, tuple) else [v, v])
    return two(kernel), two(stride), two(padding), two(dilation)


@pytest.mark.parametrize("pool", POOLS, ids=str)
def test_channels_last_max_pool_is_torchs(pool):
    shape, kernel, stride, padding, dilation, ceil_mode = pool
    x = _pool_input(shape).requires_grad_()
    x_torch = x.detach().clone().requires_grad_()
    kwargs = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode,
                  return_indices=True)
    out, idx = tmg.functional.max_pool2d(x, **kwargs)
    out_t, idx_t = F.max_pool2d(x_torch, **kwargs)
    assert torch.equal(idx, idx_t)
    assert torch.equal(out.nan_to_num(), out_t.nan_to_num()) and torch.equal(out.isnan(), out_t.isnan())
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).contiguous(memory_format=CL)
    (grad,) = torch.autograd.grad(out, x, go)
    (grad_t,) = torch.autograd.grad(out_t, x_torch, go)
    assert torch.equal(grad, grad_t)  # one term per argmax, added in the same order
    for o, t in ((out, out_t), (idx, idx_t), (grad, grad_t)):
        assert o.is_contiguous(memory_format=CL) == t.is_contiguous(memory_format=CL)
    # the op itself computes in channels-last, and gives the NCHW kernels' bits
    args = _pool_args(kernel, stride, padding, dilation)
    raw_out, raw_idx = ops.max_pool_forward(x.detach(), *args, ceil_mode)
    assert raw_out.is_contiguous(memory_format=CL) and raw_idx.is_contiguous(memory_format=CL)
    nchw_out, nchw_idx = ops.max_pool_forward(x.detach().contiguous(), *args, ceil_mode)
    assert torch.equal(raw_idx, nchw_idx) and torch.equal(raw_out.nan_to_num(), nchw_out.nan_to_num())
    raw_grad = ops.max_pool_backward(go, raw_idx, list(shape), *args)
    assert raw_grad.is_contiguous(memory_format=CL)
    assert torch.equal(raw_grad, ops.max_pool_backward(go.contiguous(), nchw_idx, list(shape), *args))
    values_only = ops.max_pool_forward(x.detach(), *args, ceil_mode, compute_indices=False)
    assert torch.equal(values_only[0].nan_to_num(), raw_out.nan_to_num()) and values_only[1].numel() == 0


@pytest.mark.parametrize("dtype", (torch.float64, torch.bfloat16, torch.int32), ids=str)
def test_channels_last_max_pool_dtypes_and_fake_kernels(dtype):
    shape, kernel, stride, padding, dilation, ceil_mode = POOLS[3]
    x = (torch.randn(shape) * 50).to(dtype).contiguous(memory_format=CL)
    args = _pool_args(kernel, stride, padding, dilation)
    out, idx = ops.max_pool_forward(x, *args, ceil_mode)
    out_t, idx_t = torch.ops.aten.max_pool2d_with_indices(x.float() if dtype == torch.bfloat16 else x,
                                                          *args[:3], args[3], ceil_mode)
    assert torch.equal(out, out_t.to(dtype)) and torch.equal(idx, idx_t)
    opcheck(ops.max_pool_forward, (x, *args, ceil_mode))
    opcheck(ops.max_pool_forward, (x, *args, ceil_mode, False))
    if dtype.is_floating_point:
        go = torch.randn(out.shape, dtype=dtype).contiguous(memory_format=CL)
        opcheck(ops.max_pool_backward, (go, idx, list(shape), *args))


def test_channels_last_max_pool_gradcheck():
    x = _pool_input((2, 3, 7, 6), torch.float64).nan_to_num(0.0)
    x = (x + torch.arange(x.numel(), dtype=torch.float64).reshape(x.shape) * 1e-3).contiguous(memory_format=CL)
    x.requires_grad_()
    fn = lambda x: tmg.functional.max_pool2d(x, 3, 2, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_channels_last_max_pool_refuses_foreign_indices():
    x = _pool_input((1, 3, 6, 6))
    args = _pool_args(2, 2, 0, 1)
    out, idx = ops.max_pool_forward(x, *args, False)
    bad = idx.clone()
    bad[0, 2, 1, 1] = 36  # past the plane
    with pytest.raises(RuntimeError, match="max_pool"):
        ops.max_pool_backward(out, bad, [1, 3, 6, 6], *args, check_indices=False)
    with pytest.raises(RuntimeError, match="max_pool"):
        ops.max_pool_backward(out, bad, [1, 3, 6, 6], *args)


# The channels-last backward adds each output's gradient by comparing its window's taps with every lane's index
# (strides above 1) or by scatter (stride 1): both against the NCHW scatter's bits, for the indices of a forward and
# for raw ones (check_indices=False) that point anywhere in the plane, even from windows wholly in the padding.
@pytest.mark.parametrize(
    "shape, kernel, stride, padding, dilation",
    [
        ((2, 130, 9, 11), (3, 3), (2, 2), (1, 1), (1, 1)),  # 130 channels: blocks of 64 where the batch is short
        ((3, 16, 8, 8), (2, 2), (2, 2), (0, 0), (1, 1)),
        ((2, 24, 7, 9), (3, 3), (1, 1), (1, 1), (1, 1)),  # stride 1: the scatter
        ((2, 20, 1, 6), (2, 2), (2, 3), (1, 1), (2, 1)),  # dilated: a row of windows wholly in the padding
        ((2, 18, 5, 6, 7), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),
    ],
    ids=str,
)
@pytest.mark.parametrize("raw", [False, True], ids=["own-indices", "raw-indices"])
def test_channels_last_max_pool_backward_is_the_nchw_bits(shape, kernel, stride, padding, dilation, raw,
                                                          restore_num_threads):
    gen = torch.Generator().manual_seed(12)
    layout = CL if len(shape) == 4 else torch.channels_last_3d
    x = torch.randint(0, 3, shape, generator=gen).float()  # ties
    args = [list(kernel), list(stride), list(padding), list(dilation)]
    out, idx = ops.max_pool_forward(x.contiguous(memory_format=layout), *args, False)
    if raw:  # anywhere in the plane, or -1
        idx = torch.randint(-1, x[0, 0].numel(), idx.shape, generator=gen)
    go = torch.randn(out.shape, generator=gen)
    want = ops.max_pool_backward(go.contiguous(), idx.contiguous(), list(shape), *args, check_indices=False)
    for threads in (1, 3):
        torch.set_num_threads(threads)
        got = ops.max_pool_backward(go.contiguous(memory_format=layout), idx.contiguous(memory_format=layout),
                                    list(shape), *args, check_indices=False)
        assert got.is_contiguous(memory_format=layout)
        assert torch.equal(got, want)


@pytest.mark.parametrize("pool", POOLS[:4], ids=str)
def test_channels_last_max_pool_bit_identical_across_thread_counts(pool, restore_num_threads):
    shape, kernel, stride, padding, dilation, ceil_mode = pool
    results = []
    for threads in (1, 2, 3, 8):
        torch.set_num_threads(threads)
        x = _pool_input(shape, seed=9).requires_grad_()
        out, idx = tmg.functional.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(10)).contiguous(memory_format=CL)
        results.append([out.detach().nan_to_num(), idx, *torch.autograd.grad(out, x, go)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# widths of 20 and more, so that the NCHW call runs the NCHW kernel (narrower rows go through the channels-last one)
@pytest.mark.parametrize("size", [(14, 22), (28, 20), (7, 21), (16, 31)], ids=str)
def test_channels_last_depthwise_7x7_is_the_nchw_bits_and_skips_padding_for_infinite_weights(size):
    """ConvNeXt's 7x7 depthwise, channels-last: a band's input rows copied into zero-padded rows, each kernel row's
    weights in registers (depthwise_cpu.cpp's forward_nhwc_padded). The padding's weight x 0 terms change no bits:
    the NCHW forward's, which skips them; with an infinite weight the taps in the padding are skipped as torch does."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 20, *size, generator=gen)  # 20 channels: a vector of 16 and a tail of 4
    w = torch.randn(20, 1, 7, 7, generator=gen)
    b = torch.randn(20, generator=gen)
    out = tmg.functional.conv2d(x.contiguous(memory_format=CL), w.contiguous(memory_format=CL), b, 1, 3, 1, 20)
    assert out.is_contiguous(memory_format=CL)
    assert torch.equal(out, tmg.functional.conv2d(x, w, b, 1, 3, 1, 20))
    exact = F.conv2d(x.double(), w.double(), b.double(), 1, 3, 1, 20)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    w[:, :, 0, 0] = float("inf")
    xo = torch.ones_like(x).contiguous(memory_format=CL)
    ours = tmg.functional.conv2d(xo, w.contiguous(memory_format=CL), b, 1, 3, 1, 20)
    assert torch.equal(ours, F.conv2d(xo, w, b, 1, 3, 1, 20)) and torch.isfinite(ours[..., 0, :]).all()


# (channels, kernel, stride, padding, dilation): 3x3 and 5x5 (their taps' sums in registers), 7x7 and 1x5 (tap by
# tap), stride 2, dilation 2; channel tails of 4 and 8 past whole vectors (the 12 channels left out, below).
@pytest.mark.parametrize("case", [(64, (3, 3), 1, (1, 1), 1), (72, (5, 5), 2, (2, 2), 1), (40, (7, 7), 1, (3, 3), 1),
                                  (48, (3, 3), 1, (2, 2), 2), (36, (1, 5), 1, (0, 2), 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("vector_bytes", ["32", "64"])
def test_channels_last_depthwise_weight_gradient_splits_give_the_same_bits(case, dtype, vector_bytes, monkeypatch,
                                                                           restore_num_threads):
    """The channels-last depthwise weight gradient: images of 1 MB and more split the work by rows, every channel a
    task (each row's terms kept and added in row order), smaller ones by blocks of channels. A channel's entries
    depend on its own planes only, so they must be the same bits whichever split ran (the image's first channels but
    12 make less than 1 MB) and however many channels lie beside it, at every thread count and vector width; and
    torch's float64 values."""
    monkeypatch.setenv("TORCH_MANUALGRAD_VECTOR_BYTES", vector_bytes)
    c, k, s, p, d = case
    m = c - 12
    size = math.ceil(math.sqrt(2**20 / (c * dtype.itemsize)))  # the smallest square image of 1 MB or more
    assert m * size * size * dtype.itemsize < 2**20
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, c, size, size, generator=gen, dtype=dtype).contiguous(memory_format=CL)
    w = torch.randn(c, 1, *k, generator=gen, dtype=dtype)
    args = [s, s], list(p), [d, d]
    go = torch.randn(F.conv2d(x, w, None, s, p, d, c).shape, generator=gen, dtype=dtype).contiguous(memory_format=CL)
    gw = ops.conv_backward(go, x, w, *args, c, [False, True, False])[1]
    for threads in (1, 3):
        torch.set_num_threads(threads)
        assert torch.equal(ops.conv_backward(go, x, w, *args, c, [False, True, False])[1], gw)
    few = ops.conv_backward(go[:, :m].contiguous(memory_format=CL), x[:, :m].contiguous(memory_format=CL), w[:m],
                            *args, m, [False, True, False])[1]
    assert torch.equal(few, gw[:m])
    exact = torch.nn.grad.conv2d_weight(x.double(), w.shape, go.double(), s, p, d, c)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(gw.double(), exact, rtol=tol, atol=tol * exact.abs().max().item())


# (size, kernel, stride, padding, dilation): 3x3/2 as MobileNet's, 5x5/2, stride 3 with a 2-wide kernel (columns no
# tap sees), strides and dilations differing by dimension, padding past the kernel's reach.
@pytest.mark.parametrize("case", [((9, 11), (3, 3), (2, 2), (1, 1), (1, 1)), ((10, 9), (5, 5), (2, 2), (2, 2), (1, 1)),
                                  ((8, 13), (2, 2), (3, 3), (0, 1), (1, 1)),
                                  ((12, 10), (3, 5), (2, 3), (2, 0), (2, 1)), ((7, 7), (3, 3), (2, 2), (3, 4), (1, 1))],
                         ids=str)
@pytest.mark.parametrize("vector_bytes", ["32", "64"])
def test_channels_last_strided_depthwise_input_gradient_is_the_scatters_bits(case, vector_bytes, monkeypatch,
                                                                              restore_num_threads):
    """The strided channels-last depthwise input gradient gathers each pixel's terms (depthwise_cpu.cpp's
    backward_input_nhwc_gather) in the order a scatter adds them: output by output, row then column, each product
    rounded, then added to a sum starting at +0. Held bit for bit to that scatter written here with torch's float32
    multiply and add, at 1 and 3 threads and both vector widths (36 channels: runs of four vectors, single vectors
    and a tail of 4; a zero gradient of -0 at the first output, whose first pixel's sum is +0)."""
    monkeypatch.setenv("TORCH_MANUALGRAD_VECTOR_BYTES", vector_bytes)
    size, k, s, p, d = case
    gen = torch.Generator().manual_seed(8)
    c = 36
    x = torch.randn(2, c, *size, generator=gen).contiguous(memory_format=CL)
    w = torch.randn(c, 1, *k, generator=gen)
    go = torch.randn(F.conv2d(x, w, None, s, p, d, c).shape, generator=gen)
    go[0, :, 0, 0] = -0.0
    expected = torch.zeros(x.shape)
    for oh in range(go.shape[2]):
        for ow in range(go.shape[3]):
            for i in range(k[0]):
                for j in range(k[1]):
                    ih, iw = oh * s[0] - p[0] + i * d[0], ow * s[1] - p[1] + j * d[1]
                    if 0 <= ih < size[0] and 0 <= iw < size[1]:
                        expected[:, :, ih, iw] = expected[:, :, ih, iw] + w[:, 0, i, j] * go[:, :, oh, ow]
    for threads in (1, 3):
        torch.set_num_threads(threads)
        gi = ops.conv_backward(go.contiguous(memory_format=CL), x, w, list(s), list(p), list(d), c,
                               [True, False, False])[0]
        assert gi.is_contiguous(memory_format=CL)
        assert torch.equal(gi.view(torch.int32), expected.contiguous(memory_format=CL).view(torch.int32))
