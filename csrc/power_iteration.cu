// Batched power iteration over a stack of dense matrices M: (batch, rows, cols), real or complex (complex
// stored interleaved (re, im), like torch.view_as_real). For each matrix independently, n_iter times:
//   w = M u;  ss = ||w||^2;  z = M^H w;  nz = ||z||;
//   sigma = ss != 0 ? nz / sqrt(ss) : 0;  v = ss != 0 ? w / sqrt(ss) : w;  u = nz != 0 ? z / nz : u
// (!= 0, not > 0: a NaN/Inf matrix gives NaN sigma and vectors, never a finite value).
// u (batch, cols) is read, then overwritten with the last iterate; v (batch, rows) and sigma (batch,) are
// outputs. Accumulation happens in the storage precision.
//
// One thread block (256 threads) per matrix; u, w and z live in dynamic shared memory, which is what bounds
// the matrix size (lipkern_batched_power_iteration_fits). Pass 1 (w = M u): one warp per row, lanes stride
// over the columns (coalesced reads), warp-shuffle sum. Pass 2 (z = M^H w): one thread per column, looping
// over rows (coalesced across the threads). Raw-pointer launcher: no PyTorch headers.
#include <cmath>
#include <cstdint>
#include <cuda_runtime.h>

#include "lipkern.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Shared memory a launch may use without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize): 48 KiB,
// static plus dynamic. The static part is kWarps values of T (at most 64 bytes); 256 bytes are reserved.
constexpr int64_t kSharedLimit = 48 * 1024;
constexpr int64_t kStaticReserve = 256;
constexpr int64_t kMaxDynamicShared = kSharedLimit - kStaticReserve;

// Dynamic shared memory of one block: u (cols), w (rows), z (cols), times 2 for complex. -1 if invalid.
int64_t dynamic_shared_bytes(int64_t rows, int64_t cols, int dtype, int is_complex) {
  int64_t elem;
  switch (dtype) {
    case LIPKERN_FLOAT32: elem = 4; break;
    case LIPKERN_FLOAT64: elem = 8; break;
    default: return -1;
  }
  if (rows < 1 || cols < 1) return -1;
  if (rows > kSharedLimit || cols > kSharedLimit) return kSharedLimit + 1;  // too large; avoids overflow
  return (2 * cols + rows) * (is_complex ? 2 : 1) * elem;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Sum over the block; every thread must call it and every thread gets the same value (same order). The
// trailing __syncthreads lets the caller reuse `scratch` right away, and makes every shared-memory write
// made before the call visible to all threads after it.
template <typename T>
__device__ __forceinline__ T block_sum(T x, T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T total = T(0);
#pragma unroll
  for (int k = 0; k < kWarps; ++k) total += scratch[k];
  __syncthreads();
  return total;
}

template <typename T, bool COMPLEX>
__global__ void __launch_bounds__(kThreads)
    batched_power_iteration_kernel(const T* __restrict__ matrices, T* __restrict__ u, T* __restrict__ v,
                                   T* __restrict__ sigma, int64_t rows, int64_t cols, int64_t n_iter) {
  constexpr int C = COMPLEX ? 2 : 1;  // scalars per element
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ T scratch[kWarps];
  T* su = reinterpret_cast<T*>(smem_raw);  // cols * C
  T* sw = su + cols * C;                   // rows * C
  T* sz = sw + rows * C;                   // cols * C

  const int64_t b = blockIdx.x;
  const T* M = matrices + b * rows * cols * C;
  T* ub = u + b * cols * C;
  T* vb = v + b * rows * C;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  for (int64_t k = tid; k < cols * C; k += kThreads) su[k] = ub[k];
  __syncthreads();

  T ss = T(0);
  T nz = T(0);
  for (int64_t it = 0; it < n_iter; ++it) {
    // Pass 1: w = M u, one warp per row (the row loop is warp-uniform, so every lane reaches the shuffles).
    T local_ss = T(0);
    for (int64_t i = warp; i < rows; i += kWarps) {
      const T* Mi = M + i * cols * C;
      T re = T(0), im = T(0);
      for (int64_t j = lane; j < cols; j += 32) {
        if constexpr (COMPLEX) {
          const T a = Mi[2 * j], bi = Mi[2 * j + 1], c = su[2 * j], d = su[2 * j + 1];
          re += a * c - bi * d;
          im += a * d + bi * c;
        } else {
          re += Mi[j] * su[j];
        }
      }
      re = warp_sum(re);
      if constexpr (COMPLEX) im = warp_sum(im);
      if (lane == 0) {
        sw[i * C] = re;
        if constexpr (COMPLEX) sw[i * C + 1] = im;
        local_ss += re * re + im * im;
      }
    }
    ss = block_sum(local_ss, scratch);  // its __syncthreads publish sw

    // Pass 2: z = M^H w, one thread per column, rows in order (reads of a row are coalesced across threads).
    T local_nz = T(0);
    for (int64_t j = tid; j < cols; j += kThreads) {
      T re = T(0), im = T(0);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t off = (i * cols + j) * C;
        if constexpr (COMPLEX) {
          const T a = M[off], bi = M[off + 1], c = sw[2 * i], d = sw[2 * i + 1];
          re += a * c + bi * d;  // conj(a + i bi) * (c + i d)
          im += a * d - bi * c;
        } else {
          re += M[off] * sw[i];
        }
      }
      sz[j * C] = re;
      if constexpr (COMPLEX) sz[j * C + 1] = im;
      local_nz += re * re + im * im;
    }
    nz = sqrt(block_sum(local_nz, scratch));  // its __syncthreads publish sz; all reads of sw are done

    // u = z / ||z||, or the old u when z is zero (nz is the same in every thread: uniform branch).
    if (nz != T(0)) {  // NaN norm: divide, so the NaN propagates
      for (int64_t k = tid; k < cols * C; k += kThreads) su[k] = sz[k] / nz;
    }
    __syncthreads();  // su complete before the next pass 1 (or the write-back) reads it
  }

  // sw holds the last w, su the last u: nothing has written them since the last __syncthreads.
  const bool positive = ss != T(0);  // NaN ss: NaN out, as in the reference
  const T norm_w = sqrt(ss);
  for (int64_t k = tid; k < rows * C; k += kThreads) vb[k] = positive ? sw[k] / norm_w : sw[k];
  for (int64_t k = tid; k < cols * C; k += kThreads) ub[k] = su[k];
  if (tid == 0) sigma[b] = positive ? nz / norm_w : T(0);
}

