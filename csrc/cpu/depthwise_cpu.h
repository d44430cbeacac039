// depthwise_cpu.h — the direct (no im2col) CPU path for depthwise convolutions, called by conv_cpu.cpp.
#pragma once

#include "../shape_checks.h"
#include "vectorize.h"

#include <utility>

namespace manualgrad {

// depthwise_cpu.cpp is compiled twice, with 64-byte vectors (namespace w64) and with 32-byte ones
// (depthwise_cpu_w32.cpp: w32).
namespace w64 {
#include "depthwise_cpu_api.inc"
}  // namespace w64
namespace w32 {
#include "depthwise_cpu_api.inc"
}  // namespace w32

// A depthwise convolution of multiplier 1 and stride 1 whose padding is within the kernel's span has for input
// gradient a depthwise convolution of grad_output, with the kernel flipped (its taps in reverse order): flipped is
// that one's geometry (input and output sizes swapped, padding span - pad).
inline bool input_gradient_as_forward(const Geometry& g, Geometry& flipped) {
  const Window& w = g.win;
  const int64_t span_h = (w.kernel_h - 1) * w.dilation_h, span_w = (w.kernel_w - 1) * w.dilation_w;
  if (g.out_channels != g.in_channels || w.stride_h != 1 || w.stride_w != 1 || w.pad_h > span_h || w.pad_w > span_w)
    return false;
  flipped = g;
  std::swap(flipped.in_h, flipped.out_h);
  std::swap(flipped.in_w, flipped.out_w);
  flipped.win.pad_h = span_h - w.pad_h;
  flipped.win.pad_w = span_w - w.pad_w;
  return true;
}

// The copy this CPU takes (vectorize.h's wide_vectors).
inline void depthwise_forward_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                                  const at::Tensor& bias, const Geometry& g) {
  MANUALGRAD_BY_WIDTH(depthwise_forward_cpu(output, input, weight, bias, g));
}
inline void depthwise_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output,
                                         const at::Tensor& weight, const Geometry& g) {
  MANUALGRAD_BY_WIDTH(depthwise_backward_input_cpu(grad_input, grad_output, weight, g));
}
inline void depthwise_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output,
                                          const at::Tensor& input, const Geometry& g) {
  MANUALGRAD_BY_WIDTH(depthwise_backward_weight_cpu(grad_weight, grad_output, input, g));
}
inline bool depthwise_nhwc_supported(const Geometry& g) { return MANUALGRAD_BY_WIDTH(depthwise_nhwc_supported(g)); }
inline void depthwise_forward_nhwc_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                                       const at::Tensor& bias, const Geometry& g) {
  MANUALGRAD_BY_WIDTH(depthwise_forward_nhwc_cpu(output, input, weight, bias, g));
}
inline void depthwise_backward_input_nhwc_cpu(at::Tensor& grad_input, const at::Tensor& grad_output,
                                              const at::Tensor& weight, const Geometry& g) {
  MANUALGRAD_BY_WIDTH(depthwise_backward_input_nhwc_cpu(grad_input, grad_output, weight, g));
}
inline void depthwise_backward_weight_nhwc_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output,
                                               const at::Tensor& input, const Geometry& g) {
  MANUALGRAD_BY_WIDTH(depthwise_backward_weight_nhwc_cpu(grad_weight, grad_output, input, g));
}
inline bool depthwise_tiles_apply(const at::Tensor& weight, const Geometry& g) {
  return MANUALGRAD_BY_WIDTH(depthwise_tiles_apply(weight, g));
}
inline void depthwise_forward_tiles_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& bias, const Geometry& g, bool flip) {
  MANUALGRAD_BY_WIDTH(depthwise_forward_tiles_cpu(output, input, weight, bias, g, flip));
}
inline bool depthwise_image_tiles_apply(const Geometry& g) { return MANUALGRAD_BY_WIDTH(depthwise_image_tiles_apply(g)); }
inline void depthwise_backward_weight_tiles_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output,
                                                const at::Tensor& input, const Geometry& g) {
  MANUALGRAD_BY_WIDTH(depthwise_backward_weight_tiles_cpu(grad_weight, grad_output, input, g));
}

}  // namespace manualgrad
