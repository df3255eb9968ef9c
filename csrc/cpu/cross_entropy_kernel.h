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
// The forward reads each logit once, one exp per logit: lse = ref + log sum_c exp(x_c - ref) with
// ref = the row's first logit, and a second pass shifted by the row's max only for the rare row
// where that sum could overflow (see row_stats). Sums of w_c (x_c - lse) are taken as
// W (lse - ref) - sum_c w_c (x_c - ref), so a large common offset of the logits does not cancel
// catastrophically. The backward recomputes p from the saved lse and writes each gradient element
// once.
//
// Layouts (path_of): class-contiguous rows are vectorized along the classes; rows of at most
// kSmallClasses classes are transposed B at a time into a small tile and take the lane code;
// otherwise the glue guarantees stride_inner == 1 and lanes run along the contiguous spatial axis,
// reading (N, C, d...) in place. Reductions go through fixed blocks of rows whose partial sums are
// added in block order: the same bits for any thread count.

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
#include "vec_common.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

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
  const acc_t* w;               // weight as acc, or nullptr
  acc_t w_sum;                  // sum of weights (C without weight)
  acc_t smooth;                 // label smoothing s, 0 when off
  acc_t t_scale, t_shift;       // t' = t * t_scale + t_shift
  int64_t C;

  explicit Ctx(const CrossEntropyParams& prm, std::vector<acc_t>& w_buf) : p(prm) {
    x = static_cast<const scalar_t*>(p.input);
    t = static_cast<const scalar_t*>(p.target);
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
  // where row (o, i) of the logits' gradient starts (its row stride may differ: params.h)
  inline int64_t grad_offset(int64_t o, int64_t i) const {
    return o * p.grad_stride_outer + i * p.stride_inner;
  }
  C10_ALWAYS_INLINE int64_t checked_target(int64_t r) const {
    const int64_t v = target_value(p.target, p.target_type, r);
    if (v == p.ignore_index) return -1;
    TORCH_CHECK_INDEX(v >= 0 && v < C, "Target ", v, " is out of bounds.");
    return v;
  }
};

// ---------------------------------------------------------------------------------------------
// Forward, class-contiguous rows.


// The lane layout reads the classes of a block of lanes as short runs far apart in memory, too
// short for the hardware prefetcher to train on: each load asks for the same class further along.
inline void prefetch(const void* p) {
  __builtin_prefetch(p, 0, 3);
}
inline void prefetch_write(void* p) {
  __builtin_prefetch(p, 1, 3);
}
constexpr int64_t kPrefetch = 256;  // elements ahead along a class row

// How far the max of a row may lie above the exp shift `ref` before sum exp(x - ref) could
// overflow (C * e^60 < FLT_MAX for any C below 10^12).
template <typename acc_t>
constexpr acc_t kShiftSlack = std::is_same_v<acc_t, double> ? acc_t(600) : acc_t(60);

