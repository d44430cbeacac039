// host_device.h — markers for code that nvcc compiles for the GPU and the host compiler for the CPU:
// shape_checks.h's small helpers, and the CUDA kernels' index logic (cuda/window_walk.h,
// cuda/max_pool_threads.h), which tests/test_cuda_logic.py builds with the host compiler and checks on
// any machine.
#pragma once

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
