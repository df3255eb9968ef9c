// The pieces every path of the CPU cross-entropy shares: the context of one call, the row
// statistics' finish, the work units and the deterministic reduction, the upstream gradient.
// Part of cross_entropy_kernel.h (see there); included by it only.
//
// Math, per row r with logits x, class weights w (1 when absent), C classes, smoothing s:
//   lse    = log sum_c exp(x_c) = sh + L, sh = max_c x_c, L = log sum_c exp(x_c - sh)
//            (sh and L saved for the backward, in acc precision, in two planes of p.lse)
//   index target y:
//     loss = (1 - s) w_y ((sh - x_y) + L) + (s / C) (W L - sum_c w_c (x_c - sh))
//     dloss/dx_k = (1 - s) w_y (p_k - [k == y]) + (s / C) (W p_k - w_k),  p = softmax(x), W = sum w
//   probability target t, with t'_c = (1 - s) t_c + s / C and S = sum_c w_c t'_c:
//     loss = S L - sum_c w_c t'_c (x_c - sh)
//     dloss/dx_k = S p_k - w_k t'_k,        dloss/dt_k = -(1 - s) w_k ((x_k - sh) - L)
//   the focal loss (gamma > 0): each class term's nll_c = L - (x_c - sh) times
//   m_c = (1 - p_c)^gamma, so d(m_c nll_c)/dnll_c = s_c (focal_grad_factor); index targets:
//     loss = w_y m_y nll_y,  dloss/dx_k = w_y s_y (p_k - [k == y])
//   with probabilities or smoothing, f_c = w_c t'_c (t' the smoothed one-hot for indices):
//     loss = sum_c f_c m_c nll_c,  dloss/dx_k = Q p_k - f_k s_k,  Q = sum_c f_c s_c,
//     dloss/dt_k = (1 - s) w_k m_k nll_k
//   which needs lse before the class terms: one more pass over the row forward (from cache or
//   the lane tile), Q saved for the backward's single pass (params.h: focal_gamma)
// The forward reads a row twice (the second time from cache, or from a tile for the lane
// layout): its max, then one exp per logit shifted by it, as PyTorch's log_softmax. Everything is
// taken relative to the max, never through lse itself: exp's arguments are <= 0, the weighted
// sums add terms of one sign, and the backward's p_k = exp((x_k - sh) - L) does not inherit lse's
// rounding (which at |lse| ~ 10 would cost p_k 10 ulp). Per-row losses and backward coefficients
// are formed in double where that is per row (rows of more than kSmallClasses classes) and the
// target's p_y - 1 through expm1 there; the lane code rounds them in acc and fuses cp p - g w_y
// into one FMA. With vexp's 0.9 ulp the float32 results are as close to float64 as PyTorch's own
// (tests/exactness.py). The backward writes each gradient element once.
//
// Layouts (path_of): class-contiguous rows are vectorized along the classes; rows of at most
// kSmallClasses classes are transposed B at a time into a small tile and take the lane code;
// otherwise the glue guarantees stride_inner == 1 and lanes run along the contiguous spatial axis,
// reading (N, C, d...) in place. Reductions go through fixed blocks of rows whose partial sums are
// added in block order: the same bits for any thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

// Class indices, with label smoothing, or probabilities: stored as the logits (kProb) or as acc
// beside 16-bit logits (kProbAcc, mixed precision: params.h target_dtype).
enum Mode : int { kPlain = 0, kSmooth = 1, kProb = 2, kProbAcc = 3 };
constexpr bool is_prob(int M) { return M >= kProb; }
template <typename scalar_t, int M>
using Target = std::conditional_t<M == kProbAcc, typename AccOf<scalar_t>::type, scalar_t>;

