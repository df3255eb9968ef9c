// The CPU cross-entropy over class-contiguous rows of more than kSmallClasses classes,
// vectorized along the classes: two passes per row forward (its max, then the sums shifted by
// it), one backward. Part of cross_entropy_kernel.h; included by it only.
#pragma once

#include "cross_entropy_focal.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// The second pass over a row, with its shift sh (its max): e = sum_c exp(x_c - sh); with kSmooth
// a = sum_c (s / C) w_c (x_c - sh) (Ctx::t_shift); with kProb
// a = sum_c w_c t'_c (x_c - sh) and q = sum_c w_c t'_c. Each exp's argument is <= 0, and the
// weighted sums are of terms <= 0 for weights and targets >= 0: nothing cancels.
template <typename scalar_t, int M, bool HasW>
inline void row_sums(const Ctx<scalar_t>& cx, const scalar_t* x, const Target<scalar_t, M>* t,
                     typename AccOf<scalar_t>::type sh, double& e, double& a, double& q) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const Vec vsh(sh), vninf(ninf), vzero(0);
  Vec e0(0), e1(0), a0(0), a1(0), q0(0), q1(0);
  DoubleLanes<acc_t> ed, ad, qd;  // their float lanes added every kFlushBlocks blocks
  for_blocks_flushed<B>(cx.C, [&](int64_t c, int64_t cnt, auto full) {
    Vec v0, v1, u0, u1;
    if constexpr (decltype(full)::value) {
      io::load(x + c, v0, v1);
      cx.logits(v0, v1, c, cnt);
      u0 = v0;
      u1 = v1;
    } else {
      io::load(x + c, cnt, v0, v1);
      cx.logits(v0, v1, c, cnt);
      u0 = v0;
      u1 = v1;
      keep_valid(cnt, vninf, u0, u1);  // -inf: exp gives 0
    }
    e0 += vexp(u0 - vsh);
    e1 += vexp(u1 - vsh);
    if constexpr (M != kPlain) {
      Vec d0 = v0 - vsh, d1 = v1 - vsh;
      if constexpr (!decltype(full)::value) keep_valid(cnt, vzero, d0, d1);
      Vec f0, f1;
      class_factors<scalar_t, M, HasW, decltype(full)::value>(cx, t, c, cnt, f0, f1);
      if constexpr (M == kSmooth) {  // a's terms times s / C (Ctx::t_shift)
        f0 = f0 * Vec(cx.t_shift);
        f1 = f1 * Vec(cx.t_shift);
      }
      a0 = at::vec::fmadd(f0, d0, a0);
      a1 = at::vec::fmadd(f1, d1, a1);
      if constexpr (is_prob(M)) {
        q0 += f0;
        q1 += f1;
      }
    }
  }, [&] {
    ed.take(e0, e1);
    if constexpr (M != kPlain) {
      ad.take(a0, a1);
      qd.take(q0, q1);
    }
  });
  e = ed.sum();
  a = ad.sum();
  q = qd.sum();
}

// The loss of a row from its statistics (see row_sums), in double: the float statistics are
// rounded once each, and nothing after them (PyTorch rounds log_softmax, then w_y times it).
// With a z-loss, z w_y lse^2 more (z lse^2 for probabilities). The focal loss over class
// indices also gives its gradient factor s_y in sy.
template <typename scalar_t, int M>
inline double row_loss(const Ctx<scalar_t>& cx, double sh, double L, double a, double q, double xy,
                       double wy, double& sy) {
  double loss;
  if (cx.template soft_focal<M>()) {  // a and q are row_focal_sums' A and Q
    loss = a;
    if constexpr (M == kSmooth) {
      const double nll = (sh - xy) + L, s = cx.p.label_smoothing;
      loss = math::smoothing_scale(s) * wy * focal_loss_factor(cx.gamma, nll) * nll + a;
    }
    if (L != L) loss = L;  // a row whose log_softmax is NaN (vexp does not carry NaN)
  } else if constexpr (is_prob(M)) {
    loss = q * L - a;
  } else {
    const double nll = (sh - xy) + L;
    if constexpr (M == kSmooth) {
      const double s = cx.p.label_smoothing;
      loss = math::smoothing_scale(s) * wy * nll +
             (math::smoothing_shift(s, cx.C_total) * cx.w_sum * L - a);
    } else {
      loss = wy * nll;
      if (cx.gamma > 0) {
        double m;
        focal_factors(cx.gamma, nll, m, sy);
        loss *= m;
      }
    }
  }
  if (cx.z > 0) loss += cx.z * wy * (sh + L) * (sh + L);
  return loss;
}

