// winograd_cpu.h — 3x3 stride-1 float32 convolutions on the CPU by Winograd's F(2x2, 3x3), forward and both
// gradients, called by conv_cpu.cpp.
#pragma once

#include "../shape_checks.h"

namespace manualgrad {

// Whether the Winograd path computes this convolution: float32, one group, a 3x3 kernel of stride 1 and
// dilation 1 in the plane, images and channels where it was measured to pay. For the input gradient
// (backward=true) the padding must also be at most 2 (the gradient is a 3x3 convolution of grad_output padded by
// 2 - padding), and a 2-d output at least 14x14 or, on smaller ones, more than 384 channels in and out together and
// a batch of at least 128 tiles (with fewer, im2col's input gradient is faster there). A 3-d
// convolution (any depth kernel, padding and dilation) also needs stride 1 in depth and that padding, so that its
// forward and both gradients are all computed here.
bool winograd_applies(const at::Tensor& input, const Geometry& g, bool backward);
// Whether TORCH_MANUALGRAD_WINOGRAD=0 (read at each call) sends every Winograd layer, dense or grouped, to the
// direct kernels.
bool winograd_switched_off();
// Whether TORCH_MANUALGRAD_WINOGRAD=1 (read at each call) gives Winograd the grouped layers a CPU-dependent choice
// would send elsewhere (grouped_cpu.cpp's channels-last forwards on Intel CPUs); dense layers do not ask.
bool winograd_forced_on();

// input (N, C_in, [D,] H, W) convolved with weight (C_out, C_in, [KD,] 3, 3), + bias if defined: the output, laid
// out channels-last (ChannelsLast or ChannelsLast3d) or contiguous, whatever the input's layout. Undefined where
// an output is not finite: an infinity or NaN in the input or weight spreads through the transforms to outputs
// a direct sum keeps finite or infinite (inf - inf), so the caller then computes it by the kernels it takes
// without Winograd.
at::Tensor winograd_forward_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                const Geometry& g, bool channels_last);
// (grad_input, grad_weight) shaped as input and weight, each laid out as the forward's output and undefined unless
// wanted, from grad_output, input (read for the weight gradient only) and weight. The input gradient needs
// padding <= 2 (winograd_applies with backward=true). Each is undefined, though wanted, where one of its values is
// not finite (as the forward).
std::pair<at::Tensor, at::Tensor> winograd_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& weight, const Geometry& g,
                                                        bool channels_last, bool want_input, bool want_weight);

// U = G w G^T of `count` 3x3 filters, tap 3r + s of filter x at taps[(3r + s) * tap_stride + x], into
// u[xi * xi_stride + x], xi = 4a + b: the filters' transform, for the grouped kernels (grouped_cpu.cpp) too.
void winograd_tile_filters(float* u, int64_t xi_stride, const float* taps, int64_t tap_stride, int64_t count);
// Its adjoint, the filters' gradient G^T dU G: du[xi * xi_stride + x] → taps[(3r + s) * tap_stride + x].
void winograd_tile_filter_grads(float* taps, const float* du, int64_t xi_stride, int64_t tap_stride, int64_t count);

}  // namespace manualgrad
