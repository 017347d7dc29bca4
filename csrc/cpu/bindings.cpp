// pybind11 module lipkern._cpu: thin wrappers over the raw-pointer CPU kernels in kernels.cpp (validation
// happens in Python, lipkern/_cpu_kernels.py).
#include <pybind11/pybind11.h>

#include "kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "lipkern C++ CPU kernels (raw host pointers; validation happens in Python)";
  m.def("power_iteration", &lipkern_cpu_power_iteration, py::arg("matrices"), py::arg("u"), py::arg("v"),
        py::arg("sigma"), py::arg("batch"), py::arg("rows"), py::arg("cols"), py::arg("n_iter"), py::arg("is_f64"),
        "Batched power iteration on contiguous real matrices (see csrc/cpu/kernels.h).");
  m.def("aol_forward",
        [](uintptr_t p, int p_f64, uintptr_t w, int w_f64, int64_t groups, int64_t out_g, int64_t in_g, int64_t kh,
           int64_t kw, double eps_rel, double eps_gram, double t_mass, double t_count, double sum_factor, double keep,
           double tiny, double largest, double max_cost, int check, uintptr_t scale, uintptr_t out, uintptr_t signs) {
          const AolConstants k{eps_rel, eps_gram, t_mass, t_count, sum_factor, keep, tiny, largest, max_cost};
          return lipkern_cpu_aol_forward(p, p_f64, w, w_f64, groups, out_g, in_g, kh, kw, k, check, scale, out, signs);
        },
        "AOL forward after the Gram GEMM: scale (and out = W d, half-shift signs); 1 when the check fails.");
  m.def("aol_backward", &lipkern_cpu_aol_backward, py::arg("grad"), py::arg("grad_scale"), py::arg("w"),
        py::arg("scale"), py::arg("signs"), py::arg("f64"), py::arg("groups"), py::arg("out_g"), py::arg("in_g"),
        py::arg("kh"), py::arg("kw"), py::arg("gsym"), py::arg("base"),
        "AOL backward before the weight GEMM: the symmetric dL/dP + its transpose (and G d into base).");
  m.def("conv_power_iteration",
        [](uintptr_t weights, uintptr_t u, uintptr_t v, uintptr_t sigma, int64_t layers, int64_t c_out, int64_t c_in,
           int64_t groups, int64_t kh, int64_t kw, int64_t h, int64_t w, int64_t ho, int64_t wo, int64_t sh, int64_t sw,
           int64_t dh, int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int circular, int64_t n_iter,
           int f64) {
          const ConvShape c{layers, c_out, c_in, groups, kh, kw, h, w, ho, wo, sh, sw, dh, dw, pt, pb, pl, pr, circular};
          lipkern_cpu_conv_power_iteration(weights, u, v, sigma, c, n_iter, f64);
        },
        "Stacked conv power iteration of L layers of one geometry (see csrc/cpu/kernels.h).");
  m.def("conv_bilinear_gradient",
        [](uintptr_t u, uintptr_t v, uintptr_t grad, int64_t layers, int64_t c_out, int64_t c_in, int64_t groups,
           int64_t kh, int64_t kw, int64_t h, int64_t w, int64_t ho, int64_t wo, int64_t sh, int64_t sw, int64_t dh,
           int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int circular, int f64) {
          const ConvShape c{layers, c_out, c_in, groups, kh, kw, h, w, ho, wo, sh, sw, dh, dw, pt, pb, pl, pr, circular};
          lipkern_cpu_conv_bilinear_gradient(u, v, grad, c, f64);
        },
        "G_l = d<v_l, A_l u_l>/dW_l for L conv layers of one geometry (see csrc/cpu/kernels.h).");
  m.def("conv_power_rows",
        [](uintptr_t weights, uintptr_t u, uintptr_t v, uintptr_t sigma, uintptr_t grad, int64_t layers, int64_t c_out,
           int64_t c_in, int64_t groups, int64_t kh, int64_t kw, int64_t h, int64_t w, int64_t ho, int64_t wo, int64_t sh,
           int64_t sw, int64_t dh, int64_t dw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int circular,
           int64_t n_iter, int f64) {
          const ConvShape c{layers, c_out, c_in, groups, kh, kw, h, w, ho, wo, sh, sw, dh, dw, pt, pb, pl, pr, circular};
          lipkern_cpu_conv_power_rows(weights, u, v, sigma, grad, c, n_iter, f64);
        },
        "conv_power_iteration, then (grad != 0) conv_bilinear_gradient of its vectors, in one call.");
}
