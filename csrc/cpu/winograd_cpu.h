// winograd_cpu.h — 3x3 stride-1 float32 convolutions on the CPU by Winograd's F(2x2, 3x3), forward and both
// gradients, called by conv_cpu.cpp.
#pragma once

#include "../shape_checks.h"

namespace manualgrad {

// Whether the Winograd path computes this convolution: float32, 2-d, one group, a 3x3 kernel of stride 1
// and dilation 1, images and channels where it was measured to pay. For the input gradient (backward=true) the
// padding must also be at most 2 (the gradient is a 3x3 convolution of grad_output padded by 2 - padding).
// For a 3-d convolution: whether its depth taps' 2-d convolutions would be computed here.
bool winograd_applies(const at::Tensor& input, const Geometry& g, bool backward);

// input (N, C_in, H, W) convolved with weight (C_out, C_in, 3, 3), + bias if defined: (N, C_out, OH, OW) in
// `format` (Contiguous or ChannelsLast), whatever the input's layout.
at::Tensor winograd_forward_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                const Geometry& g, at::MemoryFormat format);
// (grad_input (N, C_in, H, W), grad_weight (C_out, C_in, 3, 3)), each in `format` and undefined unless wanted, from
// grad_output (N, C_out, OH, OW), input (N, C_in, H, W; read for the weight gradient only) and weight. The input
// gradient needs padding <= 2 (winograd_applies with backward=true).
std::pair<at::Tensor, at::Tensor> winograd_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& weight, const Geometry& g,
                                                        at::MemoryFormat format, bool want_input, bool want_weight);

}  // namespace manualgrad
