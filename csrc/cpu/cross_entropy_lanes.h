// The CPU cross-entropy's lane code: (N, C, d...) read in place with a lane per position along
// the contiguous spatial axis (class-contiguous rows of at most kSmallClasses classes go through
// it too: cross_entropy_small_rows.h). Part of cross_entropy_kernel.h; included by it only.
#pragma once

#include "cross_entropy_focal.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------
// Forward, lanes along the contiguous spatial axis of (N, C, d...).

// Most classes whose values the lane forward keeps in a tile between its two passes (16 KiB of
// float32 at B = 32).
constexpr int64_t kTileClasses = 128;

// The tiles and maxes of the lane forward's two passes (see lanes_block_forward).
template <typename scalar_t>
struct LaneTile {
  using acc_t = typename AccOf<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  alignas(64) acc_t v[kTileClasses * IO<scalar_t>::B];
  Vec m0, m1;
};

// Pass 1 of a block, or one class of it: each lane's max into (m0, m1), the values (as acc) into
// the tile when the classes fit. With pf, prefetches the same class a few blocks ahead: the class
// rows are runs far apart in memory, too short for the hardware prefetcher to pick up (without:
// the few-class rows' tiles, already in L1).
template <typename scalar_t, int M>
C10_ALWAYS_INLINE void lanes_max_class(const Ctx<scalar_t>& cx, const scalar_t* x,
                                       const scalar_t* t, int64_t c, int64_t sC, int64_t nl,
                                       bool tiled, LaneTile<scalar_t>& lt, bool pf = true) {
  using io = IO<scalar_t>;
  const int64_t at = c * sC;
  if (pf) {
    prefetch_block(x + at + kPrefetch);
    if constexpr (M == kProb) prefetch_block(t + at + kPrefetch);
  }
  typename io::Vec v0, v1;
  io::load(x + at, nl, v0, v1);
  cx.capped(v0, v1);  // the tile holds the capped logits
  lt.m0 = at::vec::maximum(lt.m0, v0);
  lt.m1 = at::vec::maximum(lt.m1, v1);
  if (tiled) {
    v0.store(lt.v + c * io::B);
    v1.store(lt.v + c * io::B + io::W);
  }
}

template <typename scalar_t, int M>
C10_ALWAYS_INLINE void lanes_max(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                                 int64_t C, int64_t sC, int64_t nl, LaneTile<scalar_t>& lt,
                                 bool pf = true) {
  lt.m0 = lt.m1 = typename IO<scalar_t>::Vec(-std::numeric_limits<typename AccOf<scalar_t>::type>::infinity());
  for (int64_t c = 0; c < C; ++c) {
    lanes_max_class<scalar_t, M>(cx, x, t, c, sC, nl, C <= kTileClasses, lt, pf);
  }
}

