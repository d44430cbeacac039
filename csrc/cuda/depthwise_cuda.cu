// depthwise_cuda.cu — depthwise convolution (groups == in_channels) on CUDA without im2col; the
// mirror of cpu/depthwise_cpu.cpp. Output channel oc reads input channel oc / multiplier.
//   forward:      a dot product over the KH*KW taps (+ bias) per output; for the common windows unrolled
//                 and, at stride_h = dilation_h = 1, a column of kColumnRows outputs per thread sharing
//                 their input rows (depthwise_threads.h, also tested on the host); else one per thread
//   grad_input:   one thread per input element, gathering weight × delta from every window over it,
//                 unrolled for the common windows
//   grad_weight:  per output channel, the sum over all placements of input slice × delta: blocks cut
//                 the placements into fixed slices, each thread keeps one sum per tap in registers,
//                 and the slices' sums are added in a fixed order — deterministic, no atomics.
#include "depthwise_cuda.h"
#include "depthwise_threads.h"
#include "windows.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>

namespace manualgrad {
namespace {

// One thread per output element; KH, KW > 0 for the common windows (unrolled; at stride_h = dilation_h =
// 1 these take the column kernel below unless switched off), 0 for any other.
template <typename scalar_t, typename index_t, int KH, int KW>
__global__ void depthwise_forward_kernel(scalar_t* __restrict__ output, const scalar_t* __restrict__ input,
                                         const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                                         int64_t total, index_t out_channels, index_t multiplier, Geo<index_t> g,
                                         Divider<index_t> by_out_channels, Divider<index_t> by_multiplier) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t taps = g.kernel_h * g.kernel_w, in_channels = out_channels / multiplier;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const index_t x = static_cast<index_t>(e);
    index_t oh, ow;
    const index_t n_oc = g.split_output(x, oh, ow);  // n*C_out + oc
    index_t oc;
    const index_t in_plane = depthwise_input_plane(n_oc, out_channels, in_channels, by_out_channels, by_multiplier, oc);
    const scalar_t* plane = input + in_plane * g.in_h * g.in_w;
    const acc_t start = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
    output[e] = static_cast<scalar_t>(depthwise_output<KH, KW>(plane, weight + oc * taps, g, oh, ow, start));
  }
}

// One thread per column of kColumnRows outputs (stride_h = dilation_h = 1, the unrolled windows); `total`
// counts threads: planes * column_blocks * out_w.
template <typename scalar_t, typename index_t, int KH, int KW>
__global__ void depthwise_forward_columns_kernel(scalar_t* __restrict__ output, const scalar_t* __restrict__ input,
                                                 const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                                                 int64_t total, index_t out_channels, index_t multiplier,
                                                 index_t column_blocks, Geo<index_t> g,
                                                 Divider<index_t> by_column_blocks, Divider<index_t> by_out_channels,
                                                 Divider<index_t> by_multiplier) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t in_channels = out_channels / multiplier;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    index_t oh0, ow, oc;
    const index_t n_oc =
        depthwise_column_of_thread(static_cast<index_t>(e), g.out_w, column_blocks, g.by_out_w, by_column_blocks, oh0, ow);
    const index_t in_plane = depthwise_input_plane(n_oc, out_channels, in_channels, by_out_channels, by_multiplier, oc);
    const acc_t start = bias != nullptr ? static_cast<acc_t>(bias[oc]) : acc_t(0);
    depthwise_output_column<KH, KW>(output + n_oc * g.out_h * g.out_w + ow, input + in_plane * g.in_h * g.in_w,
                                    weight + oc * (KH * KW), g, oh0, ow, start);
  }
}

// One thread per input element, gathering from each of its channel's `multiplier` output channels in
// turn; KH, KW > 0 for the common windows (unrolled), 0 for any other.
template <typename scalar_t, typename index_t, int KH, int KW>
__global__ void depthwise_backward_input_kernel(scalar_t* __restrict__ grad_input,
                                                const scalar_t* __restrict__ grad_output,
                                                const scalar_t* __restrict__ weight, int64_t total,
                                                index_t in_channels, index_t multiplier, Geo<index_t> g,
                                                Divider<index_t> by_in_channels) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t taps = g.kernel_h * g.kernel_w, out_plane = g.out_h * g.out_w;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const index_t x = static_cast<index_t>(e);
    index_t ih, iw;
    const index_t nc = g.split_input(x, ih, iw);  // n*C_in + c
    const index_t c = depthwise_channel(nc, in_channels, by_in_channels);
    acc_t sum = 0;
    for (index_t q = 0; q < multiplier; ++q) {
      const index_t oc = c * multiplier + q;
      const scalar_t* go = grad_output + (nc * multiplier + q) * out_plane;  // (n, oc) = n*C_out + c*m + q
      sum = depthwise_input_gradient<KH, KW>(go, weight + oc * taps, g, ih, iw, sum);
    }
    grad_input[e] = static_cast<scalar_t>(sum);
  }
}

