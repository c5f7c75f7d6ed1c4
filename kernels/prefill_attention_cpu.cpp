// Paged prefill attention on the CPU: the rows of every sequence that adds more than one token (a
// whole prompt, a piece of a long one, a prompt after a cached prefix), read from the cache's
// blocks. Contract: optgptq_kernels.paged_attention.paged_attention_ref on those rows, float32;
// the rows of sequences that add one token are left to the decode kernel (paged_attention_cpu.cpp).
//
// A chunk of n tokens at positions L-n .. L-1 of a context of L attends causally. Two phases,
// each in parallel over its items:
//   1. per sequence and KV head, its L keys are gathered from their blocks into panels of 64
//      keys, [head dim, 64] each (transposed), and its values into [L, 64] panels of the head
//      dim: both products are then panel products, run by simd_cpu.h's register tile (6 rows x
//      64 columns). Gathered once: a copy per tile cost more than the tile's arithmetic;
//   2. the chunk's query rows, ordered (token, head), go in tiles of kTile tokens for the G query
//      heads of one KV head (GQA: the group shares the keys and values); an item is one tile,
//      items run costliest first, each thread taking the next when done. For a tile whose last
//      token sits at position p, over keys 0..p: scores = Q K^T, scaled, plus the ALiBi bias,
//      masked beyond each row's own position; by row max, exp (simd_cpu.h), sum and zeros past
//      the position; then P V, divided by the row sums, written to the output rows.
// Keys past the tile's last token are never touched, so a whole prompt computes about half of
// its n x n scores (plus half a tile). Against the path it replaces (torch SDPA with is_causal,
// per sequence, and the reference's masked SDPA for pieces after a prefix): see
// paged_attention_cpu.py. AVX-512 only: avx512_built() (linear_cpu.cpp) says whether it was
// compiled.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "paged_batch_cpu.h"
#include "simd_cpu.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
using optgptq_simd::kPanel;
using optgptq_simd::kRows;
using optgptq_simd::row_block;

constexpr int64_t kTile = 16;  // tokens per tile

struct Chunk {
  const float *q, *k, *v, *slope;
  float* out;
  const int64_t* tables;
  int64_t H, D, N, bs, G, W;
  float scale;
};

// A sequence adding n > 1 tokens, one KV head: where its gathered keys and values go.
struct Gather {
  int64_t seq, head, start, len, n, kt, v;  // kt, v: offsets into the shared buffers
};

struct Tile {
  const Gather* g;
  int64_t t0, t1, cost;
};

struct Scratch {
  std::vector<float> q, s, o, sum;
};

inline int64_t panels(int64_t n) { return (n + kPanel - 1) / kPanel; }

inline __mmask16 lanes(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << std::max<int64_t>(n, 0)) - 1u);
}

// Phase 1: keys 0..len-1 into panels [head dim, 64 keys], values into [len, 64] panels (padding
// stays zero).
void gather(const Chunk& c, const Gather& g, float* kt_all, float* v_all) {
  const int64_t D = c.D, ss = panels(g.len) * kPanel;
  const int64_t* table = c.tables + g.seq * c.W;
  float *kt0 = kt_all + g.kt, *v0 = v_all + g.v;
  for (int64_t j = 0; j < g.len; ++j) {
    const int64_t at = (g.head * c.N + table[j / c.bs]) * c.bs + j % c.bs;
    const float *kr = c.k + at * D, *vr = c.v + at * D;
    float* kt = kt0 + (j / kPanel) * D * kPanel + j % kPanel;
    for (int64_t d = 0; d < D; ++d) kt[d * kPanel] = kr[d];
    for (int64_t d = 0; d < D; ++d) v0[(d / kPanel * ss + j) * kPanel + d % kPanel] = vr[d];
  }
}

