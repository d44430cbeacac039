// winograd_cpu.cpp — 3x3 stride-1 float32 convolutions (forward and both gradients, 2-d and 3-d) by Winograd's
// F(2x2, 3x3).
//
// Each 2x2 tile of the output needs a 4x4 tile d of the input. With the fixed matrices B, G and A below,
//   y = A^T [ (G w G^T) ⊙ (B^T d B) ] A,
// and the 16 element-wise products, summed over the input channels, become 16 matrix products over all tiles:
//   M[xi] (C_out × tiles) = U[xi] (C_out × C_in) @ V[xi] (C_in × tiles),  xi = 4a + b, a 4x4 position,
// with U = G w G^T (the weights' transform, once per call) and V = B^T d B (the input's). That is 16·C_in
// multiply-adds per 2x2 outputs instead of 36·C_in: 2.25x fewer FLOPs than im2col's one GEMM, while the
// transforms are data movement. The products are BLAS's (blas.h); the transforms and the split of the work ours.
//
// Accuracy: a float32 product over a long sum loses more than torch's direct convolution does (its error is
// that of its longest sequential sum). So each M[xi] is summed in products of kChunk input channels (BLAS's
// beta = 1). On ResNet's 3x3 layers the normwise forward error
// against float64 then matches torch's (im2col's one GEMM over K = 9·C_in: 1.2-1.4x torch's); benchmarks/NOTES.md.
//
// The input gradient of a 3x3 stride-1 convolution is itself one: grad_output padded by 2 - padding,
// convolved with the weights flipped in both spatial dimensions and with C_in and C_out swapped.
//
// A 3-d convolution that is 3x3 and stride 1 in the plane and stride 1 in depth is the same computation with its
// depth taps as extra input channels (Plan): one product per block over K = KD * C_in, the input read and the
// output written where they lie, NCDHW or NDHWC.
//
// Deterministic: the blocks of tiles are cut from the shapes alone, every output element is one fixed sequence
// of BLAS calls and transforms, whichever thread runs it, so results are the same at every thread count.
#include "winograd_cpu.h"

#include "blas.h"
#include "tasks.h"
#include "vectorize.h"
#include "winograd_tiles.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

namespace manualgrad {
namespace {

// Where it pays, measured against the im2col kernels (interleaved, 2-core Zen 5, OpenBLAS, batch 8; forward and
// input gradient, benchmarks/NOTES.md): in channels-last 0.4-0.8x the time on 14x14 images and up, whatever the
// channels (256 -> 256 at 14x14: 0.6-0.7x), 0.85-0.9x at 7x7 with 128 -> 32 channels but 1.0-1.1x with 512 -> 512.
// Since the blocks share evenly (Plan::block_rows; 2-core Zen 4, batch 8, ours/torch), 512 -> 512 at 7x7 is
// forward 1.16 -> 1.04 channels-last and 1.54 -> 1.40 NCHW, weight gradient 0.71 -> 0.52 and 0.92 -> 0.67, but input
// gradient 1.20 -> 1.37; at batch 2 all three lose (forward 0.90 -> 1.44). Once the filters were read in place
// (Filters: the input gradient's flipped copy had taken 5.6 ms on one core), its input gradient won too: 2 threads,
// NCHW 10.4 -> 9.3 ms, channels-last 11.5 -> 8.9 (torch 8.9), 256 -> 256 at 10x10 5.2 -> 3.0 (torch 3.9); and its
// error is the smaller, 2.35e-7 against im2col's 2.9e-7 (torch NCHW 2.3e-7, channels-last 1.1e-6).
// The NCHW transforms work plane by plane, vectorised along a row of tiles: as fast as channels-last on images
// of 28x28 and up with few channels, slower on smaller ones (7 tiles a row) or many channels (the planes of V
// outgrow the caches), which therefore take channels-last copies (nchw_pays).
constexpr int64_t kMinChannels = 16;     // fewer input or output channels: the transforms outweigh the products
constexpr int64_t kWideSide = 14;        // output sides from which it pays whatever the channels
constexpr int64_t kMinSide = 7;          // ...and from which it pays with at most kMaxChannelSum channels in and out
constexpr int64_t kMaxChannelSum = 384;  // C_in + C_out
constexpr int64_t kManyChannelTiles = 128;  // ...or, with more, this many 2x2 tiles (batch 8 at 7x7)
constexpr int64_t kMinSlotBlocks = 8;     // the weight gradient's blocks from which each task sums its own
constexpr int64_t kMaxSlots = 8;          // ...in at most this many partial sums
constexpr int64_t kMaxSlotElems = 1 << 24;  // ...of together at most this many floats
constexpr int64_t kNchwSide = 28;        // NCHW computed as it lies from this side on, with at most kMaxChannelSum
constexpr int64_t kChunk = 32;         // input channels per product (accuracy, above)
constexpr int64_t kBlockTiles = 256;   // tiles per block: its V and M stay in the caches while its products run
constexpr int64_t kMinBlockTiles = 96; // ...and at least this many where blocks are cut to share evenly (Plan)

bool nchw_pays(const Geometry& g) {
  return std::min(g.out_h, g.out_w) >= kNchwSide && g.in_channels + g.out_channels <= kMaxChannelSum;
}

// One convolution in Winograd's terms: `in_c` channels of (in_h, in_w) → `out_c` of (out_h, out_w). A 3-d one
// (3x3 in the plane, stride 1 in depth) has images (n, od), one per output depth: tap kd of its kernel reads input
// depth od + kd * dilation_d - pad_d (zero outside), and the taps are summed as extra input channels, V's and U's
// rows (kd, c) kd-major, so one product per block has K = taps_d * in_c and no per-tap result is ever stored.
// A 2-d convolution is the 3-d one of depth 1.
struct Plan {
  int64_t batch, in_c, out_c, in_h, in_w, out_h, out_w, pad_h, pad_w;
  int64_t in_d, out_d, taps_d, dilation_d, pad_d;
  int64_t tiles_h, tiles_w;   // 2x2 output tiles down and across an image
  int64_t rows_per_block;     // tile rows (one image's row of tiles_w tiles) per block; blocks may span images
  bool nhwc;                  // channels-last input and output (else NCHW)

