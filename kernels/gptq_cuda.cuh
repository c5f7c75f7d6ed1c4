// GPTQ 4-bit x float16 GEMM on tensor cores (sm_80+): out[M,N] = x[M,K] @ W[K,N] (+ bias[N]).
// No torch here: the launcher takes raw pointers and a stream, so this header compiles alone
// with nvcc (tests/test_gptq_cuda.py does that for sm_80 and sm_90); gptq_cuda.cu binds it.
//
// Weight layout (optgptq_kernels.gptq_cuda.prepare, once at load): the codes (rows in act-order
// order) in 16x16 tiles; lane l (g = l / 4, t = l % 4) owns a word of 8, nibble i at (row, col):
//   n0 = (2t, g)    n4 = (2t+1, g)    n1 = (2t+8, g)    n5 = (2t+9, g)
//   n2 = (2t, g+8)  n6 = (2t+1, g+8)  n3 = (2t+8, g+8)  n7 = (2t+9, g+8)
// PTX's m16n8k16 .f16 B fragment is {b0,b1} = rows 2t, 2t+1, {b2,b3} = rows 2t+8, 2t+9, column
// g, lower row in the low half: (n0,n4), (n1,n5) are n8 subtile 0's B registers, (n2,n6),
// (n3,n7) subtile 1's (columns g+8). Words: [K/64][N/16][32 lanes][4 k16 tiles of the slice], an
// int4 per lane per (64-row slice, n16 tile). Scales and zeros (float16 1024 + z) [groups, N]
// interleave each 16 columns (g at 2g, g+8 at 2g+1): one 32-bit load per lane for both.
//
// Dequantization, bit-identical to dequantize_ref (s * (q - z) in float32, rounded once):
// (w & 0x000F000F) | 0x64006400 is the half2 (1024 + n0, 1024 + n4), minus (1024 + z) exactly
// n - z; (w & 0x00F000F0) | 0x64006400 is (1024 + 16 n1, 1024 + 16 n5), times 1/16 plus
// -(64 + z) (one fma) exactly n - z; w >> 8 gives the other four codes the same way. One
// float16 multiply by the column's scale then rounds the exact s (n - z) once.
//
// Kernel: block tile BM x BN (WARPS_M x WARPS_N warps of 16 M_TILES x 16 N_TILES each), K in
// 64-row slices through a STAGES-deep cp.async pipeline. A stage holds the x slice (BM x 64
// float16, 16-byte chunk c of row r at chunk c ^ (r % 8): ldmatrix.x4 reads it without bank
// conflicts), the block's words (BN / 16 x 32 int4) and the 1, 2 or 4 scale (and zero) rows
// the slice touches (group size >= 64, 32, 16). Per k16 step a warp loads M_TILES A fragments,
// dequantizes N_TILES words and issues 2 M_TILES N_TILES mma.m16n8k16 (float32 accumulators).
// Rows of x past M are zero-filled (cp.async src-size 0) and never stored.
// Split-K (grid.z): blocks write float32 partials to workspace[z] and count in on their tile's
// counter; the last sums them in the order z = 0, 1, ... (deterministic), adds the bias, writes
// float16 and resets the counter for the next call.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>

