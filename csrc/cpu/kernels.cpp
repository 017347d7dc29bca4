// C++ CPU kernels of lipkern._cpu (see kernels.h). Plain loops over contiguous host memory, float64
// accumulation; small problems are what they are for (the Python side sends large ones to PyTorch's GEMMs).
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

double max_or_nan(double a, double b) { return std::isnan(a) ? a : (std::isnan(b) ? b : std::max(a, b)); }

// The largest |x[e]| (0 for n = 0), NaN if any entry is NaN: max_or_nan over x, in x's type (|x| and max are
// exact), by a branch-free select and a NaN flag (the branchy scan cost 40% of a float32 256 x 256 step).
template <typename T>
double abs_max_or_nan(const T* x, int64_t n) {
  T largest = 0;
  bool nan = false;
  for (int64_t e = 0; e < n; ++e) {
    const T a = std::fabs(x[e]);
    largest = largest < a ? a : largest;
    nan |= a != a;
  }
  return nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(largest);
}

// Σ row[j]·x[j] by four interleaved partial sums (no serial dependence chain).
template <typename T>
double dot(const T* row, const double* x, int64_t n) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  const int64_t n4 = n - n % 4;
  for (int64_t j = 0; j < n4; j += 4)
    for (int64_t t = 0; t < 4; ++t) part[t] += static_cast<double>(row[j + t]) * x[j + t];
  for (int64_t j = n4; j < n; ++j) part[j - n4] += static_cast<double>(row[j]) * x[j];
  return (part[0] + part[1]) + (part[2] + part[3]);
}

template <typename T>
void power_iteration(const T* m, T* u, T* v, T* sigma, int64_t rows, int64_t cols, int64_t n_iter) {
  const double tiny = std::numeric_limits<T>::min();
  double s = 0.0;
  s = max_or_nan(abs_max_or_nan(m, rows * cols), tiny);
  std::vector<double> x(u, u + cols), w(rows), z(cols);
  double nz = 0.0;
  for (int64_t step = 0; step < n_iter; ++step) {
    double ss = 0.0;
    for (int64_t i = 0; i < rows; ++i) {
      w[i] = dot(m + i * cols, x.data(), cols) / s;
      ss += w[i] * w[i];
    }
    const double nw = max_or_nan(std::sqrt(ss), tiny);
    for (int64_t i = 0; i < rows; ++i) w[i] /= nw;
    std::fill(z.begin(), z.end(), 0.0);
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = m + i * cols;
      const double wi = w[i];
      for (int64_t j = 0; j < cols; ++j) z[j] += static_cast<double>(row[j]) * wi;
    }
    double zz = 0.0;
    for (int64_t j = 0; j < cols; ++j) {
      z[j] /= s;
      zz += z[j] * z[j];
    }
    nz = std::sqrt(zz);
    if (nz != 0.0) {  // NaN != 0: NaN propagates into u
      const double denom = max_or_nan(nz, tiny);
      for (int64_t j = 0; j < cols; ++j) x[j] = z[j] / denom;
    }
  }
  *sigma = static_cast<T>(nz * s);
  for (int64_t j = 0; j < cols; ++j) u[j] = static_cast<T>(x[j]);
  for (int64_t i = 0; i < rows; ++i) v[i] = static_cast<T>(w[i]);
}

struct AolShape {
  int64_t groups, out_g, in_g, kh, kw, kk, n, n_full, half_start;
  AolShape(int64_t g, int64_t o, int64_t i, int64_t h, int64_t w)
      : groups(g), out_g(o), in_g(i), kh(h), kw(w), kk(h * w), n(i * h * w), n_full((2 * h - 1) * (2 * w - 1)),
        half_start(((2 * h - 1) * (2 * w - 1) - 1) / 2) {}
  // the index of the shift a - b in the (2kh-1) x (2kw-1) grid (row-major), taps a, b row-major in kh x kw
  int64_t shift(int64_t a, int64_t b) const {
    return (a / kw - b / kw + kh - 1) * (2 * kw - 1) + (a % kw - b % kw + kw - 1);
  }
};

