// shape_checks.h — the one place that checks the arguments of every op and computes output sizes.
// Used by the CPU and CUDA kernels, forward and backward alike; kernels call these first and then
// trust their inputs. Where torch has a message for a condition, ours starts with torch's text (PyTorch's
// own tests match it) and then names the argument and its value; elsewhere ours alone does.
#pragma once

#include "host_device.h"  // small helpers here are shared with CUDA kernels
#include "window_taps.h"

#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <vector>

namespace manualgrad {

// A conv or pool window in up to three dimensions (depth, height, width). A problem of fewer dimensions
// leaves the leading ones at size 1 (kernel, stride and dilation 1, no padding): a 1-d problem is a 2-d
// one of height 1, and a 2-d one a 3-d one of depth 1, so the 2-d kernels serve 1-d too, and every
// rank shares these checks and output-size formulas.
struct Window {
  int64_t kernel_d = 1, kernel_h = 1, kernel_w = 1;
  int64_t stride_d = 1, stride_h = 1, stride_w = 1;
  int64_t pad_d = 0, pad_h = 0, pad_w = 0;
  int64_t dilation_d = 1, dilation_h = 1, dilation_w = 1;
  int64_t taps() const { return kernel_d * kernel_h * kernel_w; }
};

struct Geometry {
  int64_t batch = 0;
  int64_t in_channels = 0, out_channels = 0, groups = 1;
  int64_t in_d = 1, in_h = 1, in_w = 1;
  int64_t out_d = 1, out_h = 1, out_w = 1;
  Window win;
  int64_t spatial_dims = 2;  // 1, 2 or 3: the caller's view, for output shapes

  // Positions of one (n, c) plane (a volume in 3-d), of the input and of the output.
  int64_t in_positions() const { return in_d * in_h * in_w; }
  int64_t out_positions() const { return out_d * out_h * out_w; }

  // An input with no channels gives a convolution nothing to compute. torch then returns an output with
  // no channels either (not out_channels copies of the bias) and zero gradients for the weight and bias;
  // so do we, so that a converted model's shapes are torch's.
  bool no_input_channels() const { return in_channels == 0; }
  int64_t conv_output_channels() const { return no_input_channels() ? 0 : out_channels; }
  // Nothing to compute: an empty batch, or no input channels.
  bool empty() const { return batch == 0 || in_channels == 0; }

  // The output's full shape in the caller's dimensionality: (N, C, L), (N, C, H, W) or (N, C, D, H, W).
  std::vector<int64_t> output_shape(int64_t channels) const {
    if (spatial_dims == 1) return {batch, channels, out_w};
    if (spatial_dims == 3) return {batch, channels, out_d, out_h, out_w};
    return {batch, channels, out_h, out_w};
  }
};

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b.
inline MANUALGRAD_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

inline const char* op_label(const char* kind, int64_t spatial_dims) {
  const bool is_conv = kind[0] == 'c';
  if (spatial_dims == 1) return is_conv ? "conv1d" : "max_pool1d";
  if (spatial_dims == 3) return is_conv ? "conv3d" : "max_pool3d";
  return is_conv ? "conv2d" : "max_pool2d";
}

inline int64_t spatial_dims_of(c10::IntArrayRef stride, const char* kind) {
  const auto d = static_cast<int64_t>(stride.size());
  TORCH_CHECK(d >= 1 && d <= 3, kind, ": expected stride to have 1, 2 or 3 entries (one per spatial dimension), but got stride=", stride);
  return d;
}

inline void check_length(const char* op, const char* name, c10::IntArrayRef v, int64_t d) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == d, op, ": expected ", name, " to have ", d,
              " entries (one per spatial dimension), but got ", name, "=", v);
}

// float16 and bfloat16: the CUDA kernels accumulate them in float32; the CPU computes them in float32.
inline bool is_reduced_precision(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

inline bool is_floating_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || is_reduced_precision(dtype);
}

// The integer dtypes max-pool takes, as torch's max_pool2d does on the CPU (bool excepted, as in torch).
inline bool is_pool_integer_dtype(at::ScalarType dtype) {
  return dtype == at::kByte || dtype == at::kChar || dtype == at::kShort || dtype == at::kInt || dtype == at::kLong;
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(!at::isComplexType(dtype), op, ": expected a floating-point ", name,
              " of dtype float32, float64, float16 or bfloat16, but got ", name, " of dtype ", dtype,
              "; complex convolutions are computed by torch_manualgrad.functional, as real convolutions of the real "
              "and imaginary parts");
  TORCH_CHECK(is_floating_dtype(dtype), op, ": expected a floating-point ", name,
              " of dtype float32, float64, float16 or bfloat16, but got ", name, " of dtype ", dtype);
}

