// max_pool_cuda.cu — max-pool forward (output + argmax indices) and backward on CUDA; the mirror of
// cpu/max_pool_cpu.cpp. What each thread computes is in max_pool_threads.h (tested on the host too).
// Forward: one thread per output element, its window's maximum and torch's index of it.
// Backward: a gather, summing for each input element the gradients of the outputs whose window covers it
// and whose argmax it is, in a fixed order: no atomics, deterministic (torch's own CUDA max_pool3d
// backward scatters with atomics and has no deterministic mode). Undilated windows (along height and
// width) at strides up to 4 take one thread per cell of a few pixels that share their windows; others
// one thread per element. 1-d and 2-d run as planes, 3-d as volumes (HAS_DEPTH: the same code with its
// depth loops, compiled away for planes).
#include "../shape_checks.h"
#include "max_pool_threads.h"
#include "windows.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

namespace manualgrad {
namespace {

// HAS_DEPTH: 3-d, each (n, c) a volume; otherwise planes, with no depth arithmetic (depth 1 is a
// constant there, not a size read at run time). In a volume the kernels' "planes" are its slices: output
// slice nc*out_d + od, input slice nc*in_d + id.
template <bool HAS_DEPTH, typename scalar_t, typename index_t>
__global__ void max_pool_forward_kernel(scalar_t* __restrict__ output, int64_t* __restrict__ indices,
                                        const scalar_t* __restrict__ input, int64_t total, Geo<index_t> g) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const index_t x = static_cast<index_t>(e);
    index_t oh, ow, od;
    const index_t p = volume_of_slice<HAS_DEPTH>(g.split_output(x, oh, ow), g.by_out_d, g.out_d, od);
    index_t best_index;
    const int64_t volume = static_cast<int64_t>(p) * (HAS_DEPTH ? g.in_d : 1) * g.in_h * g.in_w;
    const acc_t best = max_pool_window<HAS_DEPTH, acc_t>(input + volume, g, od, oh, ow, best_index);
    output[e] = static_cast<scalar_t>(best);
    if (indices != nullptr) indices[e] = best_index;  // null: compute_indices=False
  }
}

template <bool HAS_DEPTH, typename scalar_t, typename index_t>
__global__ void max_pool_backward_kernel(scalar_t* __restrict__ grad_input, const scalar_t* __restrict__ grad_output,
                                         const int64_t* __restrict__ indices, int64_t total, Geo<index_t> g) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const index_t x = static_cast<index_t>(e);
    index_t ih, iw, id;
    const index_t p = volume_of_slice<HAS_DEPTH>(g.split_input(x, ih, iw), g.by_in_d, g.in_d, id);
    const int64_t volume = static_cast<int64_t>(p) * (HAS_DEPTH ? g.out_d : 1) * g.out_h * g.out_w;
    const acc_t sum = max_pool_backward_pixel<HAS_DEPTH, acc_t>(grad_output + volume, indices + volume, g, id, ih, iw);
    grad_input[e] = static_cast<scalar_t>(sum);
  }
}

// One thread per cell of one slice (see max_pool_threads.h); `total` = slices * cells_h * cells_w, where
// a slice is a plane, or one depth of a volume (HAS_DEPTH).
template <bool HAS_DEPTH, int TILE, typename scalar_t, typename index_t>
__global__ void max_pool_backward_cells_kernel(scalar_t* __restrict__ grad_input,
                                               const scalar_t* __restrict__ grad_output,
                                               const int64_t* __restrict__ indices, int64_t total, CellGeo<index_t> g,
                                               Divider<index_t> by_cells_w, Divider<index_t> by_cells_h,
                                               Divider<index_t> by_in_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t in_plane = static_cast<int64_t>(g.in_h) * g.in_w;
  const int64_t out_volume = static_cast<int64_t>(HAS_DEPTH ? g.out_d : 1) * g.out_h * g.out_w;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    index_t ch, cw, id;
    const index_t slice = cell_of_thread(static_cast<index_t>(e), g, by_cells_w, by_cells_h, ch, cw);
    const index_t p = volume_of_slice<HAS_DEPTH>(slice, by_in_d, g.in_d, id);
    max_pool_backward_cell<HAS_DEPTH, TILE, TILE, acc_t>(grad_input + slice * in_plane, grad_output + p * out_volume,
                                                         indices + p * out_volume, g, id, ch, cw);
  }
}

