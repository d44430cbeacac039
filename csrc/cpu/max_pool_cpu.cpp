// max_pool_cpu.cpp — max-pool forward (output + argmax indices) and backward on the CPU, for 1, 2 and 3
// spatial dimensions: every kernel works on (D, H, W) volumes, a 2-d plane being a volume of depth 1 and
// a 1-d row a plane of height 1 (shape_checks.h's Geometry).
// Forward scans each window in (d, h, w) order; a later value replaces the running maximum only if it
// is strictly greater or NaN. So ties go to the first maximum and NaN wins — torch's rule, which makes
// our indices torch's (flat within each (n, c) volume, as max_unpool expects).
// Backward sends each output's gradient to its argmax only; overlapping windows add. Each (n, c)
// volume belongs to one task, so no two tasks touch a pixel: deterministic without atomics.
// Channels-last tensors (shape_checks.h's channels_last_result: NHWC, or NDHWC in 3-d) are pooled in their
// own layout, a vector of channels at a time, with the same rules, indices and order of sums: the results
// are the same bits.
#include "../shape_checks.h"
#include "../window_taps.h"
#include "vectorize.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace manualgrad {
namespace {

// The forward's scratch is bounded whatever the geometry: a volume is swept in bands of output rows (the
// grid, below) where a band's phase planes fit, else in chunks of output columns, each input row a chunk
// reads laid out as phases (below) in a small ring of rows; a geometry whose phases would mostly go unread
// (a stride far above the kernel, a dilation that is a multiple of the stride) skips them for a direct
// loop over each window's in-bounds taps.
constexpr int64_t kChunkSlots = 8192;    // input columns one chunk of output columns reaches, about
constexpr int64_t kRingSlots = 1 << 17;  // elements in the whole ring: 0.5 MB in float32, 1 MB in float64

// The columns a dilated window spans, (kernel-1)*dilation + 1 (check_max_pool has ruled out overflow).
inline int64_t window_extent(int64_t kernel, int64_t dilation) { return (kernel - 1) * dilation + 1; }

// How a geometry's volumes are swept, the same for every volume.
struct PoolPlan {
  bool phases = false;    // the phase sweep, or the direct per-output loop
  int64_t chunk = 1;      // output columns per chunk
  int64_t row_slots = 0;  // room for one input row's phases within a chunk
  // The ring holds ring_d × ring_h input rows (window_taps.h's ring_rows, each a power of two): row
  // (id, ih) in place (id mod ring_d, ih mod ring_h), so that a window's rows of different depths never
  // evict one another, as they could if the flat row id*in_h + ih alone chose the place.
  int64_t ring_h = 1, ring_d = 1;
};

PoolPlan plan_pool(const Geometry& g) {
  const Window& w = g.win;
  const int64_t s = w.stride_w, d = w.dilation_w;
  PoolPlan plan;
  if (s > kRingSlots) return plan;
  const ColumnChunk all = column_chunk(0, g.out_w, s, w.pad_w, w.kernel_w, d, g.in_w);
  if (all.empty() || !columns_mostly_read(all.tap_hi - all.tap_lo, s, d)) return plan;  // phases mostly unread
  plan.chunk = std::clamp<int64_t>(kChunkSlots / s, 1, g.out_w);
  // A chunk's span (column_chunk) is at most this, rounded up to whole phases.
  const int64_t reach = (plan.chunk - 1) * s;
  plan.row_slots = reach + std::min(window_extent(w.kernel_w, d), g.in_w + reach) + s;
  if (plan.row_slots > kRingSlots) return plan;
  plan.phases = true;
  plan.ring_h = ring_rows(std::min(g.in_h, window_extent(w.kernel_h, w.dilation_h)), plan.row_slots, kRingSlots);
  plan.ring_d = ring_rows(std::min(g.in_d, window_extent(w.kernel_d, w.dilation_d)), plan.ring_h * plan.row_slots, kRingSlots);
  return plan;
}

// The input rows the window of output row `orow` (od * out_h + oh) reads: its depth taps [k_lo, k_hi) and
// height taps [i_lo, i_hi) that land inside the input, visited depth first, the (d, h) part of the (d, h, w)
// order every kernel here scans a window in. A plane (in_d 1) has the single depth tap 0.
struct WindowRows {
  int64_t d_start, h_start, dilation_d, dilation_h, in_h;
  int64_t k_lo = 0, k_hi = 0, i_lo = 0, i_hi = 0;

  WindowRows(const Geometry& g, int64_t orow)
      : d_start(orow / g.out_h * g.win.stride_d - g.win.pad_d), h_start(orow % g.out_h * g.win.stride_h - g.win.pad_h),
        dilation_d(g.win.dilation_d), dilation_h(g.win.dilation_h), in_h(g.in_h) {
    taps_inside(d_start, g.win.kernel_d, dilation_d, g.in_d, k_lo, k_hi);
    taps_inside(h_start, g.win.kernel_h, dilation_h, g.in_h, i_lo, i_hi);
  }
  bool empty() const { return k_lo >= k_hi || i_lo >= i_hi; }
  // The flat input row (id * in_h + ih) of the window's first row inside the input.
  int64_t first() const { return (d_start + k_lo * dilation_d) * in_h + h_start + i_lo * dilation_h; }
  // f(id, ih) for each row inside, in order.
  template <typename F>
  void for_each(const F& f) const {
    for (int64_t k = k_lo; k < k_hi; ++k)
      for (int64_t i = i_lo; i < i_hi; ++i) f(d_start + k * dilation_d, h_start + i * dilation_h);
  }
};

// One chunk of a volume's output columns (window_taps.h), its input columns stored as `len` slots per phase.
struct Chunk : ColumnChunk {
  int64_t len = 0;
  Chunk(const Geometry& g, int64_t ow0, int64_t ow1)
      : ColumnChunk(column_chunk(ow0, ow1, g.win.stride_w, g.win.pad_w, g.win.kernel_w, g.win.dilation_w, g.in_w)),
        len(ceil_div(span, g.win.stride_w)) {}
};

// Per-task scratch for the phase sweep. Each input row a chunk reads is stored as `stride_w` phases,
// phase r holding slots r, r + stride, r + 2*stride, ...; then every window tap reads a contiguous run
// of one phase, so the sweep over the chunk's outputs is a plain, vectorisable loop. Slots outside the
// input hold pool_lowest (-inf, or an integer's lowest value): never strictly greater than the running
// maximum, which starts there, so padding can never become the argmax.
template <typename scalar_t, typename index_t>
struct PhaseScratch {
  std::vector<scalar_t> ring;   // (ring_d * ring_h, stride_w, len): input rows as phases
  std::vector<int64_t> held;    // (ring_d * ring_h,) the flat input row each place holds for the current chunk, or -1
  int64_t ring_h;
  std::vector<scalar_t> best;   // (chunk,) running maximum of the current output row's chunk
  std::vector<index_t> best_index;
  std::vector<index_t> first_col;  // (chunk,) first in-bounds column of each window (torch's initial argmax), or -1
  int64_t first_col_of = -1;       // the ow0 first_col was computed for

