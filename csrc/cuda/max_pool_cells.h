// max_pool_cells.h — what one thread of the CUDA max-pool backward does for undilated windows: gather the
// gradient of one cell of input pixels. Plain C++ that also compiles for the host, so that
// tests/test_cuda_logic.py runs this exact code on the CPU against torch (a machine with no GPU can test it).
//
// The cells tile the padded input (coordinates + padding) along the stride grid: a cell spans `starts_h`
// window starts down and `starts_w` across, i.e. starts_h*stride_h rows by starts_w*stride_w columns, and
// cell (ch, cw) begins where window (ch*starts_h, cw*starts_w) begins. Along each axis the windows that
// reach the cell are o in [c*starts - reach, c*starts + starts - 1], reach = (kernel-1)*dilation / stride,
// no division needed. A thread per cell loads each of those windows' (index, gradient) once for all the
// cell's pixels: for 3x3 windows at stride 2 (a cell of 2x2 pixels), 4 loads for 4 pixels where a thread
// per pixel makes 9; 2x2 at stride 2, 1 for 4; 3x3 at stride 1 with 2x2 starts, 16 for 4. Each pixel's sum
// still takes its terms in increasing output order, as the per-pixel gather does: the same result, and
// deterministic.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MANUALGRAD_HOST_DEVICE __host__ __device__
#define MANUALGRAD_UNROLL _Pragma("unroll")
#define MANUALGRAD_UNROLL_BY_4 _Pragma("unroll 4")
#else
#define MANUALGRAD_HOST_DEVICE
#define MANUALGRAD_UNROLL
#define MANUALGRAD_UNROLL_BY_4
#endif

