// depthwise_cpu.cpp — depthwise convolution on the CPU computed directly, tap by tap (the same sums as
// im2col + GEMM, without the columns).
//   forward:      out[n, oc]      = (sum over taps (i, j) of w[oc, i, j] × the input slice tap (i, j) sees) + bias[oc]
//   grad_input:   grad_in[n, c]   = each tap adds w[oc, i, j] × grad_out[n, oc] back into its slice
//   grad_weight:  grad_w[oc, i, j] = sum over images and positions of grad_out × the slice tap (i, j) saw
// Each task owns what it writes (output planes or rows, input-gradient rows, weight-gradient channels or one
// row's terms) and every sum has a fixed order, so results do not depend on the thread count.
// Taps that fall in the padding are skipped, as torch's kernels do (so an infinite weight or gradient
// does not turn the border into NaN): time and memory follow the taps inside the input, not the padding,
// stride or dilation. For speed, the forward and the weight gradient read each chunk of output columns'
// input rows from a small ring of zero-padded copies, so every tap sweeps the whole chunk as one
// vectorised run; a zero there adds weight × 0 = ±0, which changes no sum (a sum starting from +0 is never
// -0), and a tap whose factor is not finite takes the exact
// in-bounds run instead. Which path a tap takes depends on the geometry and values alone. With stride 1 and
// finite weights the forward sums all of an output row's taps in registers (taps_row), in the same order.
// (NCHW forward, 2-core Zen 5, batch 8: 3x3 over 144 channels at 56x56 3.1-3.4 -> 1.6-1.7 ms, 5x5 over 240 at
// 28x28 3.4 -> 1.2, 7x7 over 96 at 56x56 6.3 -> 2.3; torch 2.2-2.7, 0.45-0.7, 1.2-1.8.)
// Where the weights are finite, NCHW tensors (and channels-last 5x5 and 7x7 kernels over short rows) take tiles
// instead: a band of rows for a few channels copied into a small zero-padded channels-last tile, its outputs
// computed there in blocks of eight ("NCHW on tiles", below). Those kernels above stay for the rest, and as the
// readable version.
#include "depthwise_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../window_taps.h"
#include "vectorize.h"

namespace manualgrad {
namespace MANUALGRAD_WIDTH {  // (vectorize.h: this copy's vector width)
namespace {

// The sums are fused multiply-adds where the CPU has FMA, in every kernel that computes a forward's outputs (and
// so the stride-1 input gradient's): each is a VL clone (vectorize.h), or inlined into one, so that the 64-byte
// vectors, the 32-byte ones (a loop's remainder among them) and the scalar channel tails all fuse, and an output's
// bits are the same whichever kernel, run or lane computes it. The channel tails add their taps channel by channel
// across a tap, never as a reduction over the taps: GCC vectorizes such a reduction as vector products added in
// order one by one, unfused (float64 tails then differed from the lanes). (Compiled for avx512f alone, 32-byte
// vectors could not fuse, and GCC fused a loop's vector body but not its remainder; so these sums had been
// unfused, twice the floating-point instructions on an Intel Xeon's two 512-bit pipes.) The input gradient's
// scatters and gather (strides over 1, or padding past the kernel's reach), and the NCHW weight gradient's
// dot_row, stay unfused (their region below): they match no other kernel's bits, and the gather is held to the
// scatter's order in a test.

// out[ow] += w * in[ow * stride] for ow < count: one tap across one output row.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES_VL void axpy_row(scalar_t* __restrict out, const scalar_t* __restrict in, scalar_t w,
                                       int64_t count, int64_t stride) {
  if (stride == 1) {
    for (int64_t ow = 0; ow < count; ++ow) out[ow] += w * in[ow];
  } else {
    for (int64_t ow = 0; ow < count; ++ow) out[ow] += w * in[ow * stride];
  }
}

// R output rows' out[q][ow] for ow < count, stride 1: the sum over kernel rows r < nrows, then taps k < ntaps, of
// weights[r][k] * rows[q][r][ow + k * dilation], starting from +0. The same sums in the same order as axpy_row's
// tap by tap passes over a zero-filled row, but R x V vectors of outputs stay in registers across all the taps: a
// row is stored once rather than loaded and stored per tap, in one call rather than one per tap (3x3 over 144
// channels at 56x56: those calls cost more than the arithmetic), and the R x V sums are independent chains that
// overlap (a single chain waits on each of its adds in turn: 25 of them for a 5x5 kernel). The last partial
// vector reads up to a vector's width past a row's end: the caller's rows have that slack.
template <typename scalar_t, int R, int V>
[[gnu::always_inline]] inline void taps_vectors(scalar_t* const* out, const scalar_t* const* const* rows,
                                                const scalar_t* const* weights, int64_t nrows, int64_t ntaps,
                                                int64_t dilation, int64_t ow, int64_t count, const scalar_t* bias) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  vec acc[R][V] = {};
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t k = 0; k < ntaps; ++k) {
      const scalar_t wt = weights[r][k];
      for (int q = 0; q < R; ++q) {
        const scalar_t* x = rows[q][r] + ow + k * dilation;
        for (int v = 0; v < V; ++v) {
          vec xv;
          load_vec(xv, x + v * L);
          acc[q][v] += wt * xv;
        }
      }
    }
  }
  for (int q = 0; q < R; ++q) {
    for (int v = 0; v < V; ++v) {
      if (bias) acc[q][v] += *bias;
      std::memcpy(out[q] + ow + v * L, &acc[q][v], std::min(L, count - ow - v * L) * sizeof(scalar_t));
    }
  }
}

template <typename scalar_t, int R>
[[gnu::always_inline]] inline void taps_rows(scalar_t* const* out, const scalar_t* const* const* rows,
                                             const scalar_t* const* weights, int64_t nrows, int64_t ntaps,
                                             int64_t dilation, int64_t count, const scalar_t* bias) {
  constexpr int64_t L = Vec<scalar_t>::lanes;
  int64_t ow = 0;
  for (; count - ow > 4 * L; ow += 4 * L)
    taps_vectors<scalar_t, R, 4>(out, rows, weights, nrows, ntaps, dilation, ow, count, bias);
  switch (ceil_div(count - ow, L)) {  // 1 to 4 vectors left
    case 4: taps_vectors<scalar_t, R, 4>(out, rows, weights, nrows, ntaps, dilation, ow, count, bias); break;
    case 3: taps_vectors<scalar_t, R, 3>(out, rows, weights, nrows, ntaps, dilation, ow, count, bias); break;
    case 2: taps_vectors<scalar_t, R, 2>(out, rows, weights, nrows, ntaps, dilation, ow, count, bias); break;
    case 1: taps_vectors<scalar_t, R, 1>(out, rows, weights, nrows, ntaps, dilation, ow, count, bias); break;
  }
}

// One output row (pair = false) or two sharing their kernel rows' weights (pair = true); the bias, if any, is added
// to each sum last, as torch adds it.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES_VL void taps_row(scalar_t* const* out, const scalar_t* const* const* rows,
                                       const scalar_t* const* weights, int64_t nrows, int64_t ntaps, int64_t dilation,
                                       int64_t count, const scalar_t* bias, bool pair) {
  if (pair) taps_rows<scalar_t, 2>(out, rows, weights, nrows, ntaps, dilation, count, bias);
  else taps_rows<scalar_t, 1>(out, rows, weights, nrows, ntaps, dilation, count, bias);
}

// One output pixel of the NHWC forward, multiplier 1: out[c] = the sum, for k < count in order, of
// w[taps[k]*C + c] * image[pixels[k]*C + c] (the pixel's taps inside the input), then + bias[c] (as torch sums
// it: starting from the bias, the float32 error was 1.06x torch's on 3x3 144@56, summing the taps first 0.8x). The same sums as
// axpy_channels tap by tap, but each vector of channels stays in a register across the taps: the output is
// stored once instead of loaded and stored per tap.
// (Inlined into the vector clones that call it, at their width.)
template <typename scalar_t>
__attribute__((always_inline)) inline void pixel_sums(scalar_t* __restrict out, const scalar_t* __restrict image,
                                                      const scalar_t* __restrict wt, const scalar_t* __restrict bias,
                                                      const int64_t* __restrict pixels, const int64_t* __restrict taps,
                                                      int64_t count, int64_t C) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  int64_t c = 0;
  // Four vectors of channels at a time: four independent chains of multiply-adds overlap their latencies (one
  // chain of up to 25 dependent ones made the edges of 5x5 layers slower than their interiors). Each channel's
  // sum keeps its order.
  for (; c + 4 * L <= C; c += 4 * L) {
    vec acc[4] = {}, w, x;
    for (int64_t k = 0; k < count; ++k) {
      for (int j = 0; j < 4; ++j) {
        load_vec(w, wt + taps[k] * C + c + j * L);
        load_vec(x, image + pixels[k] * C + c + j * L);
        acc[j] += w * x;
      }
    }
    for (int j = 0; j < 4; ++j) {
      if (bias) {
        load_vec(w, bias + c + j * L);
        acc[j] += w;
      }
      std::memcpy(out + c + j * L, &acc[j], sizeof(vec));
    }
  }
  for (; c + L <= C; c += L) {
    vec acc{}, w, x;
    for (int64_t k = 0; k < count; ++k) {
      load_vec(w, wt + taps[k] * C + c);
      load_vec(x, image + pixels[k] * C + c);
      acc += w * x;
    }
    if (bias) {
      load_vec(w, bias + c);
      acc += w;
    }
    std::memcpy(out + c, &acc, sizeof(vec));
  }
  // the channels past the last vector, side by side across each tap (channel_tail)
  const int64_t n = C - c;
  scalar_t acc[L] = {};
  for (int64_t k = 0; k < count; ++k)
    for (int64_t j = 0; j < n; ++j) acc[j] += wt[taps[k] * C + c + j] * image[pixels[k] * C + c + j];
  for (int64_t j = 0; j < n; ++j) out[c + j] = bias ? acc[j] + bias[c + j] : acc[j];
}

template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES_VL void forward_nhwc_pixel(scalar_t* __restrict out, const scalar_t* __restrict image,
                                                 const scalar_t* __restrict wt, const scalar_t* __restrict bias,
                                                 const int64_t* __restrict pixels, const int64_t* __restrict taps,
                                                 int64_t count, int64_t C) {
  pixel_sums(out, image, wt, bias, pixels, taps, count, C);
}

// The channels past the last whole vector of a run (forward_nhwc_run, forward_nhwc_rows), fewer than a vector: each
// pixel's taps in order, then the bias, the tail's channels side by side (inlined into those clones: compiled apart,
// for the baseline, it would not fuse).
template <typename scalar_t>
[[gnu::always_inline]] inline void channel_tail(scalar_t* out, const scalar_t* image, const scalar_t* wt,
                                                const scalar_t* bias, const int64_t* offset, int64_t taps,
                                                int64_t count, int64_t step, int64_t C, int64_t c0) {
  const int64_t n = C - c0;
  for (int64_t p = 0; p < count; ++p) {
    scalar_t acc[Vec<scalar_t>::lanes] = {};
    for (int64_t k = 0; k < taps; ++k)
      for (int64_t c = 0; c < n; ++c) acc[c] += wt[k * C + c0 + c] * image[p * step + offset[k] + c0 + c];
    for (int64_t c = 0; c < n; ++c) out[p * C + c0 + c] = bias ? acc[c] + bias[c0 + c] : acc[c];
  }
}

// A run of `count` output pixels of one row whose taps all lie inside the input, `step` elements apart in the
// input: out[p*C + c] = the sum, for tap k < TAPS in order, of wt[k*C + c] * image[p*step + offset[k] + c], + bias[c]:
// forward_nhwc_pixel's sums, in its order, but with a vector of channels outermost, its TAPS weight vectors stay
// in registers across the run, so each tap costs one load instead of two (3x3 over 144 channels at 56x56,
// channels-last: 0.55x the time).
template <typename scalar_t, int TAPS>
MANUALGRAD_VECTOR_CLONES_VL void forward_nhwc_run(scalar_t* __restrict out, const scalar_t* __restrict image,
                                               const scalar_t* __restrict wt, const scalar_t* __restrict bias,
                                               const int64_t* __restrict offset, int64_t count, int64_t step,
                                               int64_t C) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  int64_t off[TAPS];
  for (int k = 0; k < TAPS; ++k) off[k] = offset[k];
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    vec w[TAPS], b{};
    for (int k = 0; k < TAPS; ++k) load_vec(w[k], wt + k * C + c);
    if (bias) load_vec(b, bias + c);
    // Four pixels at a time, so that four chains of multiply-adds overlap (one pixel's chain of TAPS dependent
    // multiply-adds waits on each one's latency); each pixel's sum keeps its order, so the bits are those of one
    // pixel at a time.
    int64_t p = 0;
    for (; p + 4 <= count; p += 4) {
      const scalar_t* at = image + p * step + c;
      vec acc[4] = {}, x;
      for (int k = 0; k < TAPS; ++k) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          load_vec(x, at + j * step + off[k]);
          acc[j] += w[k] * x;
        }
      }
      // Unrolled, so that the sums go from their registers to `out` rather than through the stack (3x3 over 144
      // channels at 56x56, channels-last: 1.9 -> 1.6 ms on a Zen 3).
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        if (bias) acc[j] += b;
        std::memcpy(out + (p + j) * C + c, &acc[j], sizeof(vec));
      }
    }
    for (; p < count; ++p) {
      const scalar_t* at = image + p * step + c;
      vec acc{}, x;
      for (int k = 0; k < TAPS; ++k) {
        load_vec(x, at + off[k]);
        acc += w[k] * x;
      }
      if (bias) acc += b;
      std::memcpy(out + p * C + c, &acc, sizeof(vec));
    }
  }
  channel_tail(out, image, wt, bias, off, TAPS, count, step, C, c);
}