  explicit PhaseScratch(const PoolPlan& plan)
      : ring(plan.ring_d * plan.ring_h * plan.row_slots), held(plan.ring_d * plan.ring_h), ring_h(plan.ring_h),
        best(plan.chunk),
        best_index(plan.chunk), first_col(plan.chunk) {}
};

// The innermost sweep: one window tap across a run of outputs. Kept branch-free so that it
// vectorises; `index_at_zero + stride * ow` is the flat input index the tap reads for output ow.
// Always inlined into the vector clones below, so that it is compiled for each one's instruction set.
template <typename scalar_t, typename index_t>
__attribute__((always_inline)) inline void sweep_tap_body(scalar_t* __restrict best, index_t* __restrict best_index,
                                                           const scalar_t* __restrict values, int64_t count,
                                                           index_t index_at_zero, index_t stride) {
  for (int64_t ow = 0; ow < count; ++ow) {
    const scalar_t v = values[ow];
    const bool take = (v > best[ow]) | (v != v);  // strictly greater, or NaN
    best[ow] = take ? v : best[ow];
    best_index[ow] = take ? static_cast<index_t>(index_at_zero + stride * static_cast<index_t>(ow)) : best_index[ow];
  }
}

// The same sweep when no indices are wanted: the running maximum alone.
template <typename scalar_t>
__attribute__((always_inline)) inline void sweep_tap_values_body(scalar_t* __restrict best,
                                                                  const scalar_t* __restrict values, int64_t count) {
  for (int64_t ow = 0; ow < count; ++ow) {
    const scalar_t v = values[ow];
    best[ow] = (v > best[ow]) | (v != v) ? v : best[ow];
  }
}

// One tap, as the phase sweep applies them.
template <typename scalar_t, typename index_t>
MANUALGRAD_VECTOR_CLONES void sweep_tap(scalar_t* __restrict best, index_t* __restrict best_index,
                                        const scalar_t* __restrict values, int64_t count, index_t index_at_zero,
                                        index_t stride) {
  sweep_tap_body(best, best_index, values, count, index_at_zero, stride);
}

template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void sweep_tap_values(scalar_t* __restrict best, const scalar_t* __restrict values,
                                               int64_t count) {
  sweep_tap_values_body(best, values, count);
}

// `taps` taps in turn, a call for a window row's taps inside the input in channels-last memory (a call per
// tap would cost as much as the sweep of a few vectors of channels): tap t reads values + t * tap_step and
// gives every lane the index index_at_zero + t * tap_index_step.
template <typename scalar_t, typename index_t>
MANUALGRAD_VECTOR_CLONES void sweep_tap_run(scalar_t* __restrict best, index_t* __restrict best_index,
                                            const scalar_t* __restrict values, int64_t count, index_t index_at_zero,
                                            int64_t taps, int64_t tap_step, index_t tap_index_step) {
  for (int64_t t = 0; t < taps; ++t)
    sweep_tap_body(best, best_index, values + t * tap_step, count,
                   static_cast<index_t>(index_at_zero + static_cast<index_t>(t) * tap_index_step), index_t(0));
}

template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void sweep_tap_run_values(scalar_t* __restrict best, const scalar_t* __restrict values,
                                                   int64_t count, int64_t taps, int64_t tap_step) {
  for (int64_t t = 0; t < taps; ++t) sweep_tap_values_body(best, values + t * tap_step, count);
}

// Each output's start, before its taps: best[q] = pool_lowest and (unless best_index is null) best_index[q] = its
// window's first tap inside, base + first[q], or -1 where the window has none (base < 0: none has). (Here and in
// store_outputs, in the vector clones: in the tasks' loops, compiled for baseline x86-64, these two took a third
// of a 2-d 3x3/2's time, and of a 1-d one's.)
template <typename scalar_t, typename index_t>
MANUALGRAD_VECTOR_CLONES void start_outputs(scalar_t* __restrict best, index_t* __restrict best_index,
                                            const index_t* __restrict first, int64_t base, int64_t count) {
  std::fill_n(best, count, pool_lowest<scalar_t>());
  if (best_index == nullptr) return;
  if (base < 0) {
    std::fill_n(best_index, count, index_t(-1));
    return;
  }
  const index_t b = static_cast<index_t>(base);
  for (int64_t q = 0; q < count; ++q) best_index[q] = first[q] < 0 ? index_t(-1) : static_cast<index_t>(b + first[q]);
}

// out[i] = best[i] and (unless idx is null) idx[i] = best_index[i], widened, for i < count.
template <typename scalar_t, typename index_t>
MANUALGRAD_VECTOR_CLONES void store_outputs(scalar_t* __restrict out, int64_t* __restrict idx,
                                            const scalar_t* __restrict best, const index_t* __restrict best_index,
                                            int64_t count) {
  for (int64_t i = 0; i < count; ++i) out[i] = best[i];
  if (idx != nullptr)
    for (int64_t i = 0; i < count; ++i) idx[i] = best_index[i];
}

// dst[j] = row[stride·j + first] for j < count, pool_lowest where that column lies outside [0, width).
template <typename scalar_t>
[[gnu::always_inline]] inline void gather_columns(scalar_t* __restrict dst, const scalar_t* __restrict row, int64_t width,
                                             int64_t first, int64_t stride, int64_t count) {
  const scalar_t lowest = pool_lowest<scalar_t>();
  // columns j_lo <= j < j_hi lie inside the row
  const int64_t j_lo = std::clamp<int64_t>(first >= 0 ? 0 : ceil_div(-first, stride), 0, count);
  const int64_t j_hi = std::clamp<int64_t>(width - first > 0 ? ceil_div(width - first, stride) : 0, j_lo, count);
  std::fill(dst, dst + j_lo, lowest);
  const scalar_t* src = row + (j_hi > j_lo ? first + stride * j_lo : 0);  // (no pointer past the row is formed)
  if (stride == 1) {
    std::copy(src, src + (j_hi - j_lo), dst + j_lo);
  } else if (stride == 2) {  // spelled out so that it vectorises
    for (int64_t j = 0; j < j_hi - j_lo; ++j) dst[j_lo + j] = src[2 * j];
  } else {
    for (int64_t j = 0; j < j_hi - j_lo; ++j) dst[j_lo + j] = src[stride * j];
  }
  std::fill(dst + j_hi, dst + count, lowest);
}

// Input row `row` (in_w values) → the chunk's slots as phases: phase r's slot k is column col0 + s·k + r,
// pool_lowest (window_taps.h: -inf, or an integer type's lowest value) outside the row. Only offsets inside the
// row are ever formed.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void fill_row(scalar_t* phases, const scalar_t* row, const Chunk& c, const Geometry& g) {
  const int64_t s = g.win.stride_w;
  for (int64_t r = 0; r < s; ++r) gather_columns(phases + r * c.len, row, g.in_w, c.col0 + r, s, c.len);
}

