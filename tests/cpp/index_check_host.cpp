// index_check_host.cpp — a host build of shape_checks.h's index_from_window, the test every index passes
// in the CUDA max-pool backward's index check (first_foreign_index_kernel in max_pool_cuda.cu), behind a C
// entry point for tests/test_cuda_logic.py. shape_checks.h needs ATen's headers, but nothing here calls
// into ATen's library: only the inline check runs.
#include "../../csrc/shape_checks.h"

extern "C" {

// accepted[k] = whether index_from_window takes candidates[k] as an index output (od, oh, ow) could give,
// for an (in_d, in_h, in_w) volume and the window given as kernel, stride, padding, dilation (d, h, w each).
void indices_from_window(int8_t* accepted, const int64_t* candidates, int64_t count, int64_t od, int64_t oh,
                         int64_t ow, int64_t in_d, int64_t in_h, int64_t in_w, const int64_t* window) {
  manualgrad::Window w;
  w.kernel_d = window[0], w.kernel_h = window[1], w.kernel_w = window[2];
  w.stride_d = window[3], w.stride_h = window[4], w.stride_w = window[5];
  w.pad_d = window[6], w.pad_h = window[7], w.pad_w = window[8];
  w.dilation_d = window[9], w.dilation_h = window[10], w.dilation_w = window[11];
  for (int64_t k = 0; k < count; ++k)
    accepted[k] = manualgrad::index_from_window(candidates[k], od, oh, ow, in_d, in_h, in_w, w) ? 1 : 0;
}
}
