// conv_cpu.cpp — convolution forward and backward on the CPU; 1-d runs as 2-d of height 1. 3-d in NCDHW runs
// the same NCHW kernels, whose im2col and col2im walk volumes (a column holds all KD*KH*KW taps, so one GEMM
// has K = C*KD*KH*KW); a channels_last_3d or depthwise 3-d convolution is a sum of 2-d ones over the kernel's
// depth taps (depth_taps.h), which keeps the NHWC and depthwise kernels and their layouts. Float32 3x3
// stride-1 convolutions, 2-d and 3-d in either layout, go to Winograd (winograd_cpu.cpp); grouped ones with few
// channels a group, 1-d and 2-d in either layout, to the direct kernels of grouped_cpu.cpp. (For 3x3x3 over
// 32 channels at 64^3 the volume im2col took 0.75x the time of the depth taps forward; channels_last_3d inputs
// through NCDHW copies took 1.1-1.6x the taps' time.)
//   forward:      columns = im2col(input[n]);  output[n, g] = weight[g] @ columns[g] (+ bias)
//   grad_weight:  sum over images of grad_output[n, g] @ columns[g]^T — every placement of the kernel
//                 adds input slice × its output delta
//   grad_input:   grad_columns[g] = weight[g]^T @ grad_output[n, g], then col2im adds each placement's
//                 slice back into the image
//   grad_bias:    the sum of the output deltas
// Matrix products are BLAS's (blas.h: OpenBLAS, or torch's); im2col, col2im and the split of the work are ours.
// Deterministic by construction: tasks are cut from the shapes alone (never from the thread count),
// each task runs its BLAS calls single-threaded (SequentialBlas), and partial weight gradients are
// summed in a fixed order — so results are bit-identical on every run and every thread count.
#include "../depth_taps.h"
#include "../shape_checks.h"
#include "blas.h"
#include "depthwise_cpu.h"
#include "grouped_cpu.h"
#include "tasks.h"
#include "vectorize.h"
#include "winograd_cpu.h"

#include <ATen/Parallel.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace manualgrad {
namespace {

constexpr int64_t kMinTasks = 8;               // spread a small batch over tiles so all cores work
constexpr int64_t kMinTileColumns = 256;       // ...but keep each GEMM wide enough to run fast
constexpr int64_t kMinEvenTileColumns = 64;    // ...or this wide, to even out an odd number of tasks (even_tasks)
constexpr int64_t kBlockColumns = 512;         // small images are grouped until a GEMM is this wide
constexpr int64_t kMinBlocks = 4;              // ...as long as the batch still makes this many tasks
// ...except pointwise images of this many positions and more, multiplied where they lie: gathering 14x14 images
// into blocks cost more than the wider GEMMs saved (1x1 convolutions at 14x14, batch 8, 2-core Xeon: forward
// 0.68-0.91x the time, input gradient 0.25-0.82x, weight gradient 0.69-0.88x); at 7x7 the gathered blocks win
// (per-image weight gradients of 2048->512 took 4.6x as long).
constexpr int64_t kPointwiseInPlace = 128;
constexpr int64_t kMaxColumnElems = 1 << 22;   // one task's column workspace (4M elements)
constexpr int64_t kCacheColumnElems = 1 << 18;  // the forward's tile of a large image: 1 MB of float32 columns
constexpr int64_t kMinCacheTileColumns = 512;   // ...unless that would make its GEMM narrower than this
constexpr int64_t kMaxPartialElems = 1 << 24;  // all partial weight gradients together
constexpr int64_t kMaxSlots = 8;
constexpr int64_t kMinWeightRows = 128;         // output channels per task of output_channel_split
constexpr int64_t kMinColumnRows = 512;         // the columns' rows (taps of input channels) per weight-gradient task
constexpr int64_t kMinChannelTaskChannels = 32;  // input channels from which a batch of one's NHWC input gradient
                                                 // splits them (conv_backward_input_nhwc)
constexpr int64_t kMinOddTaskChannels = 256;     // ...and a batch of an odd number of tasks under kMinTasks

// Cuts `extent` items into pieces of `size` (the last may be shorter): `wanted` pieces of at least
// `min_size` items if possible, else a power of two of them (so that 2, 4 or 8 threads share them evenly: 3 tiles
// of a 28x28 image left one of 2 threads idle a third of the time, 1x1 convolutions 1.4x torch's at batch 1), and
// never fewer than `forced`. Depends on shapes only.
struct Split {
  int64_t size, count;
};
Split split(int64_t extent, int64_t wanted, int64_t min_size, int64_t forced) {
  int64_t count = std::min(wanted, std::max<int64_t>(1, extent / min_size));
  if (count < wanted) count = int64_t{1} << (63 - __builtin_clzll(static_cast<uint64_t>(count)));
  count = std::min(std::max(count, forced), extent);
  const int64_t size = ceil_div(extent, std::max<int64_t>(count, 1));
  return {size, ceil_div(extent, size)};
}

// One task's share of the batch: images [n0, n0 + images) and, in each, output positions [p0, p1).
// Large images are cut into position tiles (images == 1); small ones are grouped, whole, so that
// one GEMM covers several of them. Its columns are (rows, images * (p1 - p0)), image k at k*(p1-p0).
struct Block {
  int64_t n0, images, p0, p1;
  int64_t width() const { return images * (p1 - p0); }
};

struct Blocking {
  int64_t images, tile, tiles_per_image, count;
  Block operator[](int64_t t) const {
    const int64_t n0 = (t / tiles_per_image) * images;
    const int64_t p0 = (t % tiles_per_image) * tile;
    return {n0, images, p0, p0 + tile};
  }
};

// allow_tiles=false keeps every image whole (col2im into an image must stay within one task).
// cache_tiles (the forward and the weight gradient) also cuts a large image into tiles whose columns
// fit the L2 cache, so that the GEMM reads them back from there rather than from memory: im2col writes
// the columns and one GEMM reads them, so nothing is gained by writing more than the cache holds first.
// Tiles narrower than kMinCacheTileColumns cost more in GEMM speed than that saves (benchmarks/NOTES.md).
Blocking make_blocking(const Geometry& g, bool allow_tiles, bool cache_tiles = false) {
  const GroupDims d(g);
  const int64_t rows = g.in_channels * d.taps;
  int64_t images = std::min(ceil_div(kBlockColumns, d.positions), std::max<int64_t>(1, g.batch / kMinBlocks));
  if (is_pointwise(g) && d.positions >= kPointwiseInPlace) images = 1;  // the images as they lie, no gathered copy
  images = std::max<int64_t>(1, std::min(images, kMaxColumnElems / std::max<int64_t>(1, rows * d.positions)));
  // A block holds a whole number of images; the last block's may be fewer (see clamp_block).
  Blocking b{images, d.positions, 1, ceil_div(g.batch, images)};
  if (images == 1 && allow_tiles) {
    int64_t forced = ceil_div(rows * d.positions, kMaxColumnElems);
    if (cache_tiles && !is_pointwise(g))  // a pointwise GEMM reads the images themselves: no columns
      forced = std::max(forced, std::min(ceil_div(rows * d.positions, kCacheColumnElems), d.positions / kMinCacheTileColumns));
    const Split tiles = split(d.positions, ceil_div(kMinTasks, g.batch), kMinTileColumns, forced);
    b.tile = tiles.size;
    b.tiles_per_image = tiles.count;
    b.count = g.batch * tiles.count;
  }
  return b;
}

// The forward's blocking with an even number of tasks where make_blocking's is odd and under 2 * kMinTasks: those
// share unevenly among 2 or 4 threads, one image's product left for one thread at the end (1x1 512->1024@14 at
// batch 3, one tile an image: 1.44x torch's time). Each image of one tile is then cut into two, where they keep
// kMinEvenTileColumns positions at least. Depends on shapes only.
Blocking even_tasks(Blocking b, const Geometry& g) {
  if (b.count % 2 == 0 || b.count >= 2 * kMinTasks || b.images != 1 || b.tiles_per_image != 1) return b;
  const int64_t positions = GroupDims(g).positions, size = ceil_div(positions, 2);
  if (size < kMinEvenTileColumns) return b;
  b.tile = size;
  b.tiles_per_image = ceil_div(positions, size);
  b.count = g.batch * b.tiles_per_image;
  return b;
}

// Whether every image's columns together fit one task's workspace (small images, as in a network's
// last stages): the backward then treats the batch as one block, so each GEMM sees every placement.
bool columns_fit_once(const Geometry& g) {
  const int64_t width = g.batch * g.out_positions();  // no larger than the output, so no overflow here
  return width == 0 || g.in_channels * g.win.taps() <= kMaxColumnElems / width;
}

// Whether the backward takes the whole batch as one block (columns_fit_once). Not a pointwise convolution of
// images of at least kPointwiseInPlace positions: its GEMMs read grad_output and the input in place, image by
// image, and are wide enough already, where one block would first gather both into copies (1x1 64->256 @56,
// batch 8: 25 MB of grad_output copied, and the input gradient scattered back, 5x the time of the products). A batch
// of one is read in place either way: where its image is one tile of make_blocking's (one task), one block lets the
// tasks split the channels (1x1 256->1024@14 weight gradient: 1.03 -> 0.55 ms, torch's 0.57).
bool whole_batch_backward(const Geometry& g) {
  const bool one_tile = g.batch == 1 && make_blocking(g, /*allow_tiles=*/true).count < 2;
  return columns_fit_once(g) && !(is_pointwise(g) && g.out_positions() >= kPointwiseInPlace && !one_tile);
}

// The split of a product by channel, `per_group` of them in each of `groups` (output channels for the small-image
// forward, input channels for the pointwise input gradient of few rows, rows of the columns for the small-image
// weight gradient): tasks of at least `least` channels of one group each, two tasks in all at least, whatever the
// threads.
Split channel_split(int64_t per_group, int64_t groups, int64_t least = kMinWeightRows) {
  return split(per_group, ceil_div(kMinTasks, groups), least, ceil_div(2, groups));
}
Split output_channel_split(const Geometry& g) { return channel_split(GroupDims(g).out_per_group, g.groups); }

// f(group, first channel, count) for each task of channel_split(per_group, groups, least), in parallel.
template <typename F>
void channel_tasks(int64_t per_group, int64_t groups, const F& f, int64_t least = kMinWeightRows) {
  const Split rows = channel_split(per_group, groups, least);
  parallel_tasks(groups * rows.count, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / rows.count, r0 = (task % rows.count) * rows.size;
      f(grp, grp * per_group + r0, std::min(rows.size, per_group - r0));
    }
  });
}
template <typename F>
void output_channel_tasks(const Geometry& g, const F& f) {
  channel_tasks(GroupDims(g).out_per_group, g.groups, f);
}

// Whether a forward product over `width` placements is better split by output channel than by placement, as
// `placement_tasks` tasks. Each task's BLAS call packs (copies) all of its other operand: split by placement, every
// task packs the whole weight; by channel, every task packs all the columns. The split that packs fewer elements
// wins, and one that leaves a single task never does. Interleaved on a 2-core Zen 4 (forward, batch 8 unless
// said, ours/torch), channel split against placement split: 1x1/2 1024->2048@14 1.08 -> 1.03, 1x1 2048->512@7
// 1.17 -> 1.07, 3x3 512@7 a tie (1.45-1.55, packing 7M elements against 9M); the other way, placements: 3x3/2
// 128->256@28 1.35 either way, the input gradient of ConvTranspose 4x4/2 256->128@16 (a 4x4/2 forward whose
// 16 MB of columns 2 tasks packed: f+b 1.42 -> 1.80), channels-last 3x3 512->64@7 1.65 -> 2.1; batch 1, one task
// by placement: 3x3 512@7 1.89 -> 0.73, 3x3/2 128->256@28 2.20 -> 1.16, 1x1 2048->512@7 1.75 -> 0.78.
bool channel_split_pays(const Geometry& g, int64_t placement_tasks, int64_t width) {
  const GroupDims d(g);
  const int64_t by_channel = output_channel_split(g).count * g.in_channels * d.taps * width;
  const int64_t by_placement = placement_tasks * g.out_channels * d.k_per_group;
  return placement_tasks < 2 || by_channel <= by_placement;
}

