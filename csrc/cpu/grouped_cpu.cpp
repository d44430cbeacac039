// grouped_cpu.cpp — grouped convolutions with few channels a group (ResNeXt's 3x3 convolutions over 32 groups
// of 4..32 channels), computed directly from each group's input planes, in either layout, with no columns.
//   forward:      out[n, oc] = the sum over the group's input channels ic and taps (i, j) of w[oc, ic, i, j] × the
//                 input slice tap (i, j) sees, + bias[oc]
//   grad_input:   for each phase of the input modulo the stride, a forward of grad_output over the taps that reach
//                 it, each group's weight transposed and those taps flipped (where the input's rows are contiguous,
//                 a task computes every phase of its band and writes the interleaved rows once)
//   grad_weight:  grad_w[oc, ic, i, j] = the sum over images and positions of grad_out[n, oc] × the slice tap (i, j)
//                 saw
// Why not im2col + BLAS: a group's product has only C_out/g rows, so writing and reading the columns (9 copies of
// the input for a 3x3) cost more than the few multiply-adds each column element takes part in, and each of the
// many small products packs its operands again (2-core Zen 4, batch 8, ours/torch before: forward of 3x3 over 32
// groups 1.5-2.8, input gradient 0.6-3.1, weight gradient 0.5-2.3).
// How: a task copies one image's rows of one group's input channels into phase planes: the zero-padded input split
// by row and column phase modulo the stride, each plane `pitch` = OW + the kernel's reach (in strides) wide. Output
// (oh, ow) is then element q = oh * pitch + ow of a flat grid, and tap (i, j) reads its phase plane at q plus a
// fixed offset, for every q: one vector of consecutive q (across output rows) takes one load per tap, for any
// stride, padding and dilation. The grid's columns past OW are computed and dropped (2 of 9 at 7x7, 2 of 58 at
// 56x56). Each task owns its outputs (or weight-gradient entries) and sums them in a fixed order, so results do
// not depend on the thread count. Channels-last outputs whose groups have whole vectors of output channels take
// pixel planes instead (the input's channels side by side, vectors over output channels; below).
#include "grouped_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <atomic>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <optional>
#include <limits>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "tasks.h"
#include "vectorize.h"
#include "winograd_cpu.h"
#include "winograd_tiles.h"

namespace manualgrad {
namespace MANUALGRAD_WIDTH {  // (vectorize.h: this copy's vector width)
namespace {

constexpr int64_t kMaxPlaneElems = 1 << 15;    // one task's planes for a band of rows: 128 KB of float32, in L2
constexpr int64_t kMaxTaskElems = 1 << 22;     // ...and never more than this, however wide one row is
constexpr int64_t kMaxChannelsPerGroup = 64;   // wider groups are products BLAS runs well
constexpr int64_t kMinParallelGather = 1 << 15;  // weights gathered by one thread below this many elements
constexpr int64_t kMinWeightTasks = 8;         // the weight gradient's tasks: groups × blocks of output channels
constexpr int64_t kMaxWeightBlockElems = 1 << 18;  // ...and its copies of a block of groups' chunk, 1 MB of float32
// Register blocks: output channels × vectors of q; 4 × 3 accumulators (and 3 + 1 operands) would take all of AVX2's
// 16 registers. The weight gradient's blocks are output channels × terms: 4 × 3 on AVX2 too, where its 4 grad
// vectors are 17 registers and GCC takes one of them from memory (1.5x 4 × 2's rate on a Zen 3; benchmarks/NOTES.md);
// 4 × 6 with AVX-512's 32 (29 registers; GCC keeps one sum on the stack, still faster than 4 × 3 or 4 × 5 on a Zen 4).
constexpr int O_MAX = 4, V_MAX = kVectorRegisters >= 32 ? 3 : 2, T_MAX = kVectorRegisters >= 32 ? 6 : 3;

// v = the vector at p, held in a register where AVX-512's 32 registers leave room: a volatile load, which GCC cannot
// fold into each multiply-add that uses v (it did, loading v again for every one); load_vec with AVX2's 16.
template <typename V, typename scalar_t>
[[gnu::always_inline]] inline void load_vec_held(V& v, const scalar_t* p) {
  if constexpr (kVectorRegisters >= 32)
    v = *reinterpret_cast<const volatile typename VecBytes<scalar_t, sizeof(V)>::unaligned*>(p);
  else
    load_vec(v, p);
}

// Element strides of a (N, C, H, W) or (N, C, W) tensor, whatever its layout.
struct Strides {
  int64_t n, c, h, w;
};
Strides strides_of(const at::Tensor& t) {
  if (t.dim() == 3) return {t.stride(0), t.stride(1), 0, t.stride(2)};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// A weight (C_out, C_in/g, [KH,] KW) in any layout: entry (oc, ic, kh, kw) at data + oc·n + ic·c + kh·h + kw·w
// (the Strides of a 4-d tensor, read as weight dimensions), and term t = (ic·KH + kh)·KW + kw of output channel oc.
template <typename scalar_t>
struct WeightRef {
  scalar_t* data;
  Strides s;
  int64_t kernel_h, kernel_w;
  // f(t, the entry of term t of output channel oc) for t in [t0, t1), stepping the indices (finding each entry's
  // with three divisions took 5% of a grouped weight gradient's time)
  template <typename F>
  void for_terms(int64_t oc, int64_t t0, int64_t t1, const F& f) const {
    int64_t ic = t0 / (kernel_h * kernel_w), kh = t0 / kernel_w % kernel_h, kw = t0 % kernel_w;
    for (int64_t t = t0; t < t1; ++t) {
      f(t, data[oc * s.n + ic * s.c + kh * s.h + kw * s.w]);
      if (++kw == kernel_w) {
        kw = 0;
        if (++kh == kernel_h) kh = 0, ++ic;
      }
    }
  }
};
template <typename scalar_t>
WeightRef<scalar_t> weight_ref(const at::Tensor& w, const Geometry& g) {
  return {static_cast<scalar_t*>(w.data_ptr()), strides_of(w), g.win.kernel_h, g.win.kernel_w};
}

// The phase planes of a band of output rows [oh0, oh0 + rows): plane (a, b), for a < stride_h and b < stride_w,
// holds the padded input's row stride_h * (oh0 + i) + a, column stride_w * j + b at [i][j] (zero in the padding),
// i < height, j < pitch. Tap (kh, kw) of output (oh0 + i, ow) reads plane ((kh·dh) % sh, (kw·dw) % sw) at
// (i + kh·dh / sh) * pitch + ow + kw·dw / sw. Every band has the layout of the tallest, so the taps' offsets hold
// for all; a plane ends in a row and a vector of zeros, which the last outputs' taps may read.
struct Planes {
  int64_t rows, height, pitch, size, phases, lanes;
  int64_t grid() const { return rows * pitch; }  // the band's outputs, as q
  int64_t grid_padded() const { return ceil_div(grid(), lanes) * lanes; }
  int64_t per_channel() const { return phases * size; }
};

Planes planes_for(const Geometry& g, int64_t rows, int64_t lanes) {
  const Window& w = g.win;
  const int64_t height = rows + (w.kernel_h - 1) * w.dilation_h / w.stride_h;
  const int64_t pitch = g.out_w + (w.kernel_w - 1) * w.dilation_w / w.stride_w;
  // slack: the last row's dropped columns read up to the kernel's reach past the plane, and the last vector of q
  // up to a vector past that
  return {rows, height, pitch, height * pitch + pitch + lanes, w.stride_h * w.stride_w, lanes};
}

// Bands of output rows: as many of the out_h rows as keep a task's planes within `budget` elements, each output row
// costing per_row and each band `reach` rows more (one row at least), cut evenly. Depends on shapes only.
struct Bands {
  int64_t rows, count;
};
// The rows a band may have: one at least.
int64_t rows_within(int64_t per_row, int64_t reach, int64_t budget) {
  return std::max<int64_t>(1, budget / std::max<int64_t>(1, per_row) - reach);
}
Bands even_bands(int64_t out_h, int64_t per_row, int64_t reach, int64_t budget) {
  const int64_t rows = std::clamp<int64_t>(rows_within(per_row, reach, budget), 1, out_h);
  const int64_t count = ceil_div(out_h, rows);
  return {ceil_div(out_h, count), count};
}
// ...for the plane kernels: a group's planes within kMaxPlaneElems, each output row costing per_row and a band reach
// rows more.
struct RowCost {
  int64_t per_row, reach;
};
RowCost plane_row_cost(const Geometry& g, int64_t lanes) {
  const Planes one = planes_for(g, 1, lanes);
  return {GroupDims(g).in_per_group * one.phases * one.pitch, one.height - 1};
}
Bands bands_for(const Geometry& g, int64_t lanes) {
  const RowCost c = plane_row_cost(g, lanes);
  return even_bands(g.out_h, c.per_row, c.reach, kMaxPlaneElems);
}
// The most rows a band of bands_for may have, however few g.out_h are.
int64_t band_rows_budget(const Geometry& g, int64_t lanes) {
  const RowCost c = plane_row_cost(g, lanes);
  return rows_within(c.per_row, c.reach, kMaxPlaneElems);
}

// The case rs == 1 < js of gather_rows and scatter_rows for float32 (rows side by side, as a pixel's channels are in
// a channels-last tensor), in blocks of 4 rows × 4 columns through SSE transposes: element (r, j) is read at
// src[j * sj + r * sr] and written at dst[j * dj + r * dr], where one of each pair is 1. Returns false (nothing done)
// for other cases. Value by value, a group of 4 channels took a scalar load and store each: with 4 channels a group
// (ResNeXt-50's first stage, channels-last), building the planes and scattering the tiles took half of the input
// gradient's time.
template <typename scalar_t>
[[gnu::always_inline]] inline bool transpose_4x4_rows(scalar_t* __restrict dst, int64_t dj, int64_t dr,
                                                      const scalar_t* __restrict src, int64_t sj, int64_t sr, int64_t rs,
                                                      int64_t js, int64_t rows, int64_t cols) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (rs != 1 || js <= 1 || rows < 4 || cols < 4 || (sr == 1) == (dr == 1)) return false;
    const int64_t blocks = rows / 4 * 4;
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
      for (int64_t r = 0; r < blocks; r += 4) {
        __m128 v[4];
        for (int i = 0; i < 4; ++i)  // pixel j + i's 4 channels, or channel r + i's 4 pixels
          v[i] = _mm_loadu_ps(sr == 1 ? src + (j + i) * sj + r : src + (r + i) * sr + j);
        _MM_TRANSPOSE4_PS(v[0], v[1], v[2], v[3]);
        for (int i = 0; i < 4; ++i) _mm_storeu_ps(dr == 1 ? dst + (j + i) * dj + r : dst + (r + i) * dr + j, v[i]);
      }
      for (int64_t r = blocks; r < rows; ++r)
        for (int64_t i = 0; i < 4; ++i) dst[(j + i) * dj + r * dr] = src[(j + i) * sj + r * sr];
    }
    for (; j < cols; ++j)
      for (int64_t r = 0; r < rows; ++r) dst[j * dj + r * dr] = src[j * sj + r * sr];
    return true;
  }
#endif
  return false;
}

// dst[r * ld + j] = src[r * rs + j * js] for r < rows, j < cols: `rows` channels of a strided row into contiguous
// rows. In the order that reads src forwards: channel by channel when each channel's row is contiguous or strided
// (NCHW), pixel by pixel when the channels lie side by side (NHWC: a channel at a time read one value a cache
// line, and the line was read again for each of the group's channels).
template <typename scalar_t>
[[gnu::always_inline]] inline void gather_rows(scalar_t* __restrict dst, int64_t ld, const scalar_t* __restrict src,
                                               int64_t rs, int64_t js, int64_t rows, int64_t cols) {
  if (transpose_4x4_rows(dst, 1, ld, src, js, 1, rs, js, rows, cols)) return;
  if (js == 1) {
    for (int64_t r = 0; r < rows; ++r) copy_run(dst + r * ld, src + r * rs, cols);
  } else if (rs < js) {
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t r = 0; r < rows; ++r) dst[r * ld + j] = src[j * js + r * rs];
  } else if (js == 2) {  // a stride-2 plane of an NCHW row: a constant step, which the compiler vectorises
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) dst[r * ld + j] = src[r * rs + 2 * j];
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) dst[r * ld + j] = src[r * rs + j * js];
  }
}

// dst[r * rs + j * js] = src[r * ld + j]: gather_rows the other way, writing dst forwards.
template <typename scalar_t>
[[gnu::always_inline]] inline void scatter_rows(scalar_t* __restrict dst, int64_t rs, int64_t js,
                                                const scalar_t* __restrict src, int64_t ld, int64_t rows, int64_t cols) {
  if (transpose_4x4_rows(dst, js, 1, src, 1, ld, rs, js, rows, cols)) return;
  if (js == 1) {
    for (int64_t r = 0; r < rows; ++r) copy_run(dst + r * rs, src + r * ld, cols);
  } else if (rs < js) {
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t r = 0; r < rows; ++r) dst[j * js + r * rs] = src[r * ld + j];
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) dst[r * rs + j * js] = src[r * ld + j];
  }
}