// Max-pool's input: floating point or integer. torch's own wording first, as NotImplementedError gives it.
inline void check_pool_dtype(const char* op, const at::Tensor& input) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(is_floating_dtype(dtype) || is_pool_integer_dtype(dtype), "\"", op, "\" not implemented for '", dtype,
              "' (", op, ": expected input of a floating-point dtype (float32, float64, float16, bfloat16) or an "
              "integer one (uint8, int8, int16, int32, int64), but got input of dtype ", dtype, ")");
}

// The C++ type name torch prints in "Input type (float) and bias type (double) should be the same".
inline const char* cpp_type_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float";
    case at::kDouble: return "double";
    case at::kHalf: return "c10::Half";
    case at::kBFloat16: return "c10::BFloat16";
    case at::kComplexFloat: return "c10::complex<float>";
    case at::kComplexDouble: return "c10::complex<double>";
    case at::kLong: return "long";
    case at::kInt: return "int";
    case at::kShort: return "short";
    case at::kChar: return "signed char";
    case at::kByte: return "unsigned char";
    case at::kBool: return "bool";
    default: return c10::toString(dtype);
  }
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": expected input and ", name,
              " to be on the same device, but got input on ", input.device(), " and ", name, " on ", t.device());
}

// A convolution's weight and bias have the input's dtype; torch's two wordings for the two.
inline void check_conv_dtypes(const char* op, const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  // torch (2.13 on the CPU) words a complex input's mismatch by the legacy type names; its kernels' words
  // (those below) follow in parentheses
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() || !input.is_complex(), op, ": Input type (",
              input.toString(), ") and weight type (", weight.toString(), ") should be the same (expected scalar type ",
              input.scalar_type(), " but found ", weight.scalar_type(),
              ": expected input and weight to have the same dtype, but got input ", input.scalar_type(), " and weight ",
              weight.scalar_type(), ")");
  // the bias before the weight, as torch's convolution checks them (its transposed one the other way round:
  // functional.py)
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": Input type (", cpp_type_name(input.scalar_type()),
                ") and bias type (", cpp_type_name(bias->scalar_type()),
                ") should be the same (expected input and bias to have the same dtype, but got input ",
                input.scalar_type(), " and bias ", bias->scalar_type(), ")");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": expected scalar type ", input.scalar_type(),
              " but found ", weight.scalar_type(), " (expected input and weight to have the same dtype, but got input ",
              input.scalar_type(), " and weight ", weight.scalar_type(), ")");
}

inline void check_same_device_and_dtype(const char* op, const char* name, const at::Tensor& t,
                                        const at::Tensor& input) {
  check_same_device(op, name, t, input);
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected input and ", name,
              " to have the same dtype, but got input ", input.scalar_type(), " and ", name, " ", t.scalar_type());
}

inline void check_input_rank(const char* op, const at::Tensor& input, int64_t d) {
  TORCH_CHECK(input.dim() == d + 2, op, ": expected input to be ", d + 2, "-D (N, C, ",
              d == 1 ? "L" : d == 2 ? "H, W" : "D, H, W", "), but got input of shape ", input.sizes());
}

// A max-pool's input: batched (N, C, *spatial), with non-empty channel and spatial dimensions (N may be 0).
inline void check_pool_input_dims(const char* op, const at::Tensor& input, int64_t d) {
  check_input_rank(op, input, d);
  for (int64_t i = 1; i < input.dim(); ++i)
    TORCH_CHECK(d != 3 || input.size(i) > 0, "Expected input's non-batch dimensions to have positive length, but input "
                "has a shape of ", input.sizes(), " and non-batch dimension ", i - 1, " has length zero! (", op,
                ": expected input to have non-zero channel and spatial sizes)");
  for (int64_t i = 1; i < input.dim(); ++i)
    TORCH_CHECK(input.size(i) > 0, (d == 1 ? "max_pool1d: Expected 2D or 3D" : "Expected 3D or 4D"),
                " (batch mode) tensor with optional 0 dim batch size for input, but got:", input.sizes(), " (", op,
                ": expected input to have non-zero channel and spatial sizes, but got input of shape ", input.sizes(), ")");
}

// The window of 1, 2 or 3 spatial dimensions (one entry per dimension in each argument), filled from the
// last dimension (width) back; the dimensions the problem lacks keep Window's defaults.
inline Window make_window(c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                          c10::IntArrayRef dilation) {
  Window w;
  const size_t d = stride.size();
  const auto at = [d](c10::IntArrayRef v, size_t from_end) { return v[d - 1 - from_end]; };
  w.kernel_w = at(kernel, 0), w.stride_w = at(stride, 0), w.pad_w = at(padding, 0), w.dilation_w = at(dilation, 0);
  if (d >= 2)
    w.kernel_h = at(kernel, 1), w.stride_h = at(stride, 1), w.pad_h = at(padding, 1), w.dilation_h = at(dilation, 1);
  if (d >= 3)
    w.kernel_d = at(kernel, 2), w.stride_d = at(stride, 2), w.pad_d = at(padding, 2), w.dilation_d = at(dilation, 2);
  return w;
}