  // The convolution g itself.
  static Plan forward(const Geometry& g, bool nhwc) {
    const Window& w = g.win;
    return Plan(g.batch, g.in_channels, g.out_channels, g.in_h, g.in_w, w.pad_h, w.pad_w, g.in_d, g.out_d,
                w.kernel_d, w.dilation_d, w.pad_d, nhwc);
  }
  // g's input gradient: the convolution of grad_output with the filters flipped in every dimension and C_in and
  // C_out swapped, padded by 2 - pad in the plane and dilation_d * (kernel_d - 1) - pad_d in depth.
  static Plan input_gradient(const Geometry& g, bool nhwc) {
    const Window& w = g.win;
    return Plan(g.batch, g.out_channels, g.in_channels, g.out_h, g.out_w, 2 - w.pad_h, 2 - w.pad_w, g.out_d,
                g.in_d, w.kernel_d, w.dilation_d, w.dilation_d * (w.kernel_d - 1) - w.pad_d, nhwc);
  }

  int64_t k() const { return taps_d * in_c; }  // V's rows: a product's inner dimension
  int64_t tile_rows() const { return batch * out_d * tiles_h; }
  int64_t blocks() const { return ceil_div(tile_rows(), rows_per_block); }
  int64_t block_tiles() const { return rows_per_block * tiles_w; }  // V's and M's row length
  int64_t rows_in(int64_t block) const { return std::min(rows_per_block, tile_rows() - block * rows_per_block); }
  // The input image (n, input depth) that tap kd of output image i = n * out_d + od reads, or -1 in the padding.
  int64_t input_image(int64_t i, int64_t kd) const {
    const int64_t d = i % out_d + kd * dilation_d - pad_d;
    return d >= 0 && d < in_d ? i / out_d * in_d + d : -1;
  }

 private:
  Plan(int64_t batch, int64_t in_c, int64_t out_c, int64_t in_h, int64_t in_w, int64_t pad_h, int64_t pad_w,
       int64_t in_d, int64_t out_d, int64_t taps_d, int64_t dilation_d, int64_t pad_d, bool nhwc)
      : batch(batch), in_c(in_c), out_c(out_c), in_h(in_h), in_w(in_w), out_h(in_h + 2 * pad_h - 2),
        out_w(in_w + 2 * pad_w - 2), pad_h(pad_h), pad_w(pad_w), in_d(in_d), out_d(out_d), taps_d(taps_d),
        dilation_d(dilation_d), pad_d(pad_d), tiles_h(ceil_div(out_h, 2)), tiles_w(ceil_div(out_w, 2)),
        rows_per_block(block_rows(batch * out_d * tiles_h, tiles_w, out_c)), nhwc(nhwc) {}

  // Tile rows per block: at most kBlockTiles tiles, at least kMinBlockTiles and half the output channels (a
  // product's rows), and a count of blocks that is a multiple of 8, 4 or 2 where one fits, so that 2, 4 or 8 threads
  // get equal shares. From the shapes alone.
  static int64_t block_rows(int64_t tile_rows, int64_t tiles_w, int64_t out_c) {
    const int64_t most = std::max<int64_t>(1, kBlockTiles / tiles_w);
    const int64_t least = ceil_div(std::max(kMinBlockTiles, out_c / 2), tiles_w);
    for (const int64_t multiple : {8, 4, 2}) {
      const int64_t blocks = ceil_div(ceil_div(tile_rows, most), multiple) * multiple;
      const int64_t rows = ceil_div(tile_rows, blocks);
      if (rows >= least && ceil_div(tile_rows, rows) == blocks) return rows;
    }
    return most;
  }
};

// U[xi][o][i] = (G w G^T)[a][b] for the 3x3 filters w(o, i), i in [0, count), of one o. G = [1 0 0;
// 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]. Tap k = 3r + s of filter i is w[k * tap_stride + i]: the taps lie apart so
// that the loop over filters is vectorised. In float: its rounding moves U by 3.3e-8 relative, against 2.1e-8
// for U computed in double and rounded once, where the convolution's own error is 1.5e-7 (GCC 12 does not
// vectorise a loop that widens float to double).
MANUALGRAD_VECTOR_CLONES void transform_filters(float* __restrict u, int64_t xi_stride, const float* __restrict w,
                                                int64_t tap_stride, int64_t count) {
#pragma GCC ivdep  // the planes never overlap (xi_stride >= count); without it GCC gives up on 16 alias checks
  for (int64_t i = 0; i < count; ++i) {
    float gw[4][3];  // G w
    for (int s = 0; s < 3; ++s) {
      const float w0 = w[s * tap_stride + i], w1 = w[(3 + s) * tap_stride + i], w2 = w[(6 + s) * tap_stride + i];
      gw[0][s] = w0;
      gw[1][s] = 0.5f * (w0 + w1 + w2);
      gw[2][s] = 0.5f * (w0 - w1 + w2);
      gw[3][s] = w2;
    }
    for (int a = 0; a < 4; ++a) {
      u[(4 * a + 0) * xi_stride + i] = gw[a][0];
      u[(4 * a + 1) * xi_stride + i] = 0.5f * (gw[a][0] + gw[a][1] + gw[a][2]);
      u[(4 * a + 2) * xi_stride + i] = 0.5f * (gw[a][0] - gw[a][1] + gw[a][2]);
      u[(4 * a + 3) * xi_stride + i] = gw[a][2];
    }
  }
}

// A weight (C_out, C_in, KD, 3, 3) as a product's filters, read where it lies (any strides): filter (o, kk) of
// outs rows and k = KD * ins columns (kk = kd * ins + i, kd-major as V's rows), tap 3r + s. The forward's are the
// weight's own; the input gradient's swap C_in and C_out and flip every dimension, through signed strides. (The
// permuted and flipped copies this replaces took 1.3 and 5.6 ms for 512 -> 512 on one core.)
struct Filters {
  int64_t origin;  // offset of filter (0, 0)'s tap 0 from the weight's first element
  int64_t outs, ins, k, stride_o, stride_i, stride_d;
  int64_t tap[9];  // offset of tap t from a filter's tap 0

