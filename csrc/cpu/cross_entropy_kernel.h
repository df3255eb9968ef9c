// CPU kernels of the fused cross-entropy, written once against at::vec and compiled once per CPU
// capability: cross_entropy_{default,avx2,avx512}.cpp define CPU_CAPABILITY and include this file,
// so everything here lands in weighted_loss::cpu::<capability> and dispatch.cpp picks one at run
// time. Include it from those files only.
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
  __builtin_prefetch(p, 0, 2);
}
inline void prefetch_write(void* p) {
  __builtin_prefetch(p, 1, 3);
}
constexpr int64_t kPrefetch = 256;  // elements ahead along a class row

// The log-sum of a row from its max m and e = sum_c exp(x_c - m): L = log e. The shift saved
// beside L is m, or 0 for a row that is -inf throughout; such a row, and one holding NaN or +inf,
// gets L = NaN: its loss and gradient are NaN, as PyTorch's (its log_softmax is NaN).
template <typename acc_t>
inline void finish_lse(acc_t m, acc_t e, acc_t& sh, double& L) {
  sh = exp_shift(m);
  if (m - m != acc_t(0)) {  // NaN, +inf, or -inf throughout
    L = std::numeric_limits<double>::quiet_NaN();
  } else {
    L = std::log(static_cast<double>(e));  // in double
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
    } else {
      io::load(x + k, cnt, v0, v1);
      keep_valid(cnt, vninf, v0, v1);
    }
    m0 = at::vec::maximum(m0, v0);
    m1 = at::vec::maximum(m1, v1);
  });
  return hmax(at::vec::maximum(m0, m1));
}

