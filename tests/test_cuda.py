"""CUDA-only checks (skipped cleanly without a GPU): our CUDA kernels against our CPU kernels, half types
against torch on the GPU, bit-identical repeated backward passes, a second GPU, and mixed-device errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONVS = [  # (N, C_in, C_out, size, kernel, stride, padding, dilation, groups)
    (2, 3, 8, (11, 9), (3, 3), 1, 1, 1, 1),
    (3, 8, 6, (10, 10), (3, 2), 2, (1, 0), (2, 1), 2),
    (2, 6, 12, (9, 9), (3, 3), 1, 1, 1, 6),  # depthwise, multiplier 2
    (8, 4, 4, (20, 21), (5, 5), 2, 3, (1, 2), 4),  # depthwise 5x5: many placements, cut into slices
    (3, 5, 5, (12, 12), (7, 7), 1, 3, 1, 5),  # depthwise 7x7
    (2, 3, 6, (10, 11), (4, 4), 1, 2, 1, 3),  # depthwise 4x4: no direct weight-gradient kernel, GEMM path
    (2, 4, 8, (50,), (3,), 1, 1, 1, 4),  # depthwise 1-d
    (2, 4, 8, (41,), (5,), 2, 2, 2, 4),  # depthwise 1-d 1x5 (unrolled), strided and dilated
    (2, 3, 4, (9, 9), (2, 2), 3, 0, 1, 1),  # stride over the kernel: pixels no window sees
    (2, 3, 4, (60,), (3,), 3, 8, 8, 1),  # dilation well over the stride: col2im steps between windows
    (1, 2, 3, (30, 31), (3, 2), (2, 3), (6, 4), (6, 4), 1),
    (4, 16, 32, (7, 7), (1, 1), 1, 0, 1, 1),  # pointwise
    (2, 4, 4, (33,), (5,), 2, 2, 2, 1),  # 1-d
]
POOLS = [  # (N, C, size, kernel, stride, padding, dilation, ceil_mode)
    (2, 3, (11, 9), 3, 2, 1, 1, False),
    (2, 3, (12, 12), 3, 1, 1, 1, True),  # overlapping windows: the gather adds several outputs
    (1, 2, (10, 7), (2, 3), (1, 2), (1, 0), (2, 1), True),
    (2, 4, (40,), 4, 3, 2, 1, True),
    (2, 3, (9, 9), 2, 3, 0, 1, False),  # stride over the kernel: pixels no window sees
    (2, 3, (8, 8), 2, 2, 0, 1, False),  # windows side by side, tiling the input exactly
    (2, 3, (9, 9), 2, 2, 0, 1, True),  # side by side, the last window hanging over the edge
    (1, 2, (10, 10), 2, 3, 0, 2, False),  # dilated windows that do not overlap, with gaps between taps
    (2, 3, (13, 12), 5, 1, 2, 1, False),  # YOLO's SPP pool: 2x2-pixel cells share 36 windows
    (2, 3, (30,), 3, 1, 1, 1, False),  # 1-d at stride 1: cells of 1 x 2 pixels
    (2, 2, (23, 23), 5, 5, 1, 1, True),  # stride 5: past the largest cell, the per-pixel gather
]


def conv_fn(size):
    return tmg.functional.conv1d if len(size) == 1 else tmg.functional.conv2d


def pool_fn(size, ours=True):
    if ours:
        return tmg.functional.max_pool1d if len(size) == 1 else tmg.functional.max_pool2d
    return F.max_pool1d if len(size) == 1 else F.max_pool2d


def conv_tensors(case, dtype, device):
    n, cin, cout, size, kernel, *_, groups = case
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, *size, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, *kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64)
    return [t.to(device, dtype).requires_grad_() for t in (x, w, b)]


def conv_run(case, dtype, device):
    x, w, b = conv_tensors(case, dtype, device)
    _, _, _, size, _, stride, padding, dilation, groups = case
    y = conv_fn(size)(x, w, b, stride, padding, dilation, groups)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    return (y, *torch.autograd.grad(y, (x, w, b), gy))


def pool_run(case, dtype, device, ours=True):
    n, c, size, kernel, stride, padding, dilation, ceil_mode = case
    x = torch.randperm(n * c * int(torch.tensor(size).prod()), generator=torch.Generator().manual_seed(0))
    x = x.reshape(n, c, *size).to(device, dtype).requires_grad_()
    y, idx = pool_fn(size, ours)(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    return y, idx, torch.autograd.grad(y, x, gy)[0]


@pytest.mark.parametrize("case", CONVS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_conv_matches_our_cpu_kernels(case, dtype):
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.backends.cuda.matmul.allow_tf32 = False  # cuBLAS in full float32, like the CPU
    for a, b in zip(conv_run(case, dtype, "cuda"), conv_run(case, dtype, "cpu")):
        torch.testing.assert_close(a.cpu(), b, **tol)


@pytest.mark.parametrize("case", POOLS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_max_pool_matches_our_cpu_kernels(case, dtype):
    gpu, cpu = pool_run(case, dtype, "cuda"), pool_run(case, dtype, "cpu")
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=0)
    assert torch.equal(gpu[1].cpu(), cpu[1])
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-12, atol=1e-6)


CELL_POOLS = [c for c in POOLS if c[6] == 1 and max(c[4] if isinstance(c[4], tuple) else (c[4],)) <= 4]


@pytest.mark.parametrize("case", CELL_POOLS, ids=str)
def test_cuda_max_pool_per_pixel_backward_matches_cells(case, monkeypatch):
    """TORCH_MANUALGRAD_POOL_CELLS=0 sends every backward to the per-pixel gather: both paths must agree
    bit for bit (the same sums, in the same order). The cases are those the launcher gives to cells
    (undilated, stride at most 4)."""
    monkeypatch.delenv("TORCH_MANUALGRAD_POOL_CELLS", raising=False)
    cells = pool_run(case, torch.float64, "cuda")
    monkeypatch.setenv("TORCH_MANUALGRAD_POOL_CELLS", "0")
    pixels = pool_run(case, torch.float64, "cuda")
    assert torch.equal(cells[2], pixels[2])


COLUMN_DEPTHWISE = [  # (N, C_in, C_out, size, kernel, stride, padding, dilation, groups), stride_h = dilation_h = 1
    (2, 3, 3, (11, 9), (3, 3), 1, 1, 1, 3),  # 11 rows: two columns of 4 and one of 3
    (2, 3, 6, (9, 13), (5, 5), (1, 2), 2, (1, 2), 3),  # multiplier 2, strided and dilated along w
    (3, 5, 5, (12, 12), (7, 7), 1, 3, 1, 5),
    (2, 4, 4, (3, 17), (1, 3), 1, (0, 1), 1, 4),  # 3 rows, fewer than a column: one output per thread
    (2, 4, 8, (30,), (5,), 2, 2, 1, 4),  # 1-d (height 1): one output per thread
]


def depthwise_forward_kernels(fn, *args):
    """Names of the depthwise forward kernels fn(*args) launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if "depthwise_forward" in e.key}