  Filters(const at::Tensor& weight, bool input_gradient) {
    const at::Tensor w = weight.dim() == 4 ? weight.unsqueeze(2) : weight;
    const int64_t sign = input_gradient ? -1 : 1;
    outs = w.size(input_gradient ? 1 : 0);
    ins = w.size(input_gradient ? 0 : 1);
    k = w.size(2) * ins;
    stride_o = w.stride(input_gradient ? 1 : 0);
    stride_i = w.stride(input_gradient ? 0 : 1);
    stride_d = sign * w.stride(2);
    for (int t = 0; t < 9; ++t) tap[t] = sign * (t / 3 * w.stride(3) + t % 3 * w.stride(4));
    origin = input_gradient ? (w.size(2) - 1) * w.stride(2) + 2 * w.stride(3) + 2 * w.stride(4) : 0;
  }
  // first[j] = the offset of filter (o, kk0 + j)'s tap 0, for j < count.
  void run(int64_t o, int64_t kk0, int64_t count, int64_t* first) const {
    int64_t kd = kk0 / ins, i = kk0 % ins;
    for (int64_t j = 0; j < count; ++j) {
      first[j] = origin + o * stride_o + i * stride_i + kd * stride_d;
      if (++i == ins) i = 0, ++kd;
    }
  }
};

constexpr int64_t kFilterRows = 16;  // rows whose filters are gathered, one chunk of U (below) each, before the next

// U as the products read it: (16, chunks, outs, kChunk), chunk c holding columns [c kChunk, (c + 1) kChunk) of
// U[xi] (outs, k), the last one's padding never read. Each product then reads its operand contiguous, where a
// chunk of (outs, k) rows took BLAS a strided copy: 5% off the products of 512 -> 512 at 7x7 (one core, Zen 4).
int64_t u_chunks(int64_t k) { return ceil_div(k, kChunk); }

// U of the weight's filters (Filters), gathered tap-major a chunk of U at a time for transform_filters' vector loop.
at::Tensor transform_weights(const at::Tensor& weight, bool input_gradient) {
  const Filters f(weight, input_gradient);
  const int64_t k = f.k, chunk_size = f.outs * kChunk;
  at::Tensor u = at::empty({16, u_chunks(k), f.outs, kChunk}, at::kFloat);
  const float* w = weight.const_data_ptr<float>();
  float* out = u.data_ptr<float>();
  at::parallel_for(0, f.outs, 1, [&](int64_t begin, int64_t end) {
    float taps[9 * kChunk];
    int64_t first[kChunk];
    // kFilterRows rows at a time, chunk by chunk: U is written in runs of kFilterRows * kChunk values a plane (row
    // by row wrote to 16 planes x every chunk at once: 1.6x the time), the weight read along kFilterRows rows
    for (int64_t o0 = begin; o0 < end; o0 += kFilterRows) {
      for (int64_t kk0 = 0; kk0 < k; kk0 += kChunk) {
        const int64_t count = std::min(kChunk, k - kk0);
        for (int64_t o = o0; o < std::min(end, o0 + kFilterRows); ++o) {
          f.run(o, kk0, count, first);
          if (o + 1 < std::min(end, o0 + kFilterRows)) {  // the next row's run, while this one is transformed
            int64_t next[kChunk];
            f.run(o + 1, kk0, count, next);
            for (int64_t j = 0; j < count; j += 2) __builtin_prefetch(w + next[j]);
          }
          for (int64_t j = 0; j < count; ++j) {  // each filter's taps in turn: the weight read in its order
            for (int t = 0; t < 9; ++t) taps[t * kChunk + j] = w[first[j] + f.tap[t]];
          }
          transform_filters(out + kk0 / kChunk * chunk_size + o * kChunk, u_chunks(k) * chunk_size, taps, kChunk,
                            count);
        }
      }
    }
  });
  return u;
}

// V for one row of `count` tiles of one channel: v[xi * xi_stride + x] for tile x, whose input columns are
// even[x], odd[x], even[x + 1], odd[x + 1] of the four input rows (row r at even/odd + r * ld). Vectorised over
// the tiles.
MANUALGRAD_VECTOR_CLONES void input_tiles(float* __restrict v, int64_t xi_stride, const float* __restrict even,
                                          const float* __restrict odd, int64_t ld, int64_t count) {
#pragma GCC ivdep  // the planes never overlap (xi_stride >= count); without it GCC gives up on 16 alias checks
  for (int64_t x = 0; x < count; ++x) {
    float d[4][4], t[16];
    for (int i = 0; i < 4; ++i) {
      d[i][0] = even[i * ld + x];
      d[i][1] = odd[i * ld + x];
      d[i][2] = even[i * ld + x + 1];
      d[i][3] = odd[i * ld + x + 1];
    }
    winograd_input_transform(d, t);
    for (int xi = 0; xi < 16; ++xi) v[xi * xi_stride + x] = t[xi];
  }
}

// Whether one of values[0, count), just written, is an infinity or a NaN (vectorize.h's all_finite, in this
// clone).
MANUALGRAD_VECTOR_CLONES bool any_not_finite(const float* __restrict values, int64_t count) {
  return !all_finite(values, count);
}

// The 2x2 outputs of `count` tiles from M (m[xi * xi_stride + x]), plus bias, as four rows at out + q * count:
// y00[x], y01[x], y10[x], y11[x].
MANUALGRAD_VECTOR_CLONES void output_tiles(float* __restrict out, const float* __restrict m, int64_t xi_stride,
                                           int64_t count, float bias) {
#pragma GCC ivdep  // the planes never overlap (xi_stride >= count); without it GCC gives up on 16 alias checks
  for (int64_t x = 0; x < count; ++x) {
    float t[16], y[4];
    for (int xi = 0; xi < 16; ++xi) t[xi] = m[xi * xi_stride + x];
    winograd_output_transform(t, bias, y);
    for (int q = 0; q < 4; ++q) out[q * count + x] = y[q];
  }
}

// out[2x] = a[x], out[2x + 1] = b[x] for the `width` outputs of a row.
MANUALGRAD_VECTOR_CLONES void interleave(float* __restrict out, const float* __restrict a, const float* __restrict b,
                                         int64_t width) {
  const int64_t pairs = width / 2;
  for (int64_t x = 0; x < pairs; ++x) {
    out[2 * x] = a[x];
    out[2 * x + 1] = b[x];
  }
  if (width % 2) out[width - 1] = a[pairs];
}

// Channels-last: V of one tile for `count` channels, v[xi * xi_stride + x] over channel x, where d[4i + j]
// points at input pixel (i, j) of the tile (a zero vector in the padding). Vectorised over the channels.
MANUALGRAD_VECTOR_CLONES void input_vectors(float* __restrict v, int64_t xi_stride, const float* const* d,
                                            int64_t count) {
  const float* p[16];
  std::copy(d, d + 16, p);
#pragma GCC ivdep  // the planes never overlap (xi_stride >= count)
  for (int64_t x = 0; x < count; ++x) {
    float tile[4][4], t[16];
    for (int k = 0; k < 16; ++k) tile[k / 4][k % 4] = p[k][x];
    winograd_input_transform(tile, t);
    for (int xi = 0; xi < 16; ++xi) v[xi * xi_stride + x] = t[xi];
  }
}

// Channels-last: the 2x2 outputs of one tile over `count` channels, y[2p + q][x], plus bias[x], from
// m[xi * xi_stride + x]. Each y points at an output pixel (or a scratch vector outside the output).
MANUALGRAD_VECTOR_CLONES void output_vectors(float* const* y, const float* __restrict m, int64_t xi_stride,
                                             const float* __restrict bias, int64_t count) {
  float* __restrict y00 = y[0];
  float* __restrict y01 = y[1];
  float* __restrict y10 = y[2];
  float* __restrict y11 = y[3];
#pragma GCC ivdep
  for (int64_t x = 0; x < count; ++x) {
    float t[16], out[4];
    for (int xi = 0; xi < 16; ++xi) t[xi] = m[xi * xi_stride + x];
    winograd_output_transform(t, bias[x], out);
    y00[x] = out[0];
    y01[x] = out[1];
    y10[x] = out[2];
    y11[x] = out[3];
  }
}

// dM for one row of `count` tiles of one output channel: m[xi * xi_stride + x] from the gradient's two rows,
// even and odd columns apart (row p at even/odd + p * ld, zero beyond the output).
MANUALGRAD_VECTOR_CLONES void grad_tiles(float* __restrict m, int64_t xi_stride, const float* __restrict even,
                                         const float* __restrict odd, int64_t ld, int64_t count) {
#pragma GCC ivdep  // the planes never overlap (xi_stride >= count)
  for (int64_t x = 0; x < count; ++x) {
    const float dy[2][2] = {{even[x], odd[x]}, {even[ld + x], odd[ld + x]}};
    float t[16];
    winograd_grad_transform(dy, t);
    for (int xi = 0; xi < 16; ++xi) m[xi * xi_stride + x] = t[xi];
  }
}

// Channels-last: dM of one tile over `count` output channels, from y[2p + q] pointing at the gradient's pixels
// (a zero vector beyond the output).
MANUALGRAD_VECTOR_CLONES void grad_vectors(float* __restrict m, int64_t xi_stride, const float* const* y,
                                           int64_t count) {
  const float* __restrict y00 = y[0];
  const float* __restrict y01 = y[1];
  const float* __restrict y10 = y[2];
  const float* __restrict y11 = y[3];
#pragma GCC ivdep
  for (int64_t x = 0; x < count; ++x) {
    const float dy[2][2] = {{y00[x], y01[x]}, {y10[x], y11[x]}};
    float t[16];
    winograd_grad_transform(dy, t);
    for (int xi = 0; xi < 16; ++xi) m[xi * xi_stride + x] = t[xi];
  }
}

// The filters' gradient from U's: G^T dU G for `count` filters, du[xi * xi_stride + x] → taps[(3r + s) * tap_stride + x]
// (the adjoint of transform_filters).
MANUALGRAD_VECTOR_CLONES void filter_grads(float* __restrict taps, const float* __restrict du, int64_t xi_stride,
                                           int64_t tap_stride, int64_t count) {
#pragma GCC ivdep
  for (int64_t x = 0; x < count; ++x) {
    float t[3][4];  // G^T dU
    for (int b = 0; b < 4; ++b) {
      const float d0 = du[b * xi_stride + x], d1 = du[(4 + b) * xi_stride + x], d2 = du[(8 + b) * xi_stride + x],
                  d3 = du[(12 + b) * xi_stride + x];
      t[0][b] = d0 + 0.5f * (d1 + d2);
      t[1][b] = 0.5f * (d1 - d2);
      t[2][b] = 0.5f * (d1 + d2) + d3;
    }
    for (int r = 0; r < 3; ++r) {
      taps[(3 * r) * tap_stride + x] = t[r][0] + 0.5f * (t[r][1] + t[r][2]);
      taps[(3 * r + 1) * tap_stride + x] = 0.5f * (t[r][1] - t[r][2]);
      taps[(3 * r + 2) * tap_stride + x] = 0.5f * (t[r][1] + t[r][2]) + t[r][3];
    }
  }
}

// Rows row0 .. row0 + rows - 1 of a (height, width) plane, split into even columns (col0 + 2x) and odd ones
// (col0 + 2x + 1), x < ld, row i at even/odd + i * ld; zero outside the plane, and everywhere for a null plane
// (a depth tap in the padding).
void split_columns(float* even, float* odd, int64_t ld, int rows, const float* plane, int64_t height, int64_t width,
                   int64_t row0, int64_t col0) {
  for (int i = 0; i < rows; ++i) {
    const int64_t h = row0 + i;
    const bool inside = plane && h >= 0 && h < height;
    for (int64_t x = 0; x < ld; ++x) {
      const int64_t w = col0 + 2 * x;
      even[i * ld + x] = inside && w >= 0 && w < width ? plane[h * width + w] : 0.f;
      odd[i * ld + x] = inside && w + 1 >= 0 && w + 1 < width ? plane[h * width + w + 1] : 0.f;
    }
  }
}

// One block of tile rows, computed in three steps, each over a range that the caller may split among threads.
class BlockWork {
 public:
  // The forward's operands (input, u, bias, output) or the weight gradient's (input, grad_output).
  struct Operands {
    const float* input = nullptr;
    const float* u = nullptr;
    const float* bias = nullptr;
    float* output = nullptr;
    const float* grad_output = nullptr;
  };
  // Allocates the block's scratch: V (16 · k · block_tiles), then M or dM (16 · out_c · block_tiles).
  BlockWork(const Plan& p, const Operands& o)
      : p_(p), input_(o.input), u_(o.u), bias_(o.bias), output_(o.output), grad_output_(o.grad_output),
        scratch_(at::empty({16 * (p.k() + p.out_c) * p.block_tiles()}, at::kFloat)), v_(scratch_.data_ptr<float>()),
        m_(v_ + 16 * p.k() * p.block_tiles()) {}