// A band's phase planes for `channels` channels of one image (`image` points at its first channel): plane
// (channel c, phase p) at planes + c * per_channel + p * size.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void build_planes(scalar_t* planes, const scalar_t* image, const Strides& s,
                                           int64_t channels, const Geometry& g, const Planes& p, int64_t oh0) {
  const Window& w = g.win;
  const int64_t ld = p.per_channel();
  for (int64_t a = 0; a < w.stride_h; ++a) {
    for (int64_t i = 0; i < p.height; ++i) {
      const int64_t ih = w.stride_h * (oh0 + i) + a - w.pad_h;
      for (int64_t b = 0; b < w.stride_w; ++b) {
        scalar_t* dst = planes + (a * w.stride_w + b) * p.size + i * p.pitch;  // channel c's row at dst + c * ld
        // the columns j whose input column stride_w * j + b - pad_w lies in [0, in_w)
        const int64_t first = b - w.pad_w;
        const int64_t j_lo = ih < 0 || ih >= g.in_h ? p.pitch
                                                     : std::min(p.pitch, first >= 0 ? 0 : ceil_div(-first, w.stride_w));
        const int64_t j_hi = std::max(j_lo, std::min(p.pitch, g.in_w - 1 - first < 0 ? int64_t(0)
                                                                                    : (g.in_w - 1 - first) / w.stride_w + 1));
        for (int64_t c = 0; c < channels; ++c) {
          zero_run(dst + c * ld, j_lo);
          zero_run(dst + c * ld + j_hi, p.pitch - j_hi);
        }
        if (j_hi > j_lo)
          gather_rows(dst + j_lo, ld, image + ih * s.h + (first + j_lo * w.stride_w) * s.w, s.c, w.stride_w * s.w,
                      channels, j_hi - j_lo);
      }
    }
  }
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t ph = 0; ph < p.phases; ++ph)
      std::fill_n(planes + c * ld + ph * p.size + p.height * p.pitch, p.size - p.height * p.pitch, scalar_t(0));
}

// Whether the planes of `images` images (each n values, `step` apart) are all finite, at this clone's width.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES bool planes_finite(const scalar_t* planes, int64_t step, int64_t n, int64_t images) {
  bool finite = true;
  for (int64_t m = 0; m < images; ++m) finite &= all_finite(planes + m * step, n);
  return finite;
}

// The offset of each term (ic, kh, kw) of a group's sums, in the weight's order, from a plane set's start.
std::vector<int64_t> term_offsets(const Geometry& g, const Planes& p, int64_t channels) {
  const Window& w = g.win;
  std::vector<int64_t> offsets;
  offsets.reserve(channels * w.kernel_h * w.kernel_w);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t kh = 0; kh < w.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < w.kernel_w; ++kw) {
        const int64_t rh = kh * w.dilation_h, rw = kw * w.dilation_w;
        const int64_t phase = (rh % w.stride_h) * w.stride_w + rw % w.stride_w;
        offsets.push_back(c * p.per_channel() + phase * p.size + (rh / w.stride_h) * p.pitch + rw / w.stride_w);
      }
    }
  }
  return offsets;
}

// A kernel's plan for geometry g: its bands of rows, the planes' layout, and each term's offset in the planes.
struct Layout {
  Bands bands;
  Planes planes;
  std::vector<int64_t> offsets;
  Layout(const Geometry& g, int64_t lanes) : Layout(g, lanes, bands_for(g, lanes)) {}
  Layout(const Geometry& g, int64_t lanes, const Bands& b)
      : bands(b), planes(planes_for(g, b.rows, lanes)), offsets(term_offsets(g, planes, g.in_channels / g.groups)) {}
};

// out[o * ldo + q] for o < O and V vectors of q: the sum over terms t < k of wt[o * k + t] * planes[off[t] + q],
// in runs of `chunk` terms, each run's sum added in order to the bias (or to nothing). (Always inlined, as are
// the blocks of conv_cpu.cpp's small_k_rows: out of line, GCC compiles them for baseline x86-64 rather than for
// the clone that calls them.)
template <typename scalar_t, int O, int V>
[[gnu::always_inline]] inline void forward_block(scalar_t* out, int64_t ldo, const scalar_t* planes,
                                                 const int64_t* off, const scalar_t* wt, int64_t k,
                                                 const scalar_t* bias, int64_t chunk) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  for (int64_t k0 = 0; k0 < k; k0 += chunk) {
    vec acc[O][V] = {};
    const int64_t k1 = std::min(k, k0 + chunk);
    for (int64_t t = k0; t < k1; ++t) {
      vec x[V];
      for (int v = 0; v < V; ++v) load_vec(x[v], planes + off[t] + v * L);
      for (int o = 0; o < O; ++o) {
        const scalar_t weight = wt[o * k + t];
        for (int v = 0; v < V; ++v) acc[o][v] += weight * x[v];
      }
    }
    for (int o = 0; o < O; ++o) {
      for (int v = 0; v < V; ++v) {
        vec sum = acc[o][v];
        if (k0 > 0) {
          vec before;
          load_vec(before, out + o * ldo + v * L);
          sum = before + sum;
        } else if (bias) {
          sum = bias[o] + sum;
        }
        std::memcpy(out + o * ldo + v * L, &sum, sizeof(vec));
      }
    }
  }
}

template <typename scalar_t, int O>
[[gnu::always_inline]] inline void forward_vectors(int vectors, scalar_t* out, int64_t ldo, const scalar_t* planes,
                                                   const int64_t* off, const scalar_t* wt, int64_t k,
                                                   const scalar_t* bias, int64_t chunk) {
  if (vectors == 3) forward_block<scalar_t, O, 3>(out, ldo, planes, off, wt, k, bias, chunk);
  else if (vectors == 2) forward_block<scalar_t, O, 2>(out, ldo, planes, off, wt, k, bias, chunk);
  else forward_block<scalar_t, O, 1>(out, ldo, planes, off, wt, k, bias, chunk);
}

// One band of one group: out (channels, ldo) over the grid's q < grid, from the planes and the group's weight rows
// wt (channels, k).
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void forward_planes(scalar_t* out, int64_t ldo, int64_t grid, const scalar_t* planes,
                                             const int64_t* off, const scalar_t* wt, int64_t channels, int64_t k,
                                             const scalar_t* bias, int64_t chunk) {
  constexpr int64_t L = Vec<scalar_t>::lanes;
  for (int64_t o0 = 0; o0 < channels; o0 += O_MAX) {
    const int64_t oc = std::min<int64_t>(O_MAX, channels - o0);
    const scalar_t* b = bias ? bias + o0 : nullptr;
    for (int64_t q = 0; q < grid;) {
      const int vectors = static_cast<int>(std::min<int64_t>(V_MAX, ceil_div(grid - q, L)));
      scalar_t* o = out + o0 * ldo + q;
      const scalar_t* w = wt + o0 * k;
      switch (oc) {
        case 4: forward_vectors<scalar_t, 4>(vectors, o, ldo, planes + q, off, w, k, b, chunk); break;
        case 3: forward_vectors<scalar_t, 3>(vectors, o, ldo, planes + q, off, w, k, b, chunk); break;
        case 2: forward_vectors<scalar_t, 2>(vectors, o, ldo, planes + q, off, w, k, b, chunk); break;
        default: forward_vectors<scalar_t, 1>(vectors, o, ldo, planes + q, off, w, k, b, chunk); break;
      }
      q += vectors * L;
    }
  }
}

// The groups a task of forward_kernel takes together: where the input's and output's channels lie side by side
// (channels-last) and a group's fill less than a 64-byte cache line, the fewest groups that fill one (a divisor of
// the group count), else one. With one group a task, each task read and wrote a quarter of every line of an image
// (4 channels a group) and the next three tasks the rest: the plane copy and the scatter waited on memory, 52% of
// 128 over 32 groups at 56x56 channels-last (an Intel Xeon, one thread; the sums 15%).
// (Never more than `limit`, nor more than keep a task's planes and tile for one row within kMaxTaskElems, as one
// group's are: bounded.)
template <typename scalar_t>
int64_t plane_groups(const Geometry& g, const Strides& si, const Strides& so, int64_t limit) {
  const GroupDims d(g);
  constexpr int64_t line = 64 / sizeof(scalar_t);
  if (si.c != 1 || so.c != 1 || d.in_per_group >= line || d.out_per_group >= line) return 1;
  const Planes one = planes_for(g, 1, Vec<scalar_t>::lanes);
  const int64_t per_group = d.in_per_group * one.per_channel() + d.out_per_group * one.grid_padded();
  int64_t groups = std::max<int64_t>(1, std::min(limit, ceil_div(line, std::min(d.in_per_group, d.out_per_group))));
  while (groups > 1 && (d.groups % groups != 0 || groups * per_group > kMaxTaskElems)) --groups;
  return groups;
}

// The forward of a grouped convolution g with weight rows wt (C_out, k) contiguous: tasks are (image, block of
// plane_groups groups, band), each group's sums as with one group a task (the same bits).
template <typename scalar_t>
void forward_kernel(scalar_t* out, const Strides& so, const scalar_t* in, const Strides& si, const scalar_t* wt,
                    const scalar_t* bias, const Geometry& g) {
  const GroupDims d(g);
  const int64_t chunk = forward_chunk<scalar_t>(d.k_per_group);
  const int64_t groups = plane_groups<scalar_t>(g, si, so, d.groups), blocks = d.groups / groups;
  const RowCost cost = plane_row_cost(g, Vec<scalar_t>::lanes);
  const Layout layout(g, Vec<scalar_t>::lanes, even_bands(g.out_h, cost.per_row * groups, cost.reach, kMaxPlaneElems));
  const Bands& bands = layout.bands;
  const Planes& p = layout.planes;
  const std::vector<int64_t>& off = layout.offsets;
  const int64_t ldo = p.grid_padded(), in_step = d.in_per_group * p.per_channel(), out_step = d.out_per_group * ldo;
  parallel_tasks(g.batch * blocks * bands.count, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> planes(groups * in_step), tile(groups * out_step);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (blocks * bands.count), grp0 = task / bands.count % blocks * groups;
      const int64_t oh0 = task % bands.count * bands.rows, rows = std::min(bands.rows, g.out_h - oh0);
      build_planes(planes.data(), in + n * si.n + grp0 * d.in_per_group * si.c, si, groups * d.in_per_group, g, p,
                   oh0);
      for (int64_t j = 0; j < groups; ++j) {
        const int64_t oc0 = (grp0 + j) * d.out_per_group;
        forward_planes(tile.data() + j * out_step, ldo, rows * p.pitch, planes.data() + j * in_step, off.data(),
                       wt + oc0 * d.k_per_group, d.out_per_group, d.k_per_group, bias ? bias + oc0 : nullptr, chunk);
      }
      const int64_t oc0 = grp0 * d.out_per_group;
      for (int64_t i = 0; i < rows; ++i)
        scatter_rows(out + n * so.n + oc0 * so.c + (oh0 + i) * so.h, so.c, so.w, tile.data() + i * p.pitch, ldo,
                     groups * d.out_per_group, g.out_w);
    }
  });
}

// A chunk of images' planes and grad_output tiles for the weight gradient: image m's planes at planes + m * plane_step,
// its tile (channels, ldg) at grad + m * grad_step. Zero in the tile's dropped columns and past its end.
template <typename scalar_t>
struct WeightChunk {
  const scalar_t *planes, *grad;
  int64_t plane_step, grad_step, ldg, images, count;  // count: the padded grid's q, a whole number of vectors
};

// The sum of a vector's lanes, as a tree: the upper half added to the lower, and again, down to one (4 dependent
// adds for 16 lanes, in vector halves, where a running sum had 16).
template <typename scalar_t, int64_t BYTES>
[[gnu::always_inline]] inline scalar_t lane_sum(const void* v) {
  if constexpr (BYTES == sizeof(scalar_t)) {
    scalar_t s;
    std::memcpy(&s, v, sizeof(s));
    return s;
  } else {
    typedef scalar_t half __attribute__((vector_size(BYTES / 2)));
    half lo, hi;
    std::memcpy(&lo, v, BYTES / 2);
    std::memcpy(&hi, static_cast<const char*>(v) + BYTES / 2, BYTES / 2);
    const half sum = lo + hi;
    return lane_sum<scalar_t, BYTES / 2>(&sum);
  }
}

// acc[o * lda + t] += for o < O and t < T, the sum over the chunk's images and q of grad[o * ldg + q] ×
// planes[off[t] + q]: each vector lane's partial sum formed in scalar_t, the lanes then added (lane_sum), and that
// added in double. The grad vectors (aligned) are held and each term's vector (at any offset) loaded once and used
// O times: with the terms held instead, GCC folded the O grad loads into each multiply-add, twice the loads. The
// 64-byte copy loads the grad vectors as volatile: otherwise GCC folded them into the multiply-adds there too (15
// loads per 12 on a Zen 4, which loads one 64-byte vector a cycle; 7 now). AVX2's 16 registers cannot hold a fifth
// grad vector beside 4 x 3 sums and a term, so GCC's choice stays there (one grad vector from memory).
template <typename scalar_t, int O, int T>
[[gnu::always_inline]] inline void weight_block(double* acc, int64_t lda, const WeightChunk<scalar_t>& c, int64_t o0,
                                                const int64_t* off) {
  using vec = typename Vec<scalar_t>::type;
  constexpr int64_t L = Vec<scalar_t>::lanes;
  vec sum[O][T] = {};
  for (int64_t m = 0; m < c.images; ++m) {
    const scalar_t* planes = c.planes + m * c.plane_step;
    const scalar_t* grad = c.grad + m * c.grad_step + o0 * c.ldg;
    for (int64_t q = 0; q < c.count; q += L) {
      vec gv[O];
      for (int o = 0; o < O; ++o) load_vec_held(gv[o], grad + o * c.ldg + q);
      for (int t = 0; t < T; ++t) {
        vec x;
        load_vec(x, planes + off[t] + q);
        for (int o = 0; o < O; ++o) sum[o][t] += gv[o] * x;
      }
    }
  }
  for (int o = 0; o < O; ++o)
    for (int t = 0; t < T; ++t) acc[o * lda + t] += lane_sum<scalar_t, sizeof(vec)>(&sum[o][t]);
}