// One pass over a row with a given shift: s = sum_c exp(x_c - ref), m = max_c x_c; with kSmooth
// a = sum_c w_c (x_c - ref); with kProb a = sum_c w_c t'_c (x_c - ref) and q = sum_c w_c t'_c.
template <typename scalar_t, int M, bool HasW>
inline void row_pass(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                     typename AccOf<scalar_t>::type ref, typename AccOf<scalar_t>::type& s,
                     typename AccOf<scalar_t>::type& m, typename AccOf<scalar_t>::type& a,
                     typename AccOf<scalar_t>::type& q) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const Vec vref(ref), vts(cx.t_scale), vtsh(cx.t_shift), vninf(ninf), vzero(0);
  Vec s0(0), s1(0), m0(ninf), m1(ninf), a0(0), a1(0), q0(0), q1(0);
  for_blocks<B>(cx.C, [&](int64_t k, int64_t cnt, auto full) {
    Vec v0, v1, e0, e1;
    if constexpr (decltype(full)::value) {
      io::load(x + k, v0, v1);
      e0 = v0;
      e1 = v1;
    } else {
      io::load(x + k, cnt, v0, v1);
      e0 = v0;
      e1 = v1;
      keep_valid(cnt, vninf, e0, e1);  // -inf: no part in the max, exp gives 0
    }
    m0 = at::vec::maximum(m0, e0);
    m1 = at::vec::maximum(m1, e1);
    s0 += vexp(e0 - vref);
    s1 += vexp(e1 - vref);
    if constexpr (M != kPlain) {
      Vec d0 = v0 - vref, d1 = v1 - vref;
      if constexpr (!decltype(full)::value) keep_valid(cnt, vzero, d0, d1);
      Vec w0(1), w1(1);
      if constexpr (HasW) load_acc(cx.w + k, cnt, w0, w1);
      if constexpr (M == kSmooth) {
        a0 = at::vec::fmadd(w0, d0, a0);
        a1 = at::vec::fmadd(w1, d1, a1);
      } else {
        Vec t0, t1;
        if constexpr (decltype(full)::value) {
          io::load(t + k, t0, t1);
        } else {
          io::load(t + k, cnt, t0, t1);
        }
        t0 = w0 * at::vec::fmadd(t0, vts, vtsh);
        t1 = w1 * at::vec::fmadd(t1, vts, vtsh);
        if constexpr (!decltype(full)::value) keep_valid(cnt, vzero, t0, t1);
        a0 = at::vec::fmadd(t0, d0, a0);
        a1 = at::vec::fmadd(t1, d1, a1);
        q0 += t0;
        q1 += t1;
      }
    }
  });
  s = hsum(s0 + s1);
  m = hmax(at::vec::maximum(m0, m1));
  a = hsum(a0 + a1);
  q = hsum(q0 + q1);
}

// lse of one row, and the sums of row_pass relative to the returned ref. One pass shifted by the
// row's first logit: exact unless a logit lies more than kShiftSlack above it (then the sum could
// overflow) or the first logit is -inf; such rows, rare in practice, take a second pass shifted
// by the row's max (its exp_shift: 0 if the row is all -inf).
template <typename scalar_t, int M, bool HasW>
inline void row_stats(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                      typename AccOf<scalar_t>::type& ref, typename AccOf<scalar_t>::type& lse,
                      typename AccOf<scalar_t>::type& a_out, typename AccOf<scalar_t>::type& s_out) {
  using acc_t = typename AccOf<scalar_t>::type;
  acc_t s, m;
  ref = static_cast<acc_t>(x[0]);
  row_pass<scalar_t, M, HasW>(cx, x, t, ref, s, m, a_out, s_out);
  if (!(m - ref <= kShiftSlack<acc_t>)) {
    ref = exp_shift(m);
    row_pass<scalar_t, M, HasW>(cx, x, t, ref, s, m, a_out, s_out);
  }
  lse = ref + std::log(s);
}

