// C launchers of lipkern._C. Each takes raw device pointers (as integers), sizes and a cudaStream_t (as an
// integer) and returns 0 on success, a cudaError_t value, or one of the LIPKERN_ERR_* codes below.
#pragma once
#include <cstdint>

enum LipkernDtype { LIPKERN_FLOAT32 = 0, LIPKERN_FLOAT64 = 1, LIPKERN_FLOAT16 = 2, LIPKERN_BFLOAT16 = 3 };
enum LipkernError { LIPKERN_ERR_NULL_POINTER = 10001, LIPKERN_ERR_BAD_SIZE = 10002, LIPKERN_ERR_BAD_DTYPE = 10003 };

int lipkern_aol_scale_epilogue(uintptr_t partial, int64_t n_slots, uintptr_t weight, uintptr_t out,
                               uintptr_t scale, int64_t groups, int64_t out_per_group,
                               int64_t in_per_group, int64_t kernel_numel, int dtype, uintptr_t stream);
int lipkern_cuda_device_count(int* count);
const char* lipkern_error_string(int code);
