// depthwise_cpu.cpp — depthwise convolution on the CPU computed directly, tap by tap, on the input and
// gradient planes themselves (the same sums as im2col + GEMM, without the columns or a padded copy).
//   forward:      out[n, oc]      = bias[oc] + sum over taps (i, j) of w[oc, i, j] × the input slice tap (i, j) sees
//   grad_input:   grad_in[n, c]   = each tap adds w[oc, i, j] × grad_out[n, oc] back into its slice
//   grad_weight:  grad_w[oc, i, j] = sum over images and positions of grad_out × the slice tap (i, j) saw
// Each task owns its output planes (forward, grad_input) or output channels (grad_weight) and sums in a
// fixed order, so results do not depend on the thread count.
// A tap that falls in the padding would add weight × 0, which changes no finite sum (the sums start at
// +0 or the bias, so not even the sign of a zero), so only the taps inside the input are visited: time
// and memory follow the work, not the padding, stride or dilation.
#include "depthwise_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../window_taps.h"
#include "vectorize.h"

namespace manualgrad {
namespace {

// Each product is rounded before it is added (no fused multiply-add): otherwise the compiler fuses some
// lanes of a loop and not others (the vector body, but not its remainder), and an output's bits would
// depend on where its run of columns starts; unfused, they are the same for any run and on every CPU.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// out[ow] += w * in[ow * stride] for ow < count: one tap across one output row.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void axpy_row(scalar_t* __restrict out, const scalar_t* __restrict in, scalar_t w,
                                       int64_t count, int64_t stride) {
  if (stride == 1) {
    for (int64_t ow = 0; ow < count; ++ow) out[ow] += w * in[ow];
  } else {
    for (int64_t ow = 0; ow < count; ++ow) out[ow] += w * in[ow * stride];
  }
}

// in[ow * stride] += w * out[ow]: the mirror of axpy_row, adding a tap's share back into its slice.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void scatter_row(scalar_t* __restrict in, const scalar_t* __restrict out, scalar_t w,
                                          int64_t count, int64_t stride) {
  for (int64_t ow = 0; ow < count; ++ow) in[ow * stride] += w * out[ow];
}

// acc[ow] += grad[ow] * in[ow * stride]: one partial sum per output column, added up at the end in a
// fixed order (a single running sum would be a serial chain the compiler may not reorder).
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void dot_row(scalar_t* __restrict acc, const scalar_t* __restrict grad,
                                      const scalar_t* __restrict in, int64_t count, int64_t stride) {
  for (int64_t ow = 0; ow < count; ++ow) acc[ow] += grad[ow] * in[ow * stride];
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// A kernel column j that lands inside the input for some output column: it reads input column
// ow*stride + offset for the output columns ow in [lo, hi), and lies in the padding for the rest.
struct TapColumns {
  int64_t j, offset, lo, hi;
};

// The kernel columns with at least one output column inside the input (the hull between the first
// and the last output column's windows, less those that the stride steps over), computed once per call.
std::vector<TapColumns> tap_columns(const Geometry& g) {
  const Window2d& w = g.win;
  int64_t j_lo, j_hi, unused;
  taps_inside((g.out_w - 1) * w.stride_w - w.pad_w, w.kernel_w, w.dilation_w, g.in_w, j_lo, unused);
  taps_inside(-w.pad_w, w.kernel_w, w.dilation_w, g.in_w, unused, j_hi);
  std::vector<TapColumns> columns;
  for (int64_t j = j_lo; j < j_hi; ++j) {
    const int64_t offset = j * w.dilation_w - w.pad_w;
    const int64_t lo = std::min(g.out_w, offset >= 0 ? 0 : ceil_div(-offset, w.stride_w));
    const int64_t hi = std::min(g.out_w, g.in_w - 1 - offset >= 0 ? (g.in_w - 1 - offset) / w.stride_w + 1 : 0);
    if (lo < hi) columns.push_back({j, offset, lo, hi});
  }
  return columns;
}

// Every (output row, kernel tap) pair of one plane whose tap lands inside the input, in a fixed order
// (output row, then tap row-major), clipped to output columns [ow0, ow1): f(row, lo, count, at, tap)
// for outputs row + [lo, lo + count) reading input elements at, at + stride_w, ... of the plane, with
// weight tap = i*KW + j.
template <typename F>
void for_each_tap_run(const Geometry& g, const std::vector<TapColumns>& columns, int64_t ow0, int64_t ow1, const F& f) {
  const Window2d& w = g.win;
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const int64_t h_start = oh * w.stride_h - w.pad_h;
    int64_t i_lo, i_hi;
    taps_inside(h_start, w.kernel_h, w.dilation_h, g.in_h, i_lo, i_hi);
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const int64_t ih = h_start + i * w.dilation_h;
      for (const TapColumns& c : columns) {
        const int64_t lo = std::max(c.lo, ow0), hi = std::min(c.hi, ow1);
        if (lo < hi) f(oh * g.out_w, lo, hi - lo, ih * g.in_w + c.offset + lo * w.stride_w, i * w.kernel_w + c.j);
      }
    }
  }
}