// One chunk of one (D, H, W) volume → its maxima (output rows of out_w, (od, oh) in order) and, unless
// `indices` is null, their flat indices. Taps are applied in (d, h, w) order for every output, which fixes
// the tie and NaN rules.
template <typename scalar_t, typename index_t>
void max_pool_chunk(scalar_t* output, int64_t* indices, const scalar_t* input, const Geometry& g, const Chunk& c,
                    PhaseScratch<scalar_t, index_t>& scratch) {
  const Window& w = g.win;
  const int64_t s = w.stride_w, len = c.len, count = c.count();
  const int64_t h_mask = scratch.ring_h - 1, d_mask = static_cast<int64_t>(scratch.held.size()) / scratch.ring_h - 1;
  const int64_t row_slots = s * len;
  scalar_t* best = scratch.best.data();
  index_t* best_index = scratch.best_index.data();
  if (scratch.first_col_of != c.ow0) {
    for (int64_t m = 0; m < count; ++m) {
      const int64_t start = (c.ow0 + m) * s - w.pad_w;
      int64_t j_lo, j_hi;
      taps_inside(start, w.kernel_w, w.dilation_w, g.in_w, j_lo, j_hi);
      scratch.first_col[m] = j_lo < j_hi ? static_cast<index_t>(start + j_lo * w.dilation_w) : index_t(-1);
    }
    scratch.first_col_of = c.ow0;
  }
  std::fill(scratch.held.begin(), scratch.held.end(), int64_t{-1});  // rows of another chunk or volume
  for (int64_t orow = 0; orow < g.out_d * g.out_h; ++orow) {
    const WindowRows rows(g, orow);  // only the kernel rows that land inside the input
    const int64_t first_row = rows.first();
    // A window whose taps all fall in the padding has no argmax: -1, torch's "none" (its output is -inf and
    // its gradient goes nowhere).
    start_outputs(best, indices == nullptr ? nullptr : best_index, scratch.first_col.data(),
                  rows.empty() ? -1 : first_row * g.in_w, count);
    if (!c.empty()) rows.for_each([&](int64_t id, int64_t ih) {
      const int64_t row = id * g.in_h + ih;
      const int64_t place = (id & d_mask) * scratch.ring_h + (ih & h_mask);
      scalar_t* phases = scratch.ring.data() + place * row_slots;
      if (scratch.held[place] != row) {  // rows shared by neighbouring windows are laid out once
        fill_row(phases, input + row * g.in_w, c, g);
        scratch.held[place] = row;
      }
      for (int64_t j = c.tap_lo; j < c.tap_hi; ++j) {
        const int64_t slot = (j - c.tap_lo) * w.dilation_w;  // slot of output ow0's tap j
        const scalar_t* values = phases + (slot % s) * len + slot / s;
        if (indices == nullptr) {
          sweep_tap_values(best, values, count);
        } else {
          sweep_tap(best, best_index, values, count, static_cast<index_t>(row * g.in_w + c.col0 + slot),
                    static_cast<index_t>(s));
        }
      }
    });
    store_outputs(output + orow * g.out_w + c.ow0, indices == nullptr ? nullptr : indices + orow * g.out_w + c.ow0,
                  best, best_index, count);
  }
}

// The fallback for geometries whose phases would mostly go unread: each output scans only the taps of
// its window that lie inside the volume, in the same (d, h, w) order and with the same rules, so the
// time is the number of those taps (plus a division or two per output), whatever the stride or dilation.
template <typename scalar_t>
void max_pool_volume_direct(scalar_t* output, int64_t* indices, const scalar_t* input, const Geometry& g) {
  const Window& w = g.win;
  for (int64_t orow = 0; orow < g.out_d * g.out_h; ++orow) {
    const WindowRows rows(g, orow);
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      const int64_t w_start = ow * w.stride_w - w.pad_w;
      int64_t j_lo, j_hi;
      taps_inside(w_start, w.kernel_w, w.dilation_w, g.in_w, j_lo, j_hi);
      scalar_t best = pool_lowest<scalar_t>();
      int64_t best_index = -1;
      if (!rows.empty() && j_lo < j_hi) {
        best_index = rows.first() * g.in_w + w_start + j_lo * w.dilation_w;
        rows.for_each([&](int64_t id, int64_t ih) {
          const int64_t row = (id * g.in_h + ih) * g.in_w;
          for (int64_t j = j_lo; j < j_hi; ++j) {
            const int64_t at = row + w_start + j * w.dilation_w;
            const scalar_t v = input[at];
            if ((v > best) | (v != v)) {
              best = v;
              best_index = at;
            }
          }
        });
      }
      output[orow * g.out_w + ow] = best;
      if (indices != nullptr) indices[orow * g.out_w + ow] = best_index;
    }
  }
}

// best[i] = the larger of best[i] and values[i * stride] (NaN wins): one tap across a run of outputs,
// read straight from the input. Strides 1 and 2 are spelled out so that they vectorise.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void sweep_strided_values(scalar_t* __restrict best, const scalar_t* __restrict values,
                                                   int64_t stride, int64_t count) {
  const auto take = [](scalar_t v, scalar_t b) { return (v > b) | (v != v) ? v : b; };
  if (stride == 1) {
    for (int64_t i = 0; i < count; ++i) best[i] = take(values[i], best[i]);
  } else if (stride == 2) {
    for (int64_t i = 0; i < count; ++i) best[i] = take(values[2 * i], best[i]);
  } else {
    for (int64_t i = 0; i < count; ++i) best[i] = take(values[i * stride], best[i]);
  }
}

// A plane of one row (1-d pooling) when no indices are wanted: the maxima computed in the output itself,
// with none of the scratch copies that make the 2-d sweep vectorise (a long row reads contiguously as
// it is). Outputs whose window lies inside the row take one sweep per tap; the few at its ends, one by one.
template <typename scalar_t>
void max_pool_row_values(scalar_t* out, const scalar_t* in, const Geometry& g) {
  const Window& w = g.win;
  const int64_t s = w.stride_w, d = w.dilation_w, pad = w.pad_w, span = (w.kernel_w - 1) * d;
  // windows [ow*s - pad, ow*s - pad + span] inside [0, in_w) for ow in [lo, hi)
  const int64_t lo = std::min(g.out_w, ceil_div(pad, s));
  const int64_t hi = std::max(lo, std::min(g.out_w, g.in_w - 1 - span + pad >= 0 ? (g.in_w - 1 - span + pad) / s + 1 : 0));
  const scalar_t lowest = pool_lowest<scalar_t>();
  const auto edge = [&](int64_t ow) {  // only the taps inside the row: a kernel may dwarf it
    const int64_t start = ow * s - pad;
    int64_t j_lo, j_hi;
    taps_inside(start, w.kernel_w, d, g.in_w, j_lo, j_hi);
    scalar_t best = lowest;
    for (int64_t j = j_lo; j < j_hi; ++j) {
      const scalar_t v = in[start + j * d];
      if ((v > best) | (v != v)) best = v;
    }
    out[ow] = best;
  };
  for (int64_t ow = 0; ow < lo; ++ow) edge(ow);
  for (int64_t ow = hi; ow < g.out_w; ++ow) edge(ow);
  if (hi == lo) return;
  const scalar_t* first = in + lo * s - pad;
  for (int64_t ow = lo; ow < hi; ++ow) out[ow] = first[(ow - lo) * s];
  for (int64_t j = 1; j < w.kernel_w; ++j) sweep_strided_values(out + lo, first + j * d, s, hi - lo);
}

