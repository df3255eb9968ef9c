// The CPU cross-entropy's overlap sums (params.h: overlap_sums), the Dice family's statistics,
// computed beside the loss by the lane code: per item and class, I = sum p t, P = sum p (or
// p^2), T = sum t (or t^2) over the positions not ignored, p the softmax the loss already has.
// The backward adds their gradient through the softmax: with dL/dp_c = a_c t_c + b_c m_c
// (m_c = 1, or 2 p_c when squared) and S = sum_k p_k dL/dp_k per position,
//   dL/dx_c += p_c (dL/dp_c - S).
// Deterministic: each lane adds in acc over at most kOverlapFlush blocks, then in double; the
// units' partial sums are added in unit order. Part of cross_entropy_kernel.h; included by
// cross_entropy_lanes.h only.
#pragma once

#include "cross_entropy_common.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
template <typename scalar_t>
using acc_t_of = typename AccOf<scalar_t>::type;

// Blocks of lanes a lane's sums add in acc before they are added in double.
constexpr int64_t kOverlapFlush = 8;

// One work unit's partial sums: B lanes per (plane, class) in acc, flushed into double per
// (plane, class).
template <typename acc_t>
struct OverlapUnit {
  std::vector<acc_t> lanes;   // 3 * C * B
  std::vector<double> sums;   // 3 * C
  int64_t blocks = 0;
  OverlapUnit(int64_t C, int64_t B) : lanes(3 * C * B, acc_t(0)), sums(3 * C, 0.0) {}
  void flush(int64_t B) {
    for (size_t j = 0; j < sums.size(); ++j) {
      double s = 0;
      for (int64_t k = 0; k < B; ++k) s += static_cast<double>(lanes[j * B + k]);
      sums[j] += s;
    }
    std::fill(lanes.begin(), lanes.end(), acc_t(0));
    blocks = 0;
  }
};

// The lanes of a block that count: not ignored (index targets) and within the block's nl.
template <typename scalar_t, int M>
C10_ALWAYS_INLINE void overlap_lanes(const Ctx<scalar_t>& cx, int64_t r0, int64_t nl,
                                     typename AccOf<scalar_t>::type* yk) {
  constexpr int64_t B = IO<scalar_t>::B;
  for (int64_t k = 0; k < B; ++k) {
    yk[k] = -1;
    if (k >= nl) continue;
    yk[k] = is_prob(M) ? 0 : static_cast<typename AccOf<scalar_t>::type>(
                                 cx.checked_target(r0 + k));
  }
}

// Lane k's target t_c: [y_k == c] for indices, the probability as given otherwise.
template <typename scalar_t, int M>
C10_ALWAYS_INLINE void overlap_target(const Target<scalar_t, M>* t, int64_t at, int64_t nl,
                                      int64_t c, const Vectorized<typename AccOf<scalar_t>::type>& y0,
                                      const Vectorized<typename AccOf<scalar_t>::type>& y1,
                                      Vectorized<typename AccOf<scalar_t>::type>& t0,
                                      Vectorized<typename AccOf<scalar_t>::type>& t1) {
  using Vec = Vectorized<typename AccOf<scalar_t>::type>;
  if constexpr (is_prob(M)) {
    IO<Target<scalar_t, M>>::load(t + at, nl, t0, t1);
  } else {
    const Vec vc(static_cast<typename AccOf<scalar_t>::type>(c)), one(1);
    t0 = one & (y0 == vc);
    t1 = one & (y1 == vc);
  }
}