namespace manualgrad {

template <typename index_t>
struct CellGeo {
  index_t in_h, in_w, out_h, out_w, pad_h, pad_w;
  index_t starts_h, starts_w;  // window starts per cell along each axis
  index_t cell_h, cell_w;      // pixels per cell: starts * stride
  index_t reach_h, reach_w;    // how many windows before a cell's first still reach into it
  index_t first_h, first_w;    // the first cell holding an input pixel (padding may fill whole cells)
  index_t cells_h, cells_w;    // how many cells hold input pixels
  CellGeo(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, int64_t kernel_h, int64_t kernel_w,
          int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
          int64_t starts_h, int64_t starts_w)
      : in_h(in_h), in_w(in_w), out_h(out_h), out_w(out_w), pad_h(pad_h), pad_w(pad_w), starts_h(starts_h),
        starts_w(starts_w), cell_h(starts_h * stride_h), cell_w(starts_w * stride_w),
        reach_h((kernel_h - 1) * dilation_h / stride_h), reach_w((kernel_w - 1) * dilation_w / stride_w),
        first_h(pad_h / cell_h), first_w(pad_w / cell_w), cells_h((pad_h + in_h - 1) / cell_h - first_h + 1),
        cells_w((pad_w + in_w - 1) / cell_w - first_w + 1) {}
};

// Writes the gradient of every input pixel of cell (ch, cw) of one plane. grad_input is the plane (in_h,
// in_w); grad_output and indices are the plane (out_h, out_w). Cells up to TILE_H x TILE_W pixels: the
// sums live in registers, which needs their count fixed at compile time.
template <int TILE_H, int TILE_W, typename acc_t, typename scalar_t, typename index_t>
MANUALGRAD_HOST_DEVICE inline void max_pool_backward_cell(scalar_t* grad_input, const scalar_t* grad_output,
                                                          const int64_t* indices, const CellGeo<index_t>& g,
                                                          index_t ch, index_t cw) {
  const index_t row0 = ch * g.cell_h - g.pad_h, col0 = cw * g.cell_w - g.pad_w;  // may be in the padding
  const int64_t corner = static_cast<int64_t>(row0) * g.in_w + col0;  // flat index of the cell's first pixel
  const index_t oh_first = ch * g.starts_h, ow_first = cw * g.starts_w;
  const index_t oh_lo = oh_first > g.reach_h ? oh_first - g.reach_h : 0;
  const index_t ow_lo = ow_first > g.reach_w ? ow_first - g.reach_w : 0;
  const index_t oh_end = oh_first + g.starts_h < g.out_h ? oh_first + g.starts_h : g.out_h;
  const index_t ow_end = ow_first + g.starts_w < g.out_w ? ow_first + g.starts_w : g.out_w;
  acc_t sum[TILE_H][TILE_W];
  MANUALGRAD_UNROLL
  for (int i = 0; i < TILE_H; ++i)
    MANUALGRAD_UNROLL
    for (int j = 0; j < TILE_W; ++j) sum[i][j] = acc_t(0);
  // The windows in reach, row-major, as one loop that the GPU build unrolls by 4 so that several
  // windows' loads are in flight at once (the kernel is bound by memory latency, not bandwidth).
  const index_t rows = oh_end - oh_lo, cols = ow_end - ow_lo;
  const index_t windows = rows > 0 && cols > 0 ? rows * cols : 0;
  index_t oh = oh_lo, ow = ow_lo;
  MANUALGRAD_UNROLL_BY_4
  for (index_t k = 0; k < windows; ++k) {
    const index_t o = oh * g.out_w + ow;
    const int64_t offset = indices[o] - corner;
    const acc_t delta = static_cast<acc_t>(grad_output[o]);
    // Slot (i, j) stands for the flat index corner + i*in_w + j. A slot whose pixel is off the input can
    // alias a pixel of another row; such slots are never written, and the aliased pixel's own slot (in
    // this cell or another) takes the term. Writing `+= match ? delta : 0` keeps the sums in registers.
    MANUALGRAD_UNROLL
    for (int i = 0; i < TILE_H; ++i) {
      const int64_t column = offset - static_cast<int64_t>(i) * g.in_w;
      MANUALGRAD_UNROLL
      for (int j = 0; j < TILE_W; ++j) sum[i][j] += column == j ? delta : acc_t(0);
    }
    if (++ow == ow_end) {
      ow = ow_lo;
      ++oh;
    }
  }
  MANUALGRAD_UNROLL
  for (int i = 0; i < TILE_H; ++i) {
    const index_t row = row0 + i;
    if (i >= g.cell_h || row < 0 || row >= g.in_h) continue;
    MANUALGRAD_UNROLL
    for (int j = 0; j < TILE_W; ++j) {
      const index_t col = col0 + j;
      if (j < g.cell_w && col >= 0 && col < g.in_w) grad_input[row * g.in_w + col] = static_cast<scalar_t>(sum[i][j]);
    }
  }
}

// How a launch is cut into cells: the square register tile (1, 2 or 4 pixels a side) and the window
// starts per cell along each axis. Stride 1 takes 2 starts per cell where the axis has room, so 2x2
// pixels share their windows; larger strides take 1. A tile of 0 means the per-pixel gather serves
// better: strides over 4, or dilated windows (a cell would visit every window in reach, while the
// per-pixel gather steps over those whose taps miss the pixel).
struct CellShape {
  int tile;
  int64_t starts_h, starts_w;
};

inline CellShape max_pool_cell_shape(int64_t in_h, int64_t in_w, int64_t stride_h, int64_t stride_w,
                                     int64_t dilation_h, int64_t dilation_w) {
  const int64_t starts_h = stride_h == 1 && in_h > 1 ? 2 : 1, starts_w = stride_w == 1 && in_w > 1 ? 2 : 1;
  const int64_t side = starts_h * stride_h > starts_w * stride_w ? starts_h * stride_h : starts_w * stride_w;
  const int tile = dilation_h != 1 || dilation_w != 1 ? 0 : side == 1 ? 1 : side == 2 ? 2 : side <= 4 ? 4 : 0;
  return {tile, starts_h, starts_w};
}

}  // namespace manualgrad