template <typename scalar_t, int O>
[[gnu::always_inline]] inline void weight_terms(int terms, double* acc, int64_t lda, const WeightChunk<scalar_t>& c,
                                                int64_t o0, const int64_t* off) {
  static_assert(T_MAX == 3 || T_MAX == 6, "the blocks below");
  if constexpr (T_MAX == 6) {
    if (terms == 6) return weight_block<scalar_t, O, 6>(acc, lda, c, o0, off);
    if (terms == 5) return weight_block<scalar_t, O, 5>(acc, lda, c, o0, off);
    if (terms == 4) return weight_block<scalar_t, O, 4>(acc, lda, c, o0, off);
  }
  if (terms == 3) weight_block<scalar_t, O, 3>(acc, lda, c, o0, off);
  else if (terms == 2) weight_block<scalar_t, O, 2>(acc, lda, c, o0, off);
  else weight_block<scalar_t, O, 1>(acc, lda, c, o0, off);
}

// acc (channels, k) += the chunk's grad tiles · the planes' terms.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void weight_planes(double* acc, const WeightChunk<scalar_t>& c, const int64_t* off,
                                            int64_t channels, int64_t k) {
  for (int64_t o0 = 0; o0 < channels; o0 += O_MAX) {
    const int64_t oc = std::min<int64_t>(O_MAX, channels - o0);
    for (int64_t t0 = 0; t0 < k; t0 += T_MAX) {
      const int terms = static_cast<int>(std::min<int64_t>(T_MAX, k - t0));
      double* a = acc + o0 * k + t0;
      switch (oc) {
        case 4: weight_terms<scalar_t, 4>(terms, a, k, c, o0, off + t0); break;
        case 3: weight_terms<scalar_t, 3>(terms, a, k, c, o0, off + t0); break;
        case 2: weight_terms<scalar_t, 2>(terms, a, k, c, o0, off + t0); break;
        default: weight_terms<scalar_t, 1>(terms, a, k, c, o0, off + t0); break;
      }
    }
  }
}

// weight_planes' sums over the band's real outputs only, one product at a time: for planes holding a value that
// is not finite, which the dropped columns may read (0 × inf would be NaN where torch's sum has no such term).
template <typename scalar_t>
void weight_planes_exact(double* acc, const WeightChunk<scalar_t>& c, const int64_t* off, int64_t channels, int64_t k,
                         int64_t pitch, int64_t rows, int64_t out_w) {
  for (int64_t m = 0; m < c.images; ++m) {
    const scalar_t* planes = c.planes + m * c.plane_step;
    const scalar_t* grad = c.grad + m * c.grad_step;
    for (int64_t o = 0; o < channels; ++o) {
      for (int64_t t = 0; t < k; ++t) {
        double total = 0;
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t ow = 0; ow < out_w; ++ow) {
            const int64_t q = i * pitch + ow;
            total += static_cast<scalar_t>(grad[o * c.ldg + q] * planes[off[t] + q]);
          }
        }
        acc[o * k + t] += total;
      }
    }
  }
}

// A band's grad_output tile for the weight gradient: tile (channels, ld) holds grad_output's row oh0 + i, column ow
// of each channel at i * pitch + ow, for q < count, and zeros at the grid's dropped columns and past its rows.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void grad_tile(scalar_t* tile, int64_t ld, int64_t count, const scalar_t* grad,
                                        const Strides& sg, int64_t channels, int64_t rows, int64_t pitch,
                                        int64_t out_w) {
  for (int64_t i = 0; i < rows; ++i) gather_rows(tile + i * pitch, ld, grad + i * sg.h, sg.c, sg.w, channels, out_w);
  for (int64_t o = 0; o < channels; ++o) {
    for (int64_t i = 0; i < rows; ++i) zero_run(tile + o * ld + i * pitch + out_w, pitch - out_w);
    zero_run(tile + o * ld + rows * pitch, count - rows * pitch);
  }
}

// grad_weight gw: tasks are (block of plane_groups groups, or one group and a block of its output channels), each
// summing over every band and chunk of images in order. A chunk holds as many images as fit kMaxPlaneElems twice over
// for one group, so that the lanes' sums are added up once per chunk, not once per small image; a block of groups
// copies its chunk's planes and grad tiles together (whole cache lines of a channels-last tensor) and sums each group
// as a task of one group would (the same bits).
template <typename scalar_t>
void weight_kernel(const WeightRef<scalar_t>& gw, const scalar_t* go, const Strides& sg, const scalar_t* in,
                   const Strides& si, const Geometry& g) {
  const GroupDims d(g);
  constexpr int64_t L = Vec<scalar_t>::lanes;
  const Layout layout(g, L);
  const Bands& bands = layout.bands;
  const Planes& p = layout.planes;
  const std::vector<int64_t>& off = layout.offsets;
  const int64_t ldg = p.grid_padded();
  const int64_t blocks = std::min(ceil_div(kMinWeightTasks, d.groups), ceil_div(d.out_per_group, O_MAX));
  const int64_t block = ceil_div(d.out_per_group, blocks);
  const int64_t plane_step = d.in_per_group * p.per_channel(), grad_step = block * ldg;
  const int64_t chunk = std::clamp<int64_t>(2 * kMaxPlaneElems / (plane_step + grad_step), 1, g.batch);
  // Blocks of groups only where a task already took whole groups, keeping kMinWeightTasks tasks and a task's copies
  // within kMaxWeightBlockElems; the chunk stays one group's, so each group's sums are as before.
  const int64_t groups =
      blocks == 1 ? plane_groups<scalar_t>(g, si, sg, std::min(d.groups / std::min(kMinWeightTasks, d.groups),
                                                               kMaxWeightBlockElems / (chunk * (plane_step + grad_step))))
                  : 1;
  parallel_tasks(d.groups / groups * blocks, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> planes(chunk * groups * plane_step), grad(chunk * groups * grad_step);
    std::vector<double> acc(groups * block * d.k_per_group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp0 = task / blocks * groups, o_first = task % blocks * block;
      const int64_t channels = std::min(block, d.out_per_group - o_first);  // a group's (all of them where groups > 1)
      if (channels <= 0) continue;
      const int64_t oc0 = grp0 * d.out_per_group + o_first;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t band = 0; band < bands.count; ++band) {
        const int64_t oh0 = band * bands.rows, rows = std::min(bands.rows, g.out_h - oh0);
        const int64_t count = ceil_div(rows * p.pitch, L) * L;
        for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
          const int64_t images = std::min(chunk, g.batch - n0);
          for (int64_t m = 0; m < images; ++m) {
            const int64_t n = n0 + m;
            build_planes(planes.data() + m * groups * plane_step, in + n * si.n + grp0 * d.in_per_group * si.c, si,
                         groups * d.in_per_group, g, p, oh0);
            grad_tile(grad.data() + m * groups * grad_step, ldg, count, go + n * sg.n + oc0 * sg.c + oh0 * sg.h, sg,
                      groups * channels, rows, p.pitch, g.out_w);
          }
          for (int64_t j = 0; j < groups; ++j) {
            const WeightChunk<scalar_t> c{planes.data() + j * plane_step, grad.data() + j * grad_step,
                                          groups * plane_step, groups * grad_step, ldg, images, count};
            const bool finite = planes_finite(c.planes, c.plane_step, plane_step, images);
            double* a = acc.data() + j * block * d.k_per_group;
            if (finite) weight_planes(a, c, off.data(), channels, d.k_per_group);
            else weight_planes_exact(a, c, off.data(), channels, d.k_per_group, p.pitch, rows, g.out_w);
          }
        }
      }
      for (int64_t j = 0; j < groups; ++j)
        for (int64_t o = 0; o < channels; ++o)
          gw.for_terms(oc0 + j * d.out_per_group + o, 0, d.k_per_group, [&](int64_t t, scalar_t& entry) {
            entry = static_cast<scalar_t>(acc[(j * block + o) * d.k_per_group + t]);
          });
    }
  });
}

// ---- Channels-last outputs: vectors over a group's output channels ----
// Where the output's channels are contiguous (channels-last) and a group's output channels a whole number of 64-byte
// or 32-byte vectors (16 or 8 floats, 8 or 4 doubles), each output pixel's sums are vectors over its group's output
// channels and each input value is broadcast: no lane sums, no transposes, results stored as whole vectors straight
// into the output. (The plane kernels read and write NHWC a channel at a time: 1.6-2.9x torch's channels-last time
// on ResNeXt's grouped layers, against 0.7-1.6x for these; benchmarks/NOTES.md.) A task copies a band of one image's
// rows of a block of groups' input channels into row-phase planes with the channels side by side: plane a holds
// the padded input's rows stride_h·(oh0 + i) + a, each `width` = stride_w·pitch pixels wide. Output q = i·pitch + ow
// then reads pixel stride_w·q + a fixed offset per tap, so blocks of consecutive q run across output rows as the
// plane kernels' vectors do, and each output's terms are added in the plane kernels' order: the same bits.

constexpr int64_t kPixelBlock = 12;            // q a block of the forward (12, 6, 4 or 3 of them: all divide it)
constexpr int64_t kPixelChannels = 64;         // a forward task's groups: up to this many input channels side by side
constexpr int64_t kMaxPixelElems = 1 << 16;    // a task's planes for a band of rows: 256 KB of float32, in L2

struct PixelLayout {
  int64_t groups, channels;  // groups a task (fewer in the last block) and their input channels, side by side
  int64_t rows, count, height, pitch, width, size;  // bands of rows; size: one row phase's elements, slack included
  std::vector<int64_t> offsets;  // each term (ic, kh, kw) of one group's sums, from its first channel's planes

  PixelLayout(const Geometry& g, int64_t groups_per_task) {
    const Window& w = g.win;
    const GroupDims d(g);
    groups = std::min(groups_per_task, d.groups);
    channels = groups * d.in_per_group;
    const int64_t reach_h = (w.kernel_h - 1) * w.dilation_h / w.stride_h;
    pitch = g.out_w + (w.kernel_w - 1) * w.dilation_w / w.stride_w;
    width = w.stride_w * pitch;
    const Bands bands = even_bands(g.out_h, w.stride_h * width * channels, reach_h, kMaxPixelElems);
    rows = bands.rows;
    count = bands.count;
    height = rows + reach_h;
    // slack: the last row's dropped columns read up to the kernel's reach (< width) past the plane, and the last
    // block of q up to a block of strides past that
    size = (height * width + width + kPixelBlock * w.stride_w) * channels;
    for (int64_t c = 0; c < d.in_per_group; ++c)
      for (int64_t kh = 0; kh < w.kernel_h; ++kh)
        for (int64_t kw = 0; kw < w.kernel_w; ++kw) {
          const int64_t rh = kh * w.dilation_h;
          offsets.push_back((rh % w.stride_h) * size + ((rh / w.stride_h) * width + kw * w.dilation_w) * channels + c);
        }
  }
  // Whether one task's planes stay within kMaxTaskElems.
  bool bounded(const Geometry& g) const { return g.win.stride_h * size <= kMaxTaskElems; }
};

// The forward's layout: as many groups a task as fill kPixelChannels input channels, at least one.
PixelLayout pixel_layout(const Geometry& fg) {
  return PixelLayout(fg, std::max<int64_t>(1, kPixelChannels / GroupDims(fg).in_per_group));
}

// A band's planes for `count` input channels of one image (`image` points at the first): row phase a at
// planes + a * size, pixel j of its row i at (i * width + j) * channels.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void build_pixel_planes(scalar_t* planes, const scalar_t* image, const Strides& s,
                                                 int64_t count, const Geometry& g, const PixelLayout& p, int64_t oh0) {
  const Window& w = g.win;
  const int64_t ch = p.channels;
  // pixel j is the input's column j - pad_w (the input gradient's phases may have a negative padding)
  const int64_t j_lo = std::clamp<int64_t>(w.pad_w, 0, p.width), j_hi = std::clamp(g.in_w + w.pad_w, j_lo, p.width);
  for (int64_t a = 0; a < w.stride_h; ++a) {
    scalar_t* plane = planes + a * p.size;
    for (int64_t i = 0; i < p.height; ++i) {
      scalar_t* dst = plane + i * p.width * ch;
      const int64_t ih = w.stride_h * (oh0 + i) + a - w.pad_h;
      if (ih < 0 || ih >= g.in_h) {
        std::fill_n(dst, p.width * ch, scalar_t(0));
        continue;
      }
      zero_run(dst, j_lo * ch);
      zero_run(dst + j_hi * ch, (p.width - j_hi) * ch);
      const scalar_t* src = image + ih * s.h + (j_lo - w.pad_w) * s.w;
      if (s.c == 1) {
        for (int64_t j = j_lo; j < j_hi; ++j) copy_run(dst + j * ch, src + (j - j_lo) * s.w, count);
      } else {  // pixels as gather_rows' rows, channels as its columns
        gather_rows(dst + j_lo * ch, ch, src, s.w, s.c, j_hi - j_lo, count);
      }
    }
    std::fill_n(plane + p.height * p.width * ch, p.size - p.height * p.width * ch, scalar_t(0));
  }
}

// Where a block of the pixel forward's outputs reads its terms: output b's term at offset o is at(b, o). ByStep: the
// block is consecutive q of the grid, `step` apart (dropped columns among them); ByPointer: any outputs, each found
// by its own pointer (real outputs only, at the cost of a register a pointer).
template <typename scalar_t>
struct ByStep {
  const scalar_t* x;
  int64_t step;
  scalar_t at(int b, int64_t o) const { return x[o + b * step]; }
  ByStep from(int b) const { return {x + b * step, step}; }
};
template <typename scalar_t>
struct ByPointer {
  const scalar_t* const* x;
  scalar_t at(int b, int64_t o) const { return x[b][o]; }
  ByPointer from(int b) const { return {x + b}; }
};

