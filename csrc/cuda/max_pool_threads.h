// max_pool_threads.h — what one thread of the CUDA max-pool kernels computes: the forward's window
// maximum, and the backward's gather over one cell of input pixels; for planes (1-d, 2-d) and volumes
// (3-d) alike, the depth loops compiled away for planes (HAS_DEPTH). Plain C++ that also compiles for the
// host, so that tests/test_cuda_logic.py runs this exact code on the CPU against torch (a machine with no
// GPU can test it). max_pool_cuda.cu holds the kernels around them.
//
// Forward: one thread per output scans its window in (d, h, w) order; a later value wins only if
// strictly greater or NaN, so ties go to the first maximum and NaN wins — torch's rule and torch's
// indices. A window entirely in the padding gets index -1, as on the CPU.
//
// Backward: a gather, summing for each input element the gradients of the outputs whose window covers it
// and whose argmax it is, in increasing output order: no atomics, deterministic. Undilated windows at
// strides up to 4 go by cells of pixels that share their windows. The cells tile the padded input
// (coordinates + padding) along the stride grid: a cell spans `starts_h` window starts down and
// `starts_w` across, i.e. starts_h*stride_h rows by starts_w*stride_w columns, and cell (ch, cw) begins
// where window (ch*starts_h, cw*starts_w) begins. Along each axis the windows that reach the cell are o in
// [c*starts - reach, c*starts + starts - 1], reach = (kernel-1)*dilation / stride, no division needed. A
// thread per cell loads each of those windows' (index, gradient) once for all the cell's pixels: for 3x3
// windows at stride 2 (a cell of 2x2 pixels), 4 loads for 4 pixels where a thread per pixel makes 9; 2x2
// at stride 2, 1 for 4; 3x3 at stride 1 with 2x2 starts, 16 for 4. Other launches (dilated, strides over
// 4) take one thread per pixel, walking only the windows with a tap on it (window_walk.h). In a volume a
// cell is one slice deep, and visits the windows of each output depth with a tap on its slice in turn.
#pragma once

#include "../host_device.h"
#include "../window_taps.h"
#include "window_walk.h"

#include <cmath>
#include <cstdint>