// Per-row loss and the row's weight in the mean's divisor.
template <typename scalar_t, int M, bool HasW>
inline void row_forward(const Ctx<scalar_t>& cx, int64_t r, const scalar_t* x, const scalar_t* t,
                        typename AccOf<scalar_t>::type& lse, typename AccOf<scalar_t>::type& loss,
                        typename AccOf<scalar_t>::type& wy, typename AccOf<scalar_t>::type& tsum) {
  using acc_t = typename AccOf<scalar_t>::type;
  if constexpr (M == kProb) {
    acc_t ref, a, q;
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
    acc_t ref, a, q;
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

// Most lanes of one unit of the lane layout (a multiple of every B).
constexpr int64_t kMaxLanes = 1024;

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
  // lanes per unit (the reduction's block): about 32 KiB of logits
  int64_t lanes = 32768 / std::max<int64_t>(1, p.classes * int64_t(sizeof(scalar_t)));
  lanes = std::clamp<int64_t>(lanes - lanes % B, B, kMaxLanes);
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

// One block of nl <= B lanes: lane k is row r0 + k, with its logit of class c at x[c * sC + k]
// (and its target probability at t[c * sC + k]). Writes the rows' lse (tsum; loss for
// Reduction::None) and adds the block's loss and divisor to vl and vw.
template <typename scalar_t, int M, bool HasW>
C10_ALWAYS_INLINE void lanes_block_forward(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                                int64_t sC, int64_t nl, int64_t r0,
                                Vectorized<typename AccOf<scalar_t>::type>& vl,
                                Vectorized<typename AccOf<scalar_t>::type>& vw) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const auto& p = cx.p;
  const int64_t C = cx.C;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const Vec vts(cx.t_scale), vtsh(cx.t_shift), vninf(ninf), vzero(0);
  const Vec slack(kShiftSlack<acc_t>);
  auto* lse_out = static_cast<acc_t*>(p.lse);
  auto* tsum_out = static_cast<acc_t*>(p.tsum);
  auto* loss_out = static_cast<scalar_t*>(p.loss);
  const bool none = p.reduction == Reduction::None;
  // One pass down the classes of B lanes, shifted by ref = each lane's first logit; a
  // second pass only if some lane needs it (see row_stats). Each load prefetches the
  // same class a few blocks ahead: the class rows are runs far apart in memory, too short
  // for the hardware prefetcher to pick up.
  Vec r0v, r1v, s0, s1, a0, a1, q0, q1;
  io::load(x, nl, r0v, r1v);
  for (int attempt = 0;; ++attempt) {
    // accumulators local to the loop body, so they stay in registers
    Vec lm0 = vninf, lm1 = vninf, ls0 = vzero, ls1 = vzero, la0 = vzero, la1 = vzero,
        lq0 = vzero, lq1 = vzero;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = c * sC;
      prefetch(x + at + kPrefetch);
      Vec v0, v1;
      io::load(x + at, nl, v0, v1);
      lm0 = at::vec::maximum(lm0, v0);
      lm1 = at::vec::maximum(lm1, v1);
      ls0 += vexp(v0 - r0v);
      ls1 += vexp(v1 - r1v);
      if constexpr (M != kPlain) {
        Vec f0(HasW ? cx.w[c] : acc_t(1)), f1 = f0;  // factor of (x - ref): w_c or w_c t'_c
        if constexpr (M == kProb) {
          prefetch(t + at + kPrefetch);
          Vec t0, t1;
          io::load(t + at, nl, t0, t1);
          f0 = f0 * at::vec::fmadd(t0, vts, vtsh);
          f1 = f1 * at::vec::fmadd(t1, vts, vtsh);
          lq0 += f0;
          lq1 += f1;
        }
        la0 = at::vec::fmadd(f0, v0 - r0v, la0);
        la1 = at::vec::fmadd(f1, v1 - r1v, la1);
      }
    }
    s0 = ls0, s1 = ls1, a0 = la0, a1 = la1, q0 = lq0, q1 = lq1;
    if (attempt == 1) break;
    const Vec ok0 = (lm0 - r0v) <= slack, ok1 = (lm1 - r1v) <= slack;  // false for NaN too
    if ((ok0.zero_mask() | ok1.zero_mask()) == 0) break;
    r0v = Vec::blendv(Vec::blendv(lm0, vzero, lm0 == vninf), r0v, ok0);
    r1v = Vec::blendv(Vec::blendv(lm1, vzero, lm1 == vninf), r1v, ok1);
  }
  Vec lse0 = r0v + s0.log(), lse1 = r1v + s1.log();
  Vec l0, l1, wy0(1), wy1(1);
  if constexpr (M == kProb) {
    l0 = q0 * (lse0 - r0v) - a0;
    l1 = q1 * (lse1 - r1v) - a1;
    store_acc(tsum_out + r0, nl, q0, q1);
  } else {
    // per lane: the target's weight and logit; ignored lanes (and the tail) are masked
    acc_t wy[B], xy[B], kp[B];
    for (int64_t k = 0; k < nl; ++k) {
      const int64_t yv = cx.checked_target(r0 + k);
      wy[k] = yv < 0 ? acc_t(0) : HasW ? cx.w[yv] : acc_t(1);
      xy[k] = yv < 0 ? acc_t(0) : static_cast<acc_t>(x[yv * sC + k]);
      kp[k] = yv < 0 ? acc_t(0) : acc_t(1);
    }
    Vec xy0, xy1, kp0, kp1;
    load_acc(wy, nl, wy0, wy1);
    load_acc(xy, nl, xy0, xy1);
    load_acc(kp, nl, kp0, kp1);
    if constexpr (M == kSmooth) {
      const Vec ks(acc_t(1) - cx.smooth), kt(cx.t_shift), kw(cx.w_sum);
      l0 = ks * wy0 * (lse0 - xy0) + kt * (kw * (lse0 - r0v) - a0);
      l1 = ks * wy1 * (lse1 - xy1) + kt * (kw * (lse1 - r1v) - a1);
    } else {
      l0 = wy0 * (lse0 - xy0);
      l1 = wy1 * (lse1 - xy1);
    }
    const Vec keep0 = kp0 != vzero, keep1 = kp1 != vzero;
    lse0 = Vec::blendv(vzero, lse0, keep0);
    lse1 = Vec::blendv(vzero, lse1, keep1);
    l0 = Vec::blendv(vzero, l0, keep0);
    l1 = Vec::blendv(vzero, l1, keep1);
  }
  store_acc(lse_out + r0, nl, lse0, lse1);
  if (none) {
    io::store(loss_out + r0, nl, l0, l1);
  } else {
    keep_valid(nl, vzero, l0, l1);
    keep_valid(nl, vzero, wy0, wy1);
    vl = vl + l0 + l1;
    vw = vw + wy0 + wy1;
  }
}

