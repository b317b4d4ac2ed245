// Helpers shared by benchkit's CPU kernels (csr_linear.cpp, conv_stage.cpp): 16-float vectors and
// blocked transposes. Compiled with them by benchkit/deployment/fused.py.
#pragma once

#include <ATen/ATen.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

namespace benchkit_simd {

// 16 floats: one AVX-512 register (two AVX2 ones elsewhere); GCC/Clang vector extension, so the
// accumulators stay in registers instead of a stack array the compiler reloads for every non-zero
typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, v16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// One 8 x 8 tile: dst[c * ldd + r] = src[r * lds + c] for r, c < 8 (eight rows in, eight rows out).
inline void tile8(const float* src, int64_t lds, float* dst, int64_t ldd) {
#if defined(__AVX__)
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
         r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds),
         r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE), s2 = _mm256_shuffle_ps(t1, t3, 0x44),
         s3 = _mm256_shuffle_ps(t1, t3, 0xEE), s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
         s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
#else
  for (int64_t c = 0; c < 8; ++c)
    for (int64_t r = 0; r < 8; ++r) dst[c * ldd + r] = src[r * lds + c];
#endif
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols, in 8 x 8 tiles. The tiles are visited so
// that the side with the long rows is read or written in order (``src_in_order``: src's rows, else dst's):
// walking across a row-major matrix whose rows are a power of two apart puts every row in the same cache
// set, and a 1024-wide Linear layer's output transposed that way took 182 us instead of about 10.
inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst, int64_t ldd, bool src_in_order) {
  const int64_t R = rows - rows % 8, C = cols - cols % 8;
  if (src_in_order) {
    for (int64_t r = 0; r < R; r += 8)
      for (int64_t c = 0; c < C; c += 8) tile8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
  } else {
    for (int64_t c = 0; c < C; c += 8)
      for (int64_t r = 0; r < R; r += 8) tile8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
  }
  for (int64_t r = 0; r < rows; ++r)  // the edges past the last whole tile
    for (int64_t c = (r < R ? C : 0); c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// A 64-byte aligned run of at least n floats inside buf (grown, never shrunk). Aligned because each
// non-zero loads whole 64-byte rows of xt: from malloc's 16-byte alignment those straddle two cache lines,
// and the same 512x512 / 98% layer ran in 20 or 25 us depending on where the buffers happened to land.
inline float* aligned(std::vector<float>& buf, size_t n) {
  if (buf.size() < n + 16) buf.resize(n + 16);
  const auto p = reinterpret_cast<std::uintptr_t>(buf.data());
  return reinterpret_cast<float*>((p + 63) & ~static_cast<std::uintptr_t>(63));
}

}  // namespace benchkit_simd
