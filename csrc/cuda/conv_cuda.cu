// conv_cuda.cu — convolution forward and backward on CUDA; the mirror of cpu/conv_cpu.cpp.
//   forward:      columns = im2col(input chunk);  output[n, g] = weight[g] @ columns[n, g] (+ bias)
//   grad_weight:  sum over the chunk's images of grad_output[n, g] @ columns[n, g]^T, as one GEMM per
//                 chunk over (images × positions), chunks added in order
//   grad_input:   grad_columns = weight^T @ grad_output, then col2im as a gather: one thread per input
//                 element sums the column entries that came from it
//   grad_bias:    the sum of grad_output over batch and positions
// conv3d is a sum over the kernel's depth taps of the 2-d convolutions above (depth_taps.h).
// Matrix products are ATen's (at::bmm / baddbmm_ → cuBLAS). Nothing is accumulated with atomics, so
// results are bit-identical from run to run. Images are processed in chunks whose columns stay under
// kMaxColumnElems, so the 2-d workspace is bounded whatever the batch; a 3-d convolution holds besides one
// depth tap's images and outputs at a time (about the input's and the output's size).
#include "../depth_taps.h"
#include "../shape_checks.h"
#include "depthwise_cuda.h"
#include "windows.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace manualgrad {
namespace {

constexpr int64_t kMaxColumnElems = int64_t{1} << 26;  // one chunk's columns: 64M elements

// columns[k*image_stride + r*row_stride + l] ← for image k of the chunk, kernel tap r = (c, i, j) and
// output position l, the input pixel that tap sees there (0 in the padding). One thread per (image,
// channel, position) writes that position's KH*KW taps: the index arithmetic is paid once per
// position rather than once per entry, and neighbouring threads write neighbouring l (coalesced).
template <typename scalar_t, typename index_t>
__global__ void im2col_kernel(scalar_t* __restrict__ columns, const scalar_t* __restrict__ input, int64_t total,
                              index_t channels, Geo<index_t> g, index_t row_stride, index_t image_stride) {
  const index_t positions = g.out_h * g.out_w, taps = g.kernel_h * g.kernel_w;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const index_t x = static_cast<index_t>(e);
    const index_t l = x % positions, kc = x / positions, c = kc % channels, k = kc / channels;
    const index_t oh = g.by_out_w.div(l), ow = l - oh * g.out_w;
    const index_t h0 = oh * g.stride_h - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
    const scalar_t* plane = input + kc * g.in_h * g.in_w;  // kc = k*channels + c: this image's channel c
    scalar_t* out = columns + k * image_stride + c * taps * row_stride + l;
    for (index_t i = 0; i < g.kernel_h; ++i) {
      const index_t ih = h0 + i * g.dilation_h;
      const bool row_inside = ih >= 0 && ih < g.in_h;
      for (index_t j = 0; j < g.kernel_w; ++j) {
        const index_t iw = w0 + j * g.dilation_w;
        *out = row_inside && iw >= 0 && iw < g.in_w ? plane[ih * g.in_w + iw] : scalar_t(0);
        out += row_stride;
      }
    }
  }
}

// The mirror of im2col as a gather: grad_input[k, c, ih, iw] = the sum of the column entries, laid out
// (images, channels*KH*KW, OH*OW), of every placement that saw pixel (ih, iw). One thread per pixel,
// windows visited in a fixed order: no atomics, deterministic.
template <typename scalar_t, typename index_t>
__global__ void col2im_kernel(scalar_t* __restrict__ grad_input, const scalar_t* __restrict__ columns, int64_t total,
                              Geo<index_t> g) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t positions = g.out_h * g.out_w, taps = g.kernel_h * g.kernel_w;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total; e += int64_t{blockDim.x} * gridDim.x) {
    const index_t x = static_cast<index_t>(e);
    index_t ih, iw;
    const index_t kc = g.split_input(x, ih, iw);  // kc = k*channels + c
    const scalar_t* rows = columns + kc * taps * positions;
    acc_t sum = 0;
    for_each_covering_window(g, ih, iw, [&](index_t i, index_t j, index_t o) {
      sum += static_cast<acc_t>(rows[(i * g.kernel_w + j) * positions + o]);
    });
    grad_input[e] = static_cast<scalar_t>(sum);
  }
}

