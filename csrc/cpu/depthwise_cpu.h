// depthwise_cpu.h — the direct (no im2col) CPU path for depthwise convolutions, called by conv_cpu.cpp.
#pragma once

#include "../shape_checks.h"
#include "vectorize.h"

namespace manualgrad {

// depthwise_cpu.cpp is compiled twice, with 64-byte vectors (namespace w64) and with 32-byte ones
// (depthwise_cpu_w32.cpp: w32).
namespace w64 {
#include "depthwise_cpu_api.inc"
}  // namespace w64
namespace w32 {
#include "depthwise_cpu_api.inc"
}  // namespace w32

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

}  // namespace manualgrad
