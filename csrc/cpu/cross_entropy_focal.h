// The CPU softmax focal loss's math (cross_entropy_common.h gives the formulas): the focal
// factors m = (1 - p)^gamma and s = d(m nll)/dnll of a row (index targets: its target's p) or of
// each class (probabilities and smoothing), in double per row and vectorized in acc precision,
// and the soft targets' second pass over a row (rows) or a block of lanes (the lane layout),
// which sums A = sum_c f_c m_c nll_c and Q = sum_c f_c s_c once the log-sum is known. Part of
// cross_entropy_kernel.h; included by cross_entropy_rows.h and cross_entropy_lanes.h only.
#pragma once

#include "cross_entropy_common.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// The softmax focal loss (params.h) of a row with nll = -log p_y, in double per row: the loss is
// the cross-entropy's times m = (1 - p_y)^gamma, the gradient the cross-entropy's times s
// (../loss_math.h: focal_factors, shared with the CUDA kernels).
inline double focal_loss_factor(double gamma, double nll) {
  double m, s;
  math::focal_factors(gamma, nll, m, s);
  return m;
}
inline void focal_factors(double gamma, double nll, double& m, double& s) {
  math::focal_factors(gamma, nll, m, s);
}
inline double focal_grad_factor(double gamma, double nll) {
  double m, s;
  math::focal_factors(gamma, nll, m, s);
  return s;
}

// Both focal factors of B terms (lanes of the lane layout, or classes of the focal loss over soft
// targets) in acc precision, from nll = -log p >= 0, p and q = 1 - p (vexp_pq gives both without
// cancellation): ../loss_math.h's focal_factors on vectors.
template <typename acc_t>
C10_ALWAYS_INLINE void focal_factors(acc_t gamma, const Vectorized<acc_t>& nll,
                                     const Vectorized<acc_t>& p, const Vectorized<acc_t>& q,
                                     Vectorized<acc_t>& m, Vectorized<acc_t>& s) {
  math::focal_factors<VecOps<acc_t>>(gamma, Vectorized<acc_t>(0) - nll, p, q, m, s);
}

// The per-row factors for B lanes at once (a scalar pow per row of 19 classes would cost more
// than the row), from nll >= 0.
template <typename acc_t>
inline Vectorized<acc_t> focal_loss_factor(acc_t gamma, const Vectorized<acc_t>& nll) {
  Vectorized<acc_t> p, q, m, s;
  vexp_pq(Vectorized<acc_t>(0) - nll, p, q);
  focal_factors(gamma, nll, p, q, m, s);  // (m in the form the rows and the GPU take it)
  return m;
}
template <typename acc_t>
inline Vectorized<acc_t> focal_grad_factor(acc_t gamma, const Vectorized<acc_t>& nll) {
  Vectorized<acc_t> p, q, m, s;
  vexp_pq(Vectorized<acc_t>(0) - nll, p, q);
  focal_factors(gamma, nll, p, q, m, s);
  return s;
}

// The focal loss over soft targets (Ctx::soft_focal): with the row's shift sh and log-sum L
// known, a third pass (from cache) forms A = sum_c f_c m_c nll_c and Q = sum_c f_c s_c, with
// f_c = class_factors (w_c t'_c; w_c with smoothing, whose target term row_loss adds),
// nll_c = L - (x_c - sh) and m_c, s_c the focal factors of class c (focal_factors). The loss is
// A (probabilities) or (1 - s) w_y m_y nll_y + A with A's terms times s / C (smoothing: Ctx::
// t_shift says why); Q is the backward's:
// dloss/dx_k = Q p_k - f_k s_k (cross-entropy: s = 1, Q = sum_c f_c).
template <typename scalar_t, int M, bool HasW>
inline void row_focal_sums(const Ctx<scalar_t>& cx, const scalar_t* x, const Target<scalar_t, M>* t,
                           typename AccOf<scalar_t>::type sh, typename AccOf<scalar_t>::type L,
                           double& A, double& Q) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  const acc_t gamma = static_cast<acc_t>(cx.gamma);
  const Vec vsh(sh), vL(L), vzero(0);
  Vec A0(0), A1(0), Q0(0), Q1(0);
  DoubleLanes<acc_t> Ad, Qd;  // their float lanes added every kFlushBlocks blocks
  for_blocks_flushed<io::B>(cx.C, [&](int64_t c, int64_t cnt, auto full) {
    Vec v0, v1;
    load_block<decltype(full)::value>(cx, x + c, c, cnt, v0, v1);
    Vec lp0 = (v0 - vsh) - vL, lp1 = (v1 - vsh) - vL;
    if constexpr (!decltype(full)::value) keep_valid(cnt, vzero, lp0, lp1);
    const Vec n0 = vzero - lp0, n1 = vzero - lp1;
    Vec p0, p1, q0, q1, m0, m1, s0, s1, f0, f1;
    vexp_pq(lp0, p0, q0);
    vexp_pq(lp1, p1, q1);
    focal_factors(gamma, n0, p0, q0, m0, s0);
    focal_factors(gamma, n1, p1, q1, m1, s1);
    class_factors<scalar_t, M, HasW, decltype(full)::value>(cx, t, c, cnt, f0, f1);
    const Vec fa0 = M == kSmooth ? f0 * Vec(cx.t_shift) : f0;  // (Ctx::t_shift)
    const Vec fa1 = M == kSmooth ? f1 * Vec(cx.t_shift) : f1;
    A0 = at::vec::fmadd(fa0 * m0, n0, A0);
    A1 = at::vec::fmadd(fa1 * m1, n1, A1);
    Q0 = at::vec::fmadd(f0, s0, Q0);
    Q1 = at::vec::fmadd(f1, s1, Q1);
  }, [&] {
    Ad.take(A0, A1);
    Qd.take(Q0, Q1);
  });
  A = Ad.sum();
  Q = Qd.sum();
}

