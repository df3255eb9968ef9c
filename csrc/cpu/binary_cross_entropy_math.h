// The elementwise math of the CPU BCE-with-logits kernels (binary_cross_entropy_kernel.h): the
// stable log-sigmoid terms and the sigmoid focal loss's factors, one vector of elements at a
// time. Part of binary_cross_entropy_kernel.h (see there for the formulas); included by it only,
// inside its CPU_CAPABILITY namespace.
#pragma once

#include <limits>

#include "vec_common.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, and atanh(s) / s as a
// degree-4 polynomial in s^2 on [0, 1/9] (least squares on Chebyshev nodes; 4e-9 off in exact
// arithmetic, about 4 ulp in float). Inline, and accurate for tiny e, where log(1 + e) would
// round to 0.
inline Vectorized<float> log1p_unit(const Vectorized<float>& e) {
  using V = Vectorized<float>;
  const V s = e / (e + V(2.f));
  const V s2 = s * s;
  V r = V(0.14087328f);
  r = at::vec::fmadd(r, s2, V(0.13980709f));
  r = at::vec::fmadd(r, s2, V(0.20012426f));
  r = at::vec::fmadd(r, s2, V(0.33333158f));
  r = at::vec::fmadd(r, s2, V(1.f));
  return (s + s) * r;
}
inline Vectorized<double> log1p_unit(const Vectorized<double>& e) {
  return e.log1p();
}

// e = exp(-|x|), NaN where x is NaN.
template <typename acc_t>
inline Vectorized<acc_t> exp_neg_abs(const Vectorized<acc_t>& x) {
  using V = Vectorized<acc_t>;
  const V e = vexp(V(0) - x.abs());
  return V::blendv(e, x, x != x);
}

// The loss of one vector of elements, without the weight w, as
//   (1 + (P - 1) t) log1p(e) + (x >= 0 ? (1 - t) x : -P t x)
// whose terms are both >= 0 for P >= 0: nothing cancels (softplus(x) - t x would lose log1p(e)
// next to a large x). A NaN in x reaches the result through the second term.
template <typename acc_t>
inline Vectorized<acc_t> bce_loss(const Vectorized<acc_t>& x, const Vectorized<acc_t>& t,
                                  const Vectorized<acc_t>& pw) {
  using V = Vectorized<acc_t>;
  const V zero(0), one(1);
  const V sp = log1p_unit(vexp(zero - x.abs()));
  const V a = one - t, b = pw * t;
  const V lin = x * V::blendv(zero - b, a, x >= zero);
  // x = -inf: PyTorch's (1 - t) x + (1 + (P - 1) t) (log1p(e) - min(x, 0)) as IEEE arithmetic
  // gives it, a x - (a + b) x: NaN where the infinities cancel (targets in [0, 1]), +-inf where
  // they agree (targets outside); elsewhere PyTorch's own NaN and inf fall out of this form too
  const V loss = at::vec::fmadd(a + b, sp, lin);
  return V::blendv(loss, a * x - (a + b) * x, x == V(-std::numeric_limits<acc_t>::infinity()));
}

// BCE of probabilities p (params.h: prob_input), PyTorch's form with pos_weight P on the positive
// term: (t - 1) max(log1p(-p), -100) - P t max(log p, -100), exactly PyTorch's at P = 1.
template <typename acc_t>
inline Vectorized<acc_t> bce_prob_loss(const Vectorized<acc_t>& p, const Vectorized<acc_t>& t,
                                       const Vectorized<acc_t>& pw) {
  using V = Vectorized<acc_t>;
  const V lo(-100), one(1);
  const V lq = at::vec::maximum((V(0) - p).log1p(), lo);
  const V lp = at::vec::maximum(p.log(), lo);
  return (t - one) * lq - pw * t * lp;
}

// Its gradients: d/dp = ((p - t) + (P - 1) t (p - 1)) / max((1 - p) p, eps), eps = float(1e-12)
// as PyTorch's (its EPSILON is a float, also for float64), PyTorch's
// (p - t) / max((1 - p) p, eps) bit for bit at P = 1; d/dt = -log(p / (1 - p)) at P = 1
// (PyTorch's -logit(p)), log1p(-p) - P log p otherwise.
template <typename acc_t>
inline Vectorized<acc_t> bce_prob_grad(const Vectorized<acc_t>& p, const Vectorized<acc_t>& t,
                                       const Vectorized<acc_t>& pw) {
  using V = Vectorized<acc_t>;
  const V one(1);
  const V num = (p - t) + (pw - one) * t * (p - one);
  return num / at::vec::maximum((one - p) * p, V(acc_t(1e-12f)));
}
template <typename acc_t>
inline Vectorized<acc_t> bce_prob_grad_target(const Vectorized<acc_t>& p,
                                              const Vectorized<acc_t>& pw) {
  using V = Vectorized<acc_t>;
  const V one(1);
  const V logit = (p / (one - p)).log();
  return V::blendv((V(0) - p).log1p() - pw * p.log(), V(0) - logit, pw == one);
}

