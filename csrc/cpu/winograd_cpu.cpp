// winograd_cpu.cpp — 3x3 stride-1 float32 convolutions (forward and input gradient) by Winograd's F(2x2, 3x3).
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
// Deterministic: the blocks of tiles are cut from the shapes alone, every output element is one fixed sequence
// of BLAS calls and transforms, whichever thread runs it, so results are the same at every thread count.
#include "winograd_cpu.h"

#include "blas.h"
#include "tasks.h"
#include "vectorize.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

namespace manualgrad {
namespace {

// Where it pays, measured against the im2col kernels (interleaved, 2-core Zen 5, OpenBLAS, batch 8; forward and
// input gradient): 0.4-0.6x the time at 56x56 and 112x112, 0.65-0.86x at 28x28 and at 14x14 with 128 -> 32
// channels; at 7x7 1.3-2.8x (a tile of 2x2 wastes a quarter of 8x8, and the transforms of 16 small planes
// outweigh the products), and with 256 -> 256 channels 0.93-1.15x (16 (C_in + C_out) floats per tile of
// transforms overflow the caches).
constexpr int64_t kMinChannels = 16;   // fewer input or output channels: the transforms outweigh the products
constexpr int64_t kMinOutputSide = 14;
constexpr int64_t kMaxChannelSum = 384;  // C_in + C_out
constexpr int64_t kChunk = 32;         // input channels per product (accuracy, above)
constexpr int64_t kBlockTiles = 256;   // tiles per block: its V and M stay in the caches while its products run

// One convolution in Winograd's terms: `in_c` channels of (in_h, in_w) → `out_c` of (out_h, out_w).
struct Plan {
  int64_t batch, in_c, out_c, in_h, in_w, out_h, out_w, pad_h, pad_w;
  int64_t tiles_h, tiles_w;   // 2x2 output tiles down and across an image
  int64_t rows_per_block;     // tile rows (one image's row of tiles_w tiles) per block; blocks may span images

  Plan(int64_t batch, int64_t in_c, int64_t out_c, int64_t in_h, int64_t in_w, int64_t pad_h, int64_t pad_w)
      : batch(batch), in_c(in_c), out_c(out_c), in_h(in_h), in_w(in_w), out_h(in_h + 2 * pad_h - 2),
        out_w(in_w + 2 * pad_w - 2), pad_h(pad_h), pad_w(pad_w), tiles_h(ceil_div(out_h, 2)),
        tiles_w(ceil_div(out_w, 2)), rows_per_block(std::max<int64_t>(1, kBlockTiles / tiles_w)) {}
  int64_t tile_rows() const { return batch * tiles_h; }
  int64_t blocks() const { return ceil_div(tile_rows(), rows_per_block); }
  int64_t block_tiles() const { return rows_per_block * tiles_w; }  // V's and M's row length
  int64_t rows_in(int64_t block) const { return std::min(rows_per_block, tile_rows() - block * rows_per_block); }
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

// U (16, outs, ins) from filters (3, 3, outs, ins): tap-major, so that transform_filters reads each tap's run.
at::Tensor transform_weights(const at::Tensor& taps) {
  const int64_t outs = taps.size(2), ins = taps.size(3);
  at::Tensor u = at::empty({16, outs, ins}, taps.options());
  const float* w = taps.const_data_ptr<float>();
  float* out = u.data_ptr<float>();
  at::parallel_for(0, outs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) transform_filters(out + o * ins, outs * ins, w + o * ins, outs * ins, ins);
  });
  return u;
}

// V for one row of `count` tiles of one channel: v[xi * xi_stride + x] = (B^T d B)[a][b] of tile x, whose input
// columns are even[x], odd[x], even[x + 1], odd[x + 1] of the four input rows (row r at even/odd + r * ld).
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]. Vectorised over the tiles.
MANUALGRAD_VECTOR_CLONES void input_tiles(float* __restrict v, int64_t xi_stride, const float* __restrict even,
                                          const float* __restrict odd, int64_t ld, int64_t count) {
#pragma GCC ivdep  // the planes never overlap (xi_stride >= count); without it GCC gives up on 16 alias checks
  for (int64_t x = 0; x < count; ++x) {
    float r[4][4];  // d B, row by row
    for (int i = 0; i < 4; ++i) {
      const float e0 = even[i * ld + x], o0 = odd[i * ld + x], e1 = even[i * ld + x + 1], o1 = odd[i * ld + x + 1];
      r[i][0] = e0 - e1;
      r[i][1] = o0 + e1;
      r[i][2] = e1 - o0;
      r[i][3] = o0 - o1;
    }
    for (int b = 0; b < 4; ++b) {
      v[(0 + b) * xi_stride + x] = r[0][b] - r[2][b];
      v[(4 + b) * xi_stride + x] = r[1][b] + r[2][b];
      v[(8 + b) * xi_stride + x] = r[2][b] - r[1][b];
      v[(12 + b) * xi_stride + x] = r[1][b] - r[3][b];
    }
  }
}