// Phase 2: one tile of query rows.
void attend_tile(const Chunk& c, const Tile& tile, const float* kt_all, const float* v_all,
                 Scratch& sc) {
  const Gather& g = *tile.g;
  const int64_t D = c.D, G = c.G, off = g.len - g.n;
  const int64_t tokens = tile.t1 - tile.t0, rows = tokens * G;
  const int64_t keys = off + tile.t1;  // keys 0 .. keys-1: up to the tile's last token
  const int64_t kp = panels(keys), vp = panels(D);
  const int64_t ss = kp * kPanel, vs = panels(g.len) * kPanel, os = vp * kPanel;
  const float *kt = kt_all + g.kt, *v = v_all + g.v;
  sc.q.resize(rows * D);
  sc.s.resize(rows * ss);
  sc.o.resize(rows * os);
  sc.sum.resize(rows);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < G; ++h)
      std::copy_n(c.q + ((g.start + tile.t0 + t) * c.H + g.head * G + h) * D, D,
                  sc.q.data() + (t * G + h) * D);

  for (int64_t p = 0; p < kp; ++p)  // scores
    for (int64_t i0 = 0; i0 < rows; i0 += kRows)
      row_block<_MM_HINT_T0>(rows - i0, sc.q.data() + i0 * D, D, kt + p * D * kPanel, 0, D,
                             sc.s.data() + i0 * ss + p * kPanel, ss, true, nullptr, 0, 1);
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = off + tile.t0 + r / G, valid = pos + 1;
    float* srow = sc.s.data() + r * ss;
    const float slope = c.slope != nullptr ? c.slope[g.head * G + r % G] : 0.f;
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < valid; j += 16) {
      const __mmask16 m = lanes(valid - j);
      __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, srow + j), _mm512_set1_ps(c.scale));
      if (c.slope != nullptr) {
        const __m512 dist = _mm512_cvtepi32_ps(
            _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(j - pos))));
        x = _mm512_fmadd_ps(_mm512_set1_ps(slope), dist, x);
      }
      _mm512_mask_storeu_ps(srow + j, m, x);
      mv = _mm512_mask_max_ps(mv, m, mv, x);
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < ss; j += 16) {
      const __mmask16 m = lanes(valid - j);
      const __m512 e = _mm512_maskz_mov_ps(
          m, optgptq_simd::exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(srow + j), mx)));
      total = _mm512_add_ps(total, e);
      _mm512_storeu_ps(srow + j, e);  // zeros past the row's position
    }
    sc.sum[r] = _mm512_reduce_add_ps(total);
  }
  for (int64_t p = 0; p < vp; ++p)  // P V
    for (int64_t i0 = 0; i0 < rows; i0 += kRows)
      row_block<_MM_HINT_T0>(rows - i0, sc.s.data() + i0 * ss, ss, v + p * vs * kPanel, 0, keys,
                             sc.o.data() + i0 * os + p * kPanel, os, true, nullptr, 0, 1);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = r / G, h = r % G;
    float* orow = c.out + ((g.start + tile.t0 + t) * c.H + g.head * G + h) * D;
    const float inv = 1.f / sc.sum[r];
    for (int64_t d = 0; d < D; ++d) orow[d] = sc.o[r * os + d] * inv;
  }
}
#endif

// Fills the rows of `out` [T, H, D] that belong to sequences adding more than one token.
void paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                             double scale, const c10::optional<at::Tensor>& alibi_slopes,
                             at::Tensor& out) {
#if defined(__AVX512F__)
  const optgptq_paged::Batch batch(q, k_cache, v_cache, block_tables, seq_lens,
                                   query_start_loc, alibi_slopes);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == q.sizes(),
              "a contiguous float32 output shaped like q expected");
  const Chunk c{batch.q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                batch.slope(), out.data_ptr<float>(), batch.table, batch.H, batch.D, batch.N,
                batch.bs, batch.G, batch.W, static_cast<float>(scale)};
  const int64_t Hkv = batch.Hkv;
  std::vector<Gather> gathers;
  int64_t kt_size = 0, v_size = 0;
  for (int64_t s = 0; s < batch.S; ++s) {
    const int64_t n = batch.query_len(s), len = batch.len[s];
    if (n <= 1) continue;
    batch.check_blocks(s);
    for (int64_t h = 0; h < Hkv; ++h) {
      gathers.push_back({s, h, batch.start[s], len, n, kt_size, v_size});
      kt_size += panels(len) * c.D * kPanel;
      v_size += panels(c.D) * panels(len) * kPanel * kPanel;
    }
  }
  std::vector<Tile> tiles;
  for (const Gather& g : gathers)
    for (int64_t t0 = 0; t0 < g.n; t0 += kTile) {
      const int64_t t1 = std::min(g.n, t0 + kTile);
      tiles.push_back({&g, t0, t1, (t1 - t0) * (g.len - g.n + t1)});
    }
  if (tiles.empty()) return;  // a step of decodes only
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& a, const Tile& b) { return a.cost > b.cost; });
  std::vector<float> kt_all(kt_size, 0.f), v_all(v_size, 0.f);
  const int64_t ng = static_cast<int64_t>(gathers.size()), nt = static_cast<int64_t>(tiles.size());
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), nt));
#pragma omp parallel num_threads(std::max(threads, 1))
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < ng; ++i) gather(c, gathers[i], kt_all.data(), v_all.data());
    Scratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nt; ++i) attend_tile(c, tiles[i], kt_all.data(), v_all.data(), sc);
  }
#else
  TORCH_CHECK(false, "paged_prefill_attention needs AVX-512 (see avx512_built)");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optgptq_cpu, m) {
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, Tensor query_start_loc, float scale, Tensor? alibi_slopes, "
        "Tensor(a!) out) -> ()",
        &paged_prefill_attention);
}
