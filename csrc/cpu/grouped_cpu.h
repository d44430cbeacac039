// grouped_cpu.h — the direct (no im2col, no BLAS) CPU path for grouped convolutions with few channels a group,
// called by conv_cpu.cpp.
#pragma once

#include "../shape_checks.h"
#include "vectorize.h"

namespace manualgrad {

// grouped_cpu.cpp is compiled twice, with 64-byte vectors (namespace w64) and with 32-byte ones
// (grouped_cpu_w32.cpp: w32).
namespace w64 {
#include "grouped_cpu_api.inc"
}  // namespace w64
namespace w32 {
#include "grouped_cpu_api.inc"
}  // namespace w32

// The copy this CPU takes (vectorize.h's wide_vectors).
inline bool grouped_direct_applies(const at::Tensor& input, const Geometry& g) {
  return MANUALGRAD_BY_WIDTH(grouped_direct_applies(input, g));
}
inline void grouped_forward_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& bias, const Geometry& g) {
  MANUALGRAD_BY_WIDTH(grouped_forward_cpu(output, input, weight, bias, g));
}
inline bool grouped_backward_input_applies(const at::Tensor& weight, const Geometry& g) {
  return MANUALGRAD_BY_WIDTH(grouped_backward_input_applies(weight, g));
}
inline void grouped_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                       const Geometry& g) {
  MANUALGRAD_BY_WIDTH(grouped_backward_input_cpu(grad_input, grad_output, weight, g));
}
inline void grouped_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                        const Geometry& g) {
  MANUALGRAD_BY_WIDTH(grouped_backward_weight_cpu(grad_weight, grad_output, input, g));
}

}  // namespace manualgrad
