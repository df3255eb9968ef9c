// The per-row arithmetic of the CUDA cross-entropy kernels, shared by every launch path. Math as
// in ../cpu/cross_entropy_kernel.h, per row r with logits x, class weights w (1 when absent),
// C classes, smoothing s, W = sum_c w_c:
//   lse = log sum_c exp(x_c) = sh + L, sh = max_c x_c, L = log sum_c exp(x_c - sh)
//                    (sh and L saved, acc precision: params.h)
//   index target y:  loss = (1 - s) w_y (lse - x_y) + (s / C) sum_c w_c (lse - x_c)
//                    dx_k = (1 - s) w_y (p_k - [k == y]) + (s / C) (W p_k - w_k)
//   probabilities t, t' = (1 - s) t + s / C, S = sum_c w_c t'_c:
//                    loss = S lse - sum_c w_c t'_c x_c,  dx_k = S p_k - w_k t'_k,
//                    dt_k = -(1 - s) w_k (x_k - lse)
// The softmax focal loss over soft targets (focal_gamma > 0 with probabilities or smoothing) puts
// each class's term through the focal factors m_c, s_c of nll_c = lse - x_c, which needs the
// row's lse first: a second pass over the row (focal_add) sums A = sum_c f_c m_c nll_c and
// Q = sum_c f_c s_c (f_c = class_term), the loss A (probabilities) or
// (1 - s) w_y m_y nll_y + (s / C) A (smoothing), the gradient Q p_k - f_k s_k (the target's
// term too); Q is saved as tsum (probabilities) or a third plane of lse (smoothing).
// Weighted sums of x are taken relative to ref = the row's first logit, so a large common offset
// does not cancel (0 when that logit is not finite: see shift_of); lse - x is taken as
// (sh - x) + L, never through a rounded lse. Ignored rows are read too: their gradient is NaN
// where PyTorch's log_softmax is (a NaN or +inf logit, or all -inf). An out-of-range class index
// (other than ignore_index) is never read through: it stops the kernel with a device-side
// assert, as PyTorch's CUDA kernels do.
#pragma once

#undef NDEBUG
#include <cassert>
#include <cfloat>
#include <type_traits>

#include "common.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

constexpr int kThreads = 256;
// Blocks per SM the register allocation must allow. Without the hint ptxas spilled a few bytes in
// some variants at 32-48 registers, aiming at a higher occupancy than these kernels need.
constexpr int kMinBlocks = 2;
// float64 kernels may take the registers they want (one block per SM): capped at 128,
// forward_rows_kernel<double, kProb, true, 8> spilled 12 bytes on sm_90 in some builds (ptxas's
// allocation varies with the anonymous namespace's generated name), and float64 is not where the
// speed matters.
template <typename T>
constexpr int kMinBlocksOf = sizeof(T) == 8 ? 1 : kMinBlocks;
// Class indices, with label smoothing, or probabilities: stored as the logits (kProb) or as float
// beside 16-bit logits (kProbAcc, mixed precision: params.h target_dtype).
enum Mode : int { kPlain = 0, kSmooth = 1, kProb = 2, kProbAcc = 3 };
__host__ __device__ constexpr bool is_prob(int M) { return M >= kProb; }
template <typename T, int M>
using TargetOf = std::conditional_t<M == kProbAcc, typename AccOf<T>::type, T>;

// Whether the loss and its gradient are stored as acc beside 16-bit logits (params.h: loss_dtype).
__device__ __forceinline__ bool loss_as_acc(const CrossEntropyParams& p) {
  return p.loss_dtype != p.dtype;
}

__device__ __forceinline__ float fast_exp(float v) { return __expf(v); }
__device__ __forceinline__ double fast_exp(double v) { return exp(v); }