// ---- Short rows: a band of output rows a sweep ----
// A sweep per tap and output row does little where rows are short: 3x3x3/2 over 16x56x56 (28 outputs a row) spent
// 38% of its time in sweeps of 28, 15% in each output row's set-up and 9% in de-interleaving an input row again
// for every output row that reads it. Here a task takes a band of output rows of
// one volume, lays out each input depth slice its windows read as phase planes once (row phase a, column phase
// b: the padded input's rows stride_h·(oh0 + r) + a and columns stride_w·j + b, pool_lowest outside the input),
// and numbers the band's outputs q = i·pitch + ow, pitch = out_w + the kernel's reach in strides. Tap (kh, kw)
// then reads its plane at q + a fixed offset for every q, so one sweep per tap (and depth tap) covers the band,
// taps in (d, h, w) order as everywhere here; the columns ow >= out_w are computed and dropped. An output's flat
// input index for a tap is position[q] + the tap's offset, position[q] = stride_h·oh·in_w + stride_w·ow.
constexpr int64_t kGridLanes = 1024;     // outputs swept together: running maxima, indices and positions in L1
constexpr int64_t kGridSlots = 1 << 16;  // a task's phase planes: 256 KB of float32, in L2

struct GridPlan {
  bool use = false;
  int64_t pitch = 0, rows = 0, bands = 0, height = 0, plane = 0, phases = 0, ring = 1;
  // each tap (kh, kw) in order: where it reads in a depth slice's planes and its flat index offset in the slice
  std::vector<int64_t> read, offset;
  std::vector<int64_t> row_phase, col_phase;  // each row (column) phase's place among those read, or -1
  int64_t cols = 0;                           // column phases read
};

// The grid for geometry g, if a band of one output row or more fits kGridSlots and every index it forms (even
// the dropped columns') fits index_t.
template <typename index_t>
GridPlan plan_grid(const Geometry& g) {
  const Window& w = g.win;
  GridPlan plan;
  if (g.out_d * g.out_h <= 1) return plan;  // one row: the chunk sweep's rows are as long
  const int64_t sh = w.stride_h, sw = w.stride_w;
  // (a phase table a stride long, a list of taps: bounded before either is made; window_extent cannot overflow)
  if (sh > kGridSlots || sw > kGridSlots || w.kernel_h > kGridSlots || w.kernel_w > kGridSlots ||
      w.kernel_h * w.kernel_w > kGridSlots)
    return plan;
  // phases mostly unread (a stride far above the kernel): the direct loop reads only the taps
  if (!columns_mostly_read(w.kernel_h, sh, w.dilation_h) || !columns_mostly_read(w.kernel_w, sw, w.dilation_w))
    return plan;
  // Work: every tap is swept over every lane, the padding's and the dropped columns' too. A window no wider or
  // taller than the input has half its taps inside at least, and a reach within out_w drops half the lanes at
  // most; a kernel far larger than the input (padded) or a row of few outputs keeps the sweeps over taps inside.
  const int64_t extent_h = window_extent(w.kernel_h, w.dilation_h), extent_w = window_extent(w.kernel_w, w.dilation_w);
  const int64_t reach_h = (w.kernel_h - 1) * w.dilation_h / sh, reach_w = (w.kernel_w - 1) * w.dilation_w / sw;
  if (extent_h > g.in_h || extent_w > g.in_w || reach_w > g.out_w) return plan;
  plan.pitch = g.out_w + reach_w;
  if (plan.pitch > kGridSlots) return plan;
  // only the phases some tap reads
  std::vector<int64_t>& row_phase = plan.row_phase;
  std::vector<int64_t>& col_phase = plan.col_phase;
  row_phase.assign(sh, -1);
  col_phase.assign(sw, -1);
  int64_t rows_used = 0, cols_used = 0;
  for (int64_t kh = 0; kh < w.kernel_h; ++kh)
    if (row_phase[kh * w.dilation_h % sh] < 0) row_phase[kh * w.dilation_h % sh] = rows_used++;
  for (int64_t kw = 0; kw < w.kernel_w; ++kw)
    if (col_phase[kw * w.dilation_w % sw] < 0) col_phase[kw * w.dilation_w % sw] = cols_used++;
  plan.phases = rows_used * cols_used;
  plan.cols = cols_used;
  plan.ring = std::min(g.in_d, window_extent(w.kernel_d, w.dilation_d));  // a window's depth slices, each its place
  if (plan.ring > kGridSlots) return plan;
  const int64_t per_row = plan.ring * plan.phases * plan.pitch;  // a plane also ends in a row of slack
  if (per_row > kGridSlots) return plan;
  const int64_t most = kGridSlots / per_row - reach_h - 1;
  if (most < 1) return plan;
  plan.bands = ceil_div(g.out_h, std::min(most, g.out_h));
  plan.rows = ceil_div(g.out_h, plan.bands);
  plan.height = plan.rows + reach_h;
  plan.plane = (plan.height + 1) * plan.pitch;
  // The largest and smallest index formed: depth slice, position, and tap offset at their extremes.
  const int64_t largest = (g.in_d - 1) * g.in_h * g.in_w + ((g.out_h - 1) * sh + extent_h) * g.in_w +
                          (plan.pitch - 1) * sw + extent_w;
  if (largest > std::numeric_limits<index_t>::max() || w.pad_h * g.in_w + w.pad_w > std::numeric_limits<index_t>::max())
    return plan;
  for (int64_t kh = 0; kh < w.kernel_h; ++kh)
    for (int64_t kw = 0; kw < w.kernel_w; ++kw) {
      const int64_t rh = kh * w.dilation_h, rw = kw * w.dilation_w;
      const int64_t phase = row_phase[rh % sh] * cols_used + col_phase[rw % sw];
      plan.read.push_back(phase * plan.plane + rh / sh * plan.pitch + rw / sw);
      plan.offset.push_back((rh - w.pad_h) * g.in_w + rw - w.pad_w);
    }
  plan.use = true;
  return plan;
}

// Depth slice `slice` of a volume (its in_h × in_w values) as the band's phase planes at `planes`, the input's rows
// read in order, each once (phase by phase, the rows of one phase then the next: 0.8x the rate of the chunk sweep's
// reads from memory on a 2-d 3x3/2).
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void fill_grid_planes(scalar_t* planes, const scalar_t* slice, const Geometry& g,
                                               const GridPlan& plan, int64_t oh0) {
  const Window& w = g.win;
  const scalar_t lowest = pool_lowest<scalar_t>();
  for (int64_t r = 0; r < plan.height; ++r) {
    for (int64_t a = 0; a < w.stride_h; ++a) {  // padded row stride_h·(oh0 + r) + a: phase a's row r
      if (plan.row_phase[a] < 0) continue;
      const int64_t ih = w.stride_h * (oh0 + r) + a - w.pad_h;
      for (int64_t b = 0; b < w.stride_w; ++b) {
        if (plan.col_phase[b] < 0) continue;
        scalar_t* dst = planes + (plan.row_phase[a] * plan.cols + plan.col_phase[b]) * plan.plane + r * plan.pitch;
        if (ih < 0 || ih >= g.in_h) {
          std::fill(dst, dst + plan.pitch, lowest);
        } else {
          gather_columns(dst, slice + ih * g.in_w, g.in_w, b - w.pad_w, w.stride_w, plan.pitch);
        }
      }
    }
  }
  for (int64_t phase = 0; phase < plan.phases; ++phase)  // the slack the last taps read
    std::fill(planes + phase * plan.plane + plan.height * plan.pitch, planes + (phase + 1) * plan.plane, lowest);
}

