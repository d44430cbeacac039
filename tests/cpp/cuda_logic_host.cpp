// cuda_logic_host.cpp — a host build of the CUDA kernels' index logic for tests/test_cuda_logic.py:
// the gather walk (csrc/cuda/window_walk.h) and what each max-pool thread computes, for planes and volumes
// (csrc/cuda/max_pool_threads.h) and each depthwise forward thread (csrc/cuda/depthwise_threads.h),
// run for every output, pixel or cell in turn as the kernels' threads would, behind C entry points that
// ctypes can call.
#include "../../csrc/cuda/depthwise_threads.h"
#include "../../csrc/cuda/max_pool_threads.h"
#include "../../csrc/cuda/window_walk.h"

#include <type_traits>

namespace {

using manualgrad::Int;
using manualgrad::PlainDivider;

// The host stand-in for the kernels' Geo (csrc/cuda/windows.cuh): the same fields, plain division. The
// depth fields come from `depth` (in_d, out_d, kernel_d, stride_d, pad_d, dilation_d), or stay those of a
// plane (depth 1) when it is null.
template <typename index_t>
struct HostGeo {
  index_t in_h, in_w, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  PlainDivider<index_t> by_stride_h, by_stride_w;
  index_t step_h, step_w, tap_step_h, tap_step_w;
  index_t in_d = 1, out_d = 1, kernel_d = 1, stride_d = 1, pad_d = 0, dilation_d = 1, step_d = 1, tap_step_d = 1;
  PlainDivider<index_t> by_stride_d{1};
  HostGeo(const int64_t* s, const int64_t* depth)
      : in_h(s[0]), in_w(s[1]), out_h(s[2]), out_w(s[3]), kernel_h(s[4]), kernel_w(s[5]), stride_h(s[6]),
        stride_w(s[7]), pad_h(s[8]), pad_w(s[9]), dilation_h(s[10]), dilation_w(s[11]),
        by_stride_h{static_cast<index_t>(s[6])}, by_stride_w{static_cast<index_t>(s[7])},
        step_h(manualgrad::covering_step(s[6], s[10])), step_w(manualgrad::covering_step(s[7], s[11])),
        tap_step_h(manualgrad::covering_tap_step(s[6], s[10])), tap_step_w(manualgrad::covering_tap_step(s[7], s[11])) {
    if (depth == nullptr) return;
    in_d = depth[0], out_d = depth[1], kernel_d = depth[2], stride_d = depth[3], pad_d = depth[4], dilation_d = depth[5];
    by_stride_d = {stride_d};
    step_d = manualgrad::covering_step(stride_d, dilation_d), tap_step_d = manualgrad::covering_tap_step(stride_d, dilation_d);
  }
  int64_t in_volume() const { return int64_t{in_d} * in_h * in_w; }
  int64_t out_volume() const { return int64_t{out_d} * out_h * out_w; }
};

// Calls body(std::bool_constant<HAS_DEPTH>): the volumes' code when depth is given, the planes' when null,
// as max_pool_cuda.cu's dispatch_depth picks the kernels.
template <typename Body>
void with_depth(const int64_t* depth, const Body& body) {
  if (depth != nullptr) {
    body(std::true_type());
  } else {
    body(std::false_type());
  }
}

// Every element of one volume (a plane: depth null) in turn, each visit as (element, k, i, j, o); returns
// the number of visits, or -1 past `capacity` visits. A plane walks as col2im and the depthwise gradient do.
template <typename index_t>
int64_t walk_volume(const int64_t* sizes, const int64_t* depth, int64_t* visits, int64_t capacity) {
  const HostGeo<index_t> g(sizes, depth);
  int64_t count = 0;
  const auto visit = [&](index_t id, index_t ih, index_t iw, index_t k, index_t i, index_t j, index_t o) {
    if (count < capacity) {
      int64_t* v = visits + 5 * count;
      v[0] = (int64_t{id} * g.in_h + ih) * g.in_w + iw;
      v[1] = k;
      v[2] = i;
      v[3] = j;
      v[4] = o;
    }
    ++count;
  };
  for (index_t id = 0; id < g.in_d; ++id)
    for (index_t ih = 0; ih < g.in_h; ++ih)
      for (index_t iw = 0; iw < g.in_w; ++iw) {
        if (depth != nullptr) {
          manualgrad::for_each_covering_window<true>(
              g, id, ih, iw, [&](index_t k, index_t i, index_t j, index_t o) { visit(id, ih, iw, k, i, j, o); });
        } else {
          manualgrad::for_each_covering_window(
              g, ih, iw, [&](index_t i, index_t j, index_t o) { visit(id, ih, iw, 0, i, j, o); });
        }
      }
  return count <= capacity ? count : -1;
}

// f(plane, row, col) for every element of `planes` planes of rows x cols, in order: the threads of a
// one-thread-per-element kernel.
template <typename index_t, typename F>
void for_each_element(int64_t planes, index_t rows, index_t cols, const F& f) {
  for (int64_t p = 0; p < planes; ++p)
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < cols; ++c) f(p, r, c);
}