// The spatial sizes of a (N, C, *spatial) shape into g's in_d, in_h, in_w (those it lacks stay 1).
inline void set_input_sizes(Geometry& g, c10::IntArrayRef sizes) {
  const int64_t d = static_cast<int64_t>(sizes.size()) - 2;
  g.in_w = sizes.back();
  g.in_h = d >= 2 ? sizes[sizes.size() - 2] : 1;
  g.in_d = d >= 3 ? sizes[2] : 1;
}

// The extent of a dilated kernel, dilation*(kernel-1)+1, and of a padded input, size+2*pad; both checked
// for int64 overflow, so absurd arguments are reported instead of wrapping into a plausible geometry.
inline int64_t dilated_extent(const char* op, int64_t kernel, int64_t dilation) {
  int64_t span = 0;
  TORCH_CHECK(!__builtin_mul_overflow(dilation, kernel - 1, &span) && span < INT64_MAX, op,
              ": kernel size ", kernel, " with dilation ", dilation, " overflows int64");
  return span + 1;
}

inline int64_t padded_extent(const char* op, int64_t size, int64_t pad) {
  int64_t padded = 0;
  TORCH_CHECK(pad <= INT64_MAX / 2 && !__builtin_add_overflow(size, 2 * pad, &padded), op, ": padding ", pad,
              " on an input of size ", size, " overflows int64");
  return padded;
}

// The number of elements of a tensor of `sizes` (all >= 0) leaving out its batch dimension (sizes[0]):
// checked for int64 overflow, so that kernels may multiply any of those sizes together (a plane's
// positions, channels × positions) without wrapping, even for an empty batch.
inline int64_t checked_sample_numel(const char* op, const char* what, c10::IntArrayRef sizes) {
  int64_t numel = 1;
  for (size_t i = 1; i < sizes.size(); ++i)
    TORCH_CHECK(!__builtin_mul_overflow(numel, sizes[i], &numel), op, ": ", what, " of shape ", sizes,
                " would have more elements than int64 can count");
  int64_t total = 0;
  TORCH_CHECK(sizes.empty() || !__builtin_mul_overflow(numel, sizes[0], &total), op, ": ", what, " of shape ", sizes,
              " would have more elements than int64 can count");
  return numel;
}

// Output size of a convolution along one dimension; the caller has checked the kernel fits.
inline int64_t conv_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  return (in + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
}

// Output size of a max-pool along one dimension, torch's rule: with ceil_mode the last window may hang
// over the end, but it must start inside the input or the left padding.
inline int64_t pool_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                                 bool ceil_mode) {
  // Rounds the windows' span down (or up, with ceil_mode) towards -inf, as torch's div_rtn: with
  // ceil_mode a negative span of less than one stride still leaves a window hanging over the end.
  const int64_t span = in + 2 * pad - dilation * (kernel - 1) - 1;
  const int64_t down = span >= 0 ? span / stride : -ceil_div(-span, stride);
  const int64_t windows = ceil_mode && down * stride != span ? down + 1 : down;
  int64_t out = windows + 1;
  // (out - 1) * stride >= in + pad, without forming the product (it may not fit in int64)
  if (ceil_mode && out - 1 >= ceil_div(in + pad, stride)) --out;
  return out;
}

// The per-group matrices: weight viewed as (out_channels, in_channels/groups * KD * KH * KW).
struct GroupDims {
  int64_t groups, out_per_group, in_per_group, taps, k_per_group, positions;
  explicit GroupDims(const Geometry& g)
      : groups(g.groups),
        out_per_group(g.out_channels / g.groups),
        in_per_group(g.in_channels / g.groups),
        taps(g.win.taps()),
        k_per_group(g.in_channels / g.groups * g.win.taps()),
        positions(g.out_positions()) {}
};