// Σ|x| by four interleaved partial sums (no serial dependence chain); any order of a float64 sum of n terms
// errs by at most (n − 1)·2⁻⁵³·Σ|x|, the bound the margin's sum_factor covers.
template <typename T>
double abs_sum(const T* x, int64_t n) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  const int64_t n4 = n - n % 4;
  for (int64_t e = 0; e < n4; e += 4)
    for (int64_t t = 0; t < 4; ++t) part[t] += std::fabs(static_cast<double>(x[e + t]));
  for (int64_t e = n4; e < n; ++e) part[e - n4] += std::fabs(static_cast<double>(x[e]));
  return (part[0] + part[1]) + (part[2] + part[3]);
}

double abs_sum(const std::vector<double>& x) { return abs_sum(x.data(), static_cast<int64_t>(x.size())); }

int8_t sign_of(double x) { return static_cast<int8_t>((x > 0) - (x < 0)); }

// r_i (float64) of group g; signs of the half shifts written when asked.
template <typename P>
void aol_row_sums(const P* p, const AolShape& sh, std::vector<double>& r, int8_t* signs) {
  const int64_t in_g = sh.in_g, kk = sh.kk, n = sh.n, n_half = sh.n_full - sh.half_start;
  if (kk == 1) {  // one shift: M_0 = P, read once
    for (int64_t i = 0; i < in_g; ++i) {
      const P* row = p + i * in_g;
      r[i] = abs_sum(row, in_g);
      if (signs != nullptr)
        for (int64_t j = 0; j < in_g; ++j) signs[i * in_g + j] = sign_of(static_cast<double>(row[j]));
    }
    return;
  }
  std::vector<double> corr(sh.n_full * in_g);  // M_s[i, j] for one i: [s * in_g + j]
  std::vector<int64_t> shift(kk * kk);
  for (int64_t a = 0; a < kk; ++a)
    for (int64_t b = 0; b < kk; ++b) shift[a * kk + b] = sh.shift(a, b) * in_g;
  for (int64_t i = 0; i < in_g; ++i) {
    std::fill(corr.begin(), corr.end(), 0.0);
    for (int64_t a = 0; a < kk; ++a) {
      const P* row = p + (i * kk + a) * n;  // columns (b, j)
      for (int64_t b = 0; b < kk; ++b) {
        double* to = corr.data() + shift[a * kk + b];
        const P* from = row + b * in_g;
        for (int64_t j = 0; j < in_g; ++j) to[j] += static_cast<double>(from[j]);
      }
    }
    r[i] = abs_sum(corr);
    if (signs != nullptr)
      for (int64_t s = 0; s < n_half; ++s)
        for (int64_t j = 0; j < in_g; ++j)
          signs[(s * in_g + i) * in_g + j] = sign_of(corr[(sh.half_start + s) * in_g + j]);
  }
}

// d (float64) of one group from r and W: _scale_from_sums's operations, in its order. false: the check failed.
template <typename W>
bool aol_scale(const W* w, const AolShape& sh, const std::vector<double>& r, const AolConstants& k, bool check,
               std::vector<double>& d) {
  const int64_t out_g = sh.out_g, in_g = sh.in_g, kk = sh.kk;
  std::vector<double> col(kk == 1 ? 0 : out_g * in_g), row_abs(out_g, 0.0), mass(in_g, 0.0);
  double total = 0.0;
  if (kk == 1) {  // C_oi = |W_oi|: read from w, not stored
    for (int64_t o = 0; o < out_g; ++o) {
      row_abs[o] = abs_sum(w + o * in_g, in_g);  // R_o
      total += row_abs[o];
    }
    for (int64_t o = 0; o < out_g; ++o) {
      const W* row = w + o * in_g;
      const double ro = row_abs[o];
      for (int64_t i = 0; i < in_g; ++i) mass[i] += ro * std::fabs(static_cast<double>(row[i]));  // S_i
    }
  }
  for (int64_t o = 0; o < (kk == 1 ? 0 : out_g); ++o) {
    for (int64_t i = 0; i < in_g; ++i) {
      const W* taps = w + (o * in_g + i) * kk;
      double c = 0.0;
      for (int64_t a = 0; a < kk; ++a) c += std::fabs(static_cast<double>(taps[a]));
      col[o * in_g + i] = c;  // C_oi
      row_abs[o] += c;        // R_o
    }
    total += row_abs[o];
  }
  for (int64_t o = 0; o < (kk == 1 ? 0 : out_g); ++o)
    for (int64_t i = 0; i < in_g; ++i) mass[i] += row_abs[o] * col[o * in_g + i];  // S_i
  const double extra = k.t_mass != 0.0 ? total * k.t_mass + k.t_count : 0.0;
  std::vector<double> r_hat(in_g);
  for (int64_t i = 0; i < in_g; ++i) {
    r_hat[i] = (r[i] + mass[i] * k.eps_rel + extra) * k.sum_factor;
    if (check && !(mass[i] * k.eps_gram + extra <= k.max_cost * r_hat[i] && r_hat[i] < HUGE_VAL)) return false;
  }
  for (int64_t i = 0; i < in_g; ++i) {
    double di = k.keep / std::sqrt(r_hat[i]);
    di = mass[i] == 0.0 ? 0.0 : (di > 0.0 ? di : std::numeric_limits<double>::quiet_NaN());
    di -= k.tiny;
    d[i] = std::isnan(di) ? di : std::min(std::max(di, 0.0), k.largest);
  }
  return true;
}

