// conv_cpu.cpp — convolution forward and backward on the CPU; 1-d runs as 2-d of height 1.
//   forward:      columns = im2col(input[n]);  output[n, g] = weight[g] @ columns[g] (+ bias)
//   grad_weight:  sum over images of grad_output[n, g] @ columns[g]^T — every placement of the kernel
//                 adds input slice × its output delta
//   grad_input:   grad_columns[g] = weight[g]^T @ grad_output[n, g], then col2im adds each placement's
//                 slice back into the image
//   grad_bias:    the sum of the output deltas
// Matrix products are ATen's (at::mm → BLAS); im2col, col2im and the split of the work are ours.
// Deterministic by construction: tasks are cut from the shapes alone (never from the thread count),
// each task runs its BLAS calls single-threaded inside at::parallel_for, and partial weight gradients
// are summed in a fixed order — so results are bit-identical on every run and every thread count.
#include "../shape_checks.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace manualgrad {
namespace {

constexpr int64_t kMinTasks = 8;               // spread a small batch over tiles so all cores work
constexpr int64_t kMinTileColumns = 256;       // ...but keep each GEMM wide enough to run fast
constexpr int64_t kMaxColumnElems = 1 << 22;   // one task's column workspace (4M elements)
constexpr int64_t kMaxPartialElems = 1 << 24;  // all partial weight gradients together
constexpr int64_t kMaxSlots = 8;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Cuts `extent` items into `count` pieces of `size` (the last may be shorter), aiming for `wanted`
// pieces of at least `min_size` items, and at least `forced` pieces. Depends on shapes only.
struct Split {
  int64_t size, count;
};
Split split(int64_t extent, int64_t wanted, int64_t min_size, int64_t forced) {
  int64_t count = std::min(wanted, std::max<int64_t>(1, extent / min_size));
  count = std::min(std::max(count, forced), extent);
  const int64_t size = ceil_div(extent, std::max<int64_t>(count, 1));
  return {size, ceil_div(extent, size)};
}

// Output positions [p0, p1) of one image, walked one output row at a time: f(oh, ow0, ow1, offset)
// where offset is the first position's column in a [*, p1 - p0] buffer.
template <typename F>
void for_each_row_segment(const Geometry& g, int64_t p0, int64_t p1, const F& f) {
  for (int64_t p = p0; p < p1;) {
    const int64_t oh = p / g.out_w, ow0 = p % g.out_w;
    const int64_t ow1 = std::min(g.out_w, ow0 + (p1 - p));
    f(oh, ow0, ow1, p - p0);
    p += ow1 - ow0;
  }
}

// The output columns ow in [ow0, ow1) whose input column ow*stride + offset lies inside [0, size).
inline std::pair<int64_t, int64_t> inside(int64_t ow0, int64_t ow1, int64_t offset, int64_t stride, int64_t size) {
  const int64_t lo = offset >= 0 ? 0 : ceil_div(-offset, stride);
  const int64_t hi = size - 1 - offset >= 0 ? (size - 1 - offset) / stride + 1 : 0;
  return {std::max(lo, ow0), std::max(std::min(hi, ow1), std::max(lo, ow0))};
}

// columns (channels*KH*KW, p1-p0) ← for each kernel tap (c, i, j), the input pixel it sees at output
// positions p0..p1-1 of one image (channels, H, W); zero where the tap falls in the padding.
template <typename scalar_t>
void im2col(scalar_t* columns, const scalar_t* image, int64_t channels, const Geometry& g, int64_t p0, int64_t p1) {
  const Window2d& w = g.win;
  const int64_t width = p1 - p0;
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* plane = image + c * g.in_h * g.in_w;
    for (int64_t i = 0; i < w.kernel_h; ++i) {
      for (int64_t j = 0; j < w.kernel_w; ++j) {
        scalar_t* row = columns + ((c * w.kernel_h + i) * w.kernel_w + j) * width;
        const int64_t col_offset = j * w.dilation_w - w.pad_w;
        for_each_row_segment(g, p0, p1, [&](int64_t oh, int64_t ow0, int64_t ow1, int64_t at) {
          scalar_t* dst = row + at - ow0;  // dst[ow] is output column ow
          const int64_t ih = oh * w.stride_h - w.pad_h + i * w.dilation_h;
          if (ih < 0 || ih >= g.in_h) {
            std::fill(dst + ow0, dst + ow1, scalar_t(0));
            return;
          }
          const scalar_t* src = plane + ih * g.in_w + col_offset;  // src[ow * stride_w] is its pixel
          const auto [lo, hi] = inside(ow0, ow1, col_offset, w.stride_w, g.in_w);
          std::fill(dst + ow0, dst + lo, scalar_t(0));
          if (w.stride_w == 1) {
            std::memcpy(dst + lo, src + lo, (hi - lo) * sizeof(scalar_t));
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * w.stride_w];
          }
          std::fill(dst + hi, dst + ow1, scalar_t(0));
        });
      }
    }
  }
}