// Whether the CPU kernels compute in channels-last and return channels-last results (a conv's output and
// gradients, a max-pool's output, indices and input gradient): when the tensor they start from (the input;
// a max-pool backward's grad_output) is a 4-d tensor that suggests channels_last, or a 5-d one that suggests
// channels_last_3d, as torch decides for its own results. _ops.py's fake kernels follow the same rule; CUDA
// results are always contiguous.
inline bool channels_last_result(const at::Tensor& t, const Geometry& g) {
  if (g.spatial_dims == 3) return t.dim() == 5 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast3d;
  return g.spatial_dims == 2 && t.dim() == 4 && t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// t laid out as NCHW with the standard strides. contiguous() alone can keep a size-1 dimension's odd stride:
// (1, 3, 1, 1) with strides (3, 1, 3, 3), as torch.empty(..., memory_format=channels_last) makes it, is already
// contiguous and still suggests channels-last, so a caller that asks for NCHW to leave its channels-last path
// would be sent back into it (a recursion that overflowed the stack). The standard strides never suggest it.
inline at::Tensor standard_nchw(const at::Tensor& t) { return t.contiguous().view({-1}).view(t.sizes()); }

// The memory format of channels-last results of g's rank.
inline at::MemoryFormat channels_last_format(const Geometry& g) {
  return g.spatial_dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// f(tap, pixel) for each tap (i, j) of the window at output position (oh, ow), tap = i * KW + j: pixel is the
// index (ih * W + iw) of the input pixel it sees, or -1 where it falls in the padding. (The CPU's
// channels-last kernels walk windows this way.)
template <typename F>
void for_each_tap(const Geometry& g, int64_t oh, int64_t ow, const F& f) {
  const Window& w = g.win;
  for (int64_t i = 0; i < w.kernel_h; ++i) {
    const int64_t ih = oh * w.stride_h - w.pad_h + i * w.dilation_h;
    for (int64_t j = 0; j < w.kernel_w; ++j) {
      const int64_t iw = ow * w.stride_w - w.pad_w + j * w.dilation_w;
      const bool inside = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
      f(i * w.kernel_w + j, inside ? ih * g.in_w + iw : int64_t(-1));
    }
  }
}

// The same taps in runs: f(tap, pixel, count) for taps tap .. tap+count-1 of one kernel row, which see the
// consecutive pixels pixel .. pixel+count-1 (in channels-last memory, one contiguous stretch), or all fall in the
// padding (pixel -1). With dilation 1 along W a kernel row is at most three runs; otherwise the taps inside
// are single runs. The taps come in the same order as for_each_tap's.
template <typename F>
void for_each_tap_run(const Geometry& g, int64_t oh, int64_t ow, const F& f) {
  const Window& w = g.win;
  const int64_t iw0 = ow * w.stride_w - w.pad_w;
  int64_t j0, j1;  // the taps of a kernel row that see columns inside the input (window_taps.h)
  taps_inside(iw0, w.kernel_w, w.dilation_w, g.in_w, j0, j1);
  j0 = std::min(j0, w.kernel_w);
  j1 = std::max(j1, j0);
  for (int64_t i = 0; i < w.kernel_h; ++i) {
    const int64_t ih = oh * w.stride_h - w.pad_h + i * w.dilation_h, tap0 = i * w.kernel_w;
    if (ih < 0 || ih >= g.in_h) {
      f(tap0, int64_t(-1), w.kernel_w);
      continue;
    }
    if (j0 > 0) f(tap0, int64_t(-1), j0);
    if (w.dilation_w == 1) {
      if (j1 > j0) f(tap0 + j0, ih * g.in_w + iw0 + j0, j1 - j0);
    } else {
      for (int64_t j = j0; j < j1; ++j) f(tap0 + j, ih * g.in_w + iw0 + j * w.dilation_w, int64_t(1));
    }
    if (j1 < w.kernel_w) f(tap0 + j1, int64_t(-1), w.kernel_w - j1);
  }
}

// A 1×1, stride-1, unpadded convolution is a plain matrix product on the image itself: no im2col.
inline bool is_pointwise(const Geometry& g) {
  const Window& w = g.win;
  return w.taps() == 1 && w.stride_d == 1 && w.stride_h == 1 && w.stride_w == 1 && w.pad_d == 0 && w.pad_h == 0 &&
         w.pad_w == 0;
}

// Depthwise: every group has one input channel (groups == in_channels), with any channel multiplier.
// There a GEMM would be (multiplier × KH*KW) @ (KH*KW × positions): too thin to pay for im2col, so
// both devices have direct kernels for it.
inline bool is_depthwise(const Geometry& g) { return g.groups == g.in_channels && g.groups > 1; }

// Checks a convolution's arguments and returns its geometry.
inline Geometry check_conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                           int64_t groups) {
  const int64_t d = spatial_dims_of(stride, "conv");
  const char* op = op_label("conv", d);
  check_length(op, "padding", padding, d);
  check_length(op, "dilation", dilation, d);
  check_same_device(op, "weight", weight, input);
  if (bias.has_value() && bias->defined()) check_same_device(op, "bias", *bias, input);
  check_conv_dtypes(op, input, weight, bias);
  check_floating(op, "input", input);
  for (auto s : stride) TORCH_CHECK(s > 0, op, ": non-positive stride is not supported (got stride=", stride, ")");
  for (auto p : padding) TORCH_CHECK(p >= 0, op, ": negative padding is not supported (got padding=", padding, ")");
  for (auto x : dilation)
    TORCH_CHECK(x > 0, op, ": dilation should be greater than zero, but got ", dilation, " (every entry of dilation must be positive)");
  TORCH_CHECK(groups > 0, op, ": non-positive groups is not supported (got groups=", groups, ")");
  check_input_rank(op, input, d);
  TORCH_CHECK(weight.dim() == d + 2, op, ": expected weight to be ", d + 2, "-D (out_channels, in_channels/groups, ",
              d == 1 ? "kL" : d == 2 ? "kH, kW" : "kD, kH, kW", "), but got weight of shape ", weight.sizes());
  // torch's first check on out_channels: at least one per group (its words differ from the divisibility
  // check's below, and PyTorch's tests match them); groups > 0 here, so this also refuses zero out_channels
  TORCH_CHECK(weight.size(0) >= groups, op, ": Given groups=", groups, ", expected weight to be at least ", groups,
              " at dimension 0, but got weight of size ", weight.sizes(),
              " instead (weight must have at least one output channel per group)");
  for (int64_t i = 2; i < weight.dim(); ++i)  // torch's words for 3-d, then for 1-d and 2-d
    TORCH_CHECK(d != 3 || weight.size(i) > 0, "kernel size should be greater than zero, but got: ", weight.size(2), " x ",
                weight.size(3), " x ", weight.size(4), " (TxHxW) (", op, ": weight of shape ", weight.sizes(), ")");
  for (int64_t i = 2; i < weight.dim(); ++i)
    TORCH_CHECK(weight.size(i) > 0, op, ": kernel size should be greater than zero, but got kernel_height: ",
                d == 2 ? weight.size(2) : 1, " kernel_width: ", weight.size(-1), " (weight of shape ", weight.sizes(), ")");
  TORCH_CHECK(weight.size(0) % groups == 0, op, ": Given groups=", groups, ", expected weight to be divisible by ", groups,
              " at dimension 0, but got weight of size [", weight.sizes(), "] instead (out_channels=weight.size(0)=",
              weight.size(0), " must be divisible by groups=", groups, ")");
  int64_t expected_channels = 0;  // weight.size(1) * groups, which may not fit in int64
  const bool channels_fit = !__builtin_mul_overflow(weight.size(1), groups, &expected_channels);
  TORCH_CHECK(channels_fit, op, ": weight of shape ", weight.sizes(), " with groups=", groups,
              " expects weight.size(1) * groups input channels, more than int64 can count");
  TORCH_CHECK(input.size(1) == expected_channels, op, ": Given groups=", groups, ", weight of size ", weight.sizes(),
              ", expected input", input.sizes(), " to have ", expected_channels, " channels, but got ", input.size(1),
              " channels instead");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": Given weight of size ", weight.sizes(),
                ", expected bias to be 1-dimensional with ", weight.size(0), " elements, but got bias of size ",
                bias->sizes(), " instead");

  bool kernel_fits = true;
  std::ostringstream padded_sizes, kernel_sizes;  // torch's "(H x W)"
  for (int64_t i = 0; i < d; ++i) {
    const int64_t padded = padded_extent(op, input.size(2 + i), padding[i]);
    const int64_t dilated_kernel = dilated_extent(op, weight.size(2 + i), dilation[i]);
    kernel_fits = kernel_fits && dilated_kernel <= padded;
    padded_sizes << (i ? " x " : "") << padded;
    kernel_sizes << (i ? " x " : "") << dilated_kernel;
  }
  TORCH_CHECK(kernel_fits, op, ": Calculated padded input size per channel: (", padded_sizes.str(), "). Kernel size: (",
              kernel_sizes.str(), "). Kernel size can't be greater than actual input size (input of shape ",
              input.sizes(), ", weight of shape ", weight.sizes(), ", padding=", padding, ", dilation=", dilation, ")");
  // padding alone would fill the output: torch refuses that too, unless the batch or the channels are empty (then
  // the output is empty whatever its positions)
  for (int64_t i = 2; i < input.dim(); ++i)
    TORCH_CHECK(input.size(i) > 0 || input.size(0) == 0 || input.size(1) == 0, op,
                ": Only zero batch or zero channel inputs are supported, but got input shape: ", input.sizes(),
                " (input has an empty spatial dimension)");

  Geometry g;
  g.spatial_dims = d;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.out_channels = weight.size(0);
  g.groups = groups;
  c10::IntArrayRef kernel = weight.sizes().slice(2);
  g.win = make_window(kernel, stride, padding, dilation);
  const auto& w = g.win;
  set_input_sizes(g, input.sizes());
  g.out_d = conv_output_size(g.in_d, w.kernel_d, w.stride_d, w.pad_d, w.dilation_d);
  g.out_h = conv_output_size(g.in_h, w.kernel_h, w.stride_h, w.pad_h, w.dilation_h);
  g.out_w = conv_output_size(g.in_w, w.kernel_w, w.stride_w, w.pad_w, w.dilation_w);
  checked_sample_numel(op, "the output", g.output_shape(g.conv_output_channels()));
  return g;
}

