// vectorize.h — marks hot CPU loops to be compiled for AVX-512, AVX2 and baseline x86-64 alike (the loader picks
// the best the CPU has, so the wheel stays portable), and the 64-byte vector type those loops use.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MANUALGRAD_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
// The same for loops on 32-byte vectors as well as 64-byte ones: AVX-512F alone fuses only 64-byte multiply-adds
// (a 32-byte one needs AVX512VL or FMA), so its 32-byte arithmetic would be a multiply and an add, slower and
// rounded differently from the 64-byte code beside it. x86-64-v4 is AVX-512 F, BW, CD, DQ and VL, FMA included.
#define MANUALGRAD_VECTOR_CLONES_VL __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MANUALGRAD_VECTOR_CLONES
#define MANUALGRAD_VECTOR_CLONES_VL
#endif

namespace manualgrad {

// BYTES of scalar_t as one GCC vector, whose arithmetic is, lane by lane, exactly the scalar code's (a struct: an
// alias template would drop the attribute); load_vec fills one from any address (by reference: a vector this wide
// passed by value would change the ABI between the clones).
template <typename scalar_t, int BYTES>
struct VecBytes {
  typedef scalar_t type __attribute__((vector_size(BYTES)));
  static constexpr int64_t lanes = BYTES / sizeof(scalar_t);
};
// ...64 of them: an AVX-512 register, two or four on narrower CPUs.
template <typename scalar_t>
struct Vec64 : VecBytes<scalar_t, 64> {};

template <typename V, typename scalar_t>
inline void load_vec(V& v, const scalar_t* p) {
  std::memcpy(&v, p, sizeof(V));
}

// dst[0, n) = src[0, n), and zero_run's dst[0, n) = 0, for short runs (im2col_nhwc's: a 3-channel stem's kernel
// row, 9 or 21 values; a depthwise plane's padded rows) in fixed-size moves, which compile inline: a call to
// memmove or memset per run took as long as the GEMM on the channels-last 7x7 stem (a plain loop is turned back
// into that call).
template <typename scalar_t>
inline void copy_run(scalar_t* __restrict dst, const scalar_t* __restrict src, int64_t n) {
  int64_t i = 0;
  for (; i + 64 / int64_t(sizeof(scalar_t)) <= n; i += 64 / sizeof(scalar_t)) std::memcpy(dst + i, src + i, 64);
  for (int64_t part = 32 / sizeof(scalar_t); part > 0; part /= 2) {
    if (n - i >= part) {
      std::memcpy(dst + i, src + i, part * sizeof(scalar_t));
      i += part;
    }
  }
}

template <typename scalar_t>
inline void zero_run(scalar_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 64 / int64_t(sizeof(scalar_t)) <= n; i += 64 / sizeof(scalar_t)) std::memset(dst + i, 0, 64);
  for (int64_t part = 32 / sizeof(scalar_t); part > 0; part /= 2) {
    if (n - i >= part) {
      std::memset(dst + i, 0, part * sizeof(scalar_t));
      i += part;
    }
  }
}

}  // namespace manualgrad