@pytest.mark.parametrize("case", COLUMN_DEPTHWISE, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_depthwise_columns_match_one_output_per_thread(case, dtype, monkeypatch):
    """The depthwise forward takes column threads where at least 4 rows of output allow it, and
    TORCH_MANUALGRAD_DEPTHWISE_COLUMNS=0 keeps it at one output per thread: the two must agree bit for
    bit (the same terms in the same order), and with torch."""
    _, _, _, size, _, stride, padding, dilation, groups = case
    x, w, b = (t.detach() for t in conv_tensors(case, dtype, "cuda"))
    fn, torch_fn = conv_fn(size), F.conv1d if len(size) == 1 else F.conv2d
    columns_expected = len(size) == 2 and torch_fn(x, w, b, stride, padding, dilation, groups).shape[2] >= 4
    for bias in (b, None):
        monkeypatch.delenv("TORCH_MANUALGRAD_DEPTHWISE_COLUMNS", raising=False)
        kernels = depthwise_forward_kernels(fn, x, w, bias, stride, padding, dilation, groups)
        assert any("columns" in name for name in kernels) == columns_expected, kernels
        columns = fn(x, w, bias, stride, padding, dilation, groups)
        monkeypatch.setenv("TORCH_MANUALGRAD_DEPTHWISE_COLUMNS", "0")
        kernels = depthwise_forward_kernels(fn, x, w, bias, stride, padding, dilation, groups)
        assert kernels and not any("columns" in name for name in kernels), kernels
        single = fn(x, w, bias, stride, padding, dilation, groups)
        assert torch.equal(columns, single)
        torch.testing.assert_close(columns, torch_fn(x, w, bias, stride, padding, dilation, groups))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_types_match_torch(dtype):
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=2e-2, atol=2e-2)
    for case in CONVS:
        x, w, b = conv_tensors(case, dtype, "cuda")
        _, _, _, size, _, stride, padding, dilation, groups = case
        ours = conv_fn(size)(x, w, b, stride, padding, dilation, groups)
        ref = (F.conv1d if len(size) == 1 else F.conv2d)(x, w, b, stride, padding, dilation, groups)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), ref.float(), **tol)
    for case in POOLS:
        ours, theirs = pool_run(case, dtype, "cuda"), pool_run(case, dtype, "cuda", ours=False)
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
        assert torch.equal(ours[1], theirs[1])
        torch.testing.assert_close(ours[2].float(), theirs[2].float(), **tol)


