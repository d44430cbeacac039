// grouped_cpu.cpp — grouped convolutions with few channels a group (ResNeXt's 3x3 convolutions over 32 groups
// of 4..32 channels), computed directly from each group's input planes, in either layout, with no columns.
//   forward:      out[n, oc] = the sum over the group's input channels ic and taps (i, j) of w[oc, ic, i, j] × the
//                 input slice tap (i, j) sees, + bias[oc]
//   grad_input:   for each phase of the input modulo the stride, a forward of grad_output over the taps that reach
//                 it, each group's weight transposed and those taps flipped
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
// not depend on the thread count.
#include "grouped_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "tasks.h"
#include "vectorize.h"

namespace manualgrad {
namespace {

constexpr int64_t kMaxPlaneElems = 1 << 15;    // one task's planes for a band of rows: 128 KB of float32, in L2
constexpr int64_t kMaxTaskElems = 1 << 22;     // ...and never more than this, however wide one row is
constexpr int64_t kMaxChannelsPerGroup = 64;   // wider groups are products BLAS runs well
constexpr int64_t kMinWeightTasks = 8;         // the weight gradient's tasks: groups × blocks of output channels
constexpr int O_MAX = 4, V_MAX = 3, T_MAX = 3;  // register blocks: output channels × vectors of q (or taps)

// Element strides of a (N, C, H, W) or (N, C, W) tensor, whatever its layout.
struct Strides {
  int64_t n, c, h, w;
};
Strides strides_of(const at::Tensor& t) {
  if (t.dim() == 3) return {t.stride(0), t.stride(1), 0, t.stride(2)};
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
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

// The bands of output rows: as many rows as keep a group's planes within kMaxPlaneElems (one row at least),
// cut evenly. Depends on shapes only.
struct Bands {
  int64_t rows, count;
};
Bands bands_for(const Geometry& g, int64_t lanes) {
  const GroupDims d(g);
  const Planes one = planes_for(g, 1, lanes);
  const int64_t per_row = d.in_per_group * one.phases * one.pitch;
  int64_t rows = std::clamp<int64_t>(kMaxPlaneElems / std::max<int64_t>(1, per_row) - (one.height - 1), 1, g.out_h);
  const int64_t count = ceil_div(g.out_h, rows);
  return {ceil_div(g.out_h, count), count};
}

// Whether n values are all finite (the comparison is false for NaN, and for infinities the bound excludes).
template <typename scalar_t>
bool all_finite(const scalar_t* v, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::abs(v[i]) <= std::numeric_limits<scalar_t>::max();
  return ok;
}

// A band's phase planes for `channels` channels of one image (`image` points at its first channel): plane
// (channel c, phase p) at planes + c * per_channel + p * size. Returns whether every value copied is finite.
template <typename scalar_t>
bool build_planes(scalar_t* planes, const scalar_t* image, const Strides& s, int64_t channels, const Geometry& g,
                  const Planes& p, int64_t oh0) {
  const Window& w = g.win;
  const int64_t step = w.stride_w * s.w;
  bool finite = true;
  for (int64_t a = 0; a < w.stride_h; ++a) {
    for (int64_t b = 0; b < w.stride_w; ++b) {
      // the columns j whose input column stride_w * j + b - pad_w lies in [0, in_w)
      const int64_t first = b - w.pad_w;
      const int64_t j_lo = std::min(p.pitch, first >= 0 ? int64_t(0) : ceil_div(-first, w.stride_w));
      const int64_t j_hi = std::max(j_lo, std::min(p.pitch, g.in_w - 1 - first < 0 ? int64_t(0)
                                                                                  : (g.in_w - 1 - first) / w.stride_w + 1));
      for (int64_t c = 0; c < channels; ++c) {
        scalar_t* plane = planes + c * p.per_channel() + (a * w.stride_w + b) * p.size;
        for (int64_t i = 0; i < p.height; ++i) {
          scalar_t* dst = plane + i * p.pitch;
          const int64_t ih = w.stride_h * (oh0 + i) + a - w.pad_h;
          if (ih < 0 || ih >= g.in_h) {
            std::fill_n(dst, p.pitch, scalar_t(0));
            continue;
          }
          const scalar_t* src = image + c * s.c + ih * s.h + (first + j_lo * w.stride_w) * s.w;
          std::fill_n(dst, j_lo, scalar_t(0));
          if (step == 1) {
            std::copy_n(src, j_hi - j_lo, dst + j_lo);
          } else {
            for (int64_t j = j_lo; j < j_hi; ++j) dst[j] = src[(j - j_lo) * step];
          }
          finite &= all_finite(dst + j_lo, j_hi - j_lo);
          std::fill_n(dst + j_hi, p.pitch - j_hi, scalar_t(0));
        }
        std::fill_n(plane + p.height * p.pitch, p.size - p.height * p.pitch, scalar_t(0));
      }
    }
  }
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
  Layout(const Geometry& g, int64_t lanes)
      : bands(bands_for(g, lanes)),
        planes(planes_for(g, bands.rows, lanes)),
        offsets(term_offsets(g, planes, g.in_channels / g.groups)) {}
};

// out[o * ldo + q] for o < O and V vectors of q: the sum over terms t < k of wt[o * k + t] * planes[off[t] + q],
// in runs of `chunk` terms, each run's sum added in order to the bias (or to nothing). (Always inlined, as are
// the blocks of conv_cpu.cpp's small_k_rows: out of line, GCC compiles them for baseline x86-64 rather than for
// the clone that calls them.)
template <typename scalar_t, int O, int V>
[[gnu::always_inline]] inline void forward_block(scalar_t* out, int64_t ldo, const scalar_t* planes,
                                                 const int64_t* off, const scalar_t* wt, int64_t k,
                                                 const scalar_t* bias, int64_t chunk) {
  using vec = typename Vec64<scalar_t>::type;
  constexpr int64_t L = Vec64<scalar_t>::lanes;
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
  constexpr int64_t L = Vec64<scalar_t>::lanes;
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

// The forward of a grouped convolution g with weight rows wt (C_out, k) contiguous: tasks are (image, group, band).
template <typename scalar_t>
void forward_kernel(scalar_t* out, const Strides& so, const scalar_t* in, const Strides& si, const scalar_t* wt,
                    const scalar_t* bias, const Geometry& g) {
  const GroupDims d(g);
  const int64_t chunk = forward_chunk<scalar_t>(d.k_per_group);
  const Layout layout(g, Vec64<scalar_t>::lanes);
  const Bands& bands = layout.bands;
  const Planes& p = layout.planes;
  const std::vector<int64_t>& off = layout.offsets;
  const int64_t ldo = p.grid_padded();
  parallel_tasks(g.batch * d.groups * bands.count, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> planes(d.in_per_group * p.per_channel()), tile(d.out_per_group * ldo);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (d.groups * bands.count), grp = task / bands.count % d.groups;
      const int64_t oh0 = task % bands.count * bands.rows, rows = std::min(bands.rows, g.out_h - oh0);
      build_planes(planes.data(), in + n * si.n + grp * d.in_per_group * si.c, si, d.in_per_group, g, p, oh0);
      const int64_t oc0 = grp * d.out_per_group;
      forward_planes(tile.data(), ldo, rows * p.pitch, planes.data(), off.data(), wt + oc0 * d.k_per_group,
                     d.out_per_group, d.k_per_group, bias ? bias + oc0 : nullptr, chunk);
      for (int64_t o = 0; o < d.out_per_group; ++o) {
        for (int64_t i = 0; i < rows; ++i) {
          scalar_t* dst = out + n * so.n + (oc0 + o) * so.c + (oh0 + i) * so.h;
          const scalar_t* src = tile.data() + o * ldo + i * p.pitch;
          for (int64_t ow = 0; ow < g.out_w; ++ow) dst[ow * so.w] = src[ow];
        }
      }
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
// added in double.
template <typename scalar_t, int O, int T>
[[gnu::always_inline]] inline void weight_block(double* acc, int64_t lda, const WeightChunk<scalar_t>& c, int64_t o0,
                                                const int64_t* off) {
  using vec = typename Vec64<scalar_t>::type;
  constexpr int64_t L = Vec64<scalar_t>::lanes;
  vec sum[O][T] = {};
  for (int64_t m = 0; m < c.images; ++m) {
    const scalar_t* planes = c.planes + m * c.plane_step;
    const scalar_t* grad = c.grad + m * c.grad_step + o0 * c.ldg;
    for (int64_t q = 0; q < c.count; q += L) {
      vec x[T];
      for (int t = 0; t < T; ++t) load_vec(x[t], planes + off[t] + q);
      for (int o = 0; o < O; ++o) {
        vec gv;
        load_vec(gv, grad + o * c.ldg + q);
        for (int t = 0; t < T; ++t) sum[o][t] += gv * x[t];
      }
    }
  }
  for (int o = 0; o < O; ++o)
    for (int t = 0; t < T; ++t) acc[o * lda + t] += lane_sum<scalar_t, sizeof(vec)>(&sum[o][t]);
}

template <typename scalar_t, int O>
[[gnu::always_inline]] inline void weight_terms(int terms, double* acc, int64_t lda, const WeightChunk<scalar_t>& c,
                                                int64_t o0, const int64_t* off) {
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

// grad_weight rows gw (C_out, k) contiguous: tasks are (group, block of output channels), each summing over every
// band and chunk of images in order. A chunk holds as many images as fit kMaxPlaneElems twice over, so that the
// lanes' sums are added up once per chunk, not once per small image.
template <typename scalar_t>
void weight_kernel(scalar_t* gw, const scalar_t* go, const Strides& sg, const scalar_t* in, const Strides& si,
                   const Geometry& g) {
  const GroupDims d(g);
  constexpr int64_t L = Vec64<scalar_t>::lanes;
  const Layout layout(g, L);
  const Bands& bands = layout.bands;
  const Planes& p = layout.planes;
  const std::vector<int64_t>& off = layout.offsets;
  const int64_t ldg = p.grid_padded();
  const int64_t blocks = std::min(ceil_div(kMinWeightTasks, d.groups), ceil_div(d.out_per_group, O_MAX));
  const int64_t block = ceil_div(d.out_per_group, blocks);
  const int64_t plane_step = d.in_per_group * p.per_channel(), grad_step = block * ldg;
  const int64_t chunk = std::clamp<int64_t>(2 * kMaxPlaneElems / (plane_step + grad_step), 1, g.batch);
  parallel_tasks(d.groups * blocks, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> planes(chunk * plane_step), grad(chunk * grad_step);
    std::vector<double> acc(block * d.k_per_group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / blocks, o_first = task % blocks * block;
      const int64_t channels = std::min(block, d.out_per_group - o_first);
      if (channels <= 0) continue;
      const int64_t oc0 = grp * d.out_per_group + o_first;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t band = 0; band < bands.count; ++band) {
        const int64_t oh0 = band * bands.rows, rows = std::min(bands.rows, g.out_h - oh0);
        for (int64_t n0 = 0; n0 < g.batch; n0 += chunk) {
          const int64_t images = std::min(chunk, g.batch - n0);
          bool finite = true;
          std::fill(grad.begin(), grad.end(), scalar_t(0));
          for (int64_t m = 0; m < images; ++m) {
            const int64_t n = n0 + m;
            finite &= build_planes(planes.data() + m * plane_step, in + n * si.n + grp * d.in_per_group * si.c, si,
                                   d.in_per_group, g, p, oh0);
            for (int64_t o = 0; o < channels; ++o) {
              for (int64_t i = 0; i < rows; ++i) {
                const scalar_t* src = go + n * sg.n + (oc0 + o) * sg.c + (oh0 + i) * sg.h;
                scalar_t* dst = grad.data() + m * grad_step + o * ldg + i * p.pitch;
                for (int64_t ow = 0; ow < g.out_w; ++ow) dst[ow] = src[ow * sg.w];
              }
            }
          }
          const WeightChunk<scalar_t> c{planes.data(), grad.data(), plane_step, grad_step, ldg, images,
                                        ceil_div(rows * p.pitch, L) * L};
          if (finite) weight_planes(acc.data(), c, off.data(), channels, d.k_per_group);
          else weight_planes_exact(acc.data(), c, off.data(), channels, d.k_per_group, p.pitch, rows, g.out_w);
        }
      }
      for (int64_t e = 0; e < channels * d.k_per_group; ++e)
        gw[oc0 * d.k_per_group + e] = static_cast<scalar_t>(acc[e]);
    }
  });
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
  const at::Tensor wt = weight.contiguous();  // (C_out, C_in/g · KH · KW): each output channel's terms in order
  const at::Tensor b = bias.defined() ? bias.contiguous() : bias;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "grouped_forward_cpu", [&] {
    forward_kernel(output.data_ptr<scalar_t>(), strides_of(output), input.const_data_ptr<scalar_t>(),
                   strides_of(input), wt.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                   g);
  });
}

bool grouped_backward_input_applies(const at::Tensor& weight, const Geometry& g) {
  bool ok = true;
  for_each_phase(g, [&](int64_t, int64_t, const PhaseTaps& h, const PhaseTaps& w) {
    ok &= h.count == 0 || w.count == 0 || h.outputs == 0 || w.outputs == 0 || bounded(phase_geometry(g, h, w));
  });
  return ok && at::isfinite(weight).all().item<bool>();
}

void grouped_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                const Geometry& g) {
  const GroupDims d(g);
  const int64_t dim_h = grad_input.dim() - 2, dim_w = grad_input.dim() - 1;  // dim_h is the channels' in 1-d: unused
  // (groups, C_out/g, C_in/g, KH, KW)
  const at::Tensor w5 = weight.reshape({d.groups, d.out_per_group, d.in_per_group, g.win.kernel_h, g.win.kernel_w});
  for_each_phase(g, [&](int64_t rh, int64_t rw, const PhaseTaps& h, const PhaseTaps& w) {
    if (h.outputs == 0 || w.outputs == 0) return;
    at::Tensor phase = grad_input;  // the phase's positions, a strided view
    if (g.spatial_dims == 2) phase = phase.slice(dim_h, rh, c10::nullopt, g.win.stride_h);
    phase = phase.slice(dim_w, rw, c10::nullopt, g.win.stride_w);
    if (h.count == 0 || w.count == 0) {  // no tap reaches these positions
      phase.zero_();
      return;
    }
    // (C_in, C_out/g · count_h · count_w): for input channel ic of group grp, weight[grp·C_out/g + oc, ic] over oc,
    // at the phase's taps, flipped
    const auto taps = [&](const PhaseTaps& t) {
      return at::arange(t.first + (t.count - 1) * t.step, t.first - 1, -t.step, weight.options().dtype(at::kLong));
    };
    const at::Tensor wt = w5.index_select(3, taps(h)).index_select(4, taps(w)).transpose(1, 2).contiguous();
    AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "grouped_backward_input_cpu", [&] {
      forward_kernel(phase.data_ptr<scalar_t>(), strides_of(phase), grad_output.const_data_ptr<scalar_t>(),
                     strides_of(grad_output), wt.const_data_ptr<scalar_t>(), static_cast<const scalar_t*>(nullptr),
                     phase_geometry(g, h, w));
    });
  });
}

void grouped_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                 const Geometry& g) {
  at::Tensor rows = at::empty({g.out_channels, GroupDims(g).k_per_group}, grad_weight.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "grouped_backward_weight_cpu", [&] {
    weight_kernel(rows.data_ptr<scalar_t>(), grad_output.const_data_ptr<scalar_t>(), strides_of(grad_output),
                  input.const_data_ptr<scalar_t>(), strides_of(input), g);
  });
  grad_weight.copy_(rows.view(grad_weight.sizes()));
}

}  // namespace manualgrad
