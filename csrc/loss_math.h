// The scalar formulas the CPU and CUDA kernels share, written once so that the two cannot drift
// apart: label smoothing's factors, the logit as the loss reads it, the softmax focal loss's
// factors, and the elementwise losses' terms (BCE with logits, the sigmoid focal loss, BCE of
// probabilities). Host and device inline functions of params.h's kind: no torch, no CUDA headers.
//
// A formula is written over a value type V and takes what it needs beyond + - * / and
// comparisons from an Ops policy (static functions): where(mask, a, b) (a where mask holds),
// fma(a, b, c), max(a, b) (either one where one is NaN: callers never rely on which),
// pow_gamma(q, gamma), log and log1p, and log1p_unit(e) (log(1 + e) for e in [0, 1], where a
// device may have a faster form). Scalar<T> below is the
// CUDA kernels' (float or double, each an element); the CPU kernels' vectors of at::vec bring
// their own (cpu/vec_common.h: VecOps), with their fast exp and log1p. Where a formula needs
// exp(x), the caller computes it (each device has its fast form) and passes it in.
//
// Everything here has internal linkage: the CPU kernels are compiled once per instruction set
// (CPU_CAPABILITY), and an inline function shared between those builds could run AVX2 code on a
// machine without it.
#pragma once

#include <cmath>
#include <cstdint>

#include "params.h"

// Each formula inlined where it is used: in device code a call that nvcc declined to inline cost
// the BCE backward kernels a stack frame and spills (cuda-check); on the host, the compiler's
// choice, as for the CPU kernels' own inline functions.
#if defined(__CUDACC__)
#define WEIGHTED_LOSS_MATH __host__ __device__ __forceinline__
#else
#define WEIGHTED_LOSS_MATH inline
#endif

