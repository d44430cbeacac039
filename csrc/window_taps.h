// window_taps.h — which taps of a window land inside the input: the clipping every max-pool kernel does,
// CPU and CUDA alike. Plain C++ (no ATen), so the host test of the CUDA logic compiles it too.
#pragma once

#include "host_device.h"

namespace manualgrad {

// The taps [lo, hi) of a window starting at `start` (dilated by `dilation`) that land inside [0, size);
// hi <= lo when none does. (Undilated windows, the usual case, need no division.)
template <typename index_t>
MANUALGRAD_HOST_DEVICE inline void taps_inside(index_t start, index_t kernel, index_t dilation, index_t size,
                                               index_t& lo, index_t& hi) {
  if (dilation == 1) {
    lo = start >= 0 ? 0 : -start;
    const index_t reach = size - start;
    hi = reach < kernel ? reach : kernel;
    return;
  }
  lo = start >= 0 ? 0 : -start / dilation + (-start % dilation != 0);
  const index_t reach = start > size - 1 ? 0 : (size - 1 - start) / dilation + 1;
  hi = reach < kernel ? reach : kernel;
}

}  // namespace manualgrad