// The second pass over a row, with its shift sh (its max): e = sum_c exp(x_c - sh); with kSmooth
// a = sum_c w_c (x_c - sh); with kProb
// a = sum_c w_c t'_c (x_c - sh) and q = sum_c w_c t'_c. Each exp's argument is <= 0, and the
// weighted sums are of terms <= 0 for weights and targets >= 0: nothing cancels.
template <typename scalar_t, int M, bool HasW>
inline void row_sums(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                     typename AccOf<scalar_t>::type sh, typename AccOf<scalar_t>::type& e,
                     typename AccOf<scalar_t>::type& a, typename AccOf<scalar_t>::type& q) {
  using io = IO<scalar_t>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const Vec vsh(sh), vts(cx.t_scale), vtsh(cx.t_shift), vninf(ninf), vzero(0);
  Vec e0(0), e1(0), a0(0), a1(0), q0(0), q1(0);
  for_blocks<B>(cx.C, [&](int64_t c, int64_t cnt, auto full) {
    Vec v0, v1, u0, u1;
    if constexpr (decltype(full)::value) {
      io::load(x + c, v0, v1);
      u0 = v0;
      u1 = v1;
    } else {
      io::load(x + c, cnt, v0, v1);
      u0 = v0;
      u1 = v1;
      keep_valid(cnt, vninf, u0, u1);  // -inf: exp gives 0
    }
    e0 += vexp(u0 - vsh);
    e1 += vexp(u1 - vsh);
    if constexpr (M != kPlain) {
      Vec d0 = v0 - vsh, d1 = v1 - vsh;
      if constexpr (!decltype(full)::value) keep_valid(cnt, vzero, d0, d1);
      Vec w0(1), w1(1);
      if constexpr (HasW) load_acc(cx.w + c, cnt, w0, w1);
      if constexpr (M == kSmooth) {
        a0 = at::vec::fmadd(w0, d0, a0);
        a1 = at::vec::fmadd(w1, d1, a1);
      } else {
        Vec t0, t1;
        if constexpr (decltype(full)::value) {
          io::load(t + c, t0, t1);
        } else {
          io::load(t + c, cnt, t0, t1);
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
  e = hsum(e0 + e1);
  a = hsum(a0 + a1);
  q = hsum(q0 + q1);
}

// The loss of a row from its statistics (see row_sums), in double: the float statistics are
// rounded once each, and nothing after them (PyTorch rounds log_softmax, then w_y times it).
template <typename scalar_t, int M>
inline double row_loss(const Ctx<scalar_t>& cx, double sh, double L, double a, double q, double xy,
                       double wy) {
  if constexpr (M == kProb) return q * L - a;
  const double nll = (sh - xy) + L;
  if constexpr (M == kSmooth) {
    return (1.0 - cx.p.label_smoothing) * wy * nll +
           cx.p.label_smoothing / static_cast<double>(cx.C) * (static_cast<double>(cx.w_sum) * L - a);
  }
  return wy * nll;
}

// Per-row loss, the saved shift and log-sum (sh, L; lse = sh + L), and the row's weight in the
// mean's divisor. Two passes over the row (the second from cache): its max, then the sums
// shifted by it, as PyTorch's log_softmax does.
template <typename scalar_t, int M, bool HasW>
inline void row_forward(const Ctx<scalar_t>& cx, int64_t r, const scalar_t* x, const scalar_t* t,
                        typename AccOf<scalar_t>::type& sh, typename AccOf<scalar_t>::type& L,
                        double& loss, double& wy, typename AccOf<scalar_t>::type& tsum) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t yv = M == kProb ? 0 : cx.checked_target(r);
  const acc_t m = row_max(cx, x);
  if (yv < 0) {
    sh = 0;
    loss = wy = 0;
    L = ignored_lse(m);
    return;
  }
  acc_t e, a, q;
  row_sums<scalar_t, M, HasW>(cx, x, t, exp_shift(m), e, a, q);
  double Ld;
  finish_lse(m, e, sh, Ld);
  L = static_cast<acc_t>(Ld);
  tsum = q;
  wy = M == kProb ? 1.0 : HasW ? static_cast<double>(cx.w[yv]) : 1.0;
  const double xy = M == kProb ? 0.0 : static_cast<double>(x[yv * cx.p.stride_class]);
  loss = row_loss<scalar_t, M>(cx, sh, Ld, a, q, xy, wy);
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
  auto* sh_out = static_cast<acc_t*>(p.lse);
  auto* L_out = sh_out + rows;
  auto* tsum_out = static_cast<acc_t*>(p.tsum);
  auto* loss_out = static_cast<scalar_t*>(p.loss);
  const bool none = p.reduction == Reduction::None;
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      double sl = 0, sw = 0;
      const int64_t r1 = std::min(rows, (unit + 1) * u.rows);
      for (int64_t r = unit * u.rows; r < r1; ++r) {
        const int64_t off = cx.offset(r / p.inner, r % p.inner);
        acc_t sh, L, ts = 0;
        double loss, wy;
        row_forward<scalar_t, M, HasW>(cx, r, cx.x + off, M == kProb ? cx.t + off : nullptr, sh, L,
                                       loss, wy, ts);
        sh_out[r] = sh;
        L_out[r] = L;
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
// the tile when the classes fit. Prefetches the same class a few blocks ahead: the class rows are
// runs far apart in memory, too short for the hardware prefetcher to pick up.
template <typename scalar_t, int M>
C10_ALWAYS_INLINE void lanes_max_class(const scalar_t* x, const scalar_t* t, int64_t c, int64_t sC,
                                       int64_t nl, bool tiled, LaneTile<scalar_t>& lt) {
  using io = IO<scalar_t>;
  const int64_t at = c * sC;
  prefetch(x + at + kPrefetch);
  if constexpr (M == kProb) prefetch(t + at + kPrefetch);
  typename io::Vec v0, v1;
  io::load(x + at, nl, v0, v1);
  lt.m0 = at::vec::maximum(lt.m0, v0);
  lt.m1 = at::vec::maximum(lt.m1, v1);
  if (tiled) {
    v0.store(lt.v + c * io::B);
    v1.store(lt.v + c * io::B + io::W);
  }
}

template <typename scalar_t, int M>
C10_ALWAYS_INLINE void lanes_max(const scalar_t* x, const scalar_t* t, int64_t C, int64_t sC,
                                 int64_t nl, LaneTile<scalar_t>& lt) {
  lt.m0 = lt.m1 = typename IO<scalar_t>::Vec(-std::numeric_limits<typename AccOf<scalar_t>::type>::infinity());
  for (int64_t c = 0; c < C; ++c) lanes_max_class<scalar_t, M>(x, t, c, sC, nl, C <= kTileClasses, lt);
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
    if (nx != nullptr) lanes_max_class<scalar_t, M>(nx, tn, c, sC, nnl, tiled, next);
    Vec v0, v1;
    if (tiled) {
      v0 = Vec::loadu(tile + c * B);
      v1 = Vec::loadu(tile + c * B + io::W);
    } else {
      io::load(x + at, nl, v0, v1);
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
  Vec s0 = Vec::blendv(m0, vzero, m0 == vninf), s1 = Vec::blendv(m1, vzero, m1 == vninf);
  Vec l0, l1, wy0(1), wy1(1);
  if constexpr (M == kProb) {
    l0 = q0 * L0 - a0;
    l1 = q1 * L1 - a1;
    store_acc(tsum_out + r0, nl, q0, q1);
  } else {
    acc_t wy[B] = {}, xy[B] = {}, kp[B] = {};
    for (int64_t k = 0; k < nl; ++k) {
      const int64_t yv = cx.checked_target(r0 + k);
      if (yv < 0) continue;
      wy[k] = HasW ? cx.w[yv] : acc_t(1);
      xy[k] = static_cast<acc_t>(x[yv * sC + k]);
      kp[k] = 1;
    }
    Vec xy0, xy1, kp0, kp1;
    load_acc(wy, B, wy0, wy1);
    load_acc(xy, B, xy0, xy1);
    load_acc(kp, B, kp0, kp1);
    const Vec nll0 = (s0 - xy0) + L0, nll1 = (s1 - xy1) + L1;
    if constexpr (M == kSmooth) {
      const Vec ks(acc_t(1) - cx.smooth), kt(cx.t_shift), kw(cx.w_sum);
      l0 = ks * wy0 * nll0 + kt * (kw * L0 - a0);
      l1 = ks * wy1 * nll1 + kt * (kw * L1 - a1);
    } else {
      l0 = wy0 * nll0;
      l1 = wy1 * nll1;
    }
    const Vec keep0 = kp0 != vzero, keep1 = kp1 != vzero;
    const Vec inf(std::numeric_limits<acc_t>::infinity());
    const Vec nan(std::numeric_limits<acc_t>::quiet_NaN());
    s0 = Vec::blendv(vzero, s0, keep0);
    s1 = Vec::blendv(vzero, s1, keep1);
    L0 = Vec::blendv(Vec::blendv(nan, inf, (m0 - m0) == vzero), L0, keep0);
    L1 = Vec::blendv(Vec::blendv(nan, inf, (m1 - m1) == vzero), L1, keep1);
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
    lanes_max<scalar_t, M>(x, t, p.classes, sC, std::min(B, n), tiles[0]);
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

// ---------------------------------------------------------------------------------------------
// Backward. Per row the gradient is  g * (cp * p_k - cw * w_k * t'_k)  minus  g (1 - s) w_y at
// k == y for index targets, where g is the upstream gradient of the row's loss (already divided
// by the mean's divisor), cp the coefficient of the softmax and cw that of the weight term. The
// coefficients are computed in double and rounded once.

template <typename scalar_t>
inline double scalar_grad(const CrossEntropyParams& p) {
  using acc_t = typename AccOf<scalar_t>::type;
  const double g = static_cast<double>(*static_cast<const scalar_t*>(p.grad_loss));
  if (p.reduction != Reduction::Mean) return g;
  const double denom = p.prob_target ? static_cast<double>(p.outer * p.inner)
                                     : static_cast<double>(*static_cast<const acc_t*>(p.total_weight));
  return g / denom;
}

// What the backward of one row needs besides the logits.
template <typename acc_t>
struct RowCoef {
  acc_t sh = 0, L = 0;                     // the saved shift and log-sum: p_k = exp(x_k - sh - L)
  acc_t cp = 0, cw = 0, gy = 0;            // gy: g (1 - s) w_y, subtracted at k == y
  double cpd = 0, cwd = 0, gyd = 0;        // the same in double, for the target element
  int64_t y = -1;                          // -1: ignored row (index) / no delta (prob)
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
  if (p.reduction == Reduction::None) g = static_cast<double>(static_cast<const scalar_t*>(p.grad_loss)[r]);
  if constexpr (M == kProb) {
    rc.cp = static_cast<acc_t>(g * static_cast<double>(static_cast<const acc_t*>(p.tsum)[r]));
    rc.cw = static_cast<acc_t>(g);
  } else {
    const int64_t yv = cx.checked_target(r);
    if (yv < 0) {
      rc.zero = true;
      return rc;
    }
    const double wy = HasW ? static_cast<double>(cx.w[yv]) : 1.0;
    const double s = M == kSmooth ? p.label_smoothing : 0.0;
    rc.y = yv;
    rc.gyd = g * (1.0 - s) * wy;
    if constexpr (M == kSmooth) {
      const double ts = s / static_cast<double>(cx.C);
      rc.cpd = g * ((1.0 - s) * wy + ts * static_cast<double>(cx.w_sum));
      rc.cwd = g * ts;
    } else {
      rc.cpd = rc.gyd;
    }
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
  const double lp = (static_cast<double>(xy) - rc.sh) - static_cast<double>(rc.L);
  double gv = rc.gyd * std::expm1(lp);
  if constexpr (M == kSmooth) {
    gv += (rc.cpd - rc.gyd) * std::exp(lp) - rc.cwd * (HasW ? static_cast<double>(cx.w[rc.y]) : 1.0);
  }
  return static_cast<scalar_t>(gv);
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
      if (rc.zero || rc.L != rc.L) {  // ignored: 0; NaN where the row's log_softmax is (vexp
                                      // does not carry NaN)
        std::fill(gr, gr + C, rc.L == rc.L ? scalar_t(0) : static_cast<scalar_t>(rc.L));
        continue;
      }
      const Vec vsh(rc.sh), vL(rc.L), vcp(rc.cp), vcw(rc.cw);
      for_blocks<B>(C, [&](int64_t k, int64_t cnt, auto full) {
        Vec v0, v1;
        if constexpr (decltype(full)::value) {
          io::load(x + k, v0, v1);
        } else {
          io::load(x + k, cnt, v0, v1);
        }
        Vec g0 = vcp * vexp((v0 - vsh) - vL), g1 = vcp * vexp((v1 - vsh) - vL);
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
        gr[rc.y] = target_grad<scalar_t, M, HasW>(cx, rc, x[rc.y]);  // once more, exactly
      }
    }
  });
}

// The gradient of one block of nl <= B lanes laid out as for lanes_block_forward, written to
// g[c * sC + k].
template <typename scalar_t, int M, bool HasW>
C10_ALWAYS_INLINE void lanes_block_backward(const Ctx<scalar_t>& cx, const scalar_t* x, const scalar_t* t,
                                 scalar_t* g, int64_t sC, int64_t nl, int64_t r0,
                                 double g_all, bool stream) {
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
  if constexpr (M != kProb) {
    for (int64_t k = 0; k < nl; ++k) {
      const int64_t yv = cx.checked_target(r0 + k);
      yk[k] = static_cast<acc_t>(yv);
      if (yv >= 0) wyk[k] = HasW ? cx.w[yv] : acc_t(1);
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
    cw0 = g0v;
    cw1 = g1v;
  } else {
    Vec wy0, wy1;
    load_acc(yk, B, y0, y1);
    load_acc(wyk, B, wy0, wy1);
    const Vec ks(acc_t(1) - cx.smooth), zero(0);
    const Vec keep0 = y0 >= zero, keep1 = y1 >= zero;
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
    if (!stream) prefetch_write(g + at + kPrefetch);  // a streamed line is not read
    Vec v0, v1;
    io::load(x + at, nl, v0, v1);
    // at the target, cp p - gy in one rounding: g (1 - s) w_y (p_y - 1) does not cancel more
    // than PyTorch's fused grad - exp(out) * sum
    Vec d0(0), d1(0);
    if constexpr (M != kProb) {
      const Vec vc(static_cast<acc_t>(c));
      d0 = vzero - (gy0 & (y0 == vc));
      d1 = vzero - (gy1 & (y1 == vc));
    }
    Vec g0 = at::vec::fmadd(cp0, vexp((v0 - sh0) - L0), d0);
    Vec g1 = at::vec::fmadd(cp1, vexp((v1 - sh1) - L1), d1);
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
  using acc_t = typename AccOf<scalar_t>::type;
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
  forward_units(cx, u.count, [&](int64_t unit, double& sl, double& sw) {
    alignas(64) scalar_t xt[kSmallClasses * B], tt[M == kProb ? kSmallClasses * B : 1];
    LaneTile<scalar_t> lt;
    const int64_t r_end = std::min(rows, (unit + 1) * u.rows);
    for (int64_t r0 = unit * u.rows; r0 < r_end; r0 += B) {
      const int64_t nl = std::min(B, r_end - r0);
      int64_t off[B];
      load_row_tile<scalar_t, M == kProb>(cx, r0, nl, off, xt, tt);
      lanes_max<scalar_t, M>(xt, tt, cx.C, B, nl, lt);
      lanes_block_forward<scalar_t, M, HasW>(cx, xt, tt, B, nl, r0, sl, sw, lt, nullptr, nullptr, 0,
                                             lt);
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
  const double g_all = p.reduction == Reduction::None ? 0.0 : scalar_grad<scalar_t>(p);
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
        lanes_block_backward<scalar_t, M, HasW>(cx, xt, tt, gt, B, nl, r0, g_all, false);
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
  const double g_all = p.reduction == Reduction::None ? 0.0 : scalar_grad<scalar_t>(p);
  const auto* sh_in = static_cast<const acc_t*>(p.lse);
  const auto* L_in = sh_in + rows;
  auto* gt = static_cast<scalar_t*>(p.grad_target);
  const bool none = p.reduction == Reduction::None;
  auto coef = [&](int64_t r) {
    const double g = none ? static_cast<double>(static_cast<const scalar_t*>(p.grad_loss)[r]) : g_all;
    return static_cast<acc_t>(-g * (1.0 - (p.label_smoothing > 0 ? p.label_smoothing : 0.0)));
  };
  if (sC == 1) {
    const Units u = row_units(p);
    at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b * u.rows; r < std::min(rows, e * u.rows); ++r) {
        const int64_t off = cx.offset(r / p.inner, r % p.inner);
        const acc_t k0 = coef(r);
        const Vec vk(k0), vsh(sh_in[r]), vL(L_in[r]);
        for_blocks<B>(C, [&](int64_t k, int64_t cnt, auto full) {
          Vec v0, v1;
          if constexpr (decltype(full)::value) {
            io::load(cx.x + off + k, v0, v1);
          } else {
            io::load(cx.x + off + k, cnt, v0, v1);
          }
          Vec g0 = vk * ((v0 - vsh) - vL), g1 = vk * ((v1 - vsh) - vL);
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
        acc_t kk[B] = {};
        for (int64_t k = 0; k < nl; ++k) kk[k] = coef(o * p.inner + i0 + k);
        const Vec k0 = Vec::loadu(kk), k1 = Vec::loadu(kk + W);
        const int64_t r0 = o * p.inner + i0;
        Vec s0, s1, l0, l1;
        load_acc(sh_in + r0, nl, s0, s1);
        load_acc(L_in + r0, nl, l0, l1);
        for (int64_t c = 0; c < C; ++c) {
          Vec v0, v1;
          prefetch(cx.x + base + c * sC + u.rows);
          io::load(cx.x + base + c * sC, nl, v0, v1);
          Vec g0 = k0 * ((v0 - s0) - l0), g1 = k1 * ((v1 - s1) - l1);
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
