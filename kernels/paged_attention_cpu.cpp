// Paged attention on the CPU, reading the cache's blocks where they lie (no gathered copy).
// Contract: optgptq_kernels.paged_attention.paged_attention_ref, float32 only. Built at run time
// by paged_attention_cpu.py (torch.utils.cpp_extension, -O3 -march=native -fopenmp).
//
// Work item: one sequence, one KV head, one tile of up to `q_tile` query tokens; its rows are
// the tile's tokens x the G query heads of that KV head (GQA: K/V read once for the group).
// Pass 1 walks the keys the tile's last token may see, block by block through the block table,
// and writes scaled scores (+ ALiBi) into a per-thread buffer; pass 2 takes each row's max and
// exponentiates; pass 3 walks the values once, accumulating every row; rows are divided by
// their sums at the end. Items run in parallel through at::parallel_for (OpenMP).
#include <torch/extension.h>
#include <ATen/Parallel.h>

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
  int64_t H, D, Hkv, N, bs, G, W, q_tile;
  float scale;
};

struct Scratch {
  std::vector<float> scores, acc, total;
};

// One work item: sequence s, KV head h, query tokens t0 .. t0 + q_tile of s's chunk. DC is the
// head size when known at compile time (the dot products then unroll), 0 otherwise.
template <int64_t DC>
void attend(const Problem& p, int64_t s, int64_t h, int64_t t0, Scratch& sc) {
  const int64_t D = DC > 0 ? DC : p.D, G = p.G, H = p.H, bs = p.bs;
  const int64_t q0 = p.starts[s], qlen = p.starts[s + 1] - q0;
  const int64_t n = std::min(p.q_tile, qlen - t0);
  const int64_t first_pos = p.lens[s] - qlen + t0;  // position of the tile's first token
  const int64_t L = first_pos + n;                  // keys the tile's last token sees
  const int64_t R = n * G, blocks = (L + bs - 1) / bs;
  sc.scores.resize(R * L);
  sc.acc.assign(R * D, 0.f);
  sc.total.assign(R, 0.f);
  float* scores = sc.scores.data();
  const int64_t* table = p.tables + s * p.W;
  const float* qrows = p.q + ((q0 + t0) * H + h * G) * D;  // row (j, g) at + (j * H + g) * D

  for (int64_t b = 0; b < blocks; ++b) {  // pass 1: the scores each row may see
    const int64_t kt0 = b * bs, nk = std::min(bs, L - kt0);
    const float* kb = p.k + (h * p.N + table[b]) * bs * D;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = first_pos + j, lim = std::min(nk, pos - kt0 + 1);
      for (int64_t g = 0; g < G; ++g) {
        const float* qrow = qrows + (j * H + g) * D;
        float* srow = scores + (j * G + g) * L + kt0;
        for (int64_t i = 0; i < lim; ++i) srow[i] = dot(qrow, kb + i * D, D) * p.scale;
        if (p.slope != nullptr) {
          const float sl = p.slope[h * G + g];
          for (int64_t i = 0; i < lim; ++i) srow[i] += sl * static_cast<float>(kt0 + i - pos);
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {  // pass 2: unnormalised softmax over keys 0..pos
    float* srow = scores + r * L;
    const int64_t seen = first_pos + r / G + 1;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t kt = 0; kt < seen; ++kt) m = std::max(m, srow[kt]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t kt = 0; kt < seen; ++kt) {
      srow[kt] = exp_nonpositive(srow[kt] - m);
      sum += srow[kt];
    }
    sc.total[r] = sum;
  }
  for (int64_t b = 0; b < blocks; ++b) {  // pass 3: the values, once for every row
    const int64_t kt0 = b * bs, nk = std::min(bs, L - kt0);
    const float* vb = p.v + (h * p.N + table[b]) * bs * D;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t lim = std::min(nk, first_pos + r / G - kt0 + 1);
      const float* prow = scores + r * L + kt0;
      float* arow = sc.acc.data() + r * D;
      for (int64_t i = 0; i < lim; ++i) axpy(arow, prow[i], vb + i * D, D);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = j * G + g;
      float* orow = p.out + ((q0 + t0 + j) * H + h * G + g) * D;
      const float inv = 1.f / sc.total[r];
      for (int64_t d = 0; d < D; ++d) orow[d] = sc.acc[r * D + d] * inv;
    }
  }
}

}  // namespace

torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                              const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                              const torch::Tensor& seq_lens, const torch::Tensor& query_start_loc,
                              double scale, const c10::optional<torch::Tensor>& alibi_slopes,
                              int64_t q_tile) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [T, H, D] and K/V caches [Hkv, N, block_size, D] expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "the CPU kernel takes float32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches expected");
  TORCH_CHECK(q_tile > 0, "q_tile must be positive");
  const auto qc = q.contiguous();
  const auto tables = block_tables.to(at::kLong).contiguous();
  const auto lens = seq_lens.to(at::kLong).contiguous();
  const auto starts = query_start_loc.to(at::kLong).contiguous();
  at::Tensor slopes;
  if (alibi_slopes.has_value()) slopes = alibi_slopes->to(at::kFloat).contiguous();
  auto out = torch::empty_like(qc);

  Problem p{qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
            slopes.defined() ? slopes.data_ptr<float>() : nullptr, out.data_ptr<float>(),
            tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            q.size(1), q.size(2), k_cache.size(0), k_cache.size(1), k_cache.size(2), 0,
            tables.size(1), q_tile, static_cast<float>(scale)};
  TORCH_CHECK(k_cache.size(3) == p.D && p.H % p.Hkv == 0, "head size / head count mismatch");
  p.G = p.H / p.Hkv;
  const int64_t S = lens.size(0);
  TORCH_CHECK(starts.size(0) == S + 1 && tables.size(0) >= S, "batch size mismatch");

  std::vector<int64_t> tile_seq, tile_first;  // query tiles: (sequence, first token in it)
  for (int64_t s = 0; s < S; ++s) {
    const int64_t qlen = p.starts[s + 1] - p.starts[s], len = p.lens[s];
    TORCH_CHECK(qlen >= 0 && qlen <= len, "query chunk longer than its context");
    const int64_t blocks = (len + p.bs - 1) / p.bs;
    TORCH_CHECK(blocks <= p.W, "block table narrower than a context");
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t id = p.tables[s * p.W + b];
      TORCH_CHECK(id >= 0 && id < p.N, "block id ", id, " out of range");
    }
    for (int64_t t0 = 0; t0 < qlen; t0 += q_tile) {
      tile_seq.push_back(s);
      tile_first.push_back(t0);
    }
  }
  const int64_t items = static_cast<int64_t>(tile_seq.size()) * p.Hkv;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch sc;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t h = it % p.Hkv, s = tile_seq[it / p.Hkv], t0 = tile_first[it / p.Hkv];
      switch (p.D) {
        case 64: attend<64>(p, s, h, t0, sc); break;
        case 128: attend<128>(p, s, h, t0, sc); break;
        default: attend<0>(p, s, h, t0, sc);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged attention over the block cache (float32)");
}
