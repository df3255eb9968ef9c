// Device-agnostic glue of the elementwise (BCE kernels') ops: argument checks that name the argument and the
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

// Which elementwise loss the BCE kernels compute, as the ops name it (params.h has the math).
struct BinaryLoss {
  enum class Kind { WithLogits, SigmoidFocal, Probabilities };
  Kind kind = Kind::WithLogits;
  // the sigmoid focal loss's: its exponent, alpha_t's alpha (none: no alpha_t, torchvision's
  // -1), or each element's alpha broadcast as weight (alpha_tensor, instead of alpha)
  double gamma = 0;
  std::optional<double> alpha;
  std::optional<at::Tensor> alpha_tensor;
};

at::Tensor binary_cross_entropy_forward_impl(const at::Tensor& input, const at::Tensor& target,
                                             const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& pos_weight,
                                             Reduction reduction, const BinaryLoss& loss,
                                             std::optional<at::ScalarType> out_dtype,
                                             const BinaryCrossEntropyBackend& backend);

// (grad_input, grad_target); a gradient not asked for is an empty (0,) tensor.
std::tuple<at::Tensor, at::Tensor> binary_cross_entropy_backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
    Reduction reduction, const BinaryLoss& loss, bool input_grad, bool target_grad,
    const BinaryCrossEntropyBackend& backend);

}  // namespace weighted_loss
