// The batch arguments shared by the paged attention ops on the CPU (paged_attention_cpu.cpp for
// the sequences adding one token, prefill_attention_cpu.cpp for those adding several): checked
// once and converted to contiguous int64 / float32, with the per-sequence checks both run on the
// sequences they serve.
#pragma once

#include <ATen/ATen.h>

namespace optgptq_paged {

struct Batch {
  at::Tensor q, tables, lens, starts, slopes;  // q contiguous; slopes undefined without ALiBi
  const int64_t *table, *len, *start;
  int64_t S, H, D, Hkv, G, N, bs, W;

  Batch(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
        const at::Tensor& block_tables, const at::Tensor& seq_lens,
        const at::Tensor& query_start_loc, const c10::optional<at::Tensor>& alibi_slopes) {
    TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
                "q [T, H, D] and K/V caches [Hkv, N, block_size, D] expected");
    TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                    v_cache.scalar_type() == at::kFloat,
                "the CPU kernel takes float32");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous caches expected");
    q = q_in.contiguous();
    tables = block_tables.to(at::kLong).contiguous();
    lens = seq_lens.to(at::kLong).contiguous();
    starts = query_start_loc.to(at::kLong).contiguous();
    if (alibi_slopes.has_value()) slopes = alibi_slopes->to(at::kFloat).contiguous();
    table = tables.data_ptr<int64_t>();
    len = lens.data_ptr<int64_t>();
    start = starts.data_ptr<int64_t>();
    S = lens.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(0);
    N = k_cache.size(1), bs = k_cache.size(2), W = tables.size(1);
    TORCH_CHECK(k_cache.size(3) == D && H % Hkv == 0, "head size / head count mismatch");
    TORCH_CHECK(starts.size(0) == S + 1 && tables.size(0) >= S, "batch size mismatch");
    G = H / Hkv;
  }

  const float* slope() const { return slopes.defined() ? slopes.data_ptr<float>() : nullptr; }

  // The tokens sequence s adds (checked against its context).
  int64_t query_len(int64_t s) const {
    const int64_t n = start[s + 1] - start[s];
    TORCH_CHECK(n >= 0 && n <= len[s], "query chunk longer than its context");
    return n;
  }

  // Sequence s's block table covers its context with ids inside the pool.
  void check_blocks(int64_t s) const {
    const int64_t blocks = (len[s] + bs - 1) / bs;
    TORCH_CHECK(blocks <= W, "block table narrower than a context");
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t id = table[s * W + b];
      TORCH_CHECK(id >= 0 && id < N, "block id ", id, " out of range");
    }
  }
};

}  // namespace optgptq_paged