  void set_block(int64_t block) {
    first_row_ = block * p_.rows_per_block;
    rows_ = p_.rows_in(block);
  }
  int64_t tiles() const { return rows_ * p_.tiles_w; }
  // What the transforms' ranges count: V's rows (kd, c) or output channels in NCHW (each a plane), the block's tiles
  // in channels-last.
  int64_t input_units() const { return p_.nhwc ? tiles() : p_.k(); }
  int64_t output_units() const { return p_.nhwc ? tiles() : p_.out_c; }

  // V for input units [begin, end).
  void transform_input(int64_t begin, int64_t end) const {
    if (p_.nhwc) {
      transform_input_nhwc(begin, end);
    } else {
      transform_input_nchw(begin, end);
    }
  }
  // M[xi] = U[xi] V[xi] for xi in [xi0, xi1), in products of kChunk rows of V added in order.
  void multiply(int64_t xi0, int64_t xi1) const {
    const int64_t t = p_.block_tiles(), k = p_.k(), chunks = u_chunks(k);
    for (int64_t xi = xi0; xi < xi1; ++xi) {
      for (int64_t c = 0; c < chunks; ++c) {
        const float* u = u_ + (xi * chunks + c) * p_.out_c * kChunk;  // U[xi]'s columns [c kChunk, ...)
        const int64_t k0 = c * kChunk, kc = std::min(kChunk, k - k0);
        const float beta = c == 0 ? 0.f : 1.f;
        if (p_.nhwc) {  // M[xi] (tiles, C_out) = V[xi] (tiles, k) @ U[xi]^T
          gemm<float>(false, true, tiles(), p_.out_c, kc, 1.f, v_ + xi * t * k + k0, k, u, kChunk, beta,
                      m_ + xi * t * p_.out_c, p_.out_c);
        } else {  // M[xi] (C_out, tiles) = U[xi] @ V[xi] (k, tiles)
          gemm<float>(false, false, p_.out_c, tiles(), kc, 1.f, u, kChunk, v_ + (xi * k + k0) * t, t, beta,
                      m_ + xi * p_.out_c * t, t);
        }
      }
    }
  }
  // The outputs of output units [begin, end). Returns whether one of them is not finite.
  bool transform_output(int64_t begin, int64_t end) const {
    return p_.nhwc ? transform_output_nhwc(begin, end) : transform_output_nchw(begin, end);
  }

