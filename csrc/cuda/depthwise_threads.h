// depthwise_threads.h — what one thread of the CUDA depthwise forward computes: one output's dot product
// over its window. Plain C++ that also compiles for the host, so that tests/test_cuda_logic.py runs this
// exact code on the CPU against torch. depthwise_cuda.cu holds the kernels around it.
#pragma once

#include "../host_device.h"

#include <cstdint>

namespace manualgrad {

// sum + the dot product of output (oh, ow)'s window over one (in_h, in_w) input plane with the
// channel's weights w, taps in the padding skipped, in row-major tap order. KH, KW > 0 (the common
// windows) fixes the window's size at compile time, so that the loops unroll and all of the window's
// loads are issued before the first is used; 0 takes the sizes from g. G: the kernels' Geo
// (windows.cuh) or the test's host stand-in.
template <int KH, int KW, typename acc_t, typename scalar_t, typename index_t, typename G>
MANUALGRAD_HOST_DEVICE inline acc_t depthwise_output(const scalar_t* plane, const scalar_t* w, const G& g, index_t oh,
                                                     index_t ow, acc_t sum) {
  const index_t h0 = oh * g.stride_h - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
  if constexpr (KH > 0 && KW > 0) {
    // Every load first, then the sums: left interleaved, the compiler kept only two or three loads in
    // flight ahead of the multiply-adds that wait for them.
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

}  // namespace manualgrad