def test_cuda_backward_is_bit_identical_across_runs():
    for case in CONVS:
        first, second = conv_run(case, torch.float32, "cuda"), conv_run(case, torch.float32, "cuda")
        assert all(torch.equal(a, b) for a, b in zip(first, second)), case
    for case in POOLS:
        first, second = pool_run(case, torch.float32, "cuda"), pool_run(case, torch.float32, "cuda")
        assert all(torch.equal(a, b) for a, b in zip(first, second)), case


def test_cuda_gradcheck():
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: tmg.functional.conv2d(x, w, b, (2, 1), 1, (1, 2), 2), (x, w, b))
    p = torch.randperm(2 * 4 * 7 * 6, device="cuda").reshape(2, 4, 7, 6).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: tmg.functional.max_pool2d(p, 3, 1, 1, ceil_mode=True), (p,))


def test_cuda_weight_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"device"):
        tmg.functional.conv2d(torch.randn(1, 2, 5, 5, device="cuda"), torch.randn(3, 2, 3, 3))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    case = CONVS[1]
    with torch.cuda.device(0):
        got = conv_run(case, torch.float64, "cuda:1")
    for a, b in zip(got, conv_run(case, torch.float64, "cpu")):
        assert a.device == torch.device("cuda:1")
        torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-9)
    pool = pool_run(POOLS[0], torch.float64, "cuda:1")
    assert torch.equal(pool[1].cpu(), pool_run(POOLS[0], torch.float64, "cpu")[1])


def test_cuda_convert_model():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 4, 3)
    ).cuda().double()


    ours = tmg.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 12, 12, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(ours(x), model(x), rtol=1e-9, atol=1e-9)


def test_cuda_huge_geometry_takes_the_64_bit_path():
    """Sizes past 2**28 switch the kernels to 64-bit index arithmetic; the results still match the CPU."""
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    cpu = torch.ops.manualgrad.max_pool_forward(x, [2**40], [1], [2**39], [1], False)
    gpu = torch.ops.manualgrad.max_pool_forward(x.cuda(), [2**40], [1], [2**39], [1], False)
    for a, b in zip(gpu, cpu):
        assert torch.equal(a.cpu(), b)
    # conv1d: dilation and padding 2**40, stride 2**41 — one output position whose middle tap sees x[..., 0]
    w = torch.randn(4, 3, 3, dtype=torch.float64)
    args = ([2**41], [2**40], [2**40], 1)
    y_cpu = torch.ops.manualgrad.conv_forward(x, w, None, *args)
    y_gpu = torch.ops.manualgrad.conv_forward(x.cuda(), w.cuda(), None, *args)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu)
    torch.testing.assert_close(y_cpu[..., 0], x[..., 0] @ w[:, :, 1].T)
    go = torch.randn_like(y_cpu)
    for a, b in zip(torch.ops.manualgrad.conv_backward(go.cuda(), x.cuda(), w.cuda(), *args, [True, True, True]),
                    torch.ops.manualgrad.conv_backward(go, x, w, *args, [True, True, True])):
        torch.testing.assert_close(a.cpu(), b)


# --------------------------------------------------------------------------------------------------
# 3-d on CUDA: conv3d (a sum of 2-d convolutions over the kernel's depth taps, depth_taps.h) and
# max_pool3d (the max-pool kernels' volume code). The raw ops, called with 3-entry lists.
# --------------------------------------------------------------------------------------------------

