// depth_taps.h — a 3-d convolution as a sum of 2-d ones, one per depth tap of its kernel; the same for every
// device, each running it over its own 2-d kernels (cpu/conv_cpu.cpp, cuda/conv_cuda.cu).
//
// Output depth od sees input depth od*stride_d - pad_d + kd*dilation_d through the weight's depth slice kd.
// So for each kd, the input depths that tap reads, stacked as one batch of N*count images, go through a 2-d
// convolution with weight[:, :, kd], and its outputs add into the output depths that read them:
//     output[:, :, od] = bias + sum over kd of conv2d(input[:, :, od*stride_d - pad_d + kd*dilation_d], weight[:, :, kd])
// The backward splits the same way: each tap's 2-d input gradient adds into the depths it read (col2im along
// depth), and its 2-d weight gradient is the slice kd of the weight gradient. Taps are summed one after the
// other in kd order, with no atomics: deterministic on every device, as the 2-d kernels are. Output depths
// a tap's window places in the padding are simply not part of its batch, so no padded copy is ever made.
#pragma once

#include "shape_checks.h"

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace manualgrad {

// One depth tap kd and the output depths [od0, od0 + count) whose window it keeps inside the input: they read
// input depths id0, id0 + stride_d, ..., id0 + (count-1)*stride_d.
struct DepthTap {
  int64_t kd, od0, count, id0;
};

// The output depths of a tap as a run to read: [od0, od0 + count), one after the other.
inline DepthTap outputs_of(const DepthTap& tap) { return {tap.kd, 0, tap.count, tap.od0}; }

inline std::vector<DepthTap> depth_taps(const Geometry& g) {
  std::vector<DepthTap> taps;
  const Window& w = g.win;
  for (int64_t kd = 0; kd < w.kernel_d; ++kd) {
    const int64_t offset = kd * w.dilation_d - w.pad_d;
    int64_t lo, hi;
    outputs_inside(0, g.out_d, offset, w.stride_d, g.in_d, lo, hi);
    if (hi > lo) taps.push_back({kd, lo, hi - lo, lo * w.stride_d + offset});
  }
  return taps;
}

// The 2-d convolution each depth tap is: the window's height and width, the same groups.
struct PlaneArgs {
  std::vector<int64_t> stride, padding, dilation;
  explicit PlaneArgs(const Window& w)
      : stride{w.stride_h, w.stride_w}, padding{w.pad_h, w.pad_w}, dilation{w.dilation_h, w.dilation_w} {}
};

// The input depths a tap reads, (N, C, count, H, W) → (N*count, C, H, W), laid out as `format` asks.
inline at::Tensor tap_images(const at::Tensor& t, const DepthTap& tap, int64_t stride_d, at::MemoryFormat format) {
  const at::Tensor depths = t.slice(2, tap.id0, tap.id0 + (tap.count - 1) * stride_d + 1, stride_d).transpose(1, 2);
  if (t.size(0) == 1 && depths.select(0, 0).is_contiguous(format)) return depths.select(0, 0);  // already images
  const auto s = depths.sizes();
  at::Tensor images = at::empty({s[0] * s[1], s[2], s[3], s[4]}, t.options().memory_format(format));
  images.view(s).copy_(depths);
  return images;
}

// A tap's outputs as the depths they belong to: (N*count, C, H, W) → (N, C, count, H, W), a view.
inline at::Tensor as_depths(const at::Tensor& images, int64_t batch, int64_t count) {
  return images.view({batch, count, images.size(1), images.size(2), images.size(3)}).transpose(1, 2);
}

inline at::MemoryFormat plane_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// forward2d(input, weight, bias, stride, padding, dilation, groups): the device's 2-d convolution op.
template <typename Forward2d>
at::Tensor conv3d_forward_by_depth(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const Geometry& g, bool channels_last,
                                   const Forward2d& forward2d) {
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
  at::Tensor output = at::empty(g.output_shape(g.conv_output_channels()), input.options().memory_format(format));
  if (g.empty()) return output;
  const std::vector<DepthTap> taps = depth_taps(g);
  const PlaneArgs args(g.win);
  const bool has_bias = bias.has_value() && bias->defined();
  // A tap that reaches every output depth goes first, carrying the bias, and is copied in: no fill, no add.
  size_t first = taps.size();
  for (size_t t = 0; t < taps.size() && first == taps.size(); ++t)
    if (taps[t].count == g.out_d) first = t;
  if (first == taps.size()) {
    if (has_bias) {
      output.copy_(bias->view({1, g.out_channels, 1, 1, 1}).expand_as(output));
    } else {
      output.zero_();
    }
  }
  const auto run = [&](const DepthTap& tap, bool copy) {
    const at::Tensor images = tap_images(input, tap, g.win.stride_d, plane_format(channels_last));
    const at::Tensor out = forward2d(images, weight.select(2, tap.kd), copy ? bias : std::nullopt, args.stride,
                                     args.padding, args.dilation, g.groups);
    at::Tensor dst = output.slice(2, tap.od0, tap.od0 + tap.count);
    copy ? dst.copy_(as_depths(out, g.batch, tap.count)) : dst.add_(as_depths(out, g.batch, tap.count));
  };
  if (first < taps.size()) run(taps[first], true);
  for (size_t t = 0; t < taps.size(); ++t)
    if (t != first) run(taps[t], false);
  return output;
}

// backward2d(grad_output, input, weight, stride, padding, dilation, groups, output_mask): the device's 2-d
// convolution backward op. Returns the input and weight gradients as asked by mask (undefined where not);
// the bias gradient, a plain sum over grad_output, is the device's own.
template <typename Backward2d>
std::pair<at::Tensor, at::Tensor> conv3d_backward_by_depth(const at::Tensor& grad_output, const at::Tensor& input,
                                                           const at::Tensor& weight, const Geometry& g,
                                                           bool channels_last, bool want_input, bool want_weight,
                                                           const Backward2d& backward2d) {
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
  // (at::zeros would drop the memory format)
  at::Tensor grad_input = want_input ? at::empty(input.sizes(), input.options().memory_format(format)).zero_() : at::Tensor();
  at::Tensor grad_weight =
      want_weight ? at::empty(weight.sizes(), weight.options().memory_format(format)).zero_() : at::Tensor();
  if (g.empty() || !(want_input || want_weight)) return {grad_input, grad_weight};
  const PlaneArgs args(g.win);
  const auto plane = plane_format(channels_last);
  for (const DepthTap& tap : depth_taps(g)) {
    const at::Tensor deltas = tap_images(grad_output, outputs_of(tap), 1, plane);
    // The input's values matter only for the weight gradient; otherwise an unfilled stand-in gives the shape
    // (and, on the CPU, the layout).
    const at::Tensor images = want_weight ? tap_images(input, tap, g.win.stride_d, plane)
                                          : at::empty({g.batch * tap.count, g.in_channels, g.in_h, g.in_w},
                                                      input.options().memory_format(plane));
    const auto grads = backward2d(deltas, images, weight.select(2, tap.kd), args.stride, args.padding, args.dilation,
                                  g.groups, std::array<bool, 3>{want_input, want_weight, false});
    if (want_input)
      grad_input.slice(2, tap.id0, tap.id0 + (tap.count - 1) * g.win.stride_d + 1, g.win.stride_d)
          .add_(as_depths(std::get<0>(grads), g.batch, tap.count));
    if (want_weight) grad_weight.select(2, tap.kd).copy_(std::get<1>(grads));
  }
  return {grad_input, grad_weight};
}

}  // namespace manualgrad