// f(slice, d, p, row, col) for every element of `planes` planes or volumes of `depth` slices of rows x
// cols, in order, each slice decoded to its volume p and depth d as the kernels decode theirs.
template <bool HAS_DEPTH, typename index_t, typename F>
void for_each_slice_element(int64_t planes, index_t depth, index_t rows, index_t cols, const F& f) {
  for_each_element(planes * depth, rows, cols, [&](int64_t slice, index_t r, index_t c) {
    index_t d;
    const index_t p = manualgrad::volume_of_slice<HAS_DEPTH>(static_cast<index_t>(slice), PlainDivider<index_t>{depth},
                                                             depth, d);
    f(slice, d, int64_t{p}, r, c);
  });
}

// The forward kernel's threads over `planes` (n, c) planes or volumes, in the kernel's order: every output
// slice (a plane, or one depth of a volume), row-major.
template <typename index_t, typename scalar_t>
void forward_planes(scalar_t* output, int64_t* indices, const scalar_t* input, int64_t planes, const int64_t* sizes,
                    const int64_t* depth) {
  const HostGeo<index_t> g(sizes, depth);
  with_depth(depth, [&](auto has_depth) {
    constexpr bool HAS_DEPTH = decltype(has_depth)::value;
    for_each_slice_element<HAS_DEPTH>(planes, g.out_d, g.out_h, g.out_w, [&](int64_t slice, index_t od, int64_t p,
                                                                             index_t oh, index_t ow) {
      index_t best_index;
      const int64_t o = (slice * g.out_h + oh) * g.out_w + ow;
      output[o] = manualgrad::max_pool_window<HAS_DEPTH, scalar_t>(input + p * g.in_volume(), g, od, oh, ow, best_index);
      indices[o] = best_index;
    });
  });
}

template <typename index_t>
void backward_pixels(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
                     const int64_t* sizes, const int64_t* depth) {
  const HostGeo<index_t> g(sizes, depth);
  with_depth(depth, [&](auto has_depth) {
    constexpr bool HAS_DEPTH = decltype(has_depth)::value;
    for_each_slice_element<HAS_DEPTH>(planes, g.in_d, g.in_h, g.in_w, [&](int64_t slice, index_t id, int64_t p,
                                                                          index_t ih, index_t iw) {
      grad_input[(slice * g.in_h + ih) * g.in_w + iw] = manualgrad::max_pool_backward_pixel<HAS_DEPTH, double>(
          grad_output + p * g.out_volume(), indices + p * g.out_volume(), g, id, ih, iw);
    });
  });
}