// Per-row loss, the saved shift and log-sum (sh, L; lse = sh + L), and the row's weight in the
// mean's divisor. Two passes over the row (the second from cache): its max, then the sums
// shifted by it, as PyTorch's log_softmax does.
template <typename scalar_t, int M, bool HasW>
inline void row_forward(const Ctx<scalar_t>& cx, int64_t r, const scalar_t* x,
                        const Target<scalar_t, M>* t,
                        typename AccOf<scalar_t>::type& sh, typename AccOf<scalar_t>::type& L,
                        double& loss, double& wy, typename AccOf<scalar_t>::type& tsum) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t yv = is_prob(M) ? 0 : cx.checked_target(r);
  const acc_t m = row_max(cx, x);
  if (yv < 0) {
    sh = 0;
    loss = wy = 0;
    L = ignored_lse(m);
    return;
  }
  double e, a, q;
  row_sums<scalar_t, M, HasW>(cx, x, t, exp_shift(m), e, a, q);
  double Ld;
  finish_lse(m, e, sh, Ld);
  L = static_cast<acc_t>(Ld);
  if (cx.template soft_focal<M>()) row_focal_sums<scalar_t, M, HasW>(cx, x, t, sh, L, a, q);
  tsum = static_cast<acc_t>(q);
  wy = is_prob(M) ? 1.0 : cx.target_weight(yv);
  const double xy =
      is_prob(M) ? 0.0 : static_cast<double>(cx.logit(static_cast<acc_t>(x[yv * cx.p.stride_class]), yv));
  double sy = 0;
  loss = row_loss<scalar_t, M>(cx, sh, Ld, a, q, xy, wy, sy);
  if (M == kPlain && cx.gamma > 0) tsum = static_cast<acc_t>(sy);  // the focal loss's s_y, saved
}


template <typename scalar_t, int M, bool HasW>
void forward_rows(const Ctx<scalar_t>& cx) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto& p = cx.p;
  const Units u = row_units(p);
  const int64_t rows = p.outer * p.inner;
  std::vector<double> part_loss(u.count, 0.0), part_w(u.count, 0.0);
  auto* sh_out = static_cast<acc_t*>(p.lse);
  auto* L_out = sh_out + rows;
  // the softmax coefficient of probability rows (sum_c w_c t'_c), or the focal loss's s_y or Q
  auto* tsum_out = cx.gamma > 0 ? cx.template focal_plane<M>() : static_cast<acc_t*>(p.tsum);
  const bool none = p.reduction == Reduction::None;
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      double sl = 0, sw = 0;
      const int64_t r1 = std::min(rows, (unit + 1) * u.rows);
      for (int64_t r = unit * u.rows; r < r1; ++r) {
        const int64_t off = cx.offset(r / p.inner, r % p.inner);
        acc_t sh, L, ts = 0;
        double loss, wy;
        row_forward<scalar_t, M, HasW>(cx, r, cx.x + off, cx.template target<M>(off), sh, L,
                                       loss, wy, ts);
        sh_out[r] = sh;
        L_out[r] = L;
        if (is_prob(M) || cx.gamma > 0) tsum_out[r] = ts;
        if (none) {
          cx.store_loss(r, loss);
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


// A vocab-parallel shard's forward (params.h: shard_stats): per row its raw max m and log-sum
// log sum_c exp(x_c - sh) (sh = m, 0 when m = -inf), the target's logit where the target is in
// the shard, and with smoothing a = sum_c (s / C) w_c (x_c - sh) with ref = sh. Every row, ignored ones
// too (whether the unsharded row is NaN decides their gradient); no loss, no reduction: the
// caller merges the shards' statistics.
template <typename scalar_t, int M, bool HasW>
void forward_shard_rows(const Ctx<scalar_t>& cx) {
  static_assert(!is_prob(M), "shards take class-index targets");
  using acc_t = typename AccOf<scalar_t>::type;
  const auto& p = cx.p;
  const int64_t rows = p.outer * p.inner;
  auto* m_out = static_cast<acc_t*>(p.lse);
  auto* L_out = m_out + rows;
  auto* xy_out = static_cast<acc_t*>(p.shard_stats);
  auto* ref_out = xy_out + rows;
  auto* a_out = ref_out + rows;
  const Units u = row_units(p);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b * u.rows; r < std::min(rows, e * u.rows); ++r) {
      const scalar_t* x = cx.x + cx.offset(r / p.inner, r % p.inner);
      const int64_t yg = cx.checked_target(r), y = yg - p.class_offset;  // y: in the shard
      const acc_t m = row_max(cx, x), sh = exp_shift(m);
      double es, a, q;
      row_sums<scalar_t, M, HasW>(cx, x, nullptr, sh, es, a, q);
      m_out[r] = m;
      L_out[r] = static_cast<acc_t>(std::log(es));
      const bool local = yg >= 0 && y >= 0 && y < cx.C;
      xy_out[r] = local ? cx.capped(static_cast<acc_t>(x[y * p.stride_class])) : acc_t(0);
      ref_out[r] = sh;
      a_out[r] = M == kSmooth ? static_cast<acc_t>(a) : acc_t(0);
    }
  });
}

