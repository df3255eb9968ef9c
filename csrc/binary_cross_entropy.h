// Device-agnostic glue of the BCE-with-logits ops: argument checks that name the argument and the
// value, the broadcast of weight, pos_weight (and a focal alpha) as strides over rows of the input
// (never expanded), output allocation. The device files pass the kernel launcher in.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "params.h"

namespace weighted_loss {

using BinaryCrossEntropyBackend = Backend<BinaryCrossEntropyParams>;

at::Tensor binary_cross_entropy_forward_impl(const at::Tensor& input, const at::Tensor& target,
                                             const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& pos_weight,
                                             int64_t reduction, double gamma, double alpha,
                                             const std::optional<at::Tensor>& alpha_tensor,
                                             std::optional<at::ScalarType> out_dtype,
                                             bool prob_input,
                                             const BinaryCrossEntropyBackend& backend);

// gamma >= 0: the sigmoid focal loss (params.h), alpha < 0 without alpha_t, alpha_tensor (when
// given) each element's alpha, broadcast as weight; gamma < 0: BCE. prob_input: BCE of
// probabilities (params.h).
// (grad_input, grad_target); a gradient not asked for is an empty (0,) tensor.
std::tuple<at::Tensor, at::Tensor> binary_cross_entropy_backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
    int64_t reduction, bool input_grad, bool target_grad, double gamma, double alpha,
    const std::optional<at::Tensor>& alpha_tensor, bool prob_input,
    const BinaryCrossEntropyBackend& backend);

}  // namespace weighted_loss
