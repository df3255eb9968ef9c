// The CPU cross-entropy's lane code, forward: (N, C, d...) read in place with a lane per position
// along the contiguous spatial axis (class-contiguous rows of at most kSmallClasses classes go
// through it too: cross_entropy_small_rows.h); the backward in cross_entropy_lanes_backward.h.
// Part of cross_entropy_kernel.h; included by it and cross_entropy_small_rows.h only.
#pragma once

#include "cross_entropy_focal.h"
#include "cross_entropy_overlap.h"

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
                                       const Target<scalar_t, M>* t, int64_t c, int64_t sC,
                                       int64_t nl,
                                       bool tiled, LaneTile<scalar_t>& lt, bool pf = true) {
  using io = IO<scalar_t>;
  const int64_t at = c * sC;
  if (pf) {
    prefetch_block(x + at + kPrefetch);
    if constexpr (is_prob(M)) prefetch_block(t + at + kPrefetch);
  }
  typename io::Vec v0, v1;
  io::load(x + at, nl, v0, v1);
  cx.lane_logits(v0, c);  // the tile holds the logits the loss sees (capped or adjusted)
  cx.lane_logits(v1, c);
  lt.m0 = at::vec::maximum(lt.m0, v0);
  lt.m1 = at::vec::maximum(lt.m1, v1);
  if (tiled) {
    v0.store(lt.v + c * io::B);
    v1.store(lt.v + c * io::B + io::W);
  }
}

