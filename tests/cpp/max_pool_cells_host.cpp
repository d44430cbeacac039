// max_pool_cells_host.cpp — a host build of the CUDA max-pool backward's per-cell code
// (csrc/cuda/max_pool_cells.h) for tests/test_cuda_logic.py: runs every cell of every plane in turn, as
// the kernel's threads would, behind C entry points that ctypes can call.
#include "../../csrc/cuda/max_pool_cells.h"

namespace {

// Cells in increasing order, or (reverse) decreasing: a cell writing a pixel that is another's shows up in
// one order or the other, as the race it would be on the GPU.
template <int TILE, typename index_t>
void run_cells(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
               const manualgrad::CellGeo<index_t>& g, bool reverse) {
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_plane = int64_t{g.out_h} * g.out_w;
  const int64_t cells = int64_t{g.cells_h} * g.cells_w;
  for (int64_t p = 0; p < planes; ++p)
    for (int64_t k = 0; k < cells; ++k) {
      const int64_t c = reverse ? cells - 1 - k : k;
      const index_t ch = static_cast<index_t>(g.first_h + c / g.cells_w), cw = static_cast<index_t>(g.first_w + c % g.cells_w);
      manualgrad::max_pool_backward_cell<TILE, TILE, double>(grad_input + p * in_plane, grad_output + p * out_plane,
                                                             indices + p * out_plane, g, ch, cw);
    }
}

template <typename index_t>
int run_tile(manualgrad::CellShape shape, double* grad_input, const double* grad_output, const int64_t* indices,
             int64_t planes, const int64_t* s, bool reverse) {
  const manualgrad::CellGeo<index_t> g(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11],
                                       shape.starts_h, shape.starts_w);
  if (g.cell_h > shape.tile || g.cell_w > shape.tile) return 2;  // a cell would not fit the tile
  switch (shape.tile) {
    case 1: run_cells<1>(grad_input, grad_output, indices, planes, g, reverse); return 0;
    case 2: run_cells<2>(grad_input, grad_output, indices, planes, g, reverse); return 0;
    case 4: run_cells<4>(grad_input, grad_output, indices, planes, g, reverse); return 0;
    default: return 1;
  }
}

}  // namespace

extern "C" {

// sizes: in_h, in_w, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w.
// tile 0 takes the cell shape the CUDA launcher would choose; reverse runs the cells last to first. Returns 0, or non-zero when the tile cannot
// hold the cells.
int max_pool_backward_cells(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
                            const int64_t* sizes, int tile, int64_t starts_h, int64_t starts_w, int wide_index,
                            int reverse) {
  const manualgrad::CellShape shape =
      tile == 0 ? manualgrad::max_pool_cell_shape(sizes[0], sizes[1], sizes[6], sizes[7], sizes[10], sizes[11])
                : manualgrad::CellShape{tile, starts_h, starts_w};
  return wide_index ? run_tile<int64_t>(shape, grad_input, grad_output, indices, planes, sizes, reverse != 0)
                    : run_tile<int32_t>(shape, grad_input, grad_output, indices, planes, sizes, reverse != 0);
}

// The launcher's choice, as (tile, starts_h, starts_w) in out[0..2].
void max_pool_cell_shape(const int64_t* sizes, int64_t* out) {
  const manualgrad::CellShape shape =
      manualgrad::max_pool_cell_shape(sizes[0], sizes[1], sizes[6], sizes[7], sizes[10], sizes[11]);
  out[0] = shape.tile;
  out[1] = shape.starts_h;
  out[2] = shape.starts_w;
}
}
