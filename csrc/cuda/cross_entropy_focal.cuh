// The softmax focal loss's factors for the CUDA cross-entropy kernels (the CPU's
// ../cpu/cross_entropy_focal.h): m = (1 - p)^gamma and s = d(m nll)/dnll of a row's target
// (index targets) or of each class (probabilities and smoothing: see cross_entropy_row.cuh).
#pragma once

#include "common.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

// The focal factors of one term from lp = log p <= 0 and p itself (the CPU's vector
// focal_factors): m = (1 - p)^gamma and s = d(m nll)/dnll = m (1 + gamma p nll / (1 - p)), with
// 1 - p as it is where p <= 1/2 and -expm1(lp) nearer 1; for gamma >= 1 as
// q^(gamma-1) (q + gamma p nll), without the ratio; below 1 the ratio at its limit where q = 0.
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

// The same from nll = -log p_y alone (a row's target: the softmax focal loss over class indices).
template <typename acc_t>
__device__ __forceinline__ void focal_factors(acc_t gamma, acc_t nll, acc_t& m, acc_t& s) {
  focal_class_factors<acc_t>(gamma, -nll, exp(-nll), m, s);
}

}  // namespace
}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