// The focal loss over soft targets for B lanes (row_focal_sums): with each
// lane's shift and log-sum known, A = sum_c f_c m_c nll_c and Q = sum_c f_c s_c, another pass over
// the classes, from the tile when it holds them.
template <typename scalar_t, int M, bool HasW>
C10_ALWAYS_INLINE void lanes_focal_sums(const Ctx<scalar_t>& cx, const scalar_t* x,
                                        const Target<scalar_t, M>* t, int64_t sC, int64_t nl,
                                        const typename AccOf<scalar_t>::type* tile,
                                        const Vectorized<typename AccOf<scalar_t>::type>& sh0,
                                        const Vectorized<typename AccOf<scalar_t>::type>& sh1,
                                        const Vectorized<typename AccOf<scalar_t>::type>& L0,
                                        const Vectorized<typename AccOf<scalar_t>::type>& L1,
                                        Vectorized<typename AccOf<scalar_t>::type>& A0,
                                        Vectorized<typename AccOf<scalar_t>::type>& A1,
                                        Vectorized<typename AccOf<scalar_t>::type>& Q0,
                                        Vectorized<typename AccOf<scalar_t>::type>& Q1) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  const acc_t gamma = static_cast<acc_t>(cx.gamma);
  const Vec vts(cx.t_scale), vtsh(cx.t_shift), vzero(0);
  A0 = A1 = Q0 = Q1 = vzero;
  const bool flushed = cx.C > kLaneFlush;  // (vec_common.h's kLaneFlush)
  DoubleLanes<acc_t> As, Qs;
  for (int64_t c = 0; c < cx.C; ++c) {
    Vec v0, v1;
    if (tile != nullptr) {
      v0 = Vec::loadu(tile + c * io::B);
      v1 = Vec::loadu(tile + c * io::B + io::W);
    } else {
      io::load(x + c * sC, nl, v0, v1);
      cx.lane_logits(v0, c);
      cx.lane_logits(v1, c);
    }
    const Vec n0 = L0 - (v0 - sh0), n1 = L1 - (v1 - sh1);
    Vec p0, p1, q0, q1, m0, m1, s0, s1;
    vexp_pq(vzero - n0, p0, q0);
    vexp_pq(vzero - n1, p1, q1);
    focal_factors(gamma, n0, p0, q0, m0, s0);
    focal_factors(gamma, n1, p1, q1, m1, s1);
    Vec f0(HasW ? cx.w[c] : acc_t(1)), f1 = f0;
    if constexpr (is_prob(M)) {
      Vec t0, t1;
      IO<Target<scalar_t, M>>::load(t + c * sC, nl, t0, t1);
      f0 = f0 * at::vec::fmadd(t0, vts, vtsh);
      f1 = f1 * at::vec::fmadd(t1, vts, vtsh);
    }
    const Vec fa0 = M == kSmooth ? f0 * vtsh : f0, fa1 = M == kSmooth ? f1 * vtsh : f1;
    A0 = at::vec::fmadd(fa0 * m0, n0, A0);
    A1 = at::vec::fmadd(fa1 * m1, n1, A1);
    Q0 = at::vec::fmadd(f0, s0, Q0);
    Q1 = at::vec::fmadd(f1, s1, Q1);
    if (flushed && c % kLaneFlush == kLaneFlush - 1) {
      As.take(A0, A1);
      Qs.take(Q0, Q1);
    }
  }
  if (flushed) {
    As.take(A0, A1);
    Qs.take(Q0, Q1);
    As.load(A0, A1);
    Qs.load(Q0, Q1);
  }
}

// g *= m = (1 - p)^gamma of logits v with shift sh and log-sum L (focal_loss_factor).
template <typename acc_t>
C10_ALWAYS_INLINE void focal_target_factor(acc_t gamma, const Vectorized<acc_t>& v0,
                                           const Vectorized<acc_t>& v1,
                                           const Vectorized<acc_t>& sh0,
                                           const Vectorized<acc_t>& sh1,
                                           const Vectorized<acc_t>& L0,
                                           const Vectorized<acc_t>& L1, Vectorized<acc_t>& g0,
                                           Vectorized<acc_t>& g1) {
  g0 = g0 * focal_loss_factor(gamma, L0 - (v0 - sh0));
  g1 = g1 * focal_loss_factor(gamma, L1 - (v1 - sh1));
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
