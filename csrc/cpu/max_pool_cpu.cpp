// max_pool_cpu.cpp — max-pool forward (output + argmax indices) and backward on the CPU; 1-d runs
// as 2-d of height 1.
// Forward scans each window in row-major order; a later value replaces the running maximum only if it
// is strictly greater or NaN. So ties go to the first maximum and NaN wins — torch's rule, which makes
// our indices torch's (flat within each (n, c) plane, as max_unpool expects).
// Backward sends each output's gradient to its argmax only; overlapping windows add. Each (n, c)
// plane belongs to one task, so no two tasks touch a pixel: deterministic without atomics.
#include "../shape_checks.h"
#include "../window_taps.h"
#include "vectorize.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace manualgrad {
namespace {

// First in-bounds tap of a window starting at `start` (torch starts its argmax there).
inline int64_t first_inside(int64_t start, int64_t dilation) {
  return start >= 0 ? start : start + ceil_div(-start, dilation) * dilation;
}

// Per-thread scratch for one plane. Each input row is stored as `stride_w` phases, phase r holding
// the padded row's columns r, r + stride, r + 2*stride, ...; then every window tap reads a contiguous
// run of one phase, so the sweep over an output row is a plain, vectorisable loop. Columns outside the
// input hold -inf: never strictly greater than anything, so padding can never become the argmax.
// Only the kernel columns [tap_lo, tap_hi) that reach the input for some output are kept, so a huge
// kernel over a small input costs no more than the input itself.
template <typename scalar_t, typename index_t>
struct PlaneScratch {
  std::vector<scalar_t> phases;      // (H, stride_w, phase_len)
  std::vector<scalar_t> padded_row;  // (stride_w * phase_len,) padded columns [base, base + stride_w*phase_len)
  std::vector<scalar_t> best;        // (OW,) running maximum of the current output row
  std::vector<index_t> best_index;
  std::vector<int64_t> first_col;  // (OW,) first in-bounds column of each window: torch's initial argmax
  int64_t tap_lo = 0, tap_hi = 0, base = 0, phase_len = 0;

  explicit PlaneScratch(const Geometry& g) {
    const Window2d& w = g.win;
    const int64_t reach = (g.out_w - 1) * w.stride_w;  // how far right the last output's window starts
    tap_lo = w.pad_w - reach <= 0 ? 0 : ceil_div(w.pad_w - reach, w.dilation_w);
    tap_hi = std::max(tap_lo, std::min(w.kernel_w, (g.in_w - 1 + w.pad_w) / w.dilation_w + 1));
    base = tap_lo * w.dilation_w;
    const int64_t span = tap_hi > tap_lo ? reach + (tap_hi - 1 - tap_lo) * w.dilation_w + 1 : 0;
    phase_len = ceil_div(span, w.stride_w);
    phases.resize(g.in_h * w.stride_w * phase_len);
    padded_row.resize(w.stride_w * phase_len);
    best.resize(g.out_w);
    best_index.resize(g.out_w);
    first_col.resize(g.out_w);
    for (int64_t ow = 0; ow < g.out_w; ++ow) first_col[ow] = first_inside(ow * w.stride_w - w.pad_w, w.dilation_w);
  }
};

// The innermost sweep: one window tap across a whole output row. Kept branch-free so that it
// vectorises; `index_at_zero + stride * ow` is the flat input index the tap reads for output ow.
template <typename scalar_t, typename index_t>
MANUALGRAD_VECTOR_CLONES void sweep_tap(scalar_t* __restrict best, index_t* __restrict best_index, const scalar_t* __restrict values,
                      int64_t count, index_t index_at_zero, index_t stride) {
  for (int64_t ow = 0; ow < count; ++ow) {
    const scalar_t v = values[ow];
    const bool take = (v > best[ow]) | (v != v);  // strictly greater, or NaN
    best[ow] = take ? v : best[ow];
    best_index[ow] = take ? static_cast<index_t>(index_at_zero + stride * static_cast<index_t>(ow)) : best_index[ow];
  }
}

// The same sweep when no indices are wanted: the running maximum alone.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void sweep_tap_values(scalar_t* __restrict best, const scalar_t* __restrict values,
                                               int64_t count) {
  for (int64_t ow = 0; ow < count; ++ow) {
    const scalar_t v = values[ow];
    best[ow] = (v > best[ow]) | (v != v) ? v : best[ow];
  }
}