// forward_nhwc_run for kernels whose taps outnumber the registers (KW = 7: ConvNeXt's 7x7): the run's sums kernel
// row by kernel row, that row's KW weight vectors in registers, each output's partial sum kept in `out` between
// rows (in scalar_t, as a register holds it). The terms are added in the same order, so the bits are forward_nhwc_
// run's (and forward_nhwc_pixel's). ConvNeXt-T's layers (with forward_nhwc_padded), 2-core Zen 4, batch 8,
// ours/torch: 7x7 over 96 channels at 56x56 2.86 -> 1.25, 192 at 28x28 2.40 -> 1.25, 384 at 14x14 2.13 -> 1.70.
template <typename scalar_t, int KW>
MANUALGRAD_VECTOR_CLONES_VL void forward_nhwc_rows(scalar_t* __restrict out, const scalar_t* __restrict image,
                                                const scalar_t* __restrict wt, const scalar_t* __restrict bias,
                                                const int64_t* __restrict offset, int64_t kh, int64_t count,
                                                int64_t step, int64_t C) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  bool unit_step = step == C;
  for (int j = 1; j < KW; ++j) unit_step &= offset[j] - offset[j - 1] == C;
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    vec b{};
    if (bias) load_vec(b, bias + c);
    for (int64_t i = 0; i < kh; ++i) {
      vec w[KW];
      int64_t off[KW];
      for (int j = 0; j < KW; ++j) {
        load_vec(w[j], wt + (i * KW + j) * C + c);
        off[j] = offset[i * KW + j];
      }
      const bool first = i == 0, last = i + 1 == kh;
      int64_t p = 0;
      // The P pixels from p: their partial sums from `out` (+0 on the first kernel row), and back into it (+ the bias
      // after the last row), then on to the next pixels.
      const auto start = [&](vec* acc, int P) __attribute__((always_inline)) {
        for (int q = 0; q < P; ++q) {
          acc[q] = vec{};
          if (!first) load_vec(acc[q], out + (p + q) * C + c);
        }
      };
      const auto finish = [&](vec* acc, int P) __attribute__((always_inline)) {
        for (int q = 0; q < P; ++q) {
          if (last && bias) acc[q] += b;
          std::memcpy(out + (p + q) * C + c, &acc[q], sizeof(vec));
        }
        p += P;
      };
      if (unit_step) {
        // Stride and dilation 1: pixel q's tap j reads input pixel q + j of the row, so a block of P pixels loads
        // each of its P + KW - 1 input vectors once, for every pixel that reads it (tap j of pixel q gets its term
        // at step x = q + j, in tap order). Blocks of 8, then 4, 2 and 1 for the rest (7x7 and 14x14 images).
        const auto block = [&](auto pixels) {
          constexpr int P = decltype(pixels)::value;
          const scalar_t* at = image + p * step + c + off[0];
          vec acc[P], x;
          start(acc, P);
#pragma GCC unroll 16
          for (int xi = 0; xi < P + KW - 1; ++xi) {
            load_vec(x, at + xi * C);
#pragma GCC unroll 8
            for (int q = 0; q < P; ++q) {
              const int j = xi - q;
              if (j >= 0 && j < KW) acc[q] += w[j] * x;
            }
          }
          finish(acc, P);
        };
        while (p + 8 <= count) block(std::integral_constant<int, 8>{});
        if (p + 4 <= count) block(std::integral_constant<int, 4>{});
        if (p + 2 <= count) block(std::integral_constant<int, 2>{});
        if (p < count) block(std::integral_constant<int, 1>{});
      }
      // Any step: blocks of 4 pixels, whose chains overlap as in forward_nhwc_run, then one at a time.
      const auto strided = [&](auto pixels) {
        constexpr int P = decltype(pixels)::value;
        const scalar_t* at = image + p * step + c;
        vec acc[P], x;
        start(acc, P);
        for (int j = 0; j < KW; ++j) {
          for (int q = 0; q < P; ++q) {
            load_vec(x, at + q * step + off[j]);
            acc[q] += w[j] * x;
          }
        }
        finish(acc, P);
      };
      while (p + 4 <= count) strided(std::integral_constant<int, 4>{});
      while (p < count) strided(std::integral_constant<int, 1>{});
    }
  }
  channel_tail(out, image, wt, bias, offset, kh * KW, count, step, C, c);
}

// Where forward_band reads and writes: output q of a band (its row r = q / out_w, column ow = q % out_w) reads the
// tile at r * row_step + ow * col_step, tap k at offset[k] from there, and is written at out + q * out_step; tap k's
// weights are at wt + k * w_step. kernel_w: 3, 5 or 7 where a kernel row's taps are adjacent tile columns
// (offset[k + 1] = offset[k] + col_step within a kernel row), else 0. For those, the tile's rows [real_lo, real_hi)
// hold input rows and the others zeros; output row r's kernel row i reads tile row r * stride_h + i * dilation_h.
struct BandLayout {
  int64_t out_w, row_step, col_step, out_step, w_step, kernel_w;
  int64_t real_lo = 0, real_hi = 0, stride_h = 1, dilation_h = 1;
};

// The kernel's width where a kernel row's taps are adjacent columns and so are the outputs (stride and dilation 1 in
// the row) and row_block has it (3, 5, 7), else 0: BandLayout::kernel_w.
int64_t adjacent_taps(const Window& w) {
  const bool row_block_has = w.kernel_w == 3 || w.kernel_w == 5 || w.kernel_w == 7;
  return w.stride_w == 1 && w.dilation_w == 1 && row_block_has ? w.kernel_w : 0;
}

// The outputs of a band of a tile (forward_tiles_kernel, forward_nhwc_tiles): `count` outputs of one vector of
// channels each: out = the sum, for tap k < taps in order, of wt[k] * the tile's vector tap k sees, + bias.
// forward_nhwc_run's sums in its order (so its bits), but blocks of P outputs run across the band's rows: a 7-wide
// row took one block of four and three pixels alone, each a chain of 25 dependent adds for a 5x5 kernel (a third
// of the time in the chains' latency). Eight sums in registers, a weight vector loaded once for all of them: any
// kernel shape, its weights need not fit the registers (a 5x5 kernel's 25 did not fit AVX2's 16).
template <typename scalar_t, int P>
__attribute__((always_inline)) inline void band_block(scalar_t* __restrict out, const scalar_t* __restrict tile,
                                                      const scalar_t* __restrict wt, const scalar_t* __restrict bias,
                                                      const int64_t* __restrict offset, int64_t taps, int64_t r,
                                                      int64_t ow, const BandLayout& b) {
  using vec = typename Vec<scalar_t>::type;
  const scalar_t* at[P];
  for (int j = 0; j < P; ++j) {
    at[j] = tile + r * b.row_step + ow * b.col_step;
    if (++ow == b.out_w) ow = 0, ++r;
  }
  vec acc[P], w, x;
  for (int j = 0; j < P; ++j) acc[j] = vec{};
  for (int64_t k = 0; k < taps; ++k) {
    load_vec(w, wt + k * b.w_step);
    const int64_t off = offset[k];
    for (int j = 0; j < P; ++j) {
      load_vec(x, at[j] + off);
      acc[j] += w * x;
    }
  }
  if (bias) {
    load_vec(w, bias);
    for (int j = 0; j < P; ++j) acc[j] += w;
  }
  for (int j = 0; j < P; ++j) std::memcpy(out + j * b.out_step, &acc[j], sizeof(vec));
}

// band_block's sums for P consecutive outputs of one row where the row's taps are KW adjacent columns (stride and
// dilation 1 in the row): kernel row i's P + KW - 1 input vectors are loaded once each and held while its KW taps
// go over the P sums, instead of one load per term (the Xeon's two 512-bit FMA pipes waited on the loads:
// 10 loads per 8 multiply-adds). Each output's terms are added in band_block's order, so its bits.
template <typename scalar_t, int P, int KW>
__attribute__((always_inline)) inline void row_block(scalar_t* __restrict out, const scalar_t* __restrict at,
                                                     const scalar_t* __restrict wt, const scalar_t* __restrict bias,
                                                     const int64_t* __restrict offset, int64_t i_lo,
                                                     int64_t i_hi, const BandLayout& b) {
  using vec = typename Vec<scalar_t>::type;
  vec acc[P], x[P + KW - 1], w;
#pragma GCC unroll 8
  for (int j = 0; j < P; ++j) acc[j] = vec{};
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const scalar_t* row = at + offset[i * KW];
    const scalar_t* wrow = wt + i * KW * b.w_step;
#pragma GCC unroll 16
    for (int m = 0; m < P - 1; ++m) load_vec(x[m], row + m * b.col_step);
#pragma GCC unroll 8
    for (int s = 0; s < KW; ++s) {
      load_vec(x[s + P - 1], row + (s + P - 1) * b.col_step);
      load_vec(w, wrow + s * b.w_step);
#pragma GCC unroll 8
      for (int j = 0; j < P; ++j) acc[j] += w * x[j + s];
    }
  }
  if (bias) {
    load_vec(w, bias);
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) acc[j] += w;
  }
#pragma GCC unroll 8
  for (int j = 0; j < P; ++j) std::memcpy(out + j * b.out_step, &acc[j], sizeof(vec));
}

// Sums held per block: the registers hold P sums, P inputs and a weight (16 registers below 64-byte vectors).
template <typename scalar_t>
constexpr int kRowBlock = sizeof(typename Vec<scalar_t>::type) == 64 ? 8 : 6;

// forward_band's outputs by row_block: each output row in near-equal blocks of at most kRowBlock.
template <typename scalar_t, int KW>
__attribute__((always_inline)) inline void forward_rows(scalar_t* __restrict out, const scalar_t* __restrict tile,
                                                        const scalar_t* __restrict wt,
                                                        const scalar_t* __restrict bias,
                                                        const int64_t* __restrict offset, int64_t kernel_h,
                                                        int64_t rows, const BandLayout& b) {
  constexpr int64_t most = kRowBlock<scalar_t>;
  const int64_t blocks = ceil_div(b.out_w, most), small = b.out_w / blocks, large = b.out_w % blocks;
  for (int64_t r = 0; r < rows; ++r) {
    // The kernel rows over real input rows: those in the padding would add weight x 0 = +-0 (no bits change).
    const int64_t top = r * b.stride_h;
    const int64_t i_lo = b.real_lo <= top ? 0 : ceil_div(b.real_lo - top, b.dilation_h);
    const int64_t i_hi = b.real_hi <= top ? 0 : std::min(kernel_h, (b.real_hi - 1 - top) / b.dilation_h + 1);
    for (int64_t k = 0, ow = 0; k < blocks; ++k) {
      const int64_t n = small + (k < large);
      scalar_t* o = out + (r * b.out_w + ow) * b.out_step;
      const scalar_t* at = tile + r * b.row_step + ow * b.col_step;
      switch (n) {
#define MANUALGRAD_ROW_BLOCK(P) \
  case P: row_block<scalar_t, P, KW>(o, at, wt, bias, offset, i_lo, i_hi, b); break;
        MANUALGRAD_ROW_BLOCK(1) MANUALGRAD_ROW_BLOCK(2) MANUALGRAD_ROW_BLOCK(3) MANUALGRAD_ROW_BLOCK(4)
        MANUALGRAD_ROW_BLOCK(5) MANUALGRAD_ROW_BLOCK(6) MANUALGRAD_ROW_BLOCK(7) MANUALGRAD_ROW_BLOCK(8)
#undef MANUALGRAD_ROW_BLOCK
      }
      ow += n;
    }
  }
}

