// GPTQ x @ W on the CPU: INT8 activations times the weight's integer codes in exact int32 dot
// products (AVX512-VNNI vpdpbusd), zero points and scales applied once per segment of at most 64
// input rows. The weight is repacked once at load (kernels/gptq_cpu.py: layout, choice, numbers).
//
// Per call x is quantized per row and segment (a segment: <= 64 packed rows of one group;
// int8_rows_cpu.h) into one INT8 piece, or two for about 16 bits (act_pieces), and
//   y[r, n] = sum_pieces sum_t s[g(t), n] s_x[r, t] (sum_{k in t} q[k, n] x8[r, k]
//                                                     - z[g(t), n] xsum[r, t])
// The bracket is an exact integer, so besides x's rounding (half a step of its segment's scale,
// 1/127 of the segment's largest |x| with one piece, 1/32258 with two) the only rounding is in
// the float sum over segments. Each row is computed on its own: its bits do not depend on the
// batch.
//
// Layout: per 64-column panel, per octet of 8 packed rows, 64 * bits bytes holding eight u8
// vectors (quad h = rows 4h..4h+3, column vector c = columns 16c..16c+15; byte 4j + i of a vector
// is row 4h + i of column 16c + j, vpdpbusd's operand order):
//   8 bits: vector (h, c) at bytes 256h + 64c;
//   4 bits: bytes 64c: (0, c) in the low nibbles, (1, c) in the high ones;
//   2 bits: bytes 64h: (h, c) in bits 2c..2c+1 of each byte;
//   3 bits: the low two bits as 2 bits, then (h, c)'s third bits as a 64-bit mask at 128 + 8(4h+c).
// Product: threads take runs of (row chunk <= 256 rows, panel) items. An item decodes one
// segment of its panel at a time into u8 vectors (4 KB for 64 rows, in L1), which every block of
// 4 rows multiplies into 4 x 4 int32 register accumulators, rescaled into a float [rows, 64]
// tile per segment and piece. Portable path (no AVX512-VNNI): the same numbers, scalar loops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "int8_rows_cpu.h"
#include "simd_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define OPTGPTQ_VNNI 1
#endif