template <typename P, typename W>
int aol_forward(const P* p, const W* w, const AolShape& sh, const AolConstants& k, bool check, W* scale, W* out,
                int8_t* signs) {
  const int64_t in_g = sh.in_g, kk = sh.kk, n_half = sh.n_full - sh.half_start;
  std::vector<double> r(in_g), d(in_g);
  std::vector<W> rounded(sh.groups * in_g);
  for (int64_t g = 0; g < sh.groups; ++g) {
    const W* wg = w + g * sh.out_g * in_g * kk;
    aol_row_sums(p + g * sh.n * sh.n, sh, r, signs != nullptr ? signs + g * n_half * in_g * in_g : nullptr);
    if (!aol_scale(wg, sh, r, k, check, d)) return 1;
    for (int64_t i = 0; i < in_g; ++i) rounded[g * in_g + i] = static_cast<W>(d[i]);  // round to nearest
  }
  std::copy(rounded.begin(), rounded.end(), scale);
  if (out != nullptr)
    for (int64_t g = 0; g < sh.groups; ++g)
      for (int64_t o = 0; o < sh.out_g; ++o)
        for (int64_t i = 0; i < in_g; ++i) {
          const int64_t base = ((g * sh.out_g + o) * in_g + i) * kk;
          const W di = rounded[g * in_g + i];
          for (int64_t a = 0; a < kk; ++a) out[base + a] = w[base + a] * di;
        }
  return 0;
}