// Block (oc, s) sums input slice × delta over its slice s of the N*OH*OW placements into
// partial[(oc*splits + s)*taps + t]. KH, KW are compile-time so the KH*KW sums stay in registers.
template <typename scalar_t, typename acc_t, typename index_t, int KH, int KW>
__global__ void depthwise_weight_partial_kernel(acc_t* __restrict__ partial, const scalar_t* __restrict__ grad_output,
                                                const scalar_t* __restrict__ input, index_t batch,
                                                index_t out_channels, index_t multiplier, Geo<index_t> g) {
  constexpr int kTaps = KH * KW;
  constexpr int kWarps = kThreads / 32;
  __shared__ acc_t warp_sums[kWarps][kTaps];
  const index_t oc = blockIdx.x;
  const int64_t splits = gridDim.y, s = blockIdx.y;
  const index_t in_channels = out_channels / multiplier, out_plane = g.out_h * g.out_w;
  const int64_t placements = int64_t{batch} * out_plane, per_split = ceil_div(placements, splits);
  const int64_t begin = s * per_split, end = std::min(begin + per_split, placements);
  acc_t sums[kTaps];
#pragma unroll
  for (int t = 0; t < kTaps; ++t) sums[t] = 0;
  for (int64_t p64 = begin + threadIdx.x; p64 < end; p64 += blockDim.x) {
    const index_t p = static_cast<index_t>(p64), o = p % out_plane, n = p / out_plane;
    const index_t oh = o / g.out_w, ow = o % g.out_w;
    const acc_t delta = static_cast<acc_t>(grad_output[(n * out_channels + oc) * out_plane + o]);
    const scalar_t* plane = input + (n * in_channels + oc / multiplier) * g.in_h * g.in_w;
    const index_t h0 = oh * g.stride_h - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
#pragma unroll
    for (int i = 0; i < KH; ++i) {
      const index_t ih = h0 + i * g.dilation_h;
      const bool row_inside = ih >= 0 && ih < g.in_h;
#pragma unroll
      for (int j = 0; j < KW; ++j) {
        const index_t iw = w0 + j * g.dilation_w;
        if (row_inside && iw >= 0 && iw < g.in_w) sums[i * KW + j] += delta * static_cast<acc_t>(plane[ih * g.in_w + iw]);
      }
    }
  }
  // Reduce each tap's sums over the block in a fixed tree: within warps by shuffles, then across warps.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int t = 0; t < kTaps; ++t) {
    acc_t v = sums[t];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp][t] = v;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < kTaps; t += blockDim.x) {
    acc_t v = 0;
    for (int w = 0; w < kWarps; ++w) v += warp_sums[w][t];
    partial[(oc * splits + s) * kTaps + t] = v;
  }
}

// grad_weight[oc, t] = the sum of the splits' partial sums, in split order.
template <typename scalar_t, typename acc_t>
__global__ void depthwise_weight_finish_kernel(scalar_t* __restrict__ grad_weight, const acc_t* __restrict__ partial,
                                               int64_t total, int64_t splits, int64_t taps) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const int64_t oc = e / taps, t = e % taps;
    acc_t v = 0;
    for (int64_t s = 0; s < splits; ++s) v += partial[(oc * splits + s) * taps + t];
    grad_weight[e] = static_cast<scalar_t>(v);
  }
}

}  // namespace