inline void check_conv_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const Geometry& g) {
  const char* op = op_label("conv", g.spatial_dims);
  check_same_device_and_dtype(op, "grad_output", grad_output, input);
  const auto expected = g.output_shape(g.conv_output_channels());
  TORCH_CHECK(grad_output.sizes() == c10::IntArrayRef(expected), op, ": expected grad_output of shape ",
              c10::IntArrayRef(expected), ", but got grad_output of shape ", grad_output.sizes());
}

// The window arguments of a max-pool, forward or backward: one entry per spatial dimension, all positive
// but the padding, which is non-negative and at most half the kernel. torch words these differently for
// max_pool1d (its own function) and max_pool2d; ours start with the wording of the function called.
inline void check_pool_window(const char* op, int64_t d, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_length(op, "kernel_size", kernel_size, d);
  check_length(op, "padding", padding, d);
  check_length(op, "dilation", dilation, d);
  const auto h = [d](c10::IntArrayRef v) { return d >= 2 ? v[d - 2] : 1; };  // torch's 2-d view of a 1-d window
  // torch's naming of a 2-d or 3-d window's entries: "kH: 3 kW: 3", "kT: 3 kH: 3 kW: 3"
  const auto named = [d, &h](const char* letter, c10::IntArrayRef v) {
    std::ostringstream os;
    if (d == 3) os << letter << "T: " << v[0] << " ";
    os << letter << "H: " << h(v) << " " << letter << "W: " << v.back();
    return os.str();
  };
  const bool one_d = d == 1;
  // torch's max_pool2d looks at the stride first: a kernel of 0 with the default stride reports the stride
  for (auto s : stride)
    TORCH_CHECK(one_d || s != 0, "stride should not be zero (", op, ": stride=", stride, ", kernel_size=", kernel_size, ")");
  for (auto k : kernel_size)
    TORCH_CHECK(k > 0, one_d ? "max_pool1d() kernel_size must be greater than zero, but got " : "",
                one_d ? std::to_string(k) : "kernel size should be greater than zero, but got " + named("k", kernel_size),
                " (", op, ": kernel_size=", kernel_size, ")");
  for (auto s : stride) {
    TORCH_CHECK(!(one_d && s <= 0), "max_pool1d() stride must be greater than zero, but got ", s, " (", op,
                ": stride=", stride, ")");
    TORCH_CHECK(s > 0, "stride should be greater than zero, but got ", named("d", stride), " (", op,
                ": stride=", stride, ")");
  }
  for (auto p : padding)
    TORCH_CHECK(p >= 0, one_d ? "max_pool1d() padding must be non-negative, but got " : "pad must be non-negative, but got pad: ",
                p, " (", op, ": padding=", padding, ")");
  for (auto x : dilation)
    TORCH_CHECK(x > 0, one_d ? "max_pool1d() dilation must be greater than zero, but got " + std::to_string(x)
                             : "dilation should be greater than zero, but got " + named("dilation", dilation),
                " (", op, ": dilation=", dilation, ")");
  for (int64_t i = 0; i < d; ++i) {
    const int64_t effective = dilated_extent(op, kernel_size[i], dilation[i]);
    TORCH_CHECK(one_d || padding[i] <= effective / 2, "pad should be at most half of effective kernel size, but got pad=",
                padding[i], ", kernel_size=", kernel_size[i], " and dilation=", dilation[i], " (", op, ": padding=",
                padding, ", kernel_size=", kernel_size, ", dilation=", dilation, ")");
  }
  for (int64_t i = 0; i < d; ++i) {
    TORCH_CHECK(!(one_d && padding[i] > kernel_size[i] / 2),
                "max_pool1d() padding should be at most half of kernel size, but got padding=", padding[i],
                " and kernel_size=", kernel_size[i]);
    TORCH_CHECK(d != 3 || padding[i] <= kernel_size[i] / 2,  // torch's 3-d words, W before H
                "pad should be smaller than or equal to half of kernel size, but got kT: ", kernel_size[0], " kW: ",
                kernel_size[2], " kH: ", kernel_size[1], " padT: ", padding[0], " padW: ", padding[2], " padH: ", padding[1],
                " (", op, ": pad should be at most half of kernel size, but got padding=", padding, " and kernel_size=",
                kernel_size, ")");
    TORCH_CHECK(padding[i] <= kernel_size[i] / 2,
                "pad should be smaller than or equal to half of kernel size, but got padW = ", padding.back(),
                ", padH = ", h(padding), ", kW = ", kernel_size.back(), ", kH = ", h(kernel_size), " (", op,
                ": pad should be at most half of kernel size, but got padding=", padding, " and kernel_size=",
                kernel_size, ")");
  }
}