// Online log-sum-exp state: s = sum exp(x - m) over what was seen, m its max (-inf: nothing yet).
template <typename acc_t>
struct Lse {
  acc_t m = -INFINITY, s = 0;
  __device__ __forceinline__ void add_max(acc_t mv) {  // raise the shift to mv
    if (mv > m) {
      s = (m == -INFINITY) ? s : s * fast_exp(m - mv);  // s is 0, or NaN, until m is finite
      m = mv;
    }
  }
  __device__ __forceinline__ void add(acc_t x) {  // after add_max covered x
    if (m != -INFINITY) s += fast_exp(x - m);
    else if (x != x) s = x;  // NaN in an all -inf row
  }
  __device__ __forceinline__ void merge(acc_t m2, acc_t s2) {
    const acc_t mm = m > m2 ? m : m2;
    if (mm == -INFINITY) {
      s = s + s2;  // 0 unless NaN
      return;
    }
    s = (m == -INFINITY ? s : s * fast_exp(m - mm)) + (m2 == -INFINITY ? s2 : s2 * fast_exp(m2 - mm));
    m = mm;
  }
  // the saved shift and log-sum (sh + L = lse): (0, -inf) for a row that is -inf throughout
  __device__ __forceinline__ acc_t shift() const { return m == -INFINITY ? acc_t(0) : m; }
  __device__ __forceinline__ acc_t log_sum() const { return m == -INFINITY ? m + s : log(s); }
  // what an ignored row saves as its log-sum: +inf (gradient 0 * exp(x - inf) = 0), NaN where
  // PyTorch's log_softmax of the row is NaN
  __device__ __forceinline__ acc_t ignored() const {
    return (m != -INFINITY && s == s) ? acc_t(INFINITY) : acc_t(NAN);
  }
};

// What a row's forward gathers besides the log-sum-exp: a = sum_c w_c t'_c (x_c - ref) and
// q = sum_c w_c t'_c (t' = 1 for kSmooth, so q = W, and a's terms times s / C: add_term).
// Label smoothing s as the kernels use it: t' = t * t_scale + t_shift = (1 - s) t + s / C.
template <typename acc_t>
struct Smoothing {
  acc_t s, t_scale, t_shift;
  // (1 - s and s / C from the double s, each rounded once: ../loss_math.h)
  __device__ __forceinline__ explicit Smoothing(const CrossEntropyParams& p)
      : s(p.label_smoothing > 0 ? static_cast<acc_t>(p.label_smoothing) : acc_t(0)),
        t_scale(static_cast<acc_t>(math::smoothing_scale(p.label_smoothing))),
        t_shift(static_cast<acc_t>(math::smoothing_shift(p.label_smoothing, p.total_classes))) {}
};

// w_c of class c of these logits (1 without weight), and w_c t'_c (t' = 1 without probability
// targets): class_term, or its two halves where one class's weight serves several rows.
template <bool HasW, typename acc_t>
__device__ __forceinline__ acc_t class_weight(const CrossEntropyParams& p, int64_t c) {
  return HasW ? static_cast<const acc_t*>(p.weight)[p.class_offset + c] : acc_t(1);
}
template <int M, typename acc_t>
__device__ __forceinline__ acc_t weighted_target(acc_t wc, acc_t t, const Smoothing<acc_t>& sm) {
  return is_prob(M) ? wc * (t * sm.t_scale + sm.t_shift) : wc;
}
template <typename T, int M, bool HasW>
__device__ __forceinline__ typename AccOf<T>::type class_term(
    const CrossEntropyParams& p, int64_t c, typename AccOf<T>::type t,
    const Smoothing<typename AccOf<T>::type>& sm) {
  using acc_t = typename AccOf<T>::type;
  return weighted_target<M>(class_weight<HasW, acc_t>(p, c), t, sm);
}

// The weighted sums a and q: a thread's share in acc (Sums<acc_t>), a row's in double once its
// threads' shares are added (Sums<double>: group_reduce, the split rows' merge): with weights of
// thousands, a tree of float partial sums cost the loss several ulp.
template <typename V>
struct Sums {
  V a = 0, q = 0;
  template <typename T, int M, bool HasW, typename acc_t>
  __device__ __forceinline__ void add(const CrossEntropyParams& p, int64_t c, acc_t x, acc_t t,
                                      acc_t ref, const Smoothing<acc_t>& smooth) {
    if constexpr (M != kPlain) {
      const acc_t tw = class_term<T, M, HasW>(p, c, t, smooth);
      add_term(M == kSmooth ? tw * smooth.t_shift : tw, tw, x, ref);
    }
  }
  // a class's term tw = w_c t'_c (weighted_target), its logit x; ta = tw, or with smoothing
  // tw s / C, a's factor: a smoothed row's a is scaled per term, so that a sum of terms near the
  // float maximum stays finite where the loss is (row_loss)
  template <typename acc_t>
  __device__ __forceinline__ void add_term(acc_t ta, acc_t tw, acc_t x, acc_t ref) {
    a += ta * (x - ref);
    q += tw;
  }
};

