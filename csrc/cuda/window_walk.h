// window_walk.h — the gather walk of the CUDA backward kernels (col2im, depthwise grad-input, max-pool's
// per-pixel gather): for one input element, of a plane or a volume, the windows that have a tap on it. Plain C++ that also compiles
// for the host, so tests/test_cuda_logic.py checks this exact code against a brute-force enumeration.
// G is the kernels' Geo (windows.cuh) or the test's host stand-in: the window's sizes per axis and
// dividers by the strides (PlainDivider where a plain division will do).
#pragma once

#include "../host_device.h"

#include <cstdint>
#include <numeric>

namespace manualgrad {

// Division by a size, as the kernels' Divider (windows.cuh) does it but plainly: for the host tests, and
// for the few divisions per thread that are not worth a Divider's magic numbers.
template <typename index_t>
struct PlainDivider {
  index_t d;
  MANUALGRAD_HOST_DEVICE index_t div(index_t n) const { return n / d; }
};

// Along one axis, consecutive outputs whose windows have a tap on the same pixel are this many apart:
// o and o' both reach it iff (o' - o) * stride is a multiple of dilation.
inline int64_t covering_step(int64_t stride, int64_t dilation) { return dilation / std::gcd(stride, dilation); }

// ...and their taps on it are this many apart: t and t' both land on it iff (t - t') * dilation is a
// multiple of stride.
inline int64_t covering_tap_step(int64_t stride, int64_t dilation) { return stride / std::gcd(stride, dilation); }

// The outputs o in [lo, hi] along one axis whose window reaches padded coordinate p (= input
// coordinate + padding), i.e. p = o*stride + t*dilation for a tap t in [0, kernel).
template <typename index_t, typename Div>
MANUALGRAD_HOST_DEVICE inline void covering_range(index_t p, index_t kernel, index_t stride, const Div& by_stride,
                                                  index_t dilation, index_t outputs, index_t& lo, index_t& hi) {
  const index_t span = p - (kernel - 1) * dilation;
  if (span <= 0) {
    lo = 0;
  } else {
    const index_t q = by_stride.div(span);
    lo = q + (q * stride != span);
  }
  const index_t last = by_stride.div(p);
  hi = last < outputs - 1 ? last : outputs - 1;
}

// Moves o to the first output in [o, hi] whose window has a tap on padded coordinate p, and returns
// whether there is one; o starts at the first output whose window reaches p (covering_range). The
// outputs that have a tap on p recur every `step` outputs, and their taps every `tap_step` taps, so
// whichever is shorter, `step` consecutive outputs or `tap_step` consecutive taps, holds the first of
// them or shows there is none. (Scanning outputs alone cost up to `dilation` candidates at stride 1,
// where a tap scan finds it at once.)
template <typename index_t>
MANUALGRAD_HOST_DEVICE inline bool first_covering(index_t p, index_t stride, index_t dilation, index_t step,
                                                  index_t tap_step, index_t hi, index_t& o) {
  if (dilation == 1) return o <= hi;
  if (o > hi) return false;
  if (tap_step < step) {
    // Larger taps belong to earlier outputs: from the largest tap output o could use, downwards.
    const index_t top = (p - o * stride) / dilation;
    for (index_t t = top; t >= 0 && t > top - tap_step; --t) {
      const index_t rest = p - t * dilation;
      if (rest % stride == 0) {
        o = rest / stride;
        return o <= hi;
      }
    }
    return false;
  }
  for (index_t k = 0; k < step && o <= hi; ++k, ++o)
    if ((p - o * stride) % dilation == 0) return true;
  return false;
}

// The tap of output o that lands on padded coordinate p (o found by first_covering and its steps).
template <typename index_t>
MANUALGRAD_HOST_DEVICE inline index_t tap_at(index_t p, index_t o, index_t stride, index_t dilation) {
  const index_t d = p - o * stride;
  return dilation == 1 ? d : d / dilation;
}

// Calls f(k, i, j, o) for each output position o = (od*OH + oh)*OW + ow whose window puts its tap
// (k, i, j) on input element (id, ih, iw), in increasing o: a fixed order, so sums over the calls are
// deterministic. Only the windows that have a tap on the element are visited (at most KD*KH*KW of them),
// after a search for the first of them of at most min(step, tap_step) candidates per axis, so neither a
// huge kernel nor a large dilation costs much more than the taps that land. HAS_DEPTH false: a plane
// (depth 1, id 0), whose walk is the 2-d one with no depth arithmetic at all (G need not have depth
// fields then).
template <bool HAS_DEPTH, typename index_t, typename G, typename F>
MANUALGRAD_HOST_DEVICE inline void for_each_covering_window(const G& g, index_t id, index_t ih, index_t iw, const F& f) {
  index_t od_lo = 0, od_hi = 0, pd = 0;
  if constexpr (HAS_DEPTH) {
    pd = id + g.pad_d;
    covering_range(pd, g.kernel_d, g.stride_d, g.by_stride_d, g.dilation_d, g.out_d, od_lo, od_hi);
    if (!first_covering(pd, g.stride_d, g.dilation_d, g.step_d, g.tap_step_d, od_hi, od_lo)) return;
  }
  const index_t ph = ih + g.pad_h, pw = iw + g.pad_w;
  index_t oh_lo, oh_hi, ow_lo, ow_hi;
  covering_range(ph, g.kernel_h, g.stride_h, g.by_stride_h, g.dilation_h, g.out_h, oh_lo, oh_hi);
  covering_range(pw, g.kernel_w, g.stride_w, g.by_stride_w, g.dilation_w, g.out_w, ow_lo, ow_hi);
  if (!first_covering(ph, g.stride_h, g.dilation_h, g.step_h, g.tap_step_h, oh_hi, oh_lo)) return;
  if (!first_covering(pw, g.stride_w, g.dilation_w, g.step_w, g.tap_step_w, ow_hi, ow_lo)) return;
  for (index_t od = od_lo; od <= od_hi;) {
    index_t k = 0, slice = 0;  // the depth tap, and the first output row of depth od
    if constexpr (HAS_DEPTH) k = tap_at(pd, od, g.stride_d, g.dilation_d), slice = od * g.out_h;
    for (index_t oh = oh_lo; oh <= oh_hi; oh += g.step_h) {
      const index_t i = tap_at(ph, oh, g.stride_h, g.dilation_h), row = (slice + oh) * g.out_w;
      for (index_t ow = ow_lo; ow <= ow_hi; ow += g.step_w) {
        f(k, i, tap_at(pw, ow, g.stride_w, g.dilation_w), row + ow);
      }
    }
    if constexpr (HAS_DEPTH) {
      od += g.step_d;
    } else {
      break;
    }
  }
}

// The same over one plane: f(i, j, o) for o = oh*OW + ow (col2im, the depthwise input gradient).
template <typename index_t, typename G, typename F>
MANUALGRAD_HOST_DEVICE inline void for_each_covering_window(const G& g, index_t ih, index_t iw, const F& f) {
  for_each_covering_window<false>(g, index_t(0), ih, iw, [&](index_t, index_t i, index_t j, index_t o) { f(i, j, o); });
}

}  // namespace manualgrad