// forward_nhwc_run's outputs where a kernel row's KW taps are adjacent pixels (stride and dilation 1 in the row), and
// forward_nhwc_padded's: `rows` runs of `count` outputs, their first taps row_step apart in the input, the outputs
// contiguous. Each vector of channels by forward_rows, which loads each input vector once per kernel row and keeps 8
// sums in flight (forward_nhwc_run keeps the weights in registers but loads an input per term, 4 sums at a time;
// forward_nhwc_rows a kernel row's weights). The same sums in the same order, so their bits.
template <typename scalar_t, int KW>
MANUALGRAD_VECTOR_CLONES_VL void forward_nhwc_adjacent(scalar_t* __restrict out, const scalar_t* __restrict image,
                                                    const scalar_t* __restrict wt, const scalar_t* __restrict bias,
                                                    const int64_t* __restrict offset, int64_t kernel_h,
                                                    int64_t count, int64_t C, int64_t rows = 1, int64_t row_step = 0) {
  constexpr int64_t L = Vec<scalar_t>::lanes;
  BandLayout b{count, row_step, C, C, C, KW};
  b.real_hi = rows - 1 + kernel_h;  // every kernel row inside
  int64_t c = 0;
  for (; c + L <= C; c += L)
    forward_rows<scalar_t, KW>(out + c, image + c, wt + c, bias ? bias + c : nullptr, offset, kernel_h, rows, b);
  for (int64_t r = 0; r < rows; ++r)
    channel_tail(out + r * count * C, image + r * row_step, wt, bias, offset, kernel_h * KW, count, C, C, c);
}

template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES_VL void forward_band(scalar_t* __restrict out, const scalar_t* __restrict tile,
                                           const scalar_t* __restrict wt, const scalar_t* __restrict bias,
                                           const int64_t* __restrict offset, int64_t taps, int64_t count,
                                           const BandLayout& b) {
  // Rows of adjacent taps by row_block (3x3 in NCHW at least as fast); count is then whole rows.
  if (b.kernel_w == 3) return forward_rows<scalar_t, 3>(out, tile, wt, bias, offset, taps / 3, count / b.out_w, b);
  if (b.kernel_w == 5) return forward_rows<scalar_t, 5>(out, tile, wt, bias, offset, taps / 5, count / b.out_w, b);
  if (b.kernel_w == 7) return forward_rows<scalar_t, 7>(out, tile, wt, bias, offset, taps / 7, count / b.out_w, b);
  int64_t q = 0, r = 0, ow = 0;
  const auto advance = [&](int64_t n) {
    q += n;
    ow += n;
    while (ow >= b.out_w) ow -= b.out_w, ++r;
  };
  for (; q + 8 <= count; advance(8))
    band_block<scalar_t, 8>(out + q * b.out_step, tile, wt, bias, offset, taps, r, ow, b);
  if (q + 4 <= count) {
    band_block<scalar_t, 4>(out + q * b.out_step, tile, wt, bias, offset, taps, r, ow, b);
    advance(4);
  }
  for (; q < count; advance(1)) band_block<scalar_t, 1>(out + q * b.out_step, tile, wt, bias, offset, taps, r, ow, b);
}

// The outputs of a row whose taps all lie inside the input, for kernels of 3x3 and 5x5 (the runs of
// forward_nhwc_run and weight_nhwc_row): [ow_lo, ow_hi) in rows whose kernel rows all lie inside, the first at
// input pixel `first`, tap k at offset[k] from it.
struct InteriorRuns {
  bool enabled, rows;  // rows: forward_nhwc_rows' kernels (7 wide), whose weight gradient goes tap by tap
  int64_t ow_lo, ow_hi, span_h;
  std::vector<int64_t> offset;
  InteriorRuns(const Geometry& g, int64_t C) : offset(g.win.kernel_h * g.win.kernel_w) {
    const Window& w = g.win;
    const int64_t span_w = (w.kernel_w - 1) * w.dilation_w;
    span_h = (w.kernel_h - 1) * w.dilation_h;
    ow_lo = std::min(g.out_w, ceil_div(w.pad_w, w.stride_w));
    ow_hi = g.in_w - 1 - span_w + w.pad_w < 0
                ? ow_lo
                : std::max(ow_lo, std::min(g.out_w, (g.in_w - 1 - span_w + w.pad_w) / w.stride_w + 1));
    enabled = (offset.size() == 9 || offset.size() == 25) && ow_lo < ow_hi;
    rows = !enabled && w.kernel_w == 7 && ow_lo < ow_hi;
    for (int64_t i = 0; i < w.kernel_h; ++i)
      for (int64_t j = 0; j < w.kernel_w; ++j)
        offset[i * w.kernel_w + j] = (i * w.dilation_h * g.in_w + j * w.dilation_w) * C;
  }
  // Whether output row oh has a run (its kernel rows all inside), and the input pixel its run starts at.
  bool row(const Geometry& g, int64_t oh, int64_t& first) const {
    const int64_t ih0 = oh * g.win.stride_h - g.win.pad_h;
    first = ih0 * g.in_w + ow_lo * g.win.stride_w - g.win.pad_w;
    return (enabled || rows) && ih0 >= 0 && ih0 + span_h < g.in_h;
  }
};

// ---- Unfused: each product rounded before it is added (the input gradient's scatters and gather, where it is not
// a forward of grad_output; the NCHW dot_row) ----
#if defined(__clang__)
#pragma float_control(push)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

// in[ow * stride] += w * out[ow]: the mirror of axpy_row, adding a tap's share back into its slice.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void scatter_row(scalar_t* __restrict in, const scalar_t* __restrict out, scalar_t w,
                                          int64_t count, int64_t stride) {
  for (int64_t ow = 0; ow < count; ++ow) in[ow * stride] += w * out[ow];
}

// acc[ow] += grad[ow] * in[ow * stride]: one partial sum per output column, added up at the end in a
// fixed order (a single running sum would be a serial chain the compiler may not reorder).
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void dot_row(scalar_t* __restrict acc, const scalar_t* __restrict grad,
                                      const scalar_t* __restrict in, int64_t count, int64_t stride) {
  if (stride == 1) {
    for (int64_t ow = 0; ow < count; ++ow) acc[ow] += grad[ow] * in[ow];
  } else {
    for (int64_t ow = 0; ow < count; ++ow) acc[ow] += grad[ow] * in[ow * stride];
  }
}

// Channel vectors of a channels-last pixel (the NHWC kernels below): out[c] += w[c] * in[c].
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void axpy_channels(scalar_t* __restrict out, const scalar_t* __restrict in,
                                            const scalar_t* __restrict w, int64_t count) {
  for (int64_t c = 0; c < count; ++c) out[c] += w[c] * in[c];
}

constexpr int64_t kGatherTaps = 49;    // kernels of at most this many taps gather the strided input gradient
constexpr int64_t kGatherPixels = 32;  // pixels a call of gather_pixels

// n consecutive pixels of the NHWC input gradient: pixel p's is the sum, for k < counts[p] in order, of the weights
// of tap taps[p * kGatherTaps + k] times the gradient of output pixels[p * kGatherTaps + k] (pixel_sums, unfused
// here: GCC contracts, or not, by the function its code is inlined into; clang by where it is written, so a clang
// build would fuse the gather as it does the forward).
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void gather_pixels(scalar_t* __restrict out, const scalar_t* __restrict grad,
                                            const scalar_t* __restrict wt, const int64_t* __restrict pixels,
                                            const int64_t* __restrict taps, const int64_t* __restrict counts,
                                            int64_t n, int64_t C) {
  for (int64_t p = 0; p < n; ++p)
    pixel_sums(out + p * C, grad, wt, static_cast<const scalar_t*>(nullptr), pixels + p * kGatherTaps,
               taps + p * kGatherTaps, counts[p], C);
}

#if defined(__clang__)
#pragma float_control(pop)
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// ---- The channels-last weight gradient: fused where the CPU has FMA ----
// Each entry's sum is a run of multiply-adds into one register lane or one scalar, and nothing else computes it
// (the NCHW tiles call these too), so fusing changes no agreement between kernels; the VL clones fuse the 32-byte
// vectors and the scalar channel tail as they do the 64-byte ones, so a channel's bits are the same in a vector
// lane or the tail, at either width and any thread count. Unfused, its multiply and add were twice the
// floating-point instructions of the sums, the kernel's bound on an Intel Xeon (two 512-bit pipes for both).

// The NHWC weight gradient's share of output row oh of one image, for kernels of TAPS = 9 or 25 taps (InteriorRuns
// enabled): acc[k * acc_stride + c] += the sum over the row's outputs of grad[ow*C + c] times the pixel tap k saw
// there, for `cb` channels, formed in scalar_t in output order and added in double once per row and tap. A vector
// of channels' TAPS sums stay in registers across the row: its run whose taps all lie inside loads each gradient
// vector once for all taps; the outputs at its edges take their taps inside the input one by one. (Taking the
// edges tap by tap as runs of their own, each added in double, had cost more than the run on 14x14 and 7x7
// images. Interleaved on a 2-core Zen 4, batch 8, ours/torch: 3x3 over 384 channels at 14x14 1.82 -> 1.39, over
// 960 at 7x7 2.16 -> 1.63; 56x56 and 5x5 kernels unchanged.)
template <typename scalar_t, int TAPS>
MANUALGRAD_VECTOR_CLONES_VL void weight_nhwc_row(double* __restrict acc, int64_t acc_stride,
                                              const scalar_t* __restrict grad, const scalar_t* __restrict image,
                                              const Geometry& g, const InteriorRuns& runs, int64_t oh, int64_t cb,
                                              int64_t C) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  const Window& w = g.win;
  int64_t off[TAPS], row_at[TAPS];  // tap k's offset from the run's pixel; its kernel row's input row (-1: outside)
  for (int k = 0; k < TAPS; ++k) {
    off[k] = runs.offset[k];
    const int64_t ih = oh * w.stride_h - w.pad_h + (k / w.kernel_w) * w.dilation_h;
    row_at[k] = ih >= 0 && ih < g.in_h ? ih : -1;
  }
  int64_t first;
  const bool has_run = runs.row(g, oh, first);
  const int64_t lo = has_run ? runs.ow_lo : g.out_w, hi = has_run ? runs.ow_hi : g.out_w;
  // f(k, pixel) for each tap of output ow outside the run that lands inside the input
  const auto edge_taps = [&](int64_t ow, auto&& f) {
    for (int k = 0; k < TAPS; ++k) {
      const int64_t iw = ow * w.stride_w - w.pad_w + (k % w.kernel_w) * w.dilation_w;
      if (row_at[k] >= 0 && iw >= 0 && iw < g.in_w) f(k, row_at[k] * g.in_w + iw);
    }
  };
  const scalar_t* run = image + (has_run ? first : 0) * C;
  const int64_t step = w.stride_w * C;
  int64_t c = 0;
  for (; c + L <= cb; c += L) {
    vec sum[TAPS];
    for (int k = 0; k < TAPS; ++k) sum[k] = vec{};
    const auto edges = [&](int64_t from, int64_t to) {
      for (int64_t ow = from; ow < to; ++ow) {
        vec gv, x;
        load_vec(gv, grad + ow * C + c);
        edge_taps(ow, [&](int k, int64_t pixel) {
          load_vec(x, image + pixel * C + c);
          sum[k] += gv * x;
        });
      }
    };
    edges(0, lo);
    for (int64_t ow = lo; ow < hi; ++ow) {
      vec gv, x;
      load_vec(gv, grad + ow * C + c);
      const scalar_t* at = run + (ow - lo) * step + c;
      for (int k = 0; k < TAPS; ++k) {
        load_vec(x, at + off[k]);
        sum[k] += gv * x;
      }
    }
    edges(hi, g.out_w);
    for (int k = 0; k < TAPS; ++k)
      for (int64_t l = 0; l < L; ++l) acc[k * acc_stride + c + l] += double(sum[k][l]);
  }
  // The channels past the last vector, side by side at each output (a sum over the row's outputs, channel by
  // channel, is a reduction GCC may vectorize as products added one by one, unfused).
  const int64_t n = cb - c;
  if (n == 0) return;
  scalar_t sum[TAPS][L] = {};
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    const scalar_t* gv = grad + ow * C + c;
    if (ow >= lo && ow < hi) {
      const scalar_t* at = run + (ow - lo) * step + c;
      for (int k = 0; k < TAPS; ++k)
        for (int64_t j = 0; j < n; ++j) sum[k][j] += gv[j] * at[off[k] + j];
    } else {
      edge_taps(ow, [&](int k, int64_t pixel) {
        for (int64_t j = 0; j < n; ++j) sum[k][j] += gv[j] * image[pixel * C + c + j];
      });
    }
  }
  for (int k = 0; k < TAPS; ++k)
    for (int64_t j = 0; j < n; ++j) acc[k * acc_stride + c + j] += double(sum[k][j]);
}

// One tap's share of the NHWC weight gradient over a run of one output row: for each of `cb` channels, the sum
// over k < count of grad[k*C + c] * in[k*in_step + c], formed in scalar_t (a vector of channels in a register
// across the run) and then added to acc[c] in double. So each weight-gradient entry is, in double, the sum over
// images and rows of its rows' sums, in a fixed order.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES_VL void dot_run_channels(double* __restrict acc, const scalar_t* __restrict grad,
                                               const scalar_t* __restrict in, int64_t count, int64_t in_step,
                                               int64_t cb, int64_t C) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  int64_t c = 0;
  for (; c + L <= cb; c += L) {
    vec sum{}, g, x;
    for (int64_t k = 0; k < count; ++k) {
      load_vec(g, grad + k * C + c);
      load_vec(x, in + k * in_step + c);
      sum += g * x;
    }
    for (int64_t l = 0; l < L; ++l) acc[c + l] += double(sum[l]);
  }
  const int64_t n = cb - c;  // the channels past the last vector, side by side (weight_nhwc_row)
  scalar_t sum[L] = {};
  for (int64_t k = 0; k < count; ++k)
    for (int64_t j = 0; j < n; ++j) sum[j] += grad[k * C + c + j] * in[k * in_step + c + j];
  for (int64_t j = 0; j < n; ++j) acc[c + j] += double(sum[j]);
}


