// pybind11 module lipkern._C: thin wrappers over the raw-pointer launchers in csrc/*.cu.
#include <pybind11/pybind11.h>

#include "lipkern.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lipkern CUDA launchers (raw device pointers; validation happens in Python)";
  m.def("aol_scale_epilogue", &lipkern_aol_scale_epilogue, py::arg("partial"), py::arg("n_slots"),
        py::arg("weight"), py::arg("out"), py::arg("scale"), py::arg("groups"), py::arg("out_per_group"),
        py::arg("in_per_group"), py::arg("kernel_numel"), py::arg("dtype"), py::arg("stream"),
        "Sum partial Gram abs row sums, d = r^-1/2 (0 where r == 0), out = weight * d. Returns an error code.");
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