void depthwise_forward_cuda(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, const Geometry& g) {
  const int64_t total = output.numel(), multiplier = g.out_channels / g.in_channels;
  const int64_t column_blocks = depthwise_column_blocks(g.out_h);
  const int64_t column_threads = g.batch * g.out_channels * column_blocks * g.out_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "depthwise_forward_cuda", [&] {
    MANUALGRAD_DISPATCH_INDEX(fits_int32(g, {input.numel(), total, weight.numel(), column_threads}), [&] {
      const Geo<index_t> geo(g);
      const auto launch = [&](auto kh, auto kw) {
        constexpr int KH = decltype(kh)::value, KW = decltype(kw)::value;
        const scalar_t* bias_ptr = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
        if constexpr (KH > 0) {
          // TORCH_MANUALGRAD_DEPTHWISE_COLUMNS=0 keeps one output per thread (windows.cuh, switched_off).
          if (depthwise_by_columns(geo) && !switched_off("TORCH_MANUALGRAD_DEPTHWISE_COLUMNS")) {
            depthwise_forward_columns_kernel<scalar_t, index_t, KH, KW>
                <<<grid_for(column_threads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                    output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias_ptr,
                    column_threads, static_cast<index_t>(g.out_channels), static_cast<index_t>(multiplier),
                    static_cast<index_t>(column_blocks), geo, Divider<index_t>(column_blocks),
                    Divider<index_t>(g.out_channels), Divider<index_t>(multiplier));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
        }
        depthwise_forward_kernel<scalar_t, index_t, KH, KW>
            <<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias_ptr, total,
                static_cast<index_t>(g.out_channels), static_cast<index_t>(multiplier), geo,
                Divider<index_t>(g.out_channels), Divider<index_t>(multiplier));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (!dispatch_window(g.win.kernel_h, g.win.kernel_w, launch)) launch(Int<0>(), Int<0>());
    });
  });
}

void depthwise_backward_input_cuda(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                   const Geometry& g) {
  const int64_t total = grad_input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "depthwise_backward_input_cuda", [&] {
    MANUALGRAD_DISPATCH_INDEX(fits_int32(g, {total, grad_output.numel(), weight.numel()}), [&] {
      const auto launch = [&](auto kh, auto kw) {
        constexpr int KH = decltype(kh)::value, KW = decltype(kw)::value;
        depthwise_backward_input_kernel<scalar_t, index_t, KH, KW>
            <<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                grad_input.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), total,
                static_cast<index_t>(g.in_channels), static_cast<index_t>(g.out_channels / g.in_channels),
                Geo<index_t>(g), Divider<index_t>(g.in_channels));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (!dispatch_window(g.win.kernel_h, g.win.kernel_w, launch)) launch(Int<0>(), Int<0>());
    });
  });
}

bool depthwise_weight_grad_supported(const Geometry& g) {
  return dispatch_window(g.win.kernel_h, g.win.kernel_w, [](auto, auto) {});
}

void depthwise_backward_weight_cuda(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                    const Geometry& g) {
  const int64_t taps = g.win.kernel_h * g.win.kernel_w, placements = g.batch * g.out_h * g.out_w;
  // About four blocks per multiprocessor in all, each with at least a block's worth of placements.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>({ceil_div(4 * sms, g.out_channels), ceil_div(placements, kThreads), 65535}));
  const auto dtype = grad_output.scalar_type();
  at::Tensor partial = at::empty({g.out_channels * splits * taps}, grad_output.options().dtype(at::toOpMathType(dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "depthwise_backward_weight_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    MANUALGRAD_DISPATCH_INDEX(fits_int32(g, {input.numel(), grad_output.numel()}), [&] {
      const bool launched = dispatch_window(g.win.kernel_h, g.win.kernel_w, [&](auto kh, auto kw) {
        constexpr int KH = decltype(kh)::value, KW = decltype(kw)::value;
        const dim3 grid(static_cast<unsigned>(g.out_channels), static_cast<unsigned>(splits));
        depthwise_weight_partial_kernel<scalar_t, acc_t, index_t, KH, KW>
            <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                partial.data_ptr<acc_t>(), grad_output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(),
                static_cast<index_t>(g.batch), static_cast<index_t>(g.out_channels),
                static_cast<index_t>(g.out_channels / g.in_channels), Geo<index_t>(g));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      TORCH_INTERNAL_ASSERT(launched, "depthwise_backward_weight_cuda: no kernel for this window size");
    });
    const int64_t total = g.out_channels * taps;
    depthwise_weight_finish_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_weight.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), total, splits, taps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace manualgrad
