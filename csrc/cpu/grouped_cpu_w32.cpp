// grouped_cpu_w32.cpp — grouped_cpu.cpp compiled with 32-byte vectors (namespace w32), for CPUs without AVX-512: their
// register blocks then fit AVX2's sixteen 32-byte registers (vectorize.h).
#define MANUALGRAD_VECTOR_BYTES 32
#include "grouped_cpu.cpp"
