// windows.cuh — what the CUDA kernels share: the launch shape, the choice of 32- or 64-bit index
// arithmetic, and the geometry the kernels compute with (the gather walk over it: window_walk.h).
#pragma once

#include "../shape_checks.h"
#include "window_walk.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace manualgrad {

constexpr int kThreads = 256;

// Whether the environment variable `name` is set to "0": the kernels' switches to their simpler paths
// (TORCH_MANUALGRAD_POOL_CELLS, TORCH_MANUALGRAD_DEPTHWISE_COLUMNS), for measuring what the faster path
// gains and testing one against the other. Read on each call, so that one process can compare both.
inline bool switched_off(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "0") == 0;
}

// A grid-stride launch: enough blocks to fill the GPU, each thread looping over the rest.
inline unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), int64_t{1} << 20)));
}

// Division of a non-negative index by a size fixed for the whole launch. GPUs have no integer divide
// instruction, and in these memory-bound kernels the index arithmetic was the bottleneck: for int32,
// ATen's IntDivider turns each division into a multiply-high and a shift with a magic number computed
// once on the host; int64 divides plainly.
template <typename index_t>
struct Divider {
  using unsigned_t = std::make_unsigned_t<index_t>;
  at::cuda::detail::IntDivider<unsigned_t> d;
  explicit Divider(int64_t divisor) : d(static_cast<unsigned_t>(check_positive(divisor))) {}
  MANUALGRAD_HOST_DEVICE index_t div(index_t n) const { return static_cast<index_t>(d.div(static_cast<unsigned_t>(n))); }
  MANUALGRAD_HOST_DEVICE index_t mod(index_t n) const { return static_cast<index_t>(d.mod(static_cast<unsigned_t>(n))); }

 private:
  static int64_t check_positive(int64_t divisor) {  // IntDivider would divide by it on the host
    TORCH_INTERNAL_ASSERT(divisor >= 1, "Divider: divisor must be positive, got ", divisor);
    return divisor;
  }
};

// The geometry in the index type the kernel computes with. 64-bit division costs several times
// 32-bit, and index arithmetic is most of what a memory-bound kernel executes, so kernels run in
// int32 whenever every size and every tensor they touch allow it (see fits_int32). The depth fields
// are read only by the kernels of volumes (max_pool_cuda.cu's HAS_DEPTH); 2-d kernels leave them be.
template <typename index_t>
struct Geo {
  index_t in_d, in_h, in_w, out_d, out_h, out_w;
  index_t kernel_d, kernel_h, kernel_w, stride_d, stride_h, stride_w;
  index_t pad_d, pad_h, pad_w, dilation_d, dilation_h, dilation_w;
  Divider<index_t> by_in_d, by_in_h, by_in_w, by_out_d, by_out_h, by_out_w, by_stride_d, by_stride_h, by_stride_w;
  index_t step_d, step_h, step_w;              // covering_step along each axis
  index_t tap_step_d, tap_step_h, tap_step_w;  // covering_tap_step along each axis
  explicit Geo(const Geometry& g)
      : in_d(g.in_d), in_h(g.in_h), in_w(g.in_w), out_d(g.out_d), out_h(g.out_h), out_w(g.out_w),
        kernel_d(g.win.kernel_d), kernel_h(g.win.kernel_h), kernel_w(g.win.kernel_w),
        stride_d(g.win.stride_d), stride_h(g.win.stride_h), stride_w(g.win.stride_w),
        pad_d(g.win.pad_d), pad_h(g.win.pad_h), pad_w(g.win.pad_w),
        dilation_d(g.win.dilation_d), dilation_h(g.win.dilation_h), dilation_w(g.win.dilation_w),
        by_in_d(g.in_d), by_in_h(g.in_h), by_in_w(g.in_w), by_out_d(g.out_d), by_out_h(g.out_h), by_out_w(g.out_w),
        by_stride_d(g.win.stride_d), by_stride_h(g.win.stride_h), by_stride_w(g.win.stride_w),
        step_d(covering_step(g.win.stride_d, g.win.dilation_d)), step_h(covering_step(g.win.stride_h, g.win.dilation_h)),
        step_w(covering_step(g.win.stride_w, g.win.dilation_w)),
        tap_step_d(covering_tap_step(g.win.stride_d, g.win.dilation_d)),
        tap_step_h(covering_tap_step(g.win.stride_h, g.win.dilation_h)),
        tap_step_w(covering_tap_step(g.win.stride_w, g.win.dilation_w)) {}

  // A flat index into (planes, in_h, in_w) → its plane, with (ih, iw); split_output likewise for
  // (planes, out_h, out_w). What a plane is (an image's channel, a column block, one depth of a volume)
  // is the caller's.
  __device__ index_t split_input(index_t x, index_t& ih, index_t& iw) const {
    const index_t rest = by_in_w.div(x), plane = by_in_h.div(rest);
    iw = x - rest * in_w;
    ih = rest - plane * in_h;
    return plane;
  }
  __device__ index_t split_output(index_t x, index_t& oh, index_t& ow) const {
    const index_t rest = by_out_w.div(x), plane = by_out_h.div(rest);
    ow = x - rest * out_w;
    oh = rest - plane * out_h;
    return plane;
  }
};

// True when int32 arithmetic cannot overflow: every length, stride, padding and dilated kernel extent
// under 2^28 (so sums of a few of them stay under 2^31), and every tensor under 2^31 elements.
inline bool fits_int32(const Geometry& g, std::initializer_list<int64_t> numels) {
  constexpr int64_t kSize = int64_t{1} << 28;
  const Window& w = g.win;
  for (int64_t v : {g.in_d, g.in_h, g.in_w, g.out_d, g.out_h, g.out_w, w.stride_d, w.stride_h, w.stride_w, w.pad_d,
                    w.pad_h, w.pad_w, w.dilation_d, w.dilation_h, w.dilation_w})
    if (v >= kSize) return false;
  if (w.kernel_d >= kSize / w.dilation_d || w.kernel_h >= kSize / w.dilation_h || w.kernel_w >= kSize / w.dilation_w)
    return false;
  for (int64_t n : numels)
    if (n > std::numeric_limits<int32_t>::max()) return false;
  return true;
}

// Calls body.template operator()<index_t>() with int32_t or int64_t as fits_int32 decides.
#define MANUALGRAD_DISPATCH_INDEX(use_int32, ...) \
  [&] {                                          \
    if (use_int32) {                             \
      using index_t = int32_t;                   \
      __VA_ARGS__();                             \
    } else {                                     \
      using index_t = int64_t;                   \
      __VA_ARGS__();                             \
    }                                            \
  }()

}  // namespace manualgrad