// phases[r * len + k] = padded[s * k + r]: phase r of a padded row, as contiguous runs.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void deinterleave(scalar_t* __restrict phases, const scalar_t* __restrict padded, int64_t s,
                                           int64_t len) {
  if (s == 1) {
    std::copy(padded, padded + len, phases);
  } else if (s == 2) {  // the common stride, spelled out so that it vectorises
    for (int64_t k = 0; k < len; ++k) {
      phases[k] = padded[2 * k];
      phases[len + k] = padded[2 * k + 1];
    }
  } else {
    for (int64_t r = 0; r < s; ++r)
      for (int64_t k = 0; k < len; ++k) phases[r * len + k] = padded[s * k + r];
  }
}

// One (H, W) plane → its (OH, OW) maxima and, unless `indices` is null, their flat indices. Taps are
// applied in row-major order for every output, which is what fixes the tie and NaN rules.
template <typename scalar_t, typename index_t>
void max_pool_plane(scalar_t* output, int64_t* indices, const scalar_t* input, const Geometry& g,
                    PlaneScratch<scalar_t, index_t>& scratch) {
  const Window2d& w = g.win;
  const int64_t s = w.stride_w, len = scratch.phase_len;
  const scalar_t minus_inf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t row_len = s * len;
  const int64_t left = std::clamp<int64_t>(w.pad_w - scratch.base, 0, row_len);  // first slot inside the input
  const int64_t right = std::clamp<int64_t>(w.pad_w - scratch.base + g.in_w, left, row_len);
  for (int64_t ih = 0; ih < g.in_h; ++ih) {
    // The padded row: slot t holds input column t + base - pad_w, or -inf outside the input.
    scalar_t* padded = scratch.padded_row.data();
    const scalar_t* row = input + ih * g.in_w + (scratch.base - w.pad_w);
    std::fill(padded, padded + left, minus_inf);
    std::copy(row + left, row + right, padded + left);
    std::fill(padded + right, padded + row_len, minus_inf);
    deinterleave(scratch.phases.data() + ih * row_len, padded, s, len);
  }
  scalar_t* best = scratch.best.data();
  index_t* best_index = scratch.best_index.data();
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const int64_t h_start = oh * w.stride_h - w.pad_h;
    const int64_t first_row = first_inside(h_start, w.dilation_h);
    for (int64_t ow = 0; ow < g.out_w; ++ow) {
      best[ow] = minus_inf;
      // A window whose taps all fall in the padding has no argmax: -1, torch's "none" (its output is
      // -inf and its gradient goes nowhere).
      const bool empty = first_row >= g.in_h || scratch.first_col[ow] >= g.in_w;
      best_index[ow] = empty ? index_t(-1) : static_cast<index_t>(first_row * g.in_w + scratch.first_col[ow]);
    }
    // only the kernel rows that land inside the input
    int64_t i_lo, i_hi;
    taps_inside(h_start, w.kernel_h, w.dilation_h, g.in_h, i_lo, i_hi);
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const int64_t ih = h_start + i * w.dilation_h;
      for (int64_t j = scratch.tap_lo; j < scratch.tap_hi; ++j) {
        const int64_t c = j * w.dilation_w - scratch.base;  // slot of output 0's tap j in the padded row
        const scalar_t* values = scratch.phases.data() + (ih * s + c % s) * len + c / s;
        if (indices == nullptr) {
          sweep_tap_values(best, values, g.out_w);
        } else {
          sweep_tap(best, best_index, values, g.out_w, static_cast<index_t>(ih * g.in_w + j * w.dilation_w - w.pad_w),
                    static_cast<index_t>(s));
        }
      }
    }
    std::copy(best, best + g.out_w, output + oh * g.out_w);
    if (indices != nullptr) std::copy(best_index, best_index + g.out_w, indices + oh * g.out_w);
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
  const Window2d& w = g.win;
  const int64_t s = w.stride_w, d = w.dilation_w, pad = w.pad_w, span = (w.kernel_w - 1) * d;
  // windows [ow*s - pad, ow*s - pad + span] inside [0, in_w) for ow in [lo, hi)
  const int64_t lo = std::min(g.out_w, ceil_div(pad, s));
  const int64_t hi = std::max(lo, std::min(g.out_w, g.in_w - 1 - span + pad >= 0 ? (g.in_w - 1 - span + pad) / s + 1 : 0));
  const scalar_t minus_inf = -std::numeric_limits<scalar_t>::infinity();
  const auto edge = [&](int64_t ow) {  // only the taps inside the row: a kernel may dwarf it
    const int64_t start = ow * s - pad;
    int64_t j_lo, j_hi;
    taps_inside(start, w.kernel_w, d, g.in_w, j_lo, j_hi);
    scalar_t best = minus_inf;
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

template <typename scalar_t, typename index_t>
void max_pool_planes(scalar_t* out, int64_t* idx, const scalar_t* in, const Geometry& g) {
  const int64_t planes = g.batch * g.in_channels;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, out_plane));
  if (idx == nullptr && g.spatial_dims == 1) {  // (a 2-d plane of one row may still have several output rows)
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) max_pool_row_values(out + p * out_plane, in + p * in_plane, g);
    });
    return;
  }
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    PlaneScratch<scalar_t, index_t> scratch(g);
    for (int64_t p = begin; p < end; ++p)
      max_pool_plane(out + p * out_plane, idx == nullptr ? nullptr : idx + p * out_plane, in + p * in_plane, g, scratch);
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
  const at::Tensor input = input_.contiguous();                                       // (N, C, H, W)
  at::Tensor output = at::empty(g.output_shape(g.in_channels), input.options());      // (N, C, OH, OW)
  at::Tensor indices = compute_indices ? at::empty(g.output_shape(g.in_channels), input.options().dtype(at::kLong))
                                       : at::empty({0}, input.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, indices};
  // 32-bit indices inside the sweep keep twice as many lanes per vector; planes past 2^31 use 64.
  // (every index a sweep forms, even for padding lanes, lies within a plane plus one output row's reach)
  const bool small_plane = g.in_h * g.in_w + g.out_w * g.win.stride_w + g.in_w < (int64_t{1} << 31);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "max_pool_forward_cpu", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* out = output.data_ptr<scalar_t>();
    int64_t* idx = compute_indices ? indices.data_ptr<int64_t>() : nullptr;
    if (small_plane) {
      max_pool_planes<scalar_t, int32_t>(out, idx, in, g);
    } else {
      max_pool_planes<scalar_t, int64_t>(out, idx, in, g);
    }
  });
  return {output, indices};
}