// What the backward of one row needs besides the logits.
template <typename acc_t>
struct RowCoef {
  acc_t sh = 0, L = 0;                     // the saved shift and log-sum: p_k = exp(x_k - sh - L)
  acc_t cp = 0, cw = 0, gy = 0;            // gy: g (1 - s) w_y, subtracted at k == y
  double cpd = 0, cwd = 0, gyd = 0;        // the same in double, for the target element
  double wyd = 1;                          // w_y
  double syd = 1;                          // the focal loss over soft targets: s_y
  int64_t y = -1;                          // the target's class in these logits; -1: ignored
                                           // row, probabilities, or a target in another shard
  bool zero = false;                       // ignored row: gradient 0 (NaN where L is NaN)
};

template <typename scalar_t, int M, bool HasW>
inline RowCoef<typename AccOf<scalar_t>::type> row_coef(const Ctx<scalar_t>& cx, int64_t r,
                                                         double g) {
  using acc_t = typename AccOf<scalar_t>::type;
  RowCoef<acc_t> rc;
  const auto& p = cx.p;
  rc.sh = static_cast<const acc_t*>(p.lse)[r];
  rc.L = static_cast<const acc_t*>(p.lse)[p.outer * p.inner + r];
  if (p.reduction == Reduction::None) g = cx.grad_loss(r);
  // the z-loss's gradient 2 z w_y lse p_k joins the softmax coefficient
  const double zl = cx.z > 0 ? 2.0 * cx.z * (static_cast<double>(rc.sh) + rc.L) : 0.0;
  if constexpr (is_prob(M)) {
    // sum_c w_c t'_c, or the focal loss's Q (row_focal_sums)
    rc.cp = static_cast<acc_t>(
        g * (static_cast<double>(static_cast<const acc_t*>(p.tsum)[r]) + zl));
    rc.cw = static_cast<acc_t>(g);
  } else {
    const int64_t yv = cx.checked_target(r);
    if (yv < 0) {
      rc.zero = true;
      return rc;
    }
    const double wy = cx.target_weight(yv);
    const double s = M == kSmooth ? p.label_smoothing : 0.0;
    rc.wyd = wy;
    rc.y = yv >= p.class_offset && yv - p.class_offset < cx.C ? yv - p.class_offset : -1;
    rc.gyd = g * math::smoothing_scale(s) * wy;
    if (M == kPlain && cx.gamma > 0) {  // the focal loss: the gradient times s_y (saved)
      rc.gyd *= static_cast<double>(cx.template focal_plane<M>()[r]);
    }
    if constexpr (M == kSmooth) {
      const double ts = math::smoothing_shift(s, cx.C_total);
      double ws = cx.w_sum;
      if (cx.gamma > 0) {  // the focal loss: s_y at the target, Q = sum_c w_c s_c for W
        ws = static_cast<double>(cx.template focal_plane<M>()[r]);
        if (rc.y >= 0) {
          const scalar_t* x = cx.x + cx.offset(r / p.inner, r % p.inner);
          const double xy =
              static_cast<double>(cx.logit(static_cast<acc_t>(x[rc.y * p.stride_class]), rc.y));
          rc.syd = focal_grad_factor(cx.gamma, (static_cast<double>(rc.sh) - xy) + rc.L);
        }
        rc.gyd *= rc.syd;
      }
      rc.cpd = g * (math::smoothing_scale(s) * wy * rc.syd + ts * ws);
      rc.cwd = g * ts;
    } else {
      rc.cpd = rc.gyd;
    }
    if (zl != 0) rc.cpd += g * zl * wy;
    rc.gy = static_cast<acc_t>(rc.gyd);
    rc.cp = static_cast<acc_t>(rc.cpd);
    rc.cw = static_cast<acc_t>(rc.cwd);
  }
  return rc;
}