template <typename scalar_t, int M>
C10_ALWAYS_INLINE void lanes_max(const Ctx<scalar_t>& cx, const scalar_t* x,
                                 const Target<scalar_t, M>* t,
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
C10_ALWAYS_INLINE void lanes_block_forward(const Ctx<scalar_t>& cx, const scalar_t* x,
                                           const Target<scalar_t, M>* t, int64_t sC, int64_t nl,
                                           int64_t r0, double& sl, double& sw,
                                           const LaneTile<scalar_t>& cur, const scalar_t* nx,
                                           const Target<scalar_t, M>* tn, int64_t nnl,
                                           LaneTile<scalar_t>& next) {
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
  const bool none = p.reduction == Reduction::None;
  const bool tiled = C <= kTileClasses;
  const acc_t* tile = cur.v;
  const Vec m0 = cur.m0, m1 = cur.m1;
  if (nx != nullptr) next.m0 = next.m1 = vninf;
  const Vec sh0 = Vec::blendv(m0, vzero, m0 == vninf), sh1 = Vec::blendv(m1, vzero, m1 == vninf);
  // accumulators local to the loop, so they stay in registers
  Vec e0 = vzero, e1 = vzero, a0 = vzero, a1 = vzero, q0 = vzero, q1 = vzero;
  // the exp sums compensated (Kahan): a float sum of even 19 terms cost the gradient 2x
  // PyTorch's error; the weighted sums in double every kLaneFlush classes (DoubleLanes)
  Vec k0 = vzero, k1 = vzero, kq0 = vzero, kq1 = vzero;
  const bool flushed = M != kPlain && C > kLaneFlush;
  DoubleLanes<acc_t> as, qs;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = c * sC;
    if (nx != nullptr) lanes_max_class<scalar_t, M>(cx, nx, tn, c, sC, nnl, tiled, next);
    Vec v0, v1;
    if (tiled) {
      v0 = Vec::loadu(tile + c * B);
      v1 = Vec::loadu(tile + c * B + io::W);
    } else {
      io::load(x + at, nl, v0, v1);
      cx.lane_logits(v0, c);
      cx.lane_logits(v1, c);
    }
    kahan_add(e0, k0, vexp(v0 - sh0));
    kahan_add(e1, k1, vexp(v1 - sh1));
    if constexpr (M != kPlain) {
      Vec f0(HasW ? cx.w[c] : acc_t(1)), f1 = f0;  // factor of (x - sh): w_c s / C or w_c t'_c
      if constexpr (is_prob(M)) {
        Vec t0, t1;
        IO<Target<scalar_t, M>>::load(t + at, nl, t0, t1);
        f0 = f0 * at::vec::fmadd(t0, vts, vtsh);
        f1 = f1 * at::vec::fmadd(t1, vts, vtsh);
        // compensated too: W = sum_c w_c t'_c is every gradient element's coefficient (a
        // float sum of 64 terms, 1.3 ulp off, made the gradient 2x PyTorch's error)
        kahan_add(q0, kq0, f0);
        kahan_add(q1, kq1, f1);
      }
      if constexpr (M == kSmooth) {  // a's terms times s / C (Ctx::t_shift)
        f0 = f0 * vtsh;
        f1 = f1 * vtsh;
      }
      a0 = at::vec::fmadd(f0, v0 - sh0, a0);
      a1 = at::vec::fmadd(f1, v1 - sh1, a1);
      if (flushed && c % kLaneFlush == kLaneFlush - 1) {
        as.take(a0, a1);
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
    as.take(a0, a1);
    qs.take(q0, q1);
    as.load(a0, a1);
    qs.load(q0, q1);
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
  if constexpr (is_prob(M)) {
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
      xy[k] = cx.logit(static_cast<acc_t>(x[yv * sC + k]), yv);
      kp[k] = 1;
    }
    Vec xy0, xy1, kp0, kp1;
    load_acc(wy, B, wy0, wy1);
    load_acc(xy, B, xy0, xy1);
    load_acc(kp, B, kp0, kp1);
    const Vec nll0 = (s0 - xy0) + L0, nll1 = (s1 - xy1) + L1;
    if constexpr (M == kSmooth) {
      const Vec ks(cx.t_scale), kt(cx.t_shift), kw(static_cast<acc_t>(cx.w_sum));
      if (soft_focal) {
        const acc_t gamma = static_cast<acc_t>(cx.gamma);
        l0 = ks * wy0 * focal_loss_factor(gamma, nll0) * nll0 + a0;
        l1 = ks * wy1 * focal_loss_factor(gamma, nll1) * nll1 + a1;
        l0 = Vec::blendv(l0, L0, L0 != L0);  // NaN where the log_softmax is (as above)
        l1 = Vec::blendv(l1, L1, L1 != L1);
        store_acc(tsum_out + r0, nl, q0, q1);
      } else {
        l0 = ks * wy0 * nll0 + (kt * kw * L0 - a0);
        l1 = ks * wy1 * nll1 + (kt * kw * L1 - a1);
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
    store_values<scalar_t>(p.loss, cx.loss_acc, r0, nl, l0, l1);
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
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int64_t B = IO<scalar_t>::B;
  const auto& p = cx.p;
  const Units u = lane_units<scalar_t>(p);
  const bool overlap = p.overlap_sums != nullptr;
  std::vector<double> part(overlap ? u.count * 3 * p.classes : 0);
  forward_units(cx, u.count, [&](int64_t unit, double& sl, double& sw) {
    const LaneSpan span(p, u, unit);
    const int64_t o = span.o, i_begin = span.begin, i_end = span.end;
    const int64_t off = cx.offset(o, i_begin), n = i_end - i_begin, sC = p.stride_class;
    const scalar_t* x = cx.x + off;
    const Target<scalar_t, M>* t = cx.template target<M>(off);
    LaneTile<scalar_t> tiles[2];
    lanes_max<scalar_t, M>(cx, x, t, p.classes, sC, std::min(B, n), tiles[0]);
    std::optional<OverlapUnit<acc_t>> ov;
    if (overlap) ov.emplace(p.classes, B);
    for (int64_t j = 0, k = 0; j < n; j += B, k ^= 1) {
      const bool more = j + B < n;
      const int64_t nl = std::min(B, n - j), r0 = o * p.inner + i_begin + j;
      lanes_block_forward<scalar_t, M, HasW>(
          cx, x + j, is_prob(M) ? t + j : nullptr, sC, nl, r0, sl, sw, tiles[k],
          more ? x + j + B : nullptr, more && is_prob(M) ? t + j + B : nullptr,
          more ? std::min(B, n - j - B) : 0, tiles[k ^ 1]);
      if (overlap) {  // the block's tile is still whole: the next block's went to the other
        lanes_overlap_forward<scalar_t, M>(cx, x + j, is_prob(M) ? t + j : nullptr, sC, nl, r0,
                                           p.classes <= kTileClasses ? tiles[k].v : nullptr, *ov);
      }
    }
    if (overlap) {
      ov->flush(B);
      std::copy(ov->sums.begin(), ov->sums.end(), part.begin() + unit * 3 * p.classes);
    }
  });
  if (overlap) finish_overlap<acc_t>(p, u.per_outer, part);
}


}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