constexpr int64_t kChunkSlots = 8192;    // input columns one chunk of output columns reaches, about
constexpr int64_t kRingSlots = 1 << 17;  // elements of a task's ring of padded rows
constexpr int64_t kPartialSums = 1 << 16;  // the weight gradient's partial sums per task, or one per tap

// The columns a dilated window spans, (kernel-1)*dilation + 1 (check_conv has ruled out overflow).
inline int64_t window_extent(int64_t kernel, int64_t dilation) { return (kernel - 1) * dilation + 1; }

// How a geometry's planes are swept: chunks of output columns, and whether each chunk's input rows are
// copied into a ring of padded rows (not when the stride or dilation would make the copies wasteful).
struct RowPlan {
  int64_t chunk = 1;       // output columns per chunk
  bool padded_rows = false;
  int64_t row_slots = 0;   // room for one chunk's span (window_taps.h's column_chunk)
  int64_t ring_rows = 1;
};

RowPlan plan_rows(const Geometry& g, int64_t max_chunk) {
  const Window& w = g.win;
  const int64_t s = w.stride_w;
  RowPlan plan;
  plan.chunk = std::clamp<int64_t>(std::min(kChunkSlots / s, max_chunk), 1, g.out_w);
  const ColumnChunk all = column_chunk(0, g.out_w, s, w.pad_w, w.kernel_w, w.dilation_w, g.in_w);
  if (s > kRingSlots || all.empty() || !columns_mostly_read(all.tap_hi - all.tap_lo, s, w.dilation_w)) return plan;
  const int64_t reach = (plan.chunk - 1) * s;
  plan.row_slots = reach + std::min(window_extent(w.kernel_w, w.dilation_w), g.in_w + reach);
  if (plan.row_slots > kRingSlots) return plan;
  plan.padded_rows = true;
  plan.ring_rows = ring_rows(std::min(g.in_h, window_extent(w.kernel_h, w.dilation_h)), plan.row_slots, kRingSlots);
  return plan;
}

// Zero-padded copies of the input rows one chunk reads: slot t of a row is input column col0 + t. Rows
// are kept in a ring (window_taps.h's ring_rows), so the rows neighbouring output rows share are copied
// once.
template <typename scalar_t>
class PaddedRows {
 public:
  explicit PaddedRows(const RowPlan& plan)
      : ring_(plan.padded_rows ? plan.ring_rows * plan.row_slots + Vec<scalar_t>::lanes : 0),  // (taps_row's slack)
        held_(plan.ring_rows), slots_(plan.row_slots) {}

  // A new plane or chunk: nothing held.
  void start(const scalar_t* plane, const ColumnChunk& c) {
    plane_ = plane;
    chunk_ = c;
    std::fill(held_.begin(), held_.end(), int64_t{-1});
  }

  const scalar_t* row(int64_t ih, int64_t in_w) {
    const int64_t place = ih & (static_cast<int64_t>(held_.size()) - 1);
    scalar_t* r = ring_.data() + place * slots_;
    if (held_[place] != ih) {
      const int64_t left = std::clamp<int64_t>(-chunk_.col0, 0, chunk_.span);  // slots [left, right) are inside
      const int64_t right = std::clamp<int64_t>(in_w - chunk_.col0, left, chunk_.span);
      const scalar_t* src = plane_ + ih * in_w + chunk_.col0;
      zero_run(r, left);  // (inline moves: a call to memmove per short row cost as much as the row's taps)
      copy_run(r + left, src + left, right - left);
      zero_run(r + right, chunk_.span - right);
      held_[place] = ih;
    }
    return r;
  }

 private:
  aligned_vector<scalar_t> ring_;  // (ring_rows, row_slots)
  std::vector<int64_t> held_;   // (ring_rows,) the input row each place holds, or -1
  int64_t slots_;
  const scalar_t* plane_ = nullptr;
  ColumnChunk chunk_;
};

// For each kernel column j of the row's hull, the output columns [lo, lo + count) whose input column
// ow*stride + offset lies inside the input, computed once per call: the exact in-bounds runs.
struct TapRun {
  int64_t j, lo, count, at;  // at: the input column output lo reads
};

class TapColumns {
 public:
  explicit TapColumns(const Geometry& g) : stride_(g.win.stride_w) {
    const Window& w = g.win;
    hull_ = column_chunk(0, g.out_w, w.stride_w, w.pad_w, w.kernel_w, w.dilation_w, g.in_w);
    for (int64_t j = hull_.tap_lo; j < hull_.tap_hi; ++j) {
      const int64_t offset = j * w.dilation_w - w.pad_w;
      const int64_t lo = std::min(g.out_w, offset >= 0 ? 0 : ceil_div(-offset, w.stride_w));
      const int64_t hi = std::min(g.out_w, g.in_w - 1 - offset >= 0 ? (g.in_w - 1 - offset) / w.stride_w + 1 : 0);
      // (an empty run's `at` is never used, and lo * stride might not fit in int64 there)
      runs_.push_back(hi > lo ? TapRun{j, lo, hi - lo, offset + lo * w.stride_w} : TapRun{j, lo, 0, 0});
    }
  }

  const std::vector<TapRun>& runs() const { return runs_; }

  // Tap j's run cut to the outputs [ow0, ow1).
  TapRun within(int64_t j, int64_t ow0, int64_t ow1) const {
    TapRun r = runs_[j - hull_.tap_lo];
    const int64_t lo = std::max(r.lo, ow0), hi = std::min(r.lo + r.count, ow1);
    if (hi <= lo) return {j, lo, 0, 0};
    r.at += (lo - r.lo) * stride_;
    r.lo = lo;
    r.count = hi - lo;
    return r;
  }

 private:
  ColumnChunk hull_;
  int64_t stride_;
  std::vector<TapRun> runs_;
};

// Every (output row, kernel row) pair of a plane whose kernel row lands inside the input, in order:
// f(oh, ih, i). The callers then take the kernel columns in order, so each output (or, scattering,
// each input element) adds its terms tap by tap in row-major order.
template <typename F>
void for_each_kernel_row(const Geometry& g, const F& f) {
  const Window& w = g.win;
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const int64_t h_start = oh * w.stride_h - w.pad_h;
    int64_t i_lo, i_hi;
    taps_inside(h_start, w.kernel_h, w.dilation_h, g.in_h, i_lo, i_hi);
    for (int64_t i = i_lo; i < i_hi; ++i) f(oh, h_start + i * w.dilation_h, i);
  }
}

template <typename scalar_t>
void forward_kernel(scalar_t* out, const scalar_t* in, const scalar_t* weight, const scalar_t* bias, const Geometry& g) {
  const Window& w = g.win;
  const int64_t multiplier = g.out_channels / g.in_channels, taps = w.kernel_h * w.kernel_w;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w, s = w.stride_w;
  const TapColumns columns(g);
  const RowPlan plan = plan_rows(g, g.out_w);
  // taps_row: stride 1, and a ring that holds the rows of two neighbouring windows at once
  const bool whole_rows = plan.padded_rows && s == 1 &&
                          plan.ring_rows >= std::min(g.in_h, window_extent(w.kernel_h, w.dilation_h) + w.stride_h);
  at::parallel_for(0, g.batch * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    PaddedRows<scalar_t> rows(plan);
    // taps_row's arguments: two output rows, each's input rows, the kernel rows' weights
    std::vector<const scalar_t*> kernel_rows[2], kernel_weights(whole_rows ? w.kernel_h : 0);
    for (auto& list : kernel_rows) list.resize(whole_rows ? w.kernel_h : 0);
    scalar_t* out_rows[2];
    std::vector<char> in_registers(multiplier);  // each filter of the task: all finite, so by taps_row
    // One filter's output rows of a chunk by taps_row, two at a time where they have the same kernel rows inside.
    const auto register_rows = [&](scalar_t* o, const scalar_t* w_c, const scalar_t* b, const ColumnChunk& chunk) {
      for (int64_t oh = 0; oh < g.out_h;) {
        const int64_t h_start = oh * w.stride_h - w.pad_h;
        int64_t i_lo, i_hi, next_lo = 0, next_hi = 0;
        taps_inside(h_start, w.kernel_h, w.dilation_h, g.in_h, i_lo, i_hi);
        if (oh + 1 < g.out_h) taps_inside(h_start + w.stride_h, w.kernel_h, w.dilation_h, g.in_h, next_lo, next_hi);
        const bool pair = oh + 1 < g.out_h && i_lo == next_lo && i_hi == next_hi;
        for (int64_t q = 0; q < (pair ? 2 : 1); ++q) {
          out_rows[q] = o + (oh + q) * g.out_w + chunk.ow0;
          for (int64_t i = i_lo; i < i_hi; ++i)
            kernel_rows[q][i - i_lo] = rows.row(h_start + q * w.stride_h + i * w.dilation_h, g.in_w);
        }
        for (int64_t i = i_lo; i < i_hi; ++i) kernel_weights[i - i_lo] = w_c + i * w.kernel_w + chunk.tap_lo;
        const scalar_t* const* row_lists[2] = {kernel_rows[0].data(), kernel_rows[1].data()};
        taps_row(out_rows, row_lists, kernel_weights.data(), std::max<int64_t>(0, i_hi - i_lo),
                 chunk.tap_hi - chunk.tap_lo, w.dilation_w, chunk.count(), b, pair);
        oh += pair ? 2 : 1;
      }
    };
    for (int64_t task = begin; task < end; ++task) {  // task = (n, c)
      const int64_t n = task / g.in_channels, c = task % g.in_channels;
      const scalar_t* plane = in + task * in_plane;
      scalar_t* out_c = out + (n * g.out_channels + c * multiplier) * out_plane;  // (multiplier, OH, OW)
      for (int64_t m = 0; m < multiplier; ++m) {
        in_registers[m] = whole_rows && all_finite(weight + (c * multiplier + m) * taps, taps);
        // the taps first, the bias last (as torch); taps_row writes whole sums, the bias included
        if (!in_registers[m]) std::fill(out_c + m * out_plane, out_c + (m + 1) * out_plane, scalar_t(0));
      }
      for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += plan.chunk) {
        const ColumnChunk chunk =
            column_chunk(ow0, std::min(g.out_w, ow0 + plan.chunk), s, w.pad_w, w.kernel_w, w.dilation_w, g.in_w);
        if (!chunk.empty()) rows.start(plane, chunk);
        for (int64_t m = 0; m < multiplier; ++m) {
          scalar_t* o = out_c + m * out_plane;
          const scalar_t* w_c = weight + (c * multiplier + m) * taps;  // (KH, KW)
          const scalar_t* b = bias ? bias + c * multiplier + m : nullptr;
          if (in_registers[m] && chunk.empty()) {  // every tap in the padding: no terms
            for (int64_t oh = 0; oh < g.out_h; ++oh)
              std::fill(o + oh * g.out_w + chunk.ow0, o + oh * g.out_w + chunk.ow1, scalar_t(0) + (b ? *b : scalar_t(0)));
          } else if (in_registers[m]) {
            register_rows(o, w_c, b, chunk);
          } else if (!chunk.empty()) {
            const bool finite = all_finite(w_c, taps);  // else each tap is checked
            for_each_kernel_row(g, [&](int64_t oh, int64_t ih, int64_t i) {
              scalar_t* o_row = o + oh * g.out_w;
              const scalar_t* padded = plan.padded_rows ? rows.row(ih, g.in_w) : nullptr;
              for (int64_t j = chunk.tap_lo; j < chunk.tap_hi; ++j) {
                const scalar_t wt = w_c[i * w.kernel_w + j];
                if (padded != nullptr && (finite || std::isfinite(wt))) {
                  axpy_row(o_row + chunk.ow0, padded + (j - chunk.tap_lo) * w.dilation_w, wt, chunk.count(), s);
                } else {
                  const TapRun r = columns.within(j, chunk.ow0, chunk.ow1);
                  if (r.count > 0) axpy_row(o_row + r.lo, plane + ih * g.in_w + r.at, wt, r.count, s);
                }
              }
            });
          }
        }
      }
      if (bias) {
        for (int64_t m = 0; m < multiplier; ++m) {
          if (in_registers[m]) continue;
          const scalar_t b = bias[c * multiplier + m];
          for (scalar_t* o = out_c + m * out_plane; o < out_c + (m + 1) * out_plane; ++o) *o += b;
        }
      }
    }
  });
}