// im2col for images [n0, n0 + images) into columns with the given strides (see im2col_kernel).
void im2col_cuda(at::Tensor& columns, const at::Tensor& input, int64_t n0, int64_t images, const Geometry& g,
                 int64_t row_stride, int64_t image_stride) {
  const int64_t total = images * g.in_channels * g.out_h * g.out_w;
  const at::Tensor chunk = input.narrow(0, n0, images);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "im2col_cuda", [&] {
    MANUALGRAD_DISPATCH_INDEX(fits_int32(g, {chunk.numel(), columns.numel()}), [&] {
      im2col_kernel<scalar_t, index_t><<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          columns.data_ptr<scalar_t>(), chunk.data_ptr<scalar_t>(), total, static_cast<index_t>(g.in_channels),
          Geo<index_t>(g), static_cast<index_t>(row_stride), static_cast<index_t>(image_stride));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void col2im_cuda(at::Tensor& grad_input, const at::Tensor& columns, int64_t n0, int64_t images, const Geometry& g) {
  const at::Tensor chunk = grad_input.narrow(0, n0, images);
  const int64_t total = chunk.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, columns.scalar_type(), "col2im_cuda", [&] {
    MANUALGRAD_DISPATCH_INDEX(fits_int32(g, {total, columns.numel()}), [&] {
      col2im_kernel<scalar_t, index_t><<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          chunk.data_ptr<scalar_t>(), columns.data_ptr<scalar_t>(), total, Geo<index_t>(g));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// Images per chunk: as many as keep the chunk's columns under kMaxColumnElems (at least one).
int64_t chunk_images(const Geometry& g) {
  const int64_t per_image = g.in_channels * g.win.kernel_h * g.win.kernel_w * g.out_h * g.out_w;
  return std::max<int64_t>(1, std::min(g.batch, kMaxColumnElems / std::max<int64_t>(1, per_image)));
}

// m (G, R, C) repeated for each of `images` images as one (images*G, R, C) batch: a stride-0 view when
// G == 1, a copy otherwise (the weight is small beside the columns).
at::Tensor per_image(const at::Tensor& m, int64_t images) {
  if (m.size(0) == 1) return m.expand({images, m.size(1), m.size(2)});
  return m.unsqueeze(0).expand({images, m.size(0), m.size(1), m.size(2)}).reshape({-1, m.size(1), m.size(2)});
}

// The bias gradient: grad_output (N, C_out, *spatial) summed over all but its channels; half types are
// summed in float32 and rounded once.
at::Tensor conv_backward_bias_cuda(const at::Tensor& grad_output, const Geometry& g) {
  if (g.no_input_channels())  // an output with no channels (torch's): the bias never reached it
    return at::zeros({g.out_channels}, grad_output.options());
  std::vector<int64_t> dims = {0};
  for (int64_t i = 2; i < grad_output.dim(); ++i) dims.push_back(i);
  const auto dtype = grad_output.scalar_type();
  return grad_output.sum(dims, /*keepdim=*/false, at::toOpMathType(dtype)).to(dtype);
}

at::Tensor conv_forward_cuda(const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias,
                             c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                             int64_t groups) {
  const Geometry g = check_conv(input_, weight_, bias, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner ATen calls are plain arithmetic
  if (g.spatial_dims == 3 && is_reduced_precision(input_.scalar_type())) {
    // The depth taps' partial sums are added in float32 and rounded once at the end, not once per tap.
    const auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    const std::optional<at::Tensor> bias_f = bias.has_value() && bias->defined() ? std::optional(f(*bias)) : std::nullopt;
    return conv_forward_cuda(f(input_), f(weight_), bias_f, stride, padding, dilation, groups).to(input_.scalar_type());
  }
  if (g.spatial_dims == 3)  // a sum of 2-d convolutions over the kernel's depth taps (depth_taps.h)
    return conv3d_forward_by_depth(input_, weight_, bias, g, /*channels_last=*/false, conv_forward_cuda);
  const at::Tensor input = input_.contiguous();  // (N, C_in, H, W)
  const GroupDims d(g);
  const at::Tensor weight = weight_.contiguous().view({d.groups, d.out_per_group, d.k_per_group});  // (G, C_out/G, K/G)
  at::Tensor output = at::empty(g.output_shape(g.conv_output_channels()), input.options());  // (N, C_out, OH, OW)
  if (g.empty()) return output;
  if (is_depthwise(g)) {
    const bool has_bias = bias.has_value() && bias->defined();
    depthwise_forward_cuda(output, input, weight_.contiguous(), has_bias ? bias->contiguous() : at::Tensor(), g);
    return output;
  }
  const int64_t chunk = chunk_images(g);
  at::Tensor columns;  // (chunk, C_in*KH*KW, OH*OW)
  if (!is_pointwise(g)) columns = at::empty({chunk, g.in_channels * d.taps, d.positions}, input.options());
  for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
    const int64_t images = std::min(chunk, g.batch - n0);
    at::Tensor cols;
    if (is_pointwise(g)) {
      cols = input.narrow(0, n0, images).view({images * d.groups, d.k_per_group, d.positions});
    } else {
      at::Tensor part = columns.narrow(0, 0, images);
      im2col_cuda(part, input, n0, images, g, d.positions, g.in_channels * d.taps * d.positions);
      cols = part.view({images * d.groups, d.k_per_group, d.positions});
    }
    at::Tensor out = output.narrow(0, n0, images).view({images * d.groups, d.out_per_group, d.positions});
    at::bmm_out(out, per_image(weight, images), cols);
  }
  if (bias.has_value() && bias->defined()) {
    std::vector<int64_t> shape(output.dim(), 1);
    shape[1] = g.out_channels;
    output.add_(bias->view(shape));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_cuda(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const Geometry g = check_conv(input_, weight_, std::nullopt, stride, padding, dilation, groups);
  check_conv_grad_output(grad_output_, input_, g);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (g.spatial_dims == 3 && is_reduced_precision(input_.scalar_type())) {  // as the forward: rounded once
    const auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto grads = conv_backward_cuda(f(grad_output_), f(input_), f(weight_), stride, padding, dilation, groups, output_mask);
    const auto back = [&](const at::Tensor& t) { return t.defined() ? t.to(input_.scalar_type()) : t; };
    return {back(std::get<0>(grads)), back(std::get<1>(grads)), back(std::get<2>(grads))};
  }
  if (g.spatial_dims == 3) {  // a sum of 2-d convolutions over the kernel's depth taps (depth_taps.h)
    auto [grad_input, grad_weight] = conv3d_backward_by_depth(grad_output_, input_, weight_, g, /*channels_last=*/false,
                                                              output_mask[0], output_mask[1], conv_backward_cuda);
    const at::Tensor grad_bias = output_mask[2] ? conv_backward_bias_cuda(grad_output_, g) : at::Tensor();
    return {grad_input, grad_weight, grad_bias};
  }
  const GroupDims d(g);
  const at::Tensor grad_output = grad_output_.contiguous();  // (N, C_out, OH, OW)
  const at::Tensor input = input_.contiguous();              // (N, C_in, H, W)
  const at::Tensor weight = weight_.contiguous().view({d.groups, d.out_per_group, d.k_per_group});
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) grad_input = at::empty(input.sizes(), input.options());
  if (output_mask[1]) grad_weight = at::zeros(weight_.sizes(), weight_.options());  // stays 0 for batch 0
  // Depthwise layers take the direct kernels (depthwise_cuda.cu), where they apply, and skip the GEMMs.
  const bool depthwise = !g.empty() && is_depthwise(g);
  std::array<bool, 3> todo = output_mask;
  if (depthwise && todo[0]) {
    depthwise_backward_input_cuda(grad_input, grad_output, weight_.contiguous(), g);
    todo[0] = false;
  }
  if (depthwise && todo[1] && depthwise_weight_grad_supported(g)) {
    depthwise_backward_weight_cuda(grad_weight, grad_output, input, g);
    todo[1] = false;
  }
  const int64_t chunk = chunk_images(g);
  const at::Tensor weight_t = weight.transpose(1, 2);  // (G, K/G, C_out/G)
  for (int64_t n0 = 0; !g.empty() && n0 < g.batch && (todo[0] || todo[1]); n0 += chunk) {
    const int64_t images = std::min(chunk, g.batch - n0);
    const at::Tensor grad_out = grad_output.narrow(0, n0, images);  // (images, C_out, OH, OW)
    if (todo[0]) {
      const at::Tensor go = grad_out.view({images * d.groups, d.out_per_group, d.positions});
      if (is_pointwise(g)) {
        at::Tensor gi = grad_input.narrow(0, n0, images).view({images * d.groups, d.k_per_group, d.positions});
        at::bmm_out(gi, per_image(weight_t, images), go);
      } else {
        const at::Tensor grad_columns = at::bmm(per_image(weight_t, images), go);  // (images*G, K/G, OH*OW)
        col2im_cuda(grad_input, grad_columns, n0, images, g);
      }
    }
    if (todo[1]) {
      // One GEMM per group over all the chunk's placements: columns laid out (C_in*KH*KW, images, OH*OW)
      at::Tensor cols;
      if (is_pointwise(g)) {
        cols = input.narrow(0, n0, images).view({images, g.in_channels, d.positions}).transpose(0, 1).reshape(
            {d.groups, d.k_per_group, images * d.positions});
      } else {
        cols = at::empty({g.in_channels * d.taps, images, d.positions}, input.options());
        im2col_cuda(cols, input, n0, images, g, images * d.positions, d.positions);
        cols = cols.view({d.groups, d.k_per_group, images * d.positions});
      }
      const at::Tensor go = grad_out.view({images, g.out_channels, d.positions}).transpose(0, 1).reshape(
          {d.groups, d.out_per_group, images * d.positions});
      grad_weight.view({d.groups, d.out_per_group, d.k_per_group}).baddbmm_(go, cols.transpose(1, 2));
    }
  }
  if (output_mask[2]) grad_bias = conv_backward_bias_cuda(grad_output, g);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(manualgrad, CUDA, m) {
  m.impl("conv_forward", &conv_forward_cuda);
  m.impl("conv_backward", &conv_backward_cuda);
}

}  // namespace manualgrad
