// cuda_logic_host.cpp — a host build of the CUDA kernels' index logic for tests/test_cuda_logic.py:
// the gather walk (csrc/cuda/window_walk.h) and what each max-pool thread computes
// (csrc/cuda/max_pool_threads.h) and each depthwise forward thread (csrc/cuda/depthwise_threads.h),
// run for every output, pixel or cell in turn as the kernels' threads would, behind C entry points that
// ctypes can call.
#include "../../csrc/cuda/depthwise_threads.h"
#include "../../csrc/cuda/max_pool_threads.h"
#include "../../csrc/cuda/window_walk.h"

namespace {

using manualgrad::Int;

// The host stand-in for the kernels' Geo (csrc/cuda/windows.cuh): the same fields, plain division.
template <typename index_t>
struct PlainDivider {
  index_t d;
  index_t div(index_t n) const { return n / d; }
};

template <typename index_t>
struct HostGeo {
  index_t in_h, in_w, out_h, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  PlainDivider<index_t> by_stride_h, by_stride_w;
  index_t step_h, step_w, tap_step_h, tap_step_w;
  explicit HostGeo(const int64_t* s)
      : in_h(s[0]), in_w(s[1]), out_h(s[2]), out_w(s[3]), kernel_h(s[4]), kernel_w(s[5]), stride_h(s[6]),
        stride_w(s[7]), pad_h(s[8]), pad_w(s[9]), dilation_h(s[10]), dilation_w(s[11]),
        by_stride_h{static_cast<index_t>(s[6])}, by_stride_w{static_cast<index_t>(s[7])},
        step_h(manualgrad::covering_step(s[6], s[10])), step_w(manualgrad::covering_step(s[7], s[11])),
        tap_step_h(manualgrad::covering_tap_step(s[6], s[10])), tap_step_w(manualgrad::covering_tap_step(s[7], s[11])) {}
};

// Every pixel of one plane in turn, each visit as (pixel, i, j, o); returns the number of visits, or -1
// past `capacity` visits.
template <typename index_t>
int64_t walk_plane(const int64_t* sizes, int64_t* visits, int64_t capacity) {
  const HostGeo<index_t> g(sizes);
  int64_t count = 0;
  for (index_t ih = 0; ih < g.in_h; ++ih)
    for (index_t iw = 0; iw < g.in_w; ++iw)
      manualgrad::for_each_covering_window(g, ih, iw, [&](index_t i, index_t j, index_t o) {
        if (count < capacity) {
          int64_t* v = visits + 4 * count;
          v[0] = int64_t{ih} * g.in_w + iw;
          v[1] = i;
          v[2] = j;
          v[3] = o;
        }
        ++count;
      });
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

template <typename index_t, typename scalar_t>
void forward_planes(scalar_t* output, int64_t* indices, const scalar_t* input, int64_t planes, const int64_t* sizes) {
  const HostGeo<index_t> g(sizes);
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_plane = int64_t{g.out_h} * g.out_w;
  for_each_element(planes, g.out_h, g.out_w, [&](int64_t p, index_t oh, index_t ow) {
    index_t best_index;
    const int64_t o = p * out_plane + int64_t{oh} * g.out_w + ow;
    output[o] = manualgrad::max_pool_window<scalar_t>(input + p * in_plane, g, oh, ow, best_index);
    indices[o] = best_index;
  });
}

template <typename index_t>
void backward_pixels(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
                     const int64_t* sizes) {
  const HostGeo<index_t> g(sizes);
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_plane = int64_t{g.out_h} * g.out_w;
  for_each_element(planes, g.in_h, g.in_w, [&](int64_t p, index_t ih, index_t iw) {
    grad_input[p * in_plane + int64_t{ih} * g.in_w + iw] = manualgrad::max_pool_backward_pixel<double>(
        grad_output + p * out_plane, indices + p * out_plane, g, ih, iw);
  });
}

// Returns whether it ran column threads.
template <int KH, int KW, typename index_t>
bool depthwise_planes(double* output, const double* input, const double* weight, const double* bias, int64_t batch,
                      int64_t in_channels, int64_t out_channels, const int64_t* sizes) {
  const HostGeo<index_t> g(sizes);
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
  const HostGeo<index_t> g(sizes);
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
// the race it would be on the GPU.
template <int TILE, typename index_t>
void run_cells(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
               const manualgrad::CellGeo<index_t>& g, bool reverse) {
  const int64_t in_plane = int64_t{g.in_h} * g.in_w, out_plane = int64_t{g.out_h} * g.out_w;
  const int64_t total = planes * g.cells_h * g.cells_w;
  const PlainDivider<index_t> by_cells_w{g.cells_w}, by_cells_h{g.cells_h};
  for (int64_t k = 0; k < total; ++k) {
    index_t ch, cw;
    const int64_t p = manualgrad::cell_of_thread(static_cast<index_t>(reverse ? total - 1 - k : k), g, by_cells_w,
                                                 by_cells_h, ch, cw);
    manualgrad::max_pool_backward_cell<TILE, TILE, double>(grad_input + p * in_plane, grad_output + p * out_plane,
                                                           indices + p * out_plane, g, ch, cw);
  }
}

template <typename index_t>
int run_tile(manualgrad::CellShape shape, double* grad_input, const double* grad_output, const int64_t* indices,
             int64_t planes, const int64_t* s, bool reverse) {
  const manualgrad::CellGeo<index_t> g(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], s[11],
                                       shape.starts_h, shape.starts_w);
  if (g.cell_h > shape.tile || g.cell_w > shape.tile) return 2;  // a cell would not fit the tile
  const bool ran = manualgrad::dispatch_tile(shape.tile, [&](auto tile) {
    run_cells<decltype(tile)::value>(grad_input, grad_output, indices, planes, g, reverse);
  });
  return ran ? 0 : 1;
}

}  // namespace

// Every entry takes the window geometry as `sizes`: in_h, in_w, out_h, out_w, kernel_h, kernel_w,
// stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w; and computes in int64 if wide_index, else int32.
extern "C" {

// Fills visits (capacity rows of 4) with what the gather walk visits for each pixel of a
// plane, pixels in row-major order.
int64_t walk_covering_windows(const int64_t* sizes, int64_t* visits, int64_t capacity, int wide_index) {
  return wide_index ? walk_plane<int64_t>(sizes, visits, capacity) : walk_plane<int32_t>(sizes, visits, capacity);
}

// The max-pool forward kernel's threads, every output of every plane: maxima and their indices.
void max_pool_forward_outputs(double* output, int64_t* indices, const double* input, int64_t planes,
                              const int64_t* sizes, int wide_index) {
  wide_index ? forward_planes<int64_t>(output, indices, input, planes, sizes)
             : forward_planes<int32_t>(output, indices, input, planes, sizes);
}

// The same for integer planes (the kernel's integer dtypes start each window at the type's lowest value):
// int32 data when int_bytes is 4, int64 when 8.
void max_pool_forward_outputs_int(void* output, int64_t* indices, const void* input, int64_t planes,
                                  const int64_t* sizes, int int_bytes) {
  if (int_bytes == 4) {
    forward_planes<int64_t>(static_cast<int32_t*>(output), indices, static_cast<const int32_t*>(input), planes, sizes);
  } else {
    forward_planes<int64_t>(static_cast<int64_t*>(output), indices, static_cast<const int64_t*>(input), planes, sizes);
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

// The per-pixel backward kernel's threads, every pixel of every plane.
void max_pool_backward_pixels(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
                              const int64_t* sizes, int wide_index) {
  wide_index ? backward_pixels<int64_t>(grad_input, grad_output, indices, planes, sizes)
             : backward_pixels<int32_t>(grad_input, grad_output, indices, planes, sizes);
}

// The per-cell backward kernel's threads, cells of (tile, starts_h, starts_w); tile 0 takes the shape the
// CUDA launcher would choose. reverse runs the cells last to first. Returns 0, or non-zero when the tile
// cannot hold the cells.
int max_pool_backward_cells(double* grad_input, const double* grad_output, const int64_t* indices, int64_t planes,
                            const int64_t* sizes, int tile, int64_t starts_h, int64_t starts_w, int wide_index,
                            int reverse) {
  const manualgrad::CellShape shape =
      tile == 0 ? manualgrad::max_pool_cell_shape(sizes[0], sizes[1], sizes[6], sizes[7], sizes[10], sizes[11])
                : manualgrad::CellShape{tile, starts_h, starts_w};
  return wide_index ? run_tile<int64_t>(shape, grad_input, grad_output, indices, planes, sizes, reverse != 0)
                    : run_tile<int32_t>(shape, grad_input, grad_output, indices, planes, sizes, reverse != 0);
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
