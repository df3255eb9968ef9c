// CPU kernels of the fused cross-entropy, written once against at::vec and compiled once per CPU
// capability: cross_entropy_{default,avx2,avx512}.cpp define CPU_CAPABILITY and include this file,
// so everything here lands in weighted_loss::cpu::<capability> and dispatch.cpp picks one at run
// time. Include it from those files only.
//
// Math, per row r with logits x, class weights w (1 when absent), C classes, smoothing s:
//   lse    = log sum_c exp(x_c)                      (saved for the backward, in acc precision)
//   index target y:
//     loss = (1 - s) w_y (lse - x_y) + (s / C) sum_c w_c (lse - x_c)
//     dloss/dx_k = (1 - s) w_y (p_k - [k == y]) + (s / C) (W p_k - w_k),  p = softmax(x), W = sum w
//   probability target t, with t'_c = (1 - s) t_c + s / C and S = sum_c w_c t'_c:
//     loss = -sum_c w_c t'_c (x_c - lse)
//     dloss/dx_k = S p_k - w_k t'_k,        dloss/dt_k = -(1 - s) w_k (x_k - lse)
// Sums of w_c (x_c - lse) are taken as W (lse - ref) - sum_c w_c (x_c - ref) with ref = x_0, so
// a large common offset of the logits does not cancel catastrophically.
//
// The forward reads each logit once from memory: a row is processed in chunks small enough for
// L1, a max pass then an exp-sum pass over the chunk, rescaling the running sum when the max moves
// (one exp per element, never two). The backward recomputes p from the saved lse and writes each
// gradient element once. Layouts: class-contiguous rows (stride_class == 1) are vectorized along
// the classes; otherwise the glue guarantees stride_inner == 1 and lanes run along the
// contiguous spatial axis, reading (N, C, d...) in place. Reductions go through fixed blocks of
// rows whose partial sums are added in block order: the same bits for any thread count.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../params.h"
#include "kernels.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Blocks of B = 2 vector widths of acc, loaded from and stored to scalar_t.
template <typename scalar_t>
struct IO {
  using acc_t = typename AccOf<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();
  static constexpr int64_t B = 2 * W;
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;

  static inline void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (kSame) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + W);
    } else {
      at::vec::load_to_float<scalar_t>(p, a, b);
    }
  }
  // n < B valid elements; the rest read as zero.
  static inline void load(const scalar_t* p, int64_t n, Vec& a, Vec& b) {
    if (n == B) return load(p, a, b);
    acc_t tmp[B] = {};
    for (int64_t k = 0; k < n; ++k) tmp[k] = static_cast<acc_t>(p[k]);
    a = Vec::loadu(tmp);
    b = Vec::loadu(tmp + W);
  }
  static inline void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (kSame) {
      a.store(p);
      b.store(p + W);
    } else {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    }
  }
  static inline void store(scalar_t* p, int64_t n, const Vec& a, const Vec& b) {
    if (n == B) return store(p, a, b);
    acc_t tmp[B];
    a.store(tmp);
    b.store(tmp + W);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<scalar_t>(tmp[k]);
  }
};

template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  return v.exp();
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  acc_t tmp[Vectorized<acc_t>::size()];
  v.store(tmp);
  acc_t s = 0;
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) s += tmp[k];
  return s;
}

// max that keeps a NaN once seen
template <typename acc_t>
inline acc_t max_nan(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : (b != b ? b : std::max(a, b));
}

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  acc_t tmp[Vectorized<acc_t>::size()];
  v.store(tmp);
  acc_t m = tmp[0];
  for (int64_t k = 1; k < Vectorized<acc_t>::size(); ++k) m = max_nan(m, tmp[k]);
  return m;
}

// Shift used for exp: the running max, or 0 while everything seen is -inf (so exp(-inf) = 0
// rather than exp(-inf - -inf) = NaN; a row that is -inf throughout gets lse = -inf).
template <typename acc_t>
inline acc_t exp_shift(acc_t m) {
  return m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m;
}

enum Mode : int { kPlain = 0, kSmooth = 1, kProb = 2 };

