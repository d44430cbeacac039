"""Extreme window geometries for the CPU max-pool forward and depthwise convolution (issue 11): huge
strides, dilations, paddings and kernels over small inputs, and planes wider than the kernels' column
chunks. Results are compared with torch's where torch computes them quickly, otherwise with a
brute-force reference that enumerates the input positions of every window; a few calls have their
peak memory measured in a fresh subprocess."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import torch_manualgrad as tmg
from common import conv_output_size, pool_output_size

ops = torch.ops.manualgrad
BIG = 2**62


def window_positions(o, size, kernel, stride, pad, dilation):
    """The input positions inside [0, size) that output o's window reads, in tap order (Python ints,
    so no geometry can overflow; O(size), whatever the kernel)."""
    start = o * stride - pad
    return [p for p in range(size) if (p - start) % dilation == 0 and 0 <= (p - start) // dilation < kernel]


def reference_max_pool(x, kernel, stride, padding, dilation, ceil_mode):
    """(N, C, *spatial) → maxima and flat indices: taps in row-major order, a later tap wins if strictly
    greater or NaN, -inf and -1 for a window with no tap inside the input."""
    two_d = x.dim() == 4
    x4 = x if two_d else x.unsqueeze(2)
    # 1-d as 2-d of height 1: kernel, stride and dilation 1 and no padding along h
    k, s, p, d = (list(v) if two_d else [one] + list(v) for v, one in zip((kernel, stride, padding, dilation), (1, 1, 0, 1)))
    h, w = x4.shape[2:]
    out_h, out_w = (pool_output_size(n, k[a], s[a], p[a], d[a], ceil_mode) for a, n in enumerate((h, w)))
    out = torch.full(x4.shape[:2] + (out_h, out_w), -math.inf, dtype=x.dtype)
    idx = torch.full(out.shape, -1, dtype=torch.long)
    for oh in range(out_h):
        rows = window_positions(oh, h, k[0], s[0], p[0], d[0])
        for ow in range(out_w):
            cols = window_positions(ow, w, k[1], s[1], p[1], d[1])
            if rows and cols:
                idx[..., oh, ow] = rows[0] * w + cols[0]
            for r in rows:
                for c in cols:
                    v = x4[..., r, c]
                    take = (v > out[..., oh, ow]) | v.isnan()
                    out[..., oh, ow] = torch.where(take, v, out[..., oh, ow])
                    idx[..., oh, ow] = torch.where(take, torch.full_like(idx[..., oh, ow], r * w + c), idx[..., oh, ow])
    return (out, idx) if two_d else (out.squeeze(2), idx.squeeze(2))


def reference_depthwise(x, weight, bias, stride, padding, dilation):
    """Depthwise convolution summing only the taps inside the input; built from differentiable torch
    ops, so autograd gives the reference gradients too."""
    two_d = x.dim() == 4
    x4, w4 = (x, weight) if two_d else (x.unsqueeze(2), weight.unsqueeze(2))
    s, p, d = (list(v) if two_d else [one] + list(v) for v, one in zip((stride, padding, dilation), (1, 0, 1)))
    kh, kw = w4.shape[2:]
    h, w = x4.shape[2:]
    multiplier = w4.shape[0] // x4.shape[1]
    xr = x4.repeat_interleave(multiplier, dim=1)  # (N, C_out, H, W)
    out_h, out_w = (conv_output_size(n, k, s[a], 2 * p[a], d[a]) for a, (n, k) in enumerate(((h, kh), (w, kw))))
    rows = []
    for oh in range(out_h):
        taps_h = window_positions(oh, h, kh, s[0], p[0], d[0])
        cols = []
        for ow in range(out_w):
            taps_w = window_positions(ow, w, kw, s[1], p[1], d[1])
            acc = torch.zeros(xr.shape[:2], dtype=x.dtype) if bias is None else bias.expand(xr.shape[:2])
            for r in taps_h:
                for c in taps_w:
                    i, j = (r - (oh * s[0] - p[0])) // d[0], (c - (ow * s[1] - p[1])) // d[1]
                    acc = acc + w4[:, 0, i, j] * xr[:, :, r, c]
            cols.append(acc)
        rows.append(torch.stack(cols, -1))
    out = torch.stack(rows, -2)
    return out if two_d else out.squeeze(2)


def make_input(shape, dtype, values, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if values == "ties":
        return torch.randint(0, 3, shape, generator=gen).to(dtype)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    if values == "nan":
        x[torch.rand(shape, generator=gen) < 0.15] = math.nan
    if values == "-inf":
        x[torch.rand(shape, generator=gen) < 0.3] = -math.inf
    return x


def assert_same_pool(got, want):
    (out, idx), (ref_out, ref_idx) = got, want
    assert out.shape == ref_out.shape
    assert torch.equal(out.isnan(), ref_out.isnan())
    assert torch.equal(torch.nan_to_num(out, nan=0.5), torch.nan_to_num(ref_out, nan=0.5))
    assert torch.equal(idx, ref_idx)


# (input spatial shape, kernel, stride, padding, dilation, ceil_mode): every one has a small output
POOL_GEOMETRIES = [
    ((8, 8), (2, 3), (1, 2**26), (1, 1), (1, 1), False),  # the issue's stride; torch agrees
    ((8, 8), (2, 2), (1, 2**40), (0, 0), (1, 1), False),  # once std::bad_alloc
    ((8, 8), (2, 2), (2**63 - 1, 2**62), (0, 0), (1, 1), False),  # once vector::_M_default_append
    ((8, 8), (2, 2), (2**63 - 1, 2**62), (1, 1), (1, 1), True),
    ((7, 9), (3, 3), (2**41, 2**41), (1, 1), (2**40, 2**40), True),  # only the first tap can land inside
    ((6, 5), (2**30, 2**30), (1, 1), (2**29, 2**29), (1, 1), False),  # every window covers the plane
    ((6, 5), (2**30, 2**30), (2**28, 3), (2**29, 2**29), (1, 1), True),
    ((5, 7), (3, 2**20 + 1), (2, 7), (1, 2**19), (1, 1), True),
    ((9, 9), (3, 3), (8, 8), (1, 1), (8, 8), True),  # dilation a multiple of the stride
    ((9, 9), (2, 2), (3, 17), (1, 1), (1, 1), True),  # stride far above the kernel
    ((16,), (2**62,), (1,), (2**61,), (1,), False),
    ((16,), (3,), (2**63 - 1,), (1,), (2**61,), True),
    ((33,), (5,), (2**30,), (2,), (7,), True),
    ((40,), (9,), (2,), (4,), (5,), False),
]


@pytest.mark.parametrize("geometry", POOL_GEOMETRIES, ids=str)
@pytest.mark.parametrize("values", ["randn", "ties", "nan", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extreme_pool_geometry_matches_brute_force(geometry, values, dtype):
    spatial, kernel, stride, padding, dilation, ceil_mode = geometry
    x = make_input((2, 3) + spatial, dtype, values)
    args = (list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
    want = reference_max_pool(x, kernel, stride, padding, dilation, ceil_mode)
    assert_same_pool(ops.max_pool_forward(x, *args), want)
    out, idx = ops.max_pool_forward(x, *args, False)
    assert idx.numel() == 0
    assert_same_pool((out, want[1]), want)


@pytest.mark.parametrize("geometry", [g for g in POOL_GEOMETRIES if max(g[2]) < 2**31 and max(g[0]) <= 40 and max(g[1]) < 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extreme_pool_geometry_matches_torch_where_torch_can(geometry, dtype):
    spatial, kernel, stride, padding, dilation, ceil_mode = geometry
    x = make_input((2, 3) + spatial, dtype, "ties")
    pool = F.max_pool2d if len(spatial) == 2 else F.max_pool1d
    want = pool(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    got = ops.max_pool_forward(x, list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
    if (got[1] == -1).any():  # torch gives an arbitrary index where a window has no input
        pytest.skip("a window lies wholly in the padding")
    assert_same_pool(got, want)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding, compute_indices",
    [
        ((1, 2, 3, 20000), (3, 3), (1, 1), (1, 1), True),  # three column chunks of 8192 outputs
        ((1, 2, 3, 20000), (3, 3), (1, 1), (1, 1), False),
        ((1, 1, 40, 20000), (21, 1), (1, 1), (10, 0), True),  # a window taller than the ring of rows
        ((1, 2, 50000), (5,), (3,), (2,), True),  # a long 1-d row in chunks
        ((2, 3, 1000), (64,), (64,), (0,), True),
    ],
    ids=str,
)
def test_planes_wider_than_a_chunk_match_torch(shape, kernel, stride, padding, compute_indices):
    x = make_input(shape, torch.float32, "ties")
    pool = F.max_pool2d if len(kernel) == 2 else F.max_pool1d
    want = pool(x, kernel, stride, padding, return_indices=True)
    out, idx = ops.max_pool_forward(x, list(kernel), list(stride), list(padding), [1] * len(kernel), False, compute_indices)
    assert torch.equal(out, want[0])
    if compute_indices:
        assert torch.equal(idx, want[1])


# The grid sweep (a band of output rows a sweep, max_pool_cpu.cpp's plan_grid): bands of rows where a volume's
# phase planes would pass a task's 64K elements, blocks of 1024 outputs that end inside a row, phases a stride skips.
GRID_GEOMETRIES = [
    ((1, 2, 400, 300), (3, 3), (1, 1), (1, 1), (1, 1)),  # 2 bands, rows of 302 across the blocks
    ((1, 2, 4, 200, 200), (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1)),  # 2 bands of 50 rows, 4 phases, 3 slices
    ((2, 1, 5, 90, 70), (2, 3, 2), (1, 3, 2), (1, 1, 0), (2, 1, 3)),  # dilated depth: a ring of 3 slices
    ((1, 1, 300, 90), (2, 2), (5, 4), (1, 1), (1, 1)),  # strides above the kernel: 2 of 5 row phases, 2 of 4 column phases
    ((1, 3, 140, 33), (5, 1), (1, 1), (2, 0), (30, 1)),  # a window 121 rows tall over 140: planes of 144 rows for 24
]


@pytest.mark.parametrize("values", ["ties", "nan", "-inf"])
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation", GRID_GEOMETRIES, ids=str)
def test_grid_bands_and_blocks_match_torch(shape, kernel, stride, padding, dilation, values):
    x = make_input(shape, torch.float32, values)
    pool = F.max_pool2d if len(kernel) == 2 else F.max_pool3d
    want = pool(x, kernel, stride, padding, dilation, return_indices=True)
    args = (list(kernel), list(stride), list(padding), list(dilation), False)
    got = ops.max_pool_forward(x, *args)
    assert_same_pool(got, want)
    assert torch.equal(ops.max_pool_forward(x, *args, False)[0].nan_to_num(), want[0].nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8], ids=str)
@pytest.mark.parametrize("shape, kernel, stride, padding, dilation", GRID_GEOMETRIES[:2], ids=str)
def test_grid_dtypes_and_ceil_mode_match_torch(shape, kernel, stride, padding, dilation, dtype):
    """Integers' padding is their lowest value (0 for uint8, a tie with the zeros inside, which keep the first);
    ceil_mode adds a window hanging over the end of the 3-d geometry (199 and 3 not multiples of its stride 2)."""
    x = make_input(shape, torch.float32, "ties").to(dtype)
    pool = F.max_pool2d if len(kernel) == 2 else F.max_pool3d
    for ceil_mode in (False, True):
        want = pool(x.double(), kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        got = ops.max_pool_forward(x, list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
        assert torch.equal(got[0], want[0].to(dtype)) and torch.equal(got[1], want[1])


def test_grid_keeps_its_work_to_the_taps_inside():
    """A kernel 16384 times wider than the (padded) input: the grid would sweep 32767 taps over a band of 32768 lanes
    for each output row (hours); the chunk sweep reads the two taps inside. Run in a fresh interpreter, bounded."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F, torch_manualgrad
        x = torch.randn(1, 2, 1000, 2)
        got = torch.ops.manualgrad.max_pool_forward(x, [1, 32767], [1, 1], [0, 16383], [1, 1], False)
        want = F.max_pool2d(x, [1, 32767], 1, [0, 16383], return_indices=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split()[-1] == "ok", done.stderr


def test_grid_gives_the_same_bits_at_any_thread_count(restore_num_threads):
    """Tasks are (band, volume), each output one task's: 1 or 3 threads, the same values and indices."""
    x = make_input((2, 3, 4, 200, 200), torch.float32, "ties")
    results = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        results.append(ops.max_pool_forward(x, [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], False))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("geometry", [POOL_GEOMETRIES[4], POOL_GEOMETRIES[7]], ids=str)
def test_max_pool_backward_takes_indices_of_extreme_geometry(geometry):
    spatial, kernel, stride, padding, dilation, ceil_mode = geometry
    x = make_input((2, 3) + spatial, torch.float64, "ties")
    args = (list(kernel), list(stride), list(padding), list(dilation))
    out, idx = ops.max_pool_forward(x, *args, ceil_mode)
    go = torch.randn(out.shape, dtype=torch.float64)
    gi = ops.max_pool_backward(go, idx, list(x.shape), *args)
    found = idx.flatten(2) != -1  # -1: a window with no tap inside sends its gradient nowhere
    want = torch.zeros(2, 3, x[0, 0].numel(), dtype=torch.float64)
    want.scatter_add_(2, idx.flatten(2).clamp(min=0), torch.where(found, go.flatten(2), 0.0))
    assert torch.equal(gi, want.view_as(x))


# (input spatial shape, kernel, stride, padding, dilation): depthwise geometries with small outputs
DEPTHWISE_GEOMETRIES = [
    ((4, 4), (3, 3), (1, 1), (2**31 - 2, 2**31 - 2), (2**31 - 2, 2**31 - 2)),  # once a segfault
    ((4, 4), (3, 3), (1, 1), (2**14, 2**14), (2**14, 2**14)),  # once 4 GB and 8 s
    ((5, 6), (2, 3), (2**40, 2**20), (2**41, 2**20), (1, 2**19)),
    ((5, 6), (3, 2), (2**62, 2**61), (2**40, 1), (2**39, 1)),
    ((6, 5), (4, 4), (2, 3), (0, 7), (1, 1)),
    ((9, 9), (3, 3), (4, 4), (1, 1), (4, 4)),  # dilation a multiple of the stride
    ((4,), (3,), (2**19,), (2**20,), (1,)),
    ((9,), (5,), (2**50,), (2**45,), (2**43,)),
    ((300,), (7,), (2,), (5,), (3,)),
]


def _depthwise(x, w, b, stride, padding, dilation):
    conv = tmg.functional.conv2d if x.dim() == 4 else tmg.functional.conv1d
    return conv(x, w, b, stride, padding, dilation, x.shape[1])


@pytest.mark.parametrize("geometry", DEPTHWISE_GEOMETRIES, ids=str)
@pytest.mark.parametrize("multiplier, with_bias", [(1, False), (2, True)])
def test_extreme_depthwise_geometry_matches_brute_force(geometry, multiplier, with_bias):
    spatial, kernel, stride, padding, dilation = geometry
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 3) + spatial, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((3 * multiplier, 1) + kernel, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3 * multiplier, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    want = reference_depthwise(x, w, b, stride, padding, dilation)
    got = _depthwise(x, w, b, stride, padding, dilation)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    go = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    leaves = (x, w) if b is None else (x, w, b)
    for ours, theirs in zip(torch.autograd.grad(got, leaves, go), torch.autograd.grad(want, leaves, go)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", [g for g in DEPTHWISE_GEOMETRIES if max(g[2]) < 2**31 and max(g[4]) < 2**31], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extreme_depthwise_geometry_matches_torch(geometry, dtype):
    spatial, kernel, stride, padding, dilation = geometry
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((2, 3) + spatial, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn((6, 1) + kernel, generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=dtype, requires_grad=True)
    conv = F.conv2d if len(spatial) == 2 else F.conv1d
    want = conv(x, w, b, stride, padding, dilation, 3)
    got = _depthwise(x, w, b, stride, padding, dilation)
    torch.testing.assert_close(got, want)
    go = torch.randn(want.shape, generator=gen, dtype=dtype)
    for ours, theirs in zip(torch.autograd.grad(got, (x, w, b), go), torch.autograd.grad(want, (x, w, b), go)):
        torch.testing.assert_close(ours, theirs)


def test_the_issues_segfault_case_is_the_centre_tap_alone():
    """Padding = dilation = 2^31-2 on 4x4: only tap (1, 1) of each window lands in the input."""
    x, w = torch.randn(1, 3, 4, 4), torch.randn(3, 1, 3, 3)
    y = tmg.functional.conv2d(x, w, None, 1, 2**31 - 2, 2**31 - 2, 3)
    assert torch.equal(y, x * w[:, :, 1, 1].view(1, 3, 1, 1))


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding",
    [
        ((1, 2, 9000), (4, 1, 5), 1, 2),  # two column chunks (8192 outputs each)
        ((1, 2, 450), (2, 1, 300), 1, 150),  # weight-gradient partial sums in chunks of 218 columns
        ((1, 2, 22, 8300), (2, 1, 21, 3), 1, 10),  # a window taller than the ring of padded rows (15)
        ((2, 4, 50, 50), (4, 1, 2, 2), 16, 1),  # stride far above the kernel: no padded rows
    ],
    ids=str,
)
def test_depthwise_chunks_and_rings_match_torch(x_shape, w_shape, stride, padding):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    conv = F.conv2d if len(x_shape) == 4 else F.conv1d
    want = conv(x, w, None, stride, padding, 1, x_shape[1])
    got = _depthwise(x, w, None, stride, padding, 1)
    torch.testing.assert_close(got, want)
    go = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for ours, theirs in zip(torch.autograd.grad(got, (x, w), go), torch.autograd.grad(want, (x, w), go)):
        torch.testing.assert_close(ours, theirs)


def test_depthwise_skips_padding_taps_for_infinite_weights_and_gradients_as_torch_does():
    x = torch.ones(1, 2, 3, 3, requires_grad=True)
    w = torch.ones(2, 1, 3, 3)
    w[:, :, 0, 0] = math.inf  # reads only padding at the top-left output
    w.requires_grad_()
    y, want = tmg.functional.conv2d(x, w, None, 1, 1, 1, 2), F.conv2d(x, w, None, 1, 1, 1, 2)
    assert torch.equal(y, want) and torch.isfinite(y[..., 0, :]).all()
    go = torch.ones_like(y)
    go[0, 0, 0, 0] = math.inf
    grads = torch.autograd.grad(y, (x, w), go)
    want_grads = torch.autograd.grad(want, (x, w), go)
    for ours, theirs in zip(grads, want_grads):
        assert torch.equal(ours, theirs)
    assert torch.isfinite(grads[1][0, 0, 0]).all()  # only padding meets the infinite gradient there


# (x shape, multiplier, kernel, stride, padding, dilation): NCHW depthwise gradients on the NCHW kernels
# (depthwise_cpu.cpp; multiplier 1 only at 20 output columns and more, below which they go channels-last). The weight
# gradient's partial sums in registers (weight_rows_in_registers): 3x3 over rows of one vector and of two (28 and 21
# wide: the second vector partly past the row), 5x5 over one; a row stride of 2, a row dilation, no column padding;
# and shapes just outside (stride 2 in the columns, 5x5 over 20 columns), which keep the row-by-row sums. In float64
# (8 lanes) only the multiplier-2 shapes and 3x3 over 13 columns fit. The input gradient as the forward of
# grad_output with the kernel flipped (multiplier 1, stride 1, padding within the kernel's span), else scattered: a
# multiplier of 2, strides, a padding past the span.
DEPTHWISE_GRADIENT_CASES = [
    ((3, 8, 12, 13), 2, 3, 1, 1, 1),
    ((4, 6, 28, 28), 1, 3, 1, 1, 1),
    ((2, 5, 21, 21), 1, 3, (2, 1), 1, 1),
    ((2, 4, 22, 22), 1, 3, 1, (1, 0), (2, 1)),
    ((2, 5, 16, 16), 2, 5, 1, 2, 1),
    ((2, 4, 25, 45), 1, 3, 2, 1, 1),
    ((2, 4, 20, 20), 1, 5, 1, 2, 1),
    ((2, 4, 10, 24), 1, 3, 1, (3, 1), 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", DEPTHWISE_GRADIENT_CASES, ids=str)
def test_depthwise_nchw_gradients_match_torch(case, dtype, restore_num_threads):
    shape, multiplier, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(shape[1] * multiplier, 1, kernel, kernel, generator=gen, dtype=dtype, requires_grad=True)
    args = (None, stride, padding, dilation, shape[1])
    wide = [t.detach().double().requires_grad_() for t in (x, w)]
    truth = F.conv2d(*wide, *args)
    go = torch.randn(truth.shape, generator=gen, dtype=dtype)
    want = torch.autograd.grad(truth, wide, go.double())
    theirs = torch.autograd.grad(F.conv2d(x, w, *args), (x, w), go)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(torch.autograd.grad(tmg.functional.conv2d(x, w, *args), (x, w), go))
    for name, ours, t, exact in zip(("grad_input", "grad_weight"), results[0], theirs, want):
        assert all(torch.equal(ours, r[name == "grad_weight"]) for r in results[1:]), name
        err = ((ours.double() - exact).norm() / exact.norm()).item()
        err_torch = ((t.double() - exact).norm() / exact.norm()).item()
        assert err <= 4 * err_torch + 8 * torch.finfo(dtype).eps, (name, err, err_torch)
    # an infinite gradient in one image (the weight gradient's sums for that image take the exact in-bounds runs),
    # and an infinite weight at a corner tap (the flipped forward, like the scatter, skips the taps in the padding)
    go[1, 2, 3, 4] = math.inf
    ours = torch.autograd.grad(tmg.functional.conv2d(x, w, *args), (x, w), go)
    theirs = torch.autograd.grad(F.conv2d(x, w, *args), (x, w), go)
    w_inf = w.detach().clone()
    w_inf[1, 0, 0, 0] = math.inf
    go_ones = torch.ones_like(go)
    ours += torch.autograd.grad(tmg.functional.conv2d(x, w_inf, *args), x, go_ones)
    theirs += torch.autograd.grad(F.conv2d(x, w_inf, *args), x, go_ones)
    for o, t in zip(ours, theirs):
        assert torch.equal(o.isfinite(), t.isfinite()) and torch.equal(o.isnan(), t.isnan())
        finite = o.isfinite()
        diff = (o[finite].double() - t[finite].double()).norm() / t[finite].double().norm()
        assert diff <= 64 * torch.finfo(dtype).eps, diff.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_depthwise_bits_do_not_depend_on_where_a_row_starts(dtype):
    """Each output adds its products in the same rounded steps wherever its run of columns starts, so
    cropping the input's left columns crops the output exactly, and explicit zero padding equals the
    padding argument bit for bit."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 9, 70, generator=gen, dtype=dtype)
    w = torch.randn(4, 1, 3, 5, generator=gen, dtype=dtype)
    b = torch.randn(4, generator=gen, dtype=dtype)
    y = tmg.functional.conv2d(x, w, b, 1, 0, 1, 4)
    for a in (1, 3, 5, 8, 13):
        assert torch.equal(y[..., a:], tmg.functional.conv2d(x[..., a:], w, b, 1, 0, 1, 4))
    padded = tmg.functional.conv2d(F.pad(x, (2, 2, 1, 1)), w, b, 1, 0, 1, 4)
    assert torch.equal(tmg.functional.conv2d(x, w, b, 1, (1, 2), 1, 4), padded)


# (C, H, W, kernel, padding, dilation, multiplier): rows of 1 to 5 vectors and a tail, kernels of 3, 5 and 7 taps
# (unrolled) and 4 (not), dilation, output rows taken in pairs and alone at the borders, and a window whose taps
# are all padding.
TAP_ORDER_CASES = [
    (3, 9, 56, 3, 1, 1, 1),
    (2, 8, 70, 5, 2, 1, 1),
    (2, 11, 100, 7, 3, 1, 2),
    (2, 7, 33, 4, 1, 1, 1),
    (2, 12, 40, 3, 2, 2, 1),
    (2, 5, 24, 3, 7, 1, 1),
]


@pytest.mark.parametrize("case", TAP_ORDER_CASES, ids=str)
def test_depthwise_forward_adds_the_taps_in_order_then_the_bias(case):
    """Every float32 output is +0, plus each tap's product in row-major tap order (a tap in the padding adds
    weight * 0), plus the bias: the sums a plain float32 loop over the taps makes, bit for bit, with each product
    and add one fused multiply-add where the build's kernels have FMA (x86-64-v3 and up, or a target that always
    contracts) and a product rounded, then added, where they have not: the outputs must be all of one or all of the
    other. The fused loop runs in float64, which holds each product exactly; its sum, rounded to float64 and then to
    float32, differs from one rounding only where the float64 sum falls on a float32 midpoint (odds of about 2^-29 a
    term), which these cases' do not."""
    c, h, width, k, pad, dil, mult = case
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, c, h, width, generator=gen)
    w = torch.randn(c * mult, 1, k, k, generator=gen)
    b = torch.randn(c * mult, generator=gen)
    b[0] = -0.0
    got = tmg.functional.conv2d(x, w, b, 1, pad, dil, c)
    xp = F.pad(x, (pad, pad, pad, pad)).repeat_interleave(mult, dim=1)
    oh, ow = got.shape[-2:]
    fused, unfused = torch.zeros_like(got), torch.zeros_like(got)
    for i in range(k):
        for j in range(k):
            tap = xp[..., i * dil : i * dil + oh, j * dil : j * dil + ow]
            wt = w[:, 0, i, j].view(1, -1, 1, 1)
            fused = (fused.double() + wt.double() * tap.double()).float()
            unfused = unfused + wt * tap
    assert not torch.equal(fused, unfused)  # (so that the two forms are told apart)
    assert torch.equal(got, fused + b.view(1, -1, 1, 1)) or torch.equal(got, unfused + b.view(1, -1, 1, 1))


# Each runs in a fresh interpreter: allocate the input, then the peak resident set's growth over the call.
MEMORY_CASES = {
    "pool stride [1, 2**26]": (
        "x = torch.randn(1, 1, 8, 8)",
        "ops.max_pool_forward(x, [2, 2], [1, 2**26], [0, 0], [1, 1], False)",
    ),
    "pool of a 128 MB plane": (
        "x = torch.randn(1, 1, 8192, 4096)",
        "ops.max_pool_forward(x, [8, 8], [8, 8], [0, 0], [1, 1], False)",
    ),
    "pool1d of a 10^8 row, kernel 64": (
        "x = torch.randn(1, 1, 10**8)",
        "ops.max_pool_forward(x, [64], [64], [0], [1], False)",
    ),
    "depthwise padding = dilation = 2**14": (
        "x = torch.randn(1, 3, 4, 4, requires_grad=True); w = torch.randn(3, 1, 3, 3, requires_grad=True)",
        "torch.autograd.grad(tmg.functional.conv2d(x, w, None, 1, 2**14, 2**14, 3).sum(), (x, w))",
    ),
    "depthwise1d of a 4*10^7 row, weight gradient": (
        "x = torch.randn(1, 2, 4 * 10**7); w = torch.randn(2, 1, 3, requires_grad=True)",
        "torch.autograd.grad(tmg.functional.conv1d(x, w, None, 1000, 1, 1, 2).sum(), (w,))",
    ),
    "depthwise 3x3 weight gradient of a 10^6 x 1 plane, multiplier 2": (  # no whole padded planes
        "x = torch.randn(1, 2, 10**6, 1); w = torch.randn(4, 1, 3, 3, requires_grad=True)",
        "torch.autograd.grad(tmg.functional.conv2d(x, w, None, 1, 1, 1, 2).sum(), (w,))",
    ),
    "depthwise1d of 2*10^7 rows, kernel 64": (  # through the padded rows
        "x = torch.randn(1, 2, 2 * 10**7); w = torch.randn(2, 1, 64)",
        "ops.conv_forward(x, w, None, [64], [0], [1], 2)",
    ),
    # col2im keeps a strided row's phases apart: at most a row plus a stride each, not a stride's worth of phases
    "conv1d input gradient, stride 2**26": (
        "x = torch.randn(1, 2, 1); w = torch.randn(3, 2, 2); go = torch.randn(1, 3, 1)",
        "ops.conv_backward(go, x, w, [2**26], [1], [1], 1, [True, False, False])",
    ),
    # fewer than 512 output rows, which may split the output channels, but 180 MB of columns: row tiles instead
    "channels-last 40x40 kernel, 441 rows of 102400 terms": (
        "x = torch.randn(1, 64, 40, 40).contiguous(memory_format=torch.channels_last); "
        "w = torch.randn(2, 64, 40, 40).contiguous(memory_format=torch.channels_last)",
        "ops.conv_forward(x, w, None, [1, 1], [10, 10], [1, 1], 1)",
    ),
}


@pytest.mark.parametrize("name", list(MEMORY_CASES))
def test_extra_memory_is_bounded(name):
    """Peak RSS growth (inputs already allocated, outputs and gradients included) stays under 64 MB,
    where the padded plane copies once took up to gigabytes."""
    setup, call = MEMORY_CASES[name]
    script = textwrap.dedent(
        f"""
        import resource, torch, torch_manualgrad as tmg
        ops = torch.ops.manualgrad
        torch.set_num_threads(1)
        {setup}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        {call}
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    growth_mb = float(done.stdout.split()[-1])
    assert growth_mb < 64, f"{name}: peak RSS grew by {growth_mb:.0f} MB"


def test_chunked_planes_give_the_same_bits_at_any_thread_count(restore_num_threads):
    """Chunks and rings are fixed by the geometry alone, so the thread count changes no bit."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9000, generator=gen, requires_grad=True)
    w = torch.randn(6, 1, 5, generator=gen, requires_grad=True)
    x2 = torch.randn(2, 2, 22, 8300, generator=gen)
    results = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        y = tmg.functional.conv1d(x, w, None, 1, 2, 1, 3)
        grads = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        pooled = ops.max_pool_forward(x2, [21, 3], [1, 1], [10, 1], [1, 1], False)
        results.append((y, *grads, *pooled))
    for first, second in zip(*results):
        assert torch.equal(first, second)
