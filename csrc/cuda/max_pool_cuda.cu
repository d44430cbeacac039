// max_pool_cuda.cu — max-pool forward (output + argmax indices) and backward on CUDA; the mirror of
// cpu/max_pool_cpu.cpp.
// Forward: one thread per output element scans its window in row-major order; a later value wins only
// if strictly greater or NaN, so ties go to the first maximum and NaN wins — torch's rule and torch's
// indices. A window entirely in the padding gets index -1, as on the CPU.
// Backward: a gather, one thread per input element, summing the gradients of the outputs whose window
// covers it and whose argmax it is, in a fixed order: no atomics, deterministic.
#include "../shape_checks.h"
#include "windows.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace manualgrad {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), int64_t{1} << 20)));
}

// The taps [lo, hi) of a window starting at `start` that land inside [0, size).
__device__ inline void taps_inside(int64_t start, int64_t kernel, int64_t dilation, int64_t size, int64_t& lo,
                                   int64_t& hi) {
  lo = start >= 0 ? 0 : ceil_div(-start, dilation);
  hi = start > size - 1 ? 0 : std::min(kernel, (size - 1 - start) / dilation + 1);
}

template <typename scalar_t>
__global__ void max_pool_forward_kernel(scalar_t* __restrict__ output, int64_t* __restrict__ indices,
                                        const scalar_t* __restrict__ input, int64_t planes, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const Window2d w = g.win;
  const int64_t total = planes * g.out_h * g.out_w;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const int64_t ow = e % g.out_w, oh = (e / g.out_w) % g.out_h, p = e / (g.out_w * g.out_h);
    const int64_t h_start = oh * w.stride_h - w.pad_h, w_start = ow * w.stride_w - w.pad_w;
    int64_t i_lo, i_hi, j_lo, j_hi;
    taps_inside(h_start, w.kernel_h, w.dilation_h, g.in_h, i_lo, i_hi);
    taps_inside(w_start, w.kernel_w, w.dilation_w, g.in_w, j_lo, j_hi);
    const scalar_t* plane = input + p * g.in_h * g.in_w;
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int64_t best_index = (i_lo < i_hi && j_lo < j_hi)
                             ? (h_start + i_lo * w.dilation_h) * g.in_w + (w_start + j_lo * w.dilation_w)
                             : -1;
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const int64_t ih = h_start + i * w.dilation_h;
      for (int64_t j = j_lo; j < j_hi; ++j) {
        const int64_t iw = w_start + j * w.dilation_w;
        const acc_t v = static_cast<acc_t>(plane[ih * g.in_w + iw]);
        if (v > best || v != v) {  // strictly greater, or NaN
          best = v;
          best_index = ih * g.in_w + iw;
        }
      }
    }
    output[e] = static_cast<scalar_t>(best);
    indices[e] = best_index;
  }
}

template <typename scalar_t>
__global__ void max_pool_backward_kernel(scalar_t* __restrict__ grad_input, const scalar_t* __restrict__ grad_output,
                                         const int64_t* __restrict__ indices, int64_t planes, Geometry g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w, total = planes * in_plane;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const int64_t flat = e % in_plane, p = e / in_plane;
    const int64_t* idx = indices + p * out_plane;
    const scalar_t* go = grad_output + p * out_plane;
    acc_t sum = 0;
    for_each_covering_window(g, flat / g.in_w, flat % g.in_w, [&](int64_t, int64_t, int64_t o) {
      if (idx[o] == flat) sum += static_cast<acc_t>(go[o]);
    });
    grad_input[e] = static_cast<scalar_t>(sum);
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool_forward_cuda(const at::Tensor& input_, c10::IntArrayRef kernel_size,
                                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                         c10::IntArrayRef dilation, bool ceil_mode) {
  const Geometry g = check_max_pool(input_, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();                                   // (N, C, H, W)
  at::Tensor output = at::empty(g.output_shape(g.in_channels), input.options());  // (N, C, OH, OW)
  at::Tensor indices = at::empty(g.output_shape(g.in_channels), input.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, indices};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool_forward_cuda", [&] {
    max_pool_forward_kernel<scalar_t><<<grid_for(output.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        output.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), input.data_ptr<scalar_t>(),
        g.batch * g.in_channels, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {output, indices};
}

at::Tensor max_pool_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& indices_,
                                  c10::IntArrayRef input_size, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const Geometry g = check_max_pool_backward(grad_output_, indices_, input_size, kernel_size, stride, padding, dilation);
  const c10::cuda::CUDAGuard device_guard(grad_output_.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad_output = grad_output_.contiguous();  // (N, C, OH, OW)
  const at::Tensor indices = indices_.contiguous();          // (N, C, OH, OW)
  at::Tensor grad_input = at::empty(input_size, grad_output.options());  // (N, C, H, W)
  if (grad_input.numel() == 0) return grad_input;
  // A gather silently skips an index that no window could have produced; malformed indices from a
  // direct call are reported instead (one reduction and one sync).
  const int64_t in_plane = g.in_h * g.in_w;
  TORCH_CHECK(indices.numel() == 0 || !((indices < -1) | (indices >= in_plane)).any().item<bool>(),
              op_label("pool", g.spatial_dims), ": indices out of range for an input plane of ", in_plane,
              " elements (input_size=", input_size, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "max_pool_backward_cuda", [&] {
    max_pool_backward_kernel<scalar_t><<<grid_for(grad_input.numel()), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_input.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
        g.batch * g.in_channels, g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(manualgrad, CUDA, m) {
  m.impl("max_pool_forward", &max_pool_forward_cuda);
  m.impl("max_pool_backward", &max_pool_backward_cuda);
}

}  // namespace manualgrad