// The input a task will read next, fetched into L2 a part at each step of the sweeps before: the planes' copies,
// reading in a burst, waited on memory (a third of the forward's time), where the chunk sweep's copies overlapped
// its sweeps.
class Prefetcher {
 public:
  void clear() {
    ranges_.clear();
    range_ = 0;
    at_ = 0;
  }
  void add(const void* p, int64_t bytes) {
    if (bytes > 0) ranges_.push_back({static_cast<const char*>(p), bytes});
  }
  // Spread over `steps` calls of step().
  void spread(int64_t steps) {
    int64_t bytes = 0;
    for (const auto& r : ranges_) bytes += r.second;
    per_step_ = ceil_div(bytes, std::max<int64_t>(1, steps));
  }
  void step() {
    for (int64_t done = 0; done < per_step_ && range_ < ranges_.size(); done += kLine) {
      __builtin_prefetch(ranges_[range_].first + at_, 0, 2);
      at_ += kLine;
      if (at_ >= ranges_[range_].second) {
        ++range_;
        at_ = 0;
      }
    }
  }

 private:
  static constexpr int64_t kLine = 64;
  std::vector<std::pair<const char*, int64_t>> ranges_;
  size_t range_ = 0;
  int64_t at_ = 0, per_step_ = 0;
};

// One tap across a block of the grid: best_index takes base + position[q] where the tap's value wins.
template <typename scalar_t, typename index_t>
MANUALGRAD_VECTOR_CLONES void sweep_grid(scalar_t* __restrict best, index_t* __restrict best_index,
                                         const scalar_t* __restrict values, const index_t* __restrict position,
                                         int64_t count, index_t base) {
  for (int64_t q = 0; q < count; ++q) {
    const scalar_t v = values[q];
    const bool take = (v > best[q]) | (v != v);  // strictly greater, or NaN
    best[q] = take ? v : best[q];
    best_index[q] = take ? static_cast<index_t>(base + position[q]) : best_index[q];
  }
}

// The forward of a batch's volumes by the grid (plan_grid): tasks are (band, volume), band-major, so that a
// thread's consecutive tasks share the band's positions and first taps.
template <typename scalar_t, typename index_t>
void max_pool_grid(scalar_t* out, int64_t* idx, const scalar_t* in, const Geometry& g, const GridPlan& plan) {
  const Window& w = g.win;
  const int64_t volumes = g.batch * g.in_channels, in_plane = g.in_positions(), out_plane = g.out_positions();
  const int64_t slice = g.in_h * g.in_w, slice_elems = plan.phases * plan.plane;
  at::parallel_for(0, plan.bands * volumes, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> planes(plan.ring * slice_elems);
    std::vector<int64_t> held(plan.ring);
    const int64_t lanes = plan.rows * plan.pitch;
    std::vector<index_t> position(lanes), first(lanes);  // first: the window's first tap inside, in its slice
    std::vector<scalar_t> best(kGridLanes);
    std::vector<index_t> best_index(kGridLanes);
    int64_t band_of = -1;
    Prefetcher prefetch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t band = task / volumes, p = task % volumes;
      const int64_t oh0 = band * plan.rows, rows = std::min(plan.rows, g.out_h - oh0), grid = rows * plan.pitch;
      if (band != band_of) {
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t h_start = (oh0 + i) * w.stride_h - w.pad_h;
          int64_t i_lo, i_hi;
          taps_inside(h_start, w.kernel_h, w.dilation_h, g.in_h, i_lo, i_hi);
          for (int64_t ow = 0; ow < plan.pitch; ++ow) {
            const int64_t w_start = ow * w.stride_w - w.pad_w;
            int64_t j_lo = 0, j_hi = 0;
            if (ow < g.out_w) taps_inside(w_start, w.kernel_w, w.dilation_w, g.in_w, j_lo, j_hi);
            const int64_t q = i * plan.pitch + ow;
            position[q] = static_cast<index_t>((oh0 + i) * w.stride_h * g.in_w + ow * w.stride_w);
            first[q] = i_lo < i_hi && j_lo < j_hi
                           ? static_cast<index_t>((h_start + i_lo * w.dilation_h) * g.in_w + w_start + j_lo * w.dilation_w)
                           : index_t(-1);
          }
        }
        band_of = band;
      }
      std::fill(held.begin(), held.end(), int64_t{-1});
      const scalar_t* volume = in + p * in_plane;
      // the input rows the band reads of a depth slice
      const int64_t ih0 = std::max<int64_t>(0, w.stride_h * oh0 - w.pad_h);
      const int64_t ih1 = std::clamp<int64_t>(w.stride_h * (oh0 + plan.height) - w.pad_h, ih0, g.in_h);
      const auto band_rows = [&](const scalar_t* v, int64_t id) {
        prefetch.add(v + id * slice + ih0 * g.in_w, (ih1 - ih0) * g.in_w * int64_t(sizeof(scalar_t)));
      };
      for (int64_t od = 0; od < g.out_d; ++od) {
        const int64_t d_start = od * w.stride_d - w.pad_d;
        int64_t k_lo, k_hi;
        taps_inside(d_start, w.kernel_d, w.dilation_d, g.in_d, k_lo, k_hi);
        for (int64_t k = k_lo; k < k_hi; ++k) {  // the depth slices this output depth reads, laid out once
          const int64_t id = d_start + k * w.dilation_d, place = id % plan.ring;
          if (held[place] != id) {
            fill_grid_planes(planes.data() + place * slice_elems, volume + id * slice, g, plan, oh0);
            held[place] = id;
          }
        }
        // what the next output depth lays out, or the next task's first (the same band of the next volume)
        prefetch.clear();
        if (od + 1 < g.out_d) {
          const int64_t next = d_start + w.stride_d;
          int64_t n_lo, n_hi;
          taps_inside(next, w.kernel_d, w.dilation_d, g.in_d, n_lo, n_hi);
          for (int64_t k = n_lo; k < n_hi; ++k) {
            const int64_t id = next + k * w.dilation_d;
            if (held[id % plan.ring] != id) band_rows(volume, id);
          }
        } else if (task + 1 < end && p + 1 < volumes) {
          const int64_t next = -w.pad_d;
          int64_t n_lo, n_hi;
          taps_inside(next, w.kernel_d, w.dilation_d, g.in_d, n_lo, n_hi);
          for (int64_t k = n_lo; k < n_hi; ++k) band_rows(volume + in_plane, next + k * w.dilation_d);
        }
        prefetch.spread(ceil_div(grid, kGridLanes) * std::max<int64_t>(0, k_hi - k_lo) *
                        static_cast<int64_t>(plan.read.size()));
        const int64_t first_slice = k_lo < k_hi ? (d_start + k_lo * w.dilation_d) * slice : -1;
        scalar_t* out_rows = out + p * out_plane + (od * g.out_h + oh0) * g.out_w;
        int64_t* idx_rows = idx == nullptr ? nullptr : idx + p * out_plane + (od * g.out_h + oh0) * g.out_w;
        for (int64_t q0 = 0; q0 < grid; q0 += kGridLanes) {
          const int64_t count = std::min(kGridLanes, grid - q0);
          start_outputs(best.data(), idx == nullptr ? nullptr : best_index.data(), first.data() + q0, first_slice, count);
          for (int64_t k = k_lo; k < k_hi; ++k) {
            const int64_t id = d_start + k * w.dilation_d;
            const scalar_t* planes_k = planes.data() + id % plan.ring * slice_elems + q0;
            for (size_t t = 0; t < plan.read.size(); ++t) {
              prefetch.step();
              if (idx == nullptr) {
                sweep_tap_values(best.data(), planes_k + plan.read[t], count);
              } else {
                sweep_grid(best.data(), best_index.data(), planes_k + plan.read[t], position.data() + q0, count,
                           static_cast<index_t>(id * slice + plan.offset[t]));
              }
            }
          }
          // the block's real outputs: row i's columns ow < out_w
          for (int64_t q = q0; q < q0 + count;) {
            const int64_t i = q / plan.pitch, ow = q % plan.pitch;
            const int64_t n = std::min(q0 + count, i * plan.pitch + plan.pitch) - q;  // to the row's end
            const int64_t real = std::clamp<int64_t>(g.out_w - ow, 0, n);
            store_outputs(out_rows + i * g.out_w + ow, idx_rows == nullptr ? nullptr : idx_rows + i * g.out_w + ow,
                          best.data() + (q - q0), best_index.data() + (q - q0), real);
            q += n;
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void max_pool_volumes(scalar_t* out, int64_t* idx, const scalar_t* in, const Geometry& g) {
  const int64_t planes = g.batch * g.in_channels;  // (n, c) volumes
  const int64_t in_plane = g.in_positions(), out_plane = g.out_positions();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, out_plane));
  if (idx == nullptr && g.spatial_dims == 1) {  // (a 2-d plane of one row may still have several output rows)
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) max_pool_row_values(out + p * out_plane, in + p * in_plane, g);
    });
    return;
  }
  const GridPlan grid = plan_grid<index_t>(g);
  if (grid.use) return max_pool_grid<scalar_t, index_t>(out, idx, in, g, grid);
  const PoolPlan plan = plan_pool(g);
  if (!plan.phases) {
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        max_pool_volume_direct(out + p * out_plane, idx == nullptr ? nullptr : idx + p * out_plane, in + p * in_plane, g);
    });
    return;
  }
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    PhaseScratch<scalar_t, index_t> scratch(plan);
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += plan.chunk) {
        const Chunk c(g, ow0, std::min(g.out_w, ow0 + plan.chunk));
        max_pool_chunk(out + p * out_plane, idx == nullptr ? nullptr : idx + p * out_plane, in + p * in_plane, g, c,
                       scratch);
      }
    }
  });
}

