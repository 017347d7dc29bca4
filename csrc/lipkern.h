// C launchers of lipkern._C. Each takes raw device pointers (as integers), sizes and a cudaStream_t (as an
// integer) and returns 0 on success, a cudaError_t value, or one of the LIPKERN_ERR_* codes below.
#pragma once
#include <cstdint>

enum LipkernDtype { LIPKERN_FLOAT32 = 0, LIPKERN_FLOAT64 = 1, LIPKERN_FLOAT16 = 2, LIPKERN_BFLOAT16 = 3 };
enum LipkernError { LIPKERN_ERR_NULL_POINTER = 10001, LIPKERN_ERR_BAD_SIZE = 10002, LIPKERN_ERR_BAD_DTYPE = 10003 };

// Batched power iteration (csrc/power_iteration.cu). matrices: (batch, rows, cols) contiguous;
// u: (batch, cols), read then overwritten; v: (batch, rows) and sigma: (batch,) outputs. Complex data
// (is_complex != 0) is interleaved (re, im); dtype is the code of the real scalar type (float32 or float64
// only) and sigma is real.
// Per matrix, n_iter times: w = M u; ss = |w|^2; z = M^H w; nz = |z|; sigma = ss != 0 ? nz / sqrt(ss) : 0;
// v = ss != 0 ? w / sqrt(ss) : w; u = nz != 0 ? z / nz : u (NaN propagates). Checked before touching the device: null pointers
// (LIPKERN_ERR_NULL_POINTER), dtype (LIPKERN_ERR_BAD_DTYPE), batch < 0, rows < 1, cols < 1, n_iter < 1 or a
// matrix that does not fit (LIPKERN_ERR_BAD_SIZE). batch == 0 returns 0 without launching.
int lipkern_batched_power_iteration(uintptr_t matrices, uintptr_t u, uintptr_t v, uintptr_t sigma,
                                    int64_t batch, int64_t rows, int64_t cols, int64_t n_iter, int dtype,
                                    int is_complex, uintptr_t stream);
// 1 when one block's shared memory, (2 * cols + rows) * (is_complex ? 2 : 1) * sizeof(scalar) bytes, is at
// most lipkern_batched_power_iteration_max_shared_bytes() (48 KiB less 256 bytes reserved for the kernel's
// static shared memory); 0 otherwise, and for rows < 1, cols < 1 or an unsupported dtype.
int lipkern_batched_power_iteration_fits(int64_t rows, int64_t cols, int dtype, int is_complex);
int64_t lipkern_batched_power_iteration_max_shared_bytes();
int lipkern_cuda_device_count(int* count);
const char* lipkern_error_string(int code);