template <typename scalar_t>
struct Ctx {
  using acc_t = typename AccOf<scalar_t>::type;
  const CrossEntropyParams& p;
  const scalar_t* x;
  const void* t;                // probability targets (Target<scalar_t, M>)
  const acc_t* w;               // the shard's weights (all of them unsharded), or nullptr
  const acc_t* w_full;          // the full weight (total_classes), or nullptr
  bool loss_acc;                // the loss and grad_loss stored as acc (params.h: loss_dtype)
  double w_sum;                 // sum of all total_classes weights (total_classes without
                                // weight), in double: a float sum of 128k weights of thousands
                                // cost the smoothed loss 12x PyTorch's error
  acc_t t_scale, t_shift;       // t' = t * t_scale + t_shift = (1 - s) t + s / C (loss_math.h)
  // (a smoothed row's sum a = sum_c (s / C) w_c (x_c - sh) takes t_shift in each term: unscaled,
  // terms near the float maximum overflowed where the loss is finite)
  int64_t C;                    // classes of the logits (of the shard)
  int64_t C_total;              // classes of the unsharded problem (C unsharded)
  acc_t cap;                    // softcap (params.h), 0 when off
  const acc_t* adj;             // the logit adjustment (params.h), nullptr when off (and then
                                // also when softcap is on: never both)
  double z;                     // z-loss (params.h), 0 when off
  double gamma;                 // the softmax focal loss's gamma (params.h), 0 when off

  explicit Ctx(const CrossEntropyParams& prm, std::vector<acc_t>& w_buf) : p(prm) {
    x = static_cast<const scalar_t*>(p.input);
    t = p.target;
    loss_acc = stored_as_acc<scalar_t>(p.loss_dtype, p.dtype);
    C = p.classes;
    C_total = p.total_classes;
    cap = p.softcap > 0 ? static_cast<acc_t>(p.softcap) : acc_t(0);
    adj = static_cast<const acc_t*>(p.logit_adjust);
    z = p.z_loss > 0 ? p.z_loss : 0.0;
    gamma = p.focal_gamma > 0 ? p.focal_gamma : 0.0;
    t_scale = static_cast<acc_t>(math::smoothing_scale(p.label_smoothing));
    t_shift = static_cast<acc_t>(math::smoothing_shift(p.label_smoothing, C_total));
    w = nullptr;
    w_full = static_cast<const acc_t*>(p.weight);
    w_sum = static_cast<double>(C_total);
    if (w_full != nullptr) {
      w_buf.resize(C);
      double s = 0;
      for (int64_t c = 0; c < C_total; ++c) {
        const acc_t v = w_full[c];
        if (c >= p.class_offset && c < p.class_offset + C) w_buf[c - p.class_offset] = v;
        s += v;
      }
      w = w_buf.data();
      w_sum = s;
    }
  }
  inline int64_t offset(int64_t o, int64_t i) const {
    return o * p.stride_outer + i * p.stride_inner;
  }
  // the probability targets from element `off` on (mode M's storage type), or nullptr for
  // class indices
  template <int M>
  inline const Target<scalar_t, M>* target(int64_t off) const {
    if constexpr (is_prob(M)) return static_cast<const Target<scalar_t, M>*>(t) + off;
    return nullptr;
  }
  // row r's loss (Reduction::None), and its upstream gradient
  inline void store_loss(int64_t r, double v) const { store_value<scalar_t>(p.loss, loss_acc, r, v); }
  inline double grad_loss(int64_t r) const { return load_value<scalar_t>(p.grad_loss, loss_acc, r); }
  // where row (o, i) of the logits' gradient starts (its row stride may differ: params.h)
  inline int64_t grad_offset(int64_t o, int64_t i) const {
    return o * p.grad_stride_outer + i * p.stride_inner;
  }
  // row r's global class index, -1 when ignored; out of [0, total_classes) is an error
  C10_ALWAYS_INLINE int64_t checked_target(int64_t r) const {
    const int64_t v = target_value(p.target, p.target_type, r);
    if (v == p.ignore_index) return -1;
    TORCH_CHECK_INDEX(v >= 0 && v < C_total, "Target ", v, " is out of bounds.");
    return v;
  }
  // softcap: the logit the loss sees, cap tanh(x / cap) (x when off), right after each load
  C10_ALWAYS_INLINE acc_t capped(acc_t v) const {
    return math::loss_logit(v, cap, static_cast<const acc_t*>(nullptr), 0);
  }
  C10_ALWAYS_INLINE void capped(Vectorized<acc_t>& v0, Vectorized<acc_t>& v1) const {
    if (cap > 0) {
      const Vectorized<acc_t> k(cap);
      v0 = k * (v0 / k).tanh();
      v1 = k * (v1 / k).tanh();
    }
  }
  // The logit the loss sees, right after each load: capped, or adjusted (the two are never on
  // together; loss_math.h): class c's scalar, a vector of lanes of class c, a block of cnt <= B
  // classes from c.
  C10_ALWAYS_INLINE acc_t logit(acc_t v, int64_t c) const {
    return math::loss_logit(v, cap, adj, c);
  }
  C10_ALWAYS_INLINE void lane_logits(Vectorized<acc_t>& v, int64_t c) const {
    if (adj != nullptr) {
      v = v + Vectorized<acc_t>(adj[c]);
    } else if (cap > 0) {
      const Vectorized<acc_t> k(cap);
      v = k * (v / k).tanh();
    }
  }
  C10_ALWAYS_INLINE void logits(Vectorized<acc_t>& v0, Vectorized<acc_t>& v1, int64_t c,
                                int64_t cnt) const {
    if (adj != nullptr) {
      Vectorized<acc_t> a0, a1;
      load_acc(adj + c, cnt, a0, a1);
      v0 = v0 + a0;
      v1 = v1 + a1;
    } else {
      capped(v0, v1);
    }
  }
  // the chain rule through the softcap, from the capped logits c: g *= 1 - (c / cap)^2
  C10_ALWAYS_INLINE void cap_slope(const Vectorized<acc_t>& c0, const Vectorized<acc_t>& c1,
                                   Vectorized<acc_t>& g0, Vectorized<acc_t>& g1) const {
    if (cap > 0) {
      const Vectorized<acc_t> k(cap), one(1);
      const Vectorized<acc_t> u0 = c0 / k, u1 = c1 / k;
      g0 = g0 * (one - u0 * u0);
      g1 = g1 * (one - u1 * u1);
    }
  }
  C10_ALWAYS_INLINE double cap_slope(double c) const {
    return math::softcap_slope(c, static_cast<double>(cap));
  }
  // The focal loss (gamma > 0) saves one more value per row for its backward: class indices
  // their s_y (the gradient's factor), soft targets Q = sum_c f_c s_c (cross_entropy_focal.h),
  // probabilities in p.tsum, indices (plain or smoothed) in a third plane of p.lse.
  template <int M>
  C10_ALWAYS_INLINE acc_t* focal_plane() const {
    if constexpr (is_prob(M)) return static_cast<acc_t*>(p.tsum);
    return static_cast<acc_t*>(p.lse) + 2 * p.outer * p.inner;
  }
  template <int M>
  C10_ALWAYS_INLINE bool soft_focal() const {
    return M != kPlain && gamma > 0;
  }
  // the weight of global class y (1 without weight)
  C10_ALWAYS_INLINE double target_weight(int64_t y) const {
    return w_full != nullptr ? static_cast<double>(w_full[y]) : 1.0;
  }
};

