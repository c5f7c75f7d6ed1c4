// Paged decode attention on the CPU, reading the cache's blocks where they lie (no gathered copy).
// Contract: optgptq_kernels.paged_attention.paged_attention_ref, float32, for the sequences of a
// batch that add exactly one token; the rows of other sequences are left for the caller (see
// paged_attention_cpu.py). Built at run time (see cpu_native.py: -O3 -march=native -fopenmp).
//
// Work item: one decoding sequence and one KV head; its rows are the G query heads of that KV
// head (GQA: each K/V row is read once from memory for the group). Pass 1 walks the sequence's
// blocks through its block table and writes scaled scores (+ ALiBi) into a per-thread buffer;
// pass 2 takes each row's max and exponentiates; pass 3 walks the values once, accumulating
// every row; rows are divided by their sums at the end. Items run in parallel, longest context
// first, each thread taking the next item when done (contexts differ widely in length).
//
// With AVX-512 and a head size that is a multiple of 16, an item runs on intrinsics: a key row's
// products with a query head stay one vector, and 16 such vectors are summed across their lanes
// together (a transpose-and-add tree, ~3 instructions per score instead of ~8 for one horizontal
// sum each); value rows are accumulated in registers. Elsewhere a portable loop runs, which the
// compiler vectorises per dot product.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "paged_batch_cpu.h"
#include "simd_cpu.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// exp(x) for x <= 0 (scores minus their max), vectorisable: x = k ln2 + r with |r| <= ln2 / 2,
// a degree-6 Taylor polynomial for exp(r) (relative error < 2e-7), times 2^k built in the
// exponent bits. Below -87 the result is 0 (float's normal range ends there).
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.f);
  const float k = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
  return x < -87.f ? 0.f : p * scale;
}

struct Problem {
  const float *q, *k, *v, *slope;
  float* out;
  const int64_t *tables, *lens, *starts;
  int64_t H, D, Hkv, N, bs, G, W;
  float scale;
};

struct Scratch {
  std::vector<float> scores, acc, total;
};

// One work item: decoding sequence s (its query row q_row) and KV head h. DC is the head size
// when known at compile time (the dot products then unroll), 0 otherwise.
template <int64_t DC>
void attend(const Problem& p, int64_t s, int64_t q_row, int64_t h, Scratch& sc) {
  const int64_t D = DC > 0 ? DC : p.D, G = p.G, bs = p.bs;
  const int64_t L = p.lens[s], pos = L - 1, blocks = (L + bs - 1) / bs;
  sc.scores.resize(G * L);
  sc.acc.assign(G * D, 0.f);
  sc.total.assign(G, 0.f);
  float* scores = sc.scores.data();
  const int64_t* table = p.tables + s * p.W;
  const float* qrows = p.q + (q_row * p.H + h * G) * D;  // head g at + g * D

  for (int64_t b = 0; b < blocks; ++b) {  // pass 1: scores
    const int64_t kt0 = b * bs, nk = std::min(bs, L - kt0);
    const float* kb = p.k + (h * p.N + table[b]) * bs * D;
    for (int64_t g = 0; g < G; ++g) {
      float* srow = scores + g * L + kt0;
      for (int64_t i = 0; i < nk; ++i) srow[i] = dot(qrows + g * D, kb + i * D, D) * p.scale;
      if (p.slope != nullptr) {
        const float sl = p.slope[h * G + g];
        for (int64_t i = 0; i < nk; ++i) srow[i] += sl * static_cast<float>(kt0 + i - pos);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // pass 2: unnormalised softmax
    float* srow = scores + g * L;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t kt = 0; kt < L; ++kt) m = std::max(m, srow[kt]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t kt = 0; kt < L; ++kt) {
      srow[kt] = exp_nonpositive(srow[kt] - m);
      sum += srow[kt];
    }
    sc.total[g] = sum;
  }
  for (int64_t b = 0; b < blocks; ++b) {  // pass 3: the values, once for every head of the group
    const int64_t kt0 = b * bs, nk = std::min(bs, L - kt0);
    const float* vb = p.v + (h * p.N + table[b]) * bs * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* prow = scores + g * L + kt0;
      float* arow = sc.acc.data() + g * D;
      for (int64_t i = 0; i < nk; ++i) axpy(arow, prow[i], vb + i * D, D);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* orow = p.out + (q_row * p.H + h * G + g) * D;
    const float inv = 1.f / sc.total[g];
    for (int64_t d = 0; d < D; ++d) orow[d] = sc.acc[g * D + d] * inv;
  }
}

#if defined(__AVX512F__)
// Lane i of the result = the sum of v[i]'s 16 lanes. Pairs are interleaved and added within
// 128-bit lanes (floats, then float pairs), then the 128-bit lanes are interleaved and added.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
    x[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 r0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88),
                                  _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 r1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88),
                                  _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(r0, r1, 0x88), _mm512_shuffle_f32x4(r0, r1, 0xDD));
}

inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// Asks for a block's rows ahead of use: blocks lie anywhere in the pool, so the hardware
// prefetcher, which follows a stream within a page, starts over at every block.
inline void prefetch_rows(const float* rows, int64_t floats) {
  const char* b = reinterpret_cast<const char*>(rows);
  for (int64_t off = 0; off < floats * 4; off += 64) _mm_prefetch(b + off, _MM_HINT_T0);
}

// One work item on AVX-512, head size 16 * NV.
template <int NV>
void attend_avx512(const Problem& p, int64_t s, int64_t q_row, int64_t h, Scratch& sc) {
  constexpr int64_t D = 16 * NV;
  const int64_t G = p.G, bs = p.bs;
  const int64_t L = p.lens[s], pos = L - 1, blocks = (L + bs - 1) / bs;
  sc.scores.resize(G * L);
  sc.acc.assign(G * D, 0.f);
  sc.total.assign(G, 0.f);
  float* scores = sc.scores.data();
  const int64_t* table = p.tables + s * p.W;
  const float* qrows = p.q + (q_row * p.H + h * G) * D;
  const __m512 scale = _mm512_set1_ps(p.scale);
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);

  for (int64_t b = 0; b < blocks; ++b) {  // pass 1: scores, 16 keys at a time
    const int64_t kt0 = b * bs, nk = std::min(bs, L - kt0);
    const float* kb = p.k + (h * p.N + table[b]) * bs * D;
    if (b + 1 < blocks) prefetch_rows(p.k + (h * p.N + table[b + 1]) * bs * D, bs * D);
    else prefetch_rows(p.v + (h * p.N + table[0]) * bs * D, bs * D);
    for (int64_t g = 0; g < G; ++g) {
      __m512 qv[NV];
      for (int c = 0; c < NV; ++c) qv[c] = _mm512_loadu_ps(qrows + g * D + 16 * c);
      for (int64_t i0 = 0; i0 < nk; i0 += 16) {
        const int64_t n = std::min<int64_t>(16, nk - i0);
        __m512 dots[16];
        for (int64_t j = 0; j < 16; ++j) {
          if (j >= n) {
            dots[j] = _mm512_setzero_ps();
            continue;
          }
          const float* kr = kb + (i0 + j) * D;
          __m512 a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kr));
          for (int c = 1; c < NV; ++c) a = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kr + 16 * c), a);
          dots[j] = a;
        }
        __m512 sv = _mm512_mul_ps(sum_lanes16(dots), scale);
        if (p.slope != nullptr) {
          const __m512 dist = _mm512_cvtepi32_ps(
              _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(kt0 + i0 - pos))));
          sv = _mm512_fmadd_ps(_mm512_set1_ps(p.slope[h * G + g]), dist, sv);
        }
        _mm512_mask_storeu_ps(scores + g * L + kt0 + i0, first_lanes(n), sv);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // pass 2: unnormalised softmax
    float* srow = scores + g * L;
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t kt = 0; kt < L; kt += 16)
      mv = _mm512_mask_max_ps(mv, first_lanes(std::min<int64_t>(16, L - kt)), mv,
                              _mm512_maskz_loadu_ps(first_lanes(std::min<int64_t>(16, L - kt)),
                                                    srow + kt));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t kt = 0; kt < L; kt += 16) {
      const __mmask16 lanes = first_lanes(std::min<int64_t>(16, L - kt));
      const __m512 e = optgptq_simd::exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, srow + kt), m));
      sum = _mm512_mask_add_ps(sum, lanes, sum, e);
      _mm512_mask_storeu_ps(srow + kt, lanes, e);
    }
    sc.total[g] = _mm512_reduce_add_ps(sum);
  }
  for (int64_t b = 0; b < blocks; ++b) {  // pass 3: the values, once from memory for the group
    const int64_t kt0 = b * bs, nk = std::min(bs, L - kt0);
    const float* vb = p.v + (h * p.N + table[b]) * bs * D;
    if (b + 1 < blocks) prefetch_rows(p.v + (h * p.N + table[b + 1]) * bs * D, bs * D);
    for (int64_t g = 0; g < G; ++g) {
      const float* prow = scores + g * L + kt0;
      float* arow = sc.acc.data() + g * D;
      __m512 a0[NV], a1[NV];  // two chains: even and odd rows
      for (int c = 0; c < NV; ++c) {
        a0[c] = _mm512_loadu_ps(arow + 16 * c);
        a1[c] = _mm512_setzero_ps();
      }
      int64_t i = 0;
      for (; i + 1 < nk; i += 2) {
        const __m512 w0 = _mm512_set1_ps(prow[i]), w1 = _mm512_set1_ps(prow[i + 1]);
        const float *r0 = vb + i * D, *r1 = r0 + D;
        for (int c = 0; c < NV; ++c) {
          a0[c] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(r0 + 16 * c), a0[c]);
          a1[c] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(r1 + 16 * c), a1[c]);
        }
      }
      if (i < nk) {
        const __m512 w0 = _mm512_set1_ps(prow[i]);
        for (int c = 0; c < NV; ++c)
          a0[c] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(vb + i * D + 16 * c), a0[c]);
      }
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(arow + 16 * c, _mm512_add_ps(a0[c], a1[c]));
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* orow = p.out + (q_row * p.H + h * G + g) * D;
    const __m512 inv = _mm512_set1_ps(1.f / sc.total[g]);
    for (int c = 0; c < NV; ++c)
      _mm512_storeu_ps(orow + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(sc.acc.data() + g * D + 16 * c), inv));
  }
}
#endif