namespace optgptq_cuda {

constexpr int kBK = 64;  // rows of K per pipeline stage

struct GemmParams {
  const __half* x;       // [m, k] row-major, 16-byte aligned
  const int4* tiles;     // [k / 64][n / 16][32][4] words
  const __half* scales;  // [groups, n], columns interleaved per 16
  const __half* zeros;   // [groups, n] 1024 + z, interleaved; nullptr when symmetric (z = 8)
  const __half* bias;    // [n] or nullptr
  __half* out;           // [m, n]
  float* workspace;      // [split_k, m, n] when split_k > 1
  int* locks;            // >= gridDim.x * gridDim.y counters, zero, when split_k > 1
  int m, n, k, group_size, split_k;
};

// 16 bytes global -> shared, bypassing L1; src-size 0 (valid false) writes 16 zero bytes.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>  // until at most N of this thread's newest copy groups are in flight
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
// Lanes 8j..8j+7 address 8x8 matrix j's rows; lane l gets its row l / 4, cols 2 (l % 4) + 0..1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// float16x2 arithmetic on raw bits, round to nearest, never contracted with other operations.
__device__ __forceinline__ uint32_t hsub2(uint32_t a, uint32_t b) {
  uint32_t d; asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t d; asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d; asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}

constexpr uint32_t kMagic = 0x64006400u;      // half2(1024, 1024)
constexpr uint32_t kSixteenth = 0x2C002C00u;  // half2(1/16, 1/16)
constexpr uint32_t k960 = 0x63806380u;        // half2(960): 960 - (1024 + z) = -(64 + z)
constexpr uint32_t kSymLo = 0x64086408u;      // half2(1032) = 1024 + z for z = 8
constexpr uint32_t kSymHi = 0xD480D480u;      // half2(-72) = -(64 + z) for z = 8

// A lane's word -> B registers {b[0], b[1]} of subtile 0 and {b[2], b[3]} of subtile 1, given
// per subtile zlo = half2(1024 + z), zhi = half2(-(64 + z)) and s = half2(scale).
__device__ __forceinline__ void dequant8(uint32_t w, uint32_t zlo0, uint32_t zhi0, uint32_t s0,
                                         uint32_t zlo1, uint32_t zhi1, uint32_t s1,
                                         uint32_t (&b)[4]) {
  const uint32_t w8 = w >> 8;
  b[0] = hmul2(hsub2((w & 0x000F000Fu) | kMagic, zlo0), s0);
  b[1] = hmul2(hfma2((w & 0x00F000F0u) | kMagic, kSixteenth, zhi0), s0);
  b[2] = hmul2(hsub2((w8 & 0x000F000Fu) | kMagic, zlo1), s1);
  b[3] = hmul2(hfma2((w8 & 0x00F000F0u) | kMagic, kSixteenth, zhi1), s1);
}

template <int WARPS_M, int WARPS_N, int M_TILES, int N_TILES, int STAGES, bool HAS_ZP>
struct Tile {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kBM = WARPS_M * 16 * M_TILES, kBN = WARPS_N * 16 * N_TILES;
  static constexpr int kABytes = kBM * kBK * 2, kBBytes = kBN * 32;  // x slice, words
  static constexpr int kSBytes = 4 * kBN * 2;  // up to 4 group rows of BN float16
  static constexpr int kStageBytes = kABytes + kBBytes + kSBytes * (HAS_ZP ? 2 : 1);
  static constexpr int kSmemBytes = kStageBytes * STAGES;
  static_assert(STAGES >= 2 && kBN % 64 == 0, "at least two stages, BN a multiple of 64");
};

template <int WARPS_M, int WARPS_N, int M_TILES, int N_TILES, int STAGES, bool HAS_ZP>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, 1) gptq_gemm_kernel(const GemmParams p) {
  using T = Tile<WARPS_M, WARPS_N, M_TILES, N_TILES, STAGES, HAS_ZP>;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int last_block;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N, g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.x * T::kBM, n0 = blockIdx.y * T::kBN;
  const int n_valid = min(T::kBN, p.n - n0);  // a multiple of 64
  const long long slices = p.k / kBK;  // this block's slices: [kb0, kb0 + iters)
  const int kb0 = static_cast<int>(blockIdx.z * slices / p.split_k);
  const int iters = static_cast<int>((blockIdx.z + 1) * slices / p.split_k) - kb0;
  const int rows_per_slice = p.group_size >= kBK ? 1 : kBK / p.group_size;  // 1, 2 or 4
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  auto load_stage = [&](int stage, int kb) {
    const uint32_t a_sh = smem_base + stage * T::kStageBytes;
    const uint32_t b_sh = a_sh + T::kABytes, s_sh = b_sh + T::kBBytes;
    constexpr int kAChunks = T::kBM * 8;
#pragma unroll
    for (int i = 0; i < (kAChunks + T::kThreads - 1) / T::kThreads; ++i) {
      const int c = tid + i * T::kThreads, row = c >> 3, ch = c & 7;
      if (kAChunks % T::kThreads == 0 || c < kAChunks) {
        const bool valid = m0 + row < p.m;
        const __half* src = p.x + static_cast<size_t>(valid ? m0 + row : 0) * p.k + kb * kBK;
        cp_async16(a_sh + (row * 8 + (ch ^ (row & 7))) * 16, src + ch * 8, valid);
      }
    }
    const int4* b_src = p.tiles + (static_cast<size_t>(kb) * (p.n / 16) + n0 / 16) * 32;
#pragma unroll
    for (int i = 0; i < (T::kBN * 2 + T::kThreads - 1) / T::kThreads; ++i) {
      const int c = tid + i * T::kThreads;
      if (c < n_valid * 2) cp_async16(b_sh + c * 16, b_src + c, true);
    }
    const int group0 = kb * kBK / p.group_size, row_chunks = n_valid / 8;
    for (int c = tid; c < rows_per_slice * row_chunks; c += T::kThreads) {
      const int r = c / row_chunks, ch = c % row_chunks;
      const size_t off = static_cast<size_t>(group0 + r) * p.n + n0 + ch * 8;
      cp_async16(s_sh + (r * T::kBN + ch * 8) * 2, p.scales + off, true);
      if (HAS_ZP) cp_async16(s_sh + T::kSBytes + (r * T::kBN + ch * 8) * 2, p.zeros + off, true);
    }
  };
  float acc[M_TILES][N_TILES][2][4] = {};  // [m16 tile][n16 tile][n8 subtile][C fragment]
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < iters) load_stage(s, kb0 + s);
    cp_commit();
  }
  for (int it = 0; it < iters; ++it) {
    cp_wait<STAGES - 2>();  // this thread's copies of stage `it` have landed
    __syncthreads();        // everyone's have, and stage it - 1 is free to refill
    if (it + STAGES - 1 < iters) load_stage((it + STAGES - 1) % STAGES, kb0 + it + STAGES - 1);
    cp_commit();
    const int stage = it % STAGES;
    const uint32_t a_sh = smem_base + stage * T::kStageBytes;
    const unsigned char* base = smem + stage * T::kStageBytes;
    const int4* words_sh = reinterpret_cast<const int4*>(base + T::kABytes);
    const __half* s_sh = reinterpret_cast<const __half*>(base + T::kABytes + T::kBBytes);
    int4 words[N_TILES];
#pragma unroll
    for (int j = 0; j < N_TILES; ++j) words[j] = words_sh[(wn * N_TILES + j) * 32 + lane];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[M_TILES][4];  // ldmatrix j: rows 8 (j % 2) + 0..7, k 8 (j / 2) + 0..7
#pragma unroll
      for (int i = 0; i < M_TILES; ++i) {
        const int row = wm * 16 * M_TILES + 16 * i + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int ch = 2 * kk + (lane >> 4);
        ldmatrix_x4(a[i], a_sh + (row * 8 + (ch ^ (row & 7))) * 16);
      }
      const int srow = (kk * rows_per_slice) >> 2;  // this k16 tile's group row in the stage
#pragma unroll
      for (int j = 0; j < N_TILES; ++j) {
        const int col = srow * T::kBN + (wn * N_TILES + j) * 16 + 2 * g;
        const uint32_t sp = *reinterpret_cast<const uint32_t*>(s_sh + col);
        const uint32_t s0 = __byte_perm(sp, sp, 0x1010), s1 = __byte_perm(sp, sp, 0x3232);
        uint32_t zlo0 = kSymLo, zhi0 = kSymHi, zlo1 = kSymLo, zhi1 = kSymHi;
        if constexpr (HAS_ZP) {
          const uint32_t zp = *reinterpret_cast<const uint32_t*>(s_sh + T::kSBytes / 2 + col);
          zlo0 = __byte_perm(zp, zp, 0x1010), zlo1 = __byte_perm(zp, zp, 0x3232);
          zhi0 = hsub2(k960, zlo0), zhi1 = hsub2(k960, zlo1);
        }
        const int w = kk == 0 ? words[j].x : kk == 1 ? words[j].y
                    : kk == 2 ? words[j].z : words[j].w;
        uint32_t b[4];
        dequant8(static_cast<uint32_t>(w), zlo0, zhi0, s0, zlo1, zhi1, s1, b);
#pragma unroll
        for (int i = 0; i < M_TILES; ++i) {
          mma_16816(acc[i][j][0], a[i], b[0], b[1]);
          mma_16816(acc[i][j][1], a[i], b[2], b[3]);
        }
      }
    }
  }
  cp_wait<0>();
  // Accumulator pair e of (i, j): subtile h = e / 2, row g + 8 (e % 2), columns 8 h + 2 t and
  // + 1, as the PTX C fragment (c0, c1: row g; c2, c3: row g + 8). f(row * N + col, col, pair).
  auto for_each_pair = [&](auto&& f) {
#pragma unroll
    for (int x = 0; x < M_TILES * N_TILES * 4; ++x) {
      const int i = x / (N_TILES * 4), j = x / 4 % N_TILES, e = x % 4;
      const int row = m0 + wm * 16 * M_TILES + 16 * i + g + 8 * (e & 1);
      const int col = n0 + (wn * N_TILES + j) * 16 + 8 * (e >> 1) + 2 * t;
      if (row < p.m && col < p.n)
        f(static_cast<size_t>(row) * p.n + col, col, acc[i][j][e >> 1] + 2 * (e & 1));
    }
  };
  if (p.split_k > 1) {
    const size_t mn = static_cast<size_t>(p.m) * p.n;
    for_each_pair([&](size_t at, int, float* v) {
      *reinterpret_cast<float2*>(p.workspace + blockIdx.z * mn + at) = make_float2(v[0], v[1]);
    });
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      int* counter = p.locks + blockIdx.y * gridDim.x + blockIdx.x;
      last_block = atomicAdd(counter, 1) == p.split_k - 1;
      if (last_block) *counter = 0;  // everyone has arrived: zero for the next call
    }
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    for_each_pair([&](size_t at, int, float* v) {
      float2 sum = make_float2(0.0f, 0.0f);
      for (int z = 0; z < p.split_k; ++z) {  // a fixed order: the same sums on every call
        const float2 part = z == static_cast<int>(blockIdx.z) ? make_float2(v[0], v[1])
            : __ldcg(reinterpret_cast<const float2*>(p.workspace + z * mn + at));
        sum.x += part.x, sum.y += part.y;
      }
      v[0] = sum.x, v[1] = sum.y;
    });
  }
  for_each_pair([&](size_t at, int col, float* v) {
    float2 r = make_float2(v[0], v[1]);
    if (p.bias != nullptr) {
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(p.bias + col));
      r.x += b.x, r.y += b.y;
    }
    *reinterpret_cast<__half2*>(p.out + at) = __floats2half2_rn(r.x, r.y);
  });
}