// The 2x2 outputs of `count` tiles from M (m[xi * xi_stride + x]), plus bias: A^T = [1 1 1 0; 0 1 -1 -1].
// y[p][q] goes to out[p * count + ... ] as four planes: y00[x], y01[x], y10[x], y11[x] at out + k * count.
MANUALGRAD_VECTOR_CLONES void output_tiles(float* __restrict out, const float* __restrict m, int64_t xi_stride,
                                           int64_t count, float bias) {
#pragma GCC ivdep  // the planes never overlap (xi_stride >= count); without it GCC gives up on 16 alias checks
  for (int64_t x = 0; x < count; ++x) {
    float s[2][4];  // A^T M
    for (int b = 0; b < 4; ++b) {
      const float m0 = m[b * xi_stride + x], m1 = m[(4 + b) * xi_stride + x], m2 = m[(8 + b) * xi_stride + x],
                  m3 = m[(12 + b) * xi_stride + x];
      s[0][b] = m0 + m1 + m2;
      s[1][b] = m1 - m2 - m3;
    }
    for (int p = 0; p < 2; ++p) {
      out[(2 * p) * count + x] = s[p][0] + s[p][1] + s[p][2] + bias;
      out[(2 * p + 1) * count + x] = s[p][1] - s[p][2] - s[p][3] + bias;
    }
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

// One block of tile rows, computed in three steps, each over a range that the caller may split among threads.
class BlockWork {
 public:
  BlockWork(const Plan& p, const float* input, const float* u, const float* bias, float* output, float* v, float* m)
      : p_(p), input_(input), u_(u), bias_(bias), output_(output), v_(v), m_(m) {}

  void set_block(int64_t block) {
    first_row_ = block * p_.rows_per_block;
    rows_ = p_.rows_in(block);
  }
  int64_t tiles() const { return rows_ * p_.tiles_w; }

  // V[xi][c][tile] for channels [c0, c1).
  void transform_input(int64_t c0, int64_t c1) const {
    const int64_t ld = p_.tiles_w + 1, stride = p_.in_c * p_.block_tiles();
    std::vector<float> rows(8 * ld);  // four input rows, even columns then odd, zero in the padding
    float* even = rows.data();
    float* odd = rows.data() + 4 * ld;
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = 0; r < rows_; ++r) {
        const int64_t n = (first_row_ + r) / p_.tiles_h, ty = (first_row_ + r) % p_.tiles_h;
        const float* plane = input_ + (n * p_.in_c + c) * p_.in_h * p_.in_w;
        for (int i = 0; i < 4; ++i) {
          const int64_t ih = 2 * ty - p_.pad_h + i;
          const bool inside = ih >= 0 && ih < p_.in_h;
          for (int64_t x = 0; x < ld; ++x) {
            const int64_t iw = 2 * x - p_.pad_w;
            even[i * ld + x] = inside && iw >= 0 && iw < p_.in_w ? plane[ih * p_.in_w + iw] : 0.f;
            odd[i * ld + x] = inside && iw + 1 >= 0 && iw + 1 < p_.in_w ? plane[ih * p_.in_w + iw + 1] : 0.f;
          }
        }
        input_tiles(v_ + c * p_.block_tiles() + r * p_.tiles_w, stride, even, odd, ld, p_.tiles_w);
      }
    }
  }

  // M[xi] = U[xi] @ V[xi] for xi in [xi0, xi1), in products of kChunk input channels added in order.
  void multiply(int64_t xi0, int64_t xi1) const {
    const int64_t t = p_.block_tiles();
    for (int64_t xi = xi0; xi < xi1; ++xi) {
      for (int64_t c = 0; c < p_.in_c; c += kChunk) {
        gemm<float>(false, false, p_.out_c, tiles(), std::min(kChunk, p_.in_c - c), 1.f, u_ + xi * p_.out_c * p_.in_c + c,
                    p_.in_c, v_ + (xi * p_.in_c + c) * t, t, c == 0 ? 0.f : 1.f, m_ + xi * p_.out_c * t, t);
      }
    }
  }

  // The outputs of channels [k0, k1).
  void transform_output(int64_t k0, int64_t k1) const {
    const int64_t tw = p_.tiles_w, t = p_.block_tiles();
    std::vector<float> y(4 * tw);  // y00, y01, y10, y11 of one row of tiles
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t r = 0; r < rows_; ++r) {
        const int64_t n = (first_row_ + r) / p_.tiles_h, ty = (first_row_ + r) % p_.tiles_h;
        output_tiles(y.data(), m_ + k * t + r * tw, p_.out_c * t, tw, bias_ ? bias_[k] : 0.f);
        float* plane = output_ + (n * p_.out_c + k) * p_.out_h * p_.out_w;
        interleave(plane + 2 * ty * p_.out_w, y.data(), y.data() + tw, p_.out_w);
        if (2 * ty + 1 < p_.out_h) interleave(plane + (2 * ty + 1) * p_.out_w, y.data() + 2 * tw, y.data() + 3 * tw, p_.out_w);
      }
    }
  }

 private:
  const Plan& p_;
  const float* input_;
  const float* u_;
  const float* bias_;
  float* output_;
  float* v_;
  float* m_;
  int64_t first_row_ = 0, rows_ = 0;
};