// out[b][v * N + lane] for b < B and v < VB: the sum over terms t < k of wt[t * ldw + v * N + lane] × input
// at(b, off[t]), in runs of `chunk` terms added in order to the bias (or to nothing): the plane kernels' sums, term
// for term (a weight vector times a broadcast input, where they had a weight times an input vector). The weight
// vectors are held (load_vec_held): folded into each multiply-add, they were B loads where one is needed (15 loads
// per 12 multiply-adds at 3 × 4; a Zen 4 loads one 64-byte vector a cycle).
template <typename scalar_t, int BYTES, int VB, int B, typename Inputs>
[[gnu::always_inline]] inline void pixel_forward_block(scalar_t* const* out, int64_t v0, const Inputs& in,
                                                       const int64_t* off, const scalar_t* wt, int64_t ldw, int64_t k,
                                                       const scalar_t* bias, int64_t chunk) {
  using vec = typename VecBytes<scalar_t, BYTES>::type;
  constexpr int64_t N = VecBytes<scalar_t, BYTES>::lanes;
  for (int64_t k0 = 0; k0 < k; k0 += chunk) {
    vec acc[B][VB] = {};
    const int64_t k1 = std::min(k, k0 + chunk);
    for (int64_t t = k0; t < k1; ++t) {
      vec wv[VB];
      for (int v = 0; v < VB; ++v) load_vec_held(wv[v], wt + t * ldw + v * N);
      const int64_t o = off[t];
      for (int b = 0; b < B; ++b) {
        const scalar_t value = in.at(b, o);
        for (int v = 0; v < VB; ++v) acc[b][v] += value * wv[v];
      }
    }
    for (int b = 0; b < B; ++b) {
      for (int v = 0; v < VB; ++v) {
        vec sum = acc[b][v];
        scalar_t* o = out[b] + (v0 + v) * N;
        if (k0 > 0) {
          vec before;
          load_vec(before, o);
          sum = before + sum;
        } else if (bias) {
          vec bv;
          load_vec(bv, bias + v * N);
          sum = bv + sum;
        }
        std::memcpy(o, &sum, sizeof(vec));
      }
    }
  }
}

// All `channels` output channels of a block of kPixelBlock outputs (written at dst[b], read through `in`), in
// runs of 12 / vb outputs for blocks of vb vectors. One vector a run takes 12 outputs by step, 6 by pointer (12
// pointers would not stay in registers).
template <typename scalar_t, int BYTES, typename Inputs>
[[gnu::always_inline]] inline void pixel_forward_outputs(scalar_t* const* dst, const Inputs& in, const int64_t* off,
                                                         const scalar_t* wt, int64_t channels, int64_t k,
                                                         const scalar_t* bias, int64_t chunk) {
  constexpr int64_t N = VecBytes<scalar_t, BYTES>::lanes;
  const int64_t vectors = channels / N;
  for (int64_t v0 = 0; v0 < vectors; v0 += 4) {
    const int vb = static_cast<int>(std::min<int64_t>(4, vectors - v0));
    const scalar_t* w = wt + v0 * N;
    const scalar_t* bv = bias ? bias + v0 * N : nullptr;
    switch (vb) {
      case 4:
        for (int r = 0; r < 4; ++r)
          pixel_forward_block<scalar_t, BYTES, 4, 3>(dst + r * 3, v0, in.from(r * 3), off, w, channels, k, bv, chunk);
        break;
      case 3:
        for (int r = 0; r < 3; ++r)
          pixel_forward_block<scalar_t, BYTES, 3, 4>(dst + r * 4, v0, in.from(r * 4), off, w, channels, k, bv, chunk);
        break;
      case 2:
        for (int r = 0; r < 2; ++r)
          pixel_forward_block<scalar_t, BYTES, 2, 6>(dst + r * 6, v0, in.from(r * 6), off, w, channels, k, bv, chunk);
        break;
      default:
        if constexpr (std::is_same_v<Inputs, ByStep<scalar_t>>) {
          pixel_forward_block<scalar_t, BYTES, 1, 12>(dst, v0, in, off, w, channels, k, bv, chunk);
        } else {
          for (int r = 0; r < 2; ++r)
            pixel_forward_block<scalar_t, BYTES, 1, 6>(dst + r * 6, v0, in.from(r * 6), off, w, channels, k, bv, chunk);
        }
        break;
    }
  }
}

// Outputs `step` (a constant) apart: the addresses of a block's B inputs are one register plus constants, where a
// step known only at run time cost a register or an address computation an output.
template <typename scalar_t, int64_t STEP>
struct ByFixedStep {
  const scalar_t* x;
  scalar_t at(int b, int64_t o) const { return x[o + b * STEP]; }
  ByFixedStep from(int b) const { return {x + b * STEP}; }
};

// Where the pixel forward writes and reads: output (i, ow) of a band at out + i * row + ow * col (its group's first
// channel), its terms at x + (i * pitch + ow) * step; `rows` rows of out_w outputs.
struct PixelOut {
  int64_t row, col, pitch, out_w, rows;
};

// The most accumulators a run of pixel_forward_rows takes (and one register a vector of weights).
constexpr int kRowRun = kVectorRegisters >= 32 ? 14 : 12;

// A run of b <= B outputs of VB vectors each (B down to 1, by recursion: a block per run length).
template <typename scalar_t, int BYTES, int64_t STEP, int VB, int B = kRowRun / VB>
[[gnu::always_inline]] inline void pixel_forward_run(int b, scalar_t* const* dst, const scalar_t* x, const int64_t* off,
                                                     const scalar_t* wt, int64_t k, const scalar_t* bias,
                                                     int64_t chunk) {
  constexpr int64_t N = VecBytes<scalar_t, BYTES>::lanes;
  if constexpr (B > 1) {
    if (b < B) return pixel_forward_run<scalar_t, BYTES, STEP, VB, B - 1>(b, dst, x, off, wt, k, bias, chunk);
  }
  pixel_forward_block<scalar_t, BYTES, VB, B>(dst, 0, ByFixedStep<scalar_t, STEP>{x}, off, wt, VB * N, k, bias, chunk);
}

// pixel_forward_planes for VB vectors of output channels and a step of STEP: each output row in even runs of at most
// kRowRun / VB consecutive outputs. Where the blocks of kPixelBlock outputs had 6 accumulators (by pointer) or
// computed the dropped columns too (by step), a run has up to 14, each input's address one register plus a constant;
// the same sums, term for term. (512 g32 @14 channels-last, one thread: 2.3 -> 2.05 ms; torch's 1.45.)
template <typename scalar_t, int BYTES, int64_t STEP, int VB>
[[gnu::always_inline]] inline void pixel_forward_rows(scalar_t* out, const PixelOut& po, const scalar_t* x,
                                                      const int64_t* off, const scalar_t* wt, int64_t k,
                                                      const scalar_t* bias, int64_t chunk) {
  constexpr int64_t longest = kRowRun / VB;
  const int64_t runs = ceil_div(po.out_w, longest);
  scalar_t* dst[longest];
  for (int64_t i = 0; i < po.rows; ++i)
    for (int64_t r = 0; r < runs; ++r) {
      const int64_t ow0 = r * po.out_w / runs, ow1 = (r + 1) * po.out_w / runs;
      for (int64_t b = 0; b < ow1 - ow0; ++b) dst[b] = out + i * po.row + (ow0 + b) * po.col;
      pixel_forward_run<scalar_t, BYTES, STEP, VB>(static_cast<int>(ow1 - ow0), dst, x + (i * po.pitch + ow0) * STEP,
                                                   off, wt, k, bias, chunk);
    }
}

// Whether pixel_forward_by_rows takes a band: the step between outputs kPixelChannels or twice it (a task's 64
// channels at a stride of 1 or 2, or fewer channels at a larger stride) and a group's output channels one vector, or
// two where there are registers for them.
template <typename scalar_t, int BYTES>
constexpr bool pixel_rows_apply(int64_t step, int64_t channels) {
  constexpr int64_t N = VecBytes<scalar_t, BYTES>::lanes;
  return (step == kPixelChannels || step == 2 * kPixelChannels) &&
         (channels == N || (kVectorRegisters >= 32 && channels == 2 * N));
}

// pixel_forward_rows where pixel_rows_apply. Returns whether it ran.
template <typename scalar_t, int BYTES>
[[gnu::always_inline]] inline bool pixel_forward_by_rows(scalar_t* out, const PixelOut& po, const scalar_t* x,
                                                         int64_t step, const int64_t* off, const scalar_t* wt,
                                                         int64_t channels, int64_t k, const scalar_t* bias,
                                                         int64_t chunk) {
  constexpr int64_t N = VecBytes<scalar_t, BYTES>::lanes, S = kPixelChannels;
  if (!pixel_rows_apply<scalar_t, BYTES>(step, channels)) return false;
  if (channels == N) {
    if (step == S) pixel_forward_rows<scalar_t, BYTES, S, 1>(out, po, x, off, wt, k, bias, chunk);
    else pixel_forward_rows<scalar_t, BYTES, 2 * S, 1>(out, po, x, off, wt, k, bias, chunk);
    return true;
  }
  if constexpr (kVectorRegisters >= 32) {
    if (step == S) pixel_forward_rows<scalar_t, BYTES, S, 2>(out, po, x, off, wt, k, bias, chunk);
    else pixel_forward_rows<scalar_t, BYTES, 2 * S, 2>(out, po, x, off, wt, k, bias, chunk);
  }
  return true;
}

// One band of one group: its `channels` output channels at each of its outputs, from its planes (x at its first
// input channel's) and its weight wt (k, channels). By rows where pixel_forward_by_rows takes it; else in blocks of
// kPixelBlock outputs (a block's lanes past the band computed into a scratch slot): where the grid's dropped columns
// are a tenth of it or more (2 of every 9 at 7x7), or a run has more than one vector (6 outputs, pointers that stay
// in registers), the blocks take the real outputs only, by pointer; else consecutive q of the grid by step, the
// dropped columns computed too. (ResNeXt's 7x7 layers, 2 vectors: forward 0.83x the time; 14x14, 1 vector: 0.9x;
// 28x28, 1 vector by pointer: 1.02-1.05x, hence the tenth.)
template <typename scalar_t, int BYTES>
MANUALGRAD_VECTOR_CLONES_VL void pixel_forward_planes(scalar_t* out, const PixelOut& po, scalar_t* scratch,
                                                   const scalar_t* x, int64_t step, const int64_t* off,
                                                   const scalar_t* wt, int64_t channels, int64_t k,
                                                   const scalar_t* bias, int64_t chunk) {
  if (pixel_forward_by_rows<scalar_t, BYTES>(out, po, x, step, off, wt, channels, k, bias, chunk)) return;
  const bool real_only = channels > VecBytes<scalar_t, BYTES>::lanes || 10 * (po.pitch - po.out_w) >= po.pitch;
  scalar_t* dst[kPixelBlock];
  if (real_only) {
    const int64_t outputs = po.rows * po.out_w;
    const scalar_t* src[kPixelBlock];
    for (int64_t r = 0; r < outputs; r += kPixelBlock) {
      for (int64_t b = 0; b < kPixelBlock; ++b) {
        const int64_t i = (r + b) / po.out_w, ow = (r + b) % po.out_w;
        const bool real = r + b < outputs;
        dst[b] = real ? out + i * po.row + ow * po.col : scratch + b * channels;
        src[b] = real ? x + (i * po.pitch + ow) * step : x;
      }
      pixel_forward_outputs<scalar_t, BYTES>(dst, ByPointer<scalar_t>{src}, off, wt, channels, k, bias, chunk);
    }
    return;
  }
  const int64_t grid = po.rows * po.pitch;
  for (int64_t q = 0; q < grid; q += kPixelBlock) {
    for (int64_t b = 0; b < kPixelBlock; ++b) {
      const int64_t i = (q + b) / po.pitch, ow = (q + b) % po.pitch;
      dst[b] = q + b < grid && ow < po.out_w ? out + i * po.row + ow * po.col : scratch + b * channels;
    }
    pixel_forward_outputs<scalar_t, BYTES>(dst, ByStep<scalar_t>{x + q * step, step}, off, wt, channels, k, bias, chunk);
  }
}

// The forward with output channels contiguous (so.c == 1) and weight wt (groups, k, C_out/g) (each term's weights
// for the group's output channels side by side): tasks are (image, band, block of groups), the block's input
// channels copied side by side (whole cache lines).
template <typename scalar_t, int BYTES>
void pixel_forward_kernel(scalar_t* out, const Strides& so, const scalar_t* in, const Strides& si, const scalar_t* wt,
                          const scalar_t* bias, const Geometry& g, const PixelLayout& p) {
  const GroupDims d(g);
  const int64_t chunk = forward_chunk<scalar_t>(d.k_per_group);
  const int64_t blocks = ceil_div(d.groups, p.groups), step = g.win.stride_w * p.channels;
  parallel_tasks(g.batch * p.count * blocks, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> planes(g.win.stride_h * p.size), scratch(kPixelBlock * d.out_per_group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (p.count * blocks), grp0 = task % blocks * p.groups;
      const int64_t oh0 = task / blocks % p.count * p.rows, rows = std::min(p.rows, g.out_h - oh0);
      const int64_t groups = std::min(p.groups, d.groups - grp0);
      build_pixel_planes(planes.data(), in + n * si.n + grp0 * d.in_per_group * si.c, si, groups * d.in_per_group, g,
                         p, oh0);
      const PixelOut po{so.h, so.w, p.pitch, g.out_w, rows};
      for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t oc0 = (grp0 + gi) * d.out_per_group;
        pixel_forward_planes<scalar_t, BYTES>(out + n * so.n + oh0 * so.h + oc0, po, scratch.data(), planes.data() + gi * d.in_per_group,
                             step, p.offsets.data(), wt + (grp0 + gi) * d.k_per_group * d.out_per_group,
                             d.out_per_group, d.k_per_group, bias ? bias + oc0 : nullptr, chunk);
      }
    }
  });
}

