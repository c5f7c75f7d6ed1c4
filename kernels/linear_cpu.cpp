// Float32 x @ W^T on the CPU from a panel-packed weight, built for a decode step's few rows.
// Contract: torch.nn.functional.linear(x, W, bias), up to float rounding (sums run over k in order).
//
// Layout: W [N, K] is packed as P = ceil(N / 64) panels [K, 64] (columns n0..n0+63, zero-padded),
// each contiguous, so a panel streams from memory in one sequential run; in float16 where every
// weight is a float16 value (widened exactly in registers: the same sums from half the bytes).
// Threads take contiguous stretches of panels. A register tile computes 6 rows x 64 columns: per k, the panel's 64
// weights are four vectors, each row's x[r, k] is broadcast, and 24 accumulators stay in
// registers. Two schedules (see `streamed` and `row_chunked`): under 80 rows the panels are
// walked in 64-row chunks that every row block uses while they sit in L1, the chunk two ahead
// being fetched meanwhile; from 80 rows on, every row block runs the whole panel, the first from
// memory, the others from cache while the next panel is fetched. AVX-512 only
// (avx512_built says whether it was compiled); the Python side packs nothing
// elsewhere.
//
// Measured on SmolLM2's four layer shapes over all 30 layers plus its 576 x 49152 head, weights
// streamed from memory as in a decode step, alternating in one process: the streamed schedule
// ran 1.47x / 1.16x / 1.09x / 1.04x the whole-panel one at 8 / 16 / 35 / 64 rows (with its
// register tile inlined: out of line it lost 5%), 0.97x at 100 rows. The whole-panel schedule had
// run 1.2-1.3x faster than torch.mm on a [K, N] weight (MKL) at 8-64 rows and 0.79-0.97x at
// 128-1024. The model runs every float product through this kernel all the same, so that each
// weight is stored once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd_cpu.h"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

using optgptq_simd::kPanel;
using optgptq_simd::kRows;
#if defined(__AVX512F__)
using optgptq_simd::row_block;
using optgptq_simd::store_tile;
#endif
constexpr int64_t kRowChunk = 256;    // row_chunked: rows per pass over the panels
constexpr int64_t kStreamedRows = 80;  // fewer rows than this: the streamed schedule
constexpr int64_t kChunk = 64;        // streamed: weight rows per chunk (16 KB)
constexpr int64_t kAhead = 2;         // streamed: chunks fetched ahead

// W [N, K] -> [P, K, 64], float16 where every weight is a float16 value (a checkpoint stored in
// float16: half the bytes to stream, the same products), float32 otherwise.
at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "weight: a float32 CPU [out, in] matrix expected");
  const int64_t N = weight.size(0), K = weight.size(1), P = (N + kPanel - 1) / kPanel;
  const auto half = weight.to(at::kHalf);
  const bool exact = half.to(at::kFloat).equal(weight);
  auto padded = at::zeros({P * kPanel, K}, weight.options().dtype(exact ? at::kHalf : at::kFloat));
  padded.narrow(0, 0, N).copy_(exact ? half : weight);
  return padded.view({P, kPanel, K}).transpose(1, 2).contiguous();
}

#if defined(__AVX512F__)
// Few rows (a decode step): the weights stream from memory once, and both the stream and the
// arithmetic must be kept busy. A thread walks its panels in chunks of kChunk weight rows (16 KB,
// held in L1 while every row block uses it); the sums live in a [rows, 64] tile between chunks.
// While a chunk is multiplied, the chunk kAhead places further along the thread's contiguous
// stretch of panels is fetched into L2, its rows spread evenly over the row blocks.
template <class T>
void streamed(const float* xp, int64_t xs, int64_t M, int64_t K, const T* wp, int64_t N,
              int64_t P, const float* bp, float* op) {
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(M * kPanel);
    const T* stretch_end = wp + end * K * kPanel;
    const int64_t blocks = (M + kRows - 1) / kRows;
    for (int64_t p = begin; p < end; ++p) {
      const T* panel = wp + p * K * kPanel;
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t k1 = std::min(K, k0 + kChunk);
        const T* pf = panel + (k0 + kAhead * kChunk) * kPanel;
        if (pf + (k1 - k0) * kPanel > stretch_end) pf = nullptr;
        for (int64_t i0 = 0; i0 < M; i0 += kRows)
          row_block<_MM_HINT_T1>(M - i0, xp + i0 * xs, xs, panel, k0, k1,
                                 tile.data() + i0 * kPanel, kPanel, k0 == 0, pf, i0 / kRows,
                                 blocks);
      }
      const int64_t n0 = p * kPanel;
      store_tile(tile.data(), M, bp != nullptr ? bp + n0 : nullptr, op + n0, N,
                 std::min(kPanel, N - n0));
    }
  });
}