// One block of nl <= B lanes: lane k is row r0 + k, with its logit of class c at x[c * sC + k]
// (and its target probability at t[c * sC + k]), its pass 1 done into `cur` (lanes_max). Writes
// the rows' lse (tsum; loss for Reduction::None) and adds the block's loss and divisor to sl and
// sw. The sums are shifted by each lane's max, as row_forward's, and read from the tile: class
// rows a power of two apart (a 128 x 128 image) alias to one set of the L1 cache, so reading them
// again would come from L2. With nx, the same class loop does pass 1 of the next block (nnl
// lanes at nx, tn) into `next`, so that its reads from memory overlap this block's exps (two
// separate passes would wait for memory, then compute).
template <typename scalar_t, int M, bool HasW>
C10_ALWAYS_INLINE void lanes_block_forward(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                                int64_t sC, int64_t nl, int64_t r0, double& sl, double& sw,
                                const LaneTile<scalar_t>& cur, const scalar_t* nx,
                                const scalar_t* tn, int64_t nnl, LaneTile<scalar_t>& next) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const auto& p = cx.p;
  const int64_t C = cx.C;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const Vec vts(cx.t_scale), vtsh(cx.t_shift), vninf(ninf), vzero(0);
  auto* sh_out = static_cast<acc_t*>(p.lse);
  auto* L_out = sh_out + p.outer * p.inner;
  auto* tsum_out = static_cast<acc_t*>(p.tsum);
  auto* loss_out = static_cast<scalar_t*>(p.loss);
  const bool none = p.reduction == Reduction::None;
  const bool tiled = C <= kTileClasses;
  const acc_t* tile = cur.v;
  const Vec m0 = cur.m0, m1 = cur.m1;
  if (nx != nullptr) next.m0 = next.m1 = vninf;
  const Vec sh0 = Vec::blendv(m0, vzero, m0 == vninf), sh1 = Vec::blendv(m1, vzero, m1 == vninf);
  // accumulators local to the loop, so they stay in registers
  Vec e0 = vzero, e1 = vzero, a0 = vzero, a1 = vzero, q0 = vzero, q1 = vzero;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = c * sC;
    if (nx != nullptr) lanes_max_class<scalar_t, M>(cx, nx, tn, c, sC, nnl, tiled, next);
    Vec v0, v1;
    if (tiled) {
      v0 = Vec::loadu(tile + c * B);
      v1 = Vec::loadu(tile + c * B + io::W);
    } else {
      io::load(x + at, nl, v0, v1);
      cx.capped(v0, v1);
    }
    e0 += vexp(v0 - sh0);
    e1 += vexp(v1 - sh1);
    if constexpr (M != kPlain) {
      Vec f0(HasW ? cx.w[c] : acc_t(1)), f1 = f0;  // factor of (x - sh): w_c or w_c t'_c
      if constexpr (M == kProb) {
        Vec t0, t1;
        io::load(t + at, nl, t0, t1);
        f0 = f0 * at::vec::fmadd(t0, vts, vtsh);
        f1 = f1 * at::vec::fmadd(t1, vts, vtsh);
        q0 += f0;
        q1 += f1;
      }
      a0 = at::vec::fmadd(f0, v0 - sh0, a0);
      a1 = at::vec::fmadd(f1, v1 - sh1, a1);
    }
  }
  // The lanes' losses, vectorized (a scalar row_loss per row of 19 classes costs as much as the
  // row); each lane's loss is rounded a few times in acc, then added in double. An ignored lane
  // saves (0, +inf), or (0, NaN) where its logits give NaN.
  Vec L0, L1;
  finish_lse(m0, e0, L0);
  finish_lse(m1, e1, L1);
  Vec s0 = sh0, s1 = sh1;
  const bool soft_focal = cx.template soft_focal<M>();
  if (soft_focal) {  // a and q become A and Q (cross_entropy_focal.h)
    lanes_focal_sums<scalar_t, M, HasW>(cx, x, t, sC, nl, tiled ? tile : nullptr, sh0, sh1, L0,
                                        L1, a0, a1, q0, q1);
    tsum_out = cx.template focal_plane<M>();
  }
  Vec l0, l1, wy0(1), wy1(1);
  if constexpr (M == kProb) {
    if (soft_focal) {  // a lane whose log_softmax is NaN: its loss too (vexp does not carry it)
      l0 = Vec::blendv(a0, L0, L0 != L0);
      l1 = Vec::blendv(a1, L1, L1 != L1);
    } else {
      l0 = q0 * L0 - a0;
      l1 = q1 * L1 - a1;
    }
    if (cx.z > 0) add_z_loss(cx, s0 + L0, s1 + L1, wy0, wy1, l0, l1);
    store_acc(tsum_out + r0, nl, q0, q1);
  } else {
    acc_t wy[B] = {}, xy[B] = {}, kp[B] = {};
    for (int64_t k = 0; k < nl; ++k) {
      const int64_t yv = cx.checked_target(r0 + k);
      if (yv < 0) continue;
      wy[k] = HasW ? cx.w[yv] : acc_t(1);
      xy[k] = cx.capped(static_cast<acc_t>(x[yv * sC + k]));
      kp[k] = 1;
    }
    Vec xy0, xy1, kp0, kp1;
    load_acc(wy, B, wy0, wy1);
    load_acc(xy, B, xy0, xy1);
    load_acc(kp, B, kp0, kp1);
    const Vec nll0 = (s0 - xy0) + L0, nll1 = (s1 - xy1) + L1;
    if constexpr (M == kSmooth) {
      const Vec ks(acc_t(1) - cx.smooth), kt(cx.t_shift), kw(cx.w_sum);
      if (soft_focal) {
        const acc_t gamma = static_cast<acc_t>(cx.gamma);
        l0 = ks * wy0 * focal_loss_factor(gamma, nll0) * nll0 + kt * a0;
        l1 = ks * wy1 * focal_loss_factor(gamma, nll1) * nll1 + kt * a1;
        l0 = Vec::blendv(l0, L0, L0 != L0);  // NaN where the log_softmax is (as above)
        l1 = Vec::blendv(l1, L1, L1 != L1);
        store_acc(tsum_out + r0, nl, q0, q1);
      } else {
        l0 = ks * wy0 * nll0 + kt * (kw * L0 - a0);
        l1 = ks * wy1 * nll1 + kt * (kw * L1 - a1);
      }
    } else {
      l0 = wy0 * nll0;
      l1 = wy1 * nll1;
      if (cx.gamma > 0) {  // the focal loss: each lane's loss times m = (1 - p_y)^gamma, and
                           // s_y saved for the backward (ignored lanes are blended to 0 below)
        const acc_t gamma = static_cast<acc_t>(cx.gamma);
        Vec p0, p1, q0, q1, m0, m1, f0, f1;
        vexp_pq(vzero - nll0, p0, q0);
        vexp_pq(vzero - nll1, p1, q1);
        focal_factors(gamma, nll0, p0, q0, m0, f0);
        focal_factors(gamma, nll1, p1, q1, m1, f1);
        l0 = l0 * m0;
        l1 = l1 * m1;
        store_acc(cx.template focal_plane<M>() + r0, nl, f0, f1);
      }
    }
    const Vec keep0 = kp0 != vzero, keep1 = kp1 != vzero;
    s0 = Vec::blendv(vzero, s0, keep0);
    s1 = Vec::blendv(vzero, s1, keep1);
    L0 = Vec::blendv(ignored_lse(m0), L0, keep0);
    L1 = Vec::blendv(ignored_lse(m1), L1, keep1);
    if (cx.z > 0) add_z_loss(cx, s0 + L0, s1 + L1, wy0, wy1, l0, l1);
    l0 = Vec::blendv(vzero, l0, keep0);
    l1 = Vec::blendv(vzero, l1, keep1);
  }
  store_acc(sh_out + r0, nl, s0, s1);
  store_acc(L_out + r0, nl, L0, L1);
  if (none) {
    io::store(loss_out + r0, nl, l0, l1);
  } else {
    acc_t lt[B], wt[B];
    store_acc(lt, B, l0, l1);
    store_acc(wt, B, wy0, wy1);
    double bl = 0, bw = 0;  // locals: sl and sw are references the compiler would store to
    for (int64_t k = 0; k < nl; ++k) {
      bl += static_cast<double>(lt[k]);
      bw += static_cast<double>(wt[k]);
    }
    sl += bl;
    sw += bw;
  }
}