// acc[t * ld + v * N + lane] += for t < T, v < VB: the sum over the band's outputs of grad[.., v * N + lane] ×
// the input each term t met there, in scalar_t, each lane one weight-gradient entry (no lane sums).
template <typename scalar_t, int BYTES, int VB, int T>
[[gnu::always_inline]] inline void pixel_weight_block(double* acc, int64_t ld, const scalar_t* grad, const Strides& sg,
                                                      const scalar_t* x, int64_t step, int64_t pitch, int64_t rows,
                                                      int64_t out_w, const int64_t* off) {
  using vec = typename VecBytes<scalar_t, BYTES>::type;
  constexpr int64_t N = VecBytes<scalar_t, BYTES>::lanes;
  vec sum[T][VB] = {};
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t ow = 0; ow < out_w; ++ow) {
      vec gv[VB];
      for (int v = 0; v < VB; ++v) load_vec(gv[v], grad + i * sg.h + ow * sg.w + v * N);
      const scalar_t* xq = x + (i * pitch + ow) * step;
      for (int t = 0; t < T; ++t) {
        const scalar_t value = xq[off[t]];
        for (int v = 0; v < VB; ++v) sum[t][v] += value * gv[v];
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < VB; ++v)
      for (int64_t lane = 0; lane < N; ++lane) acc[t * ld + v * N + lane] += sum[t][v][lane];
}

// pixel_weight_block for the 9C terms of C whole input channels of a 3x3 kernel of dilation 1 in the plane, planes of
// kPixelChannels channels a pixel and a stride of STRIDE in the plane (step STRIDE * kPixelChannels): term (c, kh, kw)
// of the block reads row kh's pointer (from its first term's offset off[3 kh]) plus c + kw * kPixelChannels, a
// constant, so 27 accumulators need three general registers, where 8 terms needed eight offsets. The same sums.
template <typename scalar_t, int BYTES, int STRIDE, int C>
[[gnu::always_inline]] inline void pixel_weight_taps(double* acc, int64_t ld, const scalar_t* grad, const Strides& sg,
                                                     const scalar_t* x, int64_t pitch, int64_t rows, int64_t out_w,
                                                     const int64_t* off) {
  using vec = typename VecBytes<scalar_t, BYTES>::type;
  constexpr int64_t N = VecBytes<scalar_t, BYTES>::lanes, CH = kPixelChannels, STEP = STRIDE * CH;
  vec sum[C][3][3] = {};
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* r0 = x + i * pitch * STEP + off[0];
    const scalar_t* r1 = x + i * pitch * STEP + off[3];
    const scalar_t* r2 = x + i * pitch * STEP + off[6];
    const scalar_t* g = grad + i * sg.h;
    for (int64_t ow = 0; ow < out_w; ++ow) {
      vec gv;
      load_vec(gv, g + ow * sg.w);
      const int64_t q = ow * STEP;
      for (int c = 0; c < C; ++c)
        for (int kw = 0; kw < 3; ++kw) {
          sum[c][0][kw] += r0[q + c + kw * CH] * gv;
          sum[c][1][kw] += r1[q + c + kw * CH] * gv;
          sum[c][2][kw] += r2[q + c + kw * CH] * gv;
        }
    }
  }
  for (int c = 0; c < C; ++c)
    for (int kh = 0; kh < 3; ++kh)
      for (int kw = 0; kw < 3; ++kw)
        for (int64_t lane = 0; lane < N; ++lane) acc[(9 * c + 3 * kh + kw) * ld + lane] += sum[c][kh][kw][lane];
}

// Whether pixel_weight_planes takes pixel_weight_taps for geometry g over planes of task_channels channels a pixel:
// 0, else its stride (1 or 2).
int pixel_weight_taps_stride(const Geometry& g, int64_t task_channels) {
  const Window& w = g.win;
  if (w.kernel_h != 3 || w.kernel_w != 3 || w.dilation_w != 1 || w.stride_h != w.stride_w ||
      (w.stride_w != 1 && w.stride_w != 2) || task_channels != kPixelChannels)
    return 0;
  return static_cast<int>(w.stride_w);
}

// acc (k, channels) rows [t0, t1) += one image's band: grad (at its first output row and the group's first channel;
// sg.c == 1) against its planes. One vector of channels takes 8 terms a block: with 12, their 12 offsets did not
// fit the general registers beside the pointers, and GCC reloaded them from the stack for every multiply-add
// (256 g32 @28 channels-last, 2 threads, a Zen 4: 0.93x the time with 8).
template <typename scalar_t, int BYTES>
MANUALGRAD_VECTOR_CLONES_VL void pixel_weight_planes(double* acc, const scalar_t* grad, const Strides& sg,
                                                  const scalar_t* planes, int64_t step, int64_t pitch, int64_t rows,
                                                  int64_t out_w, const int64_t* off, int64_t channels, int64_t t0,
                                                  int64_t t1, int taps_stride) {
  constexpr int64_t N = VecBytes<scalar_t, BYTES>::lanes;
  const int64_t vectors = channels / N;
  if (taps_stride) {  // t0 and t1 whole channels (multiples of 9)
    constexpr int C = kVectorRegisters >= 32 ? 3 : 1;
    for (int64_t v = 0; v < vectors; ++v)
      for (int64_t t = t0; t < t1;) {
        double* a = acc + t * channels + v * N;
        const scalar_t* gr = grad + v * N;
        const bool three = C == 3 && t1 - t >= 27;
        if (taps_stride == 1 && three)
          pixel_weight_taps<scalar_t, BYTES, 1, C>(a, channels, gr, sg, planes, pitch, rows, out_w, off + t);
        else if (taps_stride == 1)
          pixel_weight_taps<scalar_t, BYTES, 1, 1>(a, channels, gr, sg, planes, pitch, rows, out_w, off + t);
        else if (three)
          pixel_weight_taps<scalar_t, BYTES, 2, C>(a, channels, gr, sg, planes, pitch, rows, out_w, off + t);
        else
          pixel_weight_taps<scalar_t, BYTES, 2, 1>(a, channels, gr, sg, planes, pitch, rows, out_w, off + t);
        t += three ? 27 : 9;
      }
    return;
  }
  for (int64_t v0 = 0; v0 < vectors;) {
    const bool two = vectors - v0 >= 2;
    for (int64_t t = t0; t < t1;) {
      double* a = acc + t * channels + v0 * N;
      const scalar_t* gr = grad + v0 * N;
      if (two && t1 - t >= 6) {
        pixel_weight_block<scalar_t, BYTES, 2, 6>(a, channels, gr, sg, planes, step, pitch, rows, out_w, off + t);
        t += 6;
      } else if (!two && t1 - t >= 8) {
        pixel_weight_block<scalar_t, BYTES, 1, 8>(a, channels, gr, sg, planes, step, pitch, rows, out_w, off + t);
        t += 8;
      } else if (two) {
        pixel_weight_block<scalar_t, BYTES, 2, 1>(a, channels, gr, sg, planes, step, pitch, rows, out_w, off + t);
        t += 1;
      } else {
        pixel_weight_block<scalar_t, BYTES, 1, 1>(a, channels, gr, sg, planes, step, pitch, rows, out_w, off + t);
        t += 1;
      }
    }
    v0 += two ? 2 : 1;
  }
}

// The groups a task of pixel_weight_kernel copies and sums together. With a stride, each copied pixel feeds a
// quarter of the sums, and copying one group of 8 or 16 channels a pixel (pixels 1-2 KB apart) waited on memory:
// 4 groups but at most 64 channels (2-core Zen 4, one thread, channels-last, ms: 512 g32 3x3/2 28 -> 14 7.0 -> 5.6,
// 256 g32 56 -> 28 13.4 -> 11.1, 1024 g32 14 -> 7 4.6 -> 4.5). Without one, the kernel's reads over wider planes
// cost what the copy saves (128 g16 @56: 13.8 ms -> 14.3 with 4 groups, 18.7 with 8), so one group.
int64_t pixel_weight_groups(const Geometry& g) {
  if (g.win.stride_h * g.win.stride_w == 1) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(4, kPixelChannels / GroupDims(g).in_per_group));
}

// grad_weight gw, with grad_output's channels contiguous (sg.c == 1): tasks are (block of p.groups groups, block of
// terms), each summing every band of every image in order, each image's band in scalar_t and that added in double.
// A task copies its groups' input channels side by side, as the forward does: one group's 64 bytes a pixel, lines
// 2 KB apart at 512 channels, kept the copy waiting on memory (a quarter of a strided layer's samples).
template <typename scalar_t, int BYTES>
void pixel_weight_kernel(const WeightRef<scalar_t>& gw, const scalar_t* go, const Strides& sg, const scalar_t* in,
                         const Strides& si, const Geometry& g, const PixelLayout& p) {
  const GroupDims d(g);
  const int64_t step = g.win.stride_w * p.channels, k = d.k_per_group, entries = k * d.out_per_group;
  const int64_t group_blocks = ceil_div(d.groups, p.groups);
  const int taps_stride = pixel_weight_taps_stride(g, p.channels);
  // a task's terms a multiple of pixel_weight_planes' blocks: of 6 and of 8 terms, or of 27 and 9 (whole channels)
  const int64_t terms = taps_stride ? 27 : 24;
  const int64_t blocks = std::min(ceil_div(kMinWeightTasks, group_blocks), ceil_div(k, terms));
  const int64_t per_block = ceil_div(ceil_div(k, blocks), terms) * terms;
  parallel_tasks(group_blocks * blocks, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> planes(g.win.stride_h * p.size);
    std::vector<double> acc(p.groups * entries);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp0 = task / blocks * p.groups, groups = std::min(p.groups, d.groups - grp0);
      const int64_t t0 = task % blocks * per_block, t1 = std::min(k, t0 + per_block);
      if (t0 >= t1) continue;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t band = 0; band < p.count; ++band) {
        const int64_t oh0 = band * p.rows, rows = std::min(p.rows, g.out_h - oh0);
        for (int64_t n = 0; n < g.batch; ++n) {
          build_pixel_planes(planes.data(), in + n * si.n + grp0 * d.in_per_group * si.c, si, groups * d.in_per_group,
                             g, p, oh0);
          for (int64_t gi = 0; gi < groups; ++gi)
            pixel_weight_planes<scalar_t, BYTES>(acc.data() + gi * entries,
                                                 go + n * sg.n + oh0 * sg.h + (grp0 + gi) * d.out_per_group, sg,
                                                 planes.data() + gi * d.in_per_group, step, p.pitch, rows, g.out_w,
                                                 p.offsets.data(), d.out_per_group, t0, t1, taps_stride);
        }
      }
      for (int64_t gi = 0; gi < groups; ++gi)
        for (int64_t o = 0; o < d.out_per_group; ++o)
          gw.for_terms((grp0 + gi) * d.out_per_group + o, t0, t1, [&](int64_t t, scalar_t& entry) {
            entry = static_cast<scalar_t>(acc[gi * entries + t * d.out_per_group + o]);
          });
    }
  });
}

// The vector bytes of the pixel kernels for geometry g with an output (or grad_output) of channel stride
// `channel_stride`: 64 where a group's output channels fill 64-byte vectors (in the copy of this file for AVX-512),
// 32 where they fill 32-byte ones, else 0 (the plane kernels).
template <typename scalar_t>
int pixel_bytes(const Geometry& g, int64_t channel_stride) {
  if (channel_stride != 1) return 0;
  const int64_t channels = GroupDims(g).out_per_group;
  if (MANUALGRAD_VECTOR_BYTES == 64 && channels % VecBytes<scalar_t, 64>::lanes == 0) return 64;
  if (channels % VecBytes<scalar_t, 32>::lanes == 0) return 32;
  return 0;
}

// The weight of a forward over geometry fg (its terms (j, a, b), kernel fg.win) as fg's kernels read it, from
// weight w of the convolution whose forward or input gradient fg is: entry (oc, ic, taps_h[a], taps_w[b]) with
// (oc, ic) = (o, j) for the forward, (j, o) for the input gradient (`transposed`). Pixel kernels read (groups, k,
// C_out/g), the plane kernels (C_out, k). One pass over the weight in any layout, where index_select, transpose
// and copies to contiguous took five (at 7x7 the weight outweighs the images).
struct WeightTaps {
  std::vector<int64_t> h, w;
  bool transposed;
};
template <typename scalar_t>
at::Tensor gather_weight(const WeightRef<scalar_t>& w, const WeightTaps& taps, const Geometry& fg, bool term_major,
                         const at::TensorOptions& options) {
  const GroupDims d(fg);
  const int64_t na = taps.h.size(), nb = taps.w.size(), k = d.k_per_group;
  at::Tensor out = at::empty({fg.out_channels * k}, options);
  scalar_t* dst = out.data_ptr<scalar_t>();
  // (oc, ic) = (o, j) for the forward, (j, o) for the input gradient: the weight's steps along o and j, and each
  // tap's offset
  const int64_t o_step = taps.transposed ? w.s.c : w.s.n, j_step = taps.transposed ? w.s.n : w.s.c;
  // term t = (j, a, b) of a group's sums: its offset from output 0's entry, in order
  std::vector<int64_t> term(k);
  for (int64_t j = 0, t = 0; j < d.in_per_group; ++j)
    for (int64_t a = 0; a < na; ++a)
      for (int64_t b = 0; b < nb; ++b) term[t++] = j * j_step + taps.h[a] * w.s.h + taps.w[b] * w.s.w;
  // A weight already in the plane kernels' order (a contiguous one's forward): a group's block is one run
  bool in_order = !term_major && o_step == k;
  for (int64_t t = 0; t < k && in_order; ++t) in_order = term[t] == t;
  const int64_t* offset = term.data();
  // In parallel over groups, each block written in order (the weight is as large as a batch of 7x7 images: gathered
  // on one thread, with the other waiting, it took a tenth of a channels-last 1024@7 forward); a small one inline.
  // Through the table of offsets: nested loops over (j, a, b) with a call per term compiled to a copy of 3 values
  // at a time with its counters on the stack, 29% of the NCHW grouped forward at 1024@7 on a Zen 4.
  const auto gather = [&](int64_t g0, int64_t g1) {
    for (int64_t grp = g0; grp < g1; ++grp) {
      const scalar_t* src = w.data + grp * (taps.transposed ? d.in_per_group : d.out_per_group) * w.s.n;
      scalar_t* block = dst + grp * d.out_per_group * k;
      if (in_order) {
        std::copy_n(src, d.out_per_group * k, block);
      } else if (term_major) {
        for (int64_t t = 0; t < k; ++t)
          for (int64_t o = 0; o < d.out_per_group; ++o) *block++ = src[offset[t] + o * o_step];
      } else {
        for (int64_t o = 0; o < d.out_per_group; ++o) {
          const scalar_t* row = src + o * o_step;
          for (int64_t t = 0; t < k; ++t) *block++ = row[offset[t]];
        }
      }
    }
  };
  if (fg.out_channels * k < kMinParallelGather) {
    gather(0, d.groups);
  } else {
    parallel_tasks(d.groups, gather);
  }
  return out;
}