CONVS_3D = [  # (N, C_in, C_out, size, kernel, stride, padding, dilation, groups), each entry per (d, h, w)
    (2, 3, 4, (5, 6, 7), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1),
    (2, 4, 6, (7, 6, 5), (3, 2, 2), (2, 1, 2), (2, 0, 1), (2, 1, 1), 2),  # strided, dilated, padded depth: taps miss depths
    (1, 4, 8, (6, 7, 7), (3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 2), 4),  # depthwise planes per tap
    (3, 2, 3, (4, 5, 5), (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1), 1),  # pointwise
    (2, 2, 2, (3, 8, 8), (5, 3, 3), (1, 1, 1), (2, 1, 1), (1, 1, 1), 1),  # kernel deeper than the input
]
POOLS_3D = [  # (N, C, size, kernel, stride, padding, dilation, ceil_mode), each entry per (d, h, w)
    (2, 3, (6, 9, 9), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), False),  # cells of 2x2 pixels per slice
    (2, 2, (5, 8, 7), (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), True),  # tiling, the last window over the edge
    (1, 2, (7, 6, 6), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), False),  # stride 1: up to 27 windows an element
    (2, 2, (9, 7, 8), (3, 2, 2), (2, 1, 3), (1, 1, 0), (3, 2, 1), True),  # dilated: the per-element gather
    (1, 3, (11, 5, 6), (2, 2, 2), (1, 2, 2), (0, 0, 0), (4, 1, 1), False),  # depth dilation over the stride
    (2, 1, (3, 13, 13), (1, 5, 5), (1, 5, 5), (0, 1, 1), (1, 1, 1), True),  # stride 5: per element
]


def conv3d_tensors(case, dtype, device, seed=0):
    n, cin, cout, size, kernel, *_, groups = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *size, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, *kernel, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64)
    gy_shape = F.conv3d(x, w, b, *case[5:]).shape
    gy = torch.randn(gy_shape, generator=gen, dtype=torch.float64)
    return [t.to(device, dtype) for t in (x, w, b, gy)]


def conv3d_ops(case, dtype, device):
    """Our raw ops: output, grad_input, grad_weight, grad_bias."""
    x, w, b, gy = conv3d_tensors(case, dtype, device)
    stride, padding, dilation, groups = (list(v) if isinstance(v, tuple) else v for v in case[5:])
    y = torch.ops.manualgrad.conv_forward(x, w, b, stride, padding, dilation, groups)
    return (y, *torch.ops.manualgrad.conv_backward(gy, x, w, stride, padding, dilation, groups, [True, True, True]))


def conv3d_torch(case, dtype, device, rounded_to=None):
    """torch's conv3d and its gradients, for the same tensors (rounded_to: the tensors of that dtype,
    computed in dtype)."""
    x, w, b, gy = (t.to(dtype) for t in conv3d_tensors(case, rounded_to or dtype, device))
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = F.conv3d(x, w, b, *case[5:])
    return (y.detach(), *torch.autograd.grad(y, (x, w, b), gy))