// Checks a max-pool's arguments and returns its geometry (in_channels = channels; groups unused).
inline Geometry check_max_pool(const at::Tensor& input, c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation, bool ceil_mode) {
  const int64_t d = spatial_dims_of(stride, "max_pool");
  const char* op = op_label("pool", d);
  check_pool_window(op, d, kernel_size, stride, padding, dilation);
  check_pool_dtype(op, input);
  check_pool_input_dims(op, input, d);
  for (int64_t i = 0; i < d; ++i) {  // overflow checks; with pad <= kernel/2 the span below is at most the input size
    padded_extent(op, input.size(2 + i), padding[i]);
    dilated_extent(op, kernel_size[i], dilation[i]);
  }

  Geometry g;
  g.spatial_dims = d;
  g.batch = input.size(0);
  g.in_channels = g.out_channels = input.size(1);
  g.win = make_window(kernel_size, stride, padding, dilation);
  const auto& w = g.win;
  set_input_sizes(g, input.sizes());
  g.out_d = pool_output_size(g.in_d, w.kernel_d, w.stride_d, w.pad_d, w.dilation_d, ceil_mode);
  g.out_h = pool_output_size(g.in_h, w.kernel_h, w.stride_h, w.pad_h, w.dilation_h, ceil_mode);
  g.out_w = pool_output_size(g.in_w, w.kernel_w, w.stride_w, w.pad_w, w.dilation_w, ceil_mode);
  // torch's wording first: max_pool1d's own, or max_pool2d's and max_pool3d's
  const std::string depth_in = d == 3 ? std::to_string(g.in_d) + "x" : "", depth_out = d == 3 ? std::to_string(g.out_d) + "x" : "";
  const std::string out_size = d == 1 ? std::to_string(g.out_w) : depth_out + std::to_string(g.out_h) + "x" + std::to_string(g.out_w);
  std::ostringstream too_small;
  if (d == 1) {
    too_small << "max_pool1d() Invalid computed output size: " << g.out_w;
  } else {
    too_small << "Given input size: (" << g.in_channels << "x" << depth_in << g.in_h << "x" << g.in_w
              << "). Calculated output size: (" << g.in_channels << "x" << out_size << "). Output size is too small";
  }
  TORCH_CHECK(g.out_d >= 1 && g.out_h >= 1 && g.out_w >= 1, too_small.str(), " (", op, ": input of shape ", input.sizes(),
              " is too small for kernel_size=", kernel_size, ", stride=", stride, ", padding=", padding, ", dilation=",
              dilation, ": the output size would be ", out_size, ")");
  checked_sample_numel(op, "the output", g.output_shape(g.out_channels));
  return g;
}