// Whether the NCHW forward takes the whole batch as one block (conv_forward_small_cpu) rather than the blocks of
// make_blocking (`blocks` of them): images too small for a block of their own (fewer than kBlockColumns positions)
// whose columns fit once, where the channel split pays. Pointwise ones only where their images are not read in
// place anyway (fewer than kPointwiseInPlace positions, or a batch of one, read in place either way).
bool whole_batch_forward(const Geometry& g, int64_t blocks) {
  const bool in_place = is_pointwise(g) && g.out_positions() >= kPointwiseInPlace && g.batch > 1;
  return !in_place && g.out_positions() < kBlockColumns && columns_fit_once(g) &&
         channel_split_pays(g, blocks, g.batch * g.out_positions());
}

Block clamp_block(Block blk, const Geometry& g) {
  blk.images = std::min(blk.images, g.batch - blk.n0);
  blk.p1 = std::min(blk.p1, g.out_positions());
  return blk;
}

// out (m×n) = a (m×k) @ b (k×n) + beta·out, through blas.h on this thread (the forward's in runs, forward_chunk).
// Each operand is a 2-D view whose rows or columns are contiguous (a transposed view passes as a transposed
// operand), so nothing is copied.
void matmul(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, bool forward = false) {
  struct Operand {
    bool trans;
    int64_t ld;
  };
  const auto operand = [](const at::Tensor& t) -> Operand {
    if (t.stride(1) == 1 || t.size(1) == 1) return {false, t.stride(0)};
    TORCH_INTERNAL_ASSERT(t.stride(0) == 1 || t.size(0) == 1, "matmul: an operand with neither unit stride");
    return {true, t.stride(1)};
  };
  const Operand oa = operand(a), ob = operand(b), oc = operand(out);
  TORCH_INTERNAL_ASSERT(!oc.trans, "matmul: the output's rows must be contiguous");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "matmul", [&] {
    gemm_in_chunks<scalar_t>(oa.trans, ob.trans, out.size(0), out.size(1), a.size(1), scalar_t(1),
                             a.const_data_ptr<scalar_t>(), oa.ld, b.const_data_ptr<scalar_t>(), ob.ld, scalar_t(beta),
                             out.data_ptr<scalar_t>(), oc.ld, forward ? forward_chunk<scalar_t>(a.size(1)) : a.size(1));
  });
}

// Output positions [p0, p1) of one image, row by row: f(row, ow0, ow1, at) for each output row's share
// [ow0, ow1), where row is od*out_h + oh (oh in 2-d) and `at` is position (row, ow0)'s column in a buffer
// whose column 0 is position p0. Only the first and last rows can be partial.
template <typename F>
[[gnu::always_inline]] inline void for_each_row(const Geometry& g, int64_t p0, int64_t p1, const F& f) {
  if (p1 <= p0) return;
  const int64_t first = p0 / g.out_w, last = (p1 - 1) / g.out_w;
  for (int64_t oh = first; oh <= last; ++oh) {
    const int64_t ow0 = oh == first ? p0 - oh * g.out_w : 0;
    const int64_t ow1 = oh == last ? p1 - oh * g.out_w : g.out_w;
    f(oh, ow0, ow1, oh * g.out_w + ow0 - p0);
  }
}

// out[k] = src[2 * k] for k < n, 16 at a time: two masked loads, a permute and a masked store (AVX-512F; masked-off
// lanes are never read or written, so nothing past the row is touched). The vector clones' loop for this copy took 8
// values a permute, then one at a time: a run of 15 or 16 (a 4x4/2 convolution over 32x32) was one permute and up to
// 7 scalar copies, and im2col 13% of ConvTranspose 4x4/2's input gradient (a Zen 4).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void copy_even_avx512(float* out, const float* src, int64_t n) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t k = 0; k < n; k += 16) {
    const int64_t m = std::min<int64_t>(16, n - k), reads = 2 * m - 1;  // src[2k, 2k + reads)
    const auto mask = [](int64_t lanes) { return lanes >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << lanes) - 1); };
    const __m512 a = _mm512_maskz_loadu_ps(mask(reads), src + 2 * k);
    const __m512 b = _mm512_maskz_loadu_ps(mask(std::max<int64_t>(0, reads - 16)), src + 2 * k + 16);
    _mm512_mask_storeu_ps(out + k, mask(m), _mm512_permutex2var_ps(a, even, b));
  }
}
#else
void copy_even_avx512(float*, const float*, int64_t) {}  // never called: cpu_has_avx512f() is false
#endif

// columns (channels*KD*KH*KW rows, row stride ld) ← for each kernel tap (c, k, i, j), the input pixel it
// sees at output positions p0..p1-1 of one image (channels, H, W), or volume (channels, D, H, W); zero where
// it falls in the padding. An output row is (od, oh), flat: od*out_h + oh (od is 0 in 2-d).
// Which output columns of a row see inside the input depends on j alone, so it is worked out once per tap
// (no division per row); the rows' short runs are plain loops, since at 7x7..56x56 a call to memcpy or
// memset per run cost more than the copying.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void im2col(scalar_t* columns, int64_t ld, const scalar_t* image, int64_t channels,
                                     const Geometry& g, int64_t p0, int64_t p1) {
  const Window& w = g.win;
  const bool even_by_avx512 = std::is_same_v<scalar_t, float> && w.stride_w == 2 && cpu_has_avx512f();
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* volume = image + c * g.in_positions();
    for (int64_t tap = 0; tap < w.taps(); ++tap) {
      const int64_t kd = tap / (w.kernel_h * w.kernel_w), i = tap / w.kernel_w % w.kernel_h, j = tap % w.kernel_w;
      scalar_t* row = columns + (c * w.taps() + tap) * ld;
      // Output column ow reads input column ow * stride_w + col_offset; only [lo, hi) land inside the row,
      // and only those are ever turned into addresses (col_offset alone may be far outside it).
      const int64_t col_offset = j * w.dilation_w - w.pad_w;
      int64_t lo, hi;
      outputs_inside(0, g.out_w, col_offset, w.stride_w, g.in_w, lo, hi);
      for_each_row(g, p0, p1, [&](int64_t r, int64_t ow0, int64_t ow1, int64_t at) {
        scalar_t* dst = row + at;  // dst[ow - ow0] is output column ow
        const int64_t od = g.out_d == 1 ? 0 : r / g.out_h, oh = r - od * g.out_h;
        const int64_t id = od * w.stride_d - w.pad_d + kd * w.dilation_d;
        const int64_t ih = oh * w.stride_h - w.pad_h + i * w.dilation_h;
        if (ih < 0 || ih >= g.in_h || id < 0 || id >= g.in_d) {
          for (int64_t k = 0; k < ow1 - ow0; ++k) dst[k] = scalar_t(0);
          return;
        }
        const int64_t a = std::min(std::max(lo, ow0), ow1), b = std::max(a, std::min(hi, ow1));
        for (int64_t k = 0; k < a - ow0; ++k) dst[k] = scalar_t(0);
        if (b > a) {
          const scalar_t* src = volume + (id * g.in_h + ih) * g.in_w + a * w.stride_w + col_offset;  // input of column a
          scalar_t* out = dst + (a - ow0);
          if (w.stride_w == 1) {
            for (int64_t k = 0; k < b - a; ++k) out[k] = src[k];
          } else if (w.stride_w == 2) {  // a constant stride, which the vector clones turn into loads and shuffles
            if (even_by_avx512)  // float only
              copy_even_avx512(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(src), b - a);
            else
              for (int64_t k = 0; k < b - a; ++k) out[k] = src[2 * k];
          } else {
            for (int64_t k = 0; k < b - a; ++k) out[k] = src[k * w.stride_w];
          }
        }
        for (int64_t k = b - ow0; k < ow1 - ow0; ++k) dst[k] = scalar_t(0);
      });
    }
  }
}

// im2col of small output images by gathers. Their rows are a few values long (7 at 7x7), and im2col's cost was the
// rows, not the values: 3x3/2 512@14 at batch 8 spent 23% of its forward building 7-value runs (a Zen 4). Where an
// image's output rows are at most kGatherWidth long and its positions at most kGatherPositions, a plan notes once,
// for each tap and output position, the pixel's offset within a channel's plane and whether it is inside; then each
// channel's tap row is a few AVX-512 gathers (16 positions each, the lanes outside the plane zero and never read).
// A copy: the same values as im2col's. float32, CPUs with AVX-512F (unless TORCH_MANUALGRAD_VECTOR_BYTES=32 says
// otherwise, so that the tests reach both ways on one CPU).
constexpr int64_t kGatherWidth = 16, kGatherPositions = 256;

struct GatherPlan {
  int64_t taps, vectors;          // vectors of 16 output positions
  std::vector<int32_t> offsets;   // [tap][vector][lane]: the pixel's offset in a channel's volume (0 outside)
  std::vector<uint16_t> inside;   // [tap][vector]: the lanes whose pixel is inside the volume
  uint16_t last;                  // the last vector's lanes that are positions
  GatherPlan(const Geometry& g, int64_t p0, int64_t p1) : taps(g.win.taps()), vectors(ceil_div(p1 - p0, 16)) {
    const Window& w = g.win;
    offsets.assign(taps * vectors * 16, 0);
    inside.assign(taps * vectors, 0);
    const int64_t n = p1 - p0;
    last = n % 16 == 0 ? 0xFFFF : static_cast<uint16_t>((1u << (n % 16)) - 1);
    for (int64_t tap = 0; tap < taps; ++tap) {
      const int64_t kd = tap / (w.kernel_h * w.kernel_w), i = tap / w.kernel_w % w.kernel_h, j = tap % w.kernel_w;
      int64_t ow = p0 % g.out_w, oh = p0 / g.out_w % g.out_h, od = p0 / g.out_w / g.out_h;  // position p0 + k's
      for (int64_t k = 0; k < n; ++k) {
        const int64_t id = od * w.stride_d - w.pad_d + kd * w.dilation_d;
        const int64_t ih = oh * w.stride_h - w.pad_h + i * w.dilation_h;
        const int64_t iw = ow * w.stride_w - w.pad_w + j * w.dilation_w;
        if (id >= 0 && id < g.in_d && ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w) {
          offsets[(tap * vectors) * 16 + k] = static_cast<int32_t>((id * g.in_h + ih) * g.in_w + iw);
          inside[tap * vectors + k / 16] |= static_cast<uint16_t>(1u << (k % 16));
        }
        if (++ow < g.out_w) continue;  // the next position: along the row, else the next row, else the next plane
        ow = 0;
        if (++oh < g.out_h) continue;
        oh = 0;
        ++od;
      }
    }
  }
};

// The plan for positions [p0, p1) of this input's images where their columns are gathered, else none.
std::optional<GatherPlan> gather_plan(const at::Tensor& input, const Geometry& g, int64_t p0, int64_t p1) {
  if (input.scalar_type() != at::kFloat || g.out_w > kGatherWidth || p1 - p0 > kGatherPositions ||
      g.in_positions() > std::numeric_limits<int32_t>::max() || !wide_vectors() || !cpu_has_avx512f())
    return std::nullopt;
  return GatherPlan(g, p0, p1);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void im2col_gather_avx512(float* columns, int64_t ld, const float* image,
                                                             int64_t channels, int64_t plane, const GatherPlan& plan) {
  for (int64_t c = 0; c < channels; ++c) {
    const float* volume = image + c * plane;
    for (int64_t tap = 0; tap < plan.taps; ++tap) {
      float* row = columns + (c * plan.taps + tap) * ld;
      const int32_t* offsets = plan.offsets.data() + tap * plan.vectors * 16;
      const uint16_t* inside = plan.inside.data() + tap * plan.vectors;
      for (int64_t v = 0; v < plan.vectors; ++v) {
        const __m512i at = _mm512_loadu_si512(offsets + 16 * v);
        const __m512 x = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), inside[v], at, volume, 4);
        _mm512_mask_storeu_ps(row + 16 * v, v + 1 == plan.vectors ? plan.last : 0xFFFF, x);
      }
    }
  }
}
#else
void im2col_gather_avx512(float*, int64_t, const float*, int64_t, int64_t, const GatherPlan&) {}  // never called
#endif