template <typename scalar_t>
struct Ctx {
  using acc_t = typename AccOf<scalar_t>::type;
  const CrossEntropyParams& p;
  const scalar_t* x;
  const scalar_t* t;            // probability targets
  const int64_t* y;             // index targets
  const acc_t* w;               // weight as acc, or nullptr
  acc_t w_sum;                  // sum of weights (C without weight)
  acc_t smooth;                 // label smoothing s, 0 when off
  acc_t t_scale, t_shift;       // t' = t * t_scale + t_shift
  int64_t C;

  explicit Ctx(const CrossEntropyParams& prm, std::vector<acc_t>& w_buf) : p(prm) {
    x = static_cast<const scalar_t*>(p.input);
    t = static_cast<const scalar_t*>(p.target);
    y = static_cast<const int64_t*>(p.target);
    C = p.classes;
    smooth = p.label_smoothing > 0 ? static_cast<acc_t>(p.label_smoothing) : acc_t(0);
    t_scale = acc_t(1) - smooth;
    t_shift = C > 0 ? smooth / static_cast<acc_t>(C) : acc_t(0);
    w = nullptr;
    w_sum = static_cast<acc_t>(C);
    if (p.weight != nullptr) {
      const auto* wp = static_cast<const scalar_t*>(p.weight);
      w_buf.resize(C);
      acc_t s = 0;
      for (int64_t c = 0; c < C; ++c) {
        w_buf[c] = static_cast<acc_t>(wp[c]);
        s += w_buf[c];
      }
      w = w_buf.data();
      w_sum = s;
    }
  }
  inline int64_t offset(int64_t o, int64_t i) const {
    return o * p.stride_outer + i * p.stride_inner;
  }
  inline int64_t checked_target(int64_t r) const {
    const int64_t v = y[r];
    if (v == p.ignore_index) return -1;
    TORCH_CHECK_INDEX(v >= 0 && v < C, "Target ", v, " is out of bounds.");
    return v;
  }
};

// ---------------------------------------------------------------------------------------------
// Forward, class-contiguous rows.

constexpr int64_t kChunk = 2048;  // elements per L1-resident chunk of a row

// lse of one row; with kSmooth also a = sum_c w_c (x_c - ref); with kProb
// a = sum_c w_c t'_c (x_c - ref) and S = sum_c w_c t'_c.
template <typename scalar_t, int M, bool HasW>
inline void row_stats(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                      typename AccOf<scalar_t>::type ref, typename AccOf<scalar_t>::type& lse,
                      typename AccOf<scalar_t>::type& a_out, typename AccOf<scalar_t>::type& s_out) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const int64_t C = cx.C;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const Vec vref(ref), vts(cx.t_scale), vtsh(cx.t_shift);
  Vec s0(0), s1(0), a0(0), a1(0), q0(0), q1(0);
  acc_t s_t = 0, a_t = 0, q_t = 0;
  acc_t m = ninf;
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const int64_t nv = n - n % B;
    const scalar_t* xc = x + c0;
    Vec m0(ninf), m1(ninf), v0, v1;
    for (int64_t k = 0; k < nv; k += B) {
      io::load(xc + k, v0, v1);
      m0 = at::vec::maximum(m0, v0);
      m1 = at::vec::maximum(m1, v1);
    }
    acc_t cm = hmax(at::vec::maximum(m0, m1));
    for (int64_t k = nv; k < n; ++k) cm = max_nan(cm, static_cast<acc_t>(xc[k]));
    const acc_t new_m = max_nan(m, cm);
    if (c0 > 0) {
      // everything before was -inf (or NaN, which 0 * NaN keeps): its exp-sum is exactly 0
      const acc_t f = (m == ninf) ? acc_t(0) : std::exp(m - new_m);
      const Vec vf(f);
      s0 = s0 * vf;
      s1 = s1 * vf;
      s_t *= f;
    }
    m = new_m;
    const acc_t shift = exp_shift(m);
    const Vec vshift(shift);
    for (int64_t k = 0; k < nv; k += B) {
      io::load(xc + k, v0, v1);
      s0 += vexp(v0 - vshift);
      s1 += vexp(v1 - vshift);
      if constexpr (M == kSmooth) {
        if constexpr (HasW) {
          const Vec w0 = Vec::loadu(cx.w + c0 + k), w1 = Vec::loadu(cx.w + c0 + k + io::W);
          a0 = at::vec::fmadd(w0, v0 - vref, a0);
          a1 = at::vec::fmadd(w1, v1 - vref, a1);
        } else {
          a0 += v0 - vref;
          a1 += v1 - vref;
        }
      } else if constexpr (M == kProb) {
        Vec t0, t1;
        io::load(t + c0 + k, t0, t1);
        t0 = at::vec::fmadd(t0, vts, vtsh);
        t1 = at::vec::fmadd(t1, vts, vtsh);
        if constexpr (HasW) {
          t0 = t0 * Vec::loadu(cx.w + c0 + k);
          t1 = t1 * Vec::loadu(cx.w + c0 + k + io::W);
        }
        a0 = at::vec::fmadd(t0, v0 - vref, a0);
        a1 = at::vec::fmadd(t1, v1 - vref, a1);
        q0 += t0;
        q1 += t1;
      }
    }
    for (int64_t k = nv; k < n; ++k) {
      const acc_t xv = static_cast<acc_t>(xc[k]);
      s_t += std::exp(xv - shift);
      const acc_t wv = HasW ? cx.w[c0 + k] : acc_t(1);
      if constexpr (M == kSmooth) {
        a_t += wv * (xv - ref);
      } else if constexpr (M == kProb) {
        const acc_t tv = (static_cast<acc_t>(t[c0 + k]) * cx.t_scale + cx.t_shift) * wv;
        a_t += tv * (xv - ref);
        q_t += tv;
      }
    }
  }
  lse = exp_shift(m) + std::log(hsum(s0 + s1) + s_t);
  a_out = hsum(a0 + a1) + a_t;
  s_out = hsum(q0 + q1) + q_t;
}