// The backward of max-pool needs the output gradient, the argmax indices, the input's shape, and the
// window geometry (a gather over the windows covering each input element needs to know them).
// grad_output must have the shape a forward with these arguments gives: ceil_mode is not an argument, so
// either rounding's window grid is accepted (the same one along every dimension, as a forward uses).
inline Geometry check_max_pool_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                        c10::IntArrayRef input_size, c10::IntArrayRef kernel_size,
                                        c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  const int64_t d = spatial_dims_of(stride, "max_pool backward");
  const char* op = op_label("pool", d);
  TORCH_CHECK(static_cast<int64_t>(input_size.size()) == d + 2, op, ": expected input_size to have ", d + 2,
              " entries (N, C, *spatial), but got input_size=", input_size);
  check_pool_window(op, d, kernel_size, stride, padding, dilation);
  TORCH_CHECK(input_size[0] >= 0, op, ": expected input_size to have a non-negative batch, but got input_size=", input_size);
  for (int64_t i = 1; i < d + 2; ++i)
    TORCH_CHECK(input_size[i] > 0, op, ": expected input_size to have positive channel and spatial sizes, but got input_size=",
                input_size);
  checked_sample_numel(op, "the input (input_size)", input_size);
  for (int64_t i = 0; i < d; ++i) {
    padded_extent(op, input_size[2 + i], padding[i]);
    dilated_extent(op, kernel_size[i], dilation[i]);
  }
  TORCH_CHECK(!is_pool_integer_dtype(grad_output.scalar_type()), op, ": expected a floating-point grad_output, but got "
              "grad_output of dtype ", grad_output.scalar_type(), " (an integer max-pool has no gradient: integer tensors "
              "cannot require grad)");
  check_floating(op, "grad_output", grad_output);
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": expected indices of dtype Long (int64), but got indices of dtype ",
              indices.scalar_type());
  TORCH_CHECK(indices.device() == grad_output.device(), op,
              ": expected grad_output and indices to be on the same device, but got grad_output on ",
              grad_output.device(), " and indices on ", indices.device());
  TORCH_CHECK(grad_output.sizes() == indices.sizes(), op, ": expected grad_output and indices to have the same shape, but got grad_output of shape ",
              grad_output.sizes(), " and indices of shape ", indices.sizes());
  std::vector<int64_t> floor_shape{input_size[0], input_size[1]}, ceil_shape = floor_shape;
  for (int64_t i = 0; i < d; ++i) {
    floor_shape.push_back(pool_output_size(input_size[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], false));
    ceil_shape.push_back(pool_output_size(input_size[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], true));
  }
  const bool ceil_differs = ceil_shape != floor_shape;
  TORCH_CHECK(grad_output.sizes() == c10::IntArrayRef(floor_shape) || grad_output.sizes() == c10::IntArrayRef(ceil_shape),
              op, ": expected grad_output of shape ", c10::IntArrayRef(floor_shape),
              (ceil_differs ? " (or, with ceil_mode=True, " + c10::str(c10::IntArrayRef(ceil_shape)) + ")" : std::string()),
              ", the output a forward gives for input_size=", input_size, ", kernel_size=", kernel_size, ", stride=",
              stride, ", padding=", padding, ", dilation=", dilation, ", but got grad_output of shape ", grad_output.sizes());
  for (int64_t i = 2; i < d + 2; ++i)  // a forward never produces an empty window grid
    TORCH_CHECK(grad_output.size(i) > 0, op, ": expected grad_output to have positive spatial sizes, but got grad_output of shape ",
                grad_output.sizes());
  Geometry g;
  g.spatial_dims = d;
  g.batch = input_size[0];
  g.in_channels = g.out_channels = input_size[1];
  g.win = make_window(kernel_size, stride, padding, dilation);
  set_input_sizes(g, input_size);
  g.out_w = grad_output.size(-1);
  g.out_h = d >= 2 ? grad_output.size(-2) : 1;
  g.out_d = d == 3 ? grad_output.size(2) : 1;
  return g;
}