// ---------------------------------------------------------------------------------------------
// Forward, class-contiguous rows.


// The lane layout reads the classes of a block of lanes as short runs far apart in memory, too
// short for the hardware prefetcher to train on: each load asks for the same class further along.
inline void prefetch(const void* p) {
  __builtin_prefetch(p, 0, 2);
}
inline void prefetch_write(void* p) {
  __builtin_prefetch(p, 1, 3);
}
constexpr int64_t kPrefetch = 256;  // elements ahead along a class row

// Every cache line of a block of B elements from p (two for float32 and float64: one prefetch
// would leave the block's second line to a demand miss).
template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_block(const scalar_t* p) {
  constexpr int64_t bytes = IO<scalar_t>::B * int64_t(sizeof(scalar_t));
  for (int64_t k = 0; k < bytes; k += 64) prefetch(reinterpret_cast<const char*>(p) + k);
}
template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_write_block(scalar_t* p) {
  constexpr int64_t bytes = IO<scalar_t>::B * int64_t(sizeof(scalar_t));
  for (int64_t k = 0; k < bytes; k += 64) prefetch_write(reinterpret_cast<char*>(p) + k);
}

// The log-sum of a row from its max m and e = sum_c exp(x_c - m): L = log e. The shift saved
// beside L is m, or 0 for a row that is -inf throughout; such a row, and one holding NaN or +inf,
// gets L = NaN: its loss and gradient are NaN, as PyTorch's (its log_softmax is NaN).
template <typename acc_t>
inline void finish_lse(acc_t m, double e, acc_t& sh, double& L) {
  sh = exp_shift(m);
  if (m - m != acc_t(0)) {  // NaN, +inf, or -inf throughout
    L = std::numeric_limits<double>::quiet_NaN();
  } else {
    L = std::log(e);  // in double
  }
}