namespace {

using optgptq_int8::Acts;
using optgptq_int8::quantize_rows;
using optgptq_simd::kPanel;
constexpr int64_t kRowChunk = 256;  // rows of x per item
constexpr int64_t kBlock = 4;       // rows per register block
constexpr int64_t kAhead = 16384;    // bytes of codes fetched ahead of their decoding

struct Weight {
  const uint8_t* codes;      // [P, K8 / 8, 64 * bits]
  const at::Half* scales;    // [P, G, 64]
  const uint8_t* zeros;      // [P, G, 64], stored zero points (z - 1)
  const int32_t* seg_rows;   // [S + 1], multiples of 8
  const int32_t* seg_group;  // [S]
  int64_t K8, G, S;
};

// Code of row k (0..7 within its octet) and column n (0..63) of one packed octet.
template <int BITS>
inline int code_at(const uint8_t* oct, int k, int n) {
  const int h = k / 4, c = n / 16, byte = 4 * (n % 16) + k % 4;
  if constexpr (BITS == 8) return oct[256 * h + 64 * c + byte];
  if constexpr (BITS == 4) return (oct[64 * c + byte] >> (4 * h)) & 15;
  int q = (oct[64 * h + byte] >> (2 * c)) & 3;
  if constexpr (BITS == 3) q |= ((oct[128 + 8 * (4 * h + c) + byte / 8] >> (byte % 8)) & 1) << 2;
  return q;
}

#if OPTGPTQ_VNNI
// The u8 vectors (0, c) and (1, c) of one packed octet.
template <int BITS>
__attribute__((always_inline)) inline void decode_pair(const uint8_t* oct, int c, __m512i& w0,
                                                       __m512i& w1) {
  if constexpr (BITS == 8) {
    w0 = _mm512_loadu_si512(oct + 64 * c);
    w1 = _mm512_loadu_si512(oct + 256 + 64 * c);
  } else if constexpr (BITS == 4) {
    const __m512i m = _mm512_set1_epi8(15), v = _mm512_loadu_si512(oct + 64 * c);
    w0 = _mm512_and_si512(v, m);
    w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  } else {
    const __m512i m = _mm512_set1_epi8(3);
    const __m128i shift = _mm_cvtsi32_si128(2 * c);
    w0 = _mm512_and_si512(_mm512_srl_epi16(_mm512_loadu_si512(oct), shift), m);
    w1 = _mm512_and_si512(_mm512_srl_epi16(_mm512_loadu_si512(oct + 64), shift), m);
    if constexpr (BITS == 3) {
      const __m512i four = _mm512_set1_epi8(4);
      uint64_t h0, h1;
      std::memcpy(&h0, oct + 128 + 8 * c, 8);
      std::memcpy(&h1, oct + 128 + 8 * (4 + c), 8);
      w0 = _mm512_or_si512(w0, _mm512_maskz_mov_epi8(h0, four));
      w1 = _mm512_or_si512(w1, _mm512_maskz_mov_epi8(h1, four));
    }
  }
}

// tile[r, :] += s * s_x[r] * (sum_k q x8[r, k] - z * xsum[r]) for MR rows over one segment,
// its u8 vectors read from `src`: decoded octets (SRC_BITS 0: 512 bytes each) or the packed codes
// themselves (SRC_BITS = bits). `a` points at the block's first row and the segment: x8 rows K8
// apart, s_x and xsum S apart.
template <int MR, int SRC_BITS>
__attribute__((always_inline)) inline void segment_block(const uint8_t* src, int64_t octets,
                                                         const Acts& a, int64_t K8, int64_t S,
                                                         const __m512 s[4], const __m512 z[4],
                                                         float* tile) {
  constexpr int64_t kStride = SRC_BITS == 0 ? 512 : 64 * SRC_BITS;
  const int8_t* x8 = a.x8;
  __m512i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t o = 0; o < octets; ++o, src += kStride, x8 += 8) {
    __m512i b0[MR], b1[MR];
    for (int r = 0; r < MR; ++r) {
      int32_t lo, hi;
      std::memcpy(&lo, x8 + r * K8, 4);
      std::memcpy(&hi, x8 + r * K8 + 4, 4);
      b0[r] = _mm512_set1_epi32(lo);
      b1[r] = _mm512_set1_epi32(hi);
    }
    if constexpr (SRC_BITS != 0)
      for (int line = 0; line < SRC_BITS; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(src + kAhead + 64 * line), _MM_HINT_T0);
    for (int c = 0; c < 4; ++c) {
      __m512i w0, w1;
      if constexpr (SRC_BITS == 0) {
        w0 = _mm512_loadu_si512(src + 64 * c);
        w1 = _mm512_loadu_si512(src + 256 + 64 * c);
      } else {
        decode_pair<SRC_BITS>(src, c, w0, w1);
      }
      for (int r = 0; r < MR; ++r)
        acc[r][c] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][c], w0, b0[r]), w1, b1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 sum = _mm512_set1_ps(static_cast<float>(a.xs[r * S]));
    const __m512 sx = _mm512_set1_ps(a.sx[r * S]);
    for (int c = 0; c < 4; ++c) {
      const __m512 exact = _mm512_fnmadd_ps(z[c], sum, _mm512_cvtepi32_ps(acc[r][c]));
      float* y = tile + r * kPanel + 16 * c;
      _mm512_storeu_ps(y, _mm512_fmadd_ps(_mm512_mul_ps(s[c], sx), exact, _mm512_loadu_ps(y)));
    }
  }
}
#endif