// Sets *first to the smallest position whose index index_from_window refuses (atomicMin: the result does
// not depend on the threads' order).
__global__ void first_foreign_index_kernel(unsigned long long* first, const int64_t* __restrict__ indices,
                                           int64_t total, int64_t out_d, int64_t out_h, int64_t out_w, int64_t in_d,
                                           int64_t in_h, int64_t in_w, Window w) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const int64_t o = e % (out_d * out_h * out_w);
    if (!index_from_window(indices[e], o / out_w / out_h, o / out_w % out_h, o % out_w, in_d, in_h, in_w, w))
      atomicMin(first, static_cast<unsigned long long>(e));
  }
}

void check_indices_cuda(const at::Tensor& indices, const Geometry& g, c10::IntArrayRef input_size) {
  const int64_t total = indices.numel();
  at::Tensor first = at::full({1}, std::numeric_limits<int64_t>::max(), indices.options());
  first_foreign_index_kernel<<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<unsigned long long*>(first.data_ptr<int64_t>()), indices.data_ptr<int64_t>(), total, g.out_d,
      g.out_h, g.out_w, g.in_d, g.in_h, g.in_w, g.win);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t position = first.item<int64_t>();  // the host sync
  if (position < total) fail_foreign_index(g, position, indices.view(-1)[position].item<int64_t>(), input_size);
}

// The backward's cells (see max_pool_threads.h), or tile 0 where one thread per pixel serves better.
// TORCH_MANUALGRAD_POOL_CELLS=0 sends every launch to the per-pixel gather (windows.cuh, switched_off).
CellShape backward_cells(const Geometry& g) {
  if (switched_off("TORCH_MANUALGRAD_POOL_CELLS")) return {0, 1, 1};
  return max_pool_cell_shape(g.in_h, g.in_w, g.win.stride_h, g.win.stride_w, g.win.dilation_h, g.win.dilation_w);
}

template <typename index_t>
CellGeo<index_t> cell_geo(const Geometry& g, const CellShape& shape) {
  const Window& w = g.win;
  return CellGeo<index_t>(g.in_h, g.in_w, g.out_h, g.out_w, w.kernel_h, w.kernel_w, w.stride_h, w.stride_w, w.pad_h,
                          w.pad_w, w.dilation_h, w.dilation_w, shape.starts_h, shape.starts_w)
      .with_depth(g.in_d, g.out_d, w.kernel_d, w.stride_d, w.pad_d, w.dilation_d);
}

// How many threads' worth of work the backward launches: one per cell, or one per input element. (Never
// more cells than elements, as each cell holds one at least; fits_int32 is given the count all the same.)
int64_t backward_work(const Geometry& g, const CellShape& shape) {
  if (shape.tile == 0) return g.batch * g.in_channels * g.in_positions();
  const CellGeo<int64_t> cells = cell_geo<int64_t>(g, shape);
  return g.batch * g.in_channels * g.in_d * cells.cells_h * cells.cells_w;
}

