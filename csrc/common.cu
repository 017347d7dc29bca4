// What every launcher of lipkern._C shares: device count and error strings.
// Raw-pointer launchers: no PyTorch headers, so one binary serves every torch version.
#include <cuda_runtime.h>

#include "lipkern.h"

int lipkern_cuda_device_count(int* count) { return (int)cudaGetDeviceCount(count); }

const char* lipkern_error_string(int code) {
  switch (code) {
    case LIPKERN_ERR_NULL_POINTER: return "lipkern: a null device pointer was passed";
    case LIPKERN_ERR_BAD_SIZE: return "lipkern: a size argument is not positive";
    case LIPKERN_ERR_BAD_DTYPE: return "lipkern: unsupported dtype code";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}
