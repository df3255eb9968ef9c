// The CPU cross-entropy's lane code, backward: the gradient of (N, C, d...) read in place, a lane
// per position along the contiguous spatial axis, each element written once (streamed past the
// cache where a block's class rows are 64-byte aligned); class-contiguous rows of at most
// kSmallClasses classes through it too (cross_entropy_small_rows.h). The forward and the layout:
// cross_entropy_lanes.h. Part of cross_entropy_kernel.h; included by it and
// cross_entropy_small_rows.h only.
#pragma once

#include "cross_entropy_lanes.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// What the forward saved for one block, recomputed where it saved nothing (p.lse null: the
// overlap op's backward keeps nothing of the logits' size): each lane's shift and log-sum and,
// for probabilities, q = sum_c w_c t'_c, in lanes_block_forward's order and arithmetic, so
// bit-equal to what it would have saved. Ignored lanes get (0, +inf) as there. No focal term.
// With ab (the overlap's dL/dI, dL/dP), the same exp pass gives S = sum_k p_k d_k
// (cross_entropy_overlap.h) as U / E, or U / E + 2 V / E^2 when squared, with e_k = exp(x_k - sh),
// E = sum e_k, U = sum e_k (a_k t_k [+ b_k]), V = sum b_k e_k^2. With etile (C <= kTileClasses)
// each e_k is kept there, and E in (E0, E1), so that the gradient's pass takes p_k = e_k / E
// without a second exp.
template <typename scalar_t, int M, bool HasW>
C10_ALWAYS_INLINE void lanes_recompute(const Ctx<scalar_t>& cx, const scalar_t* x,
                                       const Target<scalar_t, M>* t, int64_t sC, int64_t nl,
                                       const typename AccOf<scalar_t>::type* yk,
                                       const typename AccOf<scalar_t>::type* ab,
                                       Vectorized<typename AccOf<scalar_t>::type>& sh0,
                                       Vectorized<typename AccOf<scalar_t>::type>& sh1,
                                       Vectorized<typename AccOf<scalar_t>::type>& L0,
                                       Vectorized<typename AccOf<scalar_t>::type>& L1,
                                       Vectorized<typename AccOf<scalar_t>::type>& q0,
                                       Vectorized<typename AccOf<scalar_t>::type>& q1,
                                       Vectorized<typename AccOf<scalar_t>::type>& S0,
                                       Vectorized<typename AccOf<scalar_t>::type>& S1,
                                       typename AccOf<scalar_t>::type* etile,
                                       Vectorized<typename AccOf<scalar_t>::type>& E0,
                                       Vectorized<typename AccOf<scalar_t>::type>& E1) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const int64_t C = cx.C;
  const Vec vninf(-std::numeric_limits<acc_t>::infinity()), vzero(0);
  Vec m0 = vninf, m1 = vninf;
  for (int64_t c = 0; c < C; ++c) {
    Vec v0, v1;
    io::load(x + c * sC, nl, v0, v1);
    cx.lane_logits(v0, c);
    cx.lane_logits(v1, c);
    m0 = at::vec::maximum(m0, v0);
    m1 = at::vec::maximum(m1, v1);
  }
  sh0 = Vec::blendv(m0, vzero, m0 == vninf);
  sh1 = Vec::blendv(m1, vzero, m1 == vninf);
  const Vec vts(cx.t_scale), vtsh(cx.t_shift);
  Vec e0 = vzero, e1 = vzero, k0 = vzero, k1 = vzero, kq0 = vzero, kq1 = vzero;
  Vec u0 = vzero, u1 = vzero, w0 = vzero, w1 = vzero, y0, y1;
  load_acc(yk, B, y0, y1);
  q0 = q1 = vzero;
  const bool flushed = is_prob(M) && C > kLaneFlush;
  const bool sq = cx.p.overlap_squared;
  DoubleLanes<acc_t> qs;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = c * sC;
    Vec v0, v1;
    io::load(x + at, nl, v0, v1);
    cx.lane_logits(v0, c);
    cx.lane_logits(v1, c);
    const Vec x0 = vexp(v0 - sh0), x1 = vexp(v1 - sh1);
    kahan_add(e0, k0, x0);
    kahan_add(e1, k1, x1);
    if (etile != nullptr) {
      x0.store(etile + c * B);
      x1.store(etile + c * B + io::W);
    }
    if (ab != nullptr) {
      Vec t0, t1;
      overlap_target<scalar_t, M>(t, at, nl, c, y0, y1, t0, t1);
      const Vec a(ab[c]), b(ab[C + c]);
      u0 = at::vec::fmadd(x0, sq ? a * t0 : at::vec::fmadd(a, t0, b), u0);
      u1 = at::vec::fmadd(x1, sq ? a * t1 : at::vec::fmadd(a, t1, b), u1);
      if (sq) {
        w0 = at::vec::fmadd(b * x0, x0, w0);
        w1 = at::vec::fmadd(b * x1, x1, w1);
      }
    }
    if constexpr (is_prob(M)) {
      Vec t0, t1, f0(HasW ? cx.w[c] : acc_t(1)), f1 = f0;
      IO<Target<scalar_t, M>>::load(t + at, nl, t0, t1);
      kahan_add(q0, kq0, f0 * at::vec::fmadd(t0, vts, vtsh));
      kahan_add(q1, kq1, f1 * at::vec::fmadd(t1, vts, vtsh));
      if (flushed && c % kLaneFlush == kLaneFlush - 1) {
        q0 = q0 - kq0;
        q1 = q1 - kq1;
        kq0 = kq1 = vzero;
        qs.take(q0, q1);
      }
    }
  }
  q0 = q0 - kq0;
  q1 = q1 - kq1;
  if (flushed) {
    qs.take(q0, q1);
    qs.load(q0, q1);
  }
  finish_lse(m0, e0, L0);
  finish_lse(m1, e1, L1);
  E0 = e0;
  E1 = e1;
  if (ab != nullptr) {
    const Vec two(2);
    S0 = sq ? (u0 + two * w0 / e0) / e0 : u0 / e0;
    S1 = sq ? (u1 + two * w1 / e1) / e1 : u1 / e1;
  }
  if constexpr (!is_prob(M)) {
    const Vec keep0 = y0 >= vzero, keep1 = y1 >= vzero;
    sh0 = Vec::blendv(vzero, sh0, keep0);
    sh1 = Vec::blendv(vzero, sh1, keep1);
    L0 = Vec::blendv(ignored_lse(m0), L0, keep0);
    L1 = Vec::blendv(ignored_lse(m1), L1, keep1);
  }
}

