// The elementwise math of the CPU BCE kernels (binary_cross_entropy_kernel.h), one vector of
// elements at a time: the formulas of ../loss_math.h (shared with the CUDA kernels) with this
// build's exp. Part of binary_cross_entropy_kernel.h; included by it only, inside its
// CPU_CAPABILITY namespace.
#pragma once

#include <limits>

#include "vec_common.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

// e = exp(-|x|), NaN where x is NaN.
template <typename acc_t>
inline Vectorized<acc_t> exp_neg_abs(const Vectorized<acc_t>& x) {
  using V = Vectorized<acc_t>;
  const V e = vexp(V(0) - x.abs());
  return V::blendv(e, x, x != x);
}

// The shared formulas (../loss_math.h) on one vector of elements, without the weight w, with
// this file's fast exp and log1p: the loss, and BCE of probabilities' loss and gradients.
template <typename acc_t>
inline Vectorized<acc_t> bce_loss(const Vectorized<acc_t>& x, const Vectorized<acc_t>& t,
                                  const Vectorized<acc_t>& pw) {
  return math::bce_loss<VecOps<acc_t>>(x, t, pw, log1p_unit(vexp(Vectorized<acc_t>(0) - x.abs())));
}
template <typename acc_t>
inline Vectorized<acc_t> bce_prob_loss(const Vectorized<acc_t>& p, const Vectorized<acc_t>& t,
                                       const Vectorized<acc_t>& pw) {
  return math::bce_prob_loss<VecOps<acc_t>>(p, t, pw);
}

// Whether an element of p is outside [0, 1] or NaN (a block's unused lanes are loaded as 0).
template <typename acc_t>
inline bool outside_unit(const Vectorized<acc_t>& p) {
  using V = Vectorized<acc_t>;
  const V bad = (p < V(0)) | (p > V(1)) | (p != p);
  return bad.zero_mask() != (1 << V::size()) - 1;
}

// The sigmoid focal loss's factors and gradients (../loss_math.h: SigmoidFocal).
template <typename acc_t>
using Focal = math::SigmoidFocal<VecOps<acc_t>, acc_t>;

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