// Rows [m0, m0 + rows) x panel p -> tile [rows, 64] (bias not added), summed over the
// activation pieces acts[0 .. pieces).
template <int BITS>
void item(const Weight& w, const Acts* acts, int pieces, int64_t m0, int64_t rows, int64_t p,
          uint8_t* buf, float* tile) {
  std::fill(tile, tile + rows * kPanel, 0.f);
  const uint8_t* panel = w.codes + p * (w.K8 / 8) * 64 * BITS;
  for (int64_t t = 0; t < w.S; ++t) {
    const int64_t k0 = w.seg_rows[t], k1 = w.seg_rows[t + 1], g = w.seg_group[t];
    const at::Half* sp = w.scales + (p * w.G + g) * kPanel;
    const uint8_t* zp = w.zeros + (p * w.G + g) * kPanel;
#if OPTGPTQ_VNNI
    __m512 s[4], z[4];
    for (int c = 0; c < 4; ++c) {
      s[c] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + 16 * c)));
      const __m128i zb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + 16 * c));
      z[c] = _mm512_add_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(zb)), _mm512_set1_ps(1.f));
    }
    const uint8_t* codes = panel + k0 / 8 * 64 * BITS;
    const int64_t oct = (k1 - k0) / 8;
    if (rows <= kBlock && pieces == 1) {  // one block decodes once anyway: into registers
      const Acts blk{acts[0].x8 + m0 * w.K8 + k0, acts[0].sx + m0 * w.S + t,
                     acts[0].xs + m0 * w.S + t};
      switch (rows) {
        case 4: segment_block<4, BITS>(codes, oct, blk, w.K8, w.S, s, z, tile); break;
        case 3: segment_block<3, BITS>(codes, oct, blk, w.K8, w.S, s, z, tile); break;
        case 2: segment_block<2, BITS>(codes, oct, blk, w.K8, w.S, s, z, tile); break;
        default: segment_block<1, BITS>(codes, oct, blk, w.K8, w.S, s, z, tile); break;
      }
      continue;
    }
    uint8_t* dst = buf;
    for (const uint8_t* o = codes; dst < buf + oct * 512; o += 64 * BITS, dst += 512) {
      for (int line = 0; line < BITS; ++line)  // the codes kAhead bytes on, in stream order
        _mm_prefetch(reinterpret_cast<const char*>(o + kAhead + 64 * line), _MM_HINT_T0);
      for (int c = 0; c < 4; ++c) {
        __m512i w0, w1;
        decode_pair<BITS>(o, c, w0, w1);
        _mm512_storeu_si512(dst + 64 * c, w0);
        _mm512_storeu_si512(dst + 256 + 64 * c, w1);
      }
    }
    for (int i = 0; i < pieces; ++i)
      for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
        const Acts blk{acts[i].x8 + (m0 + i0) * w.K8 + k0, acts[i].sx + (m0 + i0) * w.S + t,
                       acts[i].xs + (m0 + i0) * w.S + t};
        float* out = tile + i0 * kPanel;
        switch (std::min<int64_t>(kBlock, rows - i0)) {
          case 4: segment_block<4, 0>(buf, oct, blk, w.K8, w.S, s, z, out); break;
          case 3: segment_block<3, 0>(buf, oct, blk, w.K8, w.S, s, z, out); break;
          case 2: segment_block<2, 0>(buf, oct, blk, w.K8, w.S, s, z, out); break;
          default: segment_block<1, 0>(buf, oct, blk, w.K8, w.S, s, z, out); break;
        }
      }
#else
    (void)buf;
    for (int i = 0; i < pieces; ++i)
      for (int64_t r = 0; r < rows; ++r)
        for (int n = 0; n < kPanel; ++n) {
          int32_t acc = 0;
          for (int64_t k = k0; k < k1; ++k)
            acc += code_at<BITS>(panel + k / 8 * 64 * BITS, k % 8, n) *
                   acts[i].x8[(m0 + r) * w.K8 + k];
          const int64_t rt = (m0 + r) * w.S + t;
          const float exact = std::fma(-(static_cast<float>(zp[n]) + 1.f),
                                       static_cast<float>(acts[i].xs[rt]),
                                       static_cast<float>(acc));
          tile[r * kPanel + n] =
              std::fma(static_cast<float>(sp[n]) * acts[i].sx[rt], exact, tile[r * kPanel + n]);
        }
#endif
  }
}