// The gradient of one block of nl <= B lanes laid out as for lanes_block_forward, written to
// g[c * sC + k].
template <typename scalar_t, int M, bool HasW>
C10_ALWAYS_INLINE void lanes_block_backward(const Ctx<scalar_t>& cx, const scalar_t* x,
                                            const Target<scalar_t, M>* t, scalar_t* g, int64_t sC, int64_t nl, int64_t r0,
                                 double g_all, bool stream, bool pf = true,
                                 typename AccOf<scalar_t>::type* etile = nullptr) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const auto& p = cx.p;
  const int64_t C = cx.C;
  const Vec vts(cx.t_scale), vtsh(cx.t_shift);
  const bool none = p.reduction == Reduction::None;
  // Per-lane coefficients (row_coef's, vectorized). An ignored lane was saved with
  // (sh, L) = (0, +inf) and gets zero coefficients, so its gradient is 0 * exp(x - inf) = 0; NaN
  // where the forward saved L = NaN, as in PyTorch's log_softmax backward (fixed up below).
  const acc_t* sh_in = static_cast<const acc_t*>(p.lse);
  acc_t lk[B], gk[B], yk[B], wyk[B] = {};
  for (int64_t k = 0; k < B; ++k) {
    gk[k] = static_cast<acc_t>(k < nl && none ? cx.grad_loss(r0 + k) : g_all);
    yk[k] = -1;
  }
  acc_t xk[B] = {};  // the focal loss: each lane's target logit
  if constexpr (!is_prob(M)) {
    for (int64_t k = 0; k < nl; ++k) {
      const int64_t yv = cx.checked_target(r0 + k);
      yk[k] = static_cast<acc_t>(yv);
      if (yv >= 0) wyk[k] = HasW ? cx.w[yv] : acc_t(1);
      if (M == kSmooth && cx.gamma > 0 && yv >= 0) {
        xk[k] = cx.logit(static_cast<acc_t>(x[yv * sC + k]), yv);
      }
    }
  }
  Vec sh0, sh1, L0, L1, g0v, g1v, cp0, cp1, cw0(0), cw1(0), gy0(0), gy1(0), y0(-1), y1(-1);
  const Vec vzero(0);
  // the overlap sums' gradient (cross_entropy_overlap.h): a_c, b_c of the lanes' item, and S
  const acc_t* ab = p.grad_sums != nullptr
                        ? static_cast<const acc_t*>(p.grad_sums) + (r0 / p.inner) * 3 * C
                        : nullptr;
  Vec qr0, qr1, S0, S1, E0, E1;  // q, S and E, where recomputed
  if (sh_in != nullptr) {
    etile = nullptr;
    load_acc(sh_in + r0, nl, sh0, sh1);
    load_acc(sh_in + p.outer * p.inner + r0, nl, L0, L1);
  } else {
    if (C > kTileClasses) etile = nullptr;
    lanes_recompute<scalar_t, M, HasW>(cx, x, t, sC, nl, yk, ab, sh0, sh1, L0, L1, qr0, qr1,
                                       S0, S1, etile, E0, E1);
  }
  store_acc(lk, B, L0, L1);  // for the NaN fix-up below
  load_acc(gk, B, g0v, g1v);
  if constexpr (is_prob(M)) {
    Vec q0 = qr0, q1 = qr1;
    if (sh_in != nullptr) load_acc(static_cast<const acc_t*>(p.tsum) + r0, nl, q0, q1);
    cp0 = g0v * q0;
    cp1 = g1v * q1;
    if (cx.z > 0) {  // the z-loss's 2 z lse p_k
      const Vec z2(static_cast<acc_t>(2 * cx.z));
      cp0 = cp0 + g0v * z2 * (sh0 + L0);
      cp1 = cp1 + g1v * z2 * (sh1 + L1);
    }
    cw0 = g0v;
    cw1 = g1v;
  } else {
    Vec wy0, wy1;
    load_acc(yk, B, y0, y1);
    load_acc(wyk, B, wy0, wy1);
    const Vec ks(cx.t_scale), zero(0);
    const Vec keep0 = y0 >= zero, keep1 = y1 >= zero;
    Vec f0(1), f1(1);
    if (M == kPlain && cx.gamma > 0) {  // the focal loss: the target's term times s_y (saved)
      load_acc(cx.template focal_plane<M>() + r0, nl, f0, f1);
    } else if (cx.gamma > 0) {  // with smoothing: s_y from the target's logit, per lane
      Vec x0, x1;
      load_acc(xk, B, x0, x1);
      f0 = focal_grad_factor(static_cast<acc_t>(cx.gamma), (sh0 - x0) + L0);
      f1 = focal_grad_factor(static_cast<acc_t>(cx.gamma), (sh1 - x1) + L1);
    }
    // blended, not multiplied, to zero: g may be inf (a mean over nothing but ignored rows)
    gy0 = Vec::blendv(zero, g0v * ks * wy0 * f0, keep0);
    gy1 = Vec::blendv(zero, g1v * ks * wy1 * f1, keep1);
    if constexpr (M == kSmooth) {
      const Vec kt(cx.t_shift);
      Vec kw0(static_cast<acc_t>(cx.t_shift * cx.w_sum)), kw1 = kw0;
      if (cx.gamma > 0) {  // the focal loss: Q = sum_c w_c s_c of each lane for W
        load_acc(cx.template focal_plane<M>() + r0, nl, kw0, kw1);
        kw0 = kt * kw0;
        kw1 = kt * kw1;
      }
      cp0 = Vec::blendv(zero, gy0 + g0v * kw0, keep0);
      cp1 = Vec::blendv(zero, gy1 + g1v * kw1, keep1);
      cw0 = Vec::blendv(zero, g0v * kt, keep0);
      cw1 = Vec::blendv(zero, g1v * kt, keep1);
    } else {
      cp0 = gy0;
      cp1 = gy1;
    }
    if (cx.z > 0) {  // the z-loss's 2 z w_y lse p_k
      const Vec z2(static_cast<acc_t>(2 * cx.z));
      cp0 = Vec::blendv(zero, cp0 + g0v * z2 * wy0 * (sh0 + L0), keep0);
      cp1 = Vec::blendv(zero, cp1 + g1v * z2 * wy1 * (sh1 + L1), keep1);
    }
  }
  if (ab != nullptr && sh_in != nullptr) {
    overlap_backward_sum<scalar_t, M>(cx, x, t, sC, nl, ab, y0, y1, sh0, sh1, L0, L1, S0, S1);
  }
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = c * sC;
    if (pf) {
      prefetch_block(x + at + kPrefetch);
      if (!stream) prefetch_write_block(g + at + kPrefetch);  // a streamed line is not read
    }
    Vec v0(0), v1(0);
    if (etile == nullptr || cx.cap > 0) {
      io::load(x + at, nl, v0, v1);
      cx.lane_logits(v0, c);
      cx.lane_logits(v1, c);
    }
    // at the target, cp p - gy in one rounding: g (1 - s) w_y (p_y - 1) does not cancel more
    // than PyTorch's fused grad - exp(out) * sum
    Vec d0(0), d1(0);
    if constexpr (!is_prob(M)) {
      const Vec vc(static_cast<acc_t>(c));
      d0 = vzero - (gy0 & (y0 == vc));
      d1 = vzero - (gy1 & (y1 == vc));
    }
    const Vec lp0 = (v0 - sh0) - L0, lp1 = (v1 - sh1) - L1;
    Vec p0, p1, q0, q1;  // q = 1 - p for the focal loss over soft targets
    if (etile != nullptr) {  // the recomputed e_k / E (no focal term there)
      p0 = Vec::loadu(etile + c * B) / E0;
      p1 = Vec::loadu(etile + c * B + io::W) / E1;
    } else if (M != kPlain && cx.gamma > 0) {
      vexp_pq(lp0, p0, q0);
      vexp_pq(lp1, p1, q1);
    } else {
      p0 = vexp(lp0);
      p1 = vexp(lp1);
    }
    Vec g0 = at::vec::fmadd(cp0, p0, d0);
    Vec g1 = at::vec::fmadd(cp1, p1, d1);
    if constexpr (M == kSmooth || is_prob(M)) {
      Vec w0(HasW ? cx.w[c] : acc_t(1)), w1 = w0;
      if constexpr (is_prob(M)) {
        if (pf) prefetch_block(t + at + kPrefetch);
        Vec t0, t1;
        IO<Target<scalar_t, M>>::load(t + at, nl, t0, t1);
        w0 = w0 * at::vec::fmadd(t0, vts, vtsh);
        w1 = w1 * at::vec::fmadd(t1, vts, vtsh);
      }
      if (cx.gamma > 0) {  // the focal loss over soft targets: each class term times s_c
        Vec m0, m1, s0, s1;
        focal_factors(static_cast<acc_t>(cx.gamma), vzero - lp0, p0, q0, m0, s0);
        focal_factors(static_cast<acc_t>(cx.gamma), vzero - lp1, p1, q1, m1, s1);
        w0 = w0 * s0;
        w1 = w1 * s1;
      }
      g0 = at::vec::fnmadd(cw0, w0, g0);  // one rounding: cp p - cw w t'
      g1 = at::vec::fnmadd(cw1, w1, g1);
    }
    if (ab != nullptr) {
      overlap_backward_add<scalar_t, M>(cx, t, at, nl, c, ab, y0, y1, p0, p1, S0, S1, g0, g1);
    }
    cx.cap_slope(v0, v1, g0, g1);
    if (stream && nl == B) {
      stream_store(g + at, g0, g1);
    } else {
      io::store(g + at, nl, g0, g1);
    }
  }
  // a lane whose log_softmax is NaN (a NaN or +inf logit, or all -inf): NaN throughout, as in
  // PyTorch (vexp does not carry NaN); rare, so checked once per block
  for (int64_t k = 0; k < nl; ++k) {
    if (lk[k] != lk[k]) {
      for (int64_t c = 0; c < C; ++c) g[c * sC + k] = static_cast<scalar_t>(lk[k]);
    }
  }
}

