// window_taps.h — which taps of a window land inside the input: the clipping every max-pool kernel does,
// CPU and CUDA alike, and the CPU kernels' column chunks. Plain C++ (no ATen), so the host test of the
// CUDA logic compiles it too.
#pragma once

#include "host_device.h"

#include <cstdint>
#include <limits>

namespace manualgrad {

// The value a max-pool window starts from and the padding holds: -inf for floating point, and for the
// integers (which have no -inf) their lowest value. Only a strictly greater value (or NaN) replaces the
// running maximum, so padding never wins, and a window whose values all equal the lowest keeps its first
// in-bounds tap as the argmax, as torch's does.
template <typename T>
MANUALGRAD_HOST_DEVICE constexpr T pool_lowest() {
  return std::numeric_limits<T>::has_infinity ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::lowest();
}

// The taps [lo, hi) of a window starting at `start` (dilated by `dilation`) that land inside [0, size);
// hi <= lo when none does. (Undilated windows, the usual case, need no division.)
template <typename index_t>
MANUALGRAD_HOST_DEVICE inline void taps_inside(index_t start, index_t kernel, index_t dilation, index_t size,
                                               index_t& lo, index_t& hi) {
  if (dilation == 1) {
    lo = start >= 0 ? 0 : -start;
    const index_t reach = size - start;
    hi = reach < kernel ? reach : kernel;
    return;
  }
  lo = start >= 0 ? 0 : -start / dilation + (-start % dilation != 0);
  const index_t reach = start > size - 1 ? 0 : (size - 1 - start) / dilation + 1;
  hi = reach < kernel ? reach : kernel;
}

// The output columns [lo, hi) among [ow0, ow1) whose input column ow*stride + offset lies inside [0, size)
// (one tap's columns across an output row); hi == lo when none does.
MANUALGRAD_HOST_DEVICE inline void outputs_inside(int64_t ow0, int64_t ow1, int64_t offset, int64_t stride,
                                                  int64_t size, int64_t& lo, int64_t& hi) {
  const int64_t first = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  const int64_t end = size - 1 - offset >= 0 ? (size - 1 - offset) / stride + 1 : 0;
  lo = first < ow0 ? ow0 : (first > ow1 ? ow1 : first);
  hi = end < ow1 ? end : ow1;
  if (hi < lo) hi = lo;
}

// Whether a CPU kernel should copy the input columns a run of windows spans into a row of its own:
// only if the stride does not step over most of them (tap j reads the columns = j*dilation mod stride,
// so `taps` taps read at most stride/gcd(stride, dilation) of each stride's columns).
MANUALGRAD_HOST_DEVICE inline bool columns_mostly_read(int64_t taps, int64_t stride, int64_t dilation) {
  int64_t a = stride, b = dilation;  // gcd
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  const int64_t read = taps < stride / a ? taps : stride / a;
  return 4 * read >= stride;
}

// How many input rows a CPU kernel's ring of row copies holds (row r in place r & (rows - 1)): a power of
// two, so that finding a row's place takes no division; enough for a whole window's `window_rows`
// consecutive rows (then each has a place of its own) if `budget` slots allow, else as many as fit,
// at least one.
MANUALGRAD_HOST_DEVICE inline int64_t ring_rows(int64_t window_rows, int64_t row_slots, int64_t budget) {
  int64_t rows = 1;
  while (rows < window_rows && 2 * rows * row_slots <= budget) rows *= 2;
  return rows;
}

// A run of output columns [ow0, ow1) along one dimension, and what of the input its windows reach: the
// kernel taps [tap_lo, tap_hi) that land inside [0, size) for at least one of them, and the input
// columns [col0, col0 + span) those taps read (output ow0's tap tap_lo is col0, and output ow1-1's
// tap tap_hi-1 is the last). A window that starts later has lower taps inside, so the hull runs from
// the last window's first tap inside to the first window's last; with stride > dilation a tap of the
// hull may miss every window. Output ow0's tap tap_lo lies at most (ow1-1-ow0)*stride left of column 0
// and its tap tap_hi-1 inside, so span <= size + 2*(ow1-1-ow0)*stride: no padding beyond the run's reach.
struct ColumnChunk {
  int64_t ow0 = 0, ow1 = 0, tap_lo = 0, tap_hi = 0, col0 = 0, span = 0;
  MANUALGRAD_HOST_DEVICE int64_t count() const { return ow1 - ow0; }
  MANUALGRAD_HOST_DEVICE bool empty() const { return tap_hi <= tap_lo; }
};

MANUALGRAD_HOST_DEVICE inline ColumnChunk column_chunk(int64_t ow0, int64_t ow1, int64_t stride, int64_t pad,
                                                       int64_t kernel, int64_t dilation, int64_t size) {
  ColumnChunk c;
  c.ow0 = ow0;
  c.ow1 = ow1;
  int64_t unused;
  taps_inside((ow1 - 1) * stride - pad, kernel, dilation, size, c.tap_lo, unused);
  taps_inside(ow0 * stride - pad, kernel, dilation, size, unused, c.tap_hi);
  if (c.empty()) return c;
  c.col0 = ow0 * stride - pad + c.tap_lo * dilation;
  c.span = (ow1 - 1 - ow0) * stride + (c.tap_hi - 1 - c.tap_lo) * dilation + 1;
  return c;
}

}  // namespace manualgrad
