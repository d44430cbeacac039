"""The CUDA kernels' index logic, run on the CPU: code written for host and device alike
(csrc/cuda/window_walk.h, csrc/cuda/max_pool_threads.h, csrc/cuda/depthwise_threads.h) is compiled here with the host compiler
(tests/cpp/cuda_logic_host.cpp) and checked against brute force and torch, so it is tested on every
machine, with or without a GPU. Max-pool's threads are checked for planes (1-d, 2-d) and volumes (3-d,
the kernels' HAS_DEPTH code); shape_checks.h's index_from_window, which the CUDA backward's index check
runs, is built with ATen's headers (tests/cpp/index_check_host.cpp)."""
import ctypes
import dataclasses
import itertools
import math
import os
import shlex
import shutil
import subprocess
import sysconfig
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from common import PoolCase, pool_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_host_library(tmp_path_factory, source, flags=()):
    """tests/cpp/<source> built with the host compiler into a shared library, loaded with ctypes."""
    # the first that exists of $TMG_HOST_CXX (make sanitize's instrumented compiler, which torch.compile
    # must not get), $CXX, Python's CXX, c++, g++ (a command such as "ccache g++" kept whole)
    candidates = [os.environ.get("TMG_HOST_CXX"), os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++", "g++"]
    found = [shlex.split(c) for c in candidates if c and shlex.split(c) and shutil.which(shlex.split(c)[0])]
    assert found, f"no C++ compiler among {candidates}; the extension's build needs one too"
    library = str(tmp_path_factory.mktemp("cuda_logic") / source.replace(".cpp", ".so"))
    path = os.path.join(ROOT, "tests", "cpp", source)
    subprocess.run([*found[0], "-std=c++17", "-O1", "-Wall", "-shared", "-fPIC", *flags, "-o", library, path], check=True)
    return ctypes.CDLL(library)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """The host build of the CUDA kernels' index logic, loaded with ctypes."""
    lib = build_host_library(tmp_path_factory, "cuda_logic_host.cpp")
    lib.max_pool_backward_cells.restype = ctypes.c_int
    lib.max_pool_backward_cells.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
    lib.max_pool_backward_cells.argtypes += [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.max_pool_cell_shape.restype = None
    lib.max_pool_cell_shape.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    for name in ("max_pool_forward_outputs", "max_pool_backward_pixels", "max_pool_forward_outputs_int"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.depthwise_forward_outputs.restype = ctypes.c_int
    lib.depthwise_forward_outputs.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.depthwise_forward_outputs.argtypes += [ctypes.c_int, ctypes.c_int]
    lib.depthwise_backward_input_pixels.restype = ctypes.c_int
    lib.depthwise_backward_input_pixels.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.depthwise_backward_input_pixels.argtypes += [ctypes.c_int, ctypes.c_int]
    lib.walk_covering_windows.restype = ctypes.c_int64
    lib.walk_covering_windows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int]
    return lib


# --------------------------------------------------------------------------------------------------
# The gather walk (col2im, depthwise grad-input, max-pool's per-pixel gather)
# --------------------------------------------------------------------------------------------------


def depth_pointer(depth):
    """depth (in_d, out_d, kernel_d, stride_d, pad_d, dilation_d) as the host build takes it: a tensor to
    pass by data_ptr (keep it alive through the call), or None for a plane (the kernels without depth)."""
    return None if depth is None else torch.tensor(depth, dtype=torch.int64)


def ptr(t):
    return None if t is None else t.data_ptr()


def walk(lib, sizes, wide_index, depth=None):
    """(element, k, i, j, o) for every window tap the walk visits, elements in (d, h, w) order; depth None:
    a plane, walked by the 2-d entry that col2im and the depthwise gradient call."""
    sizes, depth_t = torch.tensor(sizes, dtype=torch.int64), depth_pointer(depth)
    in_d, kernel_d = (1, 1) if depth is None else (depth[0], depth[2])
    capacity = int(in_d * kernel_d * sizes[0] * sizes[1] * sizes[4] * sizes[5])  # an element meets each tap at most once
    visits = torch.empty(max(capacity, 1), 5, dtype=torch.int64)
    count = lib.walk_covering_windows(sizes.data_ptr(), ptr(depth_t), visits.data_ptr(), capacity, int(wide_index))
    assert count >= 0, "more visits than window taps"
    return visits[:count]


def brute_force_walk(sizes, depth=None):
    """The same from the definition: every (output, tap) pair, kept where the tap lands inside the input,
    ordered by element and then by output."""
    in_h, in_w, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw = sizes
    in_d, out_d, kd, sd, pd, dd = (1, 1, 1, 1, 0, 1) if depth is None else depth
    od, oh, ow, k, i, j = torch.meshgrid(*(torch.arange(n) for n in (out_d, out_h, out_w, kd, kh, kw)), indexing="ij")
    z, h, w = od * sd - pd + k * dd, oh * sh - ph + i * dh, ow * sw - pw + j * dw
    inside = (z >= 0) & (z < in_d) & (h >= 0) & (h < in_h) & (w >= 0) & (w < in_w)
    element, o = ((z * in_h + h) * in_w + w)[inside], ((od * out_h + oh) * out_w + ow)[inside]
    rows = torch.stack([element, k[inside], i[inside], j[inside], o], dim=1)
    return rows[torch.argsort(element * out_d * out_h * out_w + o)]


@st.composite
def walk_axis(draw, max_size=12):
    """A window grid along one axis as a conv or a pool (ceil_mode's overhanging last window) makes it:
    (size, out, kernel, stride, pad, dilation)."""
    size, kernel, stride = draw(st.integers(1, max_size)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    dilation, pad = draw(st.integers(1, 7)), draw(st.integers(0, 6))
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        pad, out = dilation * (kernel - 1), (size + dilation * (kernel - 1) - 1) // stride + 1
    out += draw(st.integers(0, 1))
    return size, out, kernel, stride, pad, dilation


@st.composite
def walk_sizes(draw, max_size=12):
    """The 12 sizes of a plane's window grid (see sizes_2d)."""
    a, b = draw(walk_axis(max_size)), draw(walk_axis(max_size))
    return [v for pair in zip(a, b) for v in pair]


@given(sizes=walk_sizes(), wide=st.booleans())
def test_walk_visits_exactly_the_covering_taps(cells, sizes, wide):
    assert torch.equal(walk(cells, sizes, wide), brute_force_walk(sizes))


@given(sizes=walk_sizes(max_size=7), depth=walk_axis(max_size=7), wide=st.booleans())
def test_walk_in_a_volume_visits_exactly_the_covering_taps(cells, sizes, depth, wide):
    """The volumes' walk (max-pool 3-d's per-element gather): every (output, tap) pair whose tap lands on
    the element, outputs in increasing (od, oh, ow) order, along a depth axis dilated and strided too."""
    assert torch.equal(walk(cells, sizes, wide, depth), brute_force_walk(sizes, depth))


@given(sizes=walk_sizes(), wide=st.booleans())
def test_walk_of_a_volume_one_deep_is_the_planes(cells, sizes, wide):
    """Depth 1 through the volumes' code visits what the planes' code visits, in the same order."""
    assert torch.equal(walk(cells, sizes, wide, (1, 1, 1, 1, 0, 1)), walk(cells, sizes, wide))


@pytest.mark.parametrize(
    "sizes",
    [  # in_h, in_w, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w
        [9, 60, 1, 22, 1, 3, 1, 3, 0, 8, 1, 8],  # dilation well over the stride: steps between windows
        [30, 31, 13, 14, 3, 2, 2, 3, 6, 4, 6, 4],
        [12, 12, 4, 6, 4, 4, 6, 4, 5, 6, 4, 6],  # stride and dilation share a factor (step = d / gcd)
        [7, 7, 7, 7, 7, 7, 1, 1, 3, 3, 1, 1],  # windows as large as the input
        [5, 5, 3, 3, 2, 2, 3, 3, 0, 0, 1, 1],  # stride over the kernel: pixels no window sees
        [1, 300, 1, 300, 1, 3, 1, 1, 0, 64, 1, 64],  # WaveNet-like: stride 1, dilation 64 (a tap scan)
        [1, 200, 1, 67, 1, 2, 1, 3, 0, 32, 1, 32],  # dilation over the stride, coprime: both scans long
    ],
    ids=str,
)
def test_walk_visits_exactly_the_covering_taps_curated(cells, sizes):
    for wide in (False, True):
        assert torch.equal(walk(cells, sizes, wide), brute_force_walk(sizes))
        # the same grid along depth, with a second one across: the volumes' walk
        for depth in ([sizes[0], sizes[2], sizes[4], sizes[6], sizes[8], sizes[10]], [3, 2, 2, 1, 0, 2]):
            across = [2, sizes[1], 2, sizes[3], 2, sizes[5], 1, sizes[7], 1, sizes[9], 1, sizes[11]]
            assert torch.equal(walk(cells, across, wide, depth), brute_force_walk(across, depth))


def test_walk_examples_of_the_tutorial(cells):
    """docs/tutorial.md section 6: which (output, tap) pairs reach one input element."""

    def reaching(length, kernel, stride, padding, dilation, element):
        out = (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        visits = walk(cells, [1, length, 1, out, 1, kernel, 1, stride, 0, padding, 1, dilation], False)
        return [(o, tap) for pixel, _, _, tap, o in visits.tolist() if pixel == element]

    assert reaching(7, 3, 2, 1, 1, element=3) == [(1, 2), (2, 0)]  # tap 2 of output 1, tap 0 of output 2
    assert reaching(7, 3, 1, 2, 2, element=2) == [(0, 2), (2, 1), (4, 0)]  # outputs 1 and 3 step over it

    # 3x3 windows at stride 2, padding 1: a 2x2 cell of elements (input rows and columns 3, 4) is reached
    # by 4 windows, where its elements one by one are reached 9 times
    visits = walk(cells, [9, 9, 5, 5, 3, 3, 2, 2, 1, 1, 1, 1], False)
    cell = {3 * 9 + 3, 3 * 9 + 4, 4 * 9 + 3, 4 * 9 + 4}
    in_cell = [o for pixel, _, _, _, o in visits.tolist() if pixel in cell]
    assert len(in_cell) == 9 and len(set(in_cell)) == 4


# --------------------------------------------------------------------------------------------------
# The max-pool threads: forward, per-pixel backward, per-cell backward
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RawGeometry:
    """A backward launch given by its 12 sizes (see sizes_2d), its depth (see depth_of; None for planes)
    and plane count, as a raw call of the op may make it: padding over half the kernel, a grad_output
    larger or smaller than a forward's."""

    sizes: list
    planes: int
    depth: Optional[list] = None

    @property
    def input_shape(self):
        return (self.planes, *([] if self.depth is None else [self.depth[0]]), *self.sizes[:2])

    @property
    def output_shape(self):
        return (self.planes, *([] if self.depth is None else [self.depth[1]]), *self.sizes[2:4])


def sizes_2d(case):
    """in_h, in_w, out_h, out_w, kernel, stride, padding, dilation (h, w each), as the kernels see them
    (a 3-d case's height and width; its depth: depth_of)."""
    if isinstance(case, RawGeometry):
        return torch.tensor(case.sizes, dtype=torch.int64)
    k, s, p, d = case.tuples()
    if case.dim == 1:  # 1-d runs as 2-d of height 1, as in the kernels
        k, s, p, d = (1, *k), (1, *s), (0, *p), (1, *d)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (v[-2:] for v in (k, s, p, d))
    in_h, in_w = (1, *case.input_size) if case.dim == 1 else case.input_size[-2:]
    out = case.output_spatial()
    out_h, out_w = (1, *out) if case.dim == 1 else out[-2:]
    return torch.tensor([in_h, in_w, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw], dtype=torch.int64)


def depth_of(case):
    """A 3-d case's in_d, out_d, kernel_d, stride_d, pad_d, dilation_d (the kernels' HAS_DEPTH code), or
    None for 1-d and 2-d (the planes' code)."""
    if isinstance(case, RawGeometry):
        return case.depth
    if case.dim != 3:
        return None
    k, s, p, d = case.tuples()
    return [case.input_size[0], case.output_spatial()[0], k[0], s[0], p[0], d[0]]


ONE_DEEP = [1, 1, 1, 1, 0, 1]  # a plane as a volume of depth 1


def launcher_shape(lib, case):
    """(tile, starts_h, starts_w) the CUDA launcher picks; tile 0: the per-pixel gather."""
    sizes, out = sizes_2d(case), torch.zeros(3, dtype=torch.int64)  # both alive through the call
    lib.max_pool_cell_shape(sizes.data_ptr(), out.data_ptr())
    return tuple(out.tolist())


def planes(case):
    """How many (n, c) planes, or volumes, the case has."""
    if isinstance(case, RawGeometry):
        return case.planes
    in_h, in_w = sizes_2d(case)[:2].tolist()
    in_d = (depth_of(case) or ONE_DEEP)[0]
    return math.prod(case.input_shape) // (in_d * in_h * in_w)


def host_forward(lib, x, case, wide_index, depth=None):
    """(output, indices) from the forward kernel's per-output code, every output in turn. depth: the
    case's own (depth_of) unless given (ONE_DEEP runs a plane through the volumes' code)."""
    sizes, x, depth_t = sizes_2d(case), x.contiguous(), depth_pointer(depth or depth_of(case))
    output = torch.full(case.output_shape, 7.0, dtype=torch.float64)
    indices = torch.full(case.output_shape, -7, dtype=torch.int64)
    lib.max_pool_forward_outputs(
        output.data_ptr(), indices.data_ptr(), x.data_ptr(), planes(case), sizes.data_ptr(), ptr(depth_t), int(wide_index)
    )
    return output, indices


def pixels_backward(lib, grad_output, indices, case, wide_index, depth=None):
    """grad_input from the per-element backward code, every element in turn (depth as in host_forward)."""
    sizes, grad_output, indices = sizes_2d(case), grad_output.contiguous(), indices.contiguous()
    depth_t = depth_pointer(depth or depth_of(case))
    grad_input = torch.full(case.input_shape, float("nan"), dtype=torch.float64)
    lib.max_pool_backward_pixels(
        grad_input.data_ptr(), grad_output.data_ptr(), indices.data_ptr(), planes(case), sizes.data_ptr(), ptr(depth_t),
        int(wide_index),
    )
    return grad_input


def cells_backward(lib, grad_output, indices, case, shape, wide_index, reverse=False, depth=None):
    """grad_input from the per-cell code with cells of shape (tile, starts_h, starts_w), every cell of
    every plane (or volume slice) in turn (as the CUDA threads would), first to last or last to first;
    shape (0, 0, 0): the launcher's choice. depth as in host_forward."""
    sizes, grad_output, indices = sizes_2d(case), grad_output.contiguous(), indices.contiguous()
    depth_t = depth_pointer(depth or depth_of(case))
    grad_input = torch.full(case.input_shape, float("nan"), dtype=torch.float64)  # every pixel must be written
    status = lib.max_pool_backward_cells(
        grad_input.data_ptr(), grad_output.data_ptr(), indices.data_ptr(), planes(case), sizes.data_ptr(), ptr(depth_t),
        *shape, int(wide_index), int(reverse),
    )
    assert status == 0, f"cells {shape} cannot serve {case}"
    return grad_input


def torch_pool_fn(case):
    return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[case.dim]


def torch_pool(case, values, seed):
    """torch's max-pool in float64: input, output, indices, a grad_output and the grad_input it gives."""
    x = case.make_input("cpu", torch.float64, values=values, seed=seed, requires_grad=True)
    y, indices = torch_pool_fn(case)(x, **case.kwargs(return_indices=True))
    grad_output = case.make_grad_output("cpu", torch.float64, seed=seed + 1)
    (grad_input,) = torch.autograd.grad(y, x, grad_output)
    return x.detach(), y.detach(), indices, grad_output, grad_input


VALUES = ["distinct", "ties", "nan"]  # ties: the first maximum wins; NaN: always the maximum


@given(case=pool_cases(), values=st.sampled_from(VALUES), wide=st.booleans())
def test_forward_matches_torch(cells, case, values, wide):
    x, y, indices, _, _ = torch_pool(case, values, seed=2)
    got, got_indices = host_forward(cells, x, case, wide)
    torch.testing.assert_close(got, y, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got_indices, indices)


@given(case=pool_cases(), dtype=st.sampled_from([torch.int32, torch.int64]), low=st.booleans(), seed=st.integers(0, 99))
def test_forward_of_integers_matches_torch(cells, case, dtype, low, seed):
    """Integer planes start each window at the type's lowest value (there is no -inf): windows of nothing
    but that value, ties and padding must still give torch's maxima and its first in-bounds argmax."""
    info = torch.iinfo(dtype)
    base = info.min if low else -2
    x = torch.randint(base, base + 3, case.input_shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    y, indices = F.max_pool2d(x if case.dim == 2 else x.unsqueeze(-2), **planar_kwargs(case))
    y, indices = (y, indices) if case.dim == 2 else (y.squeeze(-2), indices.squeeze(-2))
    sizes, x = sizes_2d(case), x.contiguous()
    got = torch.full(case.output_shape, 7, dtype=dtype)
    got_indices = torch.full(case.output_shape, -7, dtype=torch.int64)
    cells.max_pool_forward_outputs_int(got.data_ptr(), got_indices.data_ptr(), x.data_ptr(), planes(case), sizes.data_ptr(),
                                       None, torch.tensor([], dtype=dtype).element_size())
    assert torch.equal(got, y)
    in_window = got_indices >= 0  # -1: a window wholly in the padding, where torch's index is arbitrary
    assert torch.equal(got_indices[in_window], indices[in_window])
    assert torch.equal(got[~in_window], torch.full_like(got[~in_window], info.min))


def planar_kwargs(case):
    """case's max-pool arguments for torch's max_pool2d (a 1-d case as height 1)."""
    k, s, p, d = case.tuples()
    if case.dim == 1:
        k, s, p, d = (1, *k), (1, *s), (0, *p), (1, *d)
    return dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=case.ceil_mode, return_indices=True)


@given(case=pool_cases(), values=st.sampled_from(VALUES), wide=st.booleans())
def test_backward_pixels_match_torch(cells, case, values, wide):
    _, _, indices, grad_output, expected = torch_pool(case, values, seed=4)
    torch.testing.assert_close(pixels_backward(cells, grad_output, indices, case, wide), expected, rtol=0, atol=0)


def cell_shapes(case):
    """Every (tile, starts_h, starts_w) whose cells fit their tile."""
    _, _, _, _, _, _, sh, sw, *_ = sizes_2d(case).tolist()
    return [
        (tile, mh, mw)
        for tile in (1, 2, 4)
        for mh in range(1, tile // sh + 1)
        for mw in range(1, tile // sw + 1)
    ]


@given(case=pool_cases(), values=st.sampled_from(VALUES), wide=st.booleans())
def test_cells_match_torch(cells, case, values, wide):
    """Every cell shape that fits, dilated windows included (the launcher gives those to the per-pixel
    gather, but the cell code is correct for them too)."""
    _, _, indices, grad_output, expected = torch_pool(case, values, seed=3)
    for shape in cell_shapes(case):
        for reverse in (False, True):  # a pixel written by two cells differs in one of the orders
            got = cells_backward(cells, grad_output, indices, case, shape, wide, reverse)
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m: f"cells {shape}: {m}")


CURATED = [  # the benchmark's shapes, scaled down, and the corners of the window and cell grids
    PoolCase(2, 2, 3, (16, 16), 3, 2, 1),  # ResNet's stem pool: 4 windows reach each 2x2 cell
    PoolCase(2, 2, 3, (12, 12), 2, 2, 0),  # windows tiling the input: one window per cell
    PoolCase(2, 2, 3, (11, 11), 2, 2, 0, ceil_mode=True),  # the last window hangs over the edge
    PoolCase(2, 2, 3, (9, 9), 3, 1, 1),  # stride 1: cells of 2x2 pixels, 16 windows each
    PoolCase(2, 2, 2, (9, 10), 2, 3, 0),  # stride over the kernel: pixels no window sees get 0
    PoolCase(2, 2, 2, (13, 14), 4, 4, 2, ceil_mode=True),  # padding fills a whole cell
    PoolCase(2, 1, 2, (5, 3), (3, 2), (3, 4), (1, 1)),  # cells wider than the input (aliasing slots)
    PoolCase(2, 1, 2, (4, 1), (2, 1), (2, 3), 0),  # a one-pixel-wide input
    PoolCase(1, 2, 3, (20,), 3, 2, 1),  # 1-d: cells 1 x 2
    PoolCase(2, 2, 2, (17, 17), 5, 4, 2, ceil_mode=True),
    PoolCase(2, 2, 2, (23, 23), 5, 5, 1, ceil_mode=True),  # stride 5: the per-pixel gather
    PoolCase(2, 2, 2, (30, 31), (3, 2), (2, 3), (1, 1), (6, 4)),  # dilated: the per-pixel gather steps
    PoolCase(1, 2, 2, (60,), 3, 3, 1, 8),  # dilation well over the stride
]


@pytest.mark.parametrize("case", CURATED, ids=str)
@pytest.mark.parametrize("values", VALUES)
def test_threads_match_torch_curated(cells, case, values):
    """Forward, and the backward the launcher picks (cells or per-pixel) with the per-pixel code beside."""
    x, y, indices, grad_output, expected = torch_pool(case, values, seed=5)
    for wide, reverse in [(False, False), (True, True)]:
        got, got_indices = host_forward(cells, x, case, wide)
        torch.testing.assert_close(got, y, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got_indices, indices)
        torch.testing.assert_close(pixels_backward(cells, grad_output, indices, case, wide), expected, rtol=0, atol=0)
        if launcher_shape(cells, case)[0] > 0:
            got = cells_backward(cells, grad_output, indices, case, (0, 0, 0), wide, reverse)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


# Volumes (3-d): the same threads with their depth loops (HAS_DEPTH), against torch's max_pool3d.

CURATED_3D = [
    PoolCase(3, 2, 2, (6, 9, 9), 3, 2, 1),  # the 2-d stem pool with depth: cells of 2x2 pixels per slice
    PoolCase(3, 1, 2, (5, 8, 7), 2, 2, 0, ceil_mode=True),  # windows tiling, the last hanging over each edge
    PoolCase(3, 2, 1, (7, 6, 6), (3, 3, 3), 1, 1),  # stride 1: each element under up to 27 windows
    PoolCase(3, 1, 2, (9, 7, 8), (3, 2, 2), (2, 1, 3), (1, 1, 0), (3, 2, 1)),  # dilated in depth and height
    PoolCase(3, 1, 2, (11, 5, 6), (2, 2, 2), (1, 2, 2), 0, (4, 1, 1)),  # depth dilation over the stride: steps
    PoolCase(3, 2, 1, (3, 13, 13), (1, 5, 5), (1, 5, 5), (0, 1, 1), 1, ceil_mode=True),  # stride 5: per-element
    PoolCase(3, 1, 3, (1, 6, 6), 1, 1, 0),  # one slice, a 1x1x1 window
    PoolCase(3, None, 2, (5, 4, 6), 2, (3, 1, 2), (1, 0, 1)),  # unbatched; depth stride over the kernel
]


@pytest.mark.parametrize("case", CURATED_3D, ids=str)
@pytest.mark.parametrize("values", VALUES)
def test_volume_threads_match_torch_curated(cells, case, values):
    """max_pool3d's forward (values, and indices flat in the volume), and its backward: the per-element
    gather, and the cells the launcher picks where it picks them, every fitting cell shape besides."""
    x, y, indices, grad_output, expected = torch_pool(case, values, seed=7)
    for wide, reverse in [(False, False), (True, True)]:
        got, got_indices = host_forward(cells, x, case, wide)
        torch.testing.assert_close(got, y, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got_indices, indices)
        pixels = pixels_backward(cells, grad_output, indices, case, wide)
        torch.testing.assert_close(pixels, expected, rtol=0, atol=0)
        for shape in ([(0, 0, 0)] if launcher_shape(cells, case)[0] > 0 else []) + cell_shapes(case):
            got = cells_backward(cells, grad_output, indices, case, shape, wide, reverse)
            assert torch.equal(got, pixels), f"cells {shape}"  # the same sums in the same order


@given(case=pool_cases(dims=(3,), max_batch=2), values=st.sampled_from(VALUES), wide=st.booleans())
def test_volume_threads_match_torch(cells, case, values, wide):
    x, y, indices, grad_output, expected = torch_pool(case, values, seed=8)
    got, got_indices = host_forward(cells, x, case, wide)
    torch.testing.assert_close(got, y, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got_indices, indices)
    pixels = pixels_backward(cells, grad_output, indices, case, wide)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)
    for shape in cell_shapes(case):
        assert torch.equal(cells_backward(cells, grad_output, indices, case, shape, wide, reverse=True), pixels)


@given(case=pool_cases(), values=st.sampled_from(VALUES), wide=st.booleans())
def test_planes_through_the_volumes_code_are_unchanged(cells, case, values, wide):
    """A plane run as a volume one deep (HAS_DEPTH with depth 1) gives the planes' results bit for bit:
    the two instantiations are the same computation."""
    x, _, indices, grad_output, _ = torch_pool(case, values, seed=9)
    for a, b in zip(host_forward(cells, x, case, wide, ONE_DEEP), host_forward(cells, x, case, wide)):
        assert torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
    one_deep = pixels_backward(cells, grad_output, indices, case, wide, ONE_DEEP)
    assert torch.equal(one_deep, pixels_backward(cells, grad_output, indices, case, wide))
    for shape in cell_shapes(case):
        assert torch.equal(cells_backward(cells, grad_output, indices, case, shape, wide, depth=ONE_DEEP), one_deep)


@st.composite
def raw_geometries(draw, volumes=False):
    """Backward launches beyond a forward's: padding up to 7 whatever the kernel, grad_output one window
    shorter or longer than the formula's along an axis (windows wholly in the padding included). volumes:
    with a depth axis drawn the same way (smaller, to keep the brute force quick)."""
    sizes = {}
    for axis in "dhw" if volumes else "hw":
        size, kernel, stride = draw(st.integers(1, 7 if volumes else 12)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
        pad, dilation = draw(st.integers(0, 7)), draw(st.integers(1, 3))
        out = max(1, (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 + draw(st.integers(-1, 1)))
        sizes[axis] = (size, out, kernel, stride, pad, dilation)
    h, w = sizes["h"], sizes["w"]
    return RawGeometry([v for pair in zip(h, w) for v in pair], draw(st.integers(1, 3)), sizes.get("d"))


def in_window_indices(geometry, gen):
    """For each output, the flat index (in its plane or volume) of a random tap of its window that lies
    inside the input (-1 when none does, or for one output in 8: "no argmax", which sends its gradient
    nowhere)."""
    in_h, in_w, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw = geometry.sizes

    def taps(size, out, kernel, stride, pad, dilation):  # (planes, out) random inside coordinates, or -1
        coords = torch.arange(out)[:, None] * stride - pad + torch.arange(kernel)[None, :] * dilation  # (out, kernel)
        inside = (coords >= 0) & (coords < size)
        scores = torch.rand(geometry.planes, out, kernel, generator=gen).masked_fill(~inside, -1.0)
        choice = coords.expand(geometry.planes, out, kernel).gather(2, scores.argmax(2, keepdim=True))[..., 0]
        return torch.where(inside.any(1), choice, torch.full_like(choice, -1))

    slices = torch.zeros(geometry.planes, 1, 1, 1, dtype=torch.int64)  # a plane: slice 0 of depth 1
    if geometry.depth is not None:
        slices = taps(*geometry.depth)[:, :, None, None]
    rows = taps(in_h, out_h, kh, sh, ph, dh)[:, None, :, None]
    cols = taps(in_w, out_w, kw, sw, pw, dw)[:, None, None, :]
    out_d = slices.shape[1]
    none = (slices < 0) | (rows < 0) | (cols < 0) | (torch.rand(geometry.planes, out_d, out_h, out_w, generator=gen) < 0.125)
    index = torch.where(none, torch.full_like(slices * rows * cols, -1), (slices * in_h + rows) * in_w + cols)
    return index.view(geometry.output_shape)


def scatter_backward(geometry, grad_output, indices):
    """The definition: each output's gradient added at its index (none for -1)."""
    grad_input = torch.zeros(geometry.planes, math.prod(geometry.input_shape[1:]), dtype=torch.float64)
    keep = indices.flatten(1) >= 0
    grad_input.scatter_add_(1, indices.flatten(1).clamp(min=0), torch.where(keep, grad_output.flatten(1), 0.0))
    return grad_input.view(geometry.input_shape)


@given(geometry=st.one_of(raw_geometries(), raw_geometries(volumes=True)), seed=st.integers(0, 2**16), wide=st.booleans())
def test_backward_of_any_geometry_matches_scatter(cells, geometry, seed, wide):
    """The per-element and every fitting per-cell backward against the definition, for indices anywhere in
    their windows, of planes and of volumes (dilated along depth too: a cell one slice deep takes only
    the output depths whose taps land on its slice). Integer gradients make every sum exact, whatever
    its order."""
    gen = torch.Generator().manual_seed(seed)
    indices = in_window_indices(geometry, gen)
    grad_output = torch.randint(-8, 9, geometry.output_shape, generator=gen).to(torch.float64)
    expected = scatter_backward(geometry, grad_output, indices)
    assert torch.equal(pixels_backward(cells, grad_output, indices, geometry, wide), expected)
    for shape in cell_shapes(geometry):
        for reverse in (False, True):
            got = cells_backward(cells, grad_output, indices, geometry, shape, wide, reverse)
            assert torch.equal(got, expected), f"cells {shape}"


def test_cell_shape_choice(cells):
    """Which launches take the per-cell kernel, and with what cells: undilated windows at strides up to
    4; stride 1 takes 2 window starts per cell where the axis has room."""

    def shape(size, kernel, stride, dilation=1):
        return launcher_shape(cells, PoolCase(len(size), 1, 1, size, kernel, stride, 0, dilation))

    assert [shape((20, 20), 5, s)[0] for s in range(1, 7)] == [2, 2, 4, 4, 0, 0]
    assert shape((20, 20), 3, 1) == (2, 2, 2)  # 3x3 stride 1: 2x2 pixels share 16 windows
    assert shape((20, 20), 3, 2) == (2, 1, 1)
    assert shape((20, 20), 3, (1, 3)) == (4, 2, 1)
    assert shape((20,), 3, 2) == (2, 1, 1)  # 1-d runs as height 1: cells of 1 x 2 in a 2 x 2 tile
    assert shape((20,), 3, 1) == (2, 1, 2)
    assert shape((1, 1), 1, 1) == (1, 1, 1)
    assert shape((20, 20), 3, 2, (2, 1))[0] == 0  # dilated: the per-pixel gather steps over misses



# --------------------------------------------------------------------------------------------------
# The depthwise forward's threads
# --------------------------------------------------------------------------------------------------

UNROLLED_WINDOWS = [(3, 3), (5, 5), (7, 7), (1, 3), (1, 5), (1, 7)]  # depthwise_cuda.cu's dispatch_window


def depthwise_sizes(x, weight, stride, padding, dilation):
    """The 12 sizes the kernels take (see sizes_2d) for a 2-d depthwise convolution."""
    _, _, h, w = x.shape
    _, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = [(v, v) if isinstance(v, int) else v for v in (stride, padding, dilation)]
    out_h, out_w = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in ((h, kh, sh, ph, dh), (w, kw, sw, pw, dw))]
    return torch.tensor([h, w, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw], dtype=torch.int64)


def host_depthwise(lib, x, weight, bias, stride, padding, dilation, unrolled, wide_index):
    """The depthwise forward kernel's threads over every output; and which code ran: 0 the run-time loop,
    1 unrolled with one output per thread, 2 unrolled column threads."""
    n, cin = x.shape[:2]
    cout = weight.shape[0]
    sizes = depthwise_sizes(x, weight, stride, padding, dilation)
    out = torch.full((n, cout, *sizes[2:4].tolist()), float("nan"), dtype=torch.float64)
    ran = lib.depthwise_forward_outputs(
        out.data_ptr(), x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), n, cin, cout,
        sizes.data_ptr(), int(unrolled), int(wide_index),
    )
    return out, ran


def by_columns(output, stride, dilation):
    """Whether the unrolled forward takes column threads (depthwise_by_columns): stride_h = dilation_h = 1
    and at least 4 rows of output."""
    first = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
    return first(stride) == 1 and first(dilation) == 1 and output.shape[2] >= 4


@pytest.mark.parametrize("kernel", UNROLLED_WINDOWS + [(2, 2), (4, 3)], ids=str)
@pytest.mark.parametrize(
    "stride, padding, dilation",
    # stride_h = dilation_h = 1 (the first and last) takes the unrolled windows' column threads
    [(1, 1, 1), (2, 2, 1), ((1, 2), (3, 0), (2, 1)), ((1, 2), (2, 1), (1, 2))],
    ids=str,
)
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_forward_matches_torch(cells, kernel, stride, padding, dilation, multiplier):
    """Against torch's; and the unrolled threads (one output, or a column of them) bit-identical to the
    run-time loop (the same terms in the same order). 11 rows of output are not a whole number of
    columns."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 11, 12, generator=gen, dtype=torch.float64)
    weight = torch.randn(3 * multiplier, 1, *kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(3 * multiplier, generator=gen, dtype=torch.float64)
    for b in (bias, None):
        expected = torch.nn.functional.conv2d(x, weight, b, stride, padding, dilation, groups=3)
        runtime, _ = host_depthwise(cells, x, weight, b, stride, padding, dilation, False, True)
        for unrolled, wide in itertools.product((True, False), (False, True)):
            got, ran = host_depthwise(cells, x, weight, b, stride, padding, dilation, unrolled, wide)
            if not (unrolled and kernel in UNROLLED_WINDOWS):
                assert ran == 0
            else:
                assert ran == (2 if by_columns(expected, stride, dilation) else 1)
            torch.testing.assert_close(got, expected)
            assert torch.equal(got, runtime)


def host_depthwise_input_grad(lib, grad_output, x, weight, stride, padding, dilation, unrolled, wide_index):
    """The depthwise input-gradient kernel's per-element code over every input element; and whether it
    ran unrolled."""
    n, cin = x.shape[:2]
    sizes = depthwise_sizes(x, weight, stride, padding, dilation)
    grad_input = torch.full(x.shape, float("nan"), dtype=torch.float64)
    grad_output = grad_output.contiguous()
    ran_unrolled = lib.depthwise_backward_input_pixels(
        grad_input.data_ptr(), grad_output.data_ptr(), weight.data_ptr(), n, cin, weight.shape[0], sizes.data_ptr(),
        int(unrolled), int(wide_index),
    )
    return grad_input, bool(ran_unrolled)


@pytest.mark.parametrize("kernel", UNROLLED_WINDOWS + [(2, 2), (4, 3)], ids=str)
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 2, 1), ((1, 2), (3, 0), (2, 1)), (3, 4, 2)], ids=str)
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_input_gradient_matches_torch(cells, kernel, stride, padding, dilation, multiplier):
    """Unrolled and walking versions against torch's, and bit-identical to each other (the same terms in
    the same order)."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 11, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3 * multiplier, 1, *kernel, generator=gen, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups=3)
    grad_output = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (expected,) = torch.autograd.grad(y, x, grad_output)
    walked, ran_unrolled = host_depthwise_input_grad(cells, grad_output, x, weight, stride, padding, dilation, False, True)
    assert not ran_unrolled
    torch.testing.assert_close(walked, expected)
    unrolled, ran_unrolled = host_depthwise_input_grad(cells, grad_output, x, weight, stride, padding, dilation, True, False)
    assert ran_unrolled == (kernel in UNROLLED_WINDOWS)
    assert torch.equal(unrolled, walked)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding, dilation",
    [
        ((2, 3, 1, 30), (1, 3), 1, (0, 1), 1),  # 1-d as the kernels see it: height 1
        ((2, 3, 1, 30), (1, 5), (1, 2), (0, 2), (1, 2)),
        ((2, 3, 1, 30), (1, 7), (1, 3), (0, 4), (1, 1)),
        ((2, 3, 5, 5), (5, 5), 1, 0, 1),  # a single output per plane
        ((2, 3, 3, 3), (3, 3), 4, 3, 1),  # padding and stride over the kernel
    ],
    ids=str,
)
def test_depthwise_threads_on_edge_geometries(cells, shape, kernel, stride, padding, dilation):
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 1, *kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups=3)
    grad_output = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad(y, x, grad_output)
    for unrolled, wide in itertools.product((True, False), (False, True)):
        out, _ = host_depthwise(cells, x.detach(), weight, bias, stride, padding, dilation, unrolled, wide)
        torch.testing.assert_close(out, y.detach())
        grad, _ = host_depthwise_input_grad(cells, grad_output, x, weight, stride, padding, dilation, unrolled, wide)
        torch.testing.assert_close(grad, expected_grad)


# --------------------------------------------------------------------------------------------------
# The CUDA backward's index check: shape_checks.h's index_from_window, on planes and volumes
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_check(tmp_path_factory):
    """index_from_window built on the host; shape_checks.h includes ATen, so with torch's headers (and
    torch's C++ standard and ABI), though no ATen code is called."""
    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    lib = build_host_library(tmp_path_factory, "index_check_host.cpp", [*flags, *(f"-I{p}" for p in include_paths())])
    lib.indices_from_window.restype = None
    lib.indices_from_window.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 7 + [ctypes.c_void_p]
    return lib


@given(geometry=st.one_of(raw_geometries(), raw_geometries(volumes=True)))
def test_index_check_accepts_exactly_the_window(index_check, geometry):
    """For outputs across a plane or volume, index_from_window accepts -1 and the flat indices of their
    window's taps that lie inside the input, and nothing else (around the volume's ends too)."""
    in_h, in_w, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw = geometry.sizes
    in_d, out_d, kd, sd, pd, dd = geometry.depth or ONE_DEEP
    window = torch.tensor([kd, kh, kw, sd, sh, sw, pd, ph, pw, dd, dh, dw], dtype=torch.int64)
    volume = in_d * in_h * in_w
    candidates = torch.arange(-3, volume + 3)
    accepted = torch.empty(len(candidates), dtype=torch.int8)
    k, i, j = torch.meshgrid(torch.arange(kd), torch.arange(kh), torch.arange(kw), indexing="ij")
    outputs = list(itertools.product(range(out_d), range(out_h), range(out_w)))
    for od, oh, ow in outputs[:: max(1, len(outputs) // 60)] + outputs[-1:]:  # about 60, the last included
        z, h, w = od * sd - pd + k * dd, oh * sh - ph + i * dh, ow * sw - pw + j * dw
        inside = (z >= 0) & (z < in_d) & (h >= 0) & (h < in_h) & (w >= 0) & (w < in_w)
        taps = ((z * in_h + h) * in_w + w)[inside]
        expected = torch.isin(candidates, taps) | (candidates == -1)
        index_check.indices_from_window(
            accepted.data_ptr(), candidates.data_ptr(), len(candidates), od, oh, ow, in_d, in_h, in_w, window.data_ptr()
        )
        assert torch.equal(accepted.bool(), expected), (od, oh, ow)
