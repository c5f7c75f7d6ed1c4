// Activations to INT8 for the integer products (gptq_cpu.cpp; included, not compiled on its own).
//
// A row of x is gathered into the packed row order (src[k]: x's column for packed row k, -1 for
// a padding row, which gets 0; no src: the order is x's) and cut into segments (seg[t] ..
// seg[t + 1] - 1). Per row and segment: s_x = max |x| / 127 and piece 0, x8 = round(x / s_x),
// ties to even; where two pieces are asked for, piece 1 is the rounding error piece 0 leaves,
// round((x / s_x - x8) * 254), with scale s_x / 254 (x within s_x / 508 of its two pieces: about
// 16 bits). Each piece keeps its per-segment scale and the sum of its INT8 values (what a zero
// point multiplies). The AVX-512 and scalar loops give the same bits (the same float32 product
// x * (127 / max), rounded to nearest even; x / s_x - x8 is exact).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace optgptq_int8 {

struct Acts {   // one piece of the quantized activations
  int8_t* x8;   // [M, K8]
  float* sx;    // [M, S]: per row and segment, the scale of one INT8 step
  int32_t* xs;  // [M, S]: per row and segment, the sum of x8
};

#if defined(__AVX512F__)
inline __mmask16 lanes16(int64_t left) {
  return static_cast<__mmask16>((1u << std::min<int64_t>(16, left)) - 1u);
}
#endif

// x [M, K] (float32, contiguous rows) -> acts[0 .. pieces), each x8 [M, K8], sx and xs [M, S].
inline void quantize_rows(const at::Tensor& x, const int32_t* src, const int32_t* seg, int64_t S,
                          int64_t K8, int pieces, const Acts* acts) {
  const int64_t M = x.size(0), ld = x.stride(0);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> gathered(src != nullptr ? K8 : 0);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * ld;
      if (src != nullptr) {
        for (int64_t k = 0; k < K8; ++k) gathered[k] = src[k] < 0 ? 0.f : row[src[k]];
        row = gathered.data();
      }
      for (int64_t t = 0; t < S; ++t) {
        const int64_t k0 = seg[t], n = seg[t + 1] - k0;
        const float* v = row + k0;
        int8_t* hi = acts[0].x8 + r * K8 + k0;
        int8_t* lo = pieces > 1 ? acts[1].x8 + r * K8 + k0 : nullptr;
        float amax = 0.f;
        int32_t sum_hi = 0, sum_lo = 0;
#if defined(__AVX512F__)
        __m512 m = _mm512_setzero_ps();
        for (int64_t k = 0; k < n; k += 16)
          m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes16(n - k), v + k)));
        amax = _mm512_reduce_max_ps(m);
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m512i total_hi = _mm512_setzero_si512(), total_lo = _mm512_setzero_si512();
        for (int64_t k = 0; k < n; k += 16) {
          const __mmask16 lanes = lanes16(n - k);
          const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, v + k), inv);
          const __m512i h = _mm512_cvtps_epi32(scaled);
          _mm_mask_storeu_epi8(hi + k, lanes, _mm512_cvtepi32_epi8(h));
          total_hi = _mm512_add_epi32(total_hi, h);
          if (lo != nullptr) {  // scaled - h is exact
            const __m512 rest = _mm512_sub_ps(scaled, _mm512_cvtepi32_ps(h));
            const __m512i l = _mm512_cvtps_epi32(_mm512_mul_ps(rest, _mm512_set1_ps(254.f)));
            _mm_mask_storeu_epi8(lo + k, lanes, _mm512_cvtepi32_epi8(l));
            total_lo = _mm512_add_epi32(total_lo, l);
          }
        }
        sum_hi = _mm512_reduce_add_epi32(total_hi);
        sum_lo = _mm512_reduce_add_epi32(total_lo);
#else
        for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(v[k]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int64_t k = 0; k < n; ++k) {
          const float scaled = v[k] * inv;
          const int h = static_cast<int>(std::nearbyint(scaled));
          hi[k] = static_cast<int8_t>(h);
          sum_hi += h;
          if (lo != nullptr) {
            const int l = static_cast<int>(std::nearbyint((scaled - h) * 254.f));
            lo[k] = static_cast<int8_t>(l);
            sum_lo += l;
          }
        }
#endif
        acts[0].sx[r * S + t] = amax / 127.f;
        acts[0].xs[r * S + t] = sum_hi;
        if (lo != nullptr) {
          acts[1].sx[r * S + t] = amax / 127.f / 254.f;
          acts[1].xs[r * S + t] = sum_lo;
        }
      }
    }
  });
}

}  // namespace optgptq_int8
