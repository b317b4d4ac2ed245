// benchkit::conv_stage(x, weight, bias?, stride, pad_h, pad_w, relu, pool, channels_last) -> y
//
// y = conv2d(x, weight, bias, stride, padding), then a ReLU when ``relu``, then (``pool`` 2) a 2x2 max-pool
// of stride 2, in one pass: x fp32 NCHW or channels-last (read as it is), weight (out, in, kh, kw), groups 1,
// dilation 1, floor-mode pooling (an odd last row or column is dropped, as nn.MaxPool2d(2) does); y in
// channels-last layout when ``channels_last``, else NCHW. Built by benchkit/deployment/fused.py with
// csr_linear.cpp and used by benchkit/deployment/stages.py.
//
// Why it exists: a narrow convolution (few channels, the shape channel pruning leaves) is where oneDNN is
// least efficient, and the max-pool after it is a separate pass over memory that the FLOP count leaves out.
// On this project's CPU (one thread, batch 64): LeNet-5's 1->5 channel 5x5 convolution took 224 us in
// oneDNN (21 GMAC/s) and its max-pool another 60-330 us depending on the layout, both 47 us here; a
// resnet18 stem at 4x channel pruning (7x7 stride 2, 3->36 channels, 32x32 input) took 1.55 ms with its
// ReLU and max-pool in oneDNN's channels-last path and 0.74 ms here. Dense layers gain too (LeNet-5's
// 1->20 stage: 177 us against 0.7-0.8 ms), so deploy offers the fused form to the dense model as well and
// keeps it per layer only where measured faster: nothing the kernel alone gives is credited to pruning.
//
// How: the batch is the vector dimension. Each block of 16 samples is transposed (8x8 tiles) into xt,
// [channel][row][column][16] for an NCHW input or [row][column][channel][16] for a channels-last one, with
// the zero padding written in, so every load is one whole register and every weight one broadcast. Four
// outputs and up to 6 output channels are computed at once (24 accumulators of 32 registers): with a pool,
// the four convolution outputs of one 2x2 window, reduced by max; without, four neighbours in a row:
//   acc[position][channel] = sum over (c, ky, kx) of w[o, c, ky, kx] * xt[c][stride*y + ky][stride*x + kx]
//   y[o] = (max over the window of) acc, + bias, then ReLU (both commute with the max, being monotone)
// The block's outputs are transposed back into y's layout. Samples past the last whole block run in zeroed
// lanes and are not written. Blocks are split over torch's intra-op threads (at::parallel_for).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using namespace benchkit_simd;

constexpr int L = 16;  // samples per block: one AVX-512 register of fp32
constexpr int OB = 6;  // output channels per group (x 4 positions = 24 accumulators)

inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

struct Geometry {
  int64_t in, out, kh, kw, stride, oh, ow;  // channels, kernel, stride, outputs (after the pool)
  int64_t xc, xy, xx;                       // xt's strides (floats) per channel, padded row, padded column
  int64_t yc, yy, yx;                       // yt's strides per channel, row, column
};

// Output channels [o0, o0 + G) of one block; POOL: each output is the max of a 2x2 window of convolutions.
template <bool POOL, int G>
void group(const float* xt, const float* w, const float* bias, bool relu, const Geometry& g, int64_t o0, float* yt) {
  const int64_t kk = g.kh * g.kw, wstride = g.in * kk, s = g.stride;
  for (int64_t y = 0; y < g.oh; ++y) {
    for (int64_t x = 0; x < g.ow; x += POOL ? 1 : 4) {
      const int n = POOL ? 4 : static_cast<int>(std::min<int64_t>(4, g.ow - x));  // positions written
      int64_t off[4];  // each position's top-left input, relative to the block
      for (int p = 0; p < 4; ++p) {
        const int q = std::min(p, n - 1);  // past the row's end: recompute the last one, not stored
        const int64_t cy = POOL ? 2 * y + q / 2 : y, cx = POOL ? 2 * x + q % 2 : x + q;
        off[p] = cy * s * g.xy + cx * s * g.xx;
      }
      v16 acc[4][G];
      for (int p = 0; p < 4; ++p)
        for (int o = 0; o < G; ++o) acc[p][o] = v16{};
      for (int64_t c = 0; c < g.in; ++c) {
        const float* wc = w + o0 * wstride + c * kk;
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          for (int64_t kx = 0; kx < g.kw; ++kx) {
            const float* r = xt + c * g.xc + ky * g.xy + kx * g.xx;
            const v16 v0 = load16(r + off[0]), v1 = load16(r + off[1]), v2 = load16(r + off[2]), v3 = load16(r + off[3]);
            for (int o = 0; o < G; ++o) {
              const v16 wv = v16{} + wc[o * wstride + ky * g.kw + kx];
              acc[0][o] += wv * v0;
              acc[1][o] += wv * v1;
              acc[2][o] += wv * v2;
              acc[3][o] += wv * v3;
            }
          }
        }
      }
      for (int o = 0; o < G; ++o) {
        const float b = bias != nullptr ? bias[o0 + o] : 0.0f;
        float* dst = yt + (o0 + o) * g.yc + y * g.yy + x * g.yx;
        if (POOL) {
          v16 m = vmax(vmax(acc[0][o], acc[1][o]), vmax(acc[2][o], acc[3][o])) + b;
          store16(dst, relu ? vmax(m, v16{}) : m);
        } else {
          for (int p = 0; p < n; ++p) {
            const v16 m = acc[p][o] + b;
            store16(dst + p * g.yx, relu ? vmax(m, v16{}) : m);
          }
        }
      }
    }
  }
}