template <typename T>
void aol_backward(const T* grad, const T* grad_scale, const T* w, const T* scale, const int8_t* signs,
                  const AolShape& sh, T* gsym, T* base) {
  const int64_t in_g = sh.in_g, kk = sh.kk, n = sh.n, n_half = sh.n_full - sh.half_start;
  std::vector<double> a(in_g);
  std::vector<int64_t> shift(kk * kk);
  for (int64_t x = 0; x < kk; ++x)
    for (int64_t y = 0; y < kk; ++y) shift[x * kk + y] = sh.shift(x, y) - sh.half_start;  // < 0: not a half shift
  for (int64_t g = 0; g < sh.groups; ++g) {
    std::fill(a.begin(), a.end(), 0.0);
    for (int64_t o = 0; o < sh.out_g; ++o)
      for (int64_t i = 0; i < in_g; ++i) {
        const int64_t base = ((g * sh.out_g + o) * in_g + i) * kk;
        for (int64_t t = 0; t < kk; ++t) a[i] += static_cast<double>(grad[base + t]) * w[base + t];
      }
    if (base != nullptr)  // G·d, the first term of dL/dW (rounded as addcmul's product)
      for (int64_t o = 0; o < sh.out_g; ++o)
        for (int64_t i = 0; i < in_g; ++i) {
          const int64_t at = ((g * sh.out_g + o) * in_g + i) * kk;
          const T di = scale[g * in_g + i];
          for (int64_t t = 0; t < kk; ++t) base[at + t] = grad[at + t] * di;
        }
    for (int64_t i = 0; i < in_g; ++i) {
      const double gw = a[i] + (grad_scale != nullptr ? static_cast<double>(grad_scale[g * in_g + i]) : 0.0);
      const double di = scale[g * in_g + i];
      a[i] = di * di * di * gw * -0.5;  // dL/dr_i
    }
    // gsym[(i, ta), (tb, j)] = dP[(i, ta), (j, tb)] + dP[(j, tb), (i, ta)]; the shifts ta − tb and tb − ta are
    // opposite, so one of the two terms is zero unless ta = tb (shift 0): for s = ta − tb > 0 it is
    // sign(M_s[i, j])(a_i + a_j), for s < 0 sign(M_{−s}[j, i])(a_j + a_i), for s = 0 the sum of both.
    const int8_t* sg = signs + g * n_half * in_g * in_g;
    T* out = gsym + g * n * n;
    for (int64_t i = 0; i < in_g; ++i)
      for (int64_t ta = 0; ta < kk; ++ta)
        for (int64_t tb = 0; tb < kk; ++tb) {
          const int64_t s = shift[ta * kk + tb];
          T* to = out + (i * kk + ta) * n + tb * in_g;  // columns (tb, j)
          const double ai = a[i];
          if (s > 0) {
            const int8_t* sij = sg + (s * in_g + i) * in_g;
            for (int64_t j = 0; j < in_g; ++j) to[j] = static_cast<T>(sij[j] * (ai + a[j]));
          } else if (s < 0) {
            const int8_t* sji = sg + (-s * in_g) * in_g + i;
            for (int64_t j = 0; j < in_g; ++j) to[j] = static_cast<T>(sji[j * in_g] * (a[j] + ai));
          } else {
            const int8_t* sij = sg + i * in_g;
            const int8_t* sji = sg + i;
            for (int64_t j = 0; j < in_g; ++j) to[j] = static_cast<T>(sij[j] * ai + sji[j * in_g] * a[j]);
          }
        }
  }
}

template <typename T>
const T* ptr(uintptr_t address) { return reinterpret_cast<const T*>(address); }
template <typename T>
T* mut(uintptr_t address) { return reinterpret_cast<T*>(address); }


// ---- conv operators ----------------------------------------------------------------------------------------
// The operator of one layer in im2col form: P_g (K = c_in/groups * kh * kw rows, Ho*Wo columns) holds the padded
// input's patches of group g, A x = W_g P_g (a row of W times P: contiguous axpys over the Ho*Wo outputs),
// A^T v = col2im(W_g^T v) followed by the padding's adjoint, and the bilinear gradient G = v P_g^T.
struct ConvPlan {
  const ConvShape& c;
  int64_t cin_g, cout_g, k, hw, hp, wp;
  std::vector<int64_t> row_source, col_source;  // the input row / column a padded one reads, -1: zero padding
  std::vector<int64_t> patch_offset;            // per (ig, a, b, y, x): its offset in the padded plane

  explicit ConvPlan(const ConvShape& shape)
      : c(shape), cin_g(shape.c_in / shape.groups), cout_g(shape.c_out / shape.groups),
        k(shape.c_in / shape.groups * shape.kh * shape.kw), hw(shape.ho * shape.wo), hp(shape.h + shape.pt + shape.pb),
        wp(shape.w + shape.pl + shape.pr) {
    for (int64_t p = 0; p < hp; ++p) row_source.push_back(source(p, c.pt, c.h));
    for (int64_t p = 0; p < wp; ++p) col_source.push_back(source(p, c.pl, c.w));
    patch_offset.resize(c.kh * c.kw * hw);
    for (int64_t a = 0; a < c.kh; ++a)
      for (int64_t b = 0; b < c.kw; ++b)
        for (int64_t y = 0; y < c.ho; ++y)
          for (int64_t x = 0; x < c.wo; ++x)
            patch_offset[((a * c.kw + b) * c.ho + y) * c.wo + x] = (y * c.sh + a * c.dh) * wp + x * c.sw + b * c.dw;
  }