// Returns whether it ran column threads.
template <int KH, int KW, typename index_t>
bool depthwise_planes(double* output, const double* input, const double* weight, const double* bias, int64_t batch,
                      int64_t in_channels, int64_t out_channels, const int64_t* sizes) {
  const HostGeo<index_t> g(sizes, nullptr);
  const int64_t multiplier = out_channels / in_channels, taps = int64_t{g.kernel_h} * g.kernel_w;
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_plane = int64_t{g.out_h} * g.out_w;
  const PlainDivider<index_t> by_out_channels{static_cast<index_t>(out_channels)},
      by_multiplier{static_cast<index_t>(multiplier)};
  if constexpr (KH > 0) {
    if (manualgrad::depthwise_by_columns(g)) {  // as depthwise_forward_cuda chooses: columns of outputs
      const index_t column_blocks = manualgrad::depthwise_column_blocks(g.out_h);
      const PlainDivider<index_t> by_out_w{g.out_w}, by_column_blocks{column_blocks};
      const int64_t threads = batch * out_channels * column_blocks * g.out_w;
      for (int64_t x = 0; x < threads; ++x) {
        index_t oh0, ow, oc;
        const index_t n_oc = manualgrad::depthwise_column_of_thread(static_cast<index_t>(x), g.out_w, column_blocks,
                                                                    by_out_w, by_column_blocks, oh0, ow);
        const int64_t plane = manualgrad::depthwise_input_plane(n_oc, static_cast<index_t>(out_channels),
                                                                static_cast<index_t>(in_channels), by_out_channels,
                                                                by_multiplier, oc);
        manualgrad::depthwise_output_column<KH, KW>(output + n_oc * out_plane + ow, input + plane * in_plane,
                                                    weight + oc * taps, g, oh0, ow, bias != nullptr ? bias[oc] : 0.0);
      }
      return true;
    }
  }
  for_each_element(batch * out_channels, g.out_h, g.out_w, [&](int64_t n_oc, index_t oh, index_t ow) {
    index_t oc;
    const int64_t plane = manualgrad::depthwise_input_plane(static_cast<index_t>(n_oc), static_cast<index_t>(out_channels),
                                                            static_cast<index_t>(in_channels), by_out_channels,
                                                            by_multiplier, oc);
    output[n_oc * out_plane + int64_t{oh} * g.out_w + ow] = manualgrad::depthwise_output<KH, KW>(
        input + plane * in_plane, weight + oc * taps, g, oh, ow, bias != nullptr ? bias[oc] : 0.0);
  });
  return false;
}

template <int KH, int KW, typename index_t>
void depthwise_input_pixels(double* grad_input, const double* grad_output, const double* weight, int64_t batch,
                            int64_t in_channels, int64_t out_channels, const int64_t* sizes) {
  const HostGeo<index_t> g(sizes, nullptr);
  const int64_t multiplier = out_channels / in_channels, taps = int64_t{g.kernel_h} * g.kernel_w;
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_plane = int64_t{g.out_h} * g.out_w;
  const PlainDivider<index_t> by_in_channels{static_cast<index_t>(in_channels)};
  for_each_element(batch * in_channels, g.in_h, g.in_w, [&](int64_t nc, index_t ih, index_t iw) {
    const int64_t c = manualgrad::depthwise_channel(static_cast<index_t>(nc), static_cast<index_t>(in_channels),
                                                    by_in_channels);
    double sum = 0;
    for (int64_t q = 0; q < multiplier; ++q) {
      const int64_t oc = c * multiplier + q;
      sum = manualgrad::depthwise_input_gradient<KH, KW>(grad_output + (nc * multiplier + q) * out_plane,
                                                         weight + oc * taps, g, ih, iw, sum);
    }
    grad_input[nc * in_plane + int64_t{ih} * g.in_w + iw] = sum;
  });
}

// Runs body(Int<KH>, Int<KW>) unrolled for the windows depthwise_cuda.cu unrolls (when `unrolled`), else
// with Int<0>; returns whether it ran unrolled.
template <typename Body>
int with_window(const int64_t* sizes, int unrolled, const Body& body) {
  if (unrolled && manualgrad::dispatch_window(sizes[4], sizes[5], body)) return 1;
  return body(Int<0>(), Int<0>()), 0;
}