namespace weighted_loss::math {
namespace {

// ------------------------------------------------------------------------------ scalars' ops

// The C library's functions by type (the float ones by their f names: the same on the host and
// in device code, never a float argument promoted to the double function).
template <typename T> struct Libm;
template <> struct Libm<float> {
  WEIGHTED_LOSS_MATH static float fma(float a, float b, float c) { return fmaf(a, b, c); }
  WEIGHTED_LOSS_MATH static float fmax(float a, float b) { return fmaxf(a, b); }
  WEIGHTED_LOSS_MATH static float log1p(float x) { return log1pf(x); }
  WEIGHTED_LOSS_MATH static float log(float x) { return logf(x); }
  WEIGHTED_LOSS_MATH static float expm1(float x) { return expm1f(x); }
  WEIGHTED_LOSS_MATH static float exp(float x) { return expf(x); }
  WEIGHTED_LOSS_MATH static float pow(float x, float y) { return powf(x, y); }
  WEIGHTED_LOSS_MATH static float tanh(float x) { return tanhf(x); }
};
template <> struct Libm<double> {
  WEIGHTED_LOSS_MATH static double fma(double a, double b, double c) {
    return ::fma(a, b, c);
  }
  WEIGHTED_LOSS_MATH static double fmax(double a, double b) { return ::fmax(a, b); }
  WEIGHTED_LOSS_MATH static double log1p(double x) { return ::log1p(x); }
  WEIGHTED_LOSS_MATH static double log(double x) { return ::log(x); }
  WEIGHTED_LOSS_MATH static double expm1(double x) { return ::expm1(x); }
  WEIGHTED_LOSS_MATH static double exp(double x) { return ::exp(x); }
  WEIGHTED_LOSS_MATH static double pow(double x, double y) { return ::pow(x, y); }
  WEIGHTED_LOSS_MATH static double tanh(double x) { return ::tanh(x); }
};

template <typename T>
struct Scalar {
  using V = T;
  WEIGHTED_LOSS_MATH static T where(bool mask, T a, T b) { return mask ? a : b; }
  WEIGHTED_LOSS_MATH static T fma(T a, T b, T c) { return Libm<T>::fma(a, b, c); }
  WEIGHTED_LOSS_MATH static T max(T a, T b) { return Libm<T>::fmax(a, b); }
  WEIGHTED_LOSS_MATH static T log1p_unit(T e) { return Libm<T>::log1p(e); }
  WEIGHTED_LOSS_MATH static T log1p(T x) { return Libm<T>::log1p(x); }
  WEIGHTED_LOSS_MATH static T log(T x) { return Libm<T>::log(x); }
  // q^gamma: gamma 2, 1 and 0 (the usual ones) as products, exact to one multiply's rounding
  // where pow is a few ulp and some 20 instructions
  WEIGHTED_LOSS_MATH static T pow_gamma(T q, T gamma) {
    if (gamma == T(2)) return q * q;
    if (gamma == T(1)) return q;
    if (gamma == T(0)) return T(1);
    return Libm<T>::pow(q, gamma);
  }
};

// ------------------------------------------------------------------------------ label smoothing

// The factors of the smoothed target t' = (1 - s) t + s / C, in double from the double s: each
// device rounds them once to its accumulation type (1 - float(0.96) would be 1.5e-6 off, the
// target gradient's whole factor under strong smoothing). s <= 0 is no smoothing.
WEIGHTED_LOSS_MATH double smoothing_scale(double s) { return s > 0 ? 1.0 - s : 1.0; }
WEIGHTED_LOSS_MATH double smoothing_shift(double s, int64_t classes) {
  return s > 0 && classes > 0 ? s / static_cast<double>(classes) : 0.0;
}

// ------------------------------------------------------------------------------ logits

// A logit through the softcap (Gemma's logit softcapping; softcap > 0): softcap tanh(x / softcap).
template <typename T>
WEIGHTED_LOSS_MATH T softcapped(T x, T softcap) {
  return softcap * Libm<T>::tanh(x / softcap);
}
// The logit of class c as the loss reads it (params.h): softcapped when softcap > 0, or
// x + adjust[c] with the logit adjustment (never both), else x.
template <typename T>
WEIGHTED_LOSS_MATH T loss_logit(T x, T softcap, const T* adjust, int64_t c) {
  if (adjust != nullptr) return x + adjust[c];
  return softcap > T(0) ? softcapped(x, softcap) : x;
}
// The chain rule's factor through the softcap from the capped logit c: 1 - (c / softcap)^2.
template <typename T>
WEIGHTED_LOSS_MATH T softcap_slope(T c, T softcap) {
  if (softcap <= T(0)) return T(1);
  const T u = c / softcap;
  return T(1) - u * u;
}

// ------------------------------------------------------------------------------ softmax focal

// 1 - p from lp = log p and p = exp(lp), in whichever form does not cancel: 1 - p where p <= 1/2,
// -expm1(lp) nearer 1 (scalars; the CPU's vector exp gives q beside p directly).
template <typename T>
WEIGHTED_LOSS_MATH T one_minus_p(T lp, T p) {
  return p > T(0.5) ? -Libm<T>::expm1(lp) : T(1) - p;
}

// The focal factors of one term of the softmax focal loss (params.h: focal_gamma), from
// lp = log p <= 0, p and q = 1 - p: m = q^gamma, the loss's factor, and
// s = d(m nll)/dnll = m (1 + gamma p nll / q) with nll = -lp, the gradient's. For gamma >= 1 as
// q^(gamma-1) (q + gamma p nll), which has no ratio; below 1 with nll / q at its limit 1 where
// q = 0, so gamma < 1 gives s = m (1 + gamma p) there, not NaN. p = 0 contributes no
// gamma p nll term (nll may be infinite there).
template <typename Ops, typename G>
WEIGHTED_LOSS_MATH void focal_factors(G gamma, const typename Ops::V& lp,
                                      const typename Ops::V& p, const typename Ops::V& q,
                                      typename Ops::V& m, typename Ops::V& s) {
  using V = typename Ops::V;
  const V zero(0), one(1), vg(gamma);
  const V pn = Ops::where(p > zero, (zero - vg) * p * lp, zero);  // gamma p nll
  if (gamma >= G(1)) {
    const V qg1 = Ops::pow_gamma(q, gamma - G(1));
    m = qg1 * q;
    s = qg1 * (q + pn);
  } else {
    m = Ops::pow_gamma(q, gamma);
    s = m * (one + Ops::where(q > zero, pn / q, Ops::where(p > zero, vg * p, zero)));
  }
}

// The same from nll = -log p alone (scalars: a row's target, in double per row).
template <typename T>
WEIGHTED_LOSS_MATH void focal_factors(T gamma, T nll, T& m, T& s) {
  const T p = Libm<T>::exp(-nll);
  focal_factors<Scalar<T>>(gamma, -nll, p, one_minus_p(-nll, p), m, s);
}

// ------------------------------------------------------------------------------ BCE with logits

// The loss of one element without its weight, from sp = log1p(exp(-|x|)):
//   (1 + (P - 1) t) sp + (x >= 0 ? (1 - t) x : -P t x)
// whose terms are both >= 0 for P >= 0: nothing cancels (softplus(x) - t x would lose sp next to
// a large x). A NaN x reaches the result through the second term. At x = -inf, PyTorch's
// (1 - t) x + (1 + (P - 1) t) (sp - min(x, 0)) as IEEE arithmetic gives it, a x - (a + b) x:
// NaN where the infinities cancel (targets in [0, 1]), +-inf where they agree (targets outside).
template <typename Ops>
WEIGHTED_LOSS_MATH typename Ops::V bce_loss(const typename Ops::V& x,
                                                          const typename Ops::V& t,
                                                          const typename Ops::V& pw,
                                                          const typename Ops::V& sp) {
  using V = typename Ops::V;
  const V zero(0), one(1);
  const V a = one - t, b = pw * t;
  const V lin = x * Ops::where(x >= zero, a, zero - b);
  const V loss = Ops::fma(a + b, sp, lin);
  return Ops::where(x == V(-INFINITY), a * x - (a + b) * x, loss);
}

// Its input gradient without the weight, (1 + (P - 1) t) sigmoid(x) - P t, from e = exp(-|x|)
// (sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e), without cancellation).
template <typename Ops>
WEIGHTED_LOSS_MATH typename Ops::V bce_grad(const typename Ops::V& x,
                                                          const typename Ops::V& t,
                                                          const typename Ops::V& pw,
                                                          const typename Ops::V& e) {
  using V = typename Ops::V;
  const V zero(0), one(1);
  const V sig = Ops::where(x >= zero, one, e) / (one + e);
  const V b = pw * t;
  return Ops::fma((one - t) + b, sig, zero - b);
}

// Its target gradient without the weight, P softplus(-x) - softplus(x) =
// (P - 1) log1p(e) - (x < 0 ? P : 1) x: the large terms cancel exactly, the small one is kept
// (PyTorch's -P log sigmoid(x) + log sigmoid(-x) keeps it too); at x = -inf its P inf.
template <typename Ops>
WEIGHTED_LOSS_MATH typename Ops::V bce_grad_target(const typename Ops::V& x,
                                                                 const typename Ops::V& pw,
                                                                 const typename Ops::V& sp) {
  using V = typename Ops::V;
  const V zero(0), one(1);
  return Ops::fma(pw - one, sp, zero - Ops::where(x < zero, pw, one) * x);
}

// ------------------------------------------------------------------------------ BCE of probabilities

// PyTorch's loss (params.h: prob_input) with pos_weight P on the positive term:
// (t - 1) max(log1p(-p), -100) - P t max(log p, -100), PyTorch's own at P = 1.
template <typename Ops>
WEIGHTED_LOSS_MATH typename Ops::V bce_prob_loss(const typename Ops::V& p,
                                                               const typename Ops::V& t,
                                                               const typename Ops::V& pw) {
  using V = typename Ops::V;
  const V lo(-100), one(1);
  const V lq = Ops::max(Ops::log1p(V(0) - p), lo), lp = Ops::max(Ops::log(p), lo);
  return (t - one) * lq - pw * t * lp;
}
// Its input gradient times the upstream gradient g and the weight w:
// g ((p - t) + (P - 1) t (p - 1)) / max((1 - p) p, eps) w, eps = float(1e-12) as PyTorch's (its
// EPSILON is a float, for float64 too), rounded in PyTorch's order: its
// g (p - t) / max((1 - p) p, eps) w bit for bit at P = 1 (an element near p = 1, where the
// gradient is largest, once came out 1.7 ulp off in another order).
template <typename Ops>
WEIGHTED_LOSS_MATH typename Ops::V bce_prob_grad(const typename Ops::V& p,
                                                               const typename Ops::V& t,
                                                               const typename Ops::V& pw,
                                                               const typename Ops::V& g,
                                                               const typename Ops::V& w) {
  using V = typename Ops::V;
  const V one(1);
  const V num = (p - t) + (pw - one) * t * (p - one);
  return g * num / Ops::max((one - p) * p, V(1e-12f)) * w;
}
// Its target gradient: -log(p / (1 - p)) at P = 1 (PyTorch's -logit(p)), else
// log1p(-p) - P log p.
template <typename Ops>
WEIGHTED_LOSS_MATH typename Ops::V bce_prob_grad_target(const typename Ops::V& p,
                                                                      const typename Ops::V& pw) {
  using V = typename Ops::V;
  const V one(1);
  return Ops::where(pw == one, V(0) - Ops::log(p / (one - p)),
                    Ops::log1p(V(0) - p) - pw * Ops::log(p));
}

// ------------------------------------------------------------------------------ sigmoid focal

// The sigmoid focal loss (params.h): each element's BCE times alpha_t q^gamma with
// q = 1 - p_t = t sigmoid(-x) + (1 - t) sigmoid(x) and alpha_t = alpha t + (1 - alpha) (1 - t).
// Its gradient is alpha_t q^gamma (dce + gamma (1 - 2 t) sigmoid(x) sigmoid(-x) / q ce), whose
// second term is its limit 0 where q = 0 (q^(gamma - 1) alone would be infinite for gamma < 1),
// with dce = (1 - t) sigmoid(x) - P t sigmoid(-x), which does not cancel where sigmoid(x) is
// near 1. a: the element's alpha (one value unless an alpha tensor is given); has_alpha false:
// no alpha_t.
template <typename Ops, typename S>
struct SigmoidFocal {
  using V = typename Ops::V;
  S gamma;
  bool has_alpha;
  // a scalar alpha's 1 - alpha, from the double alpha (torchvision's 1 - alpha is a Python
  // float's): 1 - float(alpha) would be 2e-6 off at alpha = 0.9923888; < 0 for an alpha tensor
  S one_minus_alpha = S(-1);