// ---- Channels-last: (N, H, W, C), or (N, D, H, W, C) in 3-d ----

// Output rows (n, od, oh) of a channels-last batch: each output pixel's maxima start at the lowest value and
// its argmax at the window's first tap inside the input (-1 for none), then the taps inside sweep the
// pixel's channels in (d, h, w) order, a window row's taps inside to a call (sweep_tap_run: the tap's pixel
// as every lane's index, in index_t lanes as the NCHW sweep, widened to int64 as they are stored).
template <typename scalar_t, typename index_t>
void max_pool_nhwc(scalar_t* out, int64_t* idx, const scalar_t* in, const Geometry& g) {
  const int64_t C = g.in_channels, out_rows = g.out_d * g.out_h;
  const Window& w = g.win;
  const scalar_t lowest = pool_lowest<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.out_w * C));
  at::parallel_for(0, g.batch * out_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<index_t> best_index(idx == nullptr ? 0 : C);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* image = in + row / out_rows * g.in_positions() * C;
      const WindowRows rows(g, row % out_rows);
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        const int64_t o = row * g.out_w + ow;
        scalar_t* best = out + o * C;
        const int64_t w_start = ow * w.stride_w - w.pad_w;
        int64_t j_lo, j_hi;
        taps_inside(w_start, w.kernel_w, w.dilation_w, g.in_w, j_lo, j_hi);
        const bool empty = rows.empty() || j_lo >= j_hi;
        std::fill_n(best, C, lowest);
        const index_t first = empty ? index_t(-1) : static_cast<index_t>(rows.first() * g.in_w + w_start + j_lo * w.dilation_w);
        std::fill(best_index.begin(), best_index.end(), first);
        if (!empty) rows.for_each([&](int64_t id, int64_t ih) {
          const int64_t pixel = (id * g.in_h + ih) * g.in_w + w_start + j_lo * w.dilation_w;  // the row's first tap inside
          if (idx == nullptr) {
            sweep_tap_run_values(best, image + pixel * C, C, j_hi - j_lo, w.dilation_w * C);
          } else {
            sweep_tap_run(best, best_index.data(), image + pixel * C, C, static_cast<index_t>(pixel), j_hi - j_lo,
                          w.dilation_w * C, static_cast<index_t>(w.dilation_w));
          }
        });
        if (idx != nullptr) std::copy(best_index.begin(), best_index.end(), idx + o * C);
      }
    }
  });
}

// The CPU backward's check of index i of plane `plane` (each index as it is used: an error names it).
inline void check_in_plane(int64_t i, int64_t in_plane, int64_t plane, c10::IntArrayRef input_size) {
  TORCH_CHECK(i >= 0 && i < in_plane, "max_pool backward: index ", i, " of plane ", plane,
              " is out of range for an input plane of ", in_plane, " elements (input_size=", input_size, ")");
}

constexpr int64_t kNhwcBackwardChannels = 64;  // channels per backward task: tasks for a batch of one too
constexpr int64_t kNhwcWindowTaps = 32;        // the most taps a window may have for add_row_grads

