"""The CUDA kernels' index logic, run on the CPU: code written for host and device alike
(csrc/cuda/max_pool_cells.h) is compiled here with the host compiler (tests/cpp/max_pool_cells_host.cpp)
and checked against torch, so it is tested on every machine, with or without a GPU."""
import ctypes
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from common import PoolCase, pool_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """The host build of the max-pool backward's per-cell code, loaded with ctypes."""
    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    compiler = compiler.split()[0]
    assert shutil.which(compiler), f"no C++ compiler ({compiler}); the extension's build needs one too"
    library = str(tmp_path_factory.mktemp("cells") / "max_pool_cells_host.so")
    source = os.path.join(ROOT, "tests", "cpp", "max_pool_cells_host.cpp")
    subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Werror", "-shared", "-fPIC", "-o", library, source], check=True)
    lib = ctypes.CDLL(library)
    lib.max_pool_backward_cells.restype = ctypes.c_int
    lib.max_pool_backward_cells.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.max_pool_backward_cells.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.max_pool_cell_shape.restype = None
    lib.max_pool_cell_shape.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib


def sizes_2d(case):
    """in_h, in_w, out_h, out_w, kernel, stride, padding, dilation (h, w each), as the kernels see them."""
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


def cells_backward(lib, grad_output, indices, case, shape, wide_index, reverse=False):
    """grad_input from the per-cell code with cells of shape (tile, starts_h, starts_w), every cell of
    every plane in turn (as the CUDA threads would), first to last or last to first; shape (0, 0, 0): the
    launcher's choice."""
    sizes = sizes_2d(case)
    in_h, in_w = sizes[:2].tolist()
    grad_output = grad_output.contiguous().to(torch.float64)
    indices = indices.contiguous()
    grad_input = torch.full(case.input_shape, float("nan"), dtype=torch.float64)  # every pixel must be written
    planes = grad_input.numel() // (in_h * in_w) if grad_input.numel() else 0
    status = lib.max_pool_backward_cells(
        grad_input.data_ptr(), grad_output.data_ptr(), indices.data_ptr(), planes, sizes.data_ptr(), *shape, int(wide_index),
        int(reverse),
    )
    assert status == 0, f"cells {shape} cannot serve {case}"
    return grad_input


def torch_backward(case, values, seed):
    x = case.make_input("cpu", torch.float64, values=values, seed=seed, requires_grad=True)
    y, indices = case.torch_fn()(x, **case.kwargs(return_indices=True))
    grad_output = case.make_grad_output("cpu", torch.float64, seed=seed + 1)
    (grad_input,) = torch.autograd.grad(y, x, grad_output)
    return grad_output, indices, grad_input


def cell_shapes(case):
    """Every (tile, starts_h, starts_w) whose cells fit their tile."""
    _, _, _, _, _, _, sh, sw, *_ = sizes_2d(case).tolist()
    return [
        (tile, mh, mw)
        for tile in (1, 2, 4)
        for mh in range(1, tile // sh + 1)
        for mw in range(1, tile // sw + 1)
    ]


@given(case=pool_cases(), values=st.sampled_from(["distinct", "ties", "nan"]), wide=st.booleans())
def test_cells_match_torch(cells, case, values, wide):
    """Every cell shape that fits, dilated windows included (the launcher gives those to the per-pixel
    gather, but the cell code is correct for them too)."""
    grad_output, indices, expected = torch_backward(case, values, seed=3)
    for shape in cell_shapes(case):
        for reverse in (False, True):  # a pixel written by two cells differs in one of the orders
            got = cells_backward(cells, grad_output, indices, case, shape, wide, reverse)
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m: f"cells {shape}: {m}")


CURATED = [  # the benchmark's shapes, scaled down, and the corners of the cell grid
    PoolCase(2, 2, 3, (16, 16), 3, 2, 1),  # ResNet's stem pool: 4 windows reach each 2x2 cell
    PoolCase(2, 2, 3, (12, 12), 2, 2, 0),  # windows tiling the input: one window per cell
    PoolCase(2, 2, 3, (11, 11), 2, 2, 0, ceil_mode=True),  # the last window hangs over the edge
    PoolCase(2, 2, 3, (9, 9), 3, 1, 1),  # stride 1: a cell is a pixel
    PoolCase(2, 2, 2, (9, 10), 2, 3, 0),  # stride over the kernel: pixels no window sees get 0
    PoolCase(2, 2, 2, (13, 14), 4, 4, 2, ceil_mode=True),  # padding fills a whole cell
    PoolCase(2, 1, 2, (5, 3), (3, 2), (3, 4), (1, 1)),  # cells wider than the input (aliasing slots)
    PoolCase(2, 1, 2, (4, 1), (2, 1), (2, 3), 0),  # a one-pixel-wide input
    PoolCase(1, 2, 3, (20,), 3, 2, 1),  # 1-d: cells 1 x 2
    PoolCase(2, 2, 2, (17, 17), 5, 4, 2, ceil_mode=True),
]


@pytest.mark.parametrize("case", CURATED, ids=str)
@pytest.mark.parametrize("values", ["distinct", "ties", "nan"])
def test_cells_match_torch_curated(cells, case, values):
    grad_output, indices, expected = torch_backward(case, values, seed=5)
    for wide, reverse in [(False, False), (True, True)]:
        got = cells_backward(cells, grad_output, indices, case, (0, 0, 0), wide, reverse)  # the launcher's cells
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


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