template <typename scalar_t>
void forward_kernel(scalar_t* out, const scalar_t* in, const scalar_t* weight, const scalar_t* bias, const Geometry& g) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.win.kernel_h * g.win.kernel_w;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  const std::vector<TapColumns> columns = tap_columns(g);
  at::parallel_for(0, g.batch * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {  // task = (n, c)
      const int64_t n = task / g.in_channels, c = task % g.in_channels;
      const scalar_t* plane = in + task * in_plane;
      for (int64_t oc = c * multiplier; oc < (c + 1) * multiplier; ++oc) {
        scalar_t* o = out + (n * g.out_channels + oc) * out_plane;
        std::fill(o, o + out_plane, bias ? bias[oc] : scalar_t(0));
        for_each_tap_run(g, columns, 0, g.out_w, [&](int64_t row, int64_t lo, int64_t count, int64_t at, int64_t tap) {
          axpy_row(o + row + lo, plane + at, weight[oc * taps + tap], count, g.win.stride_w);
        });
      }
    }
  });
}

template <typename scalar_t>
void backward_input_kernel(scalar_t* grad_in, const scalar_t* grad_out, const scalar_t* weight, const Geometry& g) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.win.kernel_h * g.win.kernel_w;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  const std::vector<TapColumns> columns = tap_columns(g);
  at::parallel_for(0, g.batch * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {  // task = (n, c)
      const int64_t n = task / g.in_channels, c = task % g.in_channels;
      scalar_t* plane = grad_in + task * in_plane;
      std::fill(plane, plane + in_plane, scalar_t(0));
      for (int64_t oc = c * multiplier; oc < (c + 1) * multiplier; ++oc) {
        const scalar_t* go = grad_out + (n * g.out_channels + oc) * out_plane;
        for_each_tap_run(g, columns, 0, g.out_w, [&](int64_t row, int64_t lo, int64_t count, int64_t at, int64_t tap) {
          scatter_row(plane + at, go + row + lo, weight[oc * taps + tap], count, g.win.stride_w);
        });
      }
    }
  });
}

// Partial sums per (tap, output column) of one chunk of columns: at most this many, or one per tap.
constexpr int64_t kPartialSums = 1 << 16;

template <typename scalar_t>
void backward_weight_kernel(scalar_t* grad_weight, const scalar_t* grad_out, const scalar_t* in, const Geometry& g) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.win.kernel_h * g.win.kernel_w;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  const std::vector<TapColumns> columns = tap_columns(g);
  // Columns are taken a chunk at a time so the partial sums stay bounded; each (tap, column) partial
  // sum runs over images and rows in the same order whatever the chunk, and the running total over
  // columns continues from chunk to chunk, so the result does not depend on the chunk width either.
  const int64_t chunk = std::clamp<int64_t>(kPartialSums / taps, 1, g.out_w);
  at::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> acc(taps * chunk);  // (taps, chunk)
    for (int64_t oc = begin; oc < end; ++oc) {
      const int64_t c = oc / multiplier;
      scalar_t* total = grad_weight + oc * taps;  // (taps,) the running totals
      std::fill(total, total + taps, scalar_t(0));
      for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += chunk) {
        const int64_t ow1 = std::min(g.out_w, ow0 + chunk), width = ow1 - ow0;
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t n = 0; n < g.batch; ++n) {
          const scalar_t* plane = in + (n * g.in_channels + c) * in_plane;
          const scalar_t* go = grad_out + (n * g.out_channels + oc) * out_plane;
          for_each_tap_run(g, columns, ow0, ow1, [&](int64_t row, int64_t lo, int64_t count, int64_t at, int64_t tap) {
            dot_row(acc.data() + tap * width + (lo - ow0), go + row + lo, plane + at, count, g.win.stride_w);
          });
        }
        for (int64_t t = 0; t < taps; ++t) {
          scalar_t sum = total[t];
          for (int64_t k = 0; k < width; ++k) sum += acc[t * width + k];
          total[t] = sum;
        }
      }
    }
  });
}

}  // namespace

void depthwise_forward_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& bias, const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "depthwise_forward_cpu", [&] {
    forward_kernel(output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                   bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, g);
  });
}

void depthwise_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                  const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "depthwise_backward_input_cpu", [&] {
    backward_input_kernel(grad_input.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                          weight.data_ptr<scalar_t>(), g);
  });
}

void depthwise_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                   const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "depthwise_backward_weight_cpu", [&] {
    backward_weight_kernel(grad_weight.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                           input.data_ptr<scalar_t>(), g);
  });
}

}  // namespace manualgrad