// Per-row loss and the row's weight in the mean's divisor.
template <typename scalar_t, int M, bool HasW>
inline void row_forward(const Ctx<scalar_t>& cx, int64_t r, const scalar_t* x, const scalar_t* t,
                        typename AccOf<scalar_t>::type& lse, typename AccOf<scalar_t>::type& loss,
                        typename AccOf<scalar_t>::type& wy, typename AccOf<scalar_t>::type& tsum) {
  using acc_t = typename AccOf<scalar_t>::type;
  if constexpr (M == kProb) {
    const acc_t ref = static_cast<acc_t>(x[0]);
    acc_t a, q;
    row_stats<scalar_t, M, HasW>(cx, x, t, ref, lse, a, q);
    loss = q * (lse - ref) - a;
    wy = 1;
    tsum = q;
  } else {
    const int64_t yv = cx.checked_target(r);
    if (yv < 0) {
      lse = loss = wy = 0;
      return;
    }
    wy = HasW ? cx.w[yv] : acc_t(1);
    const acc_t ref = static_cast<acc_t>(x[0]);
    acc_t a, q;
    row_stats<scalar_t, M, HasW>(cx, x, t, ref, lse, a, q);
    const acc_t nll = lse - static_cast<acc_t>(x[yv * cx.p.stride_class]);
    if constexpr (M == kSmooth) {
      loss = (acc_t(1) - cx.smooth) * wy * nll +
             cx.t_shift * (cx.w_sum * (lse - ref) - a);
    } else {
      loss = wy * nll;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Work units and the deterministic reduction.

struct Units {
  int64_t count;   // number of units
  int64_t rows;    // row layout: rows per unit; lane layout: lanes per unit
  int64_t per_outer;  // lane layout: units per outer index
};

inline Units row_units(const CrossEntropyParams& p) {
  const int64_t rows = p.outer * p.inner;
  const int64_t per = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.classes));
  return {(rows + per - 1) / per, per, 0};
}

template <typename scalar_t>
inline Units lane_units(const CrossEntropyParams& p) {
  constexpr int64_t B = IO<scalar_t>::B;
  // lanes per unit: a (classes x lanes) tile of about 32 KiB stays in L1 between the two passes
  int64_t lanes = 32768 / std::max<int64_t>(1, p.classes * int64_t(sizeof(scalar_t)));
  lanes = std::clamp<int64_t>(lanes - lanes % B, B, 16 * B);
  const int64_t per_outer = (p.inner + lanes - 1) / lanes;
  return {p.outer * per_outer, lanes, per_outer};
}

template <typename scalar_t, typename acc_t>
inline void finish_forward(const CrossEntropyParams& p, const std::vector<double>& part_loss,
                           const std::vector<double>& part_w) {
  if (p.reduction == Reduction::None) return;
  double total = 0, wsum = 0;
  for (size_t u = 0; u < part_loss.size(); ++u) {
    total += part_loss[u];
    wsum += part_w[u];
  }
  const double rows = static_cast<double>(p.outer * p.inner);
  const double denom = p.prob_target ? rows : wsum;
  if (!p.prob_target) *static_cast<acc_t*>(p.total_weight) = static_cast<acc_t>(wsum);
  const double out = p.reduction == Reduction::Mean ? total / denom : total;
  *static_cast<scalar_t*>(p.loss) = static_cast<scalar_t>(out);
}

template <typename scalar_t, int M, bool HasW>
void forward_rows(const Ctx<scalar_t>& cx) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto& p = cx.p;
  const Units u = row_units(p);
  const int64_t rows = p.outer * p.inner;
  std::vector<double> part_loss(u.count, 0.0), part_w(u.count, 0.0);
  auto* lse_out = static_cast<acc_t*>(p.lse);
  auto* tsum_out = static_cast<acc_t*>(p.tsum);
  auto* loss_out = static_cast<scalar_t*>(p.loss);
  const bool none = p.reduction == Reduction::None;
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      double sl = 0, sw = 0;
      const int64_t r1 = std::min(rows, (unit + 1) * u.rows);
      for (int64_t r = unit * u.rows; r < r1; ++r) {
        const int64_t off = cx.offset(r / p.inner, r % p.inner);
        acc_t lse, loss, wy, ts = 0;
        row_forward<scalar_t, M, HasW>(cx, r, cx.x + off, M == kProb ? cx.t + off : nullptr, lse,
                                       loss, wy, ts);
        lse_out[r] = lse;
        if constexpr (M == kProb) tsum_out[r] = ts;
        if (none) {
          loss_out[r] = static_cast<scalar_t>(loss);
        } else {
          sl += loss;
          sw += wy;
        }
      }
      part_loss[unit] = sl;
      part_w[unit] = sw;
    }
  });
  finish_forward<scalar_t, acc_t>(p, part_loss, part_w);
}