  // The weight gradient's dM for output units [begin, end), from the output gradient.
  void transform_grad_output(int64_t begin, int64_t end) const {
    if (p_.nhwc) {
      transform_grad_output_nhwc(begin, end);
    } else {
      transform_grad_output_nchw(begin, end);
    }
  }
  // dU[xi] (out_c, k) (+)= dM[xi] @ V[xi]^T over the block's tiles, for xi in [xi0, xi1).
  void multiply_weight(int64_t xi0, int64_t xi1, float* du, bool accumulate) const {
    const int64_t t = p_.block_tiles(), k = p_.k(), uc = p_.out_c * k;
    for (int64_t xi = xi0; xi < xi1; ++xi) {
      if (p_.nhwc) {  // dM[xi] (tiles, C_out), V[xi] (tiles, k)
        gemm<float>(true, false, p_.out_c, k, tiles(), 1.f, m_ + xi * t * p_.out_c, p_.out_c, v_ + xi * t * k, k,
                    accumulate ? 1.f : 0.f, du + xi * uc, k);
      } else {  // dM[xi] (C_out, tiles), V[xi] (k, tiles)
        gemm<float>(false, true, p_.out_c, k, tiles(), 1.f, m_ + xi * p_.out_c * t, t, v_ + xi * k * t, t,
                    accumulate ? 1.f : 0.f, du + xi * uc, k);
      }
    }
  }

 private:
  // V[xi][u][tile] for rows u = (kd, c) in [u0, u1): each tile from four input rows, its columns split by parity.
  void transform_input_nchw(int64_t u0, int64_t u1) const {
    const int64_t ld = p_.tiles_w + 1;
    for_each_tile_row(u0, u1, 4, -p_.pad_h, -p_.pad_w, ld,
                      [&](int64_t u, int64_t image) {
                        const int64_t j = p_.input_image(image, u / p_.in_c);
                        return j < 0 ? nullptr : input_plane(j, u % p_.in_c);
                      },
                      p_.in_h, p_.in_w,
                      [&](int64_t u, int64_t r, const float* even, const float* odd) {
                        input_tiles(v_ + u * p_.block_tiles() + r * p_.tiles_w, p_.k() * p_.block_tiles(), even, odd,
                                    ld, p_.tiles_w);
                      });
  }