template <typename scalar_t, int M, bool HasW>
void backward_lanes(const Ctx<scalar_t>& cx) {
  constexpr int64_t B = IO<scalar_t>::B;
  const auto& p = cx.p;
  const double g_all = p.reduction == Reduction::None ? 0.0 : scalar_grad<scalar_t>(p);
  auto* gi = static_cast<scalar_t*>(p.grad_input);
  const Units u = lane_units<scalar_t>(p);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    LaneTile<scalar_t> tile;  // the recomputed exps, where the forward saved nothing
    for (int64_t unit = b; unit < e; ++unit) {
      const LaneSpan span(p, u, unit);
      const int64_t o = span.o, i_begin = span.begin, i_end = span.end;
      const int64_t off = cx.offset(o, i_begin);
      for (int64_t j = 0; j < i_end - i_begin; j += B) {
        // full blocks of 64-byte aligned class rows bypass the cache (stream_store)
        const bool stream = reinterpret_cast<uintptr_t>(gi + off + j) % 64 == 0 &&
                            p.stride_class * int64_t(sizeof(scalar_t)) % 64 == 0;
        lanes_block_backward<scalar_t, M, HasW>(
            cx, cx.x + off + j, cx.template target<M>(off + j), gi + off + j,
            p.stride_class, std::min(B, i_end - i_begin - j), o * p.inner + i_begin + j, g_all,
            stream, true, tile.v);
      }
    }
    stream_fence();
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
