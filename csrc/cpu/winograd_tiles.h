// winograd_tiles.h — the tile transforms of Winograd's F(2x2, 3x3), on scalars or on vectors of channels: for the
// dense kernels (winograd_cpu.cpp) and the grouped ones (grouped_cpu.cpp).
#pragma once

namespace manualgrad {

// Always inlined: called out of line (as GCC once chose to) they stop the loops around them from being vectorised
// (a 64 -> 64 forward at 56x56 took 1.4x the time), and they must compile for the caller's instruction set.

// B^T d B of one 4x4 input tile d: v[4a + b]. B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
template <typename T>
[[gnu::always_inline]] inline void winograd_input_transform(const T (&d)[4][4], T (&v)[16]) {
  T r[4][4];  // d B, row by row
  for (int i = 0; i < 4; ++i) {
    r[i][0] = d[i][0] - d[i][2];
    r[i][1] = d[i][1] + d[i][2];
    r[i][2] = d[i][2] - d[i][1];
    r[i][3] = d[i][1] - d[i][3];
  }
  for (int b = 0; b < 4; ++b) {
    v[b] = r[0][b] - r[2][b];
    v[4 + b] = r[1][b] + r[2][b];
    v[8 + b] = r[2][b] - r[1][b];
    v[12 + b] = r[1][b] - r[3][b];
  }
}

// A^T M A + bias of one tile's 16 products m[4a + b]: y[2p + q]. A^T = [1 1 1 0; 0 1 -1 -1].
template <typename T>
[[gnu::always_inline]] inline void winograd_output_transform(const T (&m)[16], T bias, T (&y)[4]) {
  T s[2][4];  // A^T M
  for (int b = 0; b < 4; ++b) {
    s[0][b] = m[b] + m[4 + b] + m[8 + b];
    s[1][b] = m[4 + b] - m[8 + b] - m[12 + b];
  }
  for (int p = 0; p < 2; ++p) {
    y[2 * p] = s[p][0] + s[p][1] + s[p][2] + bias;
    y[2 * p + 1] = s[p][1] - s[p][2] - s[p][3] + bias;
  }
}

// The weight gradient's transform of one tile's 2x2 output gradient: A dY A^T, m[4a + b] (the adjoint of
// winograd_output_transform). A = [1 0; 1 1; 1 -1; 0 -1].
template <typename T>
[[gnu::always_inline]] inline void winograd_grad_transform(const T (&dy)[2][2], T (&m)[16]) {
  T r[2][4];  // dY A^T, row by row
  for (int p = 0; p < 2; ++p) {
    r[p][0] = dy[p][0];
    r[p][1] = dy[p][0] + dy[p][1];
    r[p][2] = dy[p][0] - dy[p][1];
    r[p][3] = -dy[p][1];
  }
  for (int b = 0; b < 4; ++b) {
    m[b] = r[0][b];
    m[4 + b] = r[0][b] + r[1][b];
    m[8 + b] = r[0][b] - r[1][b];
    m[12 + b] = -r[1][b];
  }
}

}  // namespace manualgrad