// The gradient at the target class of an index row, in double and rounded once:
// g (1 - s) w_y (p_y - 1) as gy expm1(log p_y), so that a p_y near 1 does not cancel, plus the
// smoothing terms.
template <typename scalar_t, int M, bool HasW>
inline scalar_t target_grad(const Ctx<scalar_t>& cx, const RowCoef<typename AccOf<scalar_t>::type>& rc,
                            scalar_t xy) {
  const double c =
      static_cast<double>(cx.logit(static_cast<typename AccOf<scalar_t>::type>(xy), rc.y));
  const double lp = (c - rc.sh) - static_cast<double>(rc.L);
  double gv = rc.gyd * std::expm1(lp);
  if constexpr (M == kSmooth) {
    gv += (rc.cpd - rc.gyd) * std::exp(lp) - rc.cwd * rc.wyd * rc.syd;
  } else if (rc.cpd != rc.gyd) {  // the z-loss
    gv += (rc.cpd - rc.gyd) * std::exp(lp);
  }
  return static_cast<scalar_t>(gv * cx.cap_slope(c));
}

template <typename scalar_t, int M, bool HasW>
void backward_rows(const Ctx<scalar_t>& cx) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const auto& p = cx.p;
  const int64_t C = cx.C, rows = p.outer * p.inner;
  const double g_all = p.reduction == Reduction::None ? 0.0 : scalar_grad<scalar_t>(p);
  auto* gi = static_cast<scalar_t*>(p.grad_input);
  const Units u = row_units(p);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b * u.rows; r < std::min(rows, e * u.rows); ++r) {
      const int64_t off = cx.offset(r / p.inner, r % p.inner);
      const scalar_t* x = cx.x + off;
      const Target<scalar_t, M>* t = cx.template target<M>(off);
      scalar_t* gr = gi + cx.grad_offset(r / p.inner, r % p.inner);
      const auto rc = row_coef<scalar_t, M, HasW>(cx, r, g_all);
      if (rc.zero || rc.L != rc.L) {  // ignored: 0; NaN where the row's log_softmax is (vexp
                                      // does not carry NaN)
        std::fill(gr, gr + C, rc.L == rc.L ? scalar_t(0) : static_cast<scalar_t>(rc.L));
        continue;
      }
      // the target's logit before the row is written: the gradient may overwrite the logits
      const scalar_t xy = !is_prob(M) && rc.y >= 0 ? x[rc.y] : scalar_t(0);
      const Vec vsh(rc.sh), vL(rc.L), vcp(rc.cp), vcw(rc.cw), vzero(0);
      const acc_t gamma = static_cast<acc_t>(cx.gamma);
      for_blocks<B>(C, [&](int64_t k, int64_t cnt, auto full) {
        Vec v0, v1;
        load_block<decltype(full)::value>(cx, x + k, k, cnt, v0, v1);
        const Vec lp0 = (v0 - vsh) - vL, lp1 = (v1 - vsh) - vL;
        Vec p0, p1, q0, q1;  // q = 1 - p for the focal loss over soft targets
        if (M != kPlain && gamma > 0) {
          vexp_pq(lp0, p0, q0);
          vexp_pq(lp1, p1, q1);
        } else {
          p0 = vexp(lp0);
          p1 = vexp(lp1);
        }
        Vec g0 = vcp * p0, g1 = vcp * p1;
        if constexpr (M == kSmooth || is_prob(M)) {
          Vec f0, f1;
          class_factors<scalar_t, M, HasW, decltype(full)::value>(cx, t, k, cnt, f0, f1);
          if (gamma > 0) {  // the focal loss over soft targets: each class term times s_k
            Vec m0, m1, s0, s1;
            focal_factors(gamma, vzero - lp0, p0, q0, m0, s0);
            focal_factors(gamma, vzero - lp1, p1, q1, m1, s1);
            f0 = f0 * s0;
            f1 = f1 * s1;
          }
          g0 = at::vec::fnmadd(vcw, f0, g0);  // one rounding: cp p - cw f
          g1 = at::vec::fnmadd(vcw, f1, g1);
        }
        cx.cap_slope(v0, v1, g0, g1);
        if constexpr (decltype(full)::value) {
          io::store(gr + k, g0, g1);
        } else {
          io::store(gr + k, cnt, g0, g1);
        }
      });
      if (!is_prob(M) && rc.y >= 0) {
        gr[rc.y] = target_grad<scalar_t, M, HasW>(cx, rc, xy);  // once more, exactly
      }
    }
  });
}


}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