// The instances, X(id, WARPS_M, WARPS_N, M_TILES, N_TILES, STAGES), each with and without zeros;
// optgptq_kernels.gptq_cuda.CONFIGS mirrors them (a GPU test compares the two).
#define OPTGPTQ_CUDA_CONFIGS(X) \
  X(0, 1, 4, 1, 2, 8)           \
  X(1, 1, 4, 2, 2, 6)           \
  X(2, 1, 4, 4, 2, 4)           \
  X(3, 2, 4, 4, 2, 4)

template <int WM, int WN, int MT, int NT, int ST, bool ZP>
cudaError_t launch_instance(const GemmParams& p, cudaStream_t stream) {
  using T = Tile<WM, WN, MT, NT, ST, ZP>;
  auto* kernel = &gptq_gemm_kernel<WM, WN, MT, NT, ST, ZP>;
  static bool opted_in[64] = {};  // per instance and device: the large shared memory opt-in
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess || device >= 64) return err != cudaSuccess ? err : cudaErrorInvalidDevice;
  if (T::kSmemBytes > 48 * 1024 && !opted_in[device]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
    if (err != cudaSuccess) return err;
    opted_in[device] = true;
  }
  const dim3 grid((p.m + T::kBM - 1) / T::kBM, (p.n + T::kBN - 1) / T::kBN, p.split_k);
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Checks what it can (the caller checks the buffers) and launches instance `config`.
inline cudaError_t gptq_gemm(const GemmParams& p, int config, cudaStream_t stream) {
  const bool groups_ok = p.group_size == 16 || p.group_size == 32 ||
                         (p.group_size > 0 && p.group_size % kBK == 0);
  if (p.m < 1 || p.n <= 0 || p.n % 64 || p.k <= 0 || p.k % kBK || !groups_ok || p.split_k < 1 ||
      p.split_k > p.k / kBK || (p.split_k > 1 && (!p.workspace || !p.locks)))
    return cudaErrorInvalidValue;
#define OPTGPTQ_CUDA_LAUNCH(ID, WM, WN, MT, NT, ST)                    \
  if (config == ID) {                                                  \
    return p.zeros ? launch_instance<WM, WN, MT, NT, ST, true>(p, stream)    \
                   : launch_instance<WM, WN, MT, NT, ST, false>(p, stream);  \
  }
  OPTGPTQ_CUDA_CONFIGS(OPTGPTQ_CUDA_LAUNCH)
#undef OPTGPTQ_CUDA_LAUNCH
  return cudaErrorInvalidValue;
}

}  // namespace optgptq_cuda
