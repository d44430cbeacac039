// tasks.h — how the CPU kernels run work in parallel: tasks on ATen's thread pool, each with single-threaded BLAS.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cstdint>

namespace manualgrad {

// MKL's thread-local thread count (MKL_Set_Num_Threads_Local, exported by the libtorch_cpu that
// bundles MKL; null where torch was built with another BLAS). Weak, so the extension loads either way.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// Keeps the calling thread's BLAS calls on that one thread while it lives, then restores the thread's
// own setting. Inside ATen's parallel region MKL still sees torch's thread count (mkl_get_max_threads()
// returns it on every worker, and libgomp allows nested regions), so without this a GEMM may fan out
// into a nested team and split its sum over k by that count: bits that change with
// torch.set_num_threads (seen on Intel Xeon, where MKL takes its AVX-512 paths). With one thread MKL
// runs its sequential code, the same for every thread count and whether or not the task runs inline.
// Thread-local, so nothing changes for the user's own BLAS calls on any thread.
class SequentialBlas {
 public:
  SequentialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0 restores the global setting
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_;
};

// Runs f(begin, end) over tasks [0, count) on ATen's thread pool, each chunk with single-threaded BLAS
// (SequentialBlas). The guards are set on each worker thread, since thread-local state is not
// inherited: the ATen calls there are plain arithmetic and must not record autograd history.
template <typename F>
void parallel_tasks(int64_t count, const F& f) {
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SequentialBlas sequential_blas;
    f(begin, end);
  });
}

}  // namespace manualgrad