// The logit the loss sees (../loss_math.h: loss_logit): capped, softcap tanh(x / softcap) (x when
// off), or of (local) class c with the logit adjustment added (params.h: never both, cap_slope
// is 1 with the adjustment on); and the chain rule's factor from the capped logit c,
// 1 - (c / softcap)^2.
// (capped tests the double softcap as it stands in the params: converted first, it took one more
// register in the lanes kernels of 8 rows a thread, which then spilled at their cap of 128)
template <typename acc_t>
__device__ __forceinline__ acc_t capped(const CrossEntropyParams& p, acc_t x) {
  if (p.softcap <= 0) return x;
  return math::softcapped(x, static_cast<acc_t>(p.softcap));
}
template <typename acc_t>
__device__ __forceinline__ acc_t logit_of(const CrossEntropyParams& p, acc_t x, int64_t c) {
  return math::loss_logit(x, static_cast<acc_t>(p.softcap),
                          static_cast<const acc_t*>(p.logit_adjust), c);
}
template <typename acc_t>
__device__ __forceinline__ acc_t cap_slope(const CrossEntropyParams& p, acc_t c) {
  return math::softcap_slope(c, static_cast<acc_t>(p.softcap));
}

// The softmax focal loss's factors m = (1 - p)^gamma and s = d(m nll)/dnll (../loss_math.h: the
// CPU kernels' too) of a class from lp = log p and p (its fast exp), or of a row's target from
// nll = -log p_y alone.
template <typename acc_t>
__device__ __forceinline__ void focal_class_factors(acc_t gamma, acc_t lp, acc_t p, acc_t& m,
                                                    acc_t& s) {
  math::focal_factors<math::Scalar<acc_t>>(gamma, lp, p, math::one_minus_p(lp, p), m, s);
}
template <typename acc_t>
__device__ __forceinline__ void focal_factors(acc_t gamma, acc_t nll, acc_t& m, acc_t& s) {
  math::focal_factors(gamma, nll, m, s);
}

// The shift of a row's weighted sums: its first logit, or 0 when that is -inf (a masked class),
// +inf or NaN. Shifted by -inf, x - ref is NaN for every -inf logit, where PyTorch's loss is +inf
// (a -inf logit with w t' > 0) or NaN (w t' = 0); unshifted, the sums give exactly those.
template <typename acc_t>
__device__ __forceinline__ acc_t shift_of(acc_t x0) {
  return isfinite(x0) ? x0 : acc_t(0);
}

template <typename T>
__device__ __forceinline__ int64_t row_offset(const CrossEntropyParams& p, int64_t r) {
  const int64_t o = r / p.inner;
  return o * p.stride_outer + (r - o * p.inner) * p.stride_inner;
}

// Global class index of row r: -1 when ignored. Anything else out of [0, total_classes) stops
// the kernel.
__device__ __forceinline__ int64_t target_of(const CrossEntropyParams& p, int64_t r) {
  const int64_t y = target_value(p.target, p.target_type, r);
  if (y == p.ignore_index) return -1;
  assert(y >= 0 && y < p.total_classes && "Target is out of bounds");
  return (y >= 0 && y < p.total_classes) ? y : -1;
}

// The logit of global class y (>= 0) in the class-contiguous row at x: 0 when y is in another
// vocab-parallel shard.
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type target_logit(const CrossEntropyParams& p,
                                                                const T* x, int64_t y) {
  const int64_t k = y - p.class_offset;
  return (y >= 0 && k >= 0 && k < p.classes) ? logit_of(p, to_acc(x[k * p.stride_class]), k)
                                             : typename AccOf<T>::type(0);
}

// Whether the focal loss's second pass is on: gamma > 0 over soft targets (see the top).
template <int M>
__device__ __forceinline__ bool soft_focal(const CrossEntropyParams& p) {
  return M != kPlain && p.focal_gamma > 0;
}