  int64_t source(int64_t p, int64_t pad, int64_t n) const {
    const int64_t q = p - pad;
    if (c.circular) return ((q % n) + n) % n;
    return (q >= 0 && q < n) ? q : -1;
  }

  // patches (groups, k, hw) of x (c_in, h, w)
  void im2col(const double* x, double* padded, double* patches) const {
    for (int64_t i = 0; i < c.c_in; ++i)
      for (int64_t y = 0; y < hp; ++y)
        for (int64_t xx = 0; xx < wp; ++xx) {
          const int64_t sy = row_source[y], sx = col_source[xx];
          padded[(i * hp + y) * wp + xx] = (sy < 0 || sx < 0) ? 0.0 : x[(i * c.h + sy) * c.w + sx];
        }
    const int64_t taps = c.kh * c.kw;
    for (int64_t i = 0; i < c.c_in; ++i) {
      const double* plane = padded + i * hp * wp;
      for (int64_t t = 0; t < taps; ++t) {
        double* row = patches + (i * taps + t) * hw;  // group g's rows follow group g-1's: i = g*cin_g + ig
        const int64_t* offset = patch_offset.data() + t * hw;
        for (int64_t e = 0; e < hw; ++e) row[e] = plane[offset[e]];
      }
    }
  }

  // z (c_in, h, w) = the padding's adjoint of col2im(q), q (groups, k, hw)
  void col2im(const double* q, double* padded, double* z) const {
    std::fill(padded, padded + c.c_in * hp * wp, 0.0);
    const int64_t taps = c.kh * c.kw;
    for (int64_t i = 0; i < c.c_in; ++i) {
      double* plane = padded + i * hp * wp;
      for (int64_t t = 0; t < taps; ++t) {
        const double* row = q + (i * taps + t) * hw;
        const int64_t* offset = patch_offset.data() + t * hw;
        for (int64_t e = 0; e < hw; ++e) plane[offset[e]] += row[e];
      }
    }
    std::fill(z, z + c.c_in * c.h * c.w, 0.0);
    for (int64_t i = 0; i < c.c_in; ++i)
      for (int64_t y = 0; y < hp; ++y) {
        const int64_t sy = row_source[y];
        if (sy < 0) continue;
        for (int64_t xx = 0; xx < wp; ++xx) {
          const int64_t sx = col_source[xx];
          if (sx >= 0) z[(i * c.h + sy) * c.w + sx] += padded[(i * hp + y) * wp + xx];
        }
      }
  }

  // out (c_out, hw) = W P (W: the layer's weight divided by its largest |entry|, in float64). Each entry is
  // summed over j in increasing order from 0, as row[e] += w_j p_j[e] would, but held in registers for a block
  // of outputs (a row of P is read once per block, the output written once).
  void apply(const double* w, const double* patches, double* out) const {
    for (int64_t o = 0; o < c.c_out; ++o) {
      const double* p = patches + (o / cout_g) * k * hw;
      const double* wo = w + o * k;
      double* row = out + o * hw;
      int64_t e0 = 0;
      for (; e0 + kBlock <= hw; e0 += kBlock) {
        double acc[kBlock] = {};
        for (int64_t j = 0; j < k; ++j) {
          const double wt = wo[j];
          const double* pj = p + j * hw + e0;
          for (int t = 0; t < kBlock; ++t) acc[t] += wt * pj[t];
        }
        std::copy(acc, acc + kBlock, row + e0);
      }
      for (; e0 < hw; ++e0) {
        double acc = 0.0;
        for (int64_t j = 0; j < k; ++j) acc += wo[j] * p[j * hw + e0];
        row[e0] = acc;
      }
    }
  }

