// benchkit::csr_linear(x, crow, col, values, bias?, out_features) -> y
//
// y = x @ W.T + bias for a CSR weight W (out_features x in_features; int32 row offsets and column
// indices, fp32 values), with x and y row-major as nn.Linear has them. Built on first use by
// benchkit/deployment/fused.py (torch.utils.cpp_extension, -O3 -march=native) and registered as a torch
// operator, so torch.compile and torch.export see it like any other op.
//
// Why it exists: every CSR kernel torch offers computes W @ X.T, so a Linear layer built on one pays two
// layout copies (the input transposed, the output transposed back plus the bias). At 512x512, batch 64,
// one thread on this project's CPU those copies alone took 33 us of dense's 332 us (results/deploy/parts.md):
// no kernel behind them could reach 0.3x of the theoretical speedup at 98% sparsity. Here the copies are
// 8x8 register transposes (AVX; plain loops elsewhere) of one block of samples at a time, and the bias is
// the accumulators' start:
//   for each block of B samples: xt = the block transposed (in_features x B, contiguous)
//     for each output o: acc[0:B] = bias[o] + sum over the row's non-zeros p of values[p] * xt[col[p], 0:B]
//                        yt[o, 0:B] = acc
//     y[block, :] = yt transposed (writing each group of eight outputs straight from an L1 tile instead
//     measured 16-31% slower at 512 wide, 2% at 1024)
// B is 32 samples (16 for 16 rows or fewer): two AVX-512 FMAs per non-zero on accumulators held in
// registers. Chosen at 512x512 / 98% / batch 64, one thread (scratch runs, interleaved with dense, before the
// buffers were aligned): B = 16, 32, 64 took 22.9, 22.0, 24.3 us. With aligned buffers the layer runs in
// about 19 us timed alone (results/deploy/parts.md). Outputs are split over torch's intra-op threads
// (at::parallel_for).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using namespace benchkit_simd;

template <int B>  // samples per block: a multiple of 16
void block_product(const float* x, int64_t rows, int64_t in, int64_t out, const int32_t* crow,
                   const int32_t* col, const float* val, const float* bias, float* y) {
  constexpr int V = B / 16;
  // the block's inputs and outputs, feature-major: kept per thread between calls, because a fresh
  // 128 KB+ buffer is a fresh mmap whose page faults cost more than the product at 98% sparsity
  thread_local std::vector<float> xt_buf, yt_buf;
  float* xt = aligned(xt_buf, static_cast<size_t>(in) * B);
  float* yt = aligned(yt_buf, static_cast<size_t>(out) * B);
  for (int64_t m0 = 0; m0 < rows; m0 += B) {
    const int64_t mb = std::min<int64_t>(B, rows - m0);
    if (mb < B) std::fill(xt, xt + in * B, 0.0f);  // lanes past the last sample
    transpose(x + m0 * in, mb, in, in, xt, B, /*src_in_order=*/true);
    const float* xtp = xt;  // thread_local: the workers of parallel_for must use the caller's
    float* ytp = yt;
    at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        v16 acc[V];
        const float b = bias != nullptr ? bias[o] : 0.0f;
        for (int j = 0; j < V; ++j) acc[j] = v16{} + b;
        for (int32_t p = crow[o]; p < crow[o + 1]; ++p) {
          const v16 w = v16{} + val[p];
          const float* r = xtp + static_cast<int64_t>(col[p]) * B;
          for (int j = 0; j < V; ++j) acc[j] += w * load16(r + 16 * j);
        }
        for (int j = 0; j < V; ++j) store16(ytp + o * B + 16 * j, acc[j]);
      }
    });
    transpose(yt, out, mb, B, y + m0 * out, out, /*src_in_order=*/false);
  }
}

at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                      const c10::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "benchkit::csr_linear takes fp32 CPU inputs, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() == 2, "benchkit::csr_linear takes a 2-D input (rows x in_features), got ", x.dim(), "-D");
  TORCH_CHECK(crow.scalar_type() == at::kInt && col.scalar_type() == at::kInt && values.scalar_type() == at::kFloat,
              "benchkit::csr_linear takes int32 crow/col and fp32 values");
  TORCH_CHECK(crow.numel() == out_features + 1, "crow has ", crow.numel(), " entries for ", out_features, " rows");
  TORCH_CHECK(col.numel() == values.numel(), "col and values differ in length");
  const at::Tensor xc = x.contiguous();
  const at::Tensor cr = crow.contiguous(), cl = col.contiguous(), vl = values.contiguous();
  const int64_t rows = xc.size(0), in = xc.size(1);
  at::Tensor y = at::empty({rows, out_features}, xc.options());
  const float* b = nullptr;
  at::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features && bias->scalar_type() == at::kFloat, "bias must be fp32 of out_features");
    bc = bias->contiguous();
    b = bc.data_ptr<float>();
  }
  if (rows == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const int32_t* crp = cr.data_ptr<int32_t>();
  const int32_t* clp = cl.data_ptr<int32_t>();
  const float* vp = vl.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (rows > 16) {
    block_product<32>(xp, rows, in, out_features, crp, clp, vp, b, yp);
  } else {
    block_product<16>(xp, rows, in, out_features, crp, clp, vp, b, yp);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(benchkit, m) {
  m.def("csr_linear(Tensor x, Tensor crow, Tensor col, Tensor values, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(benchkit, CPU, m) {
  m.impl("csr_linear", &csr_linear);
}