template <typename scalar_t, int M, bool HasW>
void forward_lanes(const Ctx<scalar_t>& cx) {
  constexpr int64_t B = IO<scalar_t>::B;
  const auto& p = cx.p;
  const Units u = lane_units<scalar_t>(p);
  forward_units(cx, u.count, [&](int64_t unit, double& sl, double& sw) {
    const int64_t o = unit / u.per_outer;
    const int64_t i_begin = (unit % u.per_outer) * u.rows;
    const int64_t i_end = std::min(p.inner, i_begin + u.rows);
    const int64_t off = cx.offset(o, i_begin), n = i_end - i_begin, sC = p.stride_class;
    const scalar_t* x = cx.x + off;
    const scalar_t* t = M == kProb ? cx.t + off : nullptr;
    LaneTile<scalar_t> tiles[2];
    lanes_max<scalar_t, M>(cx, x, t, p.classes, sC, std::min(B, n), tiles[0]);
    for (int64_t j = 0, k = 0; j < n; j += B, k ^= 1) {
      const bool more = j + B < n;
      lanes_block_forward<scalar_t, M, HasW>(
          cx, x + j, M == kProb ? t + j : nullptr, sC, std::min(B, n - j),
          o * p.inner + i_begin + j, sl, sw, tiles[k], more ? x + j + B : nullptr,
          more && M == kProb ? t + j + B : nullptr, more ? std::min(B, n - j - B) : 0,
          tiles[k ^ 1]);
    }
  });
}