  // q (groups, k, hw) = W_g^T v, each entry summed over the group's outputs o in increasing order from 0 (as
  // q_j[e] += w_oj v_o[e] over o would), blocked as in apply
  void adjoint(const double* w, const double* v, double* q) const {
    for (int64_t g = 0; g < c.groups; ++g) {
      const int64_t o_begin = g * cout_g, o_end = o_begin + cout_g;
      for (int64_t j = 0; j < k; ++j) {
        double* row = q + (g * k + j) * hw;
        int64_t e0 = 0;
        for (; e0 + kBlock <= hw; e0 += kBlock) {
          double acc[kBlock] = {};
          for (int64_t o = o_begin; o < o_end; ++o) {
            const double wt = w[o * k + j];
            const double* vo = v + o * hw + e0;
            for (int t = 0; t < kBlock; ++t) acc[t] += wt * vo[t];
          }
          std::copy(acc, acc + kBlock, row + e0);
        }
        for (; e0 < hw; ++e0) {
          double acc = 0.0;
          for (int64_t o = o_begin; o < o_end; ++o) acc += w[o * k + j] * v[o * hw + e0];
          row[e0] = acc;
        }
      }
    }
  }

  static constexpr int kBlock = 8;
};

// A run of doubles in a thread's reusable work memory (see ConvBuffers).
struct Span {
  double* p = nullptr;
  size_t n = 0;
  double* data() const { return p; }
  size_t size() const { return n; }
  double* begin() const { return p; }
  double* end() const { return p + n; }
  double& operator[](size_t i) const { return p[i]; }
};

double sum_of_squares(const Span& x) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  const size_t n = x.size(), n4 = n - n % 4;
  for (size_t e = 0; e < n4; e += 4)
    for (size_t t = 0; t < 4; ++t) part[t] += x[e + t] * x[e + t];
  for (size_t e = n4; e < n; ++e) part[e - n4] += x[e] * x[e];
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// The work arrays of one call, carved from memory the calling thread keeps between calls: a small layer's step
// would otherwise spend more in allocating (and, past malloc's mmap threshold, page-faulting) its patches than
// in arithmetic. Every array is written before it is read, so nothing is cleared. The pool serves one live
// ConvBuffers per thread and at most kPoolMax doubles (64 MB); a second live one, or a larger call, gets memory
// of its own, freed with it.
struct ConvBuffers {
  static constexpr size_t kPoolMax = size_t{1} << 23;
  Span w, x, padded, patches, wv, q, z;
  std::vector<double> own;
  bool pooled = false;

  explicit ConvBuffers(const ConvPlan& p) {
    const size_t sizes[7] = {static_cast<size_t>(p.c.c_out * p.k), static_cast<size_t>(p.c.c_in * p.c.h * p.c.w),
                             static_cast<size_t>(p.c.c_in * p.hp * p.wp), static_cast<size_t>(p.c.groups * p.k * p.hw),
                             static_cast<size_t>(p.c.c_out * p.hw), static_cast<size_t>(p.c.groups * p.k * p.hw),
                             static_cast<size_t>(p.c.c_in * p.c.h * p.c.w)};
    size_t total = 0;
    for (size_t n : sizes) total += n;
    double* next = nullptr;
    if (!pool_busy() && total <= kPoolMax) {
      if (pool().size() < total) pool().resize(total);
      next = pool().data();
      pooled = pool_busy() = true;
    } else {
      own.resize(total);
      next = own.data();
    }
    Span* spans[7] = {&w, &x, &padded, &patches, &wv, &q, &z};
    for (int i = 0; i < 7; ++i) {
      *spans[i] = Span{next, sizes[i]};
      next += sizes[i];
    }
  }
  ~ConvBuffers() {
    if (pooled) pool_busy() = false;
  }
  ConvBuffers(const ConvBuffers&) = delete;
  ConvBuffers& operator=(const ConvBuffers&) = delete;

  static std::vector<double>& pool() {
    static thread_local std::vector<double> memory;
    return memory;
  }
  static bool& pool_busy() {
    static thread_local bool busy = false;
    return busy;
  }
};