// The mirror of im2col: image (channels, H, W) or volume (channels, D, H, W) = the sum of every column entry
// (row stride ld) into the pixel it came from. Pixels covered by several placements add up, always in tap order.
// With a stride over the width, a tap's entries land on every stride-th pixel of a row: they are added instead into
// the row's phases, kept apart (pixel x at phase x % stride, place x / stride) so that every add is a contiguous run,
// and one pass per channel interleaves the phases into the image. Each pixel gets the same terms in the same order as
// added in place, bit for bit. In place, stride-2 adds were scalar: ConvTranspose 4x4/2 256->128@16 spent 11% of its
// samples in col2im and its fill, now 9% (a Zen 4; what is left waits on the columns, read back from memory). A stride
// of at least the row's width puts at most one entry of a tap in a row: those add in place (stride 1 below), so the
// phases never take more than a row plus a stride each.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void col2im(scalar_t* image, const scalar_t* columns, int64_t ld, int64_t channels,
                                     const Geometry& g) {
  const Window& w = g.win;
  const int64_t stride = w.stride_w < g.in_w ? w.stride_w : 1, rows = g.in_d * g.in_h;
  const int64_t place_count = ceil_div(g.in_w, stride);  // a phase row's length
  const int64_t row_step = stride == 1 ? g.in_w : place_count, phase_size = rows * place_count;
  std::vector<scalar_t> phases(stride == 1 ? 0 : stride * phase_size);
  std::vector<const scalar_t*> phase_rows(stride);
  for (int64_t c = 0; c < channels; ++c) {
    scalar_t* volume = image + c * g.in_positions();
    scalar_t* sums = stride == 1 ? volume : phases.data();  // what the taps add into
    std::fill(sums, sums + (stride == 1 ? g.in_positions() : stride * phase_size), scalar_t(0));
    for (int64_t tap = 0; tap < w.taps(); ++tap) {
      const int64_t kd = tap / (w.kernel_h * w.kernel_w), i = tap / w.kernel_w % w.kernel_h, j = tap % w.kernel_w;
      const scalar_t* row = columns + (c * w.taps() + tap) * ld;
      const int64_t col_offset = j * w.dilation_w - w.pad_w;
      int64_t lo, hi;
      outputs_inside(0, g.out_w, col_offset, w.stride_w, g.in_w, lo, hi);
      if (hi <= lo) continue;
      const int64_t x = lo * w.stride_w + col_offset;  // the pixel output column lo came from: inside the row
      scalar_t* first = sums + (x % stride) * phase_size + x / stride;  // in its row 0
      for (int64_t r = 0; r < g.out_d * g.out_h; ++r) {
        const int64_t od = g.out_d == 1 ? 0 : r / g.out_h, oh = r - od * g.out_h;
        const int64_t id = od * w.stride_d - w.pad_d + kd * w.dilation_d;
        const int64_t ih = oh * w.stride_h - w.pad_h + i * w.dilation_h;
        if (ih < 0 || ih >= g.in_h || id < 0 || id >= g.in_d) continue;
        const scalar_t* __restrict src = row + r * g.out_w + lo;
        scalar_t* __restrict dst = first + (id * g.in_h + ih) * row_step;
        for (int64_t k = 0; k < hi - lo; ++k) dst[k] += src[k];
      }
    }
    if (stride == 1) continue;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t p = 0; p < stride; ++p) phase_rows[p] = phases.data() + p * phase_size + r * place_count;
      interleave_phases(volume + r * g.in_w, 1, phase_rows.data(), stride, g.in_w);
    }
  }
}

// Channels [c0, c0 + channels) of t (N, C, P) → the block's (channels, images * (p1 - p0)) matrix: a
// view when the block is one image, a gathered copy when it spans several.
at::Tensor block_matrix(const at::Tensor& t, const Block& blk, int64_t c0 = 0, int64_t channels = -1) {
  const int64_t all = t.size(1), positions = t.numel() / std::max<int64_t>(1, t.size(0) * all);
  if (channels < 0) channels = all;
  if (blk.images == 1)
    return t[blk.n0].view({all, positions}).narrow(0, c0, channels).narrow(1, blk.p0, blk.p1 - blk.p0);
  return t.narrow(0, blk.n0, blk.images)
      .view({blk.images, all, positions})
      .narrow(1, c0, channels)
      .permute({1, 0, 2})
      .reshape({channels, blk.width()});
}

// The inverse of block_matrix for writing results: matrix (C, images * P) → t[n0 : n0 + images].
void scatter_block(at::Tensor& t, int64_t c0, const at::Tensor& matrix, const Block& blk) {
  const int64_t positions = t.numel() / std::max<int64_t>(1, t.size(0) * t.size(1));
  t.narrow(0, blk.n0, blk.images)
      .view({blk.images, t.size(1), positions})
      .narrow(1, c0, matrix.size(0))
      .permute({1, 0, 2})
      .copy_(matrix.view({matrix.size(0), blk.images, positions}));
}

// im2col of the block's images k0..k1-1, input channels [c0, c1), into their places in the block's columns
// (in_channels*KH*KW, width), image k at column k * (p1 - p0).
// (plan: the block's gather_plan, made once for the calls of one im2col_batch; else made here)
void im2col_images(at::Tensor& columns, const at::Tensor& input, const Block& blk, const Geometry& g, int64_t k0,
                   int64_t k1, int64_t c0 = 0, int64_t c1 = -1, const std::optional<GatherPlan>* plan = nullptr) {
  const int64_t tile = blk.p1 - blk.p0;
  if (c1 < 0) c1 = g.in_channels;
  const std::optional<GatherPlan> own = plan ? std::nullopt : gather_plan(input, g, blk.p0, blk.p1);
  const std::optional<GatherPlan>& gathers = plan ? *plan : own;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "im2col", [&] {
    const scalar_t* images = input.const_data_ptr<scalar_t>();  // contiguous (N, C_in, ...)
    if (gathers) {  // float32
      float* first = reinterpret_cast<float*>(columns.data_ptr<scalar_t>()) + c0 * g.win.taps() * blk.width();
      const float* image = reinterpret_cast<const float*>(images) + (blk.n0 * g.in_channels + c0) * g.in_positions();
      for (int64_t k = k0; k < k1; ++k)
        im2col_gather_avx512(first + k * tile, blk.width(), image + k * g.in_channels * g.in_positions(), c1 - c0,
                             g.in_positions(), *gathers);
      return;
    }
    for (int64_t k = k0; k < k1; ++k)
      im2col(columns.data_ptr<scalar_t>() + c0 * g.win.taps() * blk.width() + k * tile, blk.width(),
             images + ((blk.n0 + k) * g.in_channels + c0) * g.in_positions(), c1 - c0, g, blk.p0, blk.p1);
  });
}

// The whole batch's columns (in_channels*KH*KW, batch*positions), in parallel over runs of input channels: each
// task writes whole rows, where tasks over images shared the cache lines at their columns' edges.
constexpr int64_t kIm2colChannels = 8;  // channels per run: its rows stay in the L2 while every image adds its part
void im2col_batch(at::Tensor& columns, const at::Tensor& input, const Block& all, const Geometry& g) {
  const int64_t runs = ceil_div(g.in_channels, kIm2colChannels);
  const std::optional<GatherPlan> plan = gather_plan(input, g, all.p0, all.p1);
  parallel_tasks(runs, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      im2col_images(columns, input, all, g, 0, all.images, r * kIm2colChannels,
                    std::min(g.in_channels, (r + 1) * kIm2colChannels), &plan);
  });
}

// The whole batch's columns (in_channels*KH*KW, batch*positions): the images themselves when pointwise (a
// gathered copy unless the batch is one image).
at::Tensor batch_columns(const at::Tensor& input, const Geometry& g) {
  const Block all{0, g.batch, 0, g.out_positions()};
  if (is_pointwise(g)) return block_matrix(input, all);
  at::Tensor columns = at::empty({g.in_channels * g.win.taps(), all.width()}, input.options());
  im2col_batch(columns, input, all, g);
  return columns;
}

// The block's columns (in_channels*KH*KW, width): the images themselves when pointwise, otherwise
// im2col written into the front of `workspace`.
at::Tensor block_columns(const at::Tensor& input, const Block& blk, const Geometry& g, const at::Tensor& workspace) {
  if (is_pointwise(g)) return block_matrix(input, blk);
  const int64_t rows = g.in_channels * g.win.taps();
  at::Tensor columns = workspace.narrow(0, 0, rows * blk.width()).view({rows, blk.width()});
  im2col_images(columns, input, blk, g, 0, blk.images);
  return columns;
}

// Room for one block's columns (none for pointwise convolutions).
at::Tensor column_workspace(const at::Tensor& input, const Geometry& g, const Blocking& b) {
  const int64_t width = b.images * b.tile;
  return at::empty({is_pointwise(g) ? 0 : g.in_channels * g.win.taps() * width}, input.options());
}

// ---- Channels-last (NHWC) --------------------------------------------------------------------------------
// A channels-last input is computed in its own layout, as torch's oneDNN does: the images are one
// (N·H·W, C) matrix, a row of the columns holds one output position's taps, each a run of the group's
// channels copied whole, and a 1×1 convolution is a product over the images as they lie. The results come
// back channels-last, so a channels-last network pays no layout copies (they were 38% of MobileNetV2's
// training step). Depthwise convolutions of multiplier 1 have direct NHWC kernels (depthwise_cpu.cpp); other
// multipliers keep their NCHW kernels and convert (conv_*_cpu below).
// Columns: rows are the batch's output positions (n, oh, ow); a row is groups × KH × KW × in_channels/groups,
// each group's block contiguous and in the order of weight.permute(0, 2, 3, 1).

constexpr int64_t kMinNhwcRows = 96;  // rows per task at least: narrower products lose more than they spread

// Products with few channels (MobileNet's and EfficientNet's narrowing 1x1s, ResNet's 256->64, the stride-2 3x3s
// over 64) run faster as BLAS's small-matrix products (small_product_rows: no packed copy of the input rows or
// columns, which cost more than the few multiply-adds each element takes part in), as long as each product keeps
// this many rows. Interleaved on a 2-core Zen 4, channels-last, batch 8, ours/torch, one product -> small ones
// (rows each):
//   forward         1x1 256->64@56 1.23 -> 0.96 (61), 144->24@56 1.18 -> 0.99, 64->64@56 1.22 -> 0.80, 384->64@14
//                   1.09 -> 0.92, 256->128@28 1.14 -> 1.08 (30), 3x3/2 64@56 1.25 -> 1.08 (61), 128@56 1.23 -> 1.13
//                   (30); but 1152->192@7 1.04 -> 1.07 (20), 512->128@28 1.18 -> 1.20 (15)
//   input gradient  1x1 64->256@56 1.19 -> 0.97, 24->144@56 1.20 -> 0.95, 576->96@14 0.90 -> 0.80 (18),
//                   672->112@14 0.99 -> 0.89 (13), 3x3/2 64@56 1.17 -> 1.07 (27), 3x3 64@7 1.16 -> 0.96; but
//                   256->512@28 1.15 -> 1.33 (7), 1024->256@14 1.08 -> 3.2 (3)
// (A channels-last caller's forward sums runs of 256 terms of k, an NCHW one's through channels-last copies
// runs of 64 or more, forward_chunk; the input gradient's products are one run of C_out terms.)
constexpr int64_t kMinSmallForwardRows = 30, kMinSmallInputRows = 12;
// ...and the forward's only in row tiles of this many rows, unless one small product takes the whole tile: a small
// batch of small images ran faster as one blocked product a tile than as a few small ones (1x1 960->128@14 CL at
// batch 1, 98-row tiles in products of 30 rows: 0.33 -> 0.26 ms, torch's 0.26; at batch 8, 784-row tiles, the small
// products stay faster, 1.84 against 1.89 ms).
constexpr int64_t kMinSmallForwardTile = 128;

