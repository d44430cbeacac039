// vectorize.h — marks hot CPU loops to be compiled for AVX-512, AVX2 and baseline x86-64 alike (the loader picks
// the best the CPU has, so the wheel stays portable), and the vector type those loops use: 64 bytes (an AVX-512
// register) in most files; depthwise_cpu.cpp and grouped_cpu.cpp are compiled a second time with 32-byte vectors
// (*_w32.cpp, which define MANUALGRAD_VECTOR_BYTES first), for CPUs without AVX-512, and wide_vectors() picks one
// of the two at each call (conv_cpu.cpp's small-K kernel, the one such kernel there, is a template over both widths).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#ifndef MANUALGRAD_VECTOR_BYTES
#define MANUALGRAD_VECTOR_BYTES 64
#endif
#if MANUALGRAD_VECTOR_BYTES == 64
#define MANUALGRAD_WIDTH w64
#elif MANUALGRAD_VECTOR_BYTES == 32
#define MANUALGRAD_WIDTH w32
#else
#error "MANUALGRAD_VECTOR_BYTES is 64 or 32"
#endif

// The AVX2 clones are x86-64-v3's (AVX2 with FMA): with "avx2" alone GCC had no fused multiply-add there.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#if MANUALGRAD_VECTOR_BYTES == 64
#define MANUALGRAD_VECTOR_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else  // 32-byte arithmetic on an AVX-512 CPU needs VL to be fused as the scalar tails are (below)
#define MANUALGRAD_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
// The same for loops on 32-byte vectors as well as 64-byte ones: AVX-512F alone fuses only 64-byte multiply-adds
// (a 32-byte one needs AVX512VL or FMA), so its 32-byte arithmetic would be a multiply and an add, slower and
// rounded differently from the 64-byte code beside it. x86-64-v4 is AVX-512 F, BW, CD, DQ and VL, FMA included.
#define MANUALGRAD_VECTOR_CLONES_VL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
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
  // the same vector at any scalar_t's address, for load_vec
  typedef scalar_t unaligned __attribute__((vector_size(BYTES), aligned(sizeof(scalar_t)), may_alias));
  static constexpr int64_t lanes = BYTES / sizeof(scalar_t);
};
// ...MANUALGRAD_VECTOR_BYTES of them: one register of the CPUs this build's copy of a file is for, and how many
// such registers there are (AVX-512: 32; AVX2: 16 of 32 bytes, where a 64-byte vector takes two and the kernels'
// register blocks, sized for AVX-512, spilled to the stack: a channels-last 7x7 stem took 16x torch's time on a
// Zen 3, a grouped 3x3 at 14x14 17x).
// (In a namespace of their width: the two copies' types and inline functions must not be taken for each other.)
namespace MANUALGRAD_WIDTH {
template <typename scalar_t>
struct Vec : VecBytes<scalar_t, MANUALGRAD_VECTOR_BYTES> {};
constexpr int kVectorRegisters = MANUALGRAD_VECTOR_BYTES == 64 ? 32 : 16;
}  // namespace MANUALGRAD_WIDTH
using MANUALGRAD_WIDTH::kVectorRegisters;
using MANUALGRAD_WIDTH::Vec;

// What this CPU reports (asked once).
struct CpuTraits {
  bool intel;    // Intel's
  bool avx512f;  // AVX-512F
};
inline const CpuTraits& cpu_traits() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const CpuTraits traits = [] {
    __builtin_cpu_init();
    return CpuTraits{__builtin_cpu_is("intel") != 0, __builtin_cpu_supports("avx512f") != 0};
  }();
#else
  static const CpuTraits traits{false, false};
#endif
  return traits;
}

// Whether this CPU is Intel's: kernels whose speed against another depends on how a CPU executes 64-byte vectors
// (the Intel Xeons measured: two full-width FMA units; AMD's Zen 4: 32-byte halves) choose by it where both were
// measured. (A proxy: some Intel parts have one 512-bit FMA unit.)
inline bool cpu_is_intel() { return cpu_traits().intel; }

