// depthwise_cpu.cpp — depthwise convolution on the CPU computed directly, tap by tap, on a
// zero-padded copy of each input plane (the same sums as im2col + GEMM, without the columns).
//   forward:      out[n, oc]      = bias[oc] + sum over taps (i, j) of w[oc, i, j] × the input slice tap (i, j) sees
//   grad_input:   grad_in[n, c]   = each tap adds w[oc, i, j] × grad_out[n, oc] back into its slice
//   grad_weight:  grad_w[oc, i, j] = sum over images and positions of grad_out × the slice tap (i, j) saw
// Each task owns its output planes (forward, grad_input) or output channels (grad_weight) and sums in a
// fixed order, so results do not depend on the thread count.
#include "depthwise_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "vectorize.h"

namespace manualgrad {
namespace {

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

// The padded plane every output position reads without bounds checks: (padded_h, padded_w).
struct PaddedPlane {
  int64_t h, w;
  explicit PaddedPlane(const Geometry& g)
      : h((g.out_h - 1) * g.win.stride_h + (g.win.kernel_h - 1) * g.win.dilation_h + 1),
        w((g.out_w - 1) * g.win.stride_w + (g.win.kernel_w - 1) * g.win.dilation_w + 1) {}

  template <typename scalar_t>
  void fill(scalar_t* dst, const scalar_t* plane, const Geometry& g) const {
    std::fill(dst, dst + h * w, scalar_t(0));
    for (int64_t r = 0; r < h; ++r) {
      const int64_t ih = r - g.win.pad_h;
      if (ih < 0 || ih >= g.in_h) continue;
      const int64_t c0 = std::max<int64_t>(0, g.win.pad_w), c1 = std::min<int64_t>(w, g.in_w + g.win.pad_w);
      if (c1 > c0) std::copy(plane + ih * g.in_w + (c0 - g.win.pad_w), plane + ih * g.in_w + (c1 - g.win.pad_w), dst + r * w + c0);
    }
  }

  // Adds the padded plane's interior back into plane (the inverse of fill, for gradients).
  template <typename scalar_t>
  void crop(scalar_t* plane, const scalar_t* src, const Geometry& g) const {
    std::fill(plane, plane + g.in_h * g.in_w, scalar_t(0));
    for (int64_t ih = 0; ih < g.in_h; ++ih) {
      const int64_t r = ih + g.win.pad_h;
      if (r >= h) break;
      const int64_t c1 = std::min<int64_t>(g.in_w, w - g.win.pad_w);
      std::copy(src + r * w + g.win.pad_w, src + r * w + g.win.pad_w + std::max<int64_t>(c1, 0), plane + ih * g.in_w);
    }
  }
};

// Every (output row, kernel tap) pair of one plane, in a fixed order: f(row, window, tap) where
// row = oh*OW is the output row's offset, window the offset in the padded plane of that row's first
// window tap, and tap = i*KW + j the weight's tap.
template <typename F>
void for_each_tap_row(const Geometry& g, const PaddedPlane& pad, const F& f) {
  const Window2d& w = g.win;
  for (int64_t oh = 0; oh < g.out_h; ++oh)
    for (int64_t i = 0; i < w.kernel_h; ++i)
      for (int64_t j = 0; j < w.kernel_w; ++j)
        f(oh * g.out_w, (oh * w.stride_h + i * w.dilation_h) * pad.w + j * w.dilation_w, i * w.kernel_w + j);
}

template <typename scalar_t>
void forward_kernel(scalar_t* out, const scalar_t* in, const scalar_t* weight, const scalar_t* bias, const Geometry& g) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.win.kernel_h * g.win.kernel_w;
  const int64_t out_plane = g.out_h * g.out_w;
  const PaddedPlane pad(g);
  at::parallel_for(0, g.batch * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> padded(pad.h * pad.w);
    for (int64_t task = begin; task < end; ++task) {  // task = (n, c)
      const int64_t n = task / g.in_channels, c = task % g.in_channels;
      pad.fill(padded.data(), in + task * g.in_h * g.in_w, g);
      for (int64_t oc = c * multiplier; oc < (c + 1) * multiplier; ++oc) {
        scalar_t* o = out + (n * g.out_channels + oc) * out_plane;
        std::fill(o, o + out_plane, bias ? bias[oc] : scalar_t(0));
        for_each_tap_row(g, pad, [&](int64_t row, int64_t window, int64_t tap) {
          axpy_row(o + row, padded.data() + window, weight[oc * taps + tap], g.out_w, g.win.stride_w);
        });
      }
    }
  });
}

template <typename scalar_t>
void backward_input_kernel(scalar_t* grad_in, const scalar_t* grad_out, const scalar_t* weight, const Geometry& g) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.win.kernel_h * g.win.kernel_w;
  const int64_t out_plane = g.out_h * g.out_w;
  const PaddedPlane pad(g);
  at::parallel_for(0, g.batch * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> padded(pad.h * pad.w);
    for (int64_t task = begin; task < end; ++task) {  // task = (n, c)
      const int64_t n = task / g.in_channels, c = task % g.in_channels;
      std::fill(padded.begin(), padded.end(), scalar_t(0));
      for (int64_t oc = c * multiplier; oc < (c + 1) * multiplier; ++oc) {
        const scalar_t* go = grad_out + (n * g.out_channels + oc) * out_plane;
        for_each_tap_row(g, pad, [&](int64_t row, int64_t window, int64_t tap) {
          scatter_row(padded.data() + window, go + row, weight[oc * taps + tap], g.out_w, g.win.stride_w);
        });
      }
      pad.crop(grad_in + task * g.in_h * g.in_w, padded.data(), g);
    }
  });
}

template <typename scalar_t>
void backward_weight_kernel(scalar_t* grad_weight, const scalar_t* grad_out, const scalar_t* in, const Geometry& g) {
  const int64_t multiplier = g.out_channels / g.in_channels, taps = g.win.kernel_h * g.win.kernel_w;
  const int64_t out_plane = g.out_h * g.out_w;
  const PaddedPlane pad(g);
  at::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> padded(pad.h * pad.w), acc(taps * g.out_w);
    for (int64_t oc = begin; oc < end; ++oc) {
      const int64_t c = oc / multiplier;
      std::fill(acc.begin(), acc.end(), scalar_t(0));
      for (int64_t n = 0; n < g.batch; ++n) {
        pad.fill(padded.data(), in + (n * g.in_channels + c) * g.in_h * g.in_w, g);
        const scalar_t* go = grad_out + (n * g.out_channels + oc) * out_plane;
        for_each_tap_row(g, pad, [&](int64_t row, int64_t window, int64_t tap) {
          dot_row(acc.data() + tap * g.out_w, go + row, padded.data() + window, g.out_w, g.win.stride_w);
        });
      }
      for (int64_t t = 0; t < taps; ++t) {
        scalar_t sum = 0;
        for (int64_t ow = 0; ow < g.out_w; ++ow) sum += acc[t * g.out_w + ow];
        grad_weight[oc * taps + t] = sum;
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