  // Channel c of input image j (n * in_d + depth) in NC(D)HW: an (in_h, in_w) plane.
  const float* input_plane(int64_t j, int64_t c) const {
    return input_ + ((j / p_.in_d * p_.in_c + c) * p_.in_d + j % p_.in_d) * p_.in_h * p_.in_w;
  }
  // Channel k of output image i (n * out_d + od) of output-shaped NC(D)HW data: an (out_h, out_w) plane.
  template <typename T>
  T* output_plane(T* data, int64_t i, int64_t k) const {
    return data + ((i / p_.out_d * p_.out_c + k) * p_.out_d + i % p_.out_d) * p_.out_h * p_.out_w;
  }

  // For units [u0, u1) and each of the block's tile rows r (output image i, tile row ty): f(u, r, even, odd) with
  // `rows` rows of the (height, width) plane plane_of(u, i) from 2 ty + row_offset split by split_columns.
  template <typename Plane, typename F>
  void for_each_tile_row(int64_t u0, int64_t u1, int rows, int64_t row_offset, int64_t col0, int64_t ld,
                         const Plane& plane_of, int64_t height, int64_t width, const F& f) const {
    std::vector<float> split(2 * rows * ld);  // even columns, then odd ones
    for (int64_t u = u0; u < u1; ++u) {
      for (int64_t r = 0; r < rows_; ++r) {
        const int64_t image = (first_row_ + r) / p_.tiles_h, ty = (first_row_ + r) % p_.tiles_h;
        split_columns(split.data(), split.data() + rows * ld, ld, rows, plane_of(u, image), height, width,
                      2 * ty + row_offset, col0);
        f(u, r, split.data(), split.data() + rows * ld);
      }
    }
  }

  // The outputs of channels [k0, k1); whether one is not finite (a tile's dropped outputs count too).
  bool transform_output_nchw(int64_t k0, int64_t k1) const {
    const int64_t tw = p_.tiles_w, t = p_.block_tiles();
    std::vector<float> y(4 * tw);  // y00, y01, y10, y11 of one row of tiles
    bool bad = false;
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t r = 0; r < rows_; ++r) {
        const int64_t image = (first_row_ + r) / p_.tiles_h, ty = (first_row_ + r) % p_.tiles_h;
        output_tiles(y.data(), m_ + k * t + r * tw, p_.out_c * t, tw, bias_ ? bias_[k] : 0.f);
        bad |= any_not_finite(y.data(), 4 * tw);
        float* out = output_plane(output_, image, k);
        interleave(out + 2 * ty * p_.out_w, y.data(), y.data() + tw, p_.out_w);
        if (2 * ty + 1 < p_.out_h) interleave(out + (2 * ty + 1) * p_.out_w, y.data() + 2 * tw, y.data() + 3 * tw, p_.out_w);
      }
    }
    return bad;
  }

  // V[xi][tile][(kd, c)] for the block's tiles [t0, t1).
  void transform_input_nhwc(int64_t t0, int64_t t1) const {
    const std::vector<float> zeros(p_.in_c, 0.f);
    const float* d[16];
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t kd = 0; kd < p_.taps_d; ++kd) {
        const int64_t j = p_.input_image(tile_image(t), kd);
        tile_pixels(j < 0 ? nullptr : input_ + j * p_.in_h * p_.in_w * p_.in_c, p_.in_h, p_.in_w, p_.in_c, t, 4,
                    -p_.pad_h, -p_.pad_w, zeros.data(), d);
        input_vectors(v_ + t * p_.k() + kd * p_.in_c, p_.block_tiles() * p_.k(), d, p_.in_c);
      }
    }
  }

  // The output pixels of the block's tiles [t0, t1), all channels.
  bool transform_output_nhwc(int64_t t0, int64_t t1) const {
    std::vector<float> spare(p_.out_c), zeros(p_.out_c, 0.f);  // outputs beyond the image; no bias
    float* y[4];
    bool bad = false;
    for (int64_t t = t0; t < t1; ++t) {
      tile_pixels(image_pixels(output_, t), p_.out_h, p_.out_w, p_.out_c, t, 2, 0, 0, spare.data(), y);
      output_vectors(y, m_ + t * p_.out_c, p_.block_tiles() * p_.out_c, bias_ ? bias_ : zeros.data(), p_.out_c);
      for (float* pixel : y) bad |= any_not_finite(pixel, p_.out_c);
    }
    return bad;
  }

  // The output image of the block's tile t, and its first pixel in channels-last output-shaped data.
  int64_t tile_image(int64_t t) const { return (first_row_ + t / p_.tiles_w) / p_.tiles_h; }
  template <typename T>
  T* image_pixels(T* data, int64_t t) const { return data + tile_image(t) * p_.out_h * p_.out_w * p_.out_c; }

  // ptr[size * i + j] = pixel (2 ty + offset_h + i, 2 tx + offset_w + j) of the block's tile t in the channels-last
  // image (height, width, channels) at `image`, or `outside` where that lies beyond it (everywhere for a null image).
  template <typename T>
  void tile_pixels(T* image, int64_t height, int64_t width, int64_t channels, int64_t t, int size, int64_t offset_h,
                   int64_t offset_w, T* outside, T** ptr) const {
    const int64_t ty = (first_row_ + t / p_.tiles_w) % p_.tiles_h, tx = t % p_.tiles_w;
    for (int i = 0; i < size; ++i) {
      for (int j = 0; j < size; ++j) {
        const int64_t h = 2 * ty + offset_h + i, w = 2 * tx + offset_w + j;
        const bool inside = image && h >= 0 && h < height && w >= 0 && w < width;
        ptr[size * i + j] = inside ? image + (h * width + w) * channels : outside;
      }
    }
  }

  // dM[xi][k][tile] for output channels [k0, k1): each tile from two gradient rows, its columns split by parity.
  void transform_grad_output_nchw(int64_t k0, int64_t k1) const {
    const int64_t ld = p_.tiles_w;
    for_each_tile_row(k0, k1, 2, 0, 0, ld,
                      [&](int64_t k, int64_t image) { return output_plane(grad_output_, image, k); },
                      p_.out_h, p_.out_w,
                      [&](int64_t k, int64_t r, const float* even, const float* odd) {
                        grad_tiles(m_ + k * p_.block_tiles() + r * p_.tiles_w, p_.out_c * p_.block_tiles(), even, odd,
                                   ld, p_.tiles_w);
                      });
  }

  // dM[xi][tile][k] for the block's tiles [t0, t1).
  void transform_grad_output_nhwc(int64_t t0, int64_t t1) const {
    const std::vector<float> zeros(p_.out_c, 0.f);
    const float* y[4];
    for (int64_t t = t0; t < t1; ++t) {
      tile_pixels(image_pixels(grad_output_, t), p_.out_h, p_.out_w, p_.out_c, t, 2, 0, 0, zeros.data(), y);
      grad_vectors(m_ + t * p_.out_c, p_.block_tiles() * p_.out_c, y, p_.out_c);
    }
  }

  const Plan& p_;
  const float* input_;
  const float* u_;
  const float* bias_;
  float* output_;
  const float* grad_output_;
  at::Tensor scratch_;
  float* v_;
  float* m_;
  int64_t first_row_ = 0, rows_ = 0;
};