// The same for B lanes at once (the lane layout: a row per lane), in acc precision: a scalar
// log in double per row of 19 classes would cost as much as the row's exps.
template <typename acc_t>
inline void finish_lse(const Vectorized<acc_t>& m, const Vectorized<acc_t>& e,
                       Vectorized<acc_t>& L) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(0);
  L = Vec::blendv(e.log(), Vec(std::numeric_limits<acc_t>::quiet_NaN()), (m - m) != zero);
}

// The shift and log-sum saved for an ignored row: (0, +inf), so that its gradient is
// 0 * exp(x - inf) = 0; (0, NaN) when the row holds a NaN or +inf or is -inf throughout, where
// PyTorch's log_softmax gives NaN and so does its gradient (0 * NaN).
template <typename acc_t>
inline acc_t ignored_lse(acc_t m) {
  return m - m == acc_t(0) ? std::numeric_limits<acc_t>::infinity()
                           : std::numeric_limits<acc_t>::quiet_NaN();
}
template <typename acc_t>
inline Vectorized<acc_t> ignored_lse(const Vectorized<acc_t>& m) {
  using Vec = Vectorized<acc_t>;
  return Vec::blendv(Vec(std::numeric_limits<acc_t>::quiet_NaN()),
                     Vec(std::numeric_limits<acc_t>::infinity()), (m - m) == Vec(0));
}

// Logits [k, k + cnt) of a class-contiguous row (a full block of B when Full), read as the loss
// sees them (softcap, logit adjustment); x points at class k.
template <bool Full, typename scalar_t>
C10_ALWAYS_INLINE void load_block(const Ctx<scalar_t>& cx, const scalar_t* x, int64_t k,
                                  int64_t cnt, Vectorized<typename AccOf<scalar_t>::type>& v0,
                                  Vectorized<typename AccOf<scalar_t>::type>& v1) {
  if constexpr (Full) {
    IO<scalar_t>::load(x, v0, v1);
  } else {
    IO<scalar_t>::load(x, cnt, v0, v1);
  }
  cx.logits(v0, v1, k, cnt);
}

// The max of a row, NaN if it holds one.
template <typename scalar_t>
inline typename AccOf<scalar_t>::type row_max(const Ctx<scalar_t>& cx, const scalar_t* x) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  const Vec vninf(-std::numeric_limits<acc_t>::infinity());
  Vec m0 = vninf, m1 = vninf;
  for_blocks<io::B>(cx.C, [&](int64_t k, int64_t cnt, auto full) {
    Vec v0, v1;
    if constexpr (decltype(full)::value) {
      io::load(x + k, v0, v1);
      cx.logits(v0, v1, k, cnt);
    } else {
      io::load(x + k, cnt, v0, v1);
      cx.logits(v0, v1, k, cnt);
      keep_valid(cnt, vninf, v0, v1);
    }
    m0 = at::vec::maximum(m0, v0);
    m1 = at::vec::maximum(m1, v1);
  });
  return hmax(at::vec::maximum(m0, m1));
}


