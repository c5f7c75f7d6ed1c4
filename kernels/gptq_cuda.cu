// torch.ops.optgptq_cuda: the GPTQ 4-bit tensor-core GEMM of gptq_cuda.cuh, bound to tensors.
// Built at first use by optgptq_kernels.gptq_cuda (torch.utils.cpp_extension.load, one -gencode
// for the device's compute capability); that module prepares the weights and picks the config
// and split. This file only checks the tensors and forwards raw pointers on torch's current
// stream, so the op can be captured in a CUDA graph.
//
//   gptq_gemm(x, tiles, scales, zeros?, bias?, out, workspace, locks, group_size, config, split_k)
//   gptq_config_info(config) -> [BM, BN, stages, threads, dynamic shared memory bytes]
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "gptq_cuda.cuh"

namespace {

struct ConfigInfo {
  int bm, bn, stages, threads, smem_bytes;
};

bool config_info(int config, ConfigInfo* info) {
  // Tile shapes of the instances; the Python side's CONFIGS is checked against them.
#define OPTGPTQ_CUDA_INFO(ID, WM, WN, MT, NT, ST)                        \
  if (config == ID) {                                                    \
    using T = optgptq_cuda::Tile<WM, WN, MT, NT, ST, true>;              \
    *info = {T::kBM, T::kBN, ST, T::kThreads, T::kSmemBytes};            \
    return true;                                                         \
  }
  OPTGPTQ_CUDA_CONFIGS(OPTGPTQ_CUDA_INFO)
#undef OPTGPTQ_CUDA_INFO
  return false;
}

void check_tensor(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype,
                  const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, ": expected on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected contiguous");
}

bool aligned(const at::Tensor& t, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

void gptq_gemm(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales,
               const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
               at::Tensor out, at::Tensor workspace, at::Tensor locks, int64_t group_size,
               int64_t config, int64_t split_k) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "x: a 2-D CUDA tensor expected");
  check_tensor(x, x, at::kHalf, "x");
  const int64_t m = x.size(0), k = x.size(1), n = scales.size(1);
  check_tensor(tiles, x, at::kInt, "tiles");
  check_tensor(scales, x, at::kHalf, "scales");
  check_tensor(out, x, at::kHalf, "out");
  TORCH_CHECK(k % optgptq_cuda::kBK == 0 && n % 64 == 0 && k > 0 && n > 0,
              "K must be a multiple of 64 and N of 64, got K=", k, " N=", n);
  TORCH_CHECK(tiles.dim() == 2 && tiles.size(0) == k / 64 * (n / 16) * 32 && tiles.size(1) == 4,
              "tiles: [K/64 * N/16 * 32, 4] expected, got ", tiles.sizes());
  TORCH_CHECK(group_size > 0 && scales.dim() == 2 &&
                  scales.size(0) >= (k + group_size - 1) / group_size,
              "scales: [ceil(K / group_size), N] expected, got ", scales.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n, "out: [M, N] expected");
  TORCH_CHECK(aligned(x, 16) && aligned(tiles, 16) && aligned(scales, 16) && aligned(out, 4),
              "x, tiles and scales must be 16-byte aligned, out 4-byte aligned");
  TORCH_CHECK(group_size == 16 || group_size == 32 || group_size % 64 == 0,
              "group_size must be 16, 32 or a multiple of 64, got ", group_size);
  TORCH_CHECK(m <= INT32_MAX && k <= INT32_MAX && n <= 64 * 65535, "problem too large");
  if (zeros.has_value()) {
    check_tensor(*zeros, x, at::kHalf, "zeros");
    TORCH_CHECK(zeros->sizes() == scales.sizes() && aligned(*zeros, 16),
                "zeros: shaped as scales, 16-byte aligned");
  }
  if (bias.has_value()) {
    check_tensor(*bias, x, at::kHalf, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && aligned(*bias, 4), "bias: [N] expected");
  }
  ConfigInfo info{};
  TORCH_CHECK(config_info(static_cast<int>(config), &info), "unknown config ", config);
  TORCH_CHECK(split_k >= 1 && split_k <= k / 64, "split_k must lie in [1, K/64], got ", split_k);
  if (split_k > 1) {
    check_tensor(workspace, x, at::kFloat, "workspace");
    check_tensor(locks, x, at::kInt, "locks");
    const int64_t tiles_mn = ((m + info.bm - 1) / info.bm) * ((n + info.bn - 1) / info.bn);
    TORCH_CHECK(workspace.numel() >= split_k * m * n, "workspace: split_k * M * N floats needed");
    TORCH_CHECK(locks.numel() >= tiles_mn, "locks: one counter per output tile needed");
  }
  if (m == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  optgptq_cuda::GemmParams p{};
  p.x = reinterpret_cast<const __half*>(x.data_ptr());
  p.tiles = reinterpret_cast<const int4*>(tiles.data_ptr());
  p.scales = reinterpret_cast<const __half*>(scales.data_ptr());
  p.zeros = zeros.has_value() ? reinterpret_cast<const __half*>(zeros->data_ptr()) : nullptr;
  p.bias = bias.has_value() ? reinterpret_cast<const __half*>(bias->data_ptr()) : nullptr;
  p.out = reinterpret_cast<__half*>(out.data_ptr());
  p.workspace = split_k > 1 ? workspace.data_ptr<float>() : nullptr;
  p.locks = split_k > 1 ? locks.data_ptr<int>() : nullptr;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.group_size = static_cast<int>(group_size);
  p.split_k = static_cast<int>(split_k);
  const cudaError_t err = optgptq_cuda::gptq_gemm(p, static_cast<int>(config),
                                                  c10::cuda::getCurrentCUDAStream(x.get_device()));
  TORCH_CHECK(err == cudaSuccess, "gptq_gemm launch failed: ", cudaGetErrorString(err));
}

std::vector<int64_t> gptq_config_info(int64_t config) {
  ConfigInfo info{};
  TORCH_CHECK(config_info(static_cast<int>(config), &info), "unknown config ", config);
  return {info.bm, info.bn, info.stages, info.threads, info.smem_bytes};
}

}  // namespace

TORCH_LIBRARY(optgptq_cuda, m) {
  m.def("gptq_gemm(Tensor x, Tensor tiles, Tensor scales, Tensor? zeros, Tensor? bias, "
        "Tensor(a!) out, Tensor(b!) workspace, Tensor(c!) locks, int group_size, int config, "
        "int split_k) -> ()",
        &gptq_gemm);
  m.def("gptq_config_info(int config) -> int[]", &gptq_config_info);
}