// The input gradient scatters along the exact in-bounds runs: a padded row here would be one more copy
// to add back, and measured no faster (each tap's stores feed the next tap's loads either way).
template <typename scalar_t>
void backward_input_kernel(scalar_t* grad_in, const scalar_t* grad_out, const scalar_t* weight, const Geometry& g) {
  const Window& w = g.win;
  const int64_t multiplier = g.out_channels / g.in_channels, taps = w.kernel_h * w.kernel_w;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w, s = w.stride_w;
  const TapColumns columns(g);
  at::parallel_for(0, g.batch * g.in_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {  // task = (n, c)
      const int64_t n = task / g.in_channels, c = task % g.in_channels;
      scalar_t* plane = grad_in + task * in_plane;
      std::fill(plane, plane + in_plane, scalar_t(0));
      for (int64_t oc = c * multiplier; oc < (c + 1) * multiplier; ++oc) {
        const scalar_t* go = grad_out + (n * g.out_channels + oc) * out_plane;
        for_each_kernel_row(g, [&](int64_t oh, int64_t ih, int64_t i) {
          const scalar_t* w_row = weight + oc * taps + i * w.kernel_w;
          for (const TapRun& r : columns.runs())
            if (r.count > 0) scatter_row(plane + ih * g.in_w + r.at, go + oh * g.out_w + r.lo, w_row[r.j], r.count, s);
        });
      }
    }
  });
}

// One image's terms of the weight gradient's partial sums, acc (KH·KW taps, V·L columns), for a KH×KW kernel of
// unit column step whose output rows fit V vectors: acc[tap (i, j)][k] += go_pad[oh][k] · x_pad[ih][k + j] for each
// output row oh and kernel row i inside the input, in that order. The terms and their order are dot_row's (the
// padded-rows path of backward_weight_kernel; taps that never meet the input add zeros to their +0 sums, which dot_row
// skips), but fused where the CPU has FMA (dot_row's are not), so the bits differ in the products' rounding; which
// of the two a plane takes depends on its geometry and this copy's width. The taps' sums stay in registers instead
// of a load and a store per tap, row and column (12% of a 3x3 192@28 weight gradient's samples were call and
// loop overhead around 28-wide rows). go_pad: (out_h, V·L), zero past out_w; x_pad: the input rows at column pad_w
// of rows `pitch` wide, zero around them.
template <typename scalar_t, int KH, int KW, int V>
MANUALGRAD_VECTOR_CLONES void weight_rows_in_registers(scalar_t* __restrict acc, const scalar_t* __restrict go_pad,
                                                       const scalar_t* __restrict x_pad, int64_t pitch,
                                                       const Geometry& g) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  const Window& w = g.win;
  vec a[KH][KW][V];
  for (int i = 0; i < KH; ++i)
    for (int j = 0; j < KW; ++j)
      for (int v = 0; v < V; ++v) load_vec(a[i][j][v], acc + ((i * KW + j) * V + v) * L);
  for (int64_t oh = 0; oh < g.out_h; ++oh) {
    const int64_t h_start = oh * w.stride_h - w.pad_h;
    int64_t i_lo, i_hi;
    taps_inside(h_start, int64_t(KH), w.dilation_h, g.in_h, i_lo, i_hi);
    vec gv[V];
    for (int v = 0; v < V; ++v) load_vec(gv[v], go_pad + (oh * V + v) * L);
    for (int i = 0; i < KH; ++i) {
      if (i < i_lo || i >= i_hi) continue;
      const scalar_t* row = x_pad + (h_start + i * w.dilation_h) * pitch;
      for (int j = 0; j < KW; ++j) {
        for (int v = 0; v < V; ++v) {
          vec x;
          load_vec(x, row + j + v * L);
          a[i][j][v] += gv[v] * x;
        }
      }
    }
  }
  for (int i = 0; i < KH; ++i)
    for (int j = 0; j < KW; ++j)
      for (int v = 0; v < V; ++v) std::memcpy(acc + ((i * KW + j) * V + v) * L, &a[i][j][v], sizeof(vec));
}

// Which weight_rows_in_registers fits g (its vectors of columns; 0: none): unit column step, no column dilation, a
// 3x3 kernel over rows of up to 2 vectors or a 5x5 over one (the partial sums then fill 18 or 25 of AVX-512's 32
// registers; with AVX2's 16, only a 3x3 over one), where the weight gradient takes padded rows in one chunk of
// columns, and a plane's padded copies (x_pad, go_pad) fit a ring's room, kRingSlots.
template <typename scalar_t>
int registers_fit(const Geometry& g, const RowPlan& plan) {
  const Window& w = g.win;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  if (!plan.padded_rows || w.stride_w != 1 || w.dilation_w != 1 || plan.chunk < g.out_w) return 0;
  int vectors = 0;
  if (w.kernel_h == 3 && w.kernel_w == 3 && g.out_w <= 2 * L) vectors = g.out_w <= L ? 1 : 2;
  if (w.kernel_h == 5 && w.kernel_w == 5 && g.out_w <= L) vectors = 1;
  if (w.kernel_h * w.kernel_w * vectors + 2 > kVectorRegisters) return 0;  // (+2: the row's operands)
  const bool fits = g.in_h <= kRingSlots && g.out_h <= kRingSlots &&
                    g.in_h * (vectors * L + w.kernel_w) + g.out_h * vectors * L <= kRingSlots;
  return fits ? vectors : 0;
}

template <typename scalar_t>
void backward_weight_kernel(scalar_t* grad_weight, const scalar_t* grad_out, const scalar_t* in, const Geometry& g) {
  const Window& w = g.win;
  const int64_t multiplier = g.out_channels / g.in_channels, taps = w.kernel_h * w.kernel_w;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w, s = w.stride_w;
  const TapColumns columns(g);
  // Each (tap, column) partial sum runs over images and rows in the same order whatever the chunk, and
  // the running total over columns continues from chunk to chunk: results do not depend on the chunks.
  const RowPlan plan = plan_rows(g, std::max<int64_t>(1, kPartialSums / taps));
  constexpr int64_t L = Vec<scalar_t>::lanes;
  const int vectors = registers_fit<scalar_t>(g, plan);
  // registers: the partial sums' rows are vectors·L wide, and each image's rows are copied padded (zero-filled)
  const int64_t pitch = vectors * L + w.kernel_w;
  at::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> acc(taps * std::max<int64_t>(plan.chunk, vectors * L));  // (taps, ld) below
    aligned_vector<scalar_t> go_pad(vectors ? g.out_h * vectors * L : 0), x_pad(vectors ? g.in_h * pitch : 0);
    PaddedRows<scalar_t> rows(plan);
    for (int64_t oc = begin; oc < end; ++oc) {
      const int64_t c = oc / multiplier;
      scalar_t* total = grad_weight + oc * taps;  // (taps,) the running totals
      std::fill(total, total + taps, scalar_t(0));
      for (int64_t ow0 = 0; ow0 < g.out_w; ow0 += plan.chunk) {
        const ColumnChunk chunk =
            column_chunk(ow0, std::min(g.out_w, ow0 + plan.chunk), s, w.pad_w, w.kernel_w, w.dilation_w, g.in_w);
        if (chunk.empty()) continue;
        const int64_t width = chunk.count(), ld = vectors ? vectors * L : width;  // acc_tap's row
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t n = 0; n < g.batch; ++n) {
          const scalar_t* plane = in + (n * g.in_channels + c) * in_plane;
          const scalar_t* go = grad_out + (n * g.out_channels + oc) * out_plane;
          // A gradient that is not finite would turn the padding's zeros into NaN: such planes take the
          // exact in-bounds runs.
          bool finite = plan.padded_rows;
          for (int64_t oh = 0; oh < g.out_h && finite; oh += width == g.out_w ? g.out_h : 1)
            finite = all_finite(go + oh * g.out_w + ow0, width == g.out_w ? out_plane : width);
          if (vectors && finite) {
            for (int64_t oh = 0; oh < g.out_h; ++oh)
              copy_run(go_pad.data() + oh * ld, go + oh * g.out_w, g.out_w);  // the columns past it stay zero
            for (int64_t ih = 0; ih < g.in_h; ++ih)
              copy_run(x_pad.data() + ih * pitch + w.pad_w, plane + ih * g.in_w, g.in_w);
            const auto run = [&](auto kernel) { kernel(acc.data(), go_pad.data(), x_pad.data(), pitch, g); };
            if (w.kernel_h == 5) run(weight_rows_in_registers<scalar_t, 5, 5, 1>);
            else if (vectors == 1) run(weight_rows_in_registers<scalar_t, 3, 3, 1>);
            else run(weight_rows_in_registers<scalar_t, 3, 3, 2>);
            continue;
          }
          rows.start(plane, chunk);
          for_each_kernel_row(g, [&](int64_t oh, int64_t ih, int64_t i) {
            const scalar_t* go_row = go + oh * g.out_w;
            const scalar_t* padded = finite ? rows.row(ih, g.in_w) : nullptr;
            for (int64_t j = chunk.tap_lo; j < chunk.tap_hi; ++j) {
              scalar_t* acc_tap = acc.data() + (i * w.kernel_w + j) * ld;  // acc_tap[k] is output column ow0 + k
              if (padded != nullptr) {
                dot_row(acc_tap, go_row + ow0, padded + (j - chunk.tap_lo) * w.dilation_w, width, s);
              } else {
                const TapRun r = columns.within(j, chunk.ow0, chunk.ow1);
                if (r.count > 0) dot_row(acc_tap + (r.lo - ow0), go_row + r.lo, plane + ih * g.in_w + r.at, r.count, s);
              }
            }
          });
        }
        for (int64_t t = 0; t < taps; ++t) {
          scalar_t sum = total[t];
          for (int64_t k = 0; k < width; ++k) sum += acc[t * ld + k];
          total[t] = sum;
        }
      }
    }
  });
}


// ---- Channels-last (NHWC), channel multiplier 1 ---------------------------------------------------------
// Input (N, H, W, C), output (N, OH, OW, C), weight as (KH·KW, C) rows (one per tap, transposed once): each
// output pixel is its bias plus, tap by tap in order, the tap's weights times the pixel it sees, a whole
// vector of channels at a time. Taps in the padding are skipped, as torch's kernels do.

constexpr int64_t kChannelBlock = 32;        // channels per task of the NHWC weight gradient by blocks
constexpr int64_t kRowsImageBytes = 1 << 20;  // ...which takes rows instead for images this large
constexpr int64_t kRowTermElems = 1 << 17;    // a chunk of rows' terms (doubles) of the NHWC weight gradient by rows
constexpr int64_t kSumGrain = 1 << 12;        // ...and the sums a task adds them to

constexpr int64_t kPaddedBand = 8;           // output rows per task of forward_nhwc_padded
constexpr int64_t kMaxPaddedElems = 1 << 20;  // ...whose zero-padded input rows stay within this many elements

// 7-wide kernels with stride and dilation 1 (ConvNeXt's 7x7) and finite weights: each task copies a band's input
// rows into zero-padded rows, so that every output is one of forward_nhwc_rows' runs; the padding's terms add
// weight x 0 = +-0 to a sum that starts at +0, which changes no bits, so the result is the taps-inside sums. At
// 14x14 most outputs have taps in the padding, which took forward_nhwc_pixel's tap-by-tap path. Rows narrower than
// two kernels keep that path: at 7x7 the padded rows are 3.4 times the image, and their copies cost more (768
// channels, batch 8: 0.90 against 0.77 ms).
bool padded_rows_apply(const Geometry& g) {
  const Window& w = g.win;
  const int64_t width = g.out_w + w.kernel_w - 1;
  return w.kernel_w == 7 && g.out_w >= 2 * w.kernel_w && w.stride_h == 1 && w.stride_w == 1 && w.dilation_h == 1 && w.dilation_w == 1 &&
         width == g.in_w + 2 * w.pad_w && (kPaddedBand + w.kernel_h - 1) * width * g.in_channels <= kMaxPaddedElems;
}

template <typename scalar_t>
void forward_nhwc_padded(scalar_t* out, const scalar_t* in, const scalar_t* wt, const scalar_t* bias,
                         const Geometry& g) {
  const Window& w = g.win;
  const int64_t C = g.in_channels, width = g.out_w + w.kernel_w - 1, band_rows = kPaddedBand + w.kernel_h - 1;
  std::vector<int64_t> offset(w.kernel_h * w.kernel_w);
  for (int64_t i = 0; i < w.kernel_h; ++i)
    for (int64_t j = 0; j < w.kernel_w; ++j) offset[i * w.kernel_w + j] = (i * width + j) * C;
  const int64_t bands = ceil_div(g.out_h, kPaddedBand);
  at::parallel_for(0, g.batch * bands, 1, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> rows(band_rows * width * C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, oh0 = task % bands * kPaddedBand;
      const int64_t count = std::min(kPaddedBand, g.out_h - oh0);
      const scalar_t* image = in + n * g.in_h * g.in_w * C;
      for (int64_t r = 0; r < count + w.kernel_h - 1; ++r) {
        scalar_t* row = rows.data() + r * width * C;
        const int64_t ih = oh0 + r - w.pad_h;
        if (ih < 0 || ih >= g.in_h) {
          std::fill_n(row, width * C, scalar_t(0));
          continue;
        }
        std::fill_n(row, w.pad_w * C, scalar_t(0));
        std::copy_n(image + ih * g.in_w * C, g.in_w * C, row + w.pad_w * C);
        std::fill_n(row + (w.pad_w + g.in_w) * C, w.pad_w * C, scalar_t(0));
      }
      forward_nhwc_adjacent<scalar_t, 7>(out + ((n * g.out_h + oh0) * g.out_w) * C, rows.data(), wt, bias,
                                         offset.data(), w.kernel_h, g.out_w, C, count, width * C);
    }
  });
}