// The row tiles of the NHWC products: rows of the output at most kMaxColumnElems columns wide each, cut
// further so the columns fit the L2 (as the NCHW forward's cache tiles) while tiles keep 512 rows.
Split nhwc_tiles(const Geometry& g, bool pointwise) {
  const GroupDims d(g);
  const int64_t rows = g.batch * d.positions, width = g.in_channels * d.taps;
  int64_t forced = pointwise ? 1 : ceil_div(rows * width, kMaxColumnElems);
  if (!pointwise) forced = std::max(forced, std::min(ceil_div(rows * width, kCacheColumnElems), rows / kMinCacheTileColumns));
  // Each tile's product packs the whole weight again. Pointwise, fewer tiles while a tile has fewer rows than the
  // weight's longer side, and than kMinCacheTileColumns (4 or 2 tiles, still a power of two to share evenly; the
  // larger batches of many-core machines keep 8). Interleaved ours/torch, 2-core Zen 4, batch 8, channels-last,
  // 8 tiles -> fewer: forward 1x1 1024->256@14 1.24-1.26 -> 1.11-1.12, 1024->512@14 1.21-1.22 -> 1.09-1.10,
  // 160->960@7 1.16-1.26 -> 0.93-0.96, 1024->128@7 1.18 -> 0.99; input and weight gradients 0-12% faster, within
  // the noise at worst.
  int64_t wanted = kMinTasks;
  if (pointwise) {
    const int64_t side = std::max(d.in_per_group, d.out_per_group);
    while (wanted > 2 && rows < wanted * std::min(side, kMinCacheTileColumns)) wanted /= 2;
  }
  return split(rows, wanted, kMinNhwcRows, forced);
}

// dst[c] += src[c] over one stretch of channels.
template <typename scalar_t>
MANUALGRAD_VECTOR_CLONES void add_into(scalar_t* __restrict dst, const scalar_t* __restrict src, int64_t count) {
  for (int64_t c = 0; c < count; ++c) dst[c] += src[c];
}

// Rows [r0, r1) of the columns into cols (row stride width). A run of taps that see neighbouring pixels is
// one copy when there is one group (its channels are the run's whole stretch of memory): a 7×7 stem over 3
// channels copies 21 values at a time instead of 3.
template <typename scalar_t>
void im2col_nhwc(scalar_t* cols, const scalar_t* input, const Geometry& g, int64_t r0, int64_t r1) {
  const GroupDims d(g);
  const int64_t width = g.in_channels * d.taps;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / d.positions, p = r % d.positions;
    const scalar_t* image = input + n * g.in_h * g.in_w * g.in_channels;
    scalar_t* row = cols + (r - r0) * width;
    for_each_tap_run(g, p / g.out_w, p % g.out_w, [&](int64_t tap, int64_t pixel, int64_t count) {
      if (d.groups == 1) {
        if (pixel >= 0) copy_run(row + tap * g.in_channels, image + pixel * g.in_channels, count * g.in_channels);
        else std::fill_n(row + tap * g.in_channels, count * g.in_channels, scalar_t(0));
        return;
      }
      for (int64_t k = 0; k < count; ++k) {
        for (int64_t grp = 0; grp < d.groups; ++grp) {
          scalar_t* dst = row + grp * d.k_per_group + (tap + k) * d.in_per_group;
          if (pixel >= 0) std::copy_n(image + (pixel + k) * g.in_channels + grp * d.in_per_group, d.in_per_group, dst);
          else std::fill_n(dst, d.in_per_group, scalar_t(0));
        }
      }
    });
  }
}

// Positions [q0, q1) of one image's columns for input channels [c0, c0 + count) alone (one group: a row is
// taps × count) added into the image (H, W, C) at the pixels they came from, in position order, then tap order (a
// run's taps touch distinct pixels, so all channels' stretch of a run is added in one loop, keeping every element's
// order of terms).
template <typename scalar_t>
void col2im_nhwc_add_channels(scalar_t* image, const scalar_t* cols, const Geometry& g, int64_t q0, int64_t q1,
                              int64_t c0, int64_t count) {
  const int64_t span = g.win.taps() * count;
  for (int64_t q = q0; q < q1; ++q) {
    const scalar_t* row = cols + (q - q0) * span;
    for_each_tap_run(g, q / g.out_w, q % g.out_w, [&](int64_t tap, int64_t pixel, int64_t run) {
      if (pixel < 0) return;
      if (count == g.in_channels) {
        add_into(image + pixel * count, row + tap * count, run * count);
        return;
      }
      for (int64_t k = 0; k < run; ++k)
        add_into(image + (pixel + k) * g.in_channels + c0, row + (tap + k) * count, count);
    });
  }
}

// The mirror of im2col_nhwc: positions [q0, q1) of one image's columns (row stride width) added into the image,
// in col2im_nhwc_add_channels' order, every group's channels.
template <typename scalar_t>
void col2im_nhwc_add(scalar_t* image, const scalar_t* cols, const Geometry& g, int64_t q0, int64_t q1) {
  const GroupDims d(g);
  if (d.groups == 1) return col2im_nhwc_add_channels(image, cols, g, q0, q1, 0, g.in_channels);
  const int64_t width = g.in_channels * d.taps;
  for (int64_t q = q0; q < q1; ++q) {
    const scalar_t* row = cols + (q - q0) * width;
    for_each_tap_run(g, q / g.out_w, q % g.out_w, [&](int64_t tap, int64_t pixel, int64_t count) {
      if (pixel < 0) return;
      for (int64_t k = 0; k < count; ++k) {
        for (int64_t grp = 0; grp < d.groups; ++grp)
          add_into(image + (pixel + k) * g.in_channels + grp * d.in_per_group,
                   row + grp * d.k_per_group + (tap + k) * d.in_per_group, d.in_per_group);
      }
    });
  }
}

// Convolutions with few terms per output (K = C_in·KH·KW <= kSmallK, one group: a stem's 3·7·7 = 147 or 3·3·3 =
// 27), which BLAS runs poorly: it packs the columns again for a few multiply-adds per element, and im2col copies
// them in runs of 3 floats (3x3/2 stem 3->32 @224, channels-last: 2.9 ms against torch's 0.8). Here R output
// pixels by V vectors of output channels are summed in registers, each weight vector loaded once for the R pixels,
// which read the input where it lies when all their taps are inside it (else one im2col row). The sums run as
// gemm_in_chunks' do: over k in runs of `chunk`, each run's sum added into the output (holding the bias) in order.
constexpr int64_t kSmallK = 160;
// ...but a 1x1 convolution's product reads the input rows in place, with nothing to gather: BLAS wins there from
// about 40 terms (channels-last inference, 2-core Zen 5, batch 8, BLAS / this kernel: 160->960@7 0.50x the time,
// 112->672@14 0.66x, 64->384@14 0.68x, 40->240@28 0.89x; 32->16@112 and 16->96@112 1.0x, 24->144@56 1.31x).
constexpr int64_t kSmallPointwiseK = 32;

// Term kk of pixel r is x[r * ldx + off[kk]]; the weight is (k, o_pad), ldw = o_pad. (Always inlined, as is
// small_k_pixels: GCC leaves them out of line otherwise, compiled for baseline x86-64 rather than for the clone
// of small_k_rows that calls them, at a twentieth of the speed.)
template <typename scalar_t, int BYTES, int R, int V>
[[gnu::always_inline]] inline void small_k_block(scalar_t* out, int64_t ldo, const scalar_t* x, int64_t ldx,
                                                 const int64_t* off, const scalar_t* wt, int64_t ldw, int64_t k,
                                                 const scalar_t* bias, int64_t chunk) {
  using vec = typename VecBytes<scalar_t, BYTES>::type;
  constexpr int64_t L = VecBytes<scalar_t, BYTES>::lanes;
  for (int64_t k0 = 0; k0 < k; k0 += chunk) {
    vec acc[R][V] = {};
    for (int64_t kk = k0; kk < std::min(k, k0 + chunk); ++kk) {
      vec w[V];
      for (int v = 0; v < V; ++v) load_vec(w[v], wt + kk * ldw + v * L);
      for (int r = 0; r < R; ++r) {
        const scalar_t xr = x[r * ldx + off[kk]];
        for (int v = 0; v < V; ++v) acc[r][v] += w[v] * xr;
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int v = 0; v < V; ++v) {
        vec sum;
        if (k0 > 0 || bias) {
          load_vec(sum, k0 > 0 ? out + r * ldo + v * L : bias + v * L);
          sum += acc[r][v];
        } else {
          sum = acc[r][v];
        }
        std::memcpy(out + r * ldo + v * L, &sum, sizeof(vec));
      }
    }
  }
}

// All o outputs of R pixels (rows of out, ldo apart); the last partial vector goes through a scratch tile. Blocks of
// R x 4 vectors of 64 bytes, R x 2 of 32 (AVX2's 16 registers: 4 x 4 spilled).
template <typename scalar_t, int BYTES, int R>
[[gnu::always_inline]] inline void small_k_pixels(scalar_t* out, int64_t ldo, const scalar_t* x, int64_t ldx,
                                                  const int64_t* off, const scalar_t* wt, int64_t o, int64_t o_pad,
                                                  int64_t k, const scalar_t* bias, int64_t chunk) {
  constexpr int64_t L = VecBytes<scalar_t, BYTES>::lanes;
  constexpr int V = (BYTES == 64 ? 4 : 2) / (R > 4 ? 2 : 1);  // R x V sums within the registers
  int64_t c = 0;
  for (; c + V * L <= o; c += V * L)
    small_k_block<scalar_t, BYTES, R, V>(out + c, ldo, x, ldx, off, wt + c, o_pad, k, bias ? bias + c : nullptr,
                                         chunk);
  // Two vectors left (32 channels of float, the 3x3 stems of MobileNetV2 and EfficientNet): R x 2 sums in flight, where
  // two blocks of R x 1 left the FMA pipes waiting on each sum's previous term.
  if constexpr (V > 2)
    for (; c + 2 * L <= o; c += 2 * L)
      small_k_block<scalar_t, BYTES, R, 2>(out + c, ldo, x, ldx, off, wt + c, o_pad, k, bias ? bias + c : nullptr,
                                           chunk);
  for (; c + L <= o; c += L)
    small_k_block<scalar_t, BYTES, R, 1>(out + c, ldo, x, ldx, off, wt + c, o_pad, k, bias ? bias + c : nullptr,
                                         chunk);
  if (c < o) {
    scalar_t tail[R * L];
    small_k_block<scalar_t, BYTES, R, 1>(tail, L, x, ldx, off, wt + c, o_pad, k, bias ? bias + c : nullptr, chunk);
    for (int r = 0; r < R; ++r) std::copy_n(tail + r * L, o - c, out + r * ldo + c);
  }
}

// Output rows [r0, r1) (pixels of the flattened N·OH·OW) of the channels-last forward: four pixels at a time
// where four neighbours of one output row have all their taps inside, else one from its im2col row (row, with
// offsets `identity`). interior: the taps' offsets from the first tap's input element. wt (K, o_pad) and bias
// (o_pad) are padded with zeros. BYTES: the vectors', 64 on CPUs with AVX-512, else 32 (vectorize.h).
template <typename scalar_t, int BYTES>
MANUALGRAD_VECTOR_CLONES_VL void small_k_rows(scalar_t* out, const scalar_t* in, const scalar_t* wt,
                                              const scalar_t* bias, const Geometry& g, int64_t o_pad, int64_t r0,
                                              int64_t r1, const int64_t* interior, const int64_t* identity,
                                              scalar_t* row, int64_t chunk) {
  const Window& w = g.win;
  const int64_t C = g.in_channels, k = C * w.kernel_h * w.kernel_w, o = g.out_channels;
  const int64_t span_h = (w.kernel_h - 1) * w.dilation_h, span_w = (w.kernel_w - 1) * w.dilation_w;
  // Up to two vectors of outputs (the 3x3 stems' 32 channels): 8 pixels at a time, so that 16 sums are in flight.
  const bool few_outputs = o <= 2 * VecBytes<scalar_t, BYTES>::lanes;
  for (int64_t r = r0; r < r1;) {
    const int64_t n = r / (g.out_h * g.out_w), oh = r / g.out_w % g.out_h, ow = r % g.out_w;
    const int64_t ih = oh * w.stride_h - w.pad_h, iw = ow * w.stride_w - w.pad_w;
    // (written so that no sum can overflow, whatever the padding and dilation)
    const bool inside = ih >= 0 && span_h < g.in_h - ih && iw >= 0 && span_w < g.in_w - iw;
    if (few_outputs && r + 8 <= r1 && ow + 8 <= g.out_w && inside && (g.in_w - 1 - iw - span_w) / w.stride_w >= 7) {
      small_k_pixels<scalar_t, BYTES, 8>(out + r * o, o, in + ((n * g.in_h + ih) * g.in_w + iw) * C, w.stride_w * C,
                                         interior, wt, o, o_pad, k, bias, chunk);
      r += 8;
    } else if (r + 4 <= r1 && ow + 4 <= g.out_w && inside && (g.in_w - 1 - iw - span_w) / w.stride_w >= 3) {
      small_k_pixels<scalar_t, BYTES, 4>(out + r * o, o, in + ((n * g.in_h + ih) * g.in_w + iw) * C, w.stride_w * C,
                                         interior, wt, o, o_pad, k, bias, chunk);
      r += 4;
    } else {
      im2col_nhwc(row, in, g, r, r + 1);
      small_k_pixels<scalar_t, BYTES, 1>(out + r * o, o, row, 0, identity, wt, o, o_pad, k, bias, chunk);
      r += 1;
    }
  }
}

