// host_device.h — markers for code that nvcc compiles for the GPU and the host compiler for the CPU:
// shape_checks.h's small helpers, window_taps.h, and the CUDA kernels' index logic (cuda/window_walk.h,
// cuda/max_pool_threads.h, cuda/depthwise_threads.h), which tests/test_cuda_logic.py builds with the host
// compiler and checks on any machine.
#pragma once

#include <type_traits>

#if defined(__CUDACC__)
#define MANUALGRAD_HOST_DEVICE __host__ __device__
#else
#define MANUALGRAD_HOST_DEVICE
#endif

// Unrolling hints, for the device pass only (host compilers do not know the pragma).
#if defined(__CUDA_ARCH__)
#define MANUALGRAD_UNROLL _Pragma("unroll")
#define MANUALGRAD_UNROLL_BY_4 _Pragma("unroll 4")
#else
#define MANUALGRAD_UNROLL
#define MANUALGRAD_UNROLL_BY_4
#endif

namespace manualgrad {

// A size fixed at compile time, passed to a generic lambda by the dispatchers that pick a kernel's
// template arguments at run time (dispatch_tile, dispatch_window).
template <int N>
using Int = std::integral_constant<int, N>;

}  // namespace manualgrad