bool nhwc_tiles_pay(const Geometry& g);  // (with the tiles, below)
template <typename scalar_t>
void forward_nhwc_tiles(scalar_t* out, const scalar_t* in, const scalar_t* wt, const scalar_t* bias, const Geometry& g);

template <typename scalar_t>
void forward_nhwc_kernel(scalar_t* out, const scalar_t* in, const scalar_t* wt, const scalar_t* bias,
                         const Geometry& g) {
  const int64_t C = g.in_channels;
  const int64_t taps = g.win.kernel_h * g.win.kernel_w;
  if (nhwc_tiles_pay(g) && C % Vec<scalar_t>::lanes == 0 && all_finite(wt, taps * C))
    return forward_nhwc_tiles(out, in, wt, bias, g);
  if (padded_rows_apply(g) && all_finite(wt, taps * C)) return forward_nhwc_padded(out, in, wt, bias, g);
  const InteriorRuns runs(g, C);  // the outputs whose taps all lie inside: forward_nhwc_run
  const int64_t adjacent = adjacent_taps(g.win);  // ...or forward_nhwc_adjacent, where a kernel row's taps are adjacent
  // Tasks own output rows (n, oh), so each output is computed whole by one task in one order.
  at::parallel_for(0, g.batch * g.out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> pixels(taps), inside(taps);  // the taps of one output pixel that lie inside the input
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, oh = row % g.out_h;
      const scalar_t* image = in + n * g.in_h * g.in_w * C;
      int64_t first;
      const bool row_runs = runs.row(g, oh, first);
      for (int64_t ow = 0; ow < g.out_w; ++ow) {
        if (row_runs && ow == runs.ow_lo) {
          scalar_t* o = out + (row * g.out_w + ow) * C;
          const int64_t count = runs.ow_hi - runs.ow_lo, step = g.win.stride_w * C;
          if (runs.rows && adjacent == 7) {
            forward_nhwc_adjacent<scalar_t, 7>(o, image + first * C, wt, bias, runs.offset.data(), g.win.kernel_h,
                                               count, C);
          } else if (runs.rows) {
            forward_nhwc_rows<scalar_t, 7>(o, image + first * C, wt, bias, runs.offset.data(), g.win.kernel_h, count,
                                           step, C);
          } else if (adjacent == 3 && taps == 9) {
            forward_nhwc_adjacent<scalar_t, 3>(o, image + first * C, wt, bias, runs.offset.data(), 3, count, C);
          } else if (adjacent == 5 && taps == 25) {
            forward_nhwc_adjacent<scalar_t, 5>(o, image + first * C, wt, bias, runs.offset.data(), 5, count, C);
          } else if (taps == 9) {
            forward_nhwc_run<scalar_t, 9>(o, image + first * C, wt, bias, runs.offset.data(), count, step, C);
          } else {
            forward_nhwc_run<scalar_t, 25>(o, image + first * C, wt, bias, runs.offset.data(), count, step, C);
          }
          ow = runs.ow_hi - 1;
          continue;
        }
        int64_t count = 0;
        for_each_tap(g, oh, ow, [&](int64_t tap, int64_t pixel) {
          if (pixel < 0) return;
          pixels[count] = pixel;
          inside[count++] = tap;
        });
        forward_nhwc_pixel(out + (row * g.out_w + ow) * C, image, wt, bias, pixels.data(), inside.data(), count, C);
      }
    }
  });
}

// grad_input: each output pixel's gradient, times each tap's weights, added into the pixel the tap saw.
// Kernels of at most kGatherTaps taps gather instead: each input pixel's sum over the taps that saw it, in the order
// of their outputs (row, then column), as the scatter adds them to a zero, stored once; tasks are input rows.
// The scatter's zero fill and its loads and stores of every pixel for each tap had taken 3.6 of 4 ms (3x3/2 over
// 96 channels at 112x112, batch 8, one thread of an Intel Xeon; the rest of its 14 ms was the fresh output's page
// faults, which torch's kernels meet too). Larger kernels keep the scatter: tasks own whole images (windows
// overlap), and walk them in position order.
template <typename scalar_t>
void backward_input_nhwc_gather(scalar_t* gi, const scalar_t* go, const scalar_t* wt, const Geometry& g) {
  const Window& w = g.win;
  const int64_t C = g.in_channels;
  at::parallel_for(0, g.batch * g.in_h, 1, [&](int64_t begin, int64_t end) {
    int64_t pixels[kGatherPixels * kGatherTaps], taps[kGatherPixels * kGatherTaps], counts[kGatherPixels];
    // for a chunk of columns, each column's kernel columns j and their output columns, the last j first (so its
    // output columns ascending): shared by the task's rows, which take the chunk in turn
    int64_t tap_columns[kGatherPixels * kGatherTaps], out_columns[kGatherPixels * kGatherTaps], reach_w[kGatherPixels];
    for (int64_t iw0 = 0; iw0 < g.in_w; iw0 += kGatherPixels) {
      const int64_t m = std::min(kGatherPixels, g.in_w - iw0);
      for (int64_t p = 0; p < m; ++p) {
        reach_w[p] = 0;
        for (int64_t j = w.kernel_w - 1; j >= 0; --j) {
          const int64_t t = iw0 + p + w.pad_w - j * w.dilation_w;
          if (t < 0 || t % w.stride_w != 0 || t / w.stride_w >= g.out_w) continue;
          tap_columns[p * kGatherTaps + reach_w[p]] = j;
          out_columns[p * kGatherTaps + reach_w[p]++] = t / w.stride_w;
        }
      }
      for (int64_t task = begin; task < end; ++task) {  // task = (n, ih)
        const int64_t n = task / g.in_h, ih = task % g.in_h;
        int64_t count_h = 0, kernel_rows[kGatherTaps], out_rows[kGatherTaps];  // (the same for row ih)
        for (int64_t i = w.kernel_h - 1; i >= 0; --i) {
          const int64_t t = ih + w.pad_h - i * w.dilation_h;
          if (t < 0 || t % w.stride_h != 0 || t / w.stride_h >= g.out_h) continue;
          kernel_rows[count_h] = i;
          out_rows[count_h++] = (n * g.out_h + t / w.stride_h) * g.out_w;
        }
        for (int64_t p = 0; p < m; ++p) {
          int64_t count = 0;
          for (int64_t r = 0; r < count_h; ++r) {
            for (int64_t k = 0; k < reach_w[p]; ++k) {
              pixels[p * kGatherTaps + count] = out_rows[r] + out_columns[p * kGatherTaps + k];
              taps[p * kGatherTaps + count++] = kernel_rows[r] * w.kernel_w + tap_columns[p * kGatherTaps + k];
            }
          }
          counts[p] = count;
        }
        gather_pixels(gi + (task * g.in_w + iw0) * C, go, wt, pixels, taps, counts, m, C);
      }
    }
  });
}

template <typename scalar_t>
void backward_input_nhwc_kernel(scalar_t* gi, const scalar_t* go, const scalar_t* wt, const Geometry& g) {
  if (g.win.kernel_h * g.win.kernel_w <= kGatherTaps) return backward_input_nhwc_gather(gi, go, wt, g);
  const int64_t C = g.in_channels;
  at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* image = gi + n * g.in_h * g.in_w * C;
      std::fill_n(image, g.in_h * g.in_w * C, scalar_t(0));
      for (int64_t oh = 0; oh < g.out_h; ++oh) {
        for (int64_t ow = 0; ow < g.out_w; ++ow) {
          const scalar_t* grad = go + ((n * g.out_h + oh) * g.out_w + ow) * C;
          for_each_tap(g, oh, ow, [&](int64_t tap, int64_t pixel) {
            if (pixel >= 0) axpy_channels(image + pixel * C, grad, wt + tap * C, C);
          });
        }
      }
    }
  });
}

// The weight gradient's terms of output row oh of one image, for cb channels C apart (the image's and the row's):
// acc[k * acc_stride + c] += tap k's sum over the row, formed in scalar_t in output order and added in double.
template <typename scalar_t>
void weight_row_terms(double* acc, int64_t acc_stride, const scalar_t* grad_row, const scalar_t* image,
                      const Geometry& g, const InteriorRuns& runs, int64_t oh, int64_t cb, int64_t C) {
  const Window& w = g.win;
  const int64_t taps = w.kernel_h * w.kernel_w;
  if (runs.enabled && taps == 9) return weight_nhwc_row<scalar_t, 9>(acc, acc_stride, grad_row, image, g, runs, oh, cb, C);
  if (runs.enabled) return weight_nhwc_row<scalar_t, 25>(acc, acc_stride, grad_row, image, g, runs, oh, cb, C);
  // Tap by tap over the row's outputs.
  for (int64_t i = 0; i < w.kernel_h; ++i) {
    const int64_t ih = oh * w.stride_h - w.pad_h + i * w.dilation_h;
    if (ih < 0 || ih >= g.in_h) continue;
    for (int64_t j = 0; j < w.kernel_w; ++j) {
      // the outputs whose tap j sees a column iw = ow * stride_w + shift inside the input
      const int64_t shift = j * w.dilation_w - w.pad_w;
      int64_t ow0, ow1;
      outputs_inside(0, g.out_w, shift, w.stride_w, g.in_w, ow0, ow1);
      if (ow1 > ow0)
        dot_run_channels(acc + (i * w.kernel_w + j) * acc_stride, grad_row + ow0 * C,
                         image + (ih * g.in_w + ow0 * w.stride_w + shift) * C, ow1 - ow0, w.stride_w * C, cb, C);
    }
  }
}

// grad_weight (KH·KW, C): per tap, the sum over every image and position of grad_output times the pixel the
// tap saw, in double: each output row's terms (weight_row_terms: a tap's sum over the row in scalar_t, in output
// order) added in row order, the same sums in the same order however the work is split (a vector lane computes
// what the scalar tail does). Two splits:
// - blocks: tasks own blocks of kChannelBlock channels (or of 16, one vector, so that few channels still spread
//   over the threads: MobileNet's 32 channels at 112x112, 96 and 144 at 56x56, 0.7-0.8x the time of blocks of 64
//   on 2 threads of a Zen 4), each sweeping every row;
// - rows (backward_weight_nhwc_rows): tasks own runs of whole rows, every channel.
// A block reads 64-128 bytes of every pixel (576 bytes apart at 144 channels), which waits on memory once an
// image no longer stays in the caches between blocks: 9 of 10 samples on two loads, and rows took 0.5-0.65x the
// time (an Intel Xeon, 2 threads, batch 8, 3x3: 144 at 56x56, 96 at 112x112 stride 2, 144 at 56x56 stride 2).
// Rows add each row's terms once more, in double, which costs more than it saves over small images (384 at
// 14x14 1.4x the time, 240 at 28x28 1.1x; 192 at 28x28 and 32 at 112x112 the same): images of 1 MB and more.
template <typename scalar_t>
void backward_weight_nhwc_blocks(scalar_t* gw, const scalar_t* go, const scalar_t* in, const Geometry& g) {
  const int64_t C = g.in_channels, taps = g.win.kernel_h * g.win.kernel_w;
  const int64_t per_block = ceil_div(C, kChannelBlock) >= 2 * at::get_num_threads() ? kChannelBlock : 16;
  const InteriorRuns runs(g, C);
  at::parallel_for(0, ceil_div(C, per_block), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(taps * kChannelBlock);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * per_block, cb = std::min(C, c0 + per_block) - c0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t n = 0; n < g.batch; ++n) {
        const scalar_t* image = in + n * g.in_h * g.in_w * C + c0;
        for (int64_t oh = 0; oh < g.out_h; ++oh)
          weight_row_terms(acc.data(), kChannelBlock, go + (n * g.out_h + oh) * g.out_w * C + c0, image, g, runs, oh,
                           cb, C);
      }
      for (int64_t tap = 0; tap < taps; ++tap)
        for (int64_t c = 0; c < cb; ++c) gw[tap * C + c0 + c] = static_cast<scalar_t>(acc[tap * kChannelBlock + c]);
    }
  });
}

// total[i] += part[i] for i < n.
MANUALGRAD_VECTOR_CLONES void add_terms(double* __restrict total, const double* __restrict part, int64_t n) {
  for (int64_t i = 0; i < n; ++i) total[i] += part[i];
}

