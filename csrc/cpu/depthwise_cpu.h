// depthwise_cpu.h — the direct (no im2col) CPU path for depthwise convolutions, called by conv_cpu.cpp.
#pragma once

#include "../shape_checks.h"

namespace manualgrad {

// output (N, C_out, OH, OW) = depthwise conv of input (N, C_in, H, W) with weight (C_out, 1, KH, KW) + bias
void depthwise_forward_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& bias, const Geometry& g);
// grad_input (N, C_in, H, W) from grad_output (N, C_out, OH, OW) and weight (C_out, 1, KH, KW)
void depthwise_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                  const Geometry& g);
// grad_weight (C_out, 1, KH, KW) from grad_output (N, C_out, OH, OW) and input (N, C_in, H, W)
void depthwise_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                   const Geometry& g);

// Channels-last (NHWC) tensors, channel multiplier 1 (depthwise_nhwc_supported): input (N, H, W, C) memory,
// output and grad_input likewise; weight and grad_weight in their (C, 1, KH, KW) shape.
bool depthwise_nhwc_supported(const Geometry& g);
void depthwise_forward_nhwc_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& bias, const Geometry& g);
void depthwise_backward_input_nhwc_cpu(at::Tensor& grad_input, const at::Tensor& grad_output,
                                       const at::Tensor& weight, const Geometry& g);
void depthwise_backward_weight_nhwc_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output,
                                        const at::Tensor& input, const Geometry& g);

}  // namespace manualgrad
