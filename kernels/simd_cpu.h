// AVX-512 building blocks shared by the native CPU kernels (included, not compiled on its own):
// the register tile of the panel-packed products (linear_cpu.cpp, prefill_attention_cpu.cpp,
// gptq_cpu.cpp), the store of a panel's output tile (linear_cpu.cpp, gptq_cpu.cpp) and
// a vector exp for softmax (paged_attention_cpu.cpp, prefill_attention_cpu.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace optgptq_simd {

constexpr int64_t kPanel = 64;  // columns of a packed panel: four vectors
constexpr int64_t kRows = 6;    // rows of a register tile (6 x 4 accumulators)

#if defined(__AVX512F__)
// 16 weights widened to float32: float32 as stored, float16 (its bits) exactly.
inline __m512 load_weights(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load_weights(const uint16_t* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

template <class T>
struct same_type {
  using type = T;
};

// out[r, j] (+)= sum_{k0 <= k < k1} x[r, k] * panel[k, j] for MR rows, 64 columns (out's row
// stride os; `zero` starts the sums at 0, else at out's values); panel weights of type T, float
// or float16 bits, widened exactly. Every `period`-th weight row of `pf` (from row `phase` on)
// is asked for ahead of use, all its lines, with hint HINT.
template <int MR, int HINT, class T>
__attribute__((always_inline)) inline void panel_rows(const float* x, int64_t xs,
                                                      const T* panel, int64_t k0, int64_t k1,
                                                      float* out, int64_t os, bool zero,
                                                      const T* pf, int64_t phase,
                                                      int64_t period) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c)
      acc[r][c] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(out + r * os + 16 * c);
  for (int64_t k = k0; k < k1; ++k) {
    const T* w = panel + k * kPanel;
    if (pf != nullptr && (k - k0) % period == phase) {
      const char* nw = reinterpret_cast<const char*>(pf + (k - k0) * kPanel);
      for (int line = 0; line < static_cast<int>(kPanel * sizeof(T) / 64); ++line)
        _mm_prefetch(nw + 64 * line, static_cast<_mm_hint>(HINT));
    }
    const __m512 w0 = load_weights(w), w1 = load_weights(w + 16);
    const __m512 w2 = load_weights(w + 32), w3 = load_weights(w + 48);
    for (int r = 0; r < MR; ++r) {
      const __m512 b = _mm512_set1_ps(x[r * xs + k]);
      acc[r][0] = _mm512_fmadd_ps(b, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(b, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(b, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + r * os + 16 * c, acc[r][c]);
}

// panel_rows for the first min(6, rows) rows (MR picked at compile time).
template <int HINT, class T>
__attribute__((always_inline)) inline void row_block(int64_t rows, const float* x, int64_t xs,
                                                     const T* panel, int64_t k0, int64_t k1,
                                                     float* out, int64_t os, bool zero,
                                                     const typename same_type<T>::type* pf,
                                                     int64_t phase, int64_t period) {
  auto run = [&](auto mr) {
    panel_rows<decltype(mr)::value, HINT, T>(x, xs, panel, k0, k1, out, os, zero, pf, phase,
                                             period);
  };
  switch (std::min<int64_t>(kRows, rows)) {
    case 6: return run(std::integral_constant<int, 6>{});
    case 5: return run(std::integral_constant<int, 5>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 3: return run(std::integral_constant<int, 3>{});
    case 2: return run(std::integral_constant<int, 2>{});
    default: return run(std::integral_constant<int, 1>{});
  }
}

// tile [rows, 64] (row stride 64) + bias (none: nullptr) -> out's columns n0..n0+cols-1, where
// `out` points at column n0 of its first row (row stride N) and cols <= 64.
inline void store_tile(const float* tile, int64_t rows, const float* bias, float* out, int64_t N,
                       int64_t cols) {
  __mmask16 lanes[4];
  __m512 bv[4];
  for (int c = 0; c < 4; ++c) {
    const int64_t left = std::clamp<int64_t>(cols - 16 * c, 0, 16);
    lanes[c] = static_cast<__mmask16>((1u << left) - 1u);
    bv[c] = bias != nullptr ? _mm512_maskz_loadu_ps(lanes[c], bias + 16 * c) : _mm512_setzero_ps();
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < 4; ++c)
      _mm512_mask_storeu_ps(out + r * N + 16 * c, lanes[c],
                            _mm512_add_ps(_mm512_loadu_ps(tile + r * kPanel + 16 * c), bv[c]));
}

// exp(x) for x <= 0, 16 lanes: the same reduction and polynomial as exp_nonpositive, 2^k by scalef.
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 e = _mm512_set1_ps(1.f / 720.f);
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 120.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 24.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 6.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
  e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(e, k);
}

#endif

}  // namespace optgptq_simd