// Adds one block's I, P, T to the unit's lanes. The block's (sh, L) are saved in p.lse at r0;
// `tile`, when not null, holds its logits as the loss reads them (lanes_block_forward's).
template <typename scalar_t, int M>
C10_ALWAYS_INLINE void lanes_overlap_forward(const Ctx<scalar_t>& cx, const scalar_t* x,
                                             const Target<scalar_t, M>* t, int64_t sC,
                                             int64_t nl, int64_t r0,
                                             const typename AccOf<scalar_t>::type* tile,
                                             OverlapUnit<typename AccOf<scalar_t>::type>& u) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B, W = io::W;
  const auto& p = cx.p;
  const int64_t C = cx.C;
  const auto* sh_in = static_cast<const acc_t*>(p.lse);
  acc_t yk[B];
  overlap_lanes<scalar_t, M>(cx, r0, nl, yk);
  Vec sh0, sh1, L0, L1, y0, y1;
  load_acc(sh_in + r0, nl, sh0, sh1);
  load_acc(sh_in + p.outer * p.inner + r0, nl, L0, L1);
  load_acc(yk, B, y0, y1);
  const Vec zero(0);
  const Vec keep0 = y0 >= zero, keep1 = y1 >= zero;
  const bool sq = p.overlap_squared;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = c * sC;
    Vec v0, v1;
    if (tile != nullptr) {
      v0 = Vec::loadu(tile + c * B);
      v1 = Vec::loadu(tile + c * B + W);
    } else {
      io::load(x + at, nl, v0, v1);
      cx.lane_logits(v0, c);
      cx.lane_logits(v1, c);
    }
    // blended, not multiplied: an ignored lane's p may be NaN. A NaN log-probability (a +inf
    // or NaN logit) gives a NaN p, as PyTorch's softmax does (vexp would give 0).
    const Vec a0 = (v0 - sh0) - L0, a1 = (v1 - sh1) - L1;
    const Vec p0 = Vec::blendv(zero, Vec::blendv(vexp(a0), a0, a0 != a0), keep0);
    const Vec p1 = Vec::blendv(zero, Vec::blendv(vexp(a1), a1, a1 != a1), keep1);
    Vec t0, t1;
    overlap_target<scalar_t, M>(t, at, nl, c, y0, y1, t0, t1);
    t0 = Vec::blendv(zero, t0, keep0);
    t1 = Vec::blendv(zero, t1, keep1);
    acc_t* l = u.lanes.data() + c * B;
    acc_t* lp = l + C * B;
    acc_t* lt = lp + C * B;
    at::vec::fmadd(p0, t0, Vec::loadu(l)).store(l);
    at::vec::fmadd(p1, t1, Vec::loadu(l + W)).store(l + W);
    (sq ? at::vec::fmadd(p0, p0, Vec::loadu(lp)) : p0 + Vec::loadu(lp)).store(lp);
    (sq ? at::vec::fmadd(p1, p1, Vec::loadu(lp + W)) : p1 + Vec::loadu(lp + W)).store(lp + W);
    (sq ? at::vec::fmadd(t0, t0, Vec::loadu(lt)) : t0 + Vec::loadu(lt)).store(lt);
    (sq ? at::vec::fmadd(t1, t1, Vec::loadu(lt + W)) : t1 + Vec::loadu(lt + W)).store(lt + W);
  }
  if (++u.blocks == kOverlapFlush) u.flush(B);
}

// The sums of every unit, added per item in unit order into p.overlap_sums (outer, 3, C).
template <typename acc_t>
void finish_overlap(const CrossEntropyParams& p, int64_t per_outer,
                    const std::vector<double>& part) {
  const int64_t C = p.classes;
  auto* out = static_cast<acc_t*>(p.overlap_sums);
  for (int64_t o = 0; o < p.outer; ++o) {
    for (int64_t j = 0; j < 3 * C; ++j) {
      double s = 0;
      for (int64_t k = 0; k < per_outer; ++k) s += part[((o * per_outer) + k) * 3 * C + j];
      out[o * 3 * C + j] = static_cast<acc_t>(s);
    }
  }
}