// (C_out, KH, KW, C_in/g): each output channel's row of taps in the columns' order (a view of a
// channels-last weight, a copy of any other).
at::Tensor weight_rows_nhwc(const at::Tensor& weight) { return weight.permute({0, 2, 3, 1}).contiguous(); }

// long_runs: a channels-last caller's products, summed in blas.h's nhwc_forward_chunk runs (torch's error
// there is larger); an NCHW caller's keep forward_chunk's, to stay at torch's NCHW error.
at::Tensor conv_forward_nhwc(const at::Tensor& input_, const at::Tensor& weight_, const at::Tensor& bias,
                             const Geometry& g, bool long_runs) {
  const GroupDims d(g);
  const at::Tensor input = input_.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = weight_rows_nhwc(weight_);
  at::Tensor output =
      at::empty(g.output_shape(g.out_channels), input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (is_depthwise(g)) {  // multiplier 1 (nhwc_supported): the direct kernel
    depthwise_forward_nhwc_cpu(output, input, weight_.contiguous(), bias, g);
    return output;
  }
  const bool pointwise = is_pointwise(g);
  const int64_t rows = g.batch * d.positions, width = g.in_channels * d.taps;
  const Split tiles = nhwc_tiles(g, pointwise);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_forward_nhwc", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    const scalar_t* wt = weight.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = output.data_ptr<scalar_t>();
    const int64_t chunk =
        long_runs ? nhwc_forward_chunk<scalar_t>(d.k_per_group) : forward_chunk<scalar_t>(d.k_per_group);
    const bool small_k = d.groups == 1 && width <= (pointwise ? kSmallPointwiseK : kSmallK);
    // small_k: the weight as (K, C_out) and the bias, padded with zeros to whole vectors of outputs
    const int64_t o_pad = ceil_div(g.out_channels, Vec<scalar_t>::lanes) * Vec<scalar_t>::lanes;
    std::vector<scalar_t> wt_k(small_k ? width * o_pad : 0), b_pad(small_k && b ? o_pad : 0);
    std::vector<int64_t> interior(small_k ? width : 0), identity(small_k ? width : 0);
    if (small_k) {
      for (int64_t o = 0; o < g.out_channels; ++o) {
        for (int64_t kk = 0; kk < width; ++kk) wt_k[kk * o_pad + o] = wt[o * width + kk];
        if (b) b_pad[o] = b[o];
      }
      // Term kk = (i, j, c): tap (i, j) of channel c. Its offset is only used (and only computed: it may not be
      // representable otherwise) when a window fits inside the input.
      const bool fits = (g.win.kernel_h - 1) * g.win.dilation_h < g.in_h && (g.win.kernel_w - 1) * g.win.dilation_w < g.in_w;
      for (int64_t kk = 0; kk < width; ++kk) {
        const int64_t tap = kk / g.in_channels, i = tap / g.win.kernel_w, j = tap % g.win.kernel_w;
        if (fits) interior[kk] = (i * g.win.dilation_h * g.in_w + j * g.win.dilation_w) * g.in_channels + kk % g.in_channels;
        identity[kk] = kk;
      }
    }
    // Fewer rows than one wide product (a small batch of small images): the tasks may split the output channels
    // instead (channel_split_pays). Interleaved on a 2-core Zen 4, ours/torch, batch 1: 3x3 512@7 1.62 -> 0.85,
    // 3x3/2 256->512@14 1.74 -> 0.96, 1x1 512->2048@7 1.15 -> 0.63; batch 2: 3x3 512@7 1.79 -> 0.95. Batch 8 at
    // 14x14 (1568 rows) was mixed, 1.17-1.35 either way, so row tiles there.
    if (rows < kBlockColumns && !small_k && (pointwise || rows * width <= kMaxColumnElems) &&
        channel_split_pays(g, tiles.count, rows)) {
      std::vector<scalar_t> workspace(pointwise ? 0 : rows * width);
      if (!pointwise)
        parallel_tasks(rows, [&](int64_t r0, int64_t r1) {
          im2col_nhwc(workspace.data() + r0 * width, in, g, r0, r1);
        });
      const scalar_t* cols = pointwise ? in : workspace.data();
      output_channel_tasks(g, [&](int64_t grp, int64_t first, int64_t count) {
        scalar_t* c = out + first;
        if (b) {
          for (int64_t r = 0; r < rows; ++r) std::copy_n(b + first, count, c + r * g.out_channels);
        }
        gemm_in_chunks<scalar_t>(false, true, rows, count, d.k_per_group, scalar_t(1), cols + grp * d.k_per_group,
                                 width, wt + first * d.k_per_group, d.k_per_group, scalar_t(b ? 1 : 0), c,
                                 g.out_channels, chunk);
      });
      return;
    }
    // Few output channels: products of small_rows rows where that is at least kMinSmallForwardRows
    // (small_product_rows), with the weight as (K, C_out)
    const int64_t small_rows = d.groups == 1 && !small_k
                                   ? small_product_rows<scalar_t>(g.out_channels, std::min(width, chunk))
                                   : 0;
    const bool by_rows =
        small_rows >= kMinSmallForwardRows && (tiles.size >= kMinSmallForwardTile || small_rows >= tiles.size);
    // (ATen's transposing copy: the element-by-element loop here was 16% of a 1x1 960->128@14's time at batch 1)
    const at::Tensor wt_t = by_rows ? weight.view({g.out_channels, width}).t().contiguous() : at::Tensor();
    const auto small_k_kernel = wide_vectors() ? small_k_rows<scalar_t, 64> : small_k_rows<scalar_t, 32>;
    parallel_tasks(tiles.count, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> workspace(small_k ? width : pointwise ? 0 : tiles.size * width);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = t * tiles.size, m = std::min(rows, r0 + tiles.size) - r0;
        if (small_k) {
          small_k_kernel(out, in, wt_k.data(), b ? b_pad.data() : nullptr, g, o_pad, r0, r0 + m, interior.data(),
                         identity.data(), workspace.data(), forward_chunk<scalar_t>(width));
          continue;
        }
        const scalar_t* cols = in + r0 * width;  // pointwise: the input rows themselves
        if (!pointwise) {
          im2col_nhwc(workspace.data(), in, g, r0, r0 + m);
          cols = workspace.data();
        }
        scalar_t* c = out + r0 * g.out_channels;
        if (b) {
          for (int64_t r = 0; r < m; ++r) std::copy_n(b, g.out_channels, c + r * g.out_channels);
        }
        if (by_rows) {
          gemm_by_rows<scalar_t>(false, m, g.out_channels, width, scalar_t(1), cols, width,
                                 wt_t.const_data_ptr<scalar_t>(), g.out_channels, scalar_t(b ? 1 : 0), c,
                                 g.out_channels, chunk, small_rows);
          continue;
        }
        for (int64_t grp = 0; grp < d.groups; ++grp) {
          gemm_in_chunks<scalar_t>(false, true, m, d.out_per_group, d.k_per_group, scalar_t(1),
                                   cols + grp * d.k_per_group, width, wt + grp * d.out_per_group * d.k_per_group,
                                   d.k_per_group, scalar_t(b ? 1 : 0), c + grp * d.out_per_group, g.out_channels,
                                   chunk);
        }
      }
    });
  });
  return output;
}

// grad_input: per group, grad_columns = grad_output rows @ weight rows, then added back into the pixels.
// Pointwise, that product is the input gradient itself. Otherwise each task owns whole images (windows of
// neighbouring positions overlap), whose positions it takes in chunks of at most kMaxColumnElems columns.
// f(n, q0, q1, at) for each image n's share of rows [r0, r0 + m) of a batch's positions (`positions` an image):
// its positions [q0, q1), the first of them at row r0 + at.
template <typename F>
void for_each_image_share(int64_t r0, int64_t m, int64_t positions, const F& f) {
  for (int64_t r = r0; r < r0 + m;) {
    const int64_t n = r / positions, q0 = r % positions, q1 = std::min(positions, q0 + r0 + m - r);
    f(n, q0, q1, r - r0);
    r += q1 - q0;
  }
}