// The gradients of outputs [ow, ow_end) of one output row, `count` channels each (output ow's at go + ow * C and
// its indices at ix + ow * C): go's channel c added to gi[tap * C + c] where its index is that tap, for each tap
// of the output's window inside the input (the row's input rows at row_first[r] and the output's columns), a
// vector of channels at a time. Each tap's pixel is compared with every lane's index, where a value at a time
// took an index, a check and a scattered add (1.24-1.31x torch's channels-last backward). A pixel is one tap only,
// so each gradient is added once, in output order as by the scatter: the same bits. Returns the first output
// with a lane whose index is neither -1 nor one of its taps (only raw calls without check_indices give one), its
// other lanes added, or ow_end: the caller adds those one by one and goes on after it.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES int64_t add_row_grads(scalar_t* __restrict gi, int64_t C, const scalar_t* __restrict go,
                                               const int64_t* __restrict ix, const int64_t* row_first, int64_t rows,
                                               int64_t ow, int64_t ow_end, const Window& w, int64_t in_w,
                                               int64_t count) {
  for (; ow < ow_end; ++ow) {
    const int64_t w_start = ow * w.stride_w - w.pad_w;
    int64_t j_lo, j_hi;
    taps_inside(w_start, w.kernel_w, w.dilation_w, in_w, j_lo, j_hi);
    const scalar_t* __restrict g = go + ow * C;
    const int64_t* __restrict x = ix + ow * C;
    // A lane matches one tap at most (the taps are distinct pixels): every lane with an index matched one iff the
    // matches number the lanes with an index.
    int64_t matched = 0, indexed = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = j_lo; j < j_hi; ++j) {
        const int64_t tap = row_first[r] + w_start + j * w.dilation_w;
        scalar_t* __restrict at = gi + tap * C;
        for (int64_t c = 0; c < count; ++c) {
          const bool match = x[c] == tap;
          at[c] = match ? at[c] + g[c] : at[c];
          matched += match;
        }
      }
    }
    for (int64_t c = 0; c < count; ++c) indexed += x[c] != -1;
    if (matched != indexed) return ow;
  }
  return ow_end;
}

// grad_input of a channels-last batch: a task owns one image's (or volume's) block of channels, zeroes it
// and adds each output's gradient at its argmax in output order, as the NCHW backward does per plane: by the
// window's taps (add_row_grads) where the strides are above 1, else by index.
template <typename scalar_t>
void max_pool_backward_nhwc(scalar_t* gi, const scalar_t* go, const int64_t* idx, const Geometry& g,
                            c10::IntArrayRef input_size) {
  const Window& w = g.win;
  const int64_t C = g.in_channels, in_plane = g.in_positions(), out_plane = g.out_positions();
  // Blocks of channels where the batch would leave a thread idle, else whole pixels (no bit depends on the split)
  const int64_t block = g.batch >= at::get_num_threads() ? C : kNhwcBackwardChannels;
  const int64_t blocks = ceil_div(C, block);
  // (with a stride of 1 an input pixel is a tap of up to a kernel's worth of outputs: 3x3 64@56 1.44 ms by taps, 1.21
  // by scatter, torch's 1.01-1.12)
  const bool by_taps = w.kernel_d <= kNhwcWindowTaps && w.kernel_h <= kNhwcWindowTaps && w.kernel_w <= kNhwcWindowTaps &&
                       w.kernel_d * w.kernel_h * w.kernel_w <= kNhwcWindowTaps && w.stride_h > 1 && w.stride_w > 1 &&
                       (g.in_d == 1 || w.stride_d > 1);
  const int64_t in_rows = g.in_d * g.in_h;
  at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> taps;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, c0 = t % blocks * block, c1 = std::min(C, c0 + block);
      scalar_t* gi_n = gi + n * in_plane * C;
      // Input rows (id, ih) are zeroed in their order just before an output's window reaches one, so that they are
      // still in cache when added to (a window's rows all lie at or before its last).
      int64_t zeroed = 0;
      const auto zero_rows = [&](int64_t rows) {
        for (; zeroed < rows; ++zeroed)
          for (int64_t i = zeroed * g.in_w; i < (zeroed + 1) * g.in_w; ++i)
            std::fill(gi_n + i * C + c0, gi_n + i * C + c1, scalar_t(0));
      };
      // output o's gradients value by value, but for the indices in `skip` (those added by taps), the rows an index
      // reaches zeroed first
      const auto scatter = [&](int64_t o, const std::vector<int64_t>& skip) {
        const int64_t* ix = idx + (n * out_plane + o) * C;
        const scalar_t* g_o = go + (n * out_plane + o) * C;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i = ix[c];
          if (i == -1 || std::find(skip.begin(), skip.end(), i) != skip.end()) continue;
          check_in_plane(i, in_plane, n * C + c, input_size);
          if (i >= zeroed * g.in_w) zero_rows(i / g.in_w + 1);
          gi_n[i * C + c] += g_o[c];
        }
      };
      if (!by_taps) {  // each output's gradients by index, in order (scatter's skip list and zeroing check: 1.6x the time)
        zero_rows(in_rows);
        for (int64_t o = 0; o < out_plane; ++o) {
          const int64_t* ix = idx + (n * out_plane + o) * C;
          const scalar_t* g_o = go + (n * out_plane + o) * C;
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t i = ix[c];
            if (i == -1) continue;
            check_in_plane(i, in_plane, n * C + c, input_size);
            gi_n[i * C + c] += g_o[c];
          }
        }
      } else {
        std::vector<int64_t> row_first;
        for (int64_t orow = 0; orow < g.out_d * g.out_h; ++orow) {
          const WindowRows rows(g, orow);
          if (rows.empty()) {  // no window of the row has a tap inside: every index is -1 but in raw calls
            for (int64_t o = orow * g.out_w; o < (orow + 1) * g.out_w; ++o) {
              const int64_t* ix = idx + (n * out_plane + o) * C;
              if (std::all_of(ix + c0, ix + c1, [](int64_t i) { return i == -1; })) continue;
              taps.clear();
              scatter(o, taps);
            }
            continue;
          }
          row_first.clear();
          rows.for_each([&](int64_t id, int64_t ih) { row_first.push_back((id * g.in_h + ih) * g.in_w); });
          zero_rows(row_first.back() / g.in_w + 1);
          const int64_t o0 = orow * g.out_w, at = (n * out_plane + o0) * C + c0;
          for (int64_t ow = 0; ow < g.out_w; ++ow) {
            ow = add_row_grads(gi_n + c0, C, go + at, idx + at, row_first.data(), static_cast<int64_t>(row_first.size()),
                               ow, g.out_w, w, g.in_w, c1 - c0);
            if (ow == g.out_w) break;
            // an index outside the window: the lanes not yet added, one by one (out of the plane: an error)
            const int64_t w_start = ow * w.stride_w - w.pad_w;
            int64_t j_lo, j_hi;
            taps_inside(w_start, w.kernel_w, w.dilation_w, g.in_w, j_lo, j_hi);
            taps.clear();
            for (const int64_t first : row_first)
              for (int64_t j = j_lo; j < j_hi; ++j) taps.push_back(first + w_start + j * w.dilation_w);
            scatter(o0 + ow, taps);
          }
        }
      }
      zero_rows(in_rows);  // the rows no window reaches
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool_forward_cpu(const at::Tensor& input_, c10::IntArrayRef kernel_size,
                                                        c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                        c10::IntArrayRef dilation, bool ceil_mode, bool compute_indices) {
  const Geometry g = check_max_pool(input_, kernel_size, stride, padding, dilation, ceil_mode);
  if (is_reduced_precision(input_.scalar_type())) {  // exact: float32 holds every half value, and a max is one of them
    auto [output, indices] =
        max_pool_forward_cpu(input_.to(at::kFloat), kernel_size, stride, padding, dilation, ceil_mode, compute_indices);
    return {output.to(input_.scalar_type()), indices};
  }
  if (channels_last_result(input_, g)) {
    const at::Tensor input = input_.contiguous(channels_last_format(g));
    const auto options = input.options().memory_format(channels_last_format(g));
    at::Tensor output = at::empty(g.output_shape(g.in_channels), options);
    at::Tensor indices = compute_indices ? at::empty(g.output_shape(g.in_channels), options.dtype(at::kLong))
                                         : at::empty({0}, input.options().dtype(at::kLong));
    if (output.numel() == 0) return {output, indices};
    AT_DISPATCH_ALL_TYPES(input.scalar_type(), "max_pool_forward_nhwc", [&] {
      scalar_t* out = output.data_ptr<scalar_t>();
      int64_t* idx = compute_indices ? indices.data_ptr<int64_t>() : nullptr;
      if (g.in_positions() < (int64_t{1} << 31)) max_pool_nhwc<scalar_t, int32_t>(out, idx, input.const_data_ptr<scalar_t>(), g);
      else max_pool_nhwc<scalar_t, int64_t>(out, idx, input.const_data_ptr<scalar_t>(), g);
    });
    return {output, indices};
  }
  const at::Tensor input = input_.contiguous();                                       // (N, C, [D,] H, W)
  at::Tensor output = at::empty(g.output_shape(g.in_channels), input.options());      // (N, C, [OD,] OH, OW)
  at::Tensor indices = compute_indices ? at::empty(g.output_shape(g.in_channels), input.options().dtype(at::kLong))
                                       : at::empty({0}, input.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, indices};
  // 32-bit indices inside the sweep keep twice as many lanes per vector; volumes past 2^31 use 64.
  // (every index the chunk sweep forms, even for padding lanes, lies within a volume plus one chunk's reach, less
  // than kRingSlots; the grid checks its own, plan_grid)
  const bool small_plane = g.in_positions() + kRingSlots < (int64_t{1} << 31);
  // Integers as torch's CPU max_pool2d takes them (uint8 to int64); they have no gradient.
  AT_DISPATCH_ALL_TYPES(input.scalar_type(), "max_pool_forward_cpu", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    int64_t* idx = compute_indices ? indices.data_ptr<int64_t>() : nullptr;
    if (small_plane) {
      max_pool_volumes<scalar_t, int32_t>(out, idx, in, g);
    } else {
      max_pool_volumes<scalar_t, int64_t>(out, idx, in, g);
    }
  });
  return {output, indices};
}