// One work item through the fastest path compiled for this head size.
void attend_item(const Problem& p, int64_t s, int64_t q_row, int64_t h, Scratch& sc) {
  switch (p.D) {
#if defined(__AVX512F__)
    case 64: return attend_avx512<4>(p, s, q_row, h, sc);
    case 128: return attend_avx512<8>(p, s, q_row, h, sc);
#else
    case 64: return attend<64>(p, s, q_row, h, sc);
    case 128: return attend<128>(p, s, q_row, h, sc);
#endif
    default: return attend<0>(p, s, q_row, h, sc);
  }
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache,
                                     const at::Tensor& block_tables,
                                     const at::Tensor& seq_lens,
                                     const at::Tensor& query_start_loc, double scale,
                                     const c10::optional<at::Tensor>& alibi_slopes) {
  const optgptq_paged::Batch batch(q, k_cache, v_cache, block_tables, seq_lens,
                                   query_start_loc, alibi_slopes);
  auto out = at::empty_like(batch.q);
  Problem p{batch.q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
            batch.slope(), out.data_ptr<float>(), batch.table, batch.len, batch.start,
            batch.H, batch.D, batch.Hkv, batch.N, batch.bs, batch.G, batch.W,
            static_cast<float>(scale)};
  std::vector<int64_t> decoding;  // the sequences that add one token
  for (int64_t s = 0; s < batch.S; ++s) {
    if (batch.query_len(s) != 1) continue;
    batch.check_blocks(s);
    decoding.push_back(s);
  }
  // longest contexts first, then each thread takes the next item as it finishes one
  std::stable_sort(decoding.begin(), decoding.end(),
                   [&](int64_t a, int64_t b) { return p.lens[a] > p.lens[b]; });
  const int64_t items = static_cast<int64_t>(decoding.size()) * p.Hkv;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), items));
#pragma omp parallel num_threads(std::max(threads, 1))
  {
    Scratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t h = it % p.Hkv, s = decoding[it / p.Hkv];
      attend_item(p, s, p.starts[s], h, sc);
    }
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(optgptq_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, Tensor query_start_loc, float scale, Tensor? alibi_slopes) -> Tensor",
        &paged_decode_attention);
}