// Whether this CPU has AVX-512F: what code written for it with intrinsics needs, whatever the settings.
inline bool cpu_has_avx512f() { return cpu_traits().avx512f; }

// Whether this CPU takes the 64-byte copies of the kernels (it has AVX-512F) or the 32-byte ones.
// TORCH_MANUALGRAD_VECTOR_BYTES=32 or 64, read at each call, overrides it (the tests run both on any CPU).
inline bool wide_vectors() {
  if (const char* choice = std::getenv("TORCH_MANUALGRAD_VECTOR_BYTES")) {
    if (std::strcmp(choice, "32") == 0) return false;
    if (std::strcmp(choice, "64") == 0) return true;
  }
  return cpu_has_avx512f();
}

// A std::vector whose data starts on a 64-byte line: scratch that vectors are loaded from at multiples of their
// width (malloc aligns large blocks to 16 bytes, so every other 32-byte load crossed a cache line; the grouped
// weight gradient's loop ran 1.3x slower for it on a Zen 3).
template <typename T>
struct LineAligned {
  using value_type = T;
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using aligned_vector = std::vector<T, LineAligned<T>>;

// `call` (a function of the file compiled twice) in the copy this CPU takes.
#define MANUALGRAD_BY_WIDTH(call) (::manualgrad::wide_vectors() ? w64::call : w32::call)

// v = the vector at p, any scalar_t's address. Through the unaligned vector type, not memcpy: GCC copied the 32-byte
// vectors that memcpy put into an array of three or more (a kernel's weight vectors, say) through the stack in
// 16-byte halves, then read each back whole, a failed store-to-load forwarding in every iteration (the AVX2 copy of
// the channels-last grouped forward at 7x7 ran at a quarter of torch's speed, the grouped weight gradient at half).
template <typename V, typename scalar_t>
[[gnu::always_inline]] inline void load_vec(V& v, const scalar_t* p) {
  static_assert(sizeof(v[0]) == sizeof(scalar_t), "a vector of scalar_t");
  v = *reinterpret_cast<const typename VecBytes<scalar_t, sizeof(V)>::unaligned*>(p);
}

// Whether n values are all finite: x - x is 0 for those, NaN for infinities and NaN. Inline, so that it runs at the
// width of the clone that calls it (in this form GCC vectorises the loop; a bound on |x| it compiled to a compare and
// branch a value, 40% of the grouped weight gradient's plane copies).
template <typename scalar_t>
[[gnu::always_inline]] inline bool all_finite(const scalar_t* __restrict v, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(v[i] - v[i] == scalar_t(0));
  return bad == 0;
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

// dst[x * step] = src[x % phases][x / phases] for x < width, 0 where src[x % phases] is null: a row of a strided
// convolution's input gradient from its phases' rows. Inline, to run at the caller's clone's width: the common case
// (stride 2, a contiguous row, both phases reached) is a loop the vector clones turn into permutes and whole-vector
// stores.
template <typename scalar_t>
[[gnu::always_inline]] inline void interleave_phases(scalar_t* __restrict dst, int64_t step, const scalar_t* const* src,
                                                     int64_t phases, int64_t width) {
  if (step == 1 && phases == 2 && src[0] && src[1]) {
    const scalar_t* __restrict a = src[0];
    const scalar_t* __restrict b = src[1];
    const int64_t pairs = width / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      dst[2 * j] = a[j];
      dst[2 * j + 1] = b[j];
    }
    if (width % 2) dst[width - 1] = a[pairs];
    return;
  }
  for (int64_t x = 0, j = 0; x < width; ++j)
    for (int64_t r = 0; r < phases && x < width; ++r, ++x) dst[x * step] = src[r] ? src[r][j] : scalar_t(0);
}

}  // namespace manualgrad