// The forward drivers of the lane code: `unit_body(unit, vl, vw)` adds one work unit's loss and
// divisor to vl, vw; units run in parallel, and their partial sums are added in unit order.
template <typename scalar_t, typename F>
void forward_units(const Ctx<scalar_t>& cx, int64_t count, F&& unit_body) {
  using acc_t = typename AccOf<scalar_t>::type;
  std::vector<double> part_loss(count, 0.0), part_w(count, 0.0);
  at::parallel_for(0, count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      Vectorized<acc_t> vl(0), vw(0);
      unit_body(unit, vl, vw);
      part_loss[unit] = hsum(vl);
      part_w[unit] = hsum(vw);
    }
  });
  finish_forward<scalar_t, acc_t>(cx.p, part_loss, part_w);
}

template <typename scalar_t, int M, bool HasW>
void forward_lanes(const Ctx<scalar_t>& cx) {
  constexpr int64_t B = IO<scalar_t>::B;
  const auto& p = cx.p;
  const Units u = lane_units<scalar_t>(p);
  forward_units(cx, u.count, [&](int64_t unit, auto& vl, auto& vw) {
    const int64_t o = unit / u.per_outer;
    const int64_t i_begin = (unit % u.per_outer) * u.rows;
    const int64_t i_end = std::min(p.inner, i_begin + u.rows);
    const int64_t off = cx.offset(o, i_begin);
    for (int64_t j = 0; j < i_end - i_begin; j += B) {
      lanes_block_forward<scalar_t, M, HasW>(
          cx, cx.x + off + j, M == kProb ? cx.t + off + j : nullptr, p.stride_class,
          std::min(B, i_end - i_begin - j), o * p.inner + i_begin + j, vl, vw);
    }
  });
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
  const acc_t g_all = p.reduction == Reduction::None ? acc_t(0) : scalar_grad<scalar_t>(p);
  const Vec vts(cx.t_scale), vtsh(cx.t_shift);
  auto* gi = static_cast<scalar_t*>(p.grad_input);
  const Units u = row_units(p);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b * u.rows; r < std::min(rows, e * u.rows); ++r) {
      const int64_t off = cx.offset(r / p.inner, r % p.inner);
      const scalar_t* x = cx.x + off;
      const scalar_t* t = M == kProb ? cx.t + off : nullptr;
      scalar_t* gr = gi + cx.grad_offset(r / p.inner, r % p.inner);
      const auto rc = row_coef<scalar_t, M, HasW>(cx, r, g_all);
      if (rc.zero) {
        std::fill(gr, gr + C, scalar_t(0));
        continue;
      }
      const Vec vlse(rc.lse), vcp(rc.cp), vcw(rc.cw);
      for_blocks<B>(C, [&](int64_t k, int64_t cnt, auto full) {
        Vec v0, v1;
        if constexpr (decltype(full)::value) {
          io::load(x + k, v0, v1);
        } else {
          io::load(x + k, cnt, v0, v1);
        }
        Vec g0 = vcp * vexp(v0 - vlse), g1 = vcp * vexp(v1 - vlse);
        if constexpr (M == kSmooth || M == kProb) {
          Vec w0(1), w1(1);
          if constexpr (HasW) load_acc(cx.w + k, cnt, w0, w1);
          if constexpr (M == kProb) {
            Vec t0, t1;
            if constexpr (decltype(full)::value) {
              io::load(t + k, t0, t1);
            } else {
              io::load(t + k, cnt, t0, t1);
            }
            w0 = w0 * at::vec::fmadd(t0, vts, vtsh);
            w1 = w1 * at::vec::fmadd(t1, vts, vtsh);
          }
          g0 = g0 - vcw * w0;
          g1 = g1 - vcw * w1;
        }
        if constexpr (decltype(full)::value) {
          io::store(gr + k, g0, g1);
        } else {
          io::store(gr + k, cnt, g0, g1);
        }
      });
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

// The gradient of one block of nl <= B lanes laid out as for lanes_block_forward, written to
// g[c * sC + k].
template <typename scalar_t, int M, bool HasW>
C10_ALWAYS_INLINE void lanes_block_backward(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                                 scalar_t* g, int64_t sC, int64_t nl, int64_t r0,
                                 typename AccOf<scalar_t>::type g_all) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const auto& p = cx.p;
  const int64_t C = cx.C;
  const Vec vts(cx.t_scale), vtsh(cx.t_shift);
  const bool none = p.reduction == Reduction::None;
  // Per-lane coefficients (see row_coef). An ignored lane gets lse = +inf and zero
  // coefficients, so its gradient is 0 * exp(x - inf) = 0 (NaN for a NaN logit, as in
  // PyTorch's log_softmax backward).
  Vec g0v(g_all), g1v(g_all);
  if (none) io::load(static_cast<const scalar_t*>(p.grad_loss) + r0, nl, g0v, g1v);
  Vec lse0, lse1;
  load_acc(static_cast<const acc_t*>(p.lse) + r0, nl, lse0, lse1);
  Vec cp0, cp1, cw0(0), cw1(0), gy0(0), gy1(0), y0(-1), y1(-1);
  if constexpr (M == kProb) {
    Vec q0, q1;
    load_acc(static_cast<const acc_t*>(p.tsum) + r0, nl, q0, q1);
    cp0 = g0v * q0;
    cp1 = g1v * q1;
    cw0 = g0v;
    cw1 = g1v;
  } else {
    acc_t wy[B], yk[B];
    for (int64_t k = 0; k < nl; ++k) {
      const int64_t yv = cx.checked_target(r0 + k);
      wy[k] = yv < 0 ? acc_t(0) : HasW ? cx.w[yv] : acc_t(1);
      yk[k] = static_cast<acc_t>(yv);  // -1 for ignored lanes
    }
    Vec wy0, wy1;
    load_acc(wy, nl, wy0, wy1);
    load_acc(yk, nl, y0, y1);
    const Vec ks(acc_t(1) - cx.smooth), inf(std::numeric_limits<acc_t>::infinity()), zero(0);
    const Vec keep0 = y0 >= zero, keep1 = y1 >= zero;
    lse0 = Vec::blendv(inf, lse0, keep0);
    lse1 = Vec::blendv(inf, lse1, keep1);
    // blended, not multiplied, to zero: g may be inf (a mean over nothing but ignored rows)
    gy0 = Vec::blendv(zero, g0v * ks * wy0, keep0);
    gy1 = Vec::blendv(zero, g1v * ks * wy1, keep1);
    if constexpr (M == kSmooth) {
      const Vec kt(cx.t_shift), kw(cx.t_shift * cx.w_sum);
      cp0 = Vec::blendv(zero, gy0 + g0v * kw, keep0);
      cp1 = Vec::blendv(zero, gy1 + g1v * kw, keep1);
      cw0 = Vec::blendv(zero, g0v * kt, keep0);
      cw1 = Vec::blendv(zero, g1v * kt, keep1);
    } else {
      cp0 = gy0;
      cp1 = gy1;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = c * sC;
    prefetch(x + at + kPrefetch);
    prefetch_write(g + at + kPrefetch);
    Vec v0, v1;
    io::load(x + at, nl, v0, v1);
    Vec g0 = cp0 * vexp(v0 - lse0), g1 = cp1 * vexp(v1 - lse1);
    if constexpr (M == kSmooth || M == kProb) {
      Vec w0(HasW ? cx.w[c] : acc_t(1)), w1 = w0;
      if constexpr (M == kProb) {
        prefetch(t + at + kPrefetch);
        Vec t0, t1;
        io::load(t + at, nl, t0, t1);
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
    }
    io::store(g + at, nl, g0, g1);
  }
}

template <typename scalar_t, int M, bool HasW>
void backward_lanes(const Ctx<scalar_t>& cx) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int64_t B = IO<scalar_t>::B;
  const auto& p = cx.p;
  const acc_t g_all = p.reduction == Reduction::None ? acc_t(0) : scalar_grad<scalar_t>(p);
  auto* gi = static_cast<scalar_t*>(p.grad_input);
  const Units u = lane_units<scalar_t>(p);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      const int64_t o = unit / u.per_outer;
      const int64_t i_begin = (unit % u.per_outer) * u.rows;
      const int64_t i_end = std::min(p.inner, i_begin + u.rows);
      const int64_t off = cx.offset(o, i_begin);
      for (int64_t j = 0; j < i_end - i_begin; j += B) {
        lanes_block_backward<scalar_t, M, HasW>(
            cx, cx.x + off + j, M == kProb ? cx.t + off + j : nullptr, gi + off + j,
            p.stride_class, std::min(B, i_end - i_begin - j), o * p.inner + i_begin + j, g_all);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Class-contiguous rows with few classes (a classifier with 10 classes, channels-last
// segmentation): vectorizing along a row of 19 would spend more on per-row horizontal work than
// on the row. Blocks of B rows are transposed into a small (C x B) tile on the stack and go
// through the lane-layout code, one lane per row.

constexpr int64_t kSmallClasses = 64;

template <typename scalar_t>
inline Units small_row_units(const CrossEntropyParams& p) {
  constexpr int64_t B = IO<scalar_t>::B;
  const int64_t rows = p.outer * p.inner;
  int64_t per = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.classes));
  per = (per + B - 1) / B * B;
  return {(rows + per - 1) / per, per, 0};
}

// Offsets of the rows r0 .. r0 + nl - 1 (one division for the block, not one per row).
template <typename scalar_t>
inline void row_offsets(const Ctx<scalar_t>& cx, int64_t r0, int64_t nl, int64_t* off) {
  int64_t o = r0 / cx.p.inner, i = r0 % cx.p.inner;
  for (int64_t k = 0; k < nl; ++k) {
    off[k] = cx.offset(o, i);
    if (++i == cx.p.inner) {
      i = 0;
      ++o;
    }
  }
}

template <typename scalar_t>
inline void gather_tile(const Ctx<scalar_t>& cx, const scalar_t* src, const int64_t* off,
                        int64_t nl, scalar_t* tile) {
  constexpr int64_t B = IO<scalar_t>::B;
  for (int64_t k = 0; k < nl; ++k) {
    const scalar_t* row = src + off[k];
    for (int64_t c = 0; c < cx.C; ++c) tile[c * B + k] = row[c];
  }
}

// Rows r0 .. r0 + nl - 1 into (C x B) tiles: their offsets, logits and (Prob) target rows.
template <typename scalar_t, bool Prob>
inline void load_row_tile(const Ctx<scalar_t>& cx, int64_t r0, int64_t nl, int64_t* off,
                          scalar_t* xt, scalar_t* tt) {
  row_offsets(cx, r0, nl, off);
  gather_tile(cx, cx.x, off, nl, xt);
  if constexpr (Prob) gather_tile(cx, cx.t, off, nl, tt);
}

template <typename scalar_t, int M, bool HasW>
void forward_small_rows(const Ctx<scalar_t>& cx) {
  constexpr int64_t B = IO<scalar_t>::B;
  const auto& p = cx.p;
  const Units u = small_row_units<scalar_t>(p);
  const int64_t rows = p.outer * p.inner;
  forward_units(cx, u.count, [&](int64_t unit, auto& vl, auto& vw) {
    alignas(64) scalar_t xt[kSmallClasses * B], tt[M == kProb ? kSmallClasses * B : 1];
    const int64_t r_end = std::min(rows, (unit + 1) * u.rows);
    for (int64_t r0 = unit * u.rows; r0 < r_end; r0 += B) {
      const int64_t nl = std::min(B, r_end - r0);
      int64_t off[B];
      load_row_tile<scalar_t, M == kProb>(cx, r0, nl, off, xt, tt);
      lanes_block_forward<scalar_t, M, HasW>(cx, xt, tt, B, nl, r0, vl, vw);
    }
  });
}

template <typename scalar_t, int M, bool HasW>
void backward_small_rows(const Ctx<scalar_t>& cx) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int64_t B = IO<scalar_t>::B;
  const auto& p = cx.p;
  const Units u = small_row_units<scalar_t>(p);
  const int64_t rows = p.outer * p.inner;
  const acc_t g_all = p.reduction == Reduction::None ? acc_t(0) : scalar_grad<scalar_t>(p);
  auto* gi = static_cast<scalar_t*>(p.grad_input);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    alignas(64) scalar_t xt[kSmallClasses * B], gt[kSmallClasses * B],
        tt[M == kProb ? kSmallClasses * B : 1];
    for (int64_t unit = b; unit < e; ++unit) {
      const int64_t r_end = std::min(rows, (unit + 1) * u.rows);
      for (int64_t r0 = unit * u.rows; r0 < r_end; r0 += B) {
        const int64_t nl = std::min(B, r_end - r0);
        int64_t off[B];
        load_row_tile<scalar_t, M == kProb>(cx, r0, nl, off, xt, tt);
        lanes_block_backward<scalar_t, M, HasW>(cx, xt, tt, gt, B, nl, r0, g_all);
        for (int64_t k = 0; k < nl; ++k) {
          scalar_t* row = gi + off[k] + (r0 + k) / p.inner * (p.grad_stride_outer - p.stride_outer);
          for (int64_t c = 0; c < cx.C; ++c) row[c] = gt[c * B + k];
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
    const Units u = row_units(p);
    at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b * u.rows; r < std::min(rows, e * u.rows); ++r) {
        const int64_t off = cx.offset(r / p.inner, r % p.inner);
        const acc_t k0 = coef(r), lse = lse_in[r];
        const Vec vk(k0), vlse(lse);
        for_blocks<B>(C, [&](int64_t k, int64_t cnt, auto full) {
          Vec v0, v1;
          if constexpr (decltype(full)::value) {
            io::load(cx.x + off + k, v0, v1);
          } else {
            io::load(cx.x + off + k, cnt, v0, v1);
          }
          Vec g0 = vk * (v0 - vlse), g1 = vk * (v1 - vlse);
          if constexpr (HasW) {
            Vec w0, w1;
            load_acc(cx.w + k, cnt, w0, w1);
            g0 = g0 * w0;
            g1 = g1 * w1;
          }
          if constexpr (decltype(full)::value) {
            io::store(gt + off + k, g0, g1);
          } else {
            io::store(gt + off + k, cnt, g0, g1);
          }
        });
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
          prefetch(cx.x + base + c * sC + u.rows);
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

// Which kernels read the layout: rows along contiguous classes, few-class rows through
// transposed tiles, or lanes along the contiguous spatial axis.
enum class Path { kRows, kSmallRows, kLanes };

inline Path path_of(const CrossEntropyParams& p) {
  if (p.stride_class != 1) return Path::kLanes;
  return p.classes <= kSmallClasses ? Path::kSmallRows : Path::kRows;
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
      constexpr int M = decltype(mode)::value;
      constexpr bool HasW = decltype(has_w)::value;
      switch (path_of(p)) {
        case Path::kSmallRows: return forward_small_rows<scalar_t, M, HasW>(cx);
        case Path::kRows: return forward_rows<scalar_t, M, HasW>(cx);
        case Path::kLanes: return forward_lanes<scalar_t, M, HasW>(cx);
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
      constexpr int M = decltype(mode)::value;
      constexpr bool HasW = decltype(has_w)::value;
      switch (path_of(p)) {
        case Path::kSmallRows: return backward_small_rows<scalar_t, M, HasW>(cx);
        case Path::kRows: return backward_rows<scalar_t, M, HasW>(cx);
        case Path::kLanes: return backward_lanes<scalar_t, M, HasW>(cx);
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