// ---- 3x3 stride-1 groups of many channels: Winograd's F(2x2, 3x3) ----
// With 16 or more channels a group on both sides, a group's 2x2 output tile costs 16 multiply-adds per input and
// output channel pair instead of 36, as for the dense layers (winograd_cpu.cpp, whose tile transforms these use).
// A task (block of tile rows, group) copies its padded input pixels, the group's channels side by side,
// transforms each tile (V: 16 × tiles × in channels), multiplies by the group's U (16 × in × out) with the pixel
// kernels' blocks (a vector of output channels times a broadcast V value), and writes each tile's outputs through
// the output transform: in place where the output's channels are contiguous, else into pixel rows scattered after.
// Each output is one task's fixed sequence: the same bits at every thread count. float32 only.
constexpr int64_t kWinogradGroupChannels = 16;  // fewer in or out channels a group: the transforms outweigh the gain
constexpr int64_t kWinogradBlockTiles = 120;    // a task's tiles at most: V and M 120 KB each at 16 channels
constexpr int64_t kWinogradChunk = 32;          // input channels a run of the products (winograd_cpu.cpp's kChunk)
constexpr int64_t kWinogradWeightRun = 32;      // tiles a float sum of the weight gradient's (then added in double)

// Whether winograd_group_forward (weight_gradient false) or winograd_group_weight computes forward geometry fg: a
// whole number of this copy's vectors of output channels a group, and outputs of at least 14x14, or 7x7 for the
// weight gradient. fg may be a phase of a strided input gradient whose taps make a 3x3 stride-1 forward (5x5/2's
// even phases, say). (1024 -> 1024 over 32 groups at 7x7, 2-core Zen 4, batch 8: forward NCHW 1.7 -> 2.3 ms,
// channels-last 1.4 -> 2.1, input gradient no faster; weight gradient 2.2 -> 1.4 and 1.7 -> 1.5 ms.)
template <typename scalar_t>
bool winograd_group_applies(const Geometry& fg, bool weight_gradient) {
  const Window& w = fg.win;
  const GroupDims d(fg);
  if (!std::is_same_v<scalar_t, float> || fg.spatial_dims != 2 || w.kernel_h != 3 || w.kernel_w != 3 ||
      w.stride_h != 1 || w.stride_w != 1 || w.dilation_h != 1 || w.dilation_w != 1)
    return false;
  if (winograd_switched_off()) return false;
  return d.in_per_group >= kWinogradGroupChannels && d.out_per_group % Vec<float>::lanes == 0 &&
         d.out_per_group >= kWinogradGroupChannels && std::min(fg.out_h, fg.out_w) >= (weight_gradient ? 7 : 14);
}

// The batch's tile rows (image, row of tiles) in order, cut into blocks of whole rows that may span images: a block's
// tiles then fill the pixel kernels' blocks of kPixelBlock (one 14x14 image's 49 tiles took 5 of them, 60 lanes).
struct TileBlocks {
  int64_t tiles_h, tiles_w, total, rows, blocks;  // rows: tile rows a block (fewer in the last)
  int64_t width, stride;  // padded pixels a row; V's and M's tiles a plane (whole blocks of kPixelBlock)
  explicit TileBlocks(const Geometry& g)
      : tiles_h(ceil_div(g.out_h, 2)), tiles_w(ceil_div(g.out_w, 2)), total(g.batch * tiles_h),
        rows(std::max<int64_t>(1, std::min(total, kWinogradBlockTiles / tiles_w))), blocks(ceil_div(total, rows)),
        width(2 * tiles_w + 2), stride(ceil_div(rows * tiles_w, kPixelBlock) * kPixelBlock) {}
  int64_t rows_in(int64_t block) const { return std::min(rows, total - block * rows); }
  // f(r, n, ty, count) for each run of the block's tile rows within one image: rows r .. r + count - 1 of the block,
  // image n's tile rows ty .. ty + count - 1.
  template <typename F>
  void for_each_run(int64_t block, const F& f) const {
    for (int64_t r = 0; r < rows_in(block);) {
      const int64_t row = block * rows + r, n = row / tiles_h, ty = row % tiles_h;
      const int64_t count = std::min(rows_in(block) - r, tiles_h - ty);
      f(r, n, ty, count);
      r += count;
    }
  }
};

// U[xi][group][j][o] for forward geometry fg (j < its input channels a group, o < output ones) from the weight as
// gather_weight reads it.
at::Tensor winograd_group_filters(const WeightRef<float>& w, const WeightTaps& taps, const Geometry& fg) {
  const GroupDims d(fg);
  const int64_t pairs = d.in_per_group * d.out_per_group;
  at::Tensor u = at::empty({16, d.groups, pairs}, at::kFloat);
  const int64_t o_step = taps.transposed ? w.s.c : w.s.n, j_step = taps.transposed ? w.s.n : w.s.c;
  int64_t tap[9];
  for (int t = 0; t < 9; ++t) tap[t] = taps.h[t / 3] * w.s.h + taps.w[t % 3] * w.s.w;
  parallel_tasks(d.groups, [&](int64_t g0, int64_t g1) {
    std::vector<float> gathered(9 * pairs);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const float* src = w.data + grp * (taps.transposed ? d.in_per_group : d.out_per_group) * w.s.n;
      // the weight read along its smaller step (its own order for a contiguous one: 14% of a 1024@7 forward's time
      // went to reading it across)
      const auto entry = [&](int64_t j, int64_t o) {
        const float* filter = src + o * o_step + j * j_step;
        for (int t = 0; t < 9; ++t) gathered[t * pairs + j * d.out_per_group + o] = filter[tap[t]];
      };
      if (o_step <= j_step) {
        for (int64_t j = 0; j < d.in_per_group; ++j)
          for (int64_t o = 0; o < d.out_per_group; ++o) entry(j, o);
      } else {
        for (int64_t o = 0; o < d.out_per_group; ++o)
          for (int64_t j = 0; j < d.in_per_group; ++j) entry(j, o);
      }
      winograd_tile_filters(u.data_ptr<float>() + grp * pairs, d.groups * pairs, gathered.data(), pairs, pairs);
    }
  });
  return u;
}

// A band's padded input pixels, `channels` side by side from `image`'s first: input row 2 ty0 + r - pad_h, column
// j - pad_w at pixels[(r * width + j) * channels], zero outside the input.
MANUALGRAD_VECTOR_CLONES void winograd_group_pixels(float* pixels, const float* image, const Strides& si,
                                                    int64_t channels, const Geometry& fg, int64_t ty0, int64_t rows,
                                                    int64_t width) {
  const int64_t j_lo = std::clamp<int64_t>(fg.win.pad_w, 0, width);
  const int64_t j_hi = std::clamp<int64_t>(fg.in_w + fg.win.pad_w, j_lo, width);
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = pixels + r * width * channels;
    const int64_t ih = 2 * ty0 + r - fg.win.pad_h;
    if (ih < 0 || ih >= fg.in_h) {
      std::fill_n(dst, width * channels, 0.f);
      continue;
    }
    std::fill_n(dst, j_lo * channels, 0.f);
    std::fill_n(dst + j_hi * channels, (width - j_hi) * channels, 0.f);
    gather_rows(dst + j_lo * channels, channels, image + ih * si.h + (j_lo - fg.win.pad_w) * si.w, si.w, si.c,
                j_hi - j_lo, channels);
  }
}

// V[xi][t][c] (plane stride xi_stride) of a block's `count` tiles from its pixels (winograd_group_pixels: `width` a
// row, ic channels side by side), tile row r's first padded row at rows[r], tiles_w tiles a row.
MANUALGRAD_VECTOR_CLONES void winograd_group_inputs(float* __restrict v, int64_t xi_stride, const float* const* rows,
                                                    int64_t width, int64_t ic, int64_t tiles_w, int64_t count) {
  using vec = Vec<float>::type;
  constexpr int64_t L = Vec<float>::lanes;
  for (int64_t t = 0; t < count; ++t) {
    const float* tile = rows[t / tiles_w] + 2 * (t % tiles_w) * ic;
    float* dst = v + t * ic;
    int64_t c = 0;
    for (; c + L <= ic; c += L) {
      vec d[4][4], r[16];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) load_vec(d[i][j], tile + (i * width + j) * ic + c);
      winograd_input_transform(d, r);
      for (int xi = 0; xi < 16; ++xi) std::memcpy(dst + xi * xi_stride + c, &r[xi], sizeof(vec));
    }
    for (; c < ic; ++c) {
      float d[4][4], r[16];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) d[i][j] = tile[(i * width + j) * ic + c];
      winograd_input_transform(d, r);
      for (int xi = 0; xi < 16; ++xi) dst[xi * xi_stride + c] = r[xi];
    }
  }
}

// Each tile t's 2x2 outputs (oc channels, a whole number of vectors) from M[xi][t] (plane stride xi_stride), +
// bias, into the pixels y[4t + 2p + q]. Returns whether one of them is not finite.
MANUALGRAD_VECTOR_CLONES bool winograd_group_outputs(float* const* y, const float* __restrict m, int64_t xi_stride,
                                                     const float* __restrict bias, int64_t oc, int64_t count) {
  using vec = Vec<float>::type;
  constexpr int64_t L = Vec<float>::lanes;
  vec check = {};  // x - x: 0 for every finite x, NaN for an infinity or a NaN, and NaN stays
  for (int64_t t = 0; t < count; ++t) {
    for (int64_t c = 0; c < oc; c += L) {
      vec mt[16], b, out[4];
      for (int xi = 0; xi < 16; ++xi) load_vec(mt[xi], m + xi * xi_stride + t * oc + c);
      load_vec(b, bias + c);
      winograd_output_transform(mt, b, out);
      for (int k = 0; k < 4; ++k) {
        std::memcpy(y[4 * t + k] + c, &out[k], sizeof(vec));
        check += out[k] - out[k];
      }
    }
  }
  float lanes[L];
  std::memcpy(lanes, &check, sizeof(check));
  for (int64_t i = 0; i < L; ++i)
    if (lanes[i] != 0.f) return true;
  return false;
}

// M[xi] (count tiles × oc, plane stride `stride` tiles) = V[xi] (tiles × ic) U[xi] (ic × oc) for the 16 positions,
// u at the group's U[0], in blocks of kPixelBlock tiles (a block's lanes past `count` into `spare`).
template <int BYTES>
MANUALGRAD_VECTOR_CLONES_VL void winograd_group_products(float* m, const float* v, const float* u, int64_t u_step,
                                                         int64_t stride, int64_t count, int64_t ic, int64_t oc,
                                                         const int64_t* terms, float* spare) {
  float* dst[kPixelBlock];
  for (int xi = 0; xi < 16; ++xi) {
    for (int64_t t0 = 0; t0 < count; t0 += kPixelBlock) {
      for (int64_t b = 0; b < kPixelBlock; ++b) dst[b] = t0 + b < count ? m + (xi * stride + t0 + b) * oc : spare;
      pixel_forward_outputs<float, BYTES>(dst, ByStep<float>{v + (xi * stride + t0) * ic, ic}, terms, u + xi * u_step,
                                          oc, ic, nullptr, kWinogradChunk);
    }
  }
}

// Pixel rows (rows × out_w pixels of `channels`) scattered into an output of any strides at `out`.
MANUALGRAD_VECTOR_CLONES void winograd_group_scatter(float* out, const Strides& so, const float* rows, int64_t count,
                                                     int64_t out_w, int64_t channels) {
  for (int64_t i = 0; i < count; ++i)
    scatter_rows(out + i * so.h, so.w, so.c, rows + i * out_w * channels, channels, out_w, channels);
}