// ---------------------------------------------------------------------------------------------
// Forward, lanes along the contiguous spatial axis of (N, C, d...).

template <typename scalar_t, int M, bool HasW>
void forward_lanes(const Ctx<scalar_t>& cx) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B, W = io::W;
  const auto& p = cx.p;
  const Units u = lane_units<scalar_t>(p);
  const int64_t C = cx.C, sC = p.stride_class;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  std::vector<double> part_loss(u.count, 0.0), part_w(u.count, 0.0);
  auto* lse_out = static_cast<acc_t*>(p.lse);
  auto* tsum_out = static_cast<acc_t*>(p.tsum);
  auto* loss_out = static_cast<scalar_t*>(p.loss);
  const bool none = p.reduction == Reduction::None;
  const Vec vts(cx.t_scale), vtsh(cx.t_shift), vninf(ninf), vzero(0);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      const int64_t o = unit / u.per_outer;
      const int64_t i_begin = (unit % u.per_outer) * u.rows;
      const int64_t i_end = std::min(p.inner, i_begin + u.rows);
      double sl = 0, sw = 0;
      for (int64_t i0 = i_begin; i0 < i_end; i0 += B) {
        const int64_t nl = std::min(B, i_end - i0);
        const int64_t base = cx.offset(o, i0);
        const scalar_t* x = cx.x + base;
        Vec m0(ninf), m1(ninf), v0, v1;
        for (int64_t c = 0; c < C; ++c) {
          io::load(x + c * sC, nl, v0, v1);
          m0 = at::vec::maximum(m0, v0);
          m1 = at::vec::maximum(m1, v1);
        }
        const Vec sh0 = Vec::blendv(m0, vzero, m0 == vninf);
        const Vec sh1 = Vec::blendv(m1, vzero, m1 == vninf);
        Vec r0, r1;
        io::load(x, nl, r0, r1);  // ref = x_0
        Vec s0(0), s1(0), a0(0), a1(0), q0(0), q1(0);
        for (int64_t c = 0; c < C; ++c) {
          io::load(x + c * sC, nl, v0, v1);
          s0 += vexp(v0 - sh0);
          s1 += vexp(v1 - sh1);
          if constexpr (M == kSmooth) {
            const Vec wc(HasW ? cx.w[c] : acc_t(1));
            a0 = at::vec::fmadd(wc, v0 - r0, a0);
            a1 = at::vec::fmadd(wc, v1 - r1, a1);
          } else if constexpr (M == kProb) {
            Vec t0, t1;
            io::load(cx.t + base + c * sC, nl, t0, t1);
            t0 = at::vec::fmadd(t0, vts, vtsh);
            t1 = at::vec::fmadd(t1, vts, vtsh);
            if constexpr (HasW) {
              const Vec wc(cx.w[c]);
              t0 = t0 * wc;
              t1 = t1 * wc;
            }
            a0 = at::vec::fmadd(t0, v0 - r0, a0);
            a1 = at::vec::fmadd(t1, v1 - r1, a1);
            q0 += t0;
            q1 += t1;
          }
        }
        acc_t lse[B], ref[B], a[B], q[B];
        (sh0 + s0.log()).store(lse);
        (sh1 + s1.log()).store(lse + W);
        r0.store(ref);
        r1.store(ref + W);
        a0.store(a);
        a1.store(a + W);
        q0.store(q);
        q1.store(q + W);
        for (int64_t k = 0; k < nl; ++k) {
          const int64_t r = o * p.inner + i0 + k;
          acc_t loss, wy = 1;
          if constexpr (M == kProb) {
            loss = q[k] * (lse[k] - ref[k]) - a[k];
            tsum_out[r] = q[k];
          } else {
            const int64_t yv = cx.checked_target(r);
            if (yv < 0) {
              lse[k] = loss = wy = 0;
            } else {
              wy = HasW ? cx.w[yv] : acc_t(1);
              const acc_t nll = lse[k] - static_cast<acc_t>(x[yv * sC + k]);
              if constexpr (M == kSmooth) {
                loss = (acc_t(1) - cx.smooth) * wy * nll +
                       cx.t_shift * (cx.w_sum * (lse[k] - ref[k]) - a[k]);
              } else {
                loss = wy * nll;
              }
            }
          }
          lse_out[r] = lse[k];
          if (none) {
            loss_out[r] = static_cast<scalar_t>(loss);
          } else {
            sl += loss;
            sw += wy;
          }
        }
      }
      part_loss[unit] = sl;
      part_w[unit] = sw;
    }
  });
  finish_forward<scalar_t, acc_t>(p, part_loss, part_w);
}