template <bool POOL>
void all_channels(const float* xt, const float* w, const float* bias, bool relu, const Geometry& g, float* yt) {
  int64_t o0 = 0;
  for (; o0 + OB <= g.out; o0 += OB) group<POOL, OB>(xt, w, bias, relu, g, o0, yt);
  switch (g.out - o0) {  // the last channels, fewer than a group
    case 1: group<POOL, 1>(xt, w, bias, relu, g, o0, yt); break;
    case 2: group<POOL, 2>(xt, w, bias, relu, g, o0, yt); break;
    case 3: group<POOL, 3>(xt, w, bias, relu, g, o0, yt); break;
    case 4: group<POOL, 4>(xt, w, bias, relu, g, o0, yt); break;
    case 5: group<POOL, 5>(xt, w, bias, relu, g, o0, yt); break;
    default: break;
  }
}

at::Tensor conv_stage(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      int64_t stride, int64_t pad_h, int64_t pad_w, bool relu, int64_t pool, bool channels_last) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "benchkit::conv_stage takes fp32 CPU tensors, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "benchkit::conv_stage takes a 4-D input (N, C, H, W) and weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "benchkit::conv_stage: the weight has ", weight.size(1),
              " input channels, the input ", x.size(1));
  TORCH_CHECK(stride >= 1 && pad_h >= 0 && pad_w >= 0, "benchkit::conv_stage: stride must be >= 1, padding >= 0");
  TORCH_CHECK(pool == 1 || pool == 2, "benchkit::conv_stage: pool must be 1 (none) or 2 (2x2 max-pool), got ", pool);
  const bool in_cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const at::Tensor xc = in_cl ? x : x.contiguous(), wc = weight.contiguous();
  const int64_t n = xc.size(0), in = xc.size(1), h = xc.size(2), wd = xc.size(3);
  const int64_t hp = h + 2 * pad_h, wp = wd + 2 * pad_w, kh = wc.size(2), kw = wc.size(3);
  TORCH_CHECK(hp >= kh && wp >= kw, "benchkit::conv_stage: the kernel is larger than the padded input");
  Geometry g{in, wc.size(0), kh, kw, stride, ((hp - kh) / stride + 1) / pool, ((wp - kw) / stride + 1) / pool,
             0, 0, 0, 0, 0, 0};
  if (in_cl) {
    g.xc = L, g.xx = in * L, g.xy = wp * in * L;
  } else {
    g.xc = hp * wp * L, g.xy = wp * L, g.xx = L;
  }
  if (channels_last) {
    g.yc = L, g.yx = g.out * L, g.yy = g.ow * g.out * L;
  } else {
    g.yc = g.oh * g.ow * L, g.yy = g.ow * L, g.yx = L;
  }
  at::Tensor y = at::empty({n, g.out, g.oh, g.ow}, xc.options().memory_format(
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  at::Tensor bc;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == g.out && bias->scalar_type() == at::kFloat, "bias must be fp32 of out channels");
    bc = bias->contiguous();
    b = bc.data_ptr<float>();
  }
  if (n == 0 || g.oh == 0 || g.ow == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp_ = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t in_plane = in * h * wd, out_plane = g.out * g.oh * g.ow, xt_size = in * hp * wp * L;
  at::parallel_for(0, (n + L - 1) / L, 1, [&](int64_t begin, int64_t end) {
    // kept per thread between calls (a fresh buffer is page faults on every call), up to 16 MB: a larger
    // one (a wide layer at ImageNet's size: 16 samples x 64 x 226 x 226 floats is 209 MB) is freed after
    // the call rather than held for the life of the process
    constexpr int64_t kKeep = int64_t{1} << 22;  // floats
    thread_local std::vector<float> xt_kept, yt_kept;
    std::vector<float> xt_own, yt_own;
    const bool keep = xt_size + out_plane * L <= kKeep;
    float* xt = aligned(keep ? xt_kept : xt_own, static_cast<size_t>(xt_size));
    float* yt = aligned(keep ? yt_kept : yt_own, static_cast<size_t>(out_plane * L));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * L, mb = std::min<int64_t>(L, n - n0);
      if (mb < L || pad_h > 0 || pad_w > 0) std::fill(xt, xt + xt_size, 0.0f);  // padding, idle lanes
      const float* src = xp + n0 * in_plane;
      if (in_cl) {  // each sample's row r is wd * in floats, channels innermost
        for (int64_t r = 0; r < h; ++r)
          transpose(src + r * wd * in, mb, wd * in, in_plane, xt + ((r + pad_h) * wp + pad_w) * in * L, L, true);
      } else {
        for (int64_t c = 0; c < in; ++c)
          for (int64_t r = 0; r < h; ++r)
            transpose(src + (c * h + r) * wd, mb, wd, in_plane, xt + ((c * hp + r + pad_h) * wp + pad_w) * L, L, true);
      }
      if (pool == 2) {
        all_channels<true>(xt, wp_, b, relu, g, yt);
      } else {
        all_channels<false>(xt, wp_, b, relu, g, yt);
      }
      transpose(yt, out_plane, mb, L, yp + n0 * out_plane, out_plane, /*src_in_order=*/false);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(benchkit, m) {
  m.def("conv_stage(Tensor x, Tensor weight, Tensor? bias, int stride, int pad_h, int pad_w, bool relu, int pool, "
        "bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(benchkit, CPU, m) {
  m.impl("conv_stage", &conv_stage);
}
