// depthwise_cuda.h — the direct (no im2col) CUDA path for depthwise convolutions, called by
// conv_cuda.cu; the mirror of cpu/depthwise_cpu.h.
// The caller has checked the arguments and holds the device guard; tensors are contiguous.
#pragma once

#include "../shape_checks.h"

namespace manualgrad {

// output (N, C_out, OH, OW) = depthwise conv of input (N, C_in, H, W) with weight (C_out, 1, KH, KW)
// + bias (C_out,) when defined
void depthwise_forward_cuda(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, const Geometry& g);
// grad_input (N, C_in, H, W) from grad_output (N, C_out, OH, OW) and weight (C_out, 1, KH, KW)
void depthwise_backward_input_cuda(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                   const Geometry& g);
// Whether depthwise_backward_weight_cuda has a kernel for this window size (the common ones; it keeps
// one accumulator per tap in registers). Other sizes take the GEMM path.
bool depthwise_weight_grad_supported(const Geometry& g);
// grad_weight (C_out, 1, KH, KW) from grad_output (N, C_out, OH, OW) and input (N, C_in, H, W)
void depthwise_backward_weight_cuda(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                    const Geometry& g);

}  // namespace manualgrad
