// benchkit::conv_pool(x, weight, bias?, pad_h, pad_w, relu) -> y
//
// y = max_pool2d(conv2d(x, weight, bias, stride 1, padding (pad_h, pad_w)), 2) with an optional ReLU, in one
// pass: x NCHW fp32, weight (out, in, kh, kw), groups 1, dilation 1, floor-mode pooling (an odd last
// row or column is dropped, as nn.MaxPool2d(2) does). Built by benchkit/deployment/fused.py with
// csr_linear.cpp and used by benchkit/deployment/stages.py for a convolution followed by a 2x2 max-pool.
//
// Why it exists: a narrow convolution (few channels, the shape channel pruning leaves) is where oneDNN
// is least efficient, and the max-pool after it is a separate pass over memory that the FLOP count
// leaves out. On this project's CPU (one thread, batch 64, 28x28 input, 5x5 kernel) a 1->5 channel
// convolution took 224 us in oneDNN at 21 GMAC/s and its max-pool another 60-330 us, depending on the
// layout; here both take 57 us (81 GMAC/s). Dense LeNet-5's 1->20 stage took 207 us here against
// 0.7-0.8 ms, so deploy offers the fused form to the dense model too and nothing is credited to pruning
// that the kernel alone gives.
//
// How: the batch is the vector dimension. Each block of 16 samples is transposed (8x8 tiles) into
// xt[channel][row][column][16] with the zero padding written in, so every load is one whole register and
// every weight one broadcast:
//   for each pooled output (py, px) and each group of up to 6 output channels:
//     acc[window position 0..3][channel] = sum over (c, ky, kx) of w[o, c, ky, kx] * xt[c][2py+dy+ky][2px+dx+kx]
//     y[o] = max over the window of acc, + bias, then ReLU (both commute with the max, being monotone)
// 4 window positions x 6 channels = 24 accumulators held in registers (of 32). The pooled block
// yt[channel][row][column][16] is transposed back into NCHW. Samples past the last whole block run in
// zeroed lanes and are not written. Blocks are split over torch's intra-op threads (at::parallel_for).

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
constexpr int OB = 6;  // output channels per group (x 4 window positions = 24 accumulators)

inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

struct Shape {
  int64_t in, hp, wp, out, kh, kw, ph, pw;  // input channels, padded input rows/columns, output channels,
                                            // kernel, pooled output rows/columns
};

// Output channels [o0, o0 + G) of one block: xt and yt as in the header comment.
template <int G>
void group(const float* xt, const float* w, const float* bias, bool relu, const Shape& s, int64_t o0, float* yt) {
  const int64_t kk = s.kh * s.kw, plane = s.hp * s.wp, wstride = s.in * kk;
  for (int64_t py = 0; py < s.ph; ++py) {
    for (int64_t px = 0; px < s.pw; ++px) {
      v16 acc[4][G];
      for (int p = 0; p < 4; ++p)
        for (int o = 0; o < G; ++o) acc[p][o] = v16{};
      for (int64_t c = 0; c < s.in; ++c) {
        const float* xc = xt + (c * plane + 2 * py * s.wp + 2 * px) * L;
        const float* wc = w + o0 * wstride + c * kk;
        for (int64_t ky = 0; ky < s.kh; ++ky) {
          for (int64_t kx = 0; kx < s.kw; ++kx) {
            const float* r = xc + (ky * s.wp + kx) * L;
            const v16 v0 = load16(r), v1 = load16(r + L), v2 = load16(r + s.wp * L), v3 = load16(r + (s.wp + 1) * L);
            for (int o = 0; o < G; ++o) {
              const v16 wv = v16{} + wc[o * wstride + ky * s.kw + kx];
              acc[0][o] += wv * v0;
              acc[1][o] += wv * v1;
              acc[2][o] += wv * v2;
              acc[3][o] += wv * v3;
            }
          }
        }
      }
      for (int o = 0; o < G; ++o) {
        v16 m = vmax(vmax(acc[0][o], acc[1][o]), vmax(acc[2][o], acc[3][o]));
        if (bias != nullptr) m += bias[o0 + o];
        if (relu) m = vmax(m, v16{});
        store16(yt + (((o0 + o) * s.ph + py) * s.pw + px) * L, m);
      }
    }
  }
}