// The rows split: each task writes its rows' terms into their own slots, and a chunk of `chunk` rows' terms (at
// least one row) is then added to the sums in row order, a block of them a task.
template <typename scalar_t>
void backward_weight_nhwc_rows(scalar_t* gw, const scalar_t* go, const scalar_t* in, const Geometry& g,
                               int64_t chunk) {
  const int64_t C = g.in_channels, per_row = g.win.kernel_h * g.win.kernel_w * C, rows = g.batch * g.out_h;
  const InteriorRuns runs(g, C);
  std::vector<double> sums(per_row, 0.0), terms(chunk * per_row);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t count = std::min(chunk, rows - r0);
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = (r0 + r) / g.out_h, oh = (r0 + r) % g.out_h;
        double* t = terms.data() + r * per_row;
        std::fill_n(t, per_row, 0.0);  // (taps whose kernel row misses the input add nothing)
        weight_row_terms(t, C, go + (r0 + r) * g.out_w * C, in + n * g.in_h * g.in_w * C, g, runs, oh, C, C);
      }
    });
    at::parallel_for(0, per_row, kSumGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = 0; r < count; ++r) add_terms(sums.data() + begin, terms.data() + r * per_row + begin, end - begin);
    });
  }
  for (int64_t i = 0; i < per_row; ++i) gw[i] = static_cast<scalar_t>(sums[i]);
}

// Rows where an image is large and a chunk of rows gives every thread two tasks (else blocks, whose tasks are the
// channels'): both give the same bits, so the choice may depend on the thread count.
template <typename scalar_t>
void backward_weight_nhwc_kernel(scalar_t* gw, const scalar_t* go, const scalar_t* in, const Geometry& g) {
  const int64_t per_row = std::max<int64_t>(1, g.win.kernel_h * g.win.kernel_w * g.in_channels);
  const int64_t chunk = std::min(g.batch * g.out_h, kRowTermElems / per_row);
  if (g.in_h * g.in_w * g.in_channels * int64_t(sizeof(scalar_t)) >= kRowsImageBytes &&
      chunk >= 2 * at::get_num_threads())
    backward_weight_nhwc_rows(gw, go, in, g, chunk);
  else
    backward_weight_nhwc_blocks(gw, go, in, g);
}


// ---- NCHW on tiles: an image's band of output rows for one vector of channels ---------------------------------
// The NCHW forward (and the stride-1 input gradient, the same forward of grad_output): a task transposes the input
// rows one band of output rows reads, for L channels (one vector), into a zero-padded channels-last tile (L
// positions by L channels in registers), computes the band's outputs over the tile (forward_band), and transposes
// them back into the output's planes. Every output is then a run: no output gathers its taps one by one (a 5x5
// kernel at 7x7 has all its taps inside for 9 of the 49 outputs), the NCHW kernel's calls per row and tap are gone,
// and no channels-last copy of the whole tensor is made (torch's transposes of 14x14 planes ran at 4-6 GB/s). The
// padding's terms add weight x 0 = +-0 to sums that start at +0, which changes no bits (so the weights must be
// finite), and each output's sum is the channels-last kernels', whatever the band or thread.
constexpr int64_t kTileElems = 1 << 14;  // a task's input tile, about; wider rows keep the other kernels

struct TilePlan {
  int64_t tile_w = 0;  // tile columns: column t holds input column t - pad_w
  int64_t band = 1, bands = 1;  // output rows per task, and tasks per (image, channel block)
  int64_t tile_elems = 0;  // the tallest band's tile
  std::vector<int64_t> offset;  // tap (i, j)'s element offset in the tile from its output's first tap
  // pixel: the elements of one tile column (its channels); vectors: of those, the vectors computed one at a time,
  // each reading its share of the tile (so the tile may be that many times kTileElems)
  TilePlan(const Geometry& g, int64_t pixel, int64_t vectors = 1) {
    const Window& w = g.win;
    const int64_t span_h = (w.kernel_h - 1) * w.dilation_h, span_w = (w.kernel_w - 1) * w.dilation_w;
    tile_w = (g.out_w - 1) * w.stride_w + span_w + 1;
    const int64_t rows =
        std::max<int64_t>(1, ((kTileElems * vectors / (tile_w * pixel)) - span_h - 1) / w.stride_h + 1);
    bands = ceil_div(g.out_h, std::min(rows, g.out_h));
    band = ceil_div(g.out_h, bands);  // cut evenly
    tile_elems = ((band - 1) * w.stride_h + span_h + 1) * tile_w * pixel;
    for (int64_t i = 0; i < w.kernel_h; ++i)
      for (int64_t j = 0; j < w.kernel_w; ++j) offset.push_back((i * w.dilation_h * tile_w + j * w.dilation_w) * pixel);
  }
};

// A tile task (n, block, band): its image, block of channels, output rows [oh0, oh0 + rows), and the tile_h input
// rows from ih0 they read (tile row t is input row ih0 + t).
struct TileTask {
  int64_t n, block, oh0, rows, ih0, tile_h;
  TileTask(const TilePlan& plan, const Geometry& g, int64_t blocks, int64_t task)
      : n(task / (blocks * plan.bands)), block(task / plan.bands % blocks), oh0(task % plan.bands * plan.band),
        rows(std::min(plan.band, g.out_h - oh0)), ih0(oh0 * g.win.stride_h - g.win.pad_h),
        tile_h((rows - 1) * g.win.stride_h + (g.win.kernel_h - 1) * g.win.dilation_h + 1) {}
  // forward_band's view of the tile: rows of `row` elements, columns of `pixel`.
  BandLayout layout(const Geometry& g, int64_t row, int64_t pixel, int64_t out_step, int64_t w_step) const {
    const Window& w = g.win;
    BandLayout b{g.out_w, w.stride_h * row, w.stride_w * pixel, out_step, w_step, adjacent_taps(w)};
    b.real_lo = std::max<int64_t>(0, -ih0);
    b.real_hi = std::max(b.real_lo, std::min(tile_h, g.in_h - ih0));
    b.stride_h = w.stride_h;
    b.dilation_h = w.dilation_h;
    return b;
  }
};

// The tile's zeros: its rows outside the input, and the columns outside it of the others (`pixel` elements a
// column); then copy(row, ih) for each row inside, whose columns [pad_w, pad_w + in_w) within the tile it fills.
template <typename scalar_t, typename F>
void fill_tile(scalar_t* tile, int64_t pixel, int64_t tile_w, const Geometry& g, const TileTask& t, const F& copy) {
  const int64_t pad_w = g.win.pad_w;
  for (int64_t r = 0; r < t.tile_h; ++r) {
    scalar_t* row = tile + r * tile_w * pixel;
    const int64_t ih = t.ih0 + r;
    if (ih < 0 || ih >= g.in_h) {
      zero_run(row, tile_w * pixel);
      continue;
    }
    zero_run(row, std::min(pad_w, tile_w) * pixel);
    if (pad_w + g.in_w < tile_w) zero_run(row + (pad_w + g.in_w) * pixel, (tile_w - pad_w - g.in_w) * pixel);
    copy(row, ih);
  }
}

// The L x L block r (r[i]: L values of channel i) transposed in place (r[j]: the L channels of position j): bit D
// of the row index and of the lane swapped, for D = L/2, ..., 1. Inlined, so it is compiled for its caller's clone.
template <int D, typename vec, int... J>
__attribute__((always_inline)) inline void swap_bit(vec* r, std::integer_sequence<int, J...>) {
  constexpr int L = sizeof...(J);
  for (int i = 0; i < L; ++i) {
    if (i & D) continue;
    const vec a = r[i], b = r[i + D];
    r[i] = __builtin_shufflevector(a, b, ((J & D) ? L + J - D : J)...);
    r[i + D] = __builtin_shufflevector(a, b, ((J & D) ? L + J : J + D)...);
  }
}

template <typename vec, int L>
__attribute__((always_inline)) inline void transpose_block(vec* r) {
  using lanes = std::make_integer_sequence<int, L>;
  if constexpr (L >= 16) swap_bit<8>(r, lanes{});
  if constexpr (L >= 8) swap_bit<4>(r, lanes{});
  if constexpr (L >= 4) swap_bit<2>(r, lanes{});
  swap_bit<1>(r, lanes{});
}

// NCHW input to tile: positions [p_begin, p_end) of `channels` (<= L) planes `plane` apart (p = ih * in_w + iw),
// each to tile pixel (ih - ih0) * tile_w + iw + pad_w if that column is in the tile; lanes past `channels` zero.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void planes_to_tile(scalar_t* __restrict tile, int64_t tile_w, const scalar_t* __restrict planes,
                                             int64_t plane, int64_t channels, int64_t in_w, int64_t pad_w,
                                             int64_t ih0, int64_t p_begin, int64_t p_end) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int L = Vec<scalar_t>::lanes;
  vec r[L];
  int64_t iw = p_begin % in_w;
  scalar_t* dst = tile + ((p_begin / in_w - ih0) * tile_w + iw + pad_w) * L;  // position p's pixel
  for (int64_t p0 = p_begin; p0 < p_end; p0 += L) {
    const int64_t n = std::min<int64_t>(L, p_end - p0);
    if (n == L && channels == L) {
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) load_vec(r[i], planes + i * plane + p0);
    } else {
      for (int i = 0; i < L; ++i) {
        r[i] = vec{};
        if (i < channels) std::memcpy(&r[i], planes + i * plane + p0, n * sizeof(scalar_t));
      }
    }
    transpose_block<vec, L>(r);
    // (unrolled, so that r stays in registers)
#pragma GCC unroll 16
    for (int j = 0; j < L; ++j) {
      if (j < n && iw + pad_w < tile_w) std::memcpy(dst, &r[j], sizeof(vec));
      dst += L;
      if (++iw == in_w) iw = 0, dst += (tile_w - in_w) * L;
    }
  }
}

// Tile to NCHW output: the tile's `count` pixels (L channels each) to positions [0, count) of `channels` planes.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void tile_to_planes(scalar_t* __restrict planes, int64_t plane, int64_t channels,
                                             const scalar_t* __restrict tile, int64_t count) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int L = Vec<scalar_t>::lanes;
  vec r[L];
  for (int64_t q0 = 0; q0 < count; q0 += L) {
    const int64_t n = std::min<int64_t>(L, count - q0);
#pragma GCC unroll 16
    for (int j = 0; j < L; ++j) {
      if (j < n) load_vec(r[j], tile + (q0 + j) * L);
      else r[j] = vec{};
    }
    transpose_block<vec, L>(r);
    if (n == L) {
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i)
        if (i < channels) std::memcpy(planes + i * plane + q0, &r[i], sizeof(vec));
    } else {
      for (int64_t i = 0; i < channels; ++i) std::memcpy(planes + i * plane + q0, &r[i], n * sizeof(scalar_t));
    }
  }
}

template <typename scalar_t>
void forward_tiles_kernel(scalar_t* out, const scalar_t* in, const scalar_t* wt, const scalar_t* bias,
                          const Geometry& g) {
  constexpr int64_t L = Vec<scalar_t>::lanes;
  const Window& w = g.win;
  const TilePlan plan(g, L);
  const int64_t C = g.in_channels, blocks = ceil_div(C, L), taps = w.kernel_h * w.kernel_w;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w, tile_w = plan.tile_w;
  at::parallel_for(0, g.batch * blocks * plan.bands, 1, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> tile(plan.tile_elems), outs(plan.band * g.out_w * L);
    for (int64_t task = begin; task < end; ++task) {
      const TileTask t(plan, g, blocks, task);
      const int64_t c0 = t.block * L, cb = std::min(L, C - c0);
      fill_tile(tile.data(), L, tile_w, g, t, [](scalar_t*, int64_t) {});  // the inside rows: transposed below
      const int64_t ih_lo = std::max<int64_t>(t.ih0, 0), ih_hi = std::min(t.ih0 + t.tile_h, g.in_h);
      if (ih_lo < ih_hi)
        planes_to_tile(tile.data(), tile_w, in + (t.n * C + c0) * in_plane, in_plane, cb, g.in_w, w.pad_w, t.ih0,
                       ih_lo * g.in_w, ih_hi * g.in_w);
      forward_band(outs.data(), tile.data(), wt + t.block * taps * L, bias ? bias + t.block * L : nullptr,
                   plan.offset.data(), taps, t.rows * g.out_w,
                   t.layout(g, tile_w * L, L, L, L));
      tile_to_planes(out + (t.n * C + c0) * out_plane + t.oh0 * g.out_w, out_plane, cb, outs.data(), t.rows * g.out_w);
    }
  });
}


