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
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

namespace manualgrad {
namespace {

// The taps [lo, hi) of a window starting at `start` that land inside [0, size).
// (Undilated windows, the usual case, need no division.)
template <typename index_t>
__device__ inline void taps_inside(index_t start, index_t kernel, index_t dilation, index_t size, index_t& lo,
                                   index_t& hi) {
  if (dilation == 1) {
    lo = start >= 0 ? 0 : -start;
    const index_t reach = size - start;
    hi = reach < kernel ? reach : kernel;  // may be <= lo: no tap inside
    return;
  }
  lo = start >= 0 ? 0 : -start / dilation + (-start % dilation != 0);
  const index_t reach = start > size - 1 ? 0 : (size - 1 - start) / dilation + 1;
  hi = reach < kernel ? reach : kernel;
}

template <typename scalar_t, typename index_t>
__global__ void max_pool_forward_kernel(scalar_t* __restrict__ output, int64_t* __restrict__ indices,
                                        const scalar_t* __restrict__ input, int64_t total, Geo<index_t> g) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const index_t x = static_cast<index_t>(e);
    index_t oh, ow;
    const index_t p = g.split_output(x, oh, ow);
    const index_t h_start = oh * g.stride_h - g.pad_h, w_start = ow * g.stride_w - g.pad_w;
    index_t i_lo, i_hi, j_lo, j_hi;
    taps_inside(h_start, g.kernel_h, g.dilation_h, g.in_h, i_lo, i_hi);
    taps_inside(w_start, g.kernel_w, g.dilation_w, g.in_w, j_lo, j_hi);
    const scalar_t* plane = input + static_cast<int64_t>(p) * g.in_h * g.in_w;
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    index_t best_index = (i_lo < i_hi && j_lo < j_hi)
                             ? (h_start + i_lo * g.dilation_h) * g.in_w + (w_start + j_lo * g.dilation_w)
                             : -1;
    for (index_t i = i_lo; i < i_hi; ++i) {
      const index_t row = (h_start + i * g.dilation_h) * g.in_w;
      for (index_t j = j_lo; j < j_hi; ++j) {
        const index_t at = row + w_start + j * g.dilation_w;
        const acc_t v = static_cast<acc_t>(plane[at]);
        if (v > best || v != v) {  // strictly greater, or NaN
          best = v;
          best_index = at;
        }
      }
    }
    output[e] = static_cast<scalar_t>(best);
    if (indices != nullptr) indices[e] = best_index;  // null: compute_indices=False
  }
}

template <typename scalar_t, typename index_t>
__global__ void max_pool_backward_kernel(scalar_t* __restrict__ grad_input, const scalar_t* __restrict__ grad_output,
                                         const int64_t* __restrict__ indices, int64_t total, Geo<index_t> g) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const index_t x = static_cast<index_t>(e);
    index_t ih, iw;
    const index_t p = g.split_input(x, ih, iw);
    const int64_t flat = ih * g.in_w + iw;
    const int64_t plane = static_cast<int64_t>(p) * g.out_h * g.out_w;
    const int64_t* idx = indices + plane;
    const scalar_t* go = grad_output + plane;
    acc_t sum = 0;
    for_each_covering_window(g, ih, iw, [&](index_t, index_t, index_t o) {
      if (idx[o] == flat) sum += static_cast<acc_t>(go[o]);
    });
    grad_input[e] = static_cast<scalar_t>(sum);
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool_forward_cuda(const at::Tensor& input_, c10::IntArrayRef kernel_size,
                                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                         c10::IntArrayRef dilation, bool ceil_mode,
                                                         bool compute_indices) {
  const Geometry g = check_max_pool(input_, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();                                   // (N, C, H, W)
  at::Tensor output = at::empty(g.output_shape(g.in_channels), input.options());  // (N, C, OH, OW)
  at::Tensor indices = compute_indices ? at::empty(g.output_shape(g.in_channels), input.options().dtype(at::kLong))
                                       : at::empty({0}, input.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, indices};
  const int64_t total = output.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool_forward_cuda", [&] {
    MANUALGRAD_DISPATCH_INDEX(fits_int32(g, {input.numel(), total}), [&] {
      max_pool_forward_kernel<scalar_t, index_t><<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          output.data_ptr<scalar_t>(), compute_indices ? indices.data_ptr<int64_t>() : nullptr,
          input.data_ptr<scalar_t>(), total, Geo<index_t>(g));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {output, indices};
}

at::Tensor max_pool_backward_cuda(const at::Tensor& grad_output_, const at::Tensor& indices_,
                                  c10::IntArrayRef input_size, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                                  c10::IntArrayRef padding, c10::IntArrayRef dilation, bool check_indices) {
  const Geometry g = check_max_pool_backward(grad_output_, indices_, input_size, kernel_size, stride, padding, dilation);
  const c10::cuda::CUDAGuard device_guard(grad_output_.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad_output = grad_output_.contiguous();  // (N, C, OH, OW)
  const at::Tensor indices = indices_.contiguous();          // (N, C, OH, OW)
  at::Tensor grad_input = at::empty(input_size, grad_output.options());  // (N, C, H, W)
  if (grad_input.numel() == 0) return grad_input;
  // A gather silently skips an index that no window could have produced, so indices from a direct
  // call are checked first: one reduction and one host sync, skipped for autograd's own call.
  const int64_t in_plane = g.in_h * g.in_w;
  if (check_indices && indices.numel() > 0) {
    const auto [low, high] = at::aminmax(indices);
    const at::Tensor range = at::stack({low, high}).cpu();
    const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < in_plane, op_label("pool", g.spatial_dims), ": indices out of range for an input plane of ",
                in_plane, " elements: found ", lo < -1 ? lo : hi, " (input_size=", input_size, ")");
  }
  const int64_t total = grad_input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "max_pool_backward_cuda", [&] {
    MANUALGRAD_DISPATCH_INDEX(fits_int32(g, {total, grad_output.numel()}), [&] {
      max_pool_backward_kernel<scalar_t, index_t><<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad_input.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), total,
          Geo<index_t>(g));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(manualgrad, CUDA, m) {
  m.impl("max_pool_forward", &max_pool_forward_cuda);
  m.impl("max_pool_backward", &max_pool_backward_cuda);
}

}  // namespace manualgrad