// The factor of class c's term in a block of cnt <= B classes from c: w_c (1 without weight),
// times t'_c = (1 - s) t_c + s / C with kProb; 0 past cnt.
template <typename scalar_t, int M, bool HasW, bool Full>
C10_ALWAYS_INLINE void class_factors(const Ctx<scalar_t>& cx, const Target<scalar_t, M>* t,
                                     int64_t c, int64_t cnt,
                                     Vectorized<typename AccOf<scalar_t>::type>& f0,
                                     Vectorized<typename AccOf<scalar_t>::type>& f1) {
  using tio = IO<Target<scalar_t, M>>;
  using Vec = typename IO<scalar_t>::Vec;
  f0 = f1 = Vec(1);
  if constexpr (HasW) load_acc(cx.w + c, cnt, f0, f1);
  if constexpr (is_prob(M)) {
    Vec t0, t1;
    if constexpr (Full) {
      tio::load(t + c, t0, t1);
    } else {
      tio::load(t + c, cnt, t0, t1);
    }
    const Vec vts(cx.t_scale), vtsh(cx.t_shift);
    f0 = f0 * at::vec::fmadd(t0, vts, vtsh);
    f1 = f1 * at::vec::fmadd(t1, vts, vtsh);
  }
  if constexpr (!Full) keep_valid(cnt, Vec(0), f0, f1);
}

// The z-loss of B lanes with log-sum-exp lse and weight wy: l += z wy lse^2.
template <typename scalar_t>
C10_ALWAYS_INLINE void add_z_loss(const Ctx<scalar_t>& cx,
                                  const Vectorized<typename AccOf<scalar_t>::type>& lse0,
                                  const Vectorized<typename AccOf<scalar_t>::type>& lse1,
                                  const Vectorized<typename AccOf<scalar_t>::type>& wy0,
                                  const Vectorized<typename AccOf<scalar_t>::type>& wy1,
                                  Vectorized<typename AccOf<scalar_t>::type>& l0,
                                  Vectorized<typename AccOf<scalar_t>::type>& l1) {
  const Vectorized<typename AccOf<scalar_t>::type> z(static_cast<typename AccOf<scalar_t>::type>(cx.z));
  l0 = l0 + z * wy0 * lse0 * lse0;
  l1 = l1 + z * wy1 * lse1 * lse1;
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

// The positions [begin, end) of outer index o that lane-layout unit `unit` covers.
struct LaneSpan {
  int64_t o, begin, end;
  LaneSpan(const CrossEntropyParams& p, const Units& u, int64_t unit)
      : o(unit / u.per_outer),
        begin((unit % u.per_outer) * u.rows),
        end(std::min(p.inner, begin + u.rows)) {}
};

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
  store_value<scalar_t>(p.loss, stored_as_acc<scalar_t>(p.loss_dtype, p.dtype), 0, out);
}


// The forward drivers of the lane code: `unit_body(unit, sl, sw)` adds one work unit's loss and
// divisor to sl, sw; units run in parallel, and their partial sums are added in unit order.
template <typename scalar_t, typename F>
void forward_units(const Ctx<scalar_t>& cx, int64_t count, F&& unit_body) {
  using acc_t = typename AccOf<scalar_t>::type;
  std::vector<double> part_loss(count, 0.0), part_w(count, 0.0);
  at::parallel_for(0, count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      double sl = 0, sw = 0;
      unit_body(unit, sl, sw);
      part_loss[unit] = sl;
      part_w[unit] = sw;
    }
  });
  finish_forward<scalar_t, acc_t>(cx.p, part_loss, part_w);
}


// ---------------------------------------------------------------------------------------------
// Backward. Per row the gradient is  g * (cp * p_k - cw * w_k * t'_k)  minus  g (1 - s) w_y at
// k == y for index targets, where g is the upstream gradient of the row's loss (already divided
// by the mean's divisor), cp the coefficient of the softmax and cw that of the weight term. The
// coefficients are computed in double and rounded once.

template <typename scalar_t>
inline double scalar_grad(const CrossEntropyParams& p) {
  using acc_t = typename AccOf<scalar_t>::type;
  const double g = load_value<scalar_t>(p.grad_loss, stored_as_acc<scalar_t>(p.loss_dtype, p.dtype), 0);
  if (p.reduction != Reduction::Mean) return g;
  const double denom = p.prob_target ? static_cast<double>(p.outer * p.inner)
                                     : static_cast<double>(*static_cast<const acc_t*>(p.total_weight));
  return g / denom;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
