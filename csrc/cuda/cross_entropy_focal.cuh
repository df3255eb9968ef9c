// The softmax focal loss's factors for the CUDA cross-entropy kernels (the CPU's
// ../cpu/cross_entropy_focal.h): m = (1 - p)^gamma and s = d(m nll)/dnll of a row's target
// (index targets) or of each class (probabilities and smoothing: see cross_entropy_row.cuh).
#pragma once

#include "common.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

// The softmax focal loss (params.h) of a row with nll = -log p_y (the CPU's focal_factors): the
// loss factor m = (1 - p_y)^gamma and the gradient's s = m (1 + gamma p_y nll / (1 - p_y)), the
// ratio at its limit 1 where 1 - p_y = 0.
template <typename acc_t>
__device__ __forceinline__ void focal_factors(acc_t gamma, acc_t nll, acc_t& m, acc_t& s) {
  const acc_t q = -expm1(-nll), p = exp(-nll);
  m = pow_gamma(q, gamma);
  const acc_t r = q > acc_t(0) ? nll / q : acc_t(1);
  s = m * (acc_t(1) + (p > acc_t(0) ? gamma * p * r : acc_t(0)));
}

// The same for one class term of the focal loss over soft targets, from lp = log p_c <= 0 and
// p = p_c (the CPU's vector focal_factors): 1 - p as it is where p <= 1/2, expm1 only near 1;
// for gamma >= 1, s = q^(gamma-1) (q + gamma p nll) without the ratio.
template <typename acc_t>
__device__ __forceinline__ void focal_class_factors(acc_t gamma, acc_t lp, acc_t p, acc_t& m,
                                                    acc_t& s) {
  const acc_t q = p > acc_t(0.5) ? -expm1(lp) : acc_t(1) - p;
  const acc_t pn = p > acc_t(0) ? -gamma * p * lp : acc_t(0);  // gamma p nll
  if (gamma >= acc_t(1)) {
    const acc_t qg1 = gamma == acc_t(1) ? acc_t(1) : pow_gamma(q, gamma - acc_t(1));
    m = qg1 * q;
    s = qg1 * (q + pn);
  } else {
    m = pow_gamma(q, gamma);
    s = m * (acc_t(1) + (q > acc_t(0) ? pn / q : (p > acc_t(0) ? gamma * p : acc_t(0))));
  }
}

}  // namespace
}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
