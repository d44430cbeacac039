// vectorize.h — marks hot CPU loops to be compiled for AVX-512, AVX2 and baseline x86-64 alike (the loader picks
// the best the CPU has, so the wheel stays portable), and the 64-byte vector type those loops use.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MANUALGRAD_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MANUALGRAD_VECTOR_CLONES
#endif

namespace manualgrad {

// 64 bytes of scalar_t as one GCC vector (an AVX-512 register; two or four on narrower CPUs), whose arithmetic is,
// lane by lane, exactly the scalar code's; load_vec fills one from any address (by reference: a vector this
// wide passed by value would change the ABI between the clones).
template <typename scalar_t>
struct Vec64 {
  typedef scalar_t type __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 64 / sizeof(scalar_t);
};

template <typename V, typename scalar_t>
inline void load_vec(V& v, const scalar_t* p) {
  std::memcpy(&v, p, sizeof(V));
}

}  // namespace manualgrad