// output = the convolution of input with the transformed weights u (16, out_c, in_c), + bias (may be null).
void winograd_conv(float* output, const float* input, const float* u, const float* bias, const Plan& p) {
  const int64_t scratch = 16 * (p.in_c + p.out_c) * p.block_tiles();
  const auto buffers = [&](at::Tensor& s) {
    return std::pair{s.data_ptr<float>(), s.data_ptr<float>() + 16 * p.in_c * p.block_tiles()};
  };
  if (p.blocks() >= 2 * at::get_num_threads()) {  // enough blocks: each task computes whole blocks
    parallel_tasks(p.blocks(), [&](int64_t begin, int64_t end) {
      at::Tensor s = at::empty({scratch}, at::kFloat);
      const auto [v, m] = buffers(s);
      BlockWork work(p, input, u, bias, output, v, m);
      for (int64_t block = begin; block < end; ++block) {
        work.set_block(block);
        work.transform_input(0, p.in_c);
        work.multiply(0, 16);
        work.transform_output(0, p.out_c);
      }
    });
    return;
  }
  // Few blocks (small images): the threads share each block's steps.
  at::Tensor s = at::empty({scratch}, at::kFloat);
  const auto [v, m] = buffers(s);
  BlockWork work(p, input, u, bias, output, v, m);
  for (int64_t block = 0; block < p.blocks(); ++block) {
    work.set_block(block);
    parallel_tasks(p.in_c, [&](int64_t c0, int64_t c1) { work.transform_input(c0, c1); });
    parallel_tasks(16, [&](int64_t xi0, int64_t xi1) { work.multiply(xi0, xi1); });
    parallel_tasks(p.out_c, [&](int64_t k0, int64_t k1) { work.transform_output(k0, k1); });
  }
}

}  // namespace

bool winograd_applies(const at::Tensor& input, const Geometry& g, bool backward) {
  const Window& w = g.win;
  const char* choice = std::getenv("TORCH_MANUALGRAD_WINOGRAD");
  if (choice && std::string(choice) == "0") return false;
  return input.scalar_type() == at::kFloat && g.spatial_dims == 2 && input.dim() == 4 && !g.empty() && g.groups == 1 &&
         w.kernel_h == 3 && w.kernel_w == 3 && w.stride_h == 1 && w.stride_w == 1 && w.dilation_h == 1 &&
         w.dilation_w == 1 && g.in_channels >= kMinChannels && g.out_channels >= kMinChannels &&
         g.in_channels + g.out_channels <= kMaxChannelSum && g.out_h >= kMinOutputSide && g.out_w >= kMinOutputSide &&
         (!backward || (w.pad_h <= 2 && w.pad_w <= 2));
}

void winograd_forward_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                          const Geometry& g) {
  const Plan p(g.batch, g.in_channels, g.out_channels, g.in_h, g.in_w, g.win.pad_h, g.win.pad_w);
  const at::Tensor u = transform_weights(weight.permute({2, 3, 0, 1}).contiguous());  // taps of (C_out, C_in)
  winograd_conv(output.data_ptr<float>(), input.const_data_ptr<float>(), u.const_data_ptr<float>(),
                bias.defined() ? bias.const_data_ptr<float>() : nullptr, p);
}

void winograd_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                                 const Geometry& g) {
  // A convolution of grad_output (C_out channels) into grad_input (C_in) with the flipped, transposed filters.
  const Plan p(g.batch, g.out_channels, g.in_channels, g.out_h, g.out_w, 2 - g.win.pad_h, 2 - g.win.pad_w);
  const at::Tensor u = transform_weights(weight.flip({2, 3}).permute({2, 3, 1, 0}).contiguous());  // of (C_in, C_out)
  winograd_conv(grad_input.data_ptr<float>(), grad_output.const_data_ptr<float>(), u.const_data_ptr<float>(), nullptr, p);
}

}  // namespace manualgrad