// ---------------------------------------------------------------------------------------------
// Backward. Per row the gradient is  g * (cp * p_k - cw * w_k * t'_k)  minus  g (1 - s) w_y at
// k == y for index targets, where g is the upstream gradient of the row's loss (already divided
// by the mean's divisor), cp the coefficient of the softmax and cw that of the weight term.

template <typename scalar_t>
inline typename AccOf<scalar_t>::type scalar_grad(const CrossEntropyParams& p) {
  using acc_t = typename AccOf<scalar_t>::type;
  const acc_t g = static_cast<acc_t>(*static_cast<const scalar_t*>(p.grad_loss));
  if (p.reduction != Reduction::Mean) return g;
  const acc_t denom = p.prob_target ? static_cast<acc_t>(p.outer * p.inner)
                                    : *static_cast<const acc_t*>(p.total_weight);
  return g / denom;
}

// What the backward of one row needs besides the logits.
template <typename acc_t>
struct RowCoef {
  acc_t lse = 0, cp = 0, cw = 0, gy = 0;  // gy: g (1 - s) w_y, subtracted at k == y
  int64_t y = -1;                          // -1: ignored row (index) / no delta (prob)
  bool zero = false;                       // ignored row: gradient 0
};

template <typename scalar_t, int M, bool HasW>
inline RowCoef<typename AccOf<scalar_t>::type> row_coef(const Ctx<scalar_t>& cx, int64_t r,
                                                         typename AccOf<scalar_t>::type g) {
  using acc_t = typename AccOf<scalar_t>::type;
  RowCoef<acc_t> rc;
  const auto& p = cx.p;
  rc.lse = static_cast<const acc_t*>(p.lse)[r];
  if (p.reduction == Reduction::None) g = static_cast<acc_t>(static_cast<const scalar_t*>(p.grad_loss)[r]);
  if constexpr (M == kProb) {
    rc.cp = g * static_cast<const acc_t*>(p.tsum)[r];
    rc.cw = g;
  } else {
    const int64_t yv = cx.checked_target(r);
    if (yv < 0) {
      rc.zero = true;
      return rc;
    }
    const acc_t wy = HasW ? cx.w[yv] : acc_t(1);
    rc.y = yv;
    if constexpr (M == kSmooth) {
      rc.cp = g * ((acc_t(1) - cx.smooth) * wy + cx.t_shift * cx.w_sum);
      rc.cw = g * cx.t_shift;
      rc.gy = g * (acc_t(1) - cx.smooth) * wy;
    } else {
      rc.cp = g * wy;
      rc.gy = g * wy;
    }
  }
  return rc;
}