at::Tensor gptq_packed_linear(const at::Tensor& x, const at::Tensor& codes,
                              const at::Tensor& scales, const at::Tensor& zeros,
                              const at::Tensor& seg_rows, const at::Tensor& seg_group,
                              const c10::optional<at::Tensor>& src, int64_t bits, int64_t N,
                              const c10::optional<at::Tensor>& bias, int64_t pieces) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(pieces == 1 || pieces == 2, "activation pieces: 1 (INT8) or 2 (two INT8)");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat,
              "x: float32 [rows, in] with contiguous rows expected");
  const int64_t M = x.size(0), K8 = codes.size(1) * 8, S = seg_group.numel(), P = codes.size(0);
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(2) == 64 * bits && P * kPanel >= N && N > (P - 1) * kPanel,
              "codes: uint8 [ceil(out / 64), rows / 8, 64 * bits] expected");
  for (const auto& t : {seg_rows, seg_group})
    TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous(), "segments: int32 expected");
  TORCH_CHECK(S >= 1 && seg_rows.numel() == S + 1, "seg_rows: [segments + 1] expected");
  const int32_t* sr = seg_rows.data_ptr<int32_t>();
  const int32_t* sg = seg_group.data_ptr<int32_t>();
  const int64_t G = scales.size(1);
  for (const auto& [t, dtype] : {std::pair{scales, at::kHalf}, std::pair{zeros, at::kByte}})
    TORCH_CHECK(t.dim() == 3 && t.scalar_type() == dtype && t.is_contiguous() && t.size(0) == P &&
                    t.size(1) == G && t.size(2) == kPanel,
                "scales (float16) / zeros (uint8): [panels, groups, 64] expected");
  int64_t widest = 0;
  for (int64_t t = 0; t < S; ++t) {
    TORCH_CHECK(sr[t] % 8 == 0 && sr[t] < sr[t + 1] && sg[t] >= 0 && sg[t] < G,
                "segments must be non-empty runs of octets of known groups");
    widest = std::max<int64_t>(widest, sr[t + 1] - sr[t]);
  }
  TORCH_CHECK(sr[0] == 0 && sr[S] == K8, "segments must cover the packed rows");
  const int32_t* sp = nullptr;
  if (src.has_value()) {
    TORCH_CHECK(src->scalar_type() == at::kInt && src->is_contiguous() && src->numel() == K8,
                "src: int32 [packed rows] expected");
    sp = src->data_ptr<int32_t>();
    for (int64_t k = 0; k < K8; ++k)
      TORCH_CHECK(sp[k] < x.size(1), "src names an input column x does not have");
  } else {
    TORCH_CHECK(x.size(1) == K8, "x: in_features must equal the packed rows without src");
  }
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == N && b.scalar_type() == at::kFloat, "bias: float32 [out] expected");
  }
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  std::vector<int8_t> x8(pieces * M * K8);
  std::vector<float> sx(pieces * M * S);
  std::vector<int32_t> xs(pieces * M * S);
  Acts acts[2];
  for (int i = 0; i < pieces; ++i)
    acts[i] = {x8.data() + i * M * K8, sx.data() + i * M * S, xs.data() + i * M * S};
  quantize_rows(x, sp, sr, S, K8, static_cast<int>(pieces), acts);
  const Weight w{codes.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(),
                 zeros.data_ptr<uint8_t>(), sr, sg, K8, G, S};
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t even = (M + kRowChunk - 1) / kRowChunk;
  const int64_t span = ((M + even - 1) / even + kBlock - 1) / kBlock * kBlock;  // equal chunks
  const int64_t chunks = (M + span - 1) / span;
  at::parallel_for(0, chunks * P, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buf(widest * kPanel);
    std::vector<float> tile(std::min(span, M) * kPanel);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t m0 = it / P * span, p = it % P, rows = std::min(span, M - m0);
      auto run = [&](auto kernel) {
        kernel(w, acts, static_cast<int>(pieces), m0, rows, p, buf.data(), tile.data());
      };
      switch (bits) {
        case 2: run(item<2>); break;
        case 3: run(item<3>); break;
        case 4: run(item<4>); break;
        default: run(item<8>); break;
      }
      const int64_t n0 = p * kPanel, cols = std::min(kPanel, N - n0);
      const float* bias_p = bp != nullptr ? bp + n0 : nullptr;
#if defined(__AVX512F__)
      optgptq_simd::store_tile(tile.data(), rows, bias_p, op + m0 * N + n0, N, cols);
#else
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          op[(m0 + r) * N + n0 + c] = tile[r * kPanel + c] + (bias_p != nullptr ? bias_p[c] : 0.f);
#endif
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optgptq_cpu, m) {
  m.def("gptq_packed_linear(Tensor x, Tensor codes, Tensor scales, Tensor zeros, "
        "Tensor seg_rows, Tensor seg_group, Tensor? src, int bits, int out_features, "
        "Tensor? bias, int act_pieces) -> Tensor",
        &gptq_packed_linear);
}