@pytest.mark.parametrize("case", CONVS_3D, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_conv3d_matches_our_cpu_kernels_and_torch(case, dtype):
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.backends.cuda.matmul.allow_tf32 = False  # cuBLAS in full float32, like the CPU
    gpu = conv3d_ops(case, dtype, "cuda")
    for a, b, c in zip(gpu, conv3d_ops(case, dtype, "cpu"), conv3d_torch(case, dtype, "cuda")):
        assert a.is_cuda and a.is_contiguous() and a.dtype == dtype
        torch.testing.assert_close(a.cpu(), b, **tol)
        torch.testing.assert_close(a, c, **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_conv3d_half_types_round_once(dtype):
    """Half types are computed in float32 and rounded once at the end (not once per depth tap): each
    result is within an ulp of the exact one (float64 from the same half inputs), float32's own error
    aside (atol, where terms cancel)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    for case in CONVS_3D:
        ours = conv3d_ops(case, dtype, "cuda")
        exact = conv3d_torch(case, torch.float64, "cuda", rounded_to=dtype)
        for a, b in zip(ours, exact):
            assert a.dtype == dtype
            torch.testing.assert_close(a.double(), b, rtol=torch.finfo(dtype).eps, atol=1e-3)


class _Conv3d(torch.autograd.Function):
    """Our raw conv ops as one differentiable function, for gradcheck (the functional conv3d is not ours
    to use here)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.args = (stride, padding, dilation, groups)
        return torch.ops.manualgrad.conv_forward(x, w, b, *ctx.args)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        grads = torch.ops.manualgrad.conv_backward(gy.contiguous(), x, w, *ctx.args, list(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None, None)


class _MaxPool3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        y, indices = torch.ops.manualgrad.max_pool_forward(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(indices)
        ctx.args = (list(x.shape), kernel, stride, padding, dilation)
        return y

    @staticmethod
    def backward(ctx, gy):
        (indices,) = ctx.saved_tensors
        return (torch.ops.manualgrad.max_pool_backward(gy, indices, *ctx.args), *[None] * 5)


def test_cuda_conv3d_and_max_pool3d_gradcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 4, 5, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    w = torch.randn(6, 2, 3, 2, 2, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    b = torch.randn(6, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    conv = lambda x, w, b: _Conv3d.apply(x, w, b, [2, 1, 1], [1, 1, 0], [1, 2, 1], 2)  # noqa: E731
    assert torch.autograd.gradcheck(conv, (x, w, b))
    p = torch.randperm(2 * 3 * 5 * 6 * 5, generator=gen).reshape(2, 3, 5, 6, 5).double().cuda().requires_grad_()
    pool = lambda p: _MaxPool3d.apply(p, [3, 3, 2], [1, 2, 1], [1, 1, 0], [1, 1, 2], True)  # noqa: E731
    assert torch.autograd.gradcheck(pool, (p,))


def pool3d_args(case):
    _, _, _, kernel, stride, padding, dilation, ceil_mode = case
    return list(kernel), list(stride), list(padding), list(dilation), ceil_mode


def pool3d_input(case, dtype, device, values="distinct"):
    n, c, size = case[:3]
    gen = torch.Generator().manual_seed(0)
    if values == "distinct":
        x = torch.randperm(n * c * int(torch.tensor(size).prod()), generator=gen).reshape(n, c, *size)
    else:  # ties: many equal values in every window (the first maximum in (d, h, w) order wins)
        x = torch.randint(0, 3, (n, c, *size), generator=gen)
    return x.to(device, dtype)


def pool3d_ops(case, dtype, device, values="distinct"):
    """Our raw ops: output, indices, grad_input."""
    x = pool3d_input(case, dtype, device, values)
    kernel, stride, padding, dilation, ceil_mode = pool3d_args(case)
    y, indices = torch.ops.manualgrad.max_pool_forward(x, kernel, stride, padding, dilation, ceil_mode)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    grad = torch.ops.manualgrad.max_pool_backward(gy, indices, list(x.shape), kernel, stride, padding, dilation)
    return y, indices, grad


def pool3d_torch(case, dtype, device, values="distinct"):
    x = pool3d_input(case, dtype, device, values).requires_grad_()
    kernel, stride, padding, dilation, ceil_mode = pool3d_args(case)
    y, indices = F.max_pool3d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device, dtype)
    return y.detach(), indices, torch.autograd.grad(y, x, gy)[0]


def scatter_definition(grad_output, indices, input_shape):
    """The max-pool gradient from its definition, in float64: each output's gradient added at its index."""
    planes = grad_output.shape[0] * grad_output.shape[1]
    grad = torch.zeros(planes, math.prod(input_shape[2:]), dtype=torch.float64)
    grad.scatter_add_(1, indices.cpu().reshape(planes, -1), grad_output.cpu().double().reshape(planes, -1))
    return grad.view(input_shape)


@pytest.mark.parametrize("case", POOLS_3D, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_cuda_max_pool3d_matches_torch(case, dtype, values):
    """Values and indices (flat in each (n, c) volume) exactly torch's on CUDA (and on the CPU); the
    gradient torch's up to its atomics' order of summation, and for half types the exact sum rounded once
    (ours adds in float32; torch's atomics round at every add)."""
    ours = pool3d_ops(case, dtype, "cuda", values)
    references = [pool3d_torch(case, dtype, "cuda", values)]
    if dtype in (torch.float32, torch.float64):
        references.append(pool3d_torch(case, dtype, "cpu", values))
    for theirs in references:
        torch.testing.assert_close(ours[0].cpu(), theirs[0].cpu(), rtol=0, atol=0)
        assert torch.equal(ours[1].cpu(), theirs[1].cpu())
    grad_output = torch.randn(ours[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    exact = scatter_definition(grad_output, ours[1], pool3d_input(case, dtype, "cpu").shape)
    if dtype in (torch.float32, torch.float64):
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[2].cpu(), references[0][2].cpu(), **tol)
        torch.testing.assert_close(ours[2].cpu().double(), exact, **tol)
    else:
        # rounded once: within half an ulp of the exact sum (an ulp allowed for float32's own rounding)
        torch.testing.assert_close(ours[2].cpu().double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_cuda_max_pool3d_nan_and_no_indices():
    """NaN wins its window as in torch; compute_indices=False gives the same output and no indices."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 7, 8, generator=gen)
    x[torch.rand(x.shape, generator=gen) < 0.1] = float("nan")
    x = x.cuda()
    args = ([3, 2, 3], [2, 2, 1], [1, 1, 1], [1, 1, 2], True)
    y, indices = torch.ops.manualgrad.max_pool_forward(x, *args)
    ref, ref_indices = F.max_pool3d(x.cpu(), *args, return_indices=True)
    torch.testing.assert_close(y.cpu(), ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(indices.cpu(), ref_indices)
    y2, none = torch.ops.manualgrad.max_pool_forward(x, *args, compute_indices=False)
    assert torch.equal(y2.nan_to_num(7.0), y.nan_to_num(7.0)) and none.numel() == 0


def test_cuda_max_pool3d_refuses_foreign_indices():
    """check_indices: an index outside its own output's window is an error naming the position."""
    case = POOLS_3D[0]
    x = pool3d_input(case, torch.float32, "cuda")
    kernel, stride, padding, dilation, ceil_mode = pool3d_args(case)
    y, indices = torch.ops.manualgrad.max_pool_forward(x, kernel, stride, padding, dilation, ceil_mode)
    bad = indices.clone()
    bad[1, 2, 1, 0, 0] = x.shape[2] * x.shape[3] * x.shape[4] - 1  # the volume's last element: not in that window
    with pytest.raises(RuntimeError, match=r"max_pool3d backward: indices\[1, 2, 1, 0, 0\]"):
        torch.ops.manualgrad.max_pool_backward(torch.ones_like(y), bad, list(x.shape), kernel, stride, padding, dilation)


@pytest.mark.parametrize("case", POOLS_3D, ids=str)
def test_cuda_max_pool3d_per_element_backward_matches_cells(case, monkeypatch):
    """TORCH_MANUALGRAD_POOL_CELLS=0 sends every backward to the per-element gather: bit for bit the
    cells' result (the same sums, in the same order), whichever path the launcher picks."""
    monkeypatch.delenv("TORCH_MANUALGRAD_POOL_CELLS", raising=False)
    cells = pool3d_ops(case, torch.float64, "cuda", "ties")
    monkeypatch.setenv("TORCH_MANUALGRAD_POOL_CELLS", "0")
    elements = pool3d_ops(case, torch.float64, "cuda", "ties")
    assert torch.equal(cells[2], elements[2])


def test_cuda_3d_backward_is_deterministic():
    """torch's own CUDA max_pool3d backward scatters with atomics and has no deterministic implementation;
    ours gathers in a fixed order: repeated runs are bit-identical, and torch.use_deterministic_algorithms
    (True) lets ours run. conv3d's depth taps are summed in order too."""
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            for case in POOLS_3D:  # ties and stride 1: many windows send gradient to the same element
                first, second = pool3d_ops(case, torch.float32, "cuda", "ties"), pool3d_ops(case, torch.float32, "cuda", "ties")
                assert all(torch.equal(a, b) for a, b in zip(first, second)), case
        # (conv3d's GEMMs are cuBLAS's, which deterministic mode accepts only with CUBLAS_WORKSPACE_CONFIG set)
        torch.use_deterministic_algorithms(False)
        for case in CONVS_3D:
            first, second = conv3d_ops(case, torch.float32, "cuda"), conv3d_ops(case, torch.float32, "cuda")
            assert all(torch.equal(a, b) for a, b in zip(first, second)), case
    finally:
        torch.use_deterministic_algorithms(before)