// The backward's per-lane S = sum_k p_k (a_k t_k + b_k m_k) of one block, p from the saved
// (sh, L) (zero on ignored lanes, whose L is +inf): the focal term's path. Without it the
// backward recomputes (sh, L) and S in one pass (cross_entropy_lanes_backward.h).
template <typename scalar_t, int M>
C10_ALWAYS_INLINE void overlap_backward_sum(const Ctx<scalar_t>& cx, const scalar_t* x,
                                            const Target<scalar_t, M>* t, int64_t sC, int64_t nl,
                                            const acc_t_of<scalar_t>* ab,
                                            const Vectorized<acc_t_of<scalar_t>>& y0,
                                            const Vectorized<acc_t_of<scalar_t>>& y1,
                                            const Vectorized<acc_t_of<scalar_t>>& sh0,
                                            const Vectorized<acc_t_of<scalar_t>>& sh1,
                                            const Vectorized<acc_t_of<scalar_t>>& L0,
                                            const Vectorized<acc_t_of<scalar_t>>& L1,
                                            Vectorized<acc_t_of<scalar_t>>& S0,
                                            Vectorized<acc_t_of<scalar_t>>& S1) {
  using io = IO<scalar_t>;
  using Vec = typename io::Vec;
  const int64_t C = cx.C;
  const Vec two(2);
  const bool sq = cx.p.overlap_squared;
  S0 = S1 = Vec(0);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t at = c * sC;
    Vec v0, v1;
    io::load(x + at, nl, v0, v1);
    cx.lane_logits(v0, c);
    cx.lane_logits(v1, c);
    const Vec p0 = vexp((v0 - sh0) - L0), p1 = vexp((v1 - sh1) - L1);
    Vec t0, t1;
    overlap_target<scalar_t, M>(t, at, nl, c, y0, y1, t0, t1);
    const Vec a(ab[c]), b(ab[C + c]);
    const Vec d0 = at::vec::fmadd(a, t0, sq ? b * two * p0 : b);
    const Vec d1 = at::vec::fmadd(a, t1, sq ? b * two * p1 : b);
    S0 = at::vec::fmadd(p0, d0, S0);
    S1 = at::vec::fmadd(p1, d1, S1);
  }
}

// Class c's share of the overlap gradient, p_c (dL/dp_c - S), added to g.
template <typename scalar_t, int M>
C10_ALWAYS_INLINE void overlap_backward_add(const Ctx<scalar_t>& cx,
                                            const Target<scalar_t, M>* t, int64_t at, int64_t nl,
                                            int64_t c, const acc_t_of<scalar_t>* ab,
                                            const Vectorized<acc_t_of<scalar_t>>& y0,
                                            const Vectorized<acc_t_of<scalar_t>>& y1,
                                            const Vectorized<acc_t_of<scalar_t>>& p0,
                                            const Vectorized<acc_t_of<scalar_t>>& p1,
                                            const Vectorized<acc_t_of<scalar_t>>& S0,
                                            const Vectorized<acc_t_of<scalar_t>>& S1,
                                            Vectorized<acc_t_of<scalar_t>>& g0,
                                            Vectorized<acc_t_of<scalar_t>>& g1) {
  using Vec = Vectorized<acc_t_of<scalar_t>>;
  const int64_t C = cx.C;
  const Vec two(2);
  const bool sq = cx.p.overlap_squared;
  Vec t0, t1;
  overlap_target<scalar_t, M>(t, at, nl, c, y0, y1, t0, t1);
  const Vec a(ab[c]), b(ab[C + c]);
  const Vec d0 = at::vec::fmadd(a, t0, sq ? b * two * p0 : b) - S0;
  const Vec d1 = at::vec::fmadd(a, t1, sq ? b * two * p1 : b) - S1;
  if constexpr (is_prob(M)) {
    g0 = at::vec::fmadd(p0, d0, g0);
    g1 = at::vec::fmadd(p1, d1, g1);
  } else {  // blended: an ignored lane adds nothing, even where its item's d and S are NaN
    const Vec zero(0);
    g0 = Vec::blendv(g0, at::vec::fmadd(p0, d0, g0), y0 >= zero);
    g1 = Vec::blendv(g1, at::vec::fmadd(p1, d1, g1), y1 >= zero);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