namespace manualgrad {

// The maximum of output (od, oh, ow)'s window over one (in_d, in_h, in_w) volume, and its flat index in
// the volume, id*in_h*in_w + ih*in_w + iw (-1 for a window wholly in the padding, whose maximum is -inf,
// or an integer type's lowest value). Taps in (d, h, w) order. HAS_DEPTH false: a plane (od 0, depth 1),
// with no depth arithmetic at all. G: the kernels' Geo (windows.cuh) or the test's host stand-in.
template <bool HAS_DEPTH, typename acc_t, typename scalar_t, typename index_t, typename G>
MANUALGRAD_HOST_DEVICE inline acc_t max_pool_window(const scalar_t* volume, const G& g, index_t od, index_t oh,
                                                    index_t ow, index_t& best_index) {
  const index_t h_start = oh * g.stride_h - g.pad_h, w_start = ow * g.stride_w - g.pad_w;
  index_t k_lo = 0, k_hi = 1, d_start = 0, i_lo, i_hi, j_lo, j_hi;
  if constexpr (HAS_DEPTH) {
    d_start = od * g.stride_d - g.pad_d;
    taps_inside(d_start, g.kernel_d, g.dilation_d, g.in_d, k_lo, k_hi);
  }
  taps_inside(h_start, g.kernel_h, g.dilation_h, g.in_h, i_lo, i_hi);
  taps_inside(w_start, g.kernel_w, g.dilation_w, g.in_w, j_lo, j_hi);
  // the first row of depth tap k, counted in rows of the volume
  const auto slice = [&](index_t k) -> index_t { return HAS_DEPTH ? (d_start + k * g.dilation_d) * g.in_h : 0; };
  acc_t best = pool_lowest<acc_t>();
  best_index = k_lo < k_hi && i_lo < i_hi && j_lo < j_hi
                   ? (slice(k_lo) + h_start + i_lo * g.dilation_h) * g.in_w + (w_start + j_lo * g.dilation_w)
                   : index_t(-1);
  for (index_t k = k_lo; k < k_hi; ++k) {
    for (index_t i = i_lo; i < i_hi; ++i) {
      const index_t row = (slice(k) + h_start + i * g.dilation_h) * g.in_w;
      for (index_t j = j_lo; j < j_hi; ++j) {
        const index_t at = row + w_start + j * g.dilation_w;
        const acc_t v = static_cast<acc_t>(volume[at]);
        if (v > best || v != v) {  // strictly greater, or NaN
          best = v;
          best_index = at;
        }
      }
    }
  }
  return best;
}

// Backward, one element (id, ih, iw) of one volume (HAS_DEPTH false: of one plane, id 0): the sum of the
// gradients of the outputs whose window covers it and whose argmax it is, in increasing output order.
// For the launches the cells below do not serve.
template <bool HAS_DEPTH, typename acc_t, typename scalar_t, typename index_t, typename G>
MANUALGRAD_HOST_DEVICE inline acc_t max_pool_backward_pixel(const scalar_t* grad_output, const int64_t* indices,
                                                            const G& g, index_t id, index_t ih, index_t iw) {
  const int64_t flat = (static_cast<int64_t>(id) * g.in_h + ih) * g.in_w + iw;
  acc_t sum = 0;
  // Both loads are issued before either is used: loading the gradient only once the index matched
  // made each window two dependent trips to memory.
  for_each_covering_window<HAS_DEPTH>(g, id, ih, iw, [&](index_t, index_t, index_t, index_t o) {
    const int64_t arg = indices[o];
    const acc_t delta = static_cast<acc_t>(grad_output[o]);
    sum += arg == flat ? delta : acc_t(0);
  });
  return sum;
}

// The cells of a launch. Along depth a cell is one input slice: the windows over it are found as the
// per-pixel gather finds them (window_walk.h), dilated or not, so the cells' shape is a 2-d question.
template <typename index_t>
struct CellGeo {
  index_t in_h, in_w, out_h, out_w, pad_h, pad_w;
  index_t starts_h, starts_w;  // window starts per cell along each axis
  index_t cell_h, cell_w;      // pixels per cell: starts * stride
  index_t reach_h, reach_w;    // how many windows before a cell's first still reach into it
  index_t first_h, first_w;    // the first cell holding an input pixel (padding may fill whole cells)
  index_t cells_h, cells_w;    // how many cells hold input pixels
  // depth, for the volumes' cells (HAS_DEPTH): the window along it, and the walk's steps (window_walk.h)
  index_t in_d = 1, out_d = 1, kernel_d = 1, stride_d = 1, pad_d = 0, dilation_d = 1, step_d = 1, tap_step_d = 1;
  PlainDivider<index_t> by_stride_d{1};
  CellGeo(int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, int64_t kernel_h, int64_t kernel_w,
          int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w,
          int64_t starts_h, int64_t starts_w)
      : in_h(in_h), in_w(in_w), out_h(out_h), out_w(out_w), pad_h(pad_h), pad_w(pad_w), starts_h(starts_h),
        starts_w(starts_w), cell_h(starts_h * stride_h), cell_w(starts_w * stride_w),
        reach_h((kernel_h - 1) * dilation_h / stride_h), reach_w((kernel_w - 1) * dilation_w / stride_w),
        first_h(pad_h / cell_h), first_w(pad_w / cell_w), cells_h((pad_h + in_h - 1) / cell_h - first_h + 1),
        cells_w((pad_w + in_w - 1) / cell_w - first_w + 1) {}
  CellGeo& with_depth(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
    in_d = in, out_d = out, kernel_d = kernel, stride_d = stride, pad_d = pad, dilation_d = dilation;
    step_d = covering_step(stride, dilation), tap_step_d = covering_tap_step(stride, dilation);
    by_stride_d = {static_cast<index_t>(stride)};
    return *this;
  }
};

// Writes the gradient of every input pixel of cell (ch, cw) of slice id of one volume (HAS_DEPTH false:
// of one plane, id 0). grad_input is the slice (in_h, in_w); grad_output and indices are the volume
// (out_d, out_h, out_w). Cells up to TILE_H x TILE_W pixels: the sums live in registers, which needs their
// count fixed at compile time.
template <bool HAS_DEPTH, int TILE_H, int TILE_W, typename acc_t, typename scalar_t, typename index_t>
MANUALGRAD_HOST_DEVICE inline void max_pool_backward_cell(scalar_t* grad_input, const scalar_t* grad_output,
                                                          const int64_t* indices, const CellGeo<index_t>& g,
                                                          index_t id, index_t ch, index_t cw) {
  const index_t row0 = ch * g.cell_h - g.pad_h, col0 = cw * g.cell_w - g.pad_w;  // may be in the padding
  // flat index in the volume of the cell's first pixel
  const int64_t corner = (static_cast<int64_t>(id) * g.in_h + row0) * g.in_w + col0;
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
  // The output depths whose window has a tap on slice id, as the per-pixel walk finds them.
  index_t od = 0, od_hi = 0;
  if constexpr (HAS_DEPTH) {
    const index_t pd = id + g.pad_d;
    covering_range(pd, g.kernel_d, g.stride_d, g.by_stride_d, g.dilation_d, g.out_d, od, od_hi);
    if (!first_covering(pd, g.stride_d, g.dilation_d, g.step_d, g.tap_step_d, od_hi, od)) od_hi = od - 1;  // none
  }
  const index_t rows = oh_end - oh_lo, cols = ow_end - ow_lo;
  const index_t windows = rows > 0 && cols > 0 ? rows * cols : 0;
  for (; od <= od_hi; od += HAS_DEPTH ? g.step_d : 1) {
    const index_t slice = HAS_DEPTH ? od * g.out_h : 0;  // the first output row of depth od
    // The windows in reach at depth od, row-major, as one loop that the GPU build unrolls by 4 so that
    // several windows' loads are in flight at once (the kernel is bound by memory latency, not bandwidth).
    index_t oh = oh_lo, ow = ow_lo;
    MANUALGRAD_UNROLL_BY_4
    for (index_t k = 0; k < windows; ++k) {
      const index_t o = (slice + oh) * g.out_w + ow;
      const int64_t offset = indices[o] - corner;
      const acc_t delta = static_cast<acc_t>(grad_output[o]);
      // Slot (i, j) stands for the flat index corner + i*in_w + j. A slot whose pixel is off the input can
      // alias a pixel of another row (or slice); such slots are never written, and the aliased pixel's own
      // slot (in this cell or another) takes the term. Writing `+= match ? delta : 0` keeps the sums in
      // registers.
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
    if constexpr (!HAS_DEPTH) break;
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

// Thread x of a per-cell launch (x < planes * cells_h * cells_w) → its plane and cell (ch, cw), cells
// row-major within a plane (a plane: one slice of a volume, for HAS_DEPTH). Div: the kernels' Divider
// (windows.cuh) or the test's plain division.
template <typename index_t, typename Div>
MANUALGRAD_HOST_DEVICE inline index_t cell_of_thread(index_t x, const CellGeo<index_t>& g, const Div& by_cells_w,
                                                     const Div& by_cells_h, index_t& ch, index_t& cw) {
  const index_t rest = by_cells_w.div(x), plane = by_cells_h.div(rest);
  cw = x - rest * g.cells_w + g.first_w;
  ch = rest - plane * g.cells_h + g.first_h;
  return plane;
}

// A slice of a launch (one depth d of volume p: slice = p*depth + d) → p, with d. Planes (HAS_DEPTH false)
// are their own slices, d 0. Div: the kernels' Divider (windows.cuh) or a PlainDivider.
template <bool HAS_DEPTH, typename index_t, typename Div>
MANUALGRAD_HOST_DEVICE inline index_t volume_of_slice(index_t slice, const Div& by_depth, index_t depth, index_t& d) {
  if constexpr (!HAS_DEPTH) {
    d = 0;
    return slice;
  }
  const index_t p = by_depth.div(slice);
  d = slice - p * depth;
  return p;
}

// Calls body(Int<TILE>) for a CellShape's tile (1, 2 or 4); returns false for any other (0: no cells).
template <typename Body>
inline bool dispatch_tile(int tile, const Body& body) {
  if (tile == 1) return body(Int<1>()), true;
  if (tile == 2) return body(Int<2>()), true;
  if (tile == 4) return body(Int<4>()), true;
  return false;
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
