// A decoder layer's pointwise steps on the CPU, float32, one pass over the activations each.
// Contracts: optgptq_kernels.pointwise (add_rms_norm_ref, rotary_ref, silu_and_mul_ref) and
// optgptq_kernels.kv_write.write_kv_ref. Built with -ffp-contract=off, so every product and sum
// below rounds as the same torch op rounds it: rotary and the KV write are bit-exact with the
// references; the norm's sum of squares (summation order) and SiLU's exp differ by a few ulp.
// Rows run in parallel (at::parallel_for) once a step has enough of them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

namespace {

constexpr int64_t kGrainElems = 16384;  // elements per parallel chunk at least

int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, kGrainElems / row_elems); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name,
              ": a float32 CPU tensor expected");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": rows with contiguous elements expected");
}

#if defined(__AVX512F__)
// exp(x) on 16 lanes: x = k ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial of exp(r)
// (relative error ~1e-7, torch's own vectorised exp is within 1 ulp too), times 2^k by scalef
// (inf past float's range, 0 below it).
inline __m512 exp16(__m512 x) {
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 e = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(e, k);
}
#endif

// o = silu(g) * u = g / (1 + exp(-g)) * u over n elements.
void silu_and_mul_row(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i < n; i += 16) {
    const __mmask16 lanes = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1u);
    const __m512 gv = _mm512_maskz_loadu_ps(lanes, g + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(o + i, lanes, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(lanes, u + i)));
  }
#endif
  for (; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// (weight * (s * rsqrt(mean(s^2) + eps)), s) with s = x + residual; without a residual s = x
// and the second output is an empty tensor (the caller has x).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x,
                                                const c10::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  const int64_t T = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.scalar_type() == at::kFloat,
              "weight: float32 [hidden] expected");
  const auto w = weight.contiguous();
  at::Tensor sum = at::empty({0}, x.options());
  if (residual.has_value()) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual and x differ in shape");
    sum = at::empty({T, n}, x.options());
  }
  auto out = at::empty({T, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const int64_t xs = x.stride(0), rs = residual.has_value() ? residual->stride(0) : 0;
  const int64_t ss = residual.has_value() ? sum.stride(0) : 0;
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float epsf = static_cast<float>(eps), nf = static_cast<float>(n);
  at::parallel_for(0, T, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* xr = xp + t * xs;
      const float* s = xr;
      if (rp != nullptr) {
        const float* rr = rp + t * rs;
        float* srow = sp + t * ss;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) srow[i] = xr[i] + rr[i];
        s = srow;
      }
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < n; ++i) sq += s[i] * s[i];
      const float inv = 1.f / std::sqrt(sq / nf + epsf);
      float* orow = op + t * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) orow[i] = wp[i] * (s[i] * inv);
    }
  });
  return {out, sum};
}

// Rotate-half RoPE of q [T, H*D] and k [T, Hkv*D] by the rows `positions` of cos/sin [P, D].
std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& positions, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin, int64_t num_heads,
                                          int64_t num_kv_heads) {
  check_rows(q, "q");
  check_rows(k, "k");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.dim() == 2 && cos.sizes() == sin.sizes(),
              "cos/sin: float32 [max_positions, head_dim] expected");
  const int64_t T = q.size(0), D = cos.size(1), half = D / 2, P = cos.size(0);
  TORCH_CHECK(D % 2 == 0 && q.size(1) == num_heads * D && k.size(1) == num_kv_heads * D &&
                  k.size(0) == T && positions.numel() == T,
              "q/k/positions do not match the heads and the table's head size");
  const auto pos = positions.to(at::kLong).contiguous();
  const auto c = cos.contiguous(), s = sin.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(pp[t] >= 0 && pp[t] < P, "position out of range");
  auto qo = at::empty({T, num_heads * D}, q.options());
  auto ko = at::empty({T, num_kv_heads * D}, k.options());
  const float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  struct Part {
    const float* in;
    int64_t stride, heads;
    float* out;
  };
  const Part parts[2] = {{q.data_ptr<float>(), q.stride(0), num_heads, qo.data_ptr<float>()},
                         {k.data_ptr<float>(), k.stride(0), num_kv_heads, ko.data_ptr<float>()}};
  at::parallel_for(0, T, grain((num_heads + num_kv_heads) * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* cr = cp + pp[t] * D;
      const float* sr = sp + pp[t] * D;
      for (const Part& part : parts) {
        for (int64_t h = 0; h < part.heads; ++h) {
          const float* x = part.in + t * part.stride + h * D;
          float* o = part.out + (t * part.heads + h) * D;
          // q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-q[half:], q[:half])
#pragma omp simd
          for (int64_t d = 0; d < half; ++d) o[d] = x[d] * cr[d] - x[d + half] * sr[d];
#pragma omp simd
          for (int64_t d = half; d < D; ++d) o[d] = x[d] * cr[d] + x[d - half] * sr[d];
        }
      }
    }
  });
  return {qo, ko};
}

// silu(gate) * up = gate / (1 + exp(-gate)) * up.
at::Tensor silu_and_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, "gate");
  check_rows(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up differ in shape");
  const int64_t T = gate.size(0), n = gate.size(1);
  auto out = at::empty({T, n}, gate.options());
  const float *gp = gate.data_ptr<float>(), *up_ = up.data_ptr<float>();
  const int64_t gs = gate.stride(0), us = up.stride(0);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      silu_and_mul_row(gp + t * gs, up_ + t * us, op + t * n, n);
    }
  });
  return out;
}

// k, v [T, Hkv, D] -> caches [Hkv, N, block_size, D] at flat slots; a negative slot is skipped.
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "k, v [T, Hkv, D] with contiguous rows expected");
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "float32 K/V and caches expected");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "contiguous caches [Hkv, N, block_size, D] expected");
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2);
  TORCH_CHECK(k_cache.size(0) == Hkv && k_cache.size(3) == D, "cache and K/V heads differ");
  const int64_t slots_per_head = k_cache.size(1) * k_cache.size(2);
  const auto slots = slot_mapping.to(at::kLong).contiguous();
  TORCH_CHECK(slots.numel() == T, "one slot per token expected");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sl[t] < slots_per_head, "slot out of range");
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const size_t row = D * sizeof(float);
  at::parallel_for(0, T, grain(2 * Hkv * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (sl[t] < 0) continue;
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t dst = (h * slots_per_head + sl[t]) * D;
        std::memcpy(kc + dst, kp + t * k.stride(0) + h * k.stride(1), row);
        std::memcpy(vc + dst, vp + t * v.stride(0) + h * v.stride(1), row);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optgptq_cpu, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)",
        &add_rms_norm);
  m.def("rotary(Tensor positions, Tensor q, Tensor k, Tensor cos, Tensor sin, int num_heads, "
        "int num_kv_heads) -> (Tensor, Tensor)",
        &rotary);
  m.def("silu_and_mul(Tensor gate, Tensor up) -> Tensor", &silu_and_mul);
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()",
        &write_kv);
}