// The first element of indices (in (N, C, OH, OW) order) that index_from_window refuses, or -1: the same
// element whatever the thread count, and the one the CUDA check names.
int64_t first_foreign_index(const int64_t* indices, int64_t total, const Geometry& g) {
  const int64_t out_plane = g.out_h * g.out_w;
  return at::parallel_reduce(
      0, total, 16384, int64_t{-1},
      [&](int64_t begin, int64_t end, int64_t) {
        for (int64_t e = begin; e < end; ++e) {
          const int64_t o = e % out_plane;
          if (!index_from_window(indices[e], o / g.out_w, o % g.out_w, g.in_h, g.in_w, g.win)) return e;
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
  const at::Tensor grad_output = grad_output_.contiguous();  // (N, C, OH, OW)
  const at::Tensor indices = indices_.contiguous();          // (N, C, OH, OW)
  at::Tensor grad_input = at::empty(input_size, grad_output.options());  // (N, C, H, W)
  const int64_t planes = input_size[0] * input_size[1];
  if (grad_input.numel() == 0) return grad_input;
  const int64_t in_plane = grad_input.numel() / planes, out_plane = grad_output.numel() / planes;
  if (check_indices) {
    const int64_t bad = first_foreign_index(indices.data_ptr<int64_t>(), indices.numel(), g);
    if (bad >= 0) fail_foreign_index(g, bad, indices.data_ptr<int64_t>()[bad], input_size);
  }
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
          TORCH_CHECK(i >= 0 && i < in_plane, "max_pool backward: index ", i, " of plane ", p,
                      " is out of range for an input plane of ", in_plane, " elements (input_size=", input_size, ")");
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
