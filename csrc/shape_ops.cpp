// shape_ops.cpp — the argument checks of every op as ops of their own (manualgrad::*_shape), for the fake
// kernels: they run the very checks the CPU and CUDA kernels run (shape_checks.h) and return the output
// shape, reading only the tensors' sizes, dtypes and devices, so one kernel serves every device.
#include "shape_checks.h"

#include <torch/library.h>

namespace manualgrad {
namespace {

std::vector<int64_t> conv_forward_shape(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                        c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  return check_conv(input, weight, bias, stride, padding, dilation, groups).output_shape(weight.size(0));
}

// The backward's first output, grad_input, has the input's shape.
std::vector<int64_t> conv_backward_shape(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                         c10::IntArrayRef dilation, int64_t groups, std::array<bool, 3> /*output_mask*/) {
  const Geometry g = check_conv(input, weight, std::nullopt, stride, padding, dilation, groups);
  check_conv_grad_output(grad_output, input, g);
  return input.sizes().vec();
}

std::vector<int64_t> max_pool_forward_shape(const at::Tensor& input, c10::IntArrayRef kernel_size,
                                            c10::IntArrayRef stride, c10::IntArrayRef padding,
                                            c10::IntArrayRef dilation, bool ceil_mode) {
  const Geometry g = check_max_pool(input, kernel_size, stride, padding, dilation, ceil_mode);
  return g.output_shape(g.in_channels);
}

std::vector<int64_t> max_pool_backward_shape(const at::Tensor& grad_output, const at::Tensor& indices,
                                             c10::IntArrayRef input_size, c10::IntArrayRef kernel_size,
                                             c10::IntArrayRef stride, c10::IntArrayRef padding,
                                             c10::IntArrayRef dilation) {
  check_max_pool_backward(grad_output, indices, input_size, kernel_size, stride, padding, dilation);
  return input_size.vec();
}

}  // namespace

TORCH_LIBRARY_IMPL(manualgrad, CompositeExplicitAutograd, m) {
  m.impl("conv_forward_shape", &conv_forward_shape);
  m.impl("conv_backward_shape", &conv_backward_shape);
  m.impl("max_pool_forward_shape", &max_pool_forward_shape);
  m.impl("max_pool_backward_shape", &max_pool_backward_shape);
}

}  // namespace manualgrad