template <bool HAS_DEPTH, typename scalar_t, typename index_t>
void launch_max_pool_backward(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& indices,
                              const Geometry& geometry, const CellShape& shape, int64_t total) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  scalar_t* gi = grad_input.data_ptr<scalar_t>();
  const scalar_t* go = grad_output.data_ptr<scalar_t>();
  const int64_t* idx = indices.data_ptr<int64_t>();
  if (shape.tile == 0) {
    max_pool_backward_kernel<HAS_DEPTH, scalar_t, index_t><<<grid_for(total), kThreads, 0, stream>>>(
        gi, go, idx, total, Geo<index_t>(geometry));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const CellGeo<index_t> g = cell_geo<index_t>(geometry, shape);
  const Divider<index_t> by_cells_w(g.cells_w), by_cells_h(g.cells_h), by_in_d(g.in_d);
  const bool launched = dispatch_tile(shape.tile, [&](auto tile) {
    max_pool_backward_cells_kernel<HAS_DEPTH, decltype(tile)::value, scalar_t, index_t>
        <<<grid_for(total), kThreads, 0, stream>>>(gi, go, idx, total, g, by_cells_w, by_cells_h, by_in_d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  TORCH_INTERNAL_ASSERT(launched, "max_pool_backward_cuda: no kernel for cells of tile ", shape.tile);
}

// Calls body(std::bool_constant<HAS_DEPTH>) for a geometry's dimensionality: the kernels of volumes for
// 3-d, those of planes (no depth arithmetic) for 1-d and 2-d.
template <typename Body>
void dispatch_depth(const Geometry& g, const Body& body) {
  if (g.spatial_dims == 3) {
    body(std::true_type());
  } else {
    body(std::false_type());
  }
}

std::tuple<at::Tensor, at::Tensor> max_pool_forward_cuda(const at::Tensor& input_, c10::IntArrayRef kernel_size,
                                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                         c10::IntArrayRef dilation, bool ceil_mode,
                                                         bool compute_indices) {
  const Geometry g = check_max_pool(input_, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::Tensor input = input_.contiguous();                                   // (N, C, [D,] H, W)
  at::Tensor output = at::empty(g.output_shape(g.in_channels), input.options());  // (N, C, [OD,] OH, OW)
  at::Tensor indices = compute_indices ? at::empty(g.output_shape(g.in_channels), input.options().dtype(at::kLong))
                                       : at::empty({0}, input.options().dtype(at::kLong));
  if (output.numel() == 0) return {output, indices};
  const int64_t total = output.numel();
  // Integers too (uint8 to int64), as on the CPU; they have no gradient.
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool_forward_cuda", [&] {
    MANUALGRAD_DISPATCH_INDEX(fits_int32(g, {input.numel(), total}), [&] {
      dispatch_depth(g, [&](auto has_depth) {
        max_pool_forward_kernel<decltype(has_depth)::value, scalar_t, index_t>
            <<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                output.data_ptr<scalar_t>(), compute_indices ? indices.data_ptr<int64_t>() : nullptr,
                input.data_ptr<scalar_t>(), total, Geo<index_t>(g));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
  const at::Tensor grad_output = grad_output_.contiguous();  // (N, C, [OD,] OH, OW)
  const at::Tensor indices = indices_.contiguous();          // (N, C, [OD,] OH, OW)
  at::Tensor grad_input = at::empty(input_size, grad_output.options());  // (N, C, [D,] H, W)
  if (grad_input.numel() == 0) return grad_input;
  // A gather looks for each pixel's gradient only in the windows over it, so an index outside its own
  // window would silently be dropped (where the CPU's scatter would send it). Indices from a direct call
  // are therefore checked first, at a kernel and a host sync; autograd's own call skips it.
  if (check_indices && indices.numel() > 0) check_indices_cuda(indices, g, input_size);
  const CellShape shape = backward_cells(g);
  const int64_t total = backward_work(g, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "max_pool_backward_cuda", [&] {
    MANUALGRAD_DISPATCH_INDEX(fits_int32(g, {grad_input.numel(), grad_output.numel(), total}), [&] {
      dispatch_depth(g, [&](auto has_depth) {
        launch_max_pool_backward<decltype(has_depth)::value, scalar_t, index_t>(grad_input, grad_output, indices, g,
                                                                                shape, total);
      });
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