template <typename scalar_t, int M, bool HasW>
void backward_rows(const Ctx<scalar_t>& cx) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B, W = io::W;
  const auto& p = cx.p;
  const int64_t C = cx.C, rows = p.outer * p.inner;
  const int64_t nv = C - C % B;
  const acc_t g_all = p.reduction == Reduction::None ? acc_t(0) : scalar_grad<scalar_t>(p);
  const Vec vts(cx.t_scale), vtsh(cx.t_shift);
  auto* gi = static_cast<scalar_t*>(p.grad_input);
  const Units u = row_units(p);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b * u.rows; r < std::min(rows, e * u.rows); ++r) {
      const int64_t off = cx.offset(r / p.inner, r % p.inner);
      const scalar_t* x = cx.x + off;
      const scalar_t* t = M == kProb ? cx.t + off : nullptr;
      scalar_t* gr = gi + off;
      const auto rc = row_coef<scalar_t, M, HasW>(cx, r, g_all);
      if (rc.zero) {
        std::fill(gr, gr + C, scalar_t(0));
        continue;
      }
      const Vec vlse(rc.lse), vcp(rc.cp), vcw(rc.cw);
      for (int64_t k = 0; k < nv; k += B) {
        Vec v0, v1;
        io::load(x + k, v0, v1);
        Vec g0 = vcp * vexp(v0 - vlse), g1 = vcp * vexp(v1 - vlse);
        if constexpr (M == kSmooth || M == kProb) {
          Vec w0(1), w1(1);
          if constexpr (HasW) {
            w0 = Vec::loadu(cx.w + k);
            w1 = Vec::loadu(cx.w + k + W);
          }
          if constexpr (M == kProb) {
            Vec t0, t1;
            io::load(t + k, t0, t1);
            w0 = w0 * at::vec::fmadd(t0, vts, vtsh);
            w1 = w1 * at::vec::fmadd(t1, vts, vtsh);
          }
          g0 = g0 - vcw * w0;
          g1 = g1 - vcw * w1;
        }
        io::store(gr + k, g0, g1);
      }
      for (int64_t k = nv; k < C; ++k) {
        const acc_t xv = static_cast<acc_t>(x[k]);
        acc_t gv = rc.cp * std::exp(xv - rc.lse);
        if constexpr (M == kSmooth || M == kProb) {
          acc_t wv = HasW ? cx.w[k] : acc_t(1);
          if constexpr (M == kProb) wv *= static_cast<acc_t>(t[k]) * cx.t_scale + cx.t_shift;
          gv -= rc.cw * wv;
        }
        gr[k] = static_cast<scalar_t>(gv);
      }
      if constexpr (M != kProb) {
        // the target element once more, with its delta, so it is rounded once
        const acc_t xv = static_cast<acc_t>(x[rc.y]);
        acc_t gv = rc.cp * std::exp(xv - rc.lse) - rc.gy;
        if constexpr (M == kSmooth) gv -= rc.cw * (HasW ? cx.w[rc.y] : acc_t(1));
        gr[rc.y] = static_cast<scalar_t>(gv);
      }
    }
  });
}

