// blas.cpp — the CPU kernels' matrix product (blas.h): OpenBLAS through its C interface when loaded, else ATen.
// Why OpenBLAS: torch's bundled MKL runs its AVX2 code on AMD processors, about 90 GFLOP/s per Zen 5 core in
// float32, where OpenBLAS's AVX-512 (SkylakeX) kernels reach 180–210 on the same shapes (benchmarks/NOTES.md).
// On Intel processors MKL is the faster one, and _blas.py leaves ATen's product (MKL) in place there.
// We keep our own copy, loaded with RTLD_LOCAL and set to one thread, so that neither numpy's nor scipy's
// OpenBLAS, nor torch's MKL, nor the user's thread settings change what we compute.
#include "blas.h"

#include <ATen/ATen.h>

#include "tasks.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdlib>
#include <mutex>
#include <optional>

namespace manualgrad {
namespace {

// cblas_?gemm with 32-bit integers (scipy-openblas32). Layout 101 = row-major, 111/112 = (no) transpose.
template <typename T>
using CblasGemm = void (*)(int, int, int, int, int, int, T, const T*, int, const T*, int, T, T*, int);

struct OpenBlas {
  CblasGemm<float> sgemm = nullptr;
  CblasGemm<double> dgemm = nullptr;
  std::string description;
  bool small_kernels = false;  // small_product_rows
};

std::atomic<const OpenBlas*> active{nullptr};  // null: ATen's product
std::mutex loading;

bool fits_int(std::initializer_list<int64_t> values) {
  for (int64_t v : values)
    if (v > INT_MAX) return false;
  return true;
}

// The Fortran sgemm_ and dgemm_ of the MKL that torch bundles in libtorch_cpu, found through the library that
// exports MKL_Set_Num_Threads_Local (tasks.h; only that MKL does); null where torch has no MKL. The call at::mm
// makes for float32 and float64, without what at::mm does around it (two tensors made from the pointers, a
// dispatch, a precision lookup): a tenth of the samples of a channels-last Winograd forward with 32 output channels,
// whose products are many small ones (an Intel Xeon, 128 -> 32 at 28x28).
template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                             const int*, const T*, const int*, const T*, T*, const int*);
struct TorchMkl {
  FortranGemm<float> sgemm = nullptr;
  FortranGemm<double> dgemm = nullptr;
};
const TorchMkl& torch_mkl() {
  static const TorchMkl mkl = [] {
    TorchMkl found;
    Dl_info info;
    if (!MKL_Set_Num_Threads_Local || !dladdr(reinterpret_cast<void*>(MKL_Set_Num_Threads_Local), &info) ||
        !info.dli_fname)
      return found;
    void* handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!handle) return found;
    found.sgemm = reinterpret_cast<FortranGemm<float>>(dlsym(handle, "sgemm_"));
    found.dgemm = reinterpret_cast<FortranGemm<double>>(dlsym(handle, "dgemm_"));
    if (!found.sgemm || !found.dgemm) found = TorchMkl{};
    return found;
  }();
  return mkl;
}

// Torch's MKL called directly, as at::mm would call it: row-major C = op(A) op(B) is column-major
// C^T = op(B)^T op(A)^T. Returns false (nothing done) where there is no such MKL or at::mm would do more than one
// plain call (k = 0, alpha other than 1 with beta = 0, sizes past int, leading dimensions BLAS refuses).
template <typename T>
bool torch_mkl_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                    const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto f = [] {
    if constexpr (std::is_same_v<T, float>) return torch_mkl().sgemm;
    else return torch_mkl().dgemm;
  }();
  if (!f || k <= 0 || (beta == T(0) && alpha != T(1)) || !fits_int({m, n, k, lda, ldb, ldc}) ||
      lda < (trans_a ? m : k) || ldb < (trans_b ? k : n) || ldc < n)
    return false;
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
  f(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  return true;
}

// at::mm over the same memory: each operand viewed as a strided matrix, transposed views where asked.
template <typename T>
void aten_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (torch_mkl_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) return;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (beta == T(0)) {
    at::mm_out(out, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b));
    if (alpha != T(1)) out.mul_(alpha);
  } else {
    out.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
  }
}

// Sets an environment variable for the lifetime of the object, then puts back what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {  // value null: unset
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) setenv(name, value, 1);
    else unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_) setenv(name_, old_->c_str(), 1);
    else unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// The OpenBLAS kernels we run: TORCH_MANUALGRAD_OPENBLAS_CORETYPE if set; else SkylakeX on any CPU with AVX-512
// (F, BW, DQ, VL) and Haswell on any with AVX2 and FMA, so that Intel and AMD processors of one class run the
// same code; null (OpenBLAS's own detection) elsewhere. The environment's OPENBLAS_CORETYPE is not ours to
// read: it configures the user's OpenBLAS (numpy's), and some set it to Haswell for numpy's sake.
const char* core_type() {
  if (const char* mine = std::getenv("TORCH_MANUALGRAD_OPENBLAS_CORETYPE")) return mine;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
  return nullptr;
}