template <typename scalar_t>
void conv_backward_input_nhwc(scalar_t* gi, const scalar_t* go, const scalar_t* wt, const Geometry& g) {
  const GroupDims d(g);
  const int64_t width = g.in_channels * d.taps;
  if (is_pointwise(g)) {
    const int64_t rows = g.batch * d.positions;
    const Split tiles = nhwc_tiles(g, true);
    if (tiles.count < 2) {  // too few rows to share (a small batch of 7x7 images): tasks split the input channels
      channel_tasks(d.in_per_group, d.groups, [&](int64_t grp, int64_t first, int64_t count) {
        gemm<scalar_t>(false, false, rows, count, d.out_per_group, scalar_t(1), go + grp * d.out_per_group,
                       g.out_channels, wt + grp * d.out_per_group * d.k_per_group + (first - grp * d.in_per_group),
                       d.k_per_group, scalar_t(0), gi + first, g.in_channels);
      });
      return;
    }
    // few channels on both sides: products of small_rows rows (small_product_rows; the weight is already (C_out, C_in))
    const int64_t small_rows = d.groups == 1 ? small_product_rows<scalar_t>(g.in_channels, g.out_channels) : 0;
    parallel_tasks(tiles.count, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = t * tiles.size, m = std::min(rows, r0 + tiles.size) - r0;
        if (small_rows >= kMinSmallInputRows) {
          gemm_by_rows<scalar_t>(false, m, g.in_channels, g.out_channels, scalar_t(1), go + r0 * g.out_channels,
                                 g.out_channels, wt, g.in_channels, scalar_t(0), gi + r0 * g.in_channels, g.in_channels,
                                 g.out_channels, small_rows);
          continue;
        }
        for (int64_t grp = 0; grp < d.groups; ++grp)
          gemm<scalar_t>(false, false, m, d.in_per_group, d.out_per_group, scalar_t(1),
                         go + r0 * g.out_channels + grp * d.out_per_group, g.out_channels,
                         wt + grp * d.out_per_group * d.k_per_group, d.k_per_group, scalar_t(0),
                         gi + r0 * g.in_channels + grp * d.in_per_group, g.in_channels);
      }
    });
    return;
  }
  // Tasks own whole images, so that col2im never adds across tasks. Small images go several to a task and to a
  // product, as in the forward's blocks: per image, 3x3 512@7 made 8 products of 49 rows (125 GFLOP/s on a Zen 5
  // core, against 179 with 98), each packing the whole weight again.
  const int64_t positions = std::max<int64_t>(1, d.positions);
  const int64_t images = std::max<int64_t>(1, std::min({ceil_div(kBlockColumns, positions), g.batch / kMinBlocks,
                                                        kMaxColumnElems / (positions * width)}));
  const int64_t chunk = std::max<int64_t>(1, std::min(images * d.positions, kMaxColumnElems / width));
  const int64_t image_tasks = ceil_div(g.batch, images);
  const bool odd_tasks = image_tasks % 2 == 1 && image_tasks < kMinTasks && g.in_channels >= kMinOddTaskChannels &&
                         d.positions < kBlockColumns;
  if (d.groups == 1 && (image_tasks == 1 ? g.in_channels >= kMinChannelTaskChannels : odd_tasks)) {
    // One task of whole images (a batch of one) would leave the other threads idle (3x3 512@7 at batch 1: 2.4x
    // torch's time): tasks take the input channels instead, each its channels' columns (a product per tap) added
    // into its channels of the image, every element's terms in the order of the image tasks below. (With fewer
    // channels, a ConvTranspose's few output channels, the products per tap would be a channel or two wide.)
    // So do 3, 5 or 7 tasks of small images, which 2 or 4 threads share unevenly, where the channels make pieces of
    // 128 or more (fewer tasks than before, though, for 8 or more cores;
    // 2-core Zen 4, ms, image tasks -> channel tasks [torch]: 3x3 512@7 at batch 3 5.4 -> 4.0 [4.8], batch 5
    // 8.9 -> 6.5 [6.7], batch 7 11.8 -> 8.9 [8.7]; 3x3/2 256->512@14 at batch 5 3.8 -> 3.1 [2.6]; the same bits.
    // Narrower pieces lose: 3x3/2 128->256@28 at batch 3 2.3 -> 2.4, at 4-8 images 7-35% slower; and an even
    // number of tasks gains nothing.)
    channel_tasks(g.in_channels, 1, [&](int64_t, int64_t c0, int64_t count) {
      const int64_t span = d.taps * count, rows = g.batch * d.positions;
      const int64_t step = std::max<int64_t>(1, std::min(rows, kMaxColumnElems / span));
      std::vector<scalar_t> workspace(step * span);
      for (int64_t pixel = 0; pixel < g.batch * g.in_h * g.in_w; ++pixel)
        std::fill_n(gi + pixel * g.in_channels + c0, count, scalar_t(0));
      for (int64_t r0 = 0; r0 < rows; r0 += step) {
        const int64_t m = std::min(rows, r0 + step) - r0;
        for (int64_t tap = 0; tap < d.taps; ++tap)
          gemm<scalar_t>(false, false, m, count, g.out_channels, scalar_t(1), go + r0 * g.out_channels, g.out_channels,
                         wt + tap * g.in_channels + c0, width, scalar_t(0), workspace.data() + tap * count, span);
        for_each_image_share(r0, m, d.positions, [&](int64_t n, int64_t q0, int64_t q1, int64_t at) {
          col2im_nhwc_add_channels(gi + n * g.in_h * g.in_w * g.in_channels, workspace.data() + at * span, g, q0, q1,
                                   c0, count);
        });
      }
    });
    return;
  }
  // few channels on both sides: the columns in products of small_rows rows (as the pointwise ones above)
  const int64_t small_rows = d.groups == 1 ? small_product_rows<scalar_t>(width, g.out_channels) : 0;
  parallel_tasks(ceil_div(g.batch, images), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> workspace(chunk * width);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * images, count = std::min(images, g.batch - n0);
      scalar_t* block = gi + n0 * g.in_h * g.in_w * g.in_channels;
      std::fill_n(block, count * g.in_h * g.in_w * g.in_channels, scalar_t(0));
      // Rows r of the block's positions: image n0 + r / positions, position r % positions.
      for (int64_t r0 = 0; r0 < count * d.positions; r0 += chunk) {
        const int64_t m = std::min(count * d.positions, r0 + chunk) - r0;
        if (small_rows >= kMinSmallInputRows) {
          gemm_by_rows<scalar_t>(false, m, width, g.out_channels, scalar_t(1),
                                 go + (n0 * d.positions + r0) * g.out_channels, g.out_channels, wt, width, scalar_t(0),
                                 workspace.data(), width, g.out_channels, small_rows);
        } else {
          for (int64_t grp = 0; grp < d.groups; ++grp)
            gemm<scalar_t>(false, false, m, d.k_per_group, d.out_per_group, scalar_t(1),
                           go + (n0 * d.positions + r0) * g.out_channels + grp * d.out_per_group, g.out_channels,
                           wt + grp * d.out_per_group * d.k_per_group, d.k_per_group, scalar_t(0),
                           workspace.data() + grp * d.k_per_group, width);
        }
        for_each_image_share(r0, m, d.positions, [&](int64_t n, int64_t q0, int64_t q1, int64_t at) {
          col2im_nhwc_add(block + n * g.in_h * g.in_w * g.in_channels, workspace.data() + at * width, g, q0, q1);
        });
      }
    }
  });
}

// grad_weight rows (C_out, KH·KW·C_in/g) = per group, grad_output rows^T @ columns, summed over every
// position. When the whole batch's columns fit one workspace, and that packs fewer elements, they are built once
// and the tasks split the output channels (no partial sums); otherwise tile t adds into partial slot t % slots,
// in tile order, and the slots are added in slot order — the same plan as the NCHW weight gradient.
template <typename scalar_t>
void conv_backward_weight_nhwc(scalar_t* gw, const scalar_t* go, const scalar_t* in, const Geometry& g,
                               const at::TensorOptions& options) {
  const GroupDims d(g);
  const bool pointwise = is_pointwise(g);
  const int64_t rows = g.batch * d.positions, width = g.in_channels * d.taps;
  const auto product = [&](scalar_t* out, const scalar_t* cols, int64_t r0, int64_t m, int64_t grp, int64_t first,
                           int64_t count, scalar_t beta) {
    gemm<scalar_t>(true, false, count, d.k_per_group, m, scalar_t(1), go + r0 * g.out_channels + first, g.out_channels,
                   cols + grp * d.k_per_group, width, beta, out + first * d.k_per_group, d.k_per_group);
  };
  const Split tiles = nhwc_tiles(g, pointwise);
  const int64_t elems = g.out_channels * d.k_per_group;
  const int64_t slots = std::max<int64_t>(1, std::min({tiles.count, kMaxSlots, kMaxPartialElems / elems}));
  // Split by output channel, each task's product packs all the columns; by row tiles, the columns and grad_output
  // are packed once, but each slot's partial sum is zeroed and added. The one that moves fewer elements wins
  // (channel_split_pays for the forward). Interleaved on a 2-core Zen 4, weight gradient ours/torch, batch 8,
  // channel split -> row tiles: 1x1 144->24@56 1.44-1.52 -> 1.05-1.16, 1x1 32->16@112 2.22 -> 1.56, 1x1
  // 192->32@28 1.17 -> 1.05; 3x3 512@7 (7M elements against 21M) and 1x1 96->576@14 keep the channel split.
  // A third way where all the columns fit: tasks split the columns' columns (the weight's taps of input channels),
  // each packing its share of the columns and all of grad_output, as conv_backward_weight_small_cpu's. Only for
  // im2col's columns: 3x3/2 128@56 at batch 1 (2 tasks of 576 columns, where 2 tasks of 64 output channels each
  // packed all 1152) 1.33 -> 1.21 ms, torch's 1.26; but pointwise ones, whose columns are the input
  // rows themselves, were as fast or slower (1x1 512->2048@7 0.57 -> 0.70-1.32 ms).
  const Split column_split = channel_split(d.k_per_group, d.groups, kMinColumnRows);
  const int64_t by_channel = output_channel_split(g).count * rows * width + rows * g.out_channels;
  const int64_t by_columns =
      pointwise ? by_channel + 1 : rows * width + column_split.count * rows * g.out_channels;
  const int64_t by_tiles = rows * (width + g.out_channels) + 2 * slots * elems;
  if (rows * width <= kMaxColumnElems && std::min(by_channel, by_columns) <= by_tiles) {
    at::Tensor all_columns;
    const scalar_t* cols = in;
    if (!pointwise) {
      all_columns = at::empty({rows * width}, options);
      scalar_t* c = all_columns.data_ptr<scalar_t>();
      const Split tiles = nhwc_tiles(g, false);
      parallel_tasks(tiles.count, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t r0 = t * tiles.size, r1 = std::min(rows, r0 + tiles.size);
          im2col_nhwc(c + r0 * width, in, g, r0, r1);
        }
      });
      cols = c;
    }
    if (by_columns < by_channel) {
      channel_tasks(d.k_per_group, d.groups, [&](int64_t grp, int64_t first, int64_t count) {
        const int64_t column = first - grp * d.k_per_group;  // within the group's
        gemm<scalar_t>(true, false, d.out_per_group, count, rows, scalar_t(1), go + grp * d.out_per_group,
                       g.out_channels, cols + first, width, scalar_t(0),
                       gw + grp * d.out_per_group * d.k_per_group + column, d.k_per_group);
      }, kMinColumnRows);
      return;
    }
    output_channel_tasks(g, [&](int64_t grp, int64_t first, int64_t count) {
      product(gw, cols, 0, rows, grp, first, count, scalar_t(0));
    });
    return;
  }
  at::Tensor partial = at::zeros({slots, elems}, options);
  scalar_t* parts = partial.data_ptr<scalar_t>();
  parallel_tasks(slots, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> workspace(pointwise ? 0 : tiles.size * width);
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t t = slot; t < tiles.count; t += slots) {
        const int64_t r0 = t * tiles.size, m = std::min(rows, r0 + tiles.size) - r0;
        const scalar_t* cols = in + r0 * width;
        if (!pointwise) {
          im2col_nhwc(workspace.data(), in, g, r0, r0 + m);
          cols = workspace.data();
        }
        for (int64_t grp = 0; grp < d.groups; ++grp)
          product(parts + slot * elems, cols, r0, m, grp, grp * d.out_per_group, d.out_per_group, scalar_t(1));
      }
    }
  });
  std::copy_n(parts, elems, gw);
  for (int64_t slot = 1; slot < slots; ++slot)
    for (int64_t e = 0; e < elems; ++e) gw[e] += parts[slot * elems + e];
}