// The forward over fg (winograd_group_applies) into out, with U from winograd_group_filters. Returns whether every
// output is finite; where one is not, the caller computes it again by the direct kernels.
template <int BYTES>
bool winograd_group_forward(float* out, const Strides& so, const float* in, const Strides& si, const float* u,
                            const float* bias, const Geometry& fg) {
  const GroupDims d(fg);
  const int64_t ic = d.in_per_group, oc = d.out_per_group;
  const TileBlocks tb(fg);
  const std::vector<int64_t> terms = [&] {
    std::vector<int64_t> t(ic);
    std::iota(t.begin(), t.end(), 0);
    return t;
  }();
  std::atomic<bool> bad{false};
  parallel_tasks(tb.blocks * d.groups, [&](int64_t begin, int64_t end) {
    // pixels: each run of rows in one image 2 padded rows more than its tiles', so at most 4 a tile row
    aligned_vector<float> pixels(4 * tb.rows * tb.width * ic), v(16 * tb.stride * ic, 0.f), m(16 * tb.stride * oc);
    aligned_vector<float> rows(so.c == 1 ? 0 : 2 * tb.rows * fg.out_w * oc), spare(oc), zeros(oc, 0.f);
    std::vector<const float*> row_pixels(tb.rows);
    std::vector<float*> y(4 * tb.rows * tb.tiles_w);  // each tile's four output pixels
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / d.groups, grp = task % d.groups, count = tb.rows_in(block) * tb.tiles_w;
      int64_t used = 0;  // pixel rows
      tb.for_each_run(block, [&](int64_t r, int64_t n, int64_t ty, int64_t rows_here) {
        float* p = pixels.data() + used * tb.width * ic;
        winograd_group_pixels(p, in + n * si.n + grp * ic * si.c, si, ic, fg, ty, 2 * rows_here + 2, tb.width);
        for (int64_t i = 0; i < rows_here; ++i) row_pixels[r + i] = p + 2 * i * tb.width * ic;
        used += 2 * rows_here + 2;
      });
      winograd_group_inputs(v.data(), tb.stride * ic, row_pixels.data(), tb.width, ic, tb.tiles_w, count);
      winograd_group_products<BYTES>(m.data(), v.data(), u + grp * ic * oc, d.groups * ic * oc, tb.stride, count, ic,
                                     oc, terms.data(), spare.data());
      // each tile's outputs, into the output (channels contiguous) or the block's pixel rows (else)
      tb.for_each_run(block, [&](int64_t r, int64_t n, int64_t ty, int64_t rows_here) {
        for (int64_t t = r * tb.tiles_w; t < (r + rows_here) * tb.tiles_w; ++t) {
          for (int q = 0; q < 4; ++q) {
            const int64_t oh = 2 * (ty + t / tb.tiles_w - r) + q / 2, ow = 2 * (t % tb.tiles_w) + q % 2;
            if (oh >= fg.out_h || ow >= fg.out_w) {
              y[4 * t + q] = spare.data();
            } else if (so.c == 1) {
              y[4 * t + q] = out + n * so.n + oh * so.h + ow * so.w + grp * oc;
            } else {
              y[4 * t + q] = rows.data() + ((2 * (t / tb.tiles_w) + q / 2) * fg.out_w + ow) * oc;
            }
          }
        }
      });
      if (winograd_group_outputs(y.data(), m.data(), tb.stride * oc, bias ? bias + grp * oc : zeros.data(), oc, count))
        bad.store(true, std::memory_order_relaxed);
      if (so.c != 1) {
        tb.for_each_run(block, [&](int64_t r, int64_t n, int64_t ty, int64_t rows_here) {
          winograd_group_scatter(out + n * so.n + grp * oc * so.c + 2 * ty * so.h, so,
                                 rows.data() + 2 * r * fg.out_w * oc, std::min(2 * rows_here, fg.out_h - 2 * ty),
                                 fg.out_w, oc);
        });
      }
    }
  });
  return !bad.load();
}

// dM[xi][t][o] (plane stride xi_stride) of a block's `count` tiles from its output-gradient pixels (tile row r's two
// rows from rows[r], `width` pixels a row, oc channels side by side, zero past the output): the adjoint of the output
// transform.
MANUALGRAD_VECTOR_CLONES void winograd_group_grads(float* __restrict dm, int64_t xi_stride, const float* const* rows,
                                                   int64_t width, int64_t oc, int64_t tiles_w, int64_t count) {
  using vec = Vec<float>::type;
  constexpr int64_t L = Vec<float>::lanes;
  for (int64_t t = 0; t < count; ++t) {
    const float* tile = rows[t / tiles_w] + 2 * (t % tiles_w) * oc;
    for (int64_t c = 0; c < oc; c += L) {
      vec dy[2][2], r[16];
      for (int p = 0; p < 2; ++p)
        for (int q = 0; q < 2; ++q) load_vec(dy[p][q], tile + (p * width + q) * oc + c);
      winograd_grad_transform(dy, r);
      for (int xi = 0; xi < 16; ++xi) std::memcpy(dm + xi * xi_stride + t * oc + c, &r[xi], sizeof(vec));
    }
  }
}

// acc[xi][j][o] (ic × oc a position) += the sum over the band's `count` tiles of V[xi][t][j] dM[xi][t][o], in
// float, for the 16 positions: register blocks of JB input channels × VB vectors of output channels, each
// tile's dM vectors loaded once and its V values broadcast.
template <int JB, int VB>
[[gnu::always_inline]] inline void winograd_weight_block(float* acc, const float* v, const float* dm, int64_t ic,
                                                         int64_t oc, int64_t count, int64_t j0, int64_t c0) {
  using vec = Vec<float>::type;
  constexpr int64_t L = Vec<float>::lanes;
  vec sum[JB][VB] = {};
  for (int64_t t = 0; t < count; ++t) {
    vec g[VB];
    for (int b = 0; b < VB; ++b) load_vec(g[b], dm + t * oc + c0 + b * L);
    for (int a = 0; a < JB; ++a) {
      const float x = v[t * ic + j0 + a];
      for (int b = 0; b < VB; ++b) sum[a][b] += x * g[b];
    }
  }
  for (int a = 0; a < JB; ++a)
    for (int b = 0; b < VB; ++b) {
      vec before;
      float* dst = acc + (j0 + a) * oc + c0 + b * L;
      load_vec(before, dst);
      before += sum[a][b];
      std::memcpy(dst, &before, sizeof(vec));
    }
}

MANUALGRAD_VECTOR_CLONES void winograd_group_weight_products(float* acc, const float* v, const float* dm,
                                                             int64_t v_stride, int64_t m_stride, int64_t ic, int64_t oc,
                                                             int64_t count) {
  constexpr int64_t L = Vec<float>::lanes;
  constexpr int J = kVectorRegisters >= 32 ? 16 : 8;  // accumulators a block (and an operand or two besides)
  for (int xi = 0; xi < 16; ++xi) {
    float* a = acc + xi * ic * oc;
    const float* vx = v + xi * v_stride;
    const float* mx = dm + xi * m_stride;
    for (int64_t c0 = 0; c0 < oc; c0 += (oc - c0 >= 2 * L ? 2 * L : L)) {
      const bool two = oc - c0 >= 2 * L;
      for (int64_t j0 = 0; j0 < ic;) {
        const int64_t left = ic - j0;
        if (two && left >= J / 2) {
          winograd_weight_block<J / 2, 2>(a, vx, mx, ic, oc, count, j0, c0);
          j0 += J / 2;
        } else if (two) {
          winograd_weight_block<1, 2>(a, vx, mx, ic, oc, count, j0, c0);
          j0 += 1;
        } else if (left >= J) {
          winograd_weight_block<J, 1>(a, vx, mx, ic, oc, count, j0, c0);
          j0 += J;
        } else {
          winograd_weight_block<1, 1>(a, vx, mx, ic, oc, count, j0, c0);
          j0 += 1;
        }
      }
    }
  }
}

// total[i] += part[i] for i < n, in double, in the vector clones: 16 × in × out values every 32 tiles, which the
// baseline loop in winograd_group_weight added one or two at a time (its share of a channels-last weight gradient's
// samples 10% -> 3.6%, one thread, 512 over 32 groups at 14x14).
MANUALGRAD_VECTOR_CLONES void add_in_double(double* __restrict total, const float* __restrict part, int64_t n) {
  for (int64_t i = 0; i < n; ++i) total[i] += part[i];
}

// The weight gradient of forward geometry g (winograd_group_applies) into gw (any strides): dU[xi][j][o] = the sum
// over every tile of V[xi][t][j] dM[xi][t][o], then G^T dU G. A task per group sums the blocks of tiles in order,
// in runs of kWinogradWeightRun tiles summed in float and added to a double sum. Returns whether every entry is
// finite (else the caller computes it again by the direct kernels).
bool winograd_group_weight(const WeightRef<float>& gw, const float* go, const Strides& sg, const float* in,
                           const Strides& si, const Geometry& g) {
  const GroupDims d(g);
  const int64_t ic = d.in_per_group, oc = d.out_per_group, pairs = ic * oc;
  const TileBlocks tb(g);
  Geometry gg = g;  // grad_output's pixels: the output's rows and columns, no padding
  gg.in_h = g.out_h;
  gg.in_w = g.out_w;
  gg.win.pad_h = gg.win.pad_w = 0;
  std::atomic<bool> bad{false};
  parallel_tasks(d.groups, [&](int64_t g0, int64_t g1) {
    aligned_vector<float> pixels(4 * tb.rows * tb.width * ic), grads(2 * tb.rows * tb.width * oc);
    aligned_vector<float> v(16 * tb.stride * ic), dm(16 * tb.stride * oc), block_sum(16 * pairs), taps(9 * pairs);
    std::vector<const float*> row_pixels(tb.rows), row_grads(tb.rows);
    std::vector<double> total(16 * pairs);
    for (int64_t grp = g0; grp < g1; ++grp) {
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t block = 0; block < tb.blocks; ++block) {
        const int64_t count = tb.rows_in(block) * tb.tiles_w;
        int64_t used = 0, used_grads = 0;  // pixel rows
        tb.for_each_run(block, [&](int64_t r, int64_t n, int64_t ty, int64_t rows_here) {
          float* p = pixels.data() + used * tb.width * ic;
          float* q = grads.data() + used_grads * tb.width * oc;
          winograd_group_pixels(p, in + n * si.n + grp * ic * si.c, si, ic, g, ty, 2 * rows_here + 2, tb.width);
          winograd_group_pixels(q, go + n * sg.n + grp * oc * sg.c, sg, oc, gg, ty, 2 * rows_here, tb.width);
          for (int64_t i = 0; i < rows_here; ++i) {
            row_pixels[r + i] = p + 2 * i * tb.width * ic;
            row_grads[r + i] = q + 2 * i * tb.width * oc;
          }
          used += 2 * rows_here + 2;
          used_grads += 2 * rows_here;
        });
        winograd_group_inputs(v.data(), tb.stride * ic, row_pixels.data(), tb.width, ic, tb.tiles_w, count);
        winograd_group_grads(dm.data(), tb.stride * oc, row_grads.data(), tb.width, oc, tb.tiles_w, count);
        for (int64_t t0 = 0; t0 < count; t0 += kWinogradWeightRun) {
          std::fill(block_sum.begin(), block_sum.end(), 0.f);
          winograd_group_weight_products(block_sum.data(), v.data() + t0 * ic, dm.data() + t0 * oc, tb.stride * ic,
                                         tb.stride * oc, ic, oc, std::min(kWinogradWeightRun, count - t0));
          add_in_double(total.data(), block_sum.data(), 16 * pairs);
        }
      }
      for (int64_t i = 0; i < 16 * pairs; ++i) block_sum[i] = static_cast<float>(total[i]);
      winograd_tile_filter_grads(taps.data(), block_sum.data(), pairs, pairs, pairs);
      if (!all_finite(taps.data(), 9 * pairs)) bad.store(true, std::memory_order_relaxed);
      for (int64_t o = 0; o < oc; ++o)
        for (int64_t j = 0; j < ic; ++j)
          for (int t = 0; t < 9; ++t)
            gw.data[(grp * oc + o) * gw.s.n + j * gw.s.c + t / 3 * gw.s.h + t % 3 * gw.s.w] =
                taps[t * pairs + j * oc + o];
    }
  });
  return !bad.load();
}
// ...and for float64, which it never computes.
template <typename scalar_t>
bool winograd_group_weight(const WeightRef<scalar_t>&, const scalar_t*, const Strides&, const scalar_t*, const Strides&,
                           const Geometry&) {
  return false;
}

// Whether a forward over fg that Winograd could take goes to the pixel kernels' rows instead: on Intel CPUs running
// the 64-byte copy, outputs channels-last (an Intel Xeon, 2 threads, batch 8, 512 g32 @14 channels-last, ms,
// Winograd -> rows [torch]: forward 1.40 -> 1.07 [0.80], input gradient 1.51 -> 1.07 [0.80]; NCHW, whose direct
// kernels are the plane kernels, tied; the weight gradient stays Winograd's, 1.23 against 1.32). On a Zen 4, whose
// FMA units take 32 bytes, Winograd's fewer products won by 10-25% (before the rows). TORCH_MANUALGRAD_WINOGRAD=1
// keeps Winograd.
bool pixel_rows_pay(const Geometry& fg, int64_t channel_stride) {
  if (MANUALGRAD_VECTOR_BYTES != 64 || !cpu_is_intel() || winograd_forced_on()) return false;
  if (pixel_bytes<float>(fg, channel_stride) != 64) return false;
  const PixelLayout p = pixel_layout(fg);
  return p.bounded(fg) && pixel_rows_apply<float, 64>(fg.win.stride_w * p.channels, GroupDims(fg).out_per_group);
}

// The forward over geometry fg by whichever kernel suits the output's layout, with the weight of gather_weight.
template <typename scalar_t>
void forward_any(scalar_t* out, const Strides& so, const scalar_t* in, const Strides& si, const WeightRef<scalar_t>& w,
                 const WeightTaps& taps, const scalar_t* bias, const Geometry& fg, const at::TensorOptions& options) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (winograd_group_applies<scalar_t>(fg, /*weight_gradient=*/false) && !pixel_rows_pay(fg, so.c)) {
      const at::Tensor u = winograd_group_filters(w, taps, fg);
      if (winograd_group_forward<MANUALGRAD_VECTOR_BYTES>(out, so, in, si, u.const_data_ptr<float>(), bias, fg)) return;
      // else an output was not finite (an infinity or NaN spread through the transforms): the direct sums below
    }
  }
  if (const int bytes = pixel_bytes<scalar_t>(fg, so.c)) {
    const PixelLayout p = pixel_layout(fg);
    if (p.bounded(fg)) {
      const at::Tensor wt = gather_weight(w, taps, fg, /*term_major=*/true, options);
      if (bytes == 64) return pixel_forward_kernel<scalar_t, 64>(out, so, in, si, wt.const_data_ptr<scalar_t>(), bias, fg, p);
      return pixel_forward_kernel<scalar_t, 32>(out, so, in, si, wt.const_data_ptr<scalar_t>(), bias, fg, p);
    }
  }
  const at::Tensor wt = gather_weight(w, taps, fg, /*term_major=*/false, options);
  forward_kernel(out, so, in, si, wt.const_data_ptr<scalar_t>(), bias, fg);
}