// A class's focal terms (see the top) with its term f = w_c t'_c given (weighted_target), and
// a's factor fa: f, or with smoothing f s / C (Sums::add_term says why).
// (Adj false: the logit adjustment is off at compile time, for kernels that never see it)
template <int M, typename acc_t, bool Adj = true>
__device__ __forceinline__ void focal_add_term(const CrossEntropyParams& p, Sums<acc_t>& sm,
                                               acc_t x, int64_t c, acc_t fa, acc_t f, acc_t sh,
                                               acc_t L) {
  const acc_t lp = ((Adj ? logit_of(p, x, c) : capped(p, x)) - sh) - L;
  acc_t m, s;
  focal_class_factors<acc_t>(static_cast<acc_t>(p.focal_gamma), lp, fast_exp(lp), m, s);
  sm.a -= fa * m * lp;
  sm.q += f * s;
}

// Adds class c's focal terms (see the top) to sm: a += f_c m_c nll_c, q += f_c s_c, from its
// logit x and probability t and the row's shift sh and log-sum L.
template <typename T, int M, bool HasW>
__device__ __forceinline__ void focal_add(const CrossEntropyParams& p, Sums<typename AccOf<T>::type>& sm,
                                          int64_t c, typename AccOf<T>::type x,
                                          typename AccOf<T>::type t, typename AccOf<T>::type sh,
                                          typename AccOf<T>::type L,
                                          const Smoothing<typename AccOf<T>::type>& smooth) {
  const typename AccOf<T>::type f = class_term<T, M, HasW>(p, c, t, smooth);
  focal_add_term<M>(p, sm, x, c, M == kSmooth ? f * smooth.t_shift : f, f, sh, L);
}

// The loss of row r from its statistics, in double (each float statistic rounded once, nothing
// after: as ../cpu/cross_entropy_kernel.h's row_loss); wy gets the mean's divisor contribution,
// sy the focal loss's gradient factor s_y (plain class indices: the backward's, saved).
template <typename T, int M, bool HasW>
__device__ __forceinline__ double row_loss(const CrossEntropyParams& p, int64_t y,
                                           typename AccOf<T>::type sh, typename AccOf<T>::type L,
                                           typename AccOf<T>::type ref, const Sums<double>& sm,
                                           typename AccOf<T>::type xy, double& wy, double& sy) {
  const double lse_ref = (static_cast<double>(sh) - ref) + L;  // lse - ref
  const double lse = static_cast<double>(sh) + L;
  const double z = p.z_loss > 0 ? p.z_loss * lse * lse : 0.0;  // z-loss: + z w_y lse^2
  if constexpr (is_prob(M)) {
    wy = 1;
    if (p.focal_gamma > 0) return sm.a + z;  // sm: focal_add's
    return sm.q * lse_ref - sm.a + z;
  } else {
    using acc_t = typename AccOf<T>::type;
    wy = HasW ? static_cast<double>(static_cast<const acc_t*>(p.weight)[y]) : 1.0;
    const double nll = (static_cast<double>(sh) - xy) + L;
    if constexpr (M == kSmooth) {
      const double s = p.label_smoothing;
      if (p.focal_gamma > 0) {  // sm: focal_add's
        double m, sf;
        focal_factors<double>(p.focal_gamma, nll, m, sf);
        return math::smoothing_scale(s) * wy * m * nll + sm.a + wy * z;  // (a: times s / C)
      }
      // s / C (W (lse - ref) - sum_c w_c (x_c - ref)) scaled by 2^-64 and back (exact for
      // normal numbers): ref, the first logit, can put the two terms beyond the double maximum
      // where their difference is not (float64 logits near it)
      constexpr double kDown = 0x1p-64, kUp = 0x1p64;
      const double sw = math::smoothing_shift(s, p.total_classes) * sm.q * kDown;
      return math::smoothing_scale(s) * wy * nll + (sw * lse_ref - sm.a * kDown) * kUp + wy * z;
    } else {
      double m = 1;
      if (p.focal_gamma > 0) focal_factors<double>(p.focal_gamma, nll, m, sy);
      return wy * (nll * m + z);
    }
  }
}

// The backward coefficients of row r: grad_k = cp p_k - cw w_k t'_k - [k == y] gy.
template <typename acc_t>
struct Coef {
  acc_t sh = 0, L = 0, cp = 0, cw = 0, gy = 0;  // p_k = exp((x_k - sh) - L)
  int64_t y = -1;
  bool zero = true;  // ignored row: 0, or NaN where L is
};