// Many rows (a prefill chunk): arithmetic dominates. Rows go in equal chunks of at most kRowChunk,
// whose x rows stay in cache across the panels. A work item is one panel for one row chunk: its
// first row block reads the panel from memory (asking 16 rows ahead), the others from cache
// while they fetch the thread's next panel into L2. When the panels divide evenly among the
// threads, each chunk's panels are split among them, chunk after chunk; otherwise threads take
// contiguous runs of all the items (SmolLM2's 9-panel products at 1024 rows: 36 items split
// evenly, not 9 panels 5 / 4 four times over: 1.06-1.09x; its 48-panel product ran 0.96x so).
template <class T>
void row_chunked(const float* xp, int64_t xs, int64_t M, int64_t K, const T* wp, int64_t N,
                 int64_t P, const float* bp, float* op) {
  const int64_t even = (M + kRowChunk - 1) / kRowChunk;
  const int64_t span = ((M + even - 1) / even + kRows - 1) / kRows * kRows;  // equal chunks
  const int64_t chunks = (M + span - 1) / span;
  // items [begin, end) of chunk-major order; item `it` is panel it % P of row chunk it / P
  auto items = [&](int64_t begin, int64_t end) {
    std::vector<float> tile(std::min(span, M) * kPanel);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t m0 = it / P * span, p = it % P, rows = std::min(span, M - m0);
      const int64_t blocks = (rows + kRows - 1) / kRows, period = std::max<int64_t>(1, blocks - 1);
      const T* panel = wp + p * K * kPanel;
      const T* next = it + 1 < end ? wp + (it + 1) % P * K * kPanel : nullptr;
      const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
      // a whole panel without bias is summed into `out` itself, others through the tile
      const bool direct = cols == kPanel && bp == nullptr;
      float* dst = direct ? op + m0 * N + n0 : tile.data();
      const int64_t ds = direct ? N : kPanel;
      for (int64_t i0 = 0; i0 < rows; i0 += kRows) {
        const float* xr = xp + (m0 + i0) * xs;
        if (i0 == 0)
          row_block<_MM_HINT_T0>(rows, xr, xs, panel, 0, K, dst, ds, true, panel + 16 * kPanel, 0,
                                 1);
        else
          row_block<_MM_HINT_T1>(rows - i0, xr, xs, panel, 0, K, dst + i0 * ds, ds, true, next,
                                 i0 / kRows - 1, period);
      }
      if (!direct)
        store_tile(tile.data(), rows, bp != nullptr ? bp + n0 : nullptr, op + m0 * N + n0, N,
                   cols);
    }
  };
  if (chunks > 1 && P % at::get_num_threads() != 0) {
    at::parallel_for(0, chunks * P, 1, items);
    return;
  }
  for (int64_t c = 0; c < chunks; ++c)
    at::parallel_for(c * P, (c + 1) * P, 1, items);
}
#endif

// x [M, K] @ W^T (+ bias) for a weight packed by pack_linear_weight; N = out_features.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat,
              "x: float32 [rows, in] with contiguous rows expected");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous() &&
                  packed.size(1) == x.size(1) && packed.size(0) * kPanel >= N &&
                  (packed.scalar_type() == at::kFloat || packed.scalar_type() == at::kHalf),
              "packed weight does not match x or out_features");
  const int64_t M = x.size(0), K = x.size(1), P = packed.size(0);
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == N && b.scalar_type() == at::kFloat, "bias: float32 [out] expected");
  }
  auto out = at::empty({M, N}, x.options());
#if defined(__AVX512F__)
  if (M > 0) {
    auto run = [&](const auto* wp) {
      using T = std::remove_cv_t<std::remove_pointer_t<decltype(wp)>>;
      auto schedule = M < kStreamedRows ? streamed<T> : row_chunked<T>;
      schedule(x.data_ptr<float>(), x.stride(0), M, K, wp, N, P,
               b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>());
    };
    if (packed.scalar_type() == at::kHalf)
      run(reinterpret_cast<const uint16_t*>(packed.data_ptr<at::Half>()));
    else
      run(packed.data_ptr<float>());
  }
#else
  TORCH_CHECK(false, "packed_linear needs AVX-512 (see avx512_built)");
#endif
  return out;
}

// Whether this build has the AVX-512 kernels: packed_linear here, and paged_prefill_attention
// (prefill_attention_cpu.cpp).
bool avx512_built() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optgptq_cpu, m) {
  m.def("avx512_built() -> bool", &avx512_built);
  m.def("pack_linear_weight(Tensor weight) -> Tensor", &pack_linear_weight);
  m.def("packed_linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor",
        &packed_linear);
}