// The mirror of im2col: image (channels, H, W) = sum of every column entry into the pixel it came
// from. Pixels covered by several placements add up, always in the same order.
template <typename scalar_t>
void col2im(scalar_t* image, const scalar_t* columns, int64_t channels, const Geometry& g) {
  const Window2d& w = g.win;
  const int64_t width = g.out_h * g.out_w;
  std::fill(image, image + channels * g.in_h * g.in_w, scalar_t(0));
  for (int64_t c = 0; c < channels; ++c) {
    scalar_t* plane = image + c * g.in_h * g.in_w;
    for (int64_t i = 0; i < w.kernel_h; ++i) {
      for (int64_t j = 0; j < w.kernel_w; ++j) {
        const scalar_t* row = columns + ((c * w.kernel_h + i) * w.kernel_w + j) * width;
        const int64_t col_offset = j * w.dilation_w - w.pad_w;
        for_each_row_segment(g, 0, width, [&](int64_t oh, int64_t ow0, int64_t ow1, int64_t at) {
          const int64_t ih = oh * w.stride_h - w.pad_h + i * w.dilation_h;
          if (ih < 0 || ih >= g.in_h) return;
          const scalar_t* src = row + at - ow0;
          scalar_t* dst = plane + ih * g.in_w + col_offset;
          const auto [lo, hi] = inside(ow0, ow1, col_offset, w.stride_w, g.in_w);
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow * w.stride_w] += src[ow];
        });
      }
    }
  }
}

// A 1×1, stride-1, unpadded convolution is a plain matrix product on the image itself: no im2col.
bool is_pointwise(const Geometry& g) {
  const Window2d& w = g.win;
  return w.kernel_h == 1 && w.kernel_w == 1 && w.stride_h == 1 && w.stride_w == 1 && w.pad_h == 0 && w.pad_w == 0;
}

// The per-group matrices: weight viewed as (out_channels, in_channels/groups * KH * KW).
struct GroupDims {
  int64_t groups, out_per_group, in_per_group, taps, k_per_group, positions;
  explicit GroupDims(const Geometry& g)
      : groups(g.groups),
        out_per_group(g.out_channels / g.groups),
        in_per_group(g.in_channels / g.groups),
        taps(g.win.kernel_h * g.win.kernel_w),
        k_per_group(g.in_channels / g.groups * g.win.kernel_h * g.win.kernel_w),
        positions(g.out_h * g.out_w) {}
};

// The columns of image n for positions [p0, p1): (in_channels*KH*KW, p1-p0), either a view of the
// image itself (pointwise) or im2col written into the front of `workspace`.
at::Tensor image_columns(const at::Tensor& input, int64_t n, const Geometry& g, int64_t p0, int64_t p1,
                         const at::Tensor& workspace) {
  const GroupDims d(g);
  if (is_pointwise(g)) return input[n].view({g.in_channels, d.positions}).narrow(1, p0, p1 - p0);
  const int64_t rows = g.in_channels * d.taps;
  at::Tensor columns = workspace.narrow(0, 0, rows * (p1 - p0)).view({rows, p1 - p0});
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "im2col", [&] {
    im2col(columns.data_ptr<scalar_t>(), input[n].data_ptr<scalar_t>(), g.in_channels, g, p0, p1);
  });
  return columns;
}