// Every thread of a per-cell launch, decoded to its cell as the kernel does, in increasing order or
// (reverse) decreasing: a cell writing a pixel that is another's shows up in one order or the other, as
// the race it would be on the GPU. In volumes the threads' slices are (n, c, id), as the kernel's.
template <bool HAS_DEPTH, int TILE, typename index_t>
void run_cells(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
               const manualgrad::CellGeo<index_t>& g, bool reverse) {
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_volume = int64_t{g.out_d} * g.out_h * g.out_w;
  const int64_t total = planes * g.in_d * g.cells_h * g.cells_w;
  const PlainDivider<index_t> by_cells_w{g.cells_w}, by_cells_h{g.cells_h};
  for (int64_t k = 0; k < total; ++k) {
    index_t ch, cw;
    const index_t slice = manualgrad::cell_of_thread(static_cast<index_t>(reverse ? total - 1 - k : k), g, by_cells_w,
                                                     by_cells_h, ch, cw);
    index_t id;
    const int64_t p = manualgrad::volume_of_slice<HAS_DEPTH>(slice, PlainDivider<index_t>{g.in_d}, g.in_d, id);
    manualgrad::max_pool_backward_cell<HAS_DEPTH, TILE, TILE, double>(
        grad_input + int64_t{slice} * in_plane, grad_output + p * out_volume, indices + p * out_volume, g, id, ch, cw);
  }
}

template <typename index_t>
int run_tile(manualgrad::CellShape shape, double* grad_input, const double* grad_output, const int64_t* indices,
             int64_t planes, const int64_t* s, const int64_t* depth, bool reverse) {
  manualgrad::CellGeo<index_t> g(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11],
                                 shape.starts_h, shape.starts_w);
  if (depth != nullptr) g.with_depth(depth[0], depth[1], depth[2], depth[3], depth[4], depth[5]);
  if (g.cell_h > shape.tile || g.cell_w > shape.tile) return 2;  // a cell would not fit the tile
  bool ran = false;
  with_depth(depth, [&](auto has_depth) {
    ran = manualgrad::dispatch_tile(shape.tile, [&](auto tile) {
      run_cells<decltype(has_depth)::value, decltype(tile)::value>(grad_input, grad_output, indices, planes, g, reverse);
    });
  });
  return ran ? 0 : 1;
}

}  // namespace