// grad_bias[c] = the sum of column c of grad_output's rows, in row order; tasks own channel ranges.
template <typename scalar_t>
void conv_backward_bias_nhwc(scalar_t* gb, const scalar_t* go, const Geometry& g) {
  const int64_t rows = g.batch * g.out_h * g.out_w;
  at::parallel_for(0, g.out_channels, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> sums(end - begin, 0.0);  // double: the sums run over batch × positions terms
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = go + r * g.out_channels + begin;
      for (int64_t c = 0; c < end - begin; ++c) sums[c] += row[c];
    }
    for (int64_t c = begin; c < end; ++c) gb[c] = static_cast<scalar_t>(sums[c - begin]);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_nhwc(const at::Tensor& grad_output_,
                                                                  const at::Tensor& input_, const at::Tensor& weight_,
                                                                  const Geometry& g, std::array<bool, 3> output_mask) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor grad_output = grad_output_.contiguous(cl);
  at::Tensor grad_input, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(input_.scalar_type(), "conv_backward_nhwc", [&] {
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    if (output_mask[0]) {
      grad_input = at::empty(input_.sizes(), input_.options().memory_format(cl));
      if (is_depthwise(g)) {
        depthwise_backward_input_nhwc_cpu(grad_input, grad_output, weight_.contiguous(), g);
      } else {
        const at::Tensor weight = weight_rows_nhwc(weight_);
        conv_backward_input_nhwc(grad_input.data_ptr<scalar_t>(), go, weight.const_data_ptr<scalar_t>(), g);
      }
    }
    if (output_mask[1]) {
      const at::Tensor input = input_.contiguous(cl);
      grad_weight = at::empty(weight_.sizes(), weight_.options().memory_format(cl));  // (C_out, KH, KW, C_in/g) in memory
      if (is_depthwise(g)) {
        depthwise_backward_weight_nhwc_cpu(grad_weight, grad_output, input, g);
      } else {
        conv_backward_weight_nhwc(grad_weight.data_ptr<scalar_t>(), go, input.const_data_ptr<scalar_t>(), g,
                                  input.options());
      }
    }
    if (output_mask[2]) {
      grad_bias = at::empty({g.out_channels}, grad_output.options());
      conv_backward_bias_nhwc(grad_bias.data_ptr<scalar_t>(), go, g);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

// NCHW tensors that the NHWC kernels compute faster run there, on channels-last copies, their results copied
// back to NCHW. The choice depends on the shapes alone, so results stay the same for every run and thread count.
// - Depthwise layers with short output rows that the tiles (depthwise_cpu.cpp) do not take: the NCHW kernel makes
//   a vectorised call per (output row, tap), and over rows this short those calls cost more than the arithmetic
//   (5x5 over 672 channels at 14x14: 3.9 ms, torch 0.27; transposed and back, 1.2). The tiles take the forward and
//   the stride-1 input gradient where the weights are finite, and the weight gradient where an image's tiles fit;
//   what is left here is the scatter input gradient of strides over 1 (and non-finite weights).
// - im2col convolutions over small images (at most kSmallImage input and kSmallOutput output positions): the
//   forward when the layer has at most kViaOutputChannels output channels a group; the backward when a position's
//   columns are at most kViaColumns long and the input or the output has at most kViaOutputChannels channels a
//   group. The NCHW GEMMs have the channels as rows and a block's positions as columns, which suits OpenBLAS
//   poorly when the channels are few; with many channels on both sides the NCHW kernels win (their backward
//   splits the channels over the whole batch; the channels-last input gradient packs the whole weight for every
//   block of two images). Interleaved on a 2-core Zen 5 with OpenBLAS, NCHW kernels -> channels-last copies, f+b
//   ours/torch: 5x5 128->128@14 1.8 -> 1.4-1.5, 5x5 64->64@14 2.1 -> 1.8; 3x3 512@7 the other way, 1.13-1.31 ->
//   0.97-0.99 (input gradient 6.2-6.4 -> 5.4-5.5 ms, weight gradient 6.6-7.2 -> 5.8-6.4); 3x3/2 256->512@14
//   and 2x2/2 384->768@14 within the noise. (On a Xeon with MKL, before OpenBLAS, the copies had won the
//   backward of 512@7 too.) Larger images stay: torch's channels-last -> NCHW copy slows to about 2 GB/s on
//   planes of 56x56 and up.
constexpr int64_t kShortRows = 20;
constexpr int64_t kSmallImage = 28 * 28, kSmallOutput = 14 * 14, kViaColumns = 512 * 9, kViaOutputChannels = 128;
bool via_nhwc(const at::Tensor& input, const Geometry& g, bool backward) {
  if (g.spatial_dims != 2 || input.dim() != 4 || g.empty()) return false;
  if (is_depthwise(g)) return depthwise_nhwc_supported(g) && g.out_w < kShortRows;
  if (is_pointwise(g) || g.in_h * g.in_w > kSmallImage || g.out_h * g.out_w > kSmallOutput) return false;
  const GroupDims d(g);
  if (!backward) return d.out_per_group <= kViaOutputChannels;
  return d.k_per_group <= kViaColumns && std::min(d.in_per_group, d.out_per_group) <= kViaOutputChannels;
}

// The forward of small images (whole_batch_forward): the batch's columns built once, then one product per task of
// output channels over every placement, scattered to (N, C_out, ...) at the end (channel_split_pays says when).
void conv_forward_small_cpu(at::Tensor& output, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias, const Geometry& g) {
  const GroupDims d(g);
  const Block all{0, g.batch, 0, d.positions};
  const at::Tensor columns = batch_columns(input, g);  // (C_in*KH*KW, N * positions)
  // (C_out, N * positions): one image's output itself
  at::Tensor out =
      g.batch == 1 ? block_matrix(output, all) : at::empty({g.out_channels, all.width()}, output.options());
  output_channel_tasks(g, [&](int64_t grp, int64_t first, int64_t count) {
    at::Tensor out_rows = out.narrow(0, first, count);
    if (bias.defined()) out_rows.copy_(bias.narrow(0, first, count).view({count, 1}).expand_as(out_rows));
    matmul(out_rows, weight.narrow(0, first, count), columns.narrow(0, grp * d.k_per_group, d.k_per_group),
           bias.defined() ? 1 : 0, /*forward=*/true);
  });
  if (g.batch > 1) scatter_block(output, 0, out, all);
}

at::Tensor conv_forward_cpu(const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                            int64_t groups) {
  const Geometry g = check_conv(input_, weight_, bias, stride, padding, dilation, groups);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner ATen calls are plain arithmetic
  if (is_reduced_precision(input_.scalar_type())) {  // computed in float32, rounded once at the end
    const auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    const std::optional<at::Tensor> bias_f = bias.has_value() && bias->defined() ? std::optional(f(*bias)) : std::nullopt;
    return conv_forward_cpu(f(input_), f(weight_), bias_f, stride, padding, dilation, groups).to(input_.scalar_type());
  }
  const bool channels_last = channels_last_result(input_, g);
  if (grouped_direct_applies(input_, g)) {  // few channels a group (grouped_cpu.cpp), any layout
    at::Tensor output = at::empty(g.output_shape(g.out_channels), input_.options().memory_format(
                                      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
    grouped_forward_cpu(output, input_, weight_, bias.has_value() ? *bias : at::Tensor(), g);
    return output;
  }
  if (winograd_applies(input_, g, /*backward=*/false)) {  // 3x3 stride 1 in the plane (winograd_cpu.cpp), any layout
    const at::Tensor bias_ = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    at::Tensor output = winograd_forward_cpu(input_, weight_, bias_, g, channels_last);
    if (output.defined()) return output;
    // else an output was not finite: the kernels below give a direct sum's infinities and NaN, as torch's
  }
  // NCHW depthwise on channels-last tiles of one vector of channels (depthwise_cpu.cpp): faster than the NCHW
  // kernel at every size measured, and than whole channels-last copies of short rows. Interleaved, 2-core Zen 3,
  // batch 8, forward ours/torch: 5x5 1152@7 2.3 -> 1.2, 3x3 672@14 1.7 -> 0.7-0.8, 5x5/2 144@56 3.3 -> 0.9,
  // 3x3 144@56 (the NCHW kernel) 2.3 -> 1.7 ms. Channels-last tensors keep their kernels, which read the channels
  // in place (the tiles' copies took twice their time), but for 5x5 and 7x7 over short rows (forward_nhwc_kernel).
  if (is_depthwise(g) && !channels_last && depthwise_tiles_apply(weight_, g)) {
    at::Tensor output = at::empty(g.output_shape(g.out_channels), input_.options());
    depthwise_forward_tiles_cpu(output, input_.contiguous(), weight_,
                                bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor(), g, false);
    return output;
  }
  if (g.spatial_dims == 3 && (channels_last || is_depthwise(g)))
    return conv3d_forward_by_depth(input_, weight_, bias, g, channels_last, conv_forward_cpu);  // sum over depth taps
  if (channels_last && !g.empty() && (!is_depthwise(g) || depthwise_nhwc_supported(g)))
    return conv_forward_nhwc(input_, weight_, bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor(), g,
                             /*long_runs=*/true);
  if (channels_last)  // depthwise with a channel multiplier: the NCHW kernel, its result laid out as promised
    return conv_forward_cpu(standard_nchw(input_), weight_, bias, stride, padding, dilation, groups)
        .contiguous(at::MemoryFormat::ChannelsLast);
  if (via_nhwc(input_, g, /*backward=*/false)) {
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    return conv_forward_nhwc(input_.contiguous(at::MemoryFormat::ChannelsLast), weight_, b, g, /*long_runs=*/false)
        .contiguous();
  }
  const at::Tensor input = input_.contiguous();  // (N, C_in, H, W)
  const GroupDims d(g);
  const at::Tensor weight = weight_.contiguous().view({g.out_channels, d.k_per_group});  // (C_out, K/g)
  at::Tensor output = at::empty(g.output_shape(g.conv_output_channels()), input.options());  // (N, C_out, OH, OW)
  if (g.empty()) return output;
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_ = has_bias ? bias->contiguous() : at::Tensor();  // (C_out,)
  if (is_depthwise(g)) {
    depthwise_forward_cpu(output, input, weight, bias_, g);
    return output;
  }
  const Blocking blocks = make_blocking(g, /*allow_tiles=*/true, /*cache_tiles=*/true);
  if (whole_batch_forward(g, blocks.count)) {
    conv_forward_small_cpu(output, input, weight, bias_, g);
    return output;
  }
  const Blocking blocking = even_tasks(blocks, g);
  const at::Tensor bias_column = has_bias ? bias_.view({g.out_channels, 1}) : at::Tensor();
  parallel_tasks(blocking.count, [&](int64_t begin, int64_t end) {
    const at::Tensor workspace = column_workspace(input, g, blocking);
    for (int64_t task = begin; task < end; ++task) {
      const Block blk = clamp_block(blocking[task], g);
      const at::Tensor columns = block_columns(input, blk, g, workspace);  // (C_in*KH*KW, width)
      // One image: write straight into the output; several: into a (C_out, width) matrix, then scatter.
      at::Tensor out = blk.images == 1 ? block_matrix(output, blk) : at::empty({g.out_channels, blk.width()}, output.options());
      for (int64_t grp = 0; grp < d.groups; ++grp) {
        at::Tensor out_g = out.narrow(0, grp * d.out_per_group, d.out_per_group);
        const at::Tensor weight_g = weight.narrow(0, grp * d.out_per_group, d.out_per_group);
        const at::Tensor columns_g = columns.narrow(0, grp * d.k_per_group, d.k_per_group);
        if (has_bias) out_g.copy_(bias_column.narrow(0, grp * d.out_per_group, d.out_per_group).expand_as(out_g));
        matmul(out_g, weight_g, columns_g, has_bias ? 1 : 0, /*forward=*/true);
      }
      if (blk.images > 1) scatter_block(output, 0, out, blk);
    }
  });
  return output;
}

// grad_input for a block of whole images and a block of one group's input channels:
// grad_columns = weight^T @ grad_output, then col2im. Tasks own disjoint (image, channel) planes,
// so they run in parallel without ever sharing a pixel.
void conv_backward_input_cpu(at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                             const Geometry& g) {
  const GroupDims d(g);
  // Small images: one block of the whole batch, the tasks split only the channels (3x3 512 @7: 0.8x the
  // time of blocks of 2 images, whose GEMMs saw 98 placements). Tiles of an image only where no col2im
  // has to add across them: pointwise.
  const Blocking blocking = whole_batch_backward(g) ? Blocking{g.batch, d.positions, 1, 1}
                                                    : make_blocking(g, /*allow_tiles=*/is_pointwise(g));
  const Split channels = split(d.in_per_group, ceil_div(kMinTasks, blocking.count * d.groups), 1,
                               ceil_div(d.k_per_group * blocking.images * d.positions, kMaxColumnElems));
  const int64_t per_block = d.groups * channels.count;
  parallel_tasks(blocking.count * per_block, [&](int64_t begin, int64_t end) {
    const at::Tensor workspace = at::empty({channels.size * d.taps * blocking.images * d.positions}, grad_input.options());
    for (int64_t task = begin; task < end; ++task) {
      const Block blk = clamp_block(blocking[task / per_block], g);
      const int64_t grp = (task % per_block) / channels.count;
      const int64_t c0 = (task % channels.count) * channels.size;
      const int64_t cb = std::min(d.in_per_group, c0 + channels.size) - c0;
      const int64_t first_channel = grp * d.in_per_group + c0;
      const at::Tensor weight_block =  // (C_out/g, cb*KH*KW): these channels' taps of this group's filters
          weight.narrow(0, grp * d.out_per_group, d.out_per_group).narrow(1, c0 * d.taps, cb * d.taps);
      const at::Tensor grad_out_g =  // (C_out/g, width)
          block_matrix(grad_output, blk, grp * d.out_per_group, d.out_per_group);
      if (is_pointwise(g) && blk.images == 1) {  // the product is this image's gradient: no copy
        at::Tensor grad_in = grad_input[blk.n0].view({g.in_channels, d.positions}).narrow(0, first_channel, cb)
                                 .narrow(1, blk.p0, blk.p1 - blk.p0);
        matmul(grad_in, weight_block.t(), grad_out_g, 0);
        continue;
      }
      at::Tensor grad_columns = workspace.narrow(0, 0, cb * d.taps * blk.width()).view({cb * d.taps, blk.width()});
      matmul(grad_columns, weight_block.t(), grad_out_g, 0);  // (cb*KH*KW, width)
      if (is_pointwise(g)) {
        scatter_block(grad_input, first_channel, grad_columns, blk);
        continue;
      }
      AT_DISPATCH_FLOATING_TYPES(grad_input.scalar_type(), "col2im", [&] {
        for (int64_t k = 0; k < blk.images; ++k)
          col2im(grad_input[blk.n0 + k][first_channel].data_ptr<scalar_t>(),
                 grad_columns.data_ptr<scalar_t>() + k * d.positions, blk.width(), cb, g);
      });
    }
  });
}

// grad_weight when every image's columns fit one workspace (columns_fit_once): the columns are built once
// (batch_columns), and the tasks split the weight's columns (the columns' rows: taps of input channels) instead of
// the images, each one GEMM over every placement. No partial sums: for 512 channels at 7x7 the slots' zero-fill and
// sum moved more bytes than the GEMMs' own reads, and the GEMMs were thin (98 placements). Not split by output
// channel: each task's BLAS call packs (copies) all of its other operand, so every task packed all the columns, where
// now each packs its own rows of them and the group's grad_output (the smaller). One core, OpenBLAS, batch 8, the
// products alone, output channels in tasks of 128 -> column rows in tasks of 512: ConvTranspose 4x4/2 256->128@16
// 25.4 -> 23.0 ms, 3x3 256@14 19.4 -> 18.1, 3x3/2 128->256@28 9.2 -> 8.9, 3x3 512@7 and 1x1 2048->512@7 the same
// (a Zen 4; tasks of 128 rows gave less). Each weight entry has the same terms either way; its bits may differ from
// the channel split's (other shapes can take other BLAS kernels), never with the thread count.
void conv_backward_weight_small_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                                    const Geometry& g) {
  const GroupDims d(g);
  const Block all{0, g.batch, 0, d.positions};
  const at::Tensor columns = batch_columns(input, g);  // (C_in*KH*KW, N * positions)
  const at::Tensor grad_out = block_matrix(grad_output, all);  // (C_out, N * positions)
  at::Tensor flat = grad_weight.view({g.out_channels, d.k_per_group});
  channel_tasks(d.k_per_group, d.groups, [&](int64_t grp, int64_t first, int64_t count) {
    at::Tensor out = flat.narrow(0, grp * d.out_per_group, d.out_per_group).narrow(1, first - grp * d.k_per_group, count);
    matmul(out, grad_out.narrow(0, grp * d.out_per_group, d.out_per_group), columns.narrow(0, first, count).t(), 0);
  }, kMinColumnRows);
}

// grad_weight = the sum over blocks of grad_output_block @ columns_block^T. Block t adds into partial
// slot t % slots, in block order; then the slots are added in slot order.
void conv_backward_weight_cpu(at::Tensor& grad_weight, const at::Tensor& grad_output, const at::Tensor& input,
                              const Geometry& g) {
  const GroupDims d(g);
  if (whole_batch_backward(g)) {
    conv_backward_weight_small_cpu(grad_weight, grad_output, input, g);
    return;
  }
  const Blocking blocking = make_blocking(g, /*allow_tiles=*/true, /*cache_tiles=*/true);
  const int64_t slots =
      std::max<int64_t>(1, std::min({blocking.count, kMaxSlots, kMaxPartialElems / grad_weight.numel()}));
  // each slot's first product sets it (beta 0), the rest add to it: no zero-filled slots first
  at::Tensor partial = at::empty({slots, g.out_channels, d.k_per_group}, grad_weight.options());
  parallel_tasks(slots, [&](int64_t begin, int64_t end) {
    const at::Tensor workspace = column_workspace(input, g, blocking);
    for (int64_t slot = begin; slot < end; ++slot) {
      for (int64_t task = slot; task < blocking.count; task += slots) {
        const Block blk = clamp_block(blocking[task], g);
        const at::Tensor columns = block_columns(input, blk, g, workspace);  // (C_in*KH*KW, width)
        const at::Tensor grad_out = block_matrix(grad_output, blk);          // (C_out, width)
        for (int64_t grp = 0; grp < d.groups; ++grp) {
          at::Tensor partial_g = partial[slot].narrow(0, grp * d.out_per_group, d.out_per_group);
          matmul(partial_g, grad_out.narrow(0, grp * d.out_per_group, d.out_per_group),
                 columns.narrow(0, grp * d.k_per_group, d.k_per_group).t(), task == slot ? 0 : 1);
        }
      }
    }
  });
  at::Tensor flat = grad_weight.view({g.out_channels, d.k_per_group});
  flat.copy_(partial[0]);
  for (int64_t slot = 1; slot < slots; ++slot) flat.add_(partial[slot]);
}

// grad_bias[c] = sum over images and positions of grad_output[n, c] (contiguous), one channel per task.
at::Tensor conv_backward_bias_cpu(const at::Tensor& grad_output, const Geometry& g) {
  if (g.no_input_channels())  // an output with no channels (torch's): the bias never reached it
    return at::zeros({g.out_channels}, grad_output.options());
  at::Tensor grad_bias = at::empty({g.out_channels}, grad_output.options());
  const int64_t positions = g.out_positions();
  AT_DISPATCH_FLOATING_TYPES(grad_output.scalar_type(), "conv_backward_bias", [&] {
    const scalar_t* go = grad_output.data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.data_ptr<scalar_t>();
    at::parallel_for(0, g.out_channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double sum = 0;  // double: the sum runs over batch × positions terms
        for (int64_t n = 0; n < g.batch; ++n) {
          const scalar_t* plane = go + (n * g.out_channels + c) * positions;
          for (int64_t p = 0; p < positions; ++p) sum += plane[p];
        }
        gb[c] = static_cast<scalar_t>(sum);
      }
    });
  });
  return grad_bias;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& weight_, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const Geometry g = check_conv(input_, weight_, std::nullopt, stride, padding, dilation, groups);
  check_conv_grad_output(grad_output_, input_, g);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (is_reduced_precision(input_.scalar_type())) {  // computed in float32, rounded once at the end
    const auto f = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto grads = conv_backward_cpu(f(grad_output_), f(input_), f(weight_), stride, padding, dilation, groups, output_mask);
    const auto back = [&](const at::Tensor& t) { return t.defined() ? t.to(input_.scalar_type()) : t; };
    return {back(std::get<0>(grads)), back(std::get<1>(grads)), back(std::get<2>(grads))};
  }
  const bool channels_last = channels_last_result(input_, g);
  // The input and weight gradients of 3x3 stride-1 convolutions by Winograd (winograd_cpu.cpp), and of grouped ones
  // by the direct kernels (grouped_cpu.cpp), in either layout; `mask` keeps what the other kernels still compute,
  // and with_computed puts the two together.
  std::array<bool, 3> mask = output_mask;
  at::Tensor computed_input, computed_weight;
  if (winograd_applies(input_, g, /*backward=*/false)) {
    std::tie(computed_input, computed_weight) = winograd_backward_cpu(
        grad_output_, input_, weight_, g, channels_last,
        output_mask[0] && winograd_applies(input_, g, /*backward=*/true), output_mask[1]);
    // what it did not compute, or left undefined for a value that is not finite, the kernels below compute
    mask[0] = output_mask[0] && !computed_input.defined();
    mask[1] = output_mask[1] && !computed_weight.defined();
  }
  if (g.spatial_dims == 3 && (channels_last || is_depthwise(g))) {  // over depth taps (depth_taps.h)
    if (mask[0] || mask[1]) {
      auto [grad_input, grad_weight] = conv3d_backward_by_depth(grad_output_, input_, weight_, g, channels_last,
                                                                mask[0], mask[1], conv_backward_cpu);
      if (mask[0]) computed_input = grad_input;
      if (mask[1]) computed_weight = grad_weight;
    }
    return {computed_input, computed_weight,
            output_mask[2] ? conv_backward_bias_cpu(grad_output_.contiguous(), g) : at::Tensor()};
  }
  // Grouped convolutions with few channels a group: the direct kernels (grouped_cpu.cpp), in either layout; the
  // input gradient where it is a forward of grad_output (finite weights).
  if (grouped_direct_applies(input_, g)) {
    const auto layout = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    if (mask[0] && grouped_backward_input_applies(weight_, g)) {
      computed_input = at::empty(input_.sizes(), input_.options().memory_format(layout));
      grouped_backward_input_cpu(computed_input, grad_output_, weight_, g);
      mask[0] = false;
    }
    if (mask[1]) {
      computed_weight = at::empty(weight_.sizes(), weight_.options().memory_format(layout));
      grouped_backward_weight_cpu(computed_weight, grad_output_, input_, g);
      mask[1] = false;
    }
  }
  // NCHW depthwise gradients on tiles (as the forward): the stride-1 input gradient as a forward of grad_output,
  // the weight gradient on whole-image tiles.
  Geometry flipped;
  if (mask[0] && !channels_last && is_depthwise(g) && input_gradient_as_forward(g, flipped) &&
      depthwise_tiles_apply(weight_, flipped)) {
    computed_input = at::empty(input_.sizes(), input_.options());
    depthwise_forward_tiles_cpu(computed_input, grad_output_.contiguous(), weight_, at::Tensor(), flipped, true);
    mask[0] = false;
  }
  if (mask[1] && !channels_last && is_depthwise(g) && depthwise_image_tiles_apply(g)) {
    computed_weight = at::empty(weight_.sizes(), weight_.options());
    depthwise_backward_weight_tiles_cpu(computed_weight, grad_output_.contiguous(), input_.contiguous(), g);
    mask[1] = false;
  }
  using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
  const auto with_computed = [&](const Grads& grads) -> Grads {
    return {mask[0] ? std::get<0>(grads) : computed_input, mask[1] ? std::get<1>(grads) : computed_weight,
            std::get<2>(grads)};
  };
  if (channels_last && !g.empty() && (!is_depthwise(g) || depthwise_nhwc_supported(g)))
    return with_computed(conv_backward_nhwc(grad_output_, input_, weight_, g, mask));
  if (channels_last) {  // depthwise with a multiplier: the NCHW kernels, results laid out as promised
    auto grads = conv_backward_cpu(grad_output_, standard_nchw(input_), weight_, stride, padding, dilation, groups,
                                   output_mask);
    const auto cl = [](const at::Tensor& t) { return t.defined() ? t.contiguous(at::MemoryFormat::ChannelsLast) : t; };
    return {cl(std::get<0>(grads)), cl(std::get<1>(grads)), std::get<2>(grads)};
  }
  if ((mask[0] || mask[1]) && via_nhwc(input_, g, /*backward=*/true)) {  // on channels-last copies, as the forward
    // (the input's values are read for the weight gradient only: a transposed convolution passes a
    // zero-strided stand-in for its shape, functional.py)
    auto grads = conv_backward_nhwc(grad_output_, mask[1] ? input_.contiguous(at::MemoryFormat::ChannelsLast) : input_,
                                    weight_, g, mask);
    const auto nchw = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : t; };
    return with_computed({nchw(std::get<0>(grads)), nchw(std::get<1>(grads)), std::get<2>(grads)});
  }
  const at::Tensor grad_output = grad_output_.contiguous();  // (N, C_out, OH, OW)
  at::Tensor grad_input = computed_input, grad_weight = computed_weight, grad_bias;
  if (mask[0]) {
    grad_input = at::empty(input_.sizes(), input_.options());  // (N, C_in, H, W)
    const at::Tensor weight = weight_.contiguous().view({g.out_channels, GroupDims(g).k_per_group});
    if (!g.empty() && is_depthwise(g)) {
      depthwise_backward_input_cpu(grad_input, grad_output, weight, g);
    } else if (!g.empty()) {
      conv_backward_input_cpu(grad_input, grad_output, weight, g);
    }
  }
  if (mask[1]) {
    // (C_out, C_in/g, KH, KW): every entry written below, but for an empty batch or no input channels
    grad_weight = g.empty() ? at::zeros(weight_.sizes(), weight_.options())
                            : at::empty(weight_.sizes(), weight_.options());
    if (!g.empty() && is_depthwise(g)) {
      depthwise_backward_weight_cpu(grad_weight, grad_output, input_.contiguous(), g);
    } else if (!g.empty()) {
      conv_backward_weight_cpu(grad_weight, grad_output, input_.contiguous(), g);
    }
  }
  if (output_mask[2]) grad_bias = conv_backward_bias_cpu(grad_output, g);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(manualgrad, CPU, m) {
  m.impl("conv_forward", &conv_forward_cpu);
  m.impl("conv_backward", &conv_backward_cpu);
}

}  // namespace manualgrad