void all_channels(const float* xt, const float* w, const float* bias, bool relu, const Shape& s, float* yt) {
  int64_t o0 = 0;
  for (; o0 + OB <= s.out; o0 += OB) group<OB>(xt, w, bias, relu, s, o0, yt);
  switch (s.out - o0) {  // the last channels, fewer than a group
    case 1: group<1>(xt, w, bias, relu, s, o0, yt); break;
    case 2: group<2>(xt, w, bias, relu, s, o0, yt); break;
    case 3: group<3>(xt, w, bias, relu, s, o0, yt); break;
    case 4: group<4>(xt, w, bias, relu, s, o0, yt); break;
    case 5: group<5>(xt, w, bias, relu, s, o0, yt); break;
    default: break;
  }
}

at::Tensor conv_pool(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     int64_t pad_h, int64_t pad_w, bool relu) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "benchkit::conv_pool takes fp32 CPU tensors, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4, "benchkit::conv_pool takes a 4-D input (N, C, H, W) and weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "benchkit::conv_pool: the weight has ", weight.size(1),
              " input channels, the input ", x.size(1));
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "benchkit::conv_pool: negative padding");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const int64_t n = xc.size(0), in = xc.size(1), h = xc.size(2), wd = xc.size(3);
  Shape s{in, h + 2 * pad_h, wd + 2 * pad_w, wc.size(0), wc.size(2), wc.size(3), 0, 0};
  TORCH_CHECK(s.hp >= s.kh && s.wp >= s.kw, "benchkit::conv_pool: the kernel is larger than the padded input");
  s.ph = (s.hp - s.kh + 1) / 2;
  s.pw = (s.wp - s.kw + 1) / 2;
  at::Tensor y = at::empty({n, s.out, s.ph, s.pw}, xc.options());
  at::Tensor bc;
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == s.out && bias->scalar_type() == at::kFloat, "bias must be fp32 of out channels");
    bc = bias->contiguous();
    b = bc.data_ptr<float>();
  }
  if (n == 0 || s.ph == 0 || s.pw == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t in_plane = in * h * wd, out_plane = s.out * s.ph * s.pw;
  at::parallel_for(0, (n + L - 1) / L, 1, [&](int64_t begin, int64_t end) {
    // kept per thread between calls (a fresh buffer of this size is page faults on every call)
    thread_local std::vector<float> xt_buf, yt_buf;
    float* xt = aligned(xt_buf, static_cast<size_t>(in * s.hp * s.wp * L));
    float* yt = aligned(yt_buf, static_cast<size_t>(out_plane * L));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * L, mb = std::min<int64_t>(L, n - n0);
      if (mb < L || pad_h > 0 || pad_w > 0) std::fill(xt, xt + in * s.hp * s.wp * L, 0.0f);  // padding, idle lanes
      for (int64_t c = 0; c < in; ++c)
        for (int64_t r = 0; r < h; ++r)
          transpose(xp + n0 * in_plane + (c * h + r) * wd, mb, wd, in_plane,
                    xt + ((c * s.hp + r + pad_h) * s.wp + pad_w) * L, L, /*src_in_order=*/true);
      all_channels(xt, wp, b, relu, s, yt);
      transpose(yt, out_plane, mb, L, yp + n0 * out_plane, out_plane, /*src_in_order=*/false);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(benchkit, m) {
  m.def("conv_pool(Tensor x, Tensor weight, Tensor? bias, int pad_h, int pad_w, bool relu) -> Tensor");
}

TORCH_LIBRARY_IMPL(benchkit, CPU, m) {
  m.impl("conv_pool", &conv_pool);
}