// output = the convolution of input with the transformed weights u (transform_weights), + bias (may be null).
// Returns whether every output is finite (dropped outputs of a tile may count too: they can only cause a needless
// fallback); where one is not, the caller computes the convolution another way (winograd_forward_cpu).
bool winograd_conv(float* output, const float* input, const float* u, const float* bias, const Plan& p) {
  std::atomic<bool> bad{false};  // only ever set: the same result whichever task sets it
  if (p.blocks() >= 2 * at::get_num_threads()) {  // enough blocks: each task computes whole blocks
    parallel_tasks(p.blocks(), [&](int64_t begin, int64_t end) {
      BlockWork work(p, {input, u, bias, output});
      for (int64_t block = begin; block < end; ++block) {
        work.set_block(block);
        work.transform_input(0, work.input_units());
        work.multiply(0, 16);
        if (work.transform_output(0, work.output_units())) bad.store(true, std::memory_order_relaxed);
      }
    });
    return !bad.load();
  }
  // Few blocks (small images): the threads share each block's steps.
  BlockWork work(p, {input, u, bias, output});
  for (int64_t block = 0; block < p.blocks(); ++block) {
    work.set_block(block);
    parallel_tasks(work.input_units(), [&](int64_t u0, int64_t u1) { work.transform_input(u0, u1); });
    parallel_tasks(16, [&](int64_t xi0, int64_t xi1) { work.multiply(xi0, xi1); });
    parallel_tasks(work.output_units(), [&](int64_t u0, int64_t u1) {
      if (work.transform_output(u0, u1)) bad.store(true, std::memory_order_relaxed);
    });
  }
  return !bad.load();
}

// The weight gradient into grad_weight (C_out, C_in, KD, 3, 3), any strides: dU[xi] = the sum over every tile of
// dM[xi] V[xi]^T, then G^T dU G. With many blocks, slot s sums blocks s, s + slots, ... in order (one task each)
// and the slots are added in slot order; with few, the threads share each block's steps and one dU. Which of the
// two, and the number of slots, follow from the shapes alone. Returns whether every entry is finite (as
// winograd_conv).
bool winograd_weight_grad(at::Tensor& grad_weight, const float* input, const float* grad_output, const Plan& p) {
  const int64_t uc = p.out_c * p.k();
  const int64_t slots = p.blocks() < kMinSlotBlocks ? 1 : std::max<int64_t>(1, std::min(kMaxSlots, kMaxSlotElems / (16 * uc)));
  at::Tensor du = at::empty({slots, 16, p.out_c, p.k()}, at::kFloat);
  const BlockWork::Operands operands{input, nullptr, nullptr, nullptr, grad_output};
  if (slots > 1) {
    parallel_tasks(slots, [&](int64_t begin, int64_t end) {
      BlockWork work(p, operands);
      for (int64_t slot = begin; slot < end; ++slot) {
        for (int64_t block = slot; block < p.blocks(); block += slots) {
          work.set_block(block);
          work.transform_input(0, work.input_units());
          work.transform_grad_output(0, work.output_units());
          work.multiply_weight(0, 16, du[slot].data_ptr<float>(), block != slot);
        }
      }
    });
    for (int64_t slot = 1; slot < slots; ++slot) du[0].add_(du[slot]);
  } else {
    BlockWork work(p, operands);
    for (int64_t block = 0; block < p.blocks(); ++block) {
      work.set_block(block);
      parallel_tasks(work.input_units(), [&](int64_t u0, int64_t u1) { work.transform_input(u0, u1); });
      parallel_tasks(work.output_units(), [&](int64_t u0, int64_t u1) { work.transform_grad_output(u0, u1); });
      parallel_tasks(16, [&](int64_t xi0, int64_t xi1) { work.multiply_weight(xi0, xi1, du[0].data_ptr<float>(), block > 0); });
    }
  }
  // G^T dU G, written into the weight's layout (any strides) run by run
  const Filters f(grad_weight, /*input_gradient=*/false);
  const float* sum = du.const_data_ptr<float>();
  float* out = grad_weight.data_ptr<float>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, p.out_c, 1, [&](int64_t begin, int64_t end) {
    float taps[9 * kChunk];
    int64_t first[kChunk];
    bool seen = false;
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t kk0 = 0; kk0 < p.k(); kk0 += kChunk) {
        const int64_t count = std::min(kChunk, p.k() - kk0);
        filter_grads(taps, sum + o * p.k() + kk0, uc, kChunk, count);
        for (int t = 0; t < 9; ++t) seen |= any_not_finite(taps + t * kChunk, count);
        f.run(o, kk0, count, first);
        for (int64_t j = 0; j < count; ++j) {
          for (int t = 0; t < 9; ++t) out[first[j] + f.tap[t]] = taps[t * kChunk + j];
        }
      }
    }
    if (seen) bad.store(true, std::memory_order_relaxed);
  });
  return !bad.load();
}

}  // namespace

