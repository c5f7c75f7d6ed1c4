// Paged decode attention on the CPU, reading the cache's blocks where they lie (no gathered copy).
// Contract: optgptq_kernels.paged_attention.paged_attention_ref, float32, for the sequences of a
// batch that add exactly one token; the rows of other sequences are left for the caller (see
// paged_attention_cpu.py). Built at run time (torch.utils.cpp_extension, -O3 -march=native
// -fopenmp).
//
// Work item: one decoding sequence and one KV head; its rows are the G query heads of that KV
// head (GQA: each K/V row is read once for the group). Pass 1 walks the sequence's blocks
// through its block table and writes scaled scores (+ ALiBi) into a per-thread buffer; pass 2
// takes each row's max and exponentiates; pass 3 walks the values once, accumulating every row;
// rows are divided by their sums at the end. Items run in parallel (at::parallel_for, OpenMP).
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

}  // namespace

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache,
                                     const torch::Tensor& block_tables,
                                     const torch::Tensor& seq_lens,
                                     const torch::Tensor& query_start_loc, double scale,
                                     const c10::optional<torch::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [T, H, D] and K/V caches [Hkv, N, block_size, D] expected");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "the CPU kernel takes float32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches expected");
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
            tables.size(1), static_cast<float>(scale)};
  TORCH_CHECK(k_cache.size(3) == p.D && p.H % p.Hkv == 0, "head size / head count mismatch");
  p.G = p.H / p.Hkv;
  const int64_t S = lens.size(0);
  TORCH_CHECK(starts.size(0) == S + 1 && tables.size(0) >= S, "batch size mismatch");

  std::vector<int64_t> decoding;  // the sequences that add one token
  for (int64_t s = 0; s < S; ++s) {
    const int64_t qlen = p.starts[s + 1] - p.starts[s], len = p.lens[s];
    TORCH_CHECK(qlen >= 0 && qlen <= len, "query chunk longer than its context");
    if (qlen != 1) continue;
    const int64_t blocks = (len + p.bs - 1) / p.bs;
    TORCH_CHECK(blocks <= p.W, "block table narrower than a context");
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t id = p.tables[s * p.W + b];
      TORCH_CHECK(id >= 0 && id < p.N, "block id ", id, " out of range");
    }
    decoding.push_back(s);
  }
  const int64_t items = static_cast<int64_t>(decoding.size()) * p.Hkv;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    Scratch sc;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t h = it % p.Hkv, s = decoding[it / p.Hkv], row = p.starts[s];
      switch (p.D) {
        case 64: attend<64>(p, s, row, h, sc); break;
        case 128: attend<128>(p, s, row, h, sc); break;
        default: attend<0>(p, s, row, h, sc);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode rows of paged attention over the block cache (float32)");
}