template <typename T, bool COMPLEX>
int launch(uintptr_t matrices, uintptr_t u, uintptr_t v, uintptr_t sigma, int64_t batch, int64_t rows,
           int64_t cols, int64_t n_iter, size_t shared_bytes, cudaStream_t stream) {
  batched_power_iteration_kernel<T, COMPLEX><<<dim3((unsigned)batch), kThreads, shared_bytes, stream>>>(
      reinterpret_cast<const T*>(matrices), reinterpret_cast<T*>(u), reinterpret_cast<T*>(v),
      reinterpret_cast<T*>(sigma), rows, cols, n_iter);
  return (int)cudaGetLastError();
}

}  // namespace

int lipkern_batched_power_iteration_fits(int64_t rows, int64_t cols, int dtype, int is_complex) {
  const int64_t bytes = dynamic_shared_bytes(rows, cols, dtype, is_complex);
  return bytes >= 0 && bytes <= kMaxDynamicShared ? 1 : 0;
}

int64_t lipkern_batched_power_iteration_max_shared_bytes() { return kMaxDynamicShared; }

int lipkern_batched_power_iteration(uintptr_t matrices, uintptr_t u, uintptr_t v, uintptr_t sigma,
                                    int64_t batch, int64_t rows, int64_t cols, int64_t n_iter, int dtype,
                                    int is_complex, uintptr_t stream) {
  // Argument checks first: they need no device, so they are testable on a machine without a GPU.
  if (!matrices || !u || !v || !sigma) return LIPKERN_ERR_NULL_POINTER;
  if (dtype != LIPKERN_FLOAT32 && dtype != LIPKERN_FLOAT64) return LIPKERN_ERR_BAD_DTYPE;
  if (batch < 0 || batch > INT32_MAX || rows < 1 || cols < 1 || n_iter < 1) return LIPKERN_ERR_BAD_SIZE;
  if (!lipkern_batched_power_iteration_fits(rows, cols, dtype, is_complex)) return LIPKERN_ERR_BAD_SIZE;
  if (batch == 0) return 0;
  int n_devices = 0;
  cudaError_t err = cudaGetDeviceCount(&n_devices);
  if (err != cudaSuccess) return (int)err;
  const size_t shared = (size_t)dynamic_shared_bytes(rows, cols, dtype, is_complex);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == LIPKERN_FLOAT32) {
    return is_complex ? launch<float, true>(matrices, u, v, sigma, batch, rows, cols, n_iter, shared, s)
                      : launch<float, false>(matrices, u, v, sigma, batch, rows, cols, n_iter, shared, s);
  }
  return is_complex ? launch<double, true>(matrices, u, v, sigma, batch, rows, cols, n_iter, shared, s)
                    : launch<double, false>(matrices, u, v, sigma, batch, rows, cols, n_iter, shared, s);
}