// Every entry takes the window geometry as `sizes`: in_h, in_w, out_h, out_w, kernel_h, kernel_w,
// stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w; the max-pool ones and the walk also `depth`:
// in_d, out_d, kernel_d, stride_d, pad_d, dilation_d for volumes (the kernels' HAS_DEPTH code), or null
// for planes; and compute in int64 if wide_index, else int32.
extern "C" {

// Fills visits (capacity rows of 5) with what the gather walk visits for each element of a volume or
// plane, elements in (d, h, w) order: (element, k, i, j, o).
int64_t walk_covering_windows(const int64_t* sizes, const int64_t* depth, int64_t* visits, int64_t capacity,
                              int wide_index) {
  return wide_index ? walk_volume<int64_t>(sizes, depth, visits, capacity)
                    : walk_volume<int32_t>(sizes, depth, visits, capacity);
}

// The max-pool forward kernel's threads, every output of every plane or volume: maxima and their indices.
void max_pool_forward_outputs(double* output, int64_t* indices, const double* input, int64_t planes,
                              const int64_t* sizes, const int64_t* depth, int wide_index) {
  wide_index ? forward_planes<int64_t>(output, indices, input, planes, sizes, depth)
             : forward_planes<int32_t>(output, indices, input, planes, sizes, depth);
}

// The same for integer planes (the kernel's integer dtypes start each window at the type's lowest value):
// int32 data when int_bytes is 4, int64 when 8.
void max_pool_forward_outputs_int(void* output, int64_t* indices, const void* input, int64_t planes,
                                  const int64_t* sizes, const int64_t* depth, int int_bytes) {
  if (int_bytes == 4) {
    forward_planes<int64_t>(static_cast<int32_t*>(output), indices, static_cast<const int32_t*>(input), planes, sizes,
                            depth);
  } else {
    forward_planes<int64_t>(static_cast<int64_t*>(output), indices, static_cast<const int64_t*>(input), planes, sizes,
                            depth);
  }
}

// The depthwise forward kernel's threads, every output: unrolled for the window (kernel_h, kernel_w) when
// unrolled is set and it is one the kernel unrolls, else with the sizes read at run time. Returns 0 for
// the run-time loop, 1 for unrolled threads of one output, 2 for unrolled column threads.
int depthwise_forward_outputs(double* output, const double* input, const double* weight, const double* bias,
                              int64_t batch, int64_t in_channels, int64_t out_channels, const int64_t* sizes,
                              int unrolled, int wide_index) {
  bool columns = false;
  const int ran_unrolled = with_window(sizes, unrolled, [&](auto kh, auto kw) {
    constexpr int KH = decltype(kh)::value, KW = decltype(kw)::value;
    columns = wide_index
        ? depthwise_planes<KH, KW, int64_t>(output, input, weight, bias, batch, in_channels, out_channels, sizes)
        : depthwise_planes<KH, KW, int32_t>(output, input, weight, bias, batch, in_channels, out_channels, sizes);
  });
  return ran_unrolled + int{columns};
}

// The depthwise input-gradient kernel's threads, every input element; unrolled as above.
int depthwise_backward_input_pixels(double* grad_input, const double* grad_output, const double* weight, int64_t batch,
                                    int64_t in_channels, int64_t out_channels, const int64_t* sizes, int unrolled,
                                    int wide_index) {
  return with_window(sizes, unrolled, [&](auto kh, auto kw) {
    constexpr int KH = decltype(kh)::value, KW = decltype(kw)::value;
    wide_index
        ? depthwise_input_pixels<KH, KW, int64_t>(grad_input, grad_output, weight, batch, in_channels, out_channels, sizes)
        : depthwise_input_pixels<KH, KW, int32_t>(grad_input, grad_output, weight, batch, in_channels, out_channels, sizes);
  });
}

// The per-pixel backward kernel's threads, every element of every plane or volume.
void max_pool_backward_pixels(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
                              const int64_t* sizes, const int64_t* depth, int wide_index) {
  wide_index ? backward_pixels<int64_t>(grad_input, grad_output, indices, planes, sizes, depth)
             : backward_pixels<int32_t>(grad_input, grad_output, indices, planes, sizes, depth);
}

// The per-cell backward kernel's threads, cells of (tile, starts_h, starts_w); tile 0 takes the shape the
// CUDA launcher would choose. reverse runs the cells last to first. Returns 0, or non-zero when the tile
// cannot hold the cells.
int max_pool_backward_cells(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
                            const int64_t* sizes, const int64_t* depth, int tile, int64_t starts_h, int64_t starts_w,
                            int wide_index, int reverse) {
  const manualgrad::CellShape shape =
      tile == 0 ? manualgrad::max_pool_cell_shape(sizes[0], sizes[1], sizes[6], sizes[7], sizes[10], sizes[11])
                : manualgrad::CellShape{tile, starts_h, starts_w};
  return wide_index ? run_tile<int64_t>(shape, grad_input, grad_output, indices, planes, sizes, depth, reverse != 0)
                    : run_tile<int32_t>(shape, grad_input, grad_output, indices, planes, sizes, depth, reverse != 0);
}

// The launcher's choice, as (tile, starts_h, starts_w) in out[0..2].
void max_pool_cell_shape(const int64_t* sizes, int64_t* out) {
  const manualgrad::CellShape shape =
      manualgrad::max_pool_cell_shape(sizes[0], sizes[1], sizes[6], sizes[7], sizes[10], sizes[11]);
  out[0] = shape.tile;
  out[1] = shape.starts_h;
  out[2] = shape.starts_w;
}
}