template <typename scalar_t, int M, bool HasW>
void backward_lanes(const Ctx<scalar_t>& cx) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B, W = io::W;
  const auto& p = cx.p;
  const int64_t C = cx.C, sC = p.stride_class;
  const acc_t g_all = p.reduction == Reduction::None ? acc_t(0) : scalar_grad<scalar_t>(p);
  const Vec vts(cx.t_scale), vtsh(cx.t_shift);
  auto* gi = static_cast<scalar_t*>(p.grad_input);
  const Units u = lane_units<scalar_t>(p);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      const int64_t o = unit / u.per_outer;
      const int64_t i_begin = (unit % u.per_outer) * u.rows;
      const int64_t i_end = std::min(p.inner, i_begin + u.rows);
      for (int64_t i0 = i_begin; i0 < i_end; i0 += B) {
        const int64_t nl = std::min(B, i_end - i0);
        const int64_t base = cx.offset(o, i0);
        // per-lane coefficients; ignored lanes keep cp = cw = gy = 0 and are masked to 0
        acc_t lse[B] = {}, cp[B] = {}, cw[B] = {}, gy[B] = {}, yk[B], keep[B];
        for (int64_t k = 0; k < B; ++k) {
          yk[k] = -1;
          keep[k] = 0;
        }
        for (int64_t k = 0; k < nl; ++k) {
          const auto rc = row_coef<scalar_t, M, HasW>(cx, o * p.inner + i0 + k, g_all);
          if (rc.zero) continue;
          lse[k] = rc.lse;
          cp[k] = rc.cp;
          cw[k] = rc.cw;
          gy[k] = rc.gy;
          yk[k] = static_cast<acc_t>(rc.y);
          keep[k] = 1;
        }
        const Vec lse0 = Vec::loadu(lse), lse1 = Vec::loadu(lse + W);
        const Vec cp0 = Vec::loadu(cp), cp1 = Vec::loadu(cp + W);
        const Vec cw0 = Vec::loadu(cw), cw1 = Vec::loadu(cw + W);
        const Vec gy0 = Vec::loadu(gy), gy1 = Vec::loadu(gy + W);
        const Vec y0 = Vec::loadu(yk), y1 = Vec::loadu(yk + W);
        const Vec keep0 = Vec::loadu(keep) == Vec(1), keep1 = Vec::loadu(keep + W) == Vec(1);
        const Vec zero(0);
        for (int64_t c = 0; c < C; ++c) {
          Vec v0, v1;
          io::load(cx.x + base + c * sC, nl, v0, v1);
          Vec g0 = cp0 * vexp(v0 - lse0), g1 = cp1 * vexp(v1 - lse1);
          if constexpr (M == kSmooth || M == kProb) {
            Vec w0(HasW ? cx.w[c] : acc_t(1)), w1 = w0;
            if constexpr (M == kProb) {
              Vec t0, t1;
              io::load(cx.t + base + c * sC, nl, t0, t1);
              w0 = w0 * at::vec::fmadd(t0, vts, vtsh);
              w1 = w1 * at::vec::fmadd(t1, vts, vtsh);
            }
            g0 = g0 - cw0 * w0;
            g1 = g1 - cw1 * w1;
          }
          if constexpr (M != kProb) {
            const Vec vc(static_cast<acc_t>(c));
            g0 = g0 - (gy0 & (y0 == vc));
            g1 = g1 - (gy1 & (y1 == vc));
            g0 = Vec::blendv(zero, g0, keep0);
            g1 = Vec::blendv(zero, g1, keep1);
          }
          io::store(gi + base + c * sC, nl, g0, g1);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Gradient of the loss with respect to probability targets: -g (1 - s) w_k (x_k - lse).

template <typename scalar_t, bool HasW>
void target_backward(const Ctx<scalar_t>& cx) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B, W = io::W;
  const auto& p = cx.p;
  const int64_t C = cx.C, rows = p.outer * p.inner, sC = p.stride_class;
  const acc_t g_all = p.reduction == Reduction::None ? acc_t(0) : scalar_grad<scalar_t>(p);
  const auto* lse_in = static_cast<const acc_t*>(p.lse);
  auto* gt = static_cast<scalar_t*>(p.grad_target);
  const bool none = p.reduction == Reduction::None;
  auto coef = [&](int64_t r) {
    const acc_t g = none ? static_cast<acc_t>(static_cast<const scalar_t*>(p.grad_loss)[r]) : g_all;
    return -g * cx.t_scale;
  };
  if (sC == 1) {
    const int64_t nv = C - C % B;
    const Units u = row_units(p);
    at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b * u.rows; r < std::min(rows, e * u.rows); ++r) {
        const int64_t off = cx.offset(r / p.inner, r % p.inner);
        const acc_t k0 = coef(r), lse = lse_in[r];
        const Vec vk(k0), vlse(lse);
        for (int64_t k = 0; k < nv; k += B) {
          Vec v0, v1;
          io::load(cx.x + off + k, v0, v1);
          Vec g0 = vk * (v0 - vlse), g1 = vk * (v1 - vlse);
          if constexpr (HasW) {
            g0 = g0 * Vec::loadu(cx.w + k);
            g1 = g1 * Vec::loadu(cx.w + k + W);
          }
          io::store(gt + off + k, g0, g1);
        }
        for (int64_t k = nv; k < C; ++k) {
          const acc_t wv = HasW ? cx.w[k] : acc_t(1);
          gt[off + k] = static_cast<scalar_t>(k0 * (static_cast<acc_t>(cx.x[off + k]) - lse) * wv);
        }
      }
    });
    return;
  }
  const Units u = lane_units<scalar_t>(p);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      const int64_t o = unit / u.per_outer;
      const int64_t i_begin = (unit % u.per_outer) * u.rows;
      const int64_t i_end = std::min(p.inner, i_begin + u.rows);
      for (int64_t i0 = i_begin; i0 < i_end; i0 += B) {
        const int64_t nl = std::min(B, i_end - i0);
        const int64_t base = cx.offset(o, i0);
        acc_t kk[B] = {}, ll[B] = {};
        for (int64_t k = 0; k < nl; ++k) {
          const int64_t r = o * p.inner + i0 + k;
          kk[k] = coef(r);
          ll[k] = lse_in[r];
        }
        const Vec k0 = Vec::loadu(kk), k1 = Vec::loadu(kk + W);
        const Vec l0 = Vec::loadu(ll), l1 = Vec::loadu(ll + W);
        for (int64_t c = 0; c < C; ++c) {
          Vec v0, v1;
          io::load(cx.x + base + c * sC, nl, v0, v1);
          Vec g0 = k0 * (v0 - l0), g1 = k1 * (v1 - l1);
          if constexpr (HasW) {
            const Vec wc(cx.w[c]);
            g0 = g0 * wc;
            g1 = g1 * wc;
          }
          io::store(gt + base + c * sC, nl, g0, g1);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Compile-time switches.

template <typename F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::Float64: return f(double{});
    case DType::Float32: return f(float{});
    case DType::BFloat16: return f(c10::BFloat16{});
    case DType::Float16: return f(c10::Half{});
  }
  TORCH_INTERNAL_ASSERT(false, "weighted_loss: unknown dtype");
}