// Writes row r's forward results (lse, tsum; the loss itself for Reduction::None), or adds its
// (loss, divisor) share of a reduced loss to (my_l, my_w). q: tsum for probabilities; with the
// focal loss, lse's third plane for class indices (s_y; Q with smoothing).
template <typename T, int M>
__device__ __forceinline__ void store_row(const CrossEntropyParams& p, int64_t r,
                                          typename AccOf<T>::type sh, typename AccOf<T>::type L,
                                          double loss, double wy, typename AccOf<T>::type q,
                                          double& my_l, double& my_w) {
  using acc_t = typename AccOf<T>::type;
  static_cast<acc_t*>(p.lse)[r] = sh;
  static_cast<acc_t*>(p.lse)[p.outer * p.inner + r] = L;
  if constexpr (is_prob(M)) static_cast<acc_t*>(p.tsum)[r] = q;
  if (!is_prob(M) && p.focal_gamma > 0) static_cast<acc_t*>(p.lse)[2 * p.outer * p.inner + r] = q;
  if (p.reduction == Reduction::None) {
    store_value<T>(p.loss, loss_as_acc(p), r, static_cast<acc_t>(loss));
  } else {
    my_l += loss;
    my_w += wy;
  }
}

// One element of a row's gradient: cp p_k - cw w_k t'_k - [k == y] gy.
template <typename T, int M, bool HasW>
__device__ __forceinline__ typename AccOf<T>::type grad_element(
    const CrossEntropyParams& p, const Coef<typename AccOf<T>::type>& c, int64_t k,
    typename AccOf<T>::type x, typename AccOf<T>::type t,
    const Smoothing<typename AccOf<T>::type>& sm) {
  using acc_t = typename AccOf<T>::type;
  if (c.zero) return c.L == c.L ? acc_t(0) : c.L;
  x = logit_of(p, x, k);
  const acc_t lp = (x - c.sh) - c.L;  // log p_k
  if (k == c.y) {  // g (1 - s) w_y (p_y - 1) without cancelling when p_y is near 1; once a row
    acc_t v = c.gy * expm1(lp);
    if constexpr (M == kSmooth) {
      acc_t ty = c.cw * class_term<T, M, HasW>(p, k, t, sm);
      if (p.focal_gamma > 0) {  // the focal loss: times s_y (from log p_y: no register per row)
        acc_t m, s;
        focal_factors<acc_t>(static_cast<acc_t>(p.focal_gamma), -lp, m, s);
        ty *= s;
      }
      v += (c.cp - c.gy) * exp(lp) - ty;
    } else if (c.cp != c.gy) {  // the z-loss
      v += (c.cp - c.gy) * exp(lp);
    }
    return v * cap_slope(p, x);
  }
  const acc_t pk = fast_exp(lp);
  acc_t v = c.cp * pk;
  if constexpr (M != kPlain) {
    acc_t f = c.cw * class_term<T, M, HasW>(p, k, t, sm);
    if (p.focal_gamma > 0) {  // the focal loss over soft targets: the class term times s_k
      acc_t m, s;
      focal_class_factors<acc_t>(static_cast<acc_t>(p.focal_gamma), lp, pk, m, s);
      f *= s;
    }
    v -= f;
  }
  return v * cap_slope(p, x);
}


// Row r's forward from its statistics: the log-sum-exp, the loss, the stores (see store_row).
template <typename T, int M, bool HasW>
__device__ __forceinline__ void finish_row(const CrossEntropyParams& p, int64_t r, int64_t y,
                                           bool active, const Lse<typename AccOf<T>::type>& l,
                                           const Sums<double>& sm, typename AccOf<T>::type ref,
                                           typename AccOf<T>::type xy, double& my_l,
                                           double& my_w) {
  using acc_t = typename AccOf<T>::type;
  if (p.shard_stats != nullptr) {  // a vocab-parallel shard: its raw statistics (params.h)
    const int64_t rows = p.outer * p.inner;
    auto* st = static_cast<acc_t*>(p.shard_stats);
    static_cast<acc_t*>(p.lse)[r] = l.m;
    static_cast<acc_t*>(p.lse)[rows + r] = l.m == -INFINITY ? l.m + l.s : log(l.s);
    st[r] = xy;
    st[rows + r] = ref;
    st[2 * rows + r] = static_cast<acc_t>(sm.a);
    return;
  }
  acc_t sh = 0, L = l.ignored();
  double loss = 0, wy = 0, sy = 0;
  if (active) {
    sh = l.shift();
    L = l.log_sum();
    loss = row_loss<T, M, HasW>(p, y, sh, L, ref, sm, xy, wy, sy);
  }
  store_row<T, M>(p, r, sh, L, loss, wy, static_cast<acc_t>(M == kPlain ? sy : sm.q), my_l, my_w);
}