// Room for one tile's columns (nothing for pointwise convolutions, which need none).
at::Tensor column_workspace(const at::Tensor& input, const Geometry& g, int64_t tile) {
  const int64_t elems = is_pointwise(g) ? 0 : g.in_channels * g.win.kernel_h * g.win.kernel_w * tile;
  return at::empty({elems}, input.options());
}

// Forward and weight-gradient tasks: (image, tile of output positions).
Split position_tiles(const Geometry& g) {
  const GroupDims d(g);
  return split(d.positions, ceil_div(kMinTasks, g.batch), kMinTileColumns,
               ceil_div(g.in_channels * d.taps * d.positions, kMaxColumnElems));
}

at::Tensor conv_forward_cpu(const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                            int64_t groups) {
  const Geometry g = check_conv(input_, weight_, bias, stride, padding, dilation, groups);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner ATen calls are plain arithmetic
  const at::Tensor input = input_.contiguous();  // (N, C_in, H, W)
  const GroupDims d(g);
  const at::Tensor weight = weight_.contiguous().view({g.out_channels, d.k_per_group});  // (C_out, K/g)
  at::Tensor output = at::empty(g.output_shape(g.out_channels), input.options());        // (N, C_out, OH, OW)
  if (g.batch == 0) return output;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_column = has_bias ? bias->contiguous().view({g.out_channels, 1}) : at::Tensor();

  const Split tiles = position_tiles(g);
  at::parallel_for(0, g.batch * tiles.count, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor workspace = column_workspace(input, g, tiles.size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tiles.count, p0 = (task % tiles.count) * tiles.size;
      const int64_t p1 = std::min(d.positions, p0 + tiles.size);
      const at::Tensor columns = image_columns(input, n, g, p0, p1, workspace);
      const at::Tensor out = output[n].view({g.out_channels, d.positions}).narrow(1, p0, p1 - p0);
      for (int64_t grp = 0; grp < d.groups; ++grp) {
        at::Tensor out_g = out.narrow(0, grp * d.out_per_group, d.out_per_group);
        const at::Tensor weight_g = weight.narrow(0, grp * d.out_per_group, d.out_per_group);
        const at::Tensor columns_g = columns.narrow(0, grp * d.k_per_group, d.k_per_group);
        if (has_bias) {
          out_g.copy_(bias_column.narrow(0, grp * d.out_per_group, d.out_per_group).expand_as(out_g));
          out_g.addmm_(weight_g, columns_g);
        } else {
          at::mm_out(out_g, weight_g, columns_g);
        }
      }
    }
  });
  return output;
}

// grad_input[n] for a block of one group's input channels: grad_columns = weight^T @ grad_output,
// then col2im. Blocks own disjoint channels, so they run in parallel without sharing a pixel.
void conv_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                             const Geometry& g) {
  const GroupDims d(g);
  const Split blocks = split(d.in_per_group, ceil_div(kMinTasks, g.batch * d.groups), 1,
                             ceil_div(d.k_per_group * d.positions, kMaxColumnElems));
  const int64_t per_image = d.groups * blocks.count;
  at::parallel_for(0, g.batch * per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / per_image, grp = (task % per_image) / blocks.count;
      const int64_t c0 = (task % blocks.count) * blocks.size;
      const int64_t cb = std::min(d.in_per_group, c0 + blocks.size) - c0;
      const at::Tensor weight_block =  // (C_out/g, cb*KH*KW): this block's taps of this group's filters
          weight.narrow(0, grp * d.out_per_group, d.out_per_group).narrow(1, c0 * d.taps, cb * d.taps);
      const at::Tensor grad_out_g =  // (C_out/g, OH*OW)
          grad_output[n].view({g.out_channels, d.positions}).narrow(0, grp * d.out_per_group, d.out_per_group);
      at::Tensor grad_image = grad_input[n].view({g.in_channels, g.in_h * g.in_w}).narrow(0, grp * d.in_per_group + c0, cb);
      if (is_pointwise(g)) {
        at::mm_out(grad_image, weight_block.t(), grad_out_g);
        continue;
      }
      const at::Tensor grad_columns = at::mm(weight_block.t(), grad_out_g);  // (cb*KH*KW, OH*OW)
      AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "col2im", [&] {
        col2im(grad_image.data_ptr<scalar_t>(), grad_columns.data_ptr<scalar_t>(), cb, g);
      });
    }
  });
}