// The gradient of one block of nl <= B lanes laid out as for lanes_block_forward, written to
// g[c * sC + k].
template <typename scalar_t, int M, bool HasW>
C10_ALWAYS_INLINE void lanes_block_backward(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                                 scalar_t* g, int64_t sC, int64_t nl, int64_t r0,
                                 double g_all, bool stream, bool pf = true) {
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
    gk[k] = static_cast<acc_t>(k < nl && none ? static_cast<double>(
                                                    static_cast<const scalar_t*>(p.grad_loss)[r0 + k])
                                              : g_all);
    yk[k] = -1;
  }
  acc_t xk[B] = {};  // the focal loss: each lane's target logit
  if constexpr (M != kProb) {
    for (int64_t k = 0; k < nl; ++k) {
      const int64_t yv = cx.checked_target(r0 + k);
      yk[k] = static_cast<acc_t>(yv);
      if (yv >= 0) wyk[k] = HasW ? cx.w[yv] : acc_t(1);
      if (M == kSmooth && cx.gamma > 0 && yv >= 0) {
        xk[k] = cx.capped(static_cast<acc_t>(x[yv * sC + k]));
      }
    }
  }
  Vec sh0, sh1, L0, L1, g0v, g1v, cp0, cp1, cw0(0), cw1(0), gy0(0), gy1(0), y0(-1), y1(-1);
  const Vec vzero(0);
  load_acc(sh_in + r0, nl, sh0, sh1);
  load_acc(sh_in + p.outer * p.inner + r0, nl, L0, L1);
  store_acc(lk, B, L0, L1);  // for the NaN fix-up below
  load_acc(gk, B, g0v, g1v);
  if constexpr (M == kProb) {
    Vec q0, q1;
    load_acc(static_cast<const acc_t*>(p.tsum) + r0, nl, q0, q1);
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
    const Vec ks(acc_t(1) - cx.smooth), zero(0);
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
      Vec kw0(cx.t_shift * cx.w_sum), kw1 = kw0;
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
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = c * sC;
    if (pf) {
      prefetch_block(x + at + kPrefetch);
      if (!stream) prefetch_write_block(g + at + kPrefetch);  // a streamed line is not read
    }
    Vec v0, v1;
    io::load(x + at, nl, v0, v1);
    cx.capped(v0, v1);
    // at the target, cp p - gy in one rounding: g (1 - s) w_y (p_y - 1) does not cancel more
    // than PyTorch's fused grad - exp(out) * sum
    Vec d0(0), d1(0);
    if constexpr (M != kProb) {
      const Vec vc(static_cast<acc_t>(c));
      d0 = vzero - (gy0 & (y0 == vc));
      d1 = vzero - (gy1 & (y1 == vc));
    }
    const Vec lp0 = (v0 - sh0) - L0, lp1 = (v1 - sh1) - L1;
    Vec p0, p1, q0, q1;  // q = 1 - p for the focal loss over soft targets
    if (M != kPlain && cx.gamma > 0) {
      vexp_pq(lp0, p0, q0);
      vexp_pq(lp1, p1, q1);
    } else {
      p0 = vexp(lp0);
      p1 = vexp(lp1);
    }
    Vec g0 = at::vec::fmadd(cp0, p0, d0);
    Vec g1 = at::vec::fmadd(cp1, p1, d1);
    if constexpr (M == kSmooth || M == kProb) {
      Vec w0(HasW ? cx.w[c] : acc_t(1)), w1 = w0;
      if constexpr (M == kProb) {
        if (pf) prefetch_block(t + at + kPrefetch);
        Vec t0, t1;
        io::load(t + at, nl, t0, t1);
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
      g0 = g0 - cw0 * w0;
      g1 = g1 - cw1 * w1;
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
    for (int64_t unit = b; unit < e; ++unit) {
      const int64_t o = unit / u.per_outer;
      const int64_t i_begin = (unit % u.per_outer) * u.rows;
      const int64_t i_end = std::min(p.inner, i_begin + u.rows);
      const int64_t off = cx.offset(o, i_begin);
      for (int64_t j = 0; j < i_end - i_begin; j += B) {
        // full blocks of 64-byte aligned class rows bypass the cache (stream_store)
        const bool stream = reinterpret_cast<uintptr_t>(gi + off + j) % 64 == 0 &&
                            p.stride_class * int64_t(sizeof(scalar_t)) % 64 == 0;
        lanes_block_backward<scalar_t, M, HasW>(
            cx, cx.x + off + j, M == kProb ? cx.t + off + j : nullptr, gi + off + j,
            p.stride_class, std::min(B, i_end - i_begin - j), o * p.inner + i_begin + j, g_all,
            stream);
      }
    }
    stream_fence();
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