  // a t + (1 - a)(1 - t): two terms >= 0, no cancellation (as (2a - 1) t + 1 - a would have)
  WEIGHTED_LOSS_MATH V alpha_t(const V& t, const V& a) const {
    if (!has_alpha) return V(1);
    const V am = one_minus_alpha >= S(0) ? V(one_minus_alpha) : V(1) - a;
    return Ops::fma(a, t, am * (V(1) - t));
  }
  // sigmoid(x), sigmoid(-x) from e = exp(-|x|), and q from whichever of q and p_t = 1 - q is
  // the smaller: each is a sum of two terms >= 0, exact to about an ulp of itself, so 1 - p_t
  // is the better q where q > 1/2 (soft targets).
  WEIGHTED_LOSS_MATH void sigmoids(const V& x, const V& e, const V& t, V& sig, V& sig_neg,
                                          V& q) const {
    const V one(1), inv = one / (one + e);
    sig = Ops::where(x >= V(0), one, e) * inv;
    sig_neg = Ops::where(x >= V(0), e, one) * inv;
    const V u = one - t, pt = t * sig + u * sig_neg;
    q = Ops::where(pt < V(0.5), one - pt, t * sig_neg + u * sig);
  }
  // alpha_t q^gamma, the loss's factor
  WEIGHTED_LOSS_MATH V factor(const V& x, const V& t, const V& a, const V& e) const {
    V sig, sig_neg, q;
    sigmoids(x, e, t, sig, sig_neg, q);
    return alpha_t(t, a) * Ops::pow_gamma(q, gamma);
  }
  // the input gradient without the weight, given the element's BCE ce
  WEIGHTED_LOSS_MATH V grad(const V& x, const V& t, const V& a, const V& pw, const V& e,
                                   const V& ce) const {
    V sig, sig_neg, q;
    sigmoids(x, e, t, sig, sig_neg, q);
    const V zero(0), one(1);
    const V dce = (one - t) * sig - pw * t * sig_neg;
    const V r = Ops::where(q == zero, zero, sig * sig_neg / q);
    const V dm = V(gamma) * (one - t - t) * r;  // d log q^gamma / dx
    // dm ce is 0 where dm is (gamma = 0, or a saturated logit, where ce may be infinite)
    return alpha_t(t, a) * Ops::pow_gamma(q, gamma) *
           Ops::fma(dm, Ops::where(dm == zero, zero, ce), dce);
  }
  // d/dt of alpha_t q^gamma ce: q^gamma ((2 alpha - 1) ce + alpha_t (gamma (ce / q) dq/dt +
  // dce/dt)), dq/dt = sigmoid(-x) - sigmoid(x), dce_t = dce/dt (bce_grad_target); ce / q is
  // bounded where q -> 0 (about P or 1) and q^gamma takes the term to 0 there, so q = 0
  // contributes 0 (its limit). A target outside [0, 1] (torchvision's formula takes it) may give
  // q < 0: its term as the composite's.
  WEIGHTED_LOSS_MATH V grad_target(const V& x, const V& t, const V& a, const V& e,
                                          const V& ce, const V& dce_t) const {
    V sig, sig_neg, q;
    sigmoids(x, e, t, sig, sig_neg, q);
    const V zero(0);
    const V r = Ops::where(q == zero, zero, ce / q);
    // (gamma = 0: no term, where an infinite ce / q would make it 0 inf)
    const V inner = gamma == S(0) ? dce_t : Ops::fma(V(gamma) * r, sig_neg - sig, dce_t);
    const V da = has_alpha ? a + a - V(1) : zero;
    return Ops::pow_gamma(q, gamma) *
           Ops::fma(da, Ops::where(da == zero, zero, ce), alpha_t(t, a) * inner);
  }
};

}  // namespace
}  // namespace weighted_loss::math
