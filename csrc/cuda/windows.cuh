// windows.cuh — the gather walk shared by the CUDA backward kernels (col2im, max-pool backward): for
// one input pixel, every (kernel tap, output position) pair whose window placed that tap on it.
#pragma once

#include "../shape_checks.h"

namespace manualgrad {

// Calls f(i, j, o) for each kernel tap (i, j) and output position o = oh*OW + ow whose window puts tap
// (i, j) on input pixel (ih, iw), taps in row-major order (a fixed order: the sums are deterministic).
// Tap i reaches the pixel from the window starting at ih + pad_h - i*dilation_h, which must be a
// multiple of the stride and the start of an output row in [0, OH); taps that cannot are skipped
// without being visited, so a huge kernel costs only the taps that land.
template <typename F>
__device__ inline void for_each_covering_window(const Geometry& g, int64_t ih, int64_t iw, const F& f) {
  const Window2d& w = g.win;
  const int64_t h0 = ih + w.pad_h, w0 = iw + w.pad_w;
  const int64_t reach_h = (g.out_h - 1) * w.stride_h, reach_w = (g.out_w - 1) * w.stride_w;
  const int64_t i_lo = h0 > reach_h ? ceil_div(h0 - reach_h, w.dilation_h) : 0;
  const int64_t i_hi = std::min(w.kernel_h - 1, h0 / w.dilation_h);
  const int64_t j_lo = w0 > reach_w ? ceil_div(w0 - reach_w, w.dilation_w) : 0;
  const int64_t j_hi = std::min(w.kernel_w - 1, w0 / w.dilation_w);
  for (int64_t i = i_lo; i <= i_hi; ++i) {
    const int64_t h = h0 - i * w.dilation_h;
    if (h % w.stride_h != 0) continue;
    for (int64_t j = j_lo; j <= j_hi; ++j) {
      const int64_t v = w0 - j * w.dilation_w;
      if (v % w.stride_w != 0) continue;
      f(i, j, (h / w.stride_h) * g.out_w + v / w.stride_w);
    }
  }
}

}  // namespace manualgrad