// One phase of the input gradient along one dimension: the input positions r + stride·u, u < outputs. Tap k
// reaches them iff k·dilation ≡ r + pad (mod stride): every step-th tap from `first`, `count` of them, tap
// first + m·step reading grad_output at u - c0 - m·dilation', c0 = (first·dilation - r - pad) / stride. Flipped,
// that is a stride-1 convolution of grad_output with `count` taps, dilation', and padding c0 + (count-1)·dilation'.
struct PhaseTaps {
  int64_t first, count, step, dilation, pad, outputs;
};
PhaseTaps phase_taps(int64_t r, int64_t kernel, int64_t stride, int64_t dilation, int64_t pad, int64_t in_size) {
  const int64_t common = std::gcd(stride, dilation);
  PhaseTaps t{0, 0, stride / common, dilation / common, 0, in_size > r ? ceil_div(in_size - r, stride) : 0};
  for (int64_t k = 0; k < std::min(kernel, t.step); ++k) {
    if (((k * dilation - r - pad) % stride + stride) % stride != 0) continue;
    t.first = k;
    t.count = (kernel - 1 - k) / t.step + 1;
    t.pad = (k * dilation - r - pad) / stride + (t.count - 1) * t.dilation;  // an exact division
    break;
  }
  return t;
}

// A phase's taps, flipped: its forward's taps in order.
std::vector<int64_t> flipped_taps(const PhaseTaps& t) {
  std::vector<int64_t> taps;
  for (int64_t m = t.count - 1; m >= 0; --m) taps.push_back(t.first + m * t.step);
  return taps;
}

// The input gradient's phase (r_h, r_w) as a forward: grad_output (C_out channels in) convolved into C_in channels
// over the phase's positions, with the taps that reach it.
Geometry phase_geometry(const Geometry& g, const PhaseTaps& h, const PhaseTaps& w) {
  Geometry t = g;
  t.in_channels = g.out_channels;
  t.out_channels = g.in_channels;
  t.in_h = g.out_h;
  t.in_w = g.out_w;
  t.out_h = h.outputs;
  t.out_w = w.outputs;
  t.win.kernel_h = h.count;
  t.win.kernel_w = w.count;
  t.win.stride_h = t.win.stride_w = 1;
  t.win.dilation_h = h.dilation;
  t.win.dilation_w = w.dilation;
  t.win.pad_h = h.pad;
  t.win.pad_w = w.pad;
  return t;
}

// f(r_h, r_w, taps along h, taps along w) for each phase of the input gradient.
template <typename F>
void for_each_phase(const Geometry& g, const F& f) {
  const Window& w = g.win;
  for (int64_t rh = 0; rh < w.stride_h; ++rh) {
    const PhaseTaps th = phase_taps(rh, w.kernel_h, w.stride_h, w.dilation_h, w.pad_h, g.in_h);
    for (int64_t rw = 0; rw < w.stride_w; ++rw)
      f(rh, rw, th, phase_taps(rw, w.kernel_w, w.stride_w, w.dilation_w, w.pad_w, g.in_w));
  }
}

// Whether a kernel over geometry g keeps one row's planes and output tile within kMaxTaskElems.
bool bounded(const Geometry& g) {
  const GroupDims d(g);
  const Planes one = planes_for(g, 1, 16);
  return d.in_per_group * one.per_channel() <= kMaxTaskElems && d.out_per_group * one.grid_padded() <= kMaxTaskElems;
}

// interleave_phases (vectorize.h) at this clone's width.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void interleave_row(scalar_t* __restrict dst, int64_t step, const scalar_t* const* src,
                                             int64_t phases, int64_t width) {
  interleave_phases(dst, step, src, phases, width);
}

// The input gradient of a strided convolution with contiguous input rows, by the plane kernels: as the phases' forwards
// of grouped_backward_input_cpu, but a task (image, group, band of phase rows) computes every phase's tile and then
// writes the band's input rows once, the phases' columns interleaved. Phase by phase, each pass stored every
// stride-th value of rows the other passes wrote too, a scalar store each: for 3x3/2 over 32 groups of 8 channels at
// 56x56 (a Zen 4), 36% of the input gradient's time. The sums are forward_kernel's, term for term.
// Returns false, having done nothing, where a task's tiles of every phase together would pass kMaxTaskElems.
template <typename scalar_t>
bool backward_input_rows_kernel(scalar_t* gi, const Strides& so, const scalar_t* go, const Strides& sg,
                                const WeightRef<scalar_t>& w, const Geometry& g, const at::TensorOptions& options) {
  constexpr int64_t lanes = Vec<scalar_t>::lanes;
  const Window& win = g.win;
  const int64_t sh = win.stride_h, sw = win.stride_w;
  struct Phase {
    Geometry fg;
    at::Tensor wt;  // (C_in, k) in the plane kernels' order
    int64_t chunk = 0, tile = 0;  // its tile's offset in a task's tiles
    std::optional<Layout> layout;
  };
  std::vector<Phase> phases(sh * sw);  // phase (rh, rw) at rh * sw + rw; no layout where no tap reaches it
  int64_t rows = std::max<int64_t>(1, ceil_div(g.in_h, sh));  // the tallest phase's rows, cut below
  const int64_t phase_rows = rows;
  for_each_phase(g, [&](int64_t rh, int64_t rw, const PhaseTaps& h, const PhaseTaps& t) {
    if (h.count == 0 || t.count == 0 || h.outputs == 0 || t.outputs == 0) return;
    phases[rh * sw + rw].fg = phase_geometry(g, h, t);
    // (not bands_for's rows, which a phase with a row fewer than the tallest would cut in two)
    rows = std::min(rows, band_rows_budget(phases[rh * sw + rw].fg, lanes));
  });
  const int64_t band_count = ceil_div(phase_rows, rows);
  const Bands bands{ceil_div(phase_rows, band_count), band_count};
  int64_t plane_elems = 0, tile_elems = 0;
  for_each_phase(g, [&](int64_t rh, int64_t rw, const PhaseTaps& h, const PhaseTaps& t) {
    Phase& ph = phases[rh * sw + rw];
    if (h.count == 0 || t.count == 0 || h.outputs == 0 || t.outputs == 0) return;
    ph.layout.emplace(ph.fg, lanes, bands);
    const GroupDims fd(ph.fg);
    ph.chunk = forward_chunk<scalar_t>(fd.k_per_group);
    ph.tile = tile_elems;
    plane_elems = std::max(plane_elems, fd.in_per_group * ph.layout->planes.per_channel());
    tile_elems += fd.out_per_group * ph.layout->planes.grid_padded();
  });
  if (tile_elems > kMaxTaskElems) return false;
  for_each_phase(g, [&](int64_t rh, int64_t rw, const PhaseTaps& h, const PhaseTaps& t) {
    Phase& ph = phases[rh * sw + rw];
    if (ph.layout)
      ph.wt = gather_weight(w, WeightTaps{flipped_taps(h), flipped_taps(t), true}, ph.fg, /*term_major=*/false, options);
  });
  const GroupDims d(g);
  parallel_tasks(g.batch * d.groups * bands.count, [&](int64_t begin, int64_t end) {
    aligned_vector<scalar_t> planes(plane_elems), tiles(tile_elems);
    std::vector<const scalar_t*> src(sw);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (d.groups * bands.count), grp = task / bands.count % d.groups;
      const int64_t u0 = task % bands.count * bands.rows, u1 = std::min(phase_rows, u0 + bands.rows);
      for (const Phase& ph : phases) {
        if (!ph.layout || ph.fg.out_h <= u0) continue;
        const Planes& p = ph.layout->planes;
        const int64_t band_rows = std::min(u1, ph.fg.out_h) - u0;
        build_planes(planes.data(), go + n * sg.n + grp * d.out_per_group * sg.c, sg, d.out_per_group, ph.fg, p, u0);
        const int64_t k = GroupDims(ph.fg).k_per_group;  // the phase's terms: C_out/g channels × its taps
        forward_planes(tiles.data() + ph.tile, p.grid_padded(), band_rows * p.pitch, planes.data(),
                       ph.layout->offsets.data(), ph.wt.template const_data_ptr<scalar_t>() + grp * d.in_per_group * k,
                       d.in_per_group, k, static_cast<const scalar_t*>(nullptr), ph.chunk);
      }
      for (int64_t c = 0; c < d.in_per_group; ++c) {
        scalar_t* plane = gi + n * so.n + (grp * d.in_per_group + c) * so.c;
        for (int64_t u = u0; u < u1; ++u) {
          for (int64_t rh = 0; rh < sh && rh + sh * u < g.in_h; ++rh) {
            for (int64_t rw = 0; rw < sw; ++rw) {
              const Phase& ph = phases[rh * sw + rw];
              src[rw] = ph.layout ? tiles.data() + ph.tile + c * ph.layout->planes.grid_padded() +
                                        (u - u0) * ph.layout->planes.pitch
                                  : nullptr;
            }
            interleave_row(plane + (rh + sh * u) * so.h, so.w, src.data(), sw, g.in_w);
          }
        }
      }
    }
  });
  return true;
}

}  // namespace

bool grouped_direct_applies(const at::Tensor& input, const Geometry& g) {
  if (g.groups <= 1 || is_depthwise(g) || g.empty() || g.out_h * g.out_w == 0) return false;
  if (!(g.spatial_dims == 2 && input.dim() == 4) && !(g.spatial_dims == 1 && input.dim() == 3)) return false;
  if (input.scalar_type() != at::kFloat && input.scalar_type() != at::kDouble) return false;
  const GroupDims d(g);
  return d.in_per_group <= kMaxChannelsPerGroup && d.out_per_group <= kMaxChannelsPerGroup && bounded(g);
}

void grouped_forward_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                         const Geometry& g) {
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  WeightTaps taps{{}, {}, false};
  for (int64_t i = 0; i < g.win.kernel_h; ++i) taps.h.push_back(i);
  for (int64_t i = 0; i < g.win.kernel_w; ++i) taps.w.push_back(i);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "grouped_forward_cpu", [&] {
    forward_any(output.data_ptr<scalar_t>(), strides_of(output), input.const_data_ptr<scalar_t>(), strides_of(input),
                weight_ref<scalar_t>(weight, g), taps, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, g,
                weight.options());
  });
}

bool grouped_backward_input_applies(const at::Tensor& weight, const Geometry& g) {
  bool ok = true;
  for_each_phase(g, [&](int64_t, int64_t, const PhaseTaps& h, const PhaseTaps& w) {
    ok &= h.count == 0 || w.count == 0 || h.outputs == 0 || w.outputs == 0 || bounded(phase_geometry(g, h, w));
  });
  if (!ok) return false;
  if (!weight.is_non_overlapping_and_dense()) return at::isfinite(weight).all().item<bool>();
  return AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "grouped_backward_input_applies", [&] {
    return all_finite(weight.const_data_ptr<scalar_t>(), weight.numel());  // its storage, in any order
  });
}

void grouped_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                const Geometry& g) {
  const Strides so = strides_of(grad_input);
  if (g.win.stride_h * g.win.stride_w > 1 && so.w == 1 && so.c != 1) {  // contiguous rows: the phases together
    const bool done = AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "grouped_backward_input_cpu", [&] {
      return backward_input_rows_kernel(grad_input.data_ptr<scalar_t>(), so, grad_output.const_data_ptr<scalar_t>(),
                                        strides_of(grad_output), weight_ref<scalar_t>(weight, g), g, weight.options());
    });
    if (done) return;
  }
  const int64_t dim_h = grad_input.dim() - 2, dim_w = grad_input.dim() - 1;  // dim_h is the channels' in 1-d: unused
  for_each_phase(g, [&](int64_t rh, int64_t rw, const PhaseTaps& h, const PhaseTaps& w) {
    if (h.outputs == 0 || w.outputs == 0) return;
    at::Tensor phase = grad_input;  // the phase's positions, a strided view
    if (g.spatial_dims == 2) phase = phase.slice(dim_h, rh, c10::nullopt, g.win.stride_h);
    phase = phase.slice(dim_w, rw, c10::nullopt, g.win.stride_w);
    if (h.count == 0 || w.count == 0) {  // no tap reaches these positions
      phase.zero_();
      return;
    }
    const WeightTaps taps{flipped_taps(h), flipped_taps(w), true};
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "grouped_backward_input_cpu", [&] {
      forward_any(phase.data_ptr<scalar_t>(), strides_of(phase), grad_output.const_data_ptr<scalar_t>(),
                  strides_of(grad_output), weight_ref<scalar_t>(weight, g), taps, static_cast<const scalar_t*>(nullptr),
                  phase_geometry(g, h, w), weight.options());
    });
  });
}

void grouped_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                 const Geometry& g) {
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "grouped_backward_weight_cpu", [&] {
    const Strides sg = strides_of(grad_output), si = strides_of(input);
    const WeightRef<scalar_t> gw = weight_ref<scalar_t>(grad_weight, g);
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    if (winograd_group_applies<scalar_t>(g, /*weight_gradient=*/true) && winograd_group_weight(gw, go, sg, in, si, g))
      return;
    if (const int bytes = pixel_bytes<scalar_t>(g, sg.c)) {
      PixelLayout p(g, pixel_weight_groups(g));
      if (p.groups > 1 && !p.bounded(g)) p = PixelLayout(g, 1);  // one group's planes may still fit
      if (p.bounded(g) && bytes == 64) return pixel_weight_kernel<scalar_t, 64>(gw, go, sg, in, si, g, p);
      if (p.bounded(g)) return pixel_weight_kernel<scalar_t, 32>(gw, go, sg, in, si, g, p);
    }
    weight_kernel(gw, go, sg, in, si, g);
  });
}

}  // namespace MANUALGRAD_WIDTH
}  // namespace manualgrad
