// C++ CPU kernels of lipkern._cpu: raw host pointers (as integers) and sizes, no PyTorch headers (one binary
// for every torch version). Python (lipkern/_cpu_kernels.py) checks shapes, dtypes and contiguity before a
// call. The arithmetic is IEEE (built without -ffast-math): the AOL margin's proof relies on it.
#pragma once
#include <cstdint>

// Batched power iteration on contiguous real matrices (batch, rows, cols), float32 (is_f64 = 0) or float64,
// accumulated in float64, with the semantics of the PyTorch path (lipkern/ops/power_iteration.py,
// _launch_torch): s = max |M| (NaN if M has one; at least the dtype's tiny), then n_iter times
//   w = M x / s;  v = w / max(|w|, tiny);  z = M^T v / s;  nz = |z|;  x = nz != 0 ? z / max(nz, tiny) : x
// and sigma = nz * s, u = x. u (batch, cols) is read and overwritten, v (batch, rows) and sigma (batch,) written.
void lipkern_cpu_power_iteration(uintptr_t matrices, uintptr_t u, uintptr_t v, uintptr_t sigma, int64_t batch,
                                 int64_t rows, int64_t cols, int64_t n_iter, int is_f64);

// The AOL margin's constants (lipkern/ops/aol.py, _torch_path_constants).
struct AolConstants {
  double eps_rel, eps_gram, t_mass, t_count, sum_factor, keep, tiny, largest, max_cost;
};

// AOL forward after the Gram GEMM. p: (groups, in_g*kk, kk*in_g), p[(i,a),(b,j)] = sum_o W[o,i,a] W[o,j,b];
// w: (groups, out_g, in_g, kk), the weight in the accumulation dtype (float32 or float64: w_f64). Computes
// M_s[i,j] = sum_{a-b=s} p[(i,a),(j,b)] and r_i = sum_{s,j} |M_s[i,j]| in float64, C_oi = sum_a |W[o,i,a]|, then
// d_i with the margin of _scale_from_sums (same float64 operations). Writes scale (groups, in_g) and, when
// not 0, out = W * d (w's shape and dtype) and signs (groups, n_half, in_g, in_g) int8 = sign of M_s for the
// n_half shifts >= 0. With check != 0, returns 1 without writing anything when the Gram margin alone exceeds
// max_cost * r_hat_i for some i or r_hat is not finite (the caller redoes it in float64); else 0.
int lipkern_cpu_aol_forward(uintptr_t p, int p_f64, uintptr_t w, int w_f64, int64_t groups, int64_t out_g,
                            int64_t in_g, int64_t kh, int64_t kw, const AolConstants& k, int check, uintptr_t scale,
                            uintptr_t out, uintptr_t signs);

// AOL backward before the weight GEMM: a_i = -d_i^3 (sum_{o,a} G[o,i,a] W[o,i,a] + grad_scale_i) / 2, then
// gsym = dP + dP^T, (groups, in_g*kk, kk*in_g): rows (i,a), columns (b,j), with dP[(i,a),(j,b)] =
// sign(M_s[i,j]) (a_i + a_j [s > 0]) for s = a - b >= 0 (0 otherwise), so that dL/dW_left = W_right gsym^T + G d
// (W_right: the weight with columns (b,j)).
// grad, w: (groups, out_g, in_g, kk); scale: (groups, in_g); grad_scale: same or 0; all float32 or float64 (f64).
// base: 0, or grad's shape: receives G d (grad times d_i), the term the caller adds W_right gsym^T to.
void lipkern_cpu_aol_backward(uintptr_t grad, uintptr_t grad_scale, uintptr_t w, uintptr_t scale, uintptr_t signs,
                              int f64, int64_t groups, int64_t out_g, int64_t in_g, int64_t kh, int64_t kw,
                              uintptr_t gsym, uintptr_t base);

// The conv operators of L layers of equal geometry (lipkern/ops/conv_power_iteration.py, ConvGeometry):
// weights (L, c_out, c_in/groups, kh, kw); vectors u (L, c_in, H, W) and v (L, c_out, Ho, Wo); padding
// (top, bottom, left, right), zeros or circular (circular = 1); float32 (f64 = 0) or float64, accumulated in
// float64. A u is a 'valid' convolution of the padded u; A^T v scatters into the padded domain, then the padding's
// adjoint (zeros: the interior; circular: wrapped borders added back).
struct ConvShape {
  int64_t layers, c_out, c_in, groups, kh, kw, h, w, ho, wo, sh, sw, dh, dw, pt, pb, pl, pr;
  int circular;
};

// n_iter steps of the PyTorch path's stacked power iteration (_stacked_iterations), per layer: s = max |W_l|
// (NaN if W_l has one; at least the dtype's tiny), then with A the operator of W_l / s (divided first):
// w = A x; v = w / max(|w|, tiny); z = A^T v; nz = |z|; x = nz != 0 ? z / max(nz, tiny) : x; sigma_l = nz * s. u is read and overwritten, v and sigma
// (L,) written.
void lipkern_cpu_conv_power_iteration(uintptr_t weights, uintptr_t u, uintptr_t v, uintptr_t sigma,
                                      const ConvShape& c, int64_t n_iter, int f64);

// G_l = d<v_l, A_l u_l>/dW_l, (L, c_out, c_in/groups, kh, kw): the weight gradient of the bilinear form.
void lipkern_cpu_conv_bilinear_gradient(uintptr_t u, uintptr_t v, uintptr_t grad, const ConvShape& c, int f64);

// lipkern_cpu_conv_power_iteration, then (grad != 0) lipkern_cpu_conv_bilinear_gradient of the vectors it wrote:
// the same numbers as the two calls, with one plan and one set of work buffers (a small layer's training step).
void lipkern_cpu_conv_power_rows(uintptr_t weights, uintptr_t u, uintptr_t v, uintptr_t sigma, uintptr_t grad,
                                 const ConvShape& c, int64_t n_iter, int f64);
