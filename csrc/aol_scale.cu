// AOL scaling epilogue: per input channel d_i = (sum of its partial Gram abs row sums)^(-1/2)
// (0 for a zero column, NaN stays NaN), then W'[o, i, :] = W[o, i, :] * d[group(o), i].
// Raw-pointer launcher: no PyTorch headers, so one binary serves every torch version.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lipkern.h"

namespace {

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) { return static_cast<acc_t>(x); }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename acc_t>
__global__ void reduce_partials_to_scale(const acc_t* __restrict__ partial, int64_t n_slots,
                                         int64_t n_channels, acc_t* __restrict__ scale) {
  int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= n_channels) return;
  acc_t r = 0;
  for (int64_t s = 0; s < n_slots; ++s) r += partial[s * n_channels + c];
  // r == 0 only for an all-zero column: its scale is 0 so it stays zero, with no NaN.
  scale[c] = (r == acc_t(0)) ? acc_t(0) : acc_t(1) / sqrt(r);
}

template <typename scalar_t, typename acc_t>
__global__ void scale_weight(const scalar_t* __restrict__ weight, const acc_t* __restrict__ scale,
                             scalar_t* __restrict__ out, int64_t numel, int64_t out_per_group,
                             int64_t in_per_group, int64_t kernel_numel) {
  int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (; idx < numel; idx += stride) {
    int64_t o = idx / (in_per_group * kernel_numel);
    int64_t i = (idx / kernel_numel) % in_per_group;
    int64_t g = o / out_per_group;
    out[idx] = static_cast<scalar_t>(to_acc<acc_t>(weight[idx]) * scale[g * in_per_group + i]);
  }
}

template <typename scalar_t, typename acc_t>
int launch(uintptr_t partial, int64_t n_slots, uintptr_t weight, uintptr_t out, uintptr_t scale,
           int64_t groups, int64_t out_per_group, int64_t in_per_group, int64_t kernel_numel,
           cudaStream_t stream) {
  const int threads = 256;
  int64_t n_channels = groups * in_per_group;
  int64_t numel = groups * out_per_group * in_per_group * kernel_numel;
  reduce_partials_to_scale<acc_t><<<(unsigned)((n_channels + threads - 1) / threads), threads, 0, stream>>>(
      reinterpret_cast<const acc_t*>(partial), n_slots, n_channels, reinterpret_cast<acc_t*>(scale));
  cudaError_t err = cudaPeekAtLastError();
  if (err != cudaSuccess) return (int)err;
  int64_t blocks = (numel + threads - 1) / threads;
  if (blocks > 65535 * 16) blocks = 65535 * 16;
  scale_weight<scalar_t, acc_t><<<(unsigned)blocks, threads, 0, stream>>>(
      reinterpret_cast<const scalar_t*>(weight), reinterpret_cast<const acc_t*>(scale),
      reinterpret_cast<scalar_t*>(out), numel, out_per_group, in_per_group, kernel_numel);
  return (int)cudaPeekAtLastError();
}

}  // namespace

int lipkern_aol_scale_epilogue(uintptr_t partial, int64_t n_slots, uintptr_t weight, uintptr_t out,
                               uintptr_t scale, int64_t groups, int64_t out_per_group,
                               int64_t in_per_group, int64_t kernel_numel, int dtype,
                               uintptr_t stream) {
  if (!partial || !weight || !out || !scale) return LIPKERN_ERR_NULL_POINTER;
  if (n_slots <= 0 || groups <= 0 || out_per_group <= 0 || in_per_group <= 0 || kernel_numel <= 0)
    return LIPKERN_ERR_BAD_SIZE;
  int n_devices = 0;
  cudaError_t err = cudaGetDeviceCount(&n_devices);
  if (err != cudaSuccess) return (int)err;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case LIPKERN_FLOAT32:
      return launch<float, float>(partial, n_slots, weight, out, scale, groups, out_per_group, in_per_group,
                                  kernel_numel, s);
    case LIPKERN_FLOAT64:
      return launch<double, double>(partial, n_slots, weight, out, scale, groups, out_per_group,
                                    in_per_group, kernel_numel, s);
    case LIPKERN_FLOAT16:
      return launch<__half, float>(partial, n_slots, weight, out, scale, groups, out_per_group, in_per_group,
                                   kernel_numel, s);
    case LIPKERN_BFLOAT16:
      return launch<__nv_bfloat16, float>(partial, n_slots, weight, out, scale, groups, out_per_group,
                                          in_per_group, kernel_numel, s);
    default:
      return LIPKERN_ERR_BAD_DTYPE;
  }
}

int lipkern_cuda_device_count(int* count) { return (int)cudaGetDeviceCount(count); }

const char* lipkern_error_string(int code) {
  switch (code) {
    case LIPKERN_ERR_NULL_POINTER: return "lipkern: a null device pointer was passed";
    case LIPKERN_ERR_BAD_SIZE: return "lipkern: a size argument is not positive";
    case LIPKERN_ERR_BAD_DTYPE: return "lipkern: unsupported dtype code";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}