template <typename T>
void conv_power_layer(const T* w, T* u, T* v, T* sigma, const ConvPlan& plan, ConvBuffers& buf, int64_t n_iter) {
  const double tiny = std::numeric_limits<T>::min();
  const int64_t n_w = plan.c.c_out * plan.k, n_u = static_cast<int64_t>(buf.x.size());
  double s = 0.0;
  s = max_or_nan(abs_max_or_nan(w, n_w), tiny);
  // W/s first (as the PyTorch path): the entries of A x stay ≤ ‖A/s‖·‖x‖, no overflow for weights near the
  // dtype's largest value (an Inf weight gives s = Inf and NaN entries, as there)
  for (int64_t e = 0; e < n_w; ++e) buf.w[e] = static_cast<double>(w[e]) / s;
  std::copy(u, u + n_u, buf.x.begin());
  std::fill(buf.wv.begin(), buf.wv.end(), 0.0);  // (v for n_iter = 0)
  double nz = 0.0;
  for (int64_t step = 0; step < n_iter; ++step) {
    plan.im2col(buf.x.data(), buf.padded.data(), buf.patches.data());
    plan.apply(buf.w.data(), buf.patches.data(), buf.wv.data());
    const double nw = max_or_nan(std::sqrt(sum_of_squares(buf.wv)), tiny);
    for (double& e : buf.wv) e /= nw;
    plan.adjoint(buf.w.data(), buf.wv.data(), buf.q.data());
    plan.col2im(buf.q.data(), buf.padded.data(), buf.z.data());
    nz = std::sqrt(sum_of_squares(buf.z));
    if (nz != 0.0) {  // NaN != 0: NaN propagates into u
      const double denom = max_or_nan(nz, tiny);
      for (int64_t e = 0; e < n_u; ++e) buf.x[e] = buf.z[e] / denom;
    }
  }
  *sigma = static_cast<T>(nz * s);
  for (int64_t e = 0; e < n_u; ++e) u[e] = static_cast<T>(buf.x[e]);
  for (size_t e = 0; e < buf.wv.size(); ++e) v[e] = static_cast<T>(buf.wv[e]);
}

template <typename T>
void conv_bilinear_gradient(const T* u, const T* v, T* grad, const ConvPlan& plan, ConvBuffers& buf) {
  std::copy(u, u + buf.x.size(), buf.x.begin());
  std::copy(v, v + buf.wv.size(), buf.wv.begin());
  plan.im2col(buf.x.data(), buf.padded.data(), buf.patches.data());
  const int64_t k = plan.k, hw = plan.hw, hw4 = hw - hw % 4;
  for (int64_t o = 0; o < plan.c.c_out; ++o) {
    const double* p = buf.patches.data() + (o / plan.cout_g) * k * hw;
    const double* vo = buf.wv.data() + o * hw;
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {  // four of dot()'s sums at once (the same partial sums): v_o read once
      double part[4][4] = {};
      for (int64_t e = 0; e < hw4; e += 4)
        for (int r = 0; r < 4; ++r)
          for (int t = 0; t < 4; ++t) part[r][t] += p[(j + r) * hw + e + t] * vo[e + t];
      for (int r = 0; r < 4; ++r) {
        for (int64_t e = hw4; e < hw; ++e) part[r][e - hw4] += p[(j + r) * hw + e] * vo[e];
        grad[o * k + j + r] = static_cast<T>((part[r][0] + part[r][1]) + (part[r][2] + part[r][3]));
      }
    }
    for (; j < k; ++j) grad[o * k + j] = static_cast<T>(dot(p + j * hw, vo, hw));
  }
}

// Each layer's power step, then (grad not null) conv_bilinear_gradient of its stored (T-rounded) vectors: the
// numbers of the two separate calls, with one plan and one set of buffers.
template <typename T>
void conv_power_rows(const T* w, T* u, T* v, T* sigma, T* grad, const ConvShape& c, int64_t n_iter) {
  const ConvPlan plan(c);
  ConvBuffers buf(plan);
  const int64_t n_w = c.c_out * plan.k, n_u = c.c_in * c.h * c.w, n_v = c.c_out * plan.hw;
  for (int64_t l = 0; l < c.layers; ++l) {
    conv_power_layer(w + l * n_w, u + l * n_u, v + l * n_v, sigma + l, plan, buf, n_iter);
    if (grad != nullptr) conv_bilinear_gradient(u + l * n_u, v + l * n_v, grad + l * n_w, plan, buf);
  }
}

template <typename T>
void conv_bilinear_gradients(const T* u, const T* v, T* grad, const ConvShape& c) {
  const ConvPlan plan(c);
  ConvBuffers buf(plan);
  const int64_t n_w = c.c_out * plan.k, n_u = c.c_in * c.h * c.w, n_v = c.c_out * plan.hw;
  for (int64_t l = 0; l < c.layers; ++l) conv_bilinear_gradient(u + l * n_u, v + l * n_v, grad + l * n_w, plan, buf);
}

}  // namespace