// Whether an element of p is outside [0, 1] or NaN (a block's unused lanes are loaded as 0).
template <typename acc_t>
inline bool outside_unit(const Vectorized<acc_t>& p) {
  using V = Vectorized<acc_t>;
  const V bad = (p < V(0)) | (p > V(1)) | (p != p);
  return bad.zero_mask() != (1 << V::size()) - 1;
}

// The sigmoid focal loss (params.h), from e = exp(-|x|): q = 1 - p_t = t sigmoid(-x) +
// (1 - t) sigmoid(x), each sigmoid without cancellation; the loss factor alpha_t q^gamma, and the
// gradient alpha_t q^gamma (dce + gamma (1 - 2 t) sigmoid(x) sigmoid(-x) / q ce), whose second
// term is its limit 0 where q = 0 (q^(gamma - 1) alone would be infinite for gamma < 1), with
// dce = (1 - t) sigmoid(x) - P t sigmoid(-x), which does not cancel where sigmoid(x) is near 1.
// alpha is each element's alpha (a vector of one value unless params.h's alpha tensor is given);
// has_alpha false: no alpha_t.
template <typename acc_t>
struct Focal {
  using V = Vectorized<acc_t>;
  acc_t gamma;
  bool has_alpha;
  // a scalar alpha's 1 - alpha, from the double alpha (torchvision's 1 - alpha is a Python
  // float's): 1 - float(alpha) would be 2e-6 off at alpha = 0.9923888; < 0 for an alpha tensor
  acc_t one_minus_alpha = -1;
  // a t + (1 - a)(1 - t): two terms >= 0, no cancellation (as (2a - 1) t + 1 - a would have)
  inline V alpha_t(const V& t, const V& a) const {
    if (!has_alpha) return V(1);
    const V am = one_minus_alpha >= 0 ? V(one_minus_alpha) : V(1) - a;
    return at::vec::fmadd(a, t, am * (V(1) - t));
  }

  // q from whichever of q and p_t = 1 - q is the smaller: each is a sum of two terms >= 0, exact
  // to about an ulp of itself, so 1 - p_t is the better q where q > 1/2 (soft targets).
  inline void sigmoids(const V& x, const V& e, V& sig, V& sig_neg, V& q, const V& t) const {
    const V one(1), inv = one / (one + e), pos = x >= V(0);
    sig = V::blendv(e, one, pos) * inv;
    sig_neg = V::blendv(one, e, pos) * inv;
    const V u = one - t, pt = t * sig + u * sig_neg;
    q = V::blendv(t * sig_neg + u * sig, one - pt, pt < V(0.5));
  }
  inline V factor(const V& x, const V& t, const V& a) const {
    V sig, sig_neg, q;
    sigmoids(x, exp_neg_abs(x), sig, sig_neg, q, t);
    return alpha_t(t, a) * pow_gamma(q, gamma);
  }
  inline V grad(const V& x, const V& t, const V& a, const V& pw, const V& e, const V& ce) const {
    V sig, sig_neg, q;
    sigmoids(x, e, sig, sig_neg, q, t);
    const V zero(0), one(1);
    const V dce = (one - t) * sig - pw * t * sig_neg;
    const V r = V::blendv(sig * sig_neg / q, zero, q == zero);
    const V dm = V(gamma) * (one - t - t) * r;  // d log q^gamma / dx
    // dm ce is 0 where dm is (gamma = 0, or a saturated logit, where ce may be infinite)
    return alpha_t(t, a) * pow_gamma(q, gamma) *
           at::vec::fmadd(dm, V::blendv(ce, zero, dm == zero), dce);
  }
  // d/dt of alpha_t q^gamma ce: q^gamma ((2 alpha - 1) ce + alpha_t (gamma (ce / q) dq/dt +
  // dce/dt)), dq/dt = sigmoid(-x) - sigmoid(x); ce / q is bounded where q -> 0 (about P or 1)
  // and q^gamma takes the term to 0 there, so q = 0 contributes 0 (its limit). A target outside
  // [0, 1] (torchvision's formula takes it) may give q < 0: its term as the composite's.
  inline V grad_target(const V& x, const V& t, const V& a, const V& e, const V& ce,
                       const V& dce_t) const {
    V sig, sig_neg, q;
    sigmoids(x, e, sig, sig_neg, q, t);
    const V zero(0);
    const V r = V::blendv(ce / q, zero, q == zero);
    // (gamma = 0: no term, where an infinite ce / q would make it 0 inf)
    const V inner = gamma == 0 ? dce_t : at::vec::fmadd(V(gamma) * r, sig_neg - sig, dce_t);
    const V da = has_alpha ? a + a - V(1) : zero;
    return pow_gamma(q, gamma) * at::vec::fmadd(da, V::blendv(ce, zero, da == zero),
                                                 alpha_t(t, a) * inner);
  }
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
