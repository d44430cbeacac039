// depthwise_threads.h — what one thread of the CUDA depthwise forward and input-gradient kernels
// computes: one output's dot product over its window (or a column of outputs' at once), and one input
// element's gather of weight × delta from the windows over it. Plain C++ that also compiles for the
// host, so that tests/test_cuda_logic.py runs this exact code on the CPU against torch.
// depthwise_cuda.cu holds the kernels around it.
#pragma once

#include "../host_device.h"
#include "window_walk.h"

#include <cstdint>

namespace manualgrad {

// Calls body(Int<KH>, Int<KW>) for the window sizes that have unrolled kernels (forward, input and
// weight gradients); returns false for the others.
template <typename Body>
inline bool dispatch_window(int64_t kh, int64_t kw, const Body& body) {
  if (kh == 3 && kw == 3) return body(Int<3>(), Int<3>()), true;
  if (kh == 5 && kw == 5) return body(Int<5>(), Int<5>()), true;
  if (kh == 7 && kw == 7) return body(Int<7>(), Int<7>()), true;
  if (kh == 1 && kw == 3) return body(Int<1>(), Int<3>()), true;
  if (kh == 1 && kw == 5) return body(Int<1>(), Int<5>()), true;
  if (kh == 1 && kw == 7) return body(Int<1>(), Int<7>()), true;
  return false;
}

// Which planes a thread works on. Output channel oc reads input channel oc / multiplier. For the
// output plane n*C_out + oc: returns the input plane n*C_in + oc / multiplier, and sets oc. Div: the
// kernels' Divider (windows.cuh) or the test's plain division.
template <typename index_t, typename Div>
MANUALGRAD_HOST_DEVICE inline index_t depthwise_input_plane(index_t n_oc, index_t out_channels, index_t in_channels,
                                                            const Div& by_out_channels, const Div& by_multiplier,
                                                            index_t& oc) {
  const index_t n = by_out_channels.div(n_oc);
  oc = n_oc - n * out_channels;
  return n * in_channels + by_multiplier.div(oc);
}

// For the input plane n*C_in + c: its channel c (whose output channels are c*multiplier + q, q <
// multiplier, in output planes nc*multiplier + q).
template <typename index_t, typename Div>
MANUALGRAD_HOST_DEVICE inline index_t depthwise_channel(index_t nc, index_t in_channels, const Div& by_in_channels) {
  return nc - by_in_channels.div(nc) * in_channels;
}

// sum + the dot product of output (oh, ow)'s window over one (in_h, in_w) input plane with the
// channel's weights w, taps in the padding skipped, in row-major tap order. KH, KW > 0 (the common
// windows) fixes the window's size at compile time, so that the loops unroll and the window's loads
// are issued ahead of the multiply-adds (in two batches for 3x3, by the SASS); 0 takes the sizes from g. G: the kernels' Geo
// (windows.cuh) or the test's host stand-in.
template <int KH, int KW, typename acc_t, typename scalar_t, typename index_t, typename G>
MANUALGRAD_HOST_DEVICE inline acc_t depthwise_output(const scalar_t* plane, const scalar_t* w, const G& g, index_t oh,
                                                     index_t ow, acc_t sum) {
  const index_t h0 = oh * g.stride_h - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
  if constexpr (KH > 0 && KW > 0) {
    // Every load first, then the sums: written interleaved, the compiler kept only two or three loads
    // in flight ahead of the multiply-adds that wait for them.
    acc_t values[KH * KW], weights[KH * KW];
    bool inside[KH * KW];
    MANUALGRAD_UNROLL
    for (int i = 0; i < KH; ++i) {
      const index_t ih = h0 + i * g.dilation_h;
      MANUALGRAD_UNROLL
      for (int j = 0; j < KW; ++j) {
        const index_t iw = w0 + j * g.dilation_w;
        const int t = i * KW + j;
        inside[t] = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
        values[t] = inside[t] ? static_cast<acc_t>(plane[ih * g.in_w + iw]) : acc_t(0);
        weights[t] = static_cast<acc_t>(w[t]);
      }
    }
    MANUALGRAD_UNROLL
    for (int t = 0; t < KH * KW; ++t)
      if (inside[t]) sum += weights[t] * values[t];
    return sum;
  } else {
    for (index_t i = 0; i < g.kernel_h; ++i) {
      const index_t ih = h0 + i * g.dilation_h;
      if (ih < 0 || ih >= g.in_h) continue;
      for (index_t j = 0; j < g.kernel_w; ++j) {
        const index_t iw = w0 + j * g.dilation_w;
        if (iw >= 0 && iw < g.in_w)
          sum += static_cast<acc_t>(w[i * g.kernel_w + j]) * static_cast<acc_t>(plane[ih * g.in_w + iw]);
      }
    }
    return sum;
  }
}

// With stride_h = dilation_h = 1 the unrolled forward gives each thread a column of kColumnRows
// vertically adjacent outputs: their windows share all but one input row with the next, so the thread
// loads kColumnRows + KH - 1 rows of its KW columns once (3x3: 18 loads for 4 outputs, against 36 one
// thread per output), and decodes its position and loads its weights once. Nsight Compute found the
// one-output-per-thread kernel issue-bound (SM 79% busy, DRAM 23%), so fewer instructions per output is
// what it needs.
constexpr int kColumnRows = 4;

// Planes of fewer than kColumnRows output rows (every conv1d: height 1) keep one output per thread: a
// column would compute rows that are never stored.
template <typename G>
MANUALGRAD_HOST_DEVICE inline bool depthwise_by_columns(const G& g) {
  return g.stride_h == 1 && g.dilation_h == 1 && g.out_h >= kColumnRows;
}

// Blocks of kColumnRows rows in a plane of out_h output rows (the last may hang past the plane).
template <typename index_t>
MANUALGRAD_HOST_DEVICE inline index_t depthwise_column_blocks(index_t out_h) {
  return (out_h + kColumnRows - 1) / kColumnRows;
}

// Thread x of a column launch: returns its output plane n*C_out + oc and sets its first row oh0 and its
// column ow. ow runs fastest (neighbouring threads load and store neighbouring elements), then the
// plane's column_blocks = ceil(out_h / kColumnRows) blocks of rows, then the planes.
template <typename index_t, typename Div>
MANUALGRAD_HOST_DEVICE inline index_t depthwise_column_of_thread(index_t x, index_t out_w, index_t column_blocks,
                                                                 const Div& by_out_w, const Div& by_column_blocks,
                                                                 index_t& oh0, index_t& ow) {
  const index_t rest = by_out_w.div(x), plane = by_column_blocks.div(rest);
  ow = x - rest * out_w;
  oh0 = (rest - plane * column_blocks) * kColumnRows;
  return plane;
}

// Outputs (oh0 + r, ow) for r < kColumnRows, rows past out_h left out: start + the dot product of each
// window, stored at out[(oh0 + r) * out_w], where out points at column ow of the output plane. The same
// terms in the same order as depthwise_output, so bit-identical to it.
template <int KH, int KW, typename acc_t, typename scalar_t, typename index_t, typename G>
MANUALGRAD_HOST_DEVICE inline void depthwise_output_column(scalar_t* out, const scalar_t* plane, const scalar_t* w,
                                                           const G& g, index_t oh0, index_t ow, acc_t start) {
  static_assert(KH > 0 && KW > 0, "column threads are for the unrolled windows");
  constexpr int kRows = kColumnRows + KH - 1;
  const index_t h0 = oh0 - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
  acc_t weights[KH * KW], values[kRows][KW];
  bool inside[kRows][KW];
  MANUALGRAD_UNROLL
  for (int t = 0; t < KH * KW; ++t) weights[t] = static_cast<acc_t>(w[t]);
  MANUALGRAD_UNROLL
  for (int k = 0; k < kRows; ++k) {
    const index_t ih = h0 + k;
    MANUALGRAD_UNROLL
    for (int j = 0; j < KW; ++j) {
      const index_t iw = w0 + j * g.dilation_w;
      inside[k][j] = ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
      values[k][j] = inside[k][j] ? static_cast<acc_t>(plane[ih * g.in_w + iw]) : acc_t(0);
    }
  }
  acc_t sums[kColumnRows];
  MANUALGRAD_UNROLL
  for (int r = 0; r < kColumnRows; ++r) {
    sums[r] = start;
    MANUALGRAD_UNROLL
    for (int i = 0; i < KH; ++i) {
      MANUALGRAD_UNROLL
      for (int j = 0; j < KW; ++j)
        if (inside[r + i][j]) sums[r] += weights[i * KW + j] * values[r + i][j];
    }
  }
  // Stored after every sum, as in the build timed on the H100: with each row's store right after its sum,
  // nvcc 13 issued the 7x7 window's loads two at a time between the multiply-adds instead of all at once
  MANUALGRAD_UNROLL
  for (int r = 0; r < kColumnRows; ++r)
    if (oh0 + r < g.out_h) out[(oh0 + r) * g.out_w] = static_cast<scalar_t>(sums[r]);
}

// sum + the gradient that input element (ih, iw) of one plane receives from one output channel: over
// every window with a tap (i, j) on it, weight w[i, j] times that output's delta in grad_output (one
// (out_h, out_w) plane), in increasing output order (as the walk of window_walk.h visits them). KH, KW > 0
// unrolls the taps, from the last (the earliest output) to the first, with none of the walk's loop and
// range arithmetic left; 0 walks the covering windows with sizes from g.
template <int KH, int KW, typename acc_t, typename scalar_t, typename index_t, typename G>
MANUALGRAD_HOST_DEVICE inline acc_t depthwise_input_gradient(const scalar_t* grad_output, const scalar_t* w, const G& g,
                                                             index_t ih, index_t iw, acc_t sum) {
  if constexpr (KH > 0 && KW > 0) {
    const index_t ph = ih + g.pad_h, pw = iw + g.pad_w;  // padded coordinates
    // Along each axis, tap t lands on the element for output o = (p - t*dilation) / stride when that
    // divides exactly and o is an output.
    index_t oh[KH], ow[KW];
    MANUALGRAD_UNROLL
    for (int a = 0; a < KH; ++a) {
      const index_t rest = ph - (KH - 1 - a) * g.dilation_h;
      const index_t o = rest >= 0 ? g.by_stride_h.div(rest) : index_t(-1);
      oh[a] = rest >= 0 && o * g.stride_h == rest && o < g.out_h ? o : index_t(-1);
    }
    MANUALGRAD_UNROLL
    for (int b = 0; b < KW; ++b) {
      const index_t rest = pw - (KW - 1 - b) * g.dilation_w;
      const index_t o = rest >= 0 ? g.by_stride_w.div(rest) : index_t(-1);
      ow[b] = rest >= 0 && o * g.stride_w == rest && o < g.out_w ? o : index_t(-1);
    }
    acc_t deltas[KH * KW], weights[KH * KW];
    MANUALGRAD_UNROLL
    for (int a = 0; a < KH; ++a) {
      MANUALGRAD_UNROLL
      for (int b = 0; b < KW; ++b) {
        const bool hit = oh[a] >= 0 && ow[b] >= 0;
        deltas[a * KW + b] = hit ? static_cast<acc_t>(grad_output[oh[a] * g.out_w + ow[b]]) : acc_t(0);
        weights[a * KW + b] = static_cast<acc_t>(w[(KH - 1 - a) * KW + (KW - 1 - b)]);
      }
    }
    MANUALGRAD_UNROLL
    for (int a = 0; a < KH; ++a) {
      MANUALGRAD_UNROLL
      for (int b = 0; b < KW; ++b)
        if (oh[a] >= 0 && ow[b] >= 0) sum += weights[a * KW + b] * deltas[a * KW + b];
    }
    return sum;
  } else {
    for_each_covering_window(g, ih, iw, [&](index_t i, index_t j, index_t o) {
      sum += static_cast<acc_t>(w[i * g.kernel_w + j]) * static_cast<acc_t>(grad_output[o]);
    });
    return sum;
  }
}

}  // namespace manualgrad