template <typename F>
void dispatch_mode(const CrossEntropyParams& p, F&& f) {
  const bool has_w = p.weight != nullptr;
  auto with_w = [&](auto mode) {
    if (has_w) {
      f(mode, std::true_type{});
    } else {
      f(mode, std::false_type{});
    }
  };
  if (p.prob_target) {
    with_w(std::integral_constant<int, kProb>{});
  } else if (p.label_smoothing > 0) {
    with_w(std::integral_constant<int, kSmooth>{});
  } else {
    with_w(std::integral_constant<int, kPlain>{});
  }
}

}  // namespace

void cross_entropy_forward(const CrossEntropyParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<typename AccOf<scalar_t>::type> w_buf;
    const Ctx<scalar_t> cx(p, w_buf);
    dispatch_mode(p, [&](auto mode, auto has_w) {
      if (p.stride_class == 1) {
        forward_rows<scalar_t, decltype(mode)::value, decltype(has_w)::value>(cx);
      } else {
        forward_lanes<scalar_t, decltype(mode)::value, decltype(has_w)::value>(cx);
      }
    });
  });
}

void cross_entropy_backward(const CrossEntropyParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<typename AccOf<scalar_t>::type> w_buf;
    const Ctx<scalar_t> cx(p, w_buf);
    dispatch_mode(p, [&](auto mode, auto has_w) {
      if (p.stride_class == 1) {
        backward_rows<scalar_t, decltype(mode)::value, decltype(has_w)::value>(cx);
      } else {
        backward_lanes<scalar_t, decltype(mode)::value, decltype(has_w)::value>(cx);
      }
    });
  });
}

void cross_entropy_target_backward(const CrossEntropyParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<typename AccOf<scalar_t>::type> w_buf;
    const Ctx<scalar_t> cx(p, w_buf);
    if (p.weight != nullptr) {
      target_backward<scalar_t, true>(cx);
    } else {
      target_backward<scalar_t, false>(cx);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
