// blas.h — the one matrix product the CPU kernels call: row-major C = alpha·op(A)·op(B) + beta·C, run on the
// calling thread, by OpenBLAS (the scipy-openblas32 wheel, loaded at import; see blas.cpp) or else by
// ATen's own matrix product (torch's BLAS, MKL on x86).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace manualgrad {

// op(A) is m×k (A is k×m, row stride lda, when trans_a), op(B) is k×n, C is m×n with row stride ldc.
// beta == 0 never reads C (it may hold garbage). Single-threaded and deterministic: the same arguments give
// the same bits on every call; callers split the work into tasks themselves (conv_cpu.cpp).
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc);

// The same product with its sum over k cut into runs of `chunk` (the last may be shorter), each run a product of
// its own added into C in order (beta = 1 after the first). A float32 product's rounding error grows with the
// length of its longest sequential sum; summing short runs keeps the forward's error at or below torch's direct
// convolutions' (benchmarks/NOTES.md), for a few more passes over C.
template <typename T>
void gemm_in_chunks(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                    const T* b, int64_t ldb, T beta, T* c, int64_t ldc, int64_t chunk);

// C = alpha·A·op(B) + beta·C (A not transposed) as products of at most `rows` rows of A and C each, every one
// gemm_in_chunks' with this chunk (rows <= 0: one product). The blocks depend on m and rows alone.
template <typename T>
void gemm_by_rows(bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                  int64_t ldb, T beta, T* c, int64_t ldc, int64_t chunk, int64_t rows);

// The most rows m for which the backend runs an m×n×k product with neither operand transposed by kernels that read
// A where it lies: OpenBLAS's small-matrix kernels for AVX-512 (SkylakeX, Cooperlake, Sapphire Rapids), which it
// takes while m·n·k <= 100^3 (its sgemm_small_kernel_permit), where its blocked kernels first copy (pack) all of A.
// 0 where the backend has no such kernels (ATen's product, OpenBLAS's others) and for double (not measured).
template <typename T>
int64_t small_product_rows(int64_t n, int64_t k);

// The forward's products sum float32 in runs of k (gemm_in_chunks; grouped_cpu.cpp's direct sums too), then the
// runs' sums one after the other: runs of 64 while 64^2 >= 2k, else the next power of two that is. Both sums then
// stay short; on the bench rows the error is then 0.84-1.02x torch's, where one product was 1.3-2.0x (a fixed 64
// gave 1.12x at k = 4608, 128 gave 1.23x at k = 768, and runs of 32 up to sqrt(k) 1.04x there; benchmarks/NOTES.md).
template <typename scalar_t>
inline int64_t forward_chunk(int64_t k) {
  if (!std::is_same_v<scalar_t, float>) return k;
  int64_t chunk = 64;
  while (chunk * chunk < 2 * k) chunk *= 2;
  return chunk;
}

// The channels-last forward's runs are at least 256 long. There torch (oneDNN) sums each output in one run, and
// its float32 error is 1-5x its own NCHW one; runs of 256 stay at or below it (0.27-1.00x of it on ResNet-50's and
// MobileNetV2's layers) and take 3-20% less time than runs of 64, which passed over C four times as often.
template <typename scalar_t>
inline int64_t nhwc_forward_chunk(int64_t k) {
  return std::max<int64_t>(256, forward_chunk<scalar_t>(k));
}

// Loads OpenBLAS from `path` (private to us: RTLD_LOCAL, one thread) and makes it the backend. On a CPU with
// AVX-512 it takes OpenBLAS's SkylakeX kernels (TORCH_MANUALGRAD_OPENBLAS_CORETYPE overrides): OpenBLAS 0.3.34
// takes Zen 5 for an AVX2 (Haswell) machine, at half the speed. Returns "" on success, else why not (the
// backend is then unchanged).
std::string use_openblas(const std::string& path);
// Makes ATen's matrix product the backend.
void use_torch_blas();
// The backend in words, e.g. "OpenBLAS 0.3.34 (SkylakeX kernels)".
std::string blas_description();

}  // namespace manualgrad
