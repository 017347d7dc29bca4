// pybind11 module lipkern._C: thin wrappers over the raw-pointer launchers in csrc/*.cu.
#include <pybind11/pybind11.h>

#include "lipkern.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lipkern CUDA launchers (raw device pointers; validation happens in Python)";
  m.def("batched_power_iteration", &lipkern_batched_power_iteration, py::arg("matrices"), py::arg("u"),
        py::arg("v"), py::arg("sigma"), py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("n_iter"),
        py::arg("dtype"), py::arg("is_complex"), py::arg("stream"),
        "Power iteration on each matrix M of a contiguous (batch, rows, cols) stack (complex: interleaved"
        " re, im; dtype is the real scalar's code, float32 or float64). n_iter times: w = M u, ss = |w|^2,"
        " z = M^H w, nz = |z|, sigma = nz / sqrt(ss) (0 if ss == 0), v = w / sqrt(ss) (w if ss == 0),"
        " u = z / nz (u kept if nz == 0). u (batch, cols) is read and overwritten, v (batch, rows) and"
        " sigma (batch,) are written. Returns an error code.");
  m.def("batched_power_iteration_fits", [](int64_t rows, int64_t cols, int dtype, int is_complex) {
    return lipkern_batched_power_iteration_fits(rows, cols, dtype, is_complex) != 0;
  }, py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("is_complex"),
        "Whether batched_power_iteration takes a rows x cols matrix of this dtype code: its shared memory,"
        " (2 * cols + rows) * (2 if is_complex else 1) * sizeof(scalar) bytes, must be at most"
        " BATCHED_POWER_ITERATION_MAX_SHARED_BYTES.");
  m.attr("BATCHED_POWER_ITERATION_MAX_SHARED_BYTES") = lipkern_batched_power_iteration_max_shared_bytes();
  m.def("cuda_device_count", []() {
    int count = 0;
    int err = lipkern_cuda_device_count(&count);
    return py::make_tuple(err, count);
  }, "(error code, number of visible CUDA devices)");
  m.def("error_string", &lipkern_error_string, py::arg("code"));
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = (int)LIPKERN_FLOAT32,
                                   py::arg("float64") = (int)LIPKERN_FLOAT64,
                                   py::arg("float16") = (int)LIPKERN_FLOAT16,
                                   py::arg("bfloat16") = (int)LIPKERN_BFLOAT16);
#ifdef LIPKERN_CUDA_ARCHS
  m.attr("CUDA_ARCHS") = LIPKERN_CUDA_ARCHS;
#endif
}
