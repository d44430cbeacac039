// vectorize.h — marks hot CPU loops to be compiled for AVX-512, AVX2 and baseline x86-64 alike;
// the loader picks the best the CPU has, so the wheel stays portable.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MANUALGRAD_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MANUALGRAD_VECTOR_CLONES
#endif