// Channels-last 5x5 and 7x7 kernels of stride 1 over short rows (EfficientNet's and ConvNeXt's 14x14 and 7x7
// stages; the stride-1 input gradient too, a forward of grad_output): the forward on zero-padded tiles of an image's
// band of rows and a block of kTileVectors vectors of channels, copied from the input's pixels; forward_band then
// writes each vector of channels' outputs straight into the output. At 7x7 a 5x5 kernel's taps all lie inside for 9
// of 49 outputs, and forward_nhwc_run keeps its 25 weight vectors in registers, which AVX2's 16 do not hold: two
// loads a term there, 1.125 in forward_band's blocks. Interleaved on a 2-core Zen 3, batch 8, forward ours/torch:
// 5x5 1152@7 1.31 -> 1.03, 480@14 1.38 -> 1.01, 7x7 384@14 1.54 -> 0.88, 768@7 1.25 -> 1.01. 3x3 kernels, strides
// over 1 and rows of 28 and more lost or tied (the copies cost what the kernels save: 3x3 672@14 1.03 -> 1.57).
// Since forward_band's rows load each input once per kernel row (row_block), rows of 28 win on an Intel Xeon (2
// threads, batch 8, ms against the other kernels [torch]: 5x5 240@28 0.60-0.62 against 0.71-0.73 [0.55], 7x7 192@28
// 0.75-0.77 against 0.83-0.87 [0.70]) and rows of 56 still lose (7x7 96@56 1.64-1.78 against 1.43-1.48 [1.24-1.30]).
// The channels must be whole vectors.
constexpr int64_t kTileVectors = 4;
constexpr int64_t kShortTileRows = 32;

bool tiles_fit(const Geometry& g) {
  // A band of one output row fits 4 tiles' room (each factor bounded first, so nothing overflows).
  const Window& w = g.win;
  const int64_t columns = kTileElems / Vec<float>::lanes;
  for (const int64_t v : {g.out_w, w.stride_w, w.dilation_w, w.kernel_w, w.dilation_h, w.kernel_h})
    if (v > columns) return false;
  const int64_t tile_w = (g.out_w - 1) * w.stride_w + (w.kernel_w - 1) * w.dilation_w + 1;
  return tile_w <= columns && ((w.kernel_h - 1) * w.dilation_h + 1) * tile_w <= 4 * columns;
}

bool nhwc_tiles_pay(const Geometry& g) {
  const Window& w = g.win;
  return g.spatial_dims == 2 && !g.empty() && w.stride_h == 1 && w.stride_w == 1 && w.kernel_h * w.kernel_w >= 25 &&
         g.out_w < kShortTileRows && tiles_fit(g);
}

template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void pixels_to_tile(scalar_t* __restrict row, int64_t pixel, const scalar_t* __restrict src,
                                             int64_t count, int64_t C, int64_t cb) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  if (cb == kTileVectors * L) {  // the usual block, unrolled: GCC made the loop below a memcpy call per pixel
    for (int64_t p = 0; p < count; ++p) {
      vec x[kTileVectors];
#pragma GCC unroll 4
      for (int v = 0; v < kTileVectors; ++v) load_vec(x[v], src + p * C + v * L);
#pragma GCC unroll 4
      for (int v = 0; v < kTileVectors; ++v) std::memcpy(row + p * pixel + v * L, &x[v], sizeof(vec));
    }
    return;
  }
  for (int64_t p = 0; p < count; ++p) {
    for (int64_t v = 0; v < cb; v += L) {
      vec x;
      load_vec(x, src + p * C + v);
      std::memcpy(row + p * pixel + v, &x, sizeof(vec));
    }
  }
}

template <typename scalar_t>
void forward_nhwc_tiles(scalar_t* out, const scalar_t* in, const scalar_t* wt, const scalar_t* bias, const Geometry& g) {
  constexpr int64_t L = Vec<scalar_t>::lanes;
  const Window& w = g.win;
  const int64_t C = g.in_channels, CB = std::min(C, kTileVectors * L), blocks = ceil_div(C, CB);
  const int64_t taps = w.kernel_h * w.kernel_w;
  const TilePlan plan(g, CB, CB / Vec<scalar_t>::lanes);
  const int64_t tile_w = plan.tile_w;
  at::parallel_for(0, g.batch * blocks * plan.bands, 1, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> tile(plan.tile_elems);
    for (int64_t task = begin; task < end; ++task) {
      const TileTask t(plan, g, blocks, task);
      const int64_t c0 = t.block * CB, cb = std::min(CB, C - c0);
      fill_tile(tile.data(), CB, tile_w, g, t, [&](scalar_t* row, int64_t ih) {
        if (w.pad_w < tile_w)
          pixels_to_tile(row + w.pad_w * CB, CB, in + ((t.n * g.in_h + ih) * g.in_w) * C + c0,
                         std::min(g.in_w, tile_w - w.pad_w), C, cb);
      });
      for (int64_t v = 0; v < cb; v += L)
        forward_band(out + ((t.n * g.out_h + t.oh0) * g.out_w) * C + c0 + v, tile.data() + v, wt + c0 + v,
                     bias ? bias + c0 + v : nullptr, plan.offset.data(), taps, t.rows * g.out_w,
                     t.layout(g, tile_w * CB, CB, C, C));
    }
  });
}

// The NCHW weight gradient on whole-image tiles of one vector of channels: a task's images' L planes of the input
// and of grad_output transposed into (H, W, L) and (OH, OW, L) tiles, and the channels-last kernel's terms of each
// image taken from them with C = L. Each sum is then backward_weight_nhwc_kernel's, in its order, with no
// channels-last copies of the whole tensors. (The input gradient's scatter, for strides over 1, was slower on such
// tiles than on channels-last copies: a call per pixel and tap for one vector of channels, 240@28 3x3/2 1.0 -> 1.3 ms.)
constexpr int64_t kImageTileElems = 1 << 16;  // a task's tiles, at most

template <typename scalar_t>
void weight_tiles_kernel(scalar_t* gw, const scalar_t* go, const scalar_t* in, const Geometry& g) {
  constexpr int64_t L = Vec<scalar_t>::lanes;
  const int64_t C = g.in_channels, blocks = ceil_div(C, L), taps = g.win.kernel_h * g.win.kernel_w;
  const int64_t in_plane = g.in_h * g.in_w, out_plane = g.out_h * g.out_w;
  const InteriorRuns runs(g, L);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> image(in_plane * L), grad(out_plane * L);
    std::vector<double> acc(taps * L);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * L, cb = std::min(L, C - c0);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t n = 0; n < g.batch; ++n) {
        planes_to_tile(image.data(), g.in_w, in + (n * C + c0) * in_plane, in_plane, cb, g.in_w, 0, 0, 0, in_plane);
        planes_to_tile(grad.data(), g.out_w, go + (n * C + c0) * out_plane, out_plane, cb, g.out_w, 0, 0, 0, out_plane);
        for (int64_t oh = 0; oh < g.out_h; ++oh)  // (the lanes past cb are zero, and dropped)
          weight_row_terms(acc.data(), L, grad.data() + oh * g.out_w * L, image.data(), g, runs, oh, L, L);
      }
      for (int64_t c = 0; c < cb; ++c)
        for (int64_t tap = 0; tap < taps; ++tap) gw[(c0 + c) * taps + tap] = static_cast<scalar_t>(acc[tap * L + c]);
    }
  });
}

}  // namespace

bool depthwise_nhwc_supported(const Geometry& g) { return is_depthwise(g) && g.out_channels == g.in_channels; }

bool depthwise_tiles_apply(const at::Tensor& weight, const Geometry& g) {
  if (!MANUALGRAD_WIDTH::depthwise_nhwc_supported(g) || g.spatial_dims != 2 || g.empty() || !tiles_fit(g)) return false;
  const at::Tensor wt = weight.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(wt.scalar_type(), "depthwise_tiles_apply",
                                    [&] { return all_finite(wt.const_data_ptr<scalar_t>(), wt.numel()); });
}

namespace {
// (blocks, taps, L): each block's weights (taps in reverse order if flip), zero past the last channel.
at::Tensor blocked_weights(const at::Tensor& weight, const Geometry& g, int64_t L, bool flip) {
  const int64_t C = g.in_channels, taps = g.win.kernel_h * g.win.kernel_w, blocks = ceil_div(C, L);
  at::Tensor rows = weight.reshape({C, taps});
  if (flip) rows = rows.flip({1});
  at::Tensor wt = at::zeros({blocks * L, taps}, weight.options());
  wt.narrow(0, 0, C).copy_(rows);
  return wt.view({blocks, L, taps}).transpose(1, 2).contiguous();
}
}  // namespace

void depthwise_forward_tiles_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& bias, const Geometry& g, bool flip) {
  TORCH_INTERNAL_ASSERT(input.is_contiguous() && output.is_contiguous());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "depthwise_forward_tiles_cpu", [&] {
    constexpr int64_t L = Vec<scalar_t>::lanes;
    const at::Tensor wt = blocked_weights(weight, g, L, flip);
    at::Tensor b;  // (blocks * L): zero past the last channel
    if (bias.defined()) {
      b = at::zeros({wt.size(0) * L}, bias.options());
      b.narrow(0, 0, g.in_channels).copy_(bias);
    }
    forward_tiles_kernel(output.data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(),
                         b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, g);
  });
}

bool depthwise_image_tiles_apply(const Geometry& g) {
  return MANUALGRAD_WIDTH::depthwise_nhwc_supported(g) && g.spatial_dims == 2 && !g.empty() &&
         (g.in_h * g.in_w + g.out_h * g.out_w) * Vec<float>::lanes <= kImageTileElems;
}

void depthwise_backward_weight_tiles_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output,
                                         const at::Tensor& input, const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "depthwise_backward_weight_tiles_cpu", [&] {
    weight_tiles_kernel(grad_weight.data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                        input.const_data_ptr<scalar_t>(), g);
  });
}

void depthwise_forward_nhwc_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                                const at::Tensor& bias, const Geometry& g) {
  const int64_t taps = g.win.kernel_h * g.win.kernel_w;
  const at::Tensor wt = weight.reshape({g.out_channels, taps}).t().contiguous();  // (taps, C)
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "depthwise_forward_nhwc_cpu", [&] {
    forward_nhwc_kernel(output.data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), wt.const_data_ptr<scalar_t>(),
                        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, g);
  });
}

void depthwise_backward_input_nhwc_cpu(at::Tensor& grad_input, const at::Tensor& grad_output,
                                       const at::Tensor& weight, const Geometry& g) {
  const int64_t taps = g.win.kernel_h * g.win.kernel_w;
  Geometry flipped;
  if (input_gradient_as_forward(g, flipped)) {
    // Gathering each input pixel's taps in registers (forward_nhwc_run) beats adding every output's taps into the
    // pixels they came from: 3x3 over 144 channels at 56x56, batch 8, 4.7 -> 1.2 ms (torch 3.7; Zen 5).
    const at::Tensor wt = weight.reshape({g.out_channels, taps}).flip({1}).t().contiguous();  // (taps, C), reversed
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "depthwise_backward_input_nhwc_cpu", [&] {
      forward_nhwc_kernel(grad_input.data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                          wt.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr), flipped);
    });
    return;
  }
  const at::Tensor wt = weight.reshape({g.out_channels, taps}).t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "depthwise_backward_input_nhwc_cpu", [&] {
    backward_input_nhwc_kernel(grad_input.data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                               wt.const_data_ptr<scalar_t>(), g);
  });
}

void depthwise_backward_weight_nhwc_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output,
                                        const at::Tensor& input, const Geometry& g) {
  const int64_t taps = g.win.kernel_h * g.win.kernel_w;
  at::Tensor gw = at::empty({taps, g.out_channels}, grad_weight.options());
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "depthwise_backward_weight_nhwc_cpu", [&] {
    backward_weight_nhwc_kernel(gw.data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(),
                                input.const_data_ptr<scalar_t>(), g);
  });
  grad_weight.copy_(gw.t().reshape(grad_weight.sizes()));
}

void depthwise_forward_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                           const at::Tensor& bias, const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "depthwise_forward_cpu", [&] {
    forward_kernel(output.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                   bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, g);
  });
}

void depthwise_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                  const Geometry& g) {
  const Window& w = g.win;
  Geometry flipped;
  if (input_gradient_as_forward(g, flipped)) {
    // The forward of grad_output with the kernel flipped, as the channels-last input gradient does
    // (depthwise_backward_input_nhwc_cpu), each input pixel's taps summed in the forward's rows rather than every
    // output's taps added into the rows they came from. NCHW, batch 8, 2-core Zen 4, ours/torch: 3x3 192@28
    // 2.79 -> 1.44, 144@56 1.09 -> 0.68, 96@112 0.77 -> 0.50; 5x5 240@28 2.92 -> 0.97.
    const at::Tensor reversed = weight.reshape({g.out_channels, w.kernel_h * w.kernel_w}).flip({1}).contiguous();
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "depthwise_backward_input_cpu", [&] {
      forward_kernel(grad_input.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(), reversed.data_ptr<scalar_t>(),
                     static_cast<const scalar_t*>(nullptr), flipped);
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "depthwise_backward_input_cpu", [&] {
    backward_input_kernel(grad_input.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                          weight.data_ptr<scalar_t>(), g);
  });
}

void depthwise_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                   const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "depthwise_backward_weight_cpu", [&] {
    backward_weight_kernel(grad_weight.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                           input.data_ptr<scalar_t>(), g);
  });
}

}  // namespace MANUALGRAD_WIDTH
}  // namespace manualgrad