// `given`, when not null, holds the row's (sh, L, q) recomputed (p.lse null: the overlap
// backward's, cross_entropy_lanes.cu), read in place of the forward's saved planes.
template <typename T, int M, bool HasW>
__device__ __forceinline__ Coef<typename AccOf<T>::type> row_coef(
    const CrossEntropyParams& p, int64_t r, typename AccOf<T>::type w_sum,
    const typename AccOf<T>::type* given = nullptr) {
  using acc_t = typename AccOf<T>::type;
  Coef<acc_t> c;
  acc_t g;
  if (p.reduction == Reduction::None) {
    g = load_value<T>(p.grad_loss, loss_as_acc(p), r);
  } else {
    g = load_value<T>(p.grad_loss, loss_as_acc(p), 0);
    if (p.reduction == Reduction::Mean) {
      g /= p.prob_target ? static_cast<acc_t>(p.outer * p.inner)
                         : *static_cast<const acc_t*>(p.total_weight);
    }
  }
  const auto* lse = static_cast<const acc_t*>(p.lse);
  c.sh = given != nullptr ? given[0] : lse[r];
  c.L = given != nullptr ? given[1] : lse[p.outer * p.inner + r];
  // the z-loss's gradient 2 z w_y lse p_k joins the softmax coefficient
  const acc_t zl = p.z_loss > 0 ? static_cast<acc_t>(2 * p.z_loss) * (c.sh + c.L) : acc_t(0);
  if constexpr (is_prob(M)) {
    c.cp = g * ((given != nullptr ? given[2] : static_cast<const acc_t*>(p.tsum)[r]) + zl);
    c.cw = g;
    c.zero = false;
  } else {
    const int64_t y = target_of(p, r);
    if (y < 0) return c;
    const acc_t wy = HasW ? static_cast<const acc_t*>(p.weight)[y] : acc_t(1);
    c.y = y - p.class_offset;  // matches no class of a shard that does not hold it
    c.zero = false;
    if constexpr (M == kSmooth) {
      const Smoothing<acc_t> s(p);
      acc_t ws = w_sum, sy = 1;
      if (p.focal_gamma > 0) {  // the focal loss: s_y at the target, the row's Q for W
        ws = static_cast<const acc_t*>(p.lse)[2 * p.outer * p.inner + r];
        if (c.y >= 0 && c.y < p.classes) {
          const T* x = static_cast<const T*>(p.input) + row_offset<T>(p, r);
          const acc_t xy = logit_of(p, to_acc(x[c.y * p.stride_class]), c.y);
          acc_t m;
          focal_factors<acc_t>(static_cast<acc_t>(p.focal_gamma), (c.sh - xy) + c.L, m, sy);
        }
      }
      c.cp = g * (s.t_scale * wy * sy + s.t_shift * ws);
      c.cw = g * s.t_shift;
      c.gy = g * s.t_scale * wy * sy;
    } else {
      // the focal loss: the cross-entropy's gradient times s_y, saved by the forward
      const acc_t f = p.focal_gamma > 0 ? static_cast<const acc_t*>(p.lse)[2 * p.outer * p.inner + r]
                                        : acc_t(1);
      c.cp = g * wy * f;
      c.gy = g * wy * f;
    }
    if (p.z_loss > 0) c.cp += g * zl * wy;
  }
  return c;
}

// The sum of the class weights (C without weight) the smoothing gradient needs: computed once per
// backward by weight_sum_kernel.
template <typename T, int M, bool HasW>
__device__ __forceinline__ typename AccOf<T>::type weight_sum(const CrossEntropyParams& p,
                                                              const void* w_sum) {
  using acc_t = typename AccOf<T>::type;
  if constexpr (M != kSmooth) return acc_t(0);
  if constexpr (!HasW) return static_cast<acc_t>(p.total_classes);
  return *static_cast<const acc_t*>(w_sum);
}

}  // namespace
}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
