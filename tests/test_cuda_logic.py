"""The CUDA kernels' index logic, run on the CPU: code written for host and device alike
(csrc/cuda/window_walk.h, csrc/cuda/max_pool_threads.h, csrc/cuda/depthwise_threads.h) is compiled here with the host compiler
(tests/cpp/cuda_logic_host.cpp) and checked against brute force and torch, so it is tested on every
machine, with or without a GPU."""
import ctypes
import dataclasses
import itertools
import math
import os
import shlex
import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from common import PoolCase, pool_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """The host build of the CUDA kernels' index logic, loaded with ctypes."""
    # the first that exists of $TMG_HOST_CXX (make sanitize's instrumented compiler, which torch.compile
    # must not get), $CXX, Python's CXX, c++, g++ (a command such as "ccache g++" kept whole)
    candidates = [os.environ.get("TMG_HOST_CXX"), os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++", "g++"]
    found = [shlex.split(c) for c in candidates if c and shlex.split(c) and shutil.which(shlex.split(c)[0])]
    assert found, f"no C++ compiler among {candidates}; the extension's build needs one too"
    library = str(tmp_path_factory.mktemp("cuda_logic") / "cuda_logic_host.so")
    source = os.path.join(ROOT, "tests", "cpp", "cuda_logic_host.cpp")
    subprocess.run([*found[0], "-std=c++17", "-O1", "-Wall", "-shared", "-fPIC", "-o", library, source], check=True)
    lib = ctypes.CDLL(library)
    lib.max_pool_backward_cells.restype = ctypes.c_int
    lib.max_pool_backward_cells.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.max_pool_backward_cells.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.max_pool_cell_shape.restype = None
    lib.max_pool_cell_shape.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    for name in ("max_pool_forward_outputs", "max_pool_backward_pixels"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.max_pool_forward_outputs_int.restype = None
    lib.max_pool_forward_outputs_int.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.depthwise_forward_outputs.restype = ctypes.c_int
    lib.depthwise_forward_outputs.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.depthwise_forward_outputs.argtypes += [ctypes.c_int, ctypes.c_int]
    lib.depthwise_backward_input_pixels.restype = ctypes.c_int
    lib.depthwise_backward_input_pixels.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    lib.depthwise_backward_input_pixels.argtypes += [ctypes.c_int, ctypes.c_int]
    lib.walk_covering_windows.restype = ctypes.c_int64
    lib.walk_covering_windows.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


# --------------------------------------------------------------------------------------------------
# The gather walk (col2im, depthwise grad-input, max-pool's per-pixel gather)
# --------------------------------------------------------------------------------------------------


def walk(lib, sizes, wide_index):
    """(pixel, i, j, o) for every window tap the walk visits, pixels in row-major order."""
    sizes = torch.tensor(sizes, dtype=torch.int64)
    capacity = int(sizes[0] * sizes[1] * sizes[4] * sizes[5])  # a pixel meets each tap at most once
    visits = torch.empty(max(capacity, 1), 4, dtype=torch.int64)
    count = lib.walk_covering_windows(sizes.data_ptr(), visits.data_ptr(), capacity, int(wide_index))
    assert count >= 0, "more visits than window taps"
    return visits[:count]


def brute_force_walk(sizes):
    """The same from the definition: every (output, tap) pair, kept where the tap lands inside the input,
    ordered by pixel and then by output."""
    in_h, in_w, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw = sizes
    oh, ow, i, j = torch.meshgrid(*(torch.arange(n) for n in (out_h, out_w, kh, kw)), indexing="ij")
    h, w = oh * sh - ph + i * dh, ow * sw - pw + j * dw
    inside = (h >= 0) & (h < in_h) & (w >= 0) & (w < in_w)
    pixel, o = (h * in_w + w)[inside], (oh * out_w + ow)[inside]
    rows = torch.stack([pixel, i[inside], j[inside], o], dim=1)
    return rows[torch.argsort(pixel * out_h * out_w + o)]


@st.composite
def walk_sizes(draw):
    """A window grid along each axis as a conv or a pool (ceil_mode's overhanging last window) makes it."""
    axes = []
    for _ in range(2):
        size, kernel, stride = draw(st.integers(1, 12)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
        dilation, pad = draw(st.integers(1, 7)), draw(st.integers(0, 6))
        out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        if out < 1:
            pad, out = dilation * (kernel - 1), (size + dilation * (kernel - 1) - 1) // stride + 1
        out += draw(st.integers(0, 1))
        axes.append((size, out, kernel, stride, pad, dilation))
    (a, b) = axes
    return [a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3], a[4], b[4], a[5], b[5]]


@given(sizes=walk_sizes(), wide=st.booleans())
def test_walk_visits_exactly_the_covering_taps(cells, sizes, wide):
    assert torch.equal(walk(cells, sizes, wide), brute_force_walk(sizes))


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


def test_walk_examples_of_the_tutorial(cells):
    """docs/tutorial.md section 6: which (output, tap) pairs reach one input element."""

    def reaching(length, kernel, stride, padding, dilation, element):
        out = (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
        visits = walk(cells, [1, length, 1, out, 1, kernel, 1, stride, 0, padding, 1, dilation], False)
        return [(o, tap) for pixel, _, tap, o in visits.tolist() if pixel == element]

    assert reaching(7, 3, 2, 1, 1, element=3) == [(1, 2), (2, 0)]  # tap 2 of output 1, tap 0 of output 2
    assert reaching(7, 3, 1, 2, 2, element=2) == [(0, 2), (2, 1), (4, 0)]  # outputs 1 and 3 step over it

    # 3x3 windows at stride 2, padding 1: a 2x2 cell of elements (input rows and columns 3, 4) is reached
    # by 4 windows, where its elements one by one are reached 9 times
    visits = walk(cells, [9, 9, 5, 5, 3, 3, 2, 2, 1, 1, 1, 1], False)
    cell = {3 * 9 + 3, 3 * 9 + 4, 4 * 9 + 3, 4 * 9 + 4}
    in_cell = [o for pixel, _, _, o in visits.tolist() if pixel in cell]
    assert len(in_cell) == 9 and len(set(in_cell)) == 4


# --------------------------------------------------------------------------------------------------
# The max-pool threads: forward, per-pixel backward, per-cell backward
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RawGeometry:
    """A backward launch given by its 12 sizes (see sizes_2d) and plane count, as a raw call of the op may
    make it: padding over half the kernel, a grad_output larger or smaller than a forward's."""

    sizes: list
    planes: int

    @property
    def input_shape(self):
        return (self.planes, *self.sizes[:2])

    @property
    def output_shape(self):
        return (self.planes, *self.sizes[2:4])


def sizes_2d(case):
    """in_h, in_w, out_h, out_w, kernel, stride, padding, dilation (h, w each), as the kernels see them."""
    if isinstance(case, RawGeometry):
        return torch.tensor(case.sizes, dtype=torch.int64)
    k, s, p, d = case.tuples()
    if case.dim == 1:  # 1-d runs as 2-d of height 1, as in the kernels
        k, s, p, d = (1, *k), (1, *s), (0, *p), (1, *d)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, s, p, d
    in_h, in_w = (1, *case.input_size) if case.dim == 1 else case.input_size
    out = case.output_spatial()
    out_h, out_w = (1, *out) if case.dim == 1 else out
    return torch.tensor([in_h, in_w, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw], dtype=torch.int64)


def launcher_shape(lib, case):
    """(tile, starts_h, starts_w) the CUDA launcher picks; tile 0: the per-pixel gather."""
    sizes, out = sizes_2d(case), torch.zeros(3, dtype=torch.int64)  # both alive through the call
    lib.max_pool_cell_shape(sizes.data_ptr(), out.data_ptr())
    return tuple(out.tolist())


def planes(case):
    if isinstance(case, RawGeometry):
        return case.planes
    in_h, in_w = sizes_2d(case)[:2].tolist()
    return math.prod(case.input_shape) // (in_h * in_w)


def host_forward(lib, x, case, wide_index):
    """(output, indices) from the forward kernel's per-output code, every output in turn."""
    sizes, x = sizes_2d(case), x.contiguous()
    output = torch.full(case.output_shape, 7.0, dtype=torch.float64)
    indices = torch.full(case.output_shape, -7, dtype=torch.int64)
    lib.max_pool_forward_outputs(output.data_ptr(), indices.data_ptr(), x.data_ptr(), planes(case), sizes.data_ptr(), int(wide_index))
    return output, indices


def pixels_backward(lib, grad_output, indices, case, wide_index):
    """grad_input from the per-pixel backward code, every pixel in turn."""
    sizes, grad_output, indices = sizes_2d(case), grad_output.contiguous(), indices.contiguous()
    grad_input = torch.full(case.input_shape, float("nan"), dtype=torch.float64)
    lib.max_pool_backward_pixels(
        grad_input.data_ptr(), grad_output.data_ptr(), indices.data_ptr(), planes(case), sizes.data_ptr(), int(wide_index)
    )
    return grad_input


def cells_backward(lib, grad_output, indices, case, shape, wide_index, reverse=False):
    """grad_input from the per-cell code with cells of shape (tile, starts_h, starts_w), every cell of
    every plane in turn (as the CUDA threads would), first to last or last to first; shape (0, 0, 0): the
    launcher's choice."""
    sizes, grad_output, indices = sizes_2d(case), grad_output.contiguous(), indices.contiguous()
    grad_input = torch.full(case.input_shape, float("nan"), dtype=torch.float64)  # every pixel must be written
    status = lib.max_pool_backward_cells(
        grad_input.data_ptr(), grad_output.data_ptr(), indices.data_ptr(), planes(case), sizes.data_ptr(), *shape,
        int(wide_index), int(reverse),
    )
    assert status == 0, f"cells {shape} cannot serve {case}"
    return grad_input


def torch_pool(case, values, seed):
    """torch's max-pool in float64: input, output, indices, a grad_output and the grad_input it gives."""
    x = case.make_input("cpu", torch.float64, values=values, seed=seed, requires_grad=True)
    y, indices = case.torch_fn()(x, **case.kwargs(return_indices=True))
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
                                       torch.tensor([], dtype=dtype).element_size())
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


@st.composite
def raw_geometries(draw):
    """Backward launches beyond a forward's: padding up to 7 whatever the kernel, grad_output one window
    shorter or longer than the formula's along an axis (windows wholly in the padding included)."""
    sizes = {}
    for axis in "hw":
        size, kernel, stride = draw(st.integers(1, 12)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
        pad, dilation = draw(st.integers(0, 7)), draw(st.integers(1, 3))
        out = max(1, (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 + draw(st.integers(-1, 1)))
        sizes[axis] = (size, out, kernel, stride, pad, dilation)
    h, w = sizes["h"], sizes["w"]
    return RawGeometry([v for pair in zip(h, w) for v in pair], draw(st.integers(1, 3)))


def in_window_indices(geometry, gen):
    """For each output, the flat index of a random tap of its window that lies inside the input (-1 when
    none does, or for one output in 8: "no argmax", which sends its gradient nowhere)."""
    in_h, in_w, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw = geometry.sizes

    def taps(size, out, kernel, stride, pad, dilation):  # (planes, out) random inside coordinates, or -1
        coords = torch.arange(out)[:, None] * stride - pad + torch.arange(kernel)[None, :] * dilation  # (out, kernel)
        inside = (coords >= 0) & (coords < size)
        scores = torch.rand(geometry.planes, out, kernel, generator=gen).masked_fill(~inside, -1.0)
        choice = coords.expand(geometry.planes, out, kernel).gather(2, scores.argmax(2, keepdim=True))[..., 0]
        return torch.where(inside.any(1), choice, torch.full_like(choice, -1))

    rows = taps(in_h, out_h, kh, sh, ph, dh)[:, :, None]
    cols = taps(in_w, out_w, kw, sw, pw, dw)[:, None, :]
    none = (rows < 0) | (cols < 0) | (torch.rand(geometry.planes, out_h, out_w, generator=gen) < 0.125)
    return torch.where(none, torch.full_like(rows * cols, -1), rows * in_w + cols)


def scatter_backward(geometry, grad_output, indices):
    """The definition: each output's gradient added at its index (none for -1)."""
    grad_input = torch.zeros(geometry.planes, math.prod(geometry.input_shape[1:]), dtype=torch.float64)
    keep = indices.flatten(1) >= 0
    grad_input.scatter_add_(1, indices.flatten(1).clamp(min=0), torch.where(keep, grad_output.flatten(1), 0.0))
    return grad_input.view(geometry.input_shape)


@given(geometry=raw_geometries(), seed=st.integers(0, 2**16), wide=st.booleans())
def test_backward_of_any_geometry_matches_scatter(cells, geometry, seed, wide):
    """The per-pixel and every fitting per-cell backward against the definition, for indices anywhere in
    their windows. Integer gradients make every sum exact, whatever its order."""
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