void lipkern_cpu_power_iteration(uintptr_t matrices, uintptr_t u, uintptr_t v, uintptr_t sigma, int64_t batch,
                                 int64_t rows, int64_t cols, int64_t n_iter, int is_f64) {
  for (int64_t b = 0; b < batch; ++b) {
    if (is_f64)
      power_iteration(ptr<double>(matrices) + b * rows * cols, mut<double>(u) + b * cols, mut<double>(v) + b * rows,
                      mut<double>(sigma) + b, rows, cols, n_iter);
    else
      power_iteration(ptr<float>(matrices) + b * rows * cols, mut<float>(u) + b * cols, mut<float>(v) + b * rows,
                      mut<float>(sigma) + b, rows, cols, n_iter);
  }
}

int lipkern_cpu_aol_forward(uintptr_t p, int p_f64, uintptr_t w, int w_f64, int64_t groups, int64_t out_g,
                            int64_t in_g, int64_t kh, int64_t kw, const AolConstants& k, int check, uintptr_t scale,
                            uintptr_t out, uintptr_t signs) {
  const AolShape sh(groups, out_g, in_g, kh, kw);
  int8_t* sg = mut<int8_t>(signs);
  if (w_f64) {
    return p_f64 ? aol_forward(ptr<double>(p), ptr<double>(w), sh, k, check, mut<double>(scale), mut<double>(out), sg)
                 : aol_forward(ptr<float>(p), ptr<double>(w), sh, k, check, mut<double>(scale), mut<double>(out), sg);
  }
  return p_f64 ? aol_forward(ptr<double>(p), ptr<float>(w), sh, k, check, mut<float>(scale), mut<float>(out), sg)
               : aol_forward(ptr<float>(p), ptr<float>(w), sh, k, check, mut<float>(scale), mut<float>(out), sg);
}

void lipkern_cpu_aol_backward(uintptr_t grad, uintptr_t grad_scale, uintptr_t w, uintptr_t scale, uintptr_t signs,
                              int f64, int64_t groups, int64_t out_g, int64_t in_g, int64_t kh, int64_t kw,
                              uintptr_t gsym, uintptr_t base) {
  const AolShape sh(groups, out_g, in_g, kh, kw);
  if (f64)
    aol_backward(ptr<double>(grad), ptr<double>(grad_scale), ptr<double>(w), ptr<double>(scale),
                 ptr<int8_t>(signs), sh, mut<double>(gsym), mut<double>(base));
  else
    aol_backward(ptr<float>(grad), ptr<float>(grad_scale), ptr<float>(w), ptr<float>(scale), ptr<int8_t>(signs), sh,
                 mut<float>(gsym), mut<float>(base));
}

void lipkern_cpu_conv_power_iteration(uintptr_t weights, uintptr_t u, uintptr_t v, uintptr_t sigma,
                                      const ConvShape& c, int64_t n_iter, int f64) {
  lipkern_cpu_conv_power_rows(weights, u, v, sigma, 0, c, n_iter, f64);
}

void lipkern_cpu_conv_bilinear_gradient(uintptr_t u, uintptr_t v, uintptr_t grad, const ConvShape& c, int f64) {
  if (f64)
    conv_bilinear_gradients(ptr<double>(u), ptr<double>(v), mut<double>(grad), c);
  else
    conv_bilinear_gradients(ptr<float>(u), ptr<float>(v), mut<float>(grad), c);
}

void lipkern_cpu_conv_power_rows(uintptr_t weights, uintptr_t u, uintptr_t v, uintptr_t sigma, uintptr_t grad,
                                 const ConvShape& c, int64_t n_iter, int f64) {
  if (f64)
    conv_power_rows(ptr<double>(weights), mut<double>(u), mut<double>(v), mut<double>(sigma), mut<double>(grad), c,
                    n_iter);
  else
    conv_power_rows(ptr<float>(weights), mut<float>(u), mut<float>(v), mut<float>(sigma), mut<float>(grad), c, n_iter);
}