// The first element of indices (in (N, C, *spatial) order) that index_from_window refuses, or -1: the same
// element whatever the thread count, and the one the CUDA check names.
int64_t first_foreign_index(const int64_t* indices, int64_t total, const Geometry& g) {
  const int64_t out_plane = g.out_positions();
  return at::parallel_reduce(
      0, total, 16384, int64_t{-1},
      [&](int64_t begin, int64_t end, int64_t) {
        for (int64_t e = begin; e < end; ++e) {
          const int64_t o = e % out_plane;
          if (!index_from_window(indices[e], o / g.out_w / g.out_h, o / g.out_w % g.out_h, o % g.out_w, g.in_d, g.in_h,
                                 g.in_w, g.win))
            return e;
        }
        return int64_t{-1};
      },
      [](int64_t a, int64_t b) { return a < 0 ? b : b < 0 ? a : std::min(a, b); });
}

// The CPU scatters: each plane's task sends its outputs' gradients by index, in order, and owns every
// pixel it writes. Every index is checked to lie in the plane as it goes, at no extra cost; with
// check_indices, all are first checked to lie in their own output's window (a pass with a division per
// output), as on CUDA, so that no index gives different gradients on the two devices.
at::Tensor max_pool_backward_cpu(const at::Tensor& grad_output_, const at::Tensor& indices_, c10::IntArrayRef input_size,
                                 c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                 c10::IntArrayRef dilation, bool check_indices) {
  const Geometry g = check_max_pool_backward(grad_output_, indices_, input_size, kernel_size, stride, padding, dilation);
  if (is_reduced_precision(grad_output_.scalar_type()))  // overlapping windows are added in float32
    return max_pool_backward_cpu(grad_output_.to(at::kFloat), indices_, input_size, kernel_size, stride, padding, dilation,
                                 check_indices)
        .to(grad_output_.scalar_type());
  if (check_indices) {  // in (N, C, [OD,] OH, OW) order whatever the layout, so the error names the same element
    const at::Tensor indices = indices_.contiguous();
    const int64_t bad = first_foreign_index(indices.data_ptr<int64_t>(), indices.numel(), g);
    if (bad >= 0) fail_foreign_index(g, bad, indices.data_ptr<int64_t>()[bad], input_size);
  }
  if (channels_last_result(grad_output_, g)) {
    const at::Tensor grad_output = grad_output_.contiguous(channels_last_format(g));
    const at::Tensor indices = indices_.contiguous(channels_last_format(g));
    at::Tensor grad_input = at::empty(input_size, grad_output.options().memory_format(channels_last_format(g)));
    if (grad_input.numel() == 0) return grad_input;
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "max_pool_backward_nhwc", [&] {
      max_pool_backward_nhwc<scalar_t>(grad_input.data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                                       indices.const_data_ptr<int64_t>(), g, input_size);
    });
    return grad_input;
  }
  const at::Tensor grad_output = grad_output_.contiguous();  // (N, C, [OD,] OH, OW)
  const at::Tensor indices = indices_.contiguous();          // (N, C, [OD,] OH, OW)
  at::Tensor grad_input = at::empty(input_size, grad_output.options());  // (N, C, [D,] H, W)
  const int64_t planes = input_size[0] * input_size[1];
  if (grad_input.numel() == 0) return grad_input;
  const int64_t in_plane = grad_input.numel() / planes, out_plane = grad_output.numel() / planes;
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "max_pool_backward_cpu", [&] {
    const scalar_t* go = grad_output.data_ptr<scalar_t>();
    const int64_t* idx = indices.data_ptr<int64_t>();
    scalar_t* gi = grad_input.data_ptr<scalar_t>();
    at::parallel_for(0, planes, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, out_plane)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* go_p = go + p * out_plane;
        const int64_t* idx_p = idx + p * out_plane;
        scalar_t* gi_p = gi + p * in_plane;
        std::fill(gi_p, gi_p + in_plane, scalar_t(0));  // zeroed here, while the plane is in cache
        for (int64_t o = 0; o < out_plane; ++o) {
          const int64_t i = idx_p[o];
          if (i == -1) continue;  // an empty window (all padding) sends its gradient nowhere
          check_in_plane(i, in_plane, p, input_size);
          gi_p[i] += go_p[o];
        }
      }
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(manualgrad, CPU, m) {
  m.impl("max_pool_forward", &max_pool_forward_cpu);
  m.impl("max_pool_backward", &max_pool_backward_cpu);
}

}  // namespace manualgrad