namespace {

bool winograd_setting_is(const char* value) {
  const char* choice = std::getenv("TORCH_MANUALGRAD_WINOGRAD");
  return choice && std::string(choice) == value;
}

}  // namespace

bool winograd_switched_off() { return winograd_setting_is("0"); }
bool winograd_forced_on() { return winograd_setting_is("1"); }

bool winograd_applies(const at::Tensor& input, const Geometry& g, bool backward) {
  const Window& w = g.win;
  if (winograd_switched_off()) return false;
  // 3-d: stride 1 in depth too, and a padding the input gradient takes, so that all three are computed here.
  // (Depth padding and dilation within the input's depth keep the depth index arithmetic far from overflow.)
  const bool planes = g.spatial_dims == 2 ? input.dim() == 4
                                          : g.spatial_dims == 3 && input.dim() == 5 && w.stride_d == 1 && w.pad_h <= 2 &&
                                                w.pad_w <= 2 && w.pad_d <= g.in_d &&
                                                (w.kernel_d == 1 || w.dilation_d <= g.in_d);
  if (input.scalar_type() != at::kFloat || !planes || g.empty() || g.groups != 1 ||
      w.kernel_h != 3 || w.kernel_w != 3 || w.stride_h != 1 || w.stride_w != 1 || w.dilation_h != 1 ||
      w.dilation_w != 1 || g.in_channels < kMinChannels || g.out_channels < kMinChannels ||
      (backward && (w.pad_h > 2 || w.pad_w > 2)))
    return false;
  const int64_t side = std::min(g.out_h, g.out_w);
  if (side >= kWideSide) return true;
  if (side < kMinSide) return false;
  // Below kWideSide a 2-d input gradient with few channels is im2col's: there Winograd's took 1.6-1.9x torch's time,
  // im2col's 0.9-1.3x (7x7 to 12x12, 2-core Zen 4, batch 8; 64 -> 64 at 7x7 channels-last 1.89 -> 1.03).
  if (g.in_channels + g.out_channels <= kMaxChannelSum) return !(backward && g.spatial_dims == 2);
  // Many channels on small images (ResNet's 512 -> 512 at 7x7): all three, once the batch has kManyChannelTiles
  // tiles. (2-d only: not measured in 3-d.)
  return g.spatial_dims == 2 && g.batch * ceil_div(g.out_h, 2) * ceil_div(g.out_w, 2) >= kManyChannelTiles;
}

namespace {

at::MemoryFormat layout_of(const Geometry& g, bool nhwc) {
  if (!nhwc) return at::MemoryFormat::Contiguous;
  return g.spatial_dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

}  // namespace

at::Tensor winograd_forward_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                const Geometry& g, bool channels_last) {
  const Plan p = Plan::forward(g, channels_last || !nchw_pays(g));
  const at::Tensor x = input.contiguous(layout_of(g, p.nhwc));
  at::Tensor output = at::empty(g.output_shape(g.out_channels), input.options().memory_format(layout_of(g, p.nhwc)));
  const at::Tensor u = transform_weights(weight, /*input_gradient=*/false);
  if (!winograd_conv(output.data_ptr<float>(), x.const_data_ptr<float>(), u.const_data_ptr<float>(),
                     bias.defined() ? bias.const_data_ptr<float>() : nullptr, p))
    return at::Tensor();
  return output.contiguous(layout_of(g, channels_last));
}

void winograd_tile_filters(float* u, int64_t xi_stride, const float* taps, int64_t tap_stride, int64_t count) {
  transform_filters(u, xi_stride, taps, tap_stride, count);
}
void winograd_tile_filter_grads(float* taps, const float* du, int64_t xi_stride, int64_t tap_stride, int64_t count) {
  filter_grads(taps, du, xi_stride, tap_stride, count);
}

std::pair<at::Tensor, at::Tensor> winograd_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& weight, const Geometry& g,
                                                        bool channels_last, bool want_input, bool want_weight) {
  const bool nhwc = channels_last || !nchw_pays(g);
  at::Tensor grad_input, grad_weight;
  if (!want_input && !want_weight) return {grad_input, grad_weight};
  const at::Tensor go = grad_output.contiguous(layout_of(g, nhwc));  // once for both gradients
  if (want_input) {
    // A convolution of grad_output (C_out channels) into grad_input (C_in) with the flipped, transposed filters.
    const Plan p = Plan::input_gradient(g, nhwc);
    grad_input = at::empty(input.sizes(), grad_output.options().memory_format(layout_of(g, nhwc)));
    const at::Tensor u = transform_weights(weight, /*input_gradient=*/true);
    if (winograd_conv(grad_input.data_ptr<float>(), go.const_data_ptr<float>(), u.const_data_ptr<float>(), nullptr, p))
      grad_input = grad_input.contiguous(layout_of(g, channels_last));
    else
      grad_input = at::Tensor();
  }
  if (want_weight) {
    const Plan p = Plan::forward(g, nhwc);
    const at::Tensor x = input.contiguous(layout_of(g, nhwc));
    grad_weight = at::empty(weight.sizes(), input.options().memory_format(layout_of(g, channels_last)));
    if (!winograd_weight_grad(grad_weight, x.const_data_ptr<float>(), go.const_data_ptr<float>(), p))
      grad_weight = at::Tensor();
  }
  return {grad_input, grad_weight};
}

}  // namespace manualgrad