// Whether `index`, a flat index into an (in_d, in_h, in_w) volume (in_d 1 for a plane), is one the forward
// could have given output (od, oh, ow): a tap of its window that lies in the volume, or -1 (a window with no
// tap in the volume, whose gradient goes nowhere). Any other index would make the backward device-dependent
// (the CPU scatters to wherever it points, CUDA gathers only within windows), so max_pool_backward refuses
// it when asked to check its indices.
MANUALGRAD_HOST_DEVICE inline bool index_from_window(int64_t index, int64_t od, int64_t oh, int64_t ow, int64_t in_d,
                                                     int64_t in_h, int64_t in_w, const Window& w) {
  if (index == -1) return true;
  if (index < 0 || index / in_w / in_h >= in_d) return false;
  const int64_t x = index % in_w, h = index / in_w % in_h, z = index / in_w / in_h;
  const int64_t dd = z - (od * w.stride_d - w.pad_d), dh = h - (oh * w.stride_h - w.pad_h), dw = x - (ow * w.stride_w - w.pad_w);
  return dd >= 0 && dh >= 0 && dw >= 0 && dd % w.dilation_d == 0 && dh % w.dilation_h == 0 && dw % w.dilation_w == 0 &&
         dd / w.dilation_d < w.kernel_d && dh / w.dilation_h < w.kernel_h && dw / w.dilation_w < w.kernel_w;
}

// The error for indices' element `position` (flat, in (N, C, *spatial) order), which index_from_window refused.
[[noreturn]] inline void fail_foreign_index(const Geometry& g, int64_t position, int64_t index,
                                            c10::IntArrayRef input_size) {
  const int64_t ow = position % g.out_w, oh = position / g.out_w % g.out_h, od = position / g.out_w / g.out_h % g.out_d;
  const int64_t plane = position / g.out_positions();
  const int64_t n = plane / g.in_channels, c = plane % g.in_channels;
  const Window& w = g.win;
  const int64_t d = g.spatial_dims;
  // the window's entries in the caller's dimensionality, as "[a, b]"
  const auto list = [d](int64_t depth, int64_t height, int64_t width) {
    std::ostringstream os;
    os << "[" << (d == 3 ? std::to_string(depth) + ", " : "") << (d >= 2 ? std::to_string(height) + ", " : "") << width << "]";
    return os.str();
  };
  std::ostringstream where;
  where << "[" << n << ", " << c << ", " << list(od, oh, ow).substr(1);
  TORCH_CHECK(false, op_label("pool", d), " backward: indices", where.str(), " = ", index,
              " is not a position in that output's window (input_size=", input_size,
              ", kernel_size=", list(w.kernel_d, w.kernel_h, w.kernel_w), ", stride=", list(w.stride_d, w.stride_h, w.stride_w),
              ", padding=", list(w.pad_d, w.pad_h, w.pad_w), ", dilation=", list(w.dilation_d, w.dilation_h, w.dilation_w),
              "); indices must come from the forward with the same arguments, -1 marking a window with no input");
}

}  // namespace manualgrad