template <typename F>
F symbol(void* handle, const char* name) {
  // scipy-openblas wheels prefix every symbol with scipy_; a plain OpenBLAS build has none.
  void* p = dlsym(handle, (std::string("scipy_") + name).c_str());
  if (!p) p = dlsym(handle, name);
  return reinterpret_cast<F>(p);
}

}  // namespace

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  // A matrix of one row may carry any row stride; BLAS insists on at least its width.
  if ((trans_a ? k : m) == 1) lda = std::max<int64_t>(lda, trans_a ? m : k);
  if ((trans_b ? n : k) == 1) ldb = std::max<int64_t>(ldb, trans_b ? k : n);
  if (m == 1) ldc = std::max<int64_t>(ldc, n);
  const OpenBlas* blas = active.load(std::memory_order_acquire);
  if (blas && k > 0 && fits_int({m, n, k, lda, ldb, ldc})) {
    const auto f = [&] {
      if constexpr (std::is_same_v<T, float>) return blas->sgemm;
      else return blas->dgemm;
    }();
    f(101, trans_a ? 112 : 111, trans_b ? 112 : 111, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb), beta, c,
      int(ldc));
    return;
  }
  aten_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                           int64_t, double, double*, int64_t);

template <typename T>
void gemm_in_chunks(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                    const T* b, int64_t ldb, T beta, T* c, int64_t ldc, int64_t chunk) {
  if (k <= chunk) return gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  for (int64_t k0 = 0; k0 < k; k0 += chunk) {
    // column k0 of op(A), row k0 of op(B)
    gemm(trans_a, trans_b, m, n, std::min(chunk, k - k0), alpha, trans_a ? a + k0 * lda : a + k0, lda,
         trans_b ? b + k0 : b + k0 * ldb, ldb, k0 == 0 ? beta : T(1), c, ldc);
  }
}

template <typename T>
void gemm_by_rows(bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                  int64_t ldb, T beta, T* c, int64_t ldc, int64_t chunk, int64_t rows) {
  if (rows <= 0) rows = m;
  for (int64_t r0 = 0; r0 < m; r0 += rows)
    gemm_in_chunks(false, trans_b, std::min(rows, m - r0), n, k, alpha, a + r0 * lda, lda, b, ldb, beta, c + r0 * ldc,
                   ldc, chunk);
}

template <typename T>
int64_t small_product_rows(int64_t n, int64_t k) {
  const OpenBlas* blas = active.load(std::memory_order_acquire);
  if (!std::is_same_v<T, float> || !blas || !blas->small_kernels || n <= 0 || k <= 0) return 0;
  return 1000000 / (n * k);
}

template void gemm_by_rows<float>(bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                                  float, float*, int64_t, int64_t, int64_t);
template void gemm_by_rows<double>(bool, int64_t, int64_t, int64_t, double, const double*, int64_t, const double*,
                                   int64_t, double, double*, int64_t, int64_t, int64_t);
template int64_t small_product_rows<float>(int64_t, int64_t);
template int64_t small_product_rows<double>(int64_t, int64_t);

template void gemm_in_chunks<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                                    int64_t, float, float*, int64_t, int64_t);
template void gemm_in_chunks<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                                     const double*, int64_t, double, double*, int64_t, int64_t);

std::string use_openblas(const std::string& path) {
  const std::lock_guard<std::mutex> lock(loading);
  // OpenBLAS reads both variables once, while it loads: one thread (we run one call per task ourselves, and its
  // own pool would only sit idle), and the kernels chosen for this CPU.
  const ScopedEnv one_thread("OPENBLAS_NUM_THREADS", "1");
  const ScopedEnv core("OPENBLAS_CORETYPE", core_type());
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) return std::string("cannot load ") + path + ": " + dlerror();
  auto* blas = new OpenBlas();  // lives as long as the process: kernels may be running on the old one
  blas->sgemm = symbol<CblasGemm<float>>(handle, "cblas_sgemm");
  blas->dgemm = symbol<CblasGemm<double>>(handle, "cblas_dgemm");
  const auto set_threads = symbol<void (*)(int)>(handle, "openblas_set_num_threads");
  const auto corename = symbol<char* (*)()>(handle, "openblas_get_corename");
  const auto config = symbol<char* (*)()>(handle, "openblas_get_config");
  if (!blas->sgemm || !blas->dgemm || !set_threads) {
    delete blas;
    return path + " has no cblas_sgemm/cblas_dgemm/openblas_set_num_threads";
  }
  set_threads(1);
  std::string version = config ? config() : "OpenBLAS";
  version = version.substr(0, version.find(' ', version.find(' ') + 1));  // "OpenBLAS 0.3.34..."
  const std::string kernels = corename ? corename() : "?";
  blas->description = version + " (" + kernels + " kernels)";
  blas->small_kernels = kernels == "SkylakeX" || kernels == "Cooperlake" || kernels == "SapphireRapids";
  active.store(blas, std::memory_order_release);
  return "";
}

void use_torch_blas() { active.store(nullptr, std::memory_order_release); }

std::string blas_description() {
  const OpenBlas* blas = active.load(std::memory_order_acquire);
  if (blas) return blas->description;
  return torch_mkl().sgemm ? "torch's MKL (sgemm_, dgemm_)" : "torch's BLAS (at::mm)";
}

}  // namespace manualgrad
