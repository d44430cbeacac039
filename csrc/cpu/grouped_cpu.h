// grouped_cpu.h — the direct (no im2col, no BLAS) CPU path for grouped convolutions with few channels a group,
// called by conv_cpu.cpp.
#pragma once

#include "../shape_checks.h"

namespace manualgrad {

// Whether the direct kernels compute this convolution: 1-d or 2-d, more than one group but not depthwise (those
// have their own kernels), and few enough channels a group that im2col + BLAS runs poorly; `input` is the tensor
// the convolution reads (for the input gradient, the layout of the forward's input).
bool grouped_direct_applies(const at::Tensor& input, const Geometry& g);

// output (N, C_out, [OH,] OW) = the grouped convolution of input (N, C_in, [H,] W) with weight (C_out, C_in/g,
// [KH,] KW), + bias if defined; each output's sum in runs of blas.h's forward_chunk terms. Input and output in any
// layout (their strides are read).
void grouped_forward_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                         const Geometry& g);
// Whether grouped_backward_input_cpu computes this input gradient: a finite weight (the gradient is computed as
// forwards of grad_output over its padding, where an infinite weight would meet zeros that torch never multiplies)
// and bounded planes.
bool grouped_backward_input_applies(const at::Tensor& weight, const Geometry& g);
// grad_input (N, C_in, [H,] W), any layout, from grad_output (N, C_out, [OH,] OW) and weight.
void grouped_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                const Geometry& g);
// grad_weight (C_out, C_in/g, [KH,] KW), any layout, from grad_output and input.
void grouped_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                 const Geometry& g);

}  // namespace manualgrad