// grad_weight = sum over (image, tile) tasks of grad_output_tile @ columns_tile^T. Task t adds into
// partial slot t % slots, in task order; then the slots are added in slot order.
void conv_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                              const Geometry& g) {
  const GroupDims d(g);
  const Split tiles = position_tiles(g);
  const int64_t tasks = g.batch * tiles.count;
  const int64_t slots = std::max<int64_t>(1, std::min({tasks, kMaxSlots, kMaxPartialElems / grad_weight.numel()}));
  at::Tensor partial = at::zeros({slots, g.out_channels, d.k_per_group}, grad_weight.options());
  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor workspace = column_workspace(input, g, tiles.size);
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t task = slot; task < tasks; task += slots) {
        const int64_t n = task / tiles.count, p0 = (task % tiles.count) * tiles.size;
        const int64_t p1 = std::min(d.positions, p0 + tiles.size);
        const at::Tensor columns = image_columns(input, n, g, p0, p1, workspace);
        const at::Tensor grad_out = grad_output[n].view({g.out_channels, d.positions}).narrow(1, p0, p1 - p0);
        for (int64_t grp = 0; grp < d.groups; ++grp) {
          partial[slot]
              .narrow(0, grp * d.out_per_group, d.out_per_group)
              .addmm_(grad_out.narrow(0, grp * d.out_per_group, d.out_per_group),
                      columns.narrow(0, grp * d.k_per_group, d.k_per_group).t());
        }
      }
    }
  });
  at::Tensor flat = grad_weight.view({g.out_channels, d.k_per_group});
  flat.copy_(partial[0]);
  for (int64_t slot = 1; slot < slots; ++slot) flat.add_(partial[slot]);
}

// grad_bias[c] = sum over images and positions of grad_output[n, c], one channel per task.
void conv_backward_bias_cpu(at::Tensor& grad_bias, const at::Tensor& grad_output, const Geometry& g) {
  const int64_t positions = g.out_h * g.out_w;
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "conv_backward_bias", [&] {
    const scalar_t* go = grad_output.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    at::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sum = 0;  // double: the sum runs over batch × positions terms
        for (int64_t n = 0; n < g.batch; ++n) {
          const scalar_t* plane = go + (n * g.out_channels + c) * positions;
          for (int64_t p = 0; p < positions; ++p) sum += plane[p];
        }
        gb[c] = static_cast<scalar_t>(sum);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const Geometry g = check_conv(input_, weight_, std::nullopt, stride, padding, dilation, groups);
  check_conv_grad_output(grad_output_, input_, g);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad_output = grad_output_.contiguous();  // (N, C_out, OH, OW)
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    grad_input = at::empty(input_.sizes(), input_.options());  // (N, C_in, H, W)
    const at::Tensor weight = weight_.contiguous().view({g.out_channels, GroupDims(g).k_per_group});
    if (g.batch > 0) conv_backward_input_cpu(grad_input, grad_output, weight, g);
  }
  if (output_mask[1]) {
    grad_weight = at::zeros(weight_.sizes(), weight_.options());  // (C_out, C_in/g, KH, KW)
    if (g.batch > 0) conv_backward_weight_cpu(grad_weight, grad_output, input_.contiguous(), g);
  }
  if (output_mask[2]) {
    grad_bias = at::empty({g.out_channels}, grad_output.options());
    conv_backward_bias_cpu(grad_bias, grad_output, g);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(manualgrad, CPU, m) {
  m.impl("conv_forward", &conv_forward_cpu);
  m.impl("conv_backward", &conv_backward_cpu);
}

}  // namespace manualgrad
