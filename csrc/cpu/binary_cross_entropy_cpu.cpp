// CPU registration of the BCE-with-logits ops: the shared glue with the CPU kernels of the widest
// capability this CPU runs.
#include <torch/library.h>

#include "../binary_cross_entropy.h"
#include "grad_buffer.h"
#include "kernels.h"

namespace weighted_loss {
namespace {

using at::Tensor;

Tensor forward(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
               const std::optional<Tensor>& pos_weight, int64_t reduction) {
  static const BinaryCrossEntropyBackend b{
      [](const BinaryCrossEntropyParams& p) { cpu::kernels().binary_cross_entropy_forward(p); },
      cpu::empty_like_gradient};
  return binary_cross_entropy_forward_impl(input, target, weight, pos_weight, reduction, b);
}

std::tuple<Tensor, Tensor> backward(const Tensor& grad_loss, const Tensor& input,
                                    const Tensor& target, const std::optional<Tensor>& weight,
                                    const std::optional<Tensor>& pos_weight, int64_t reduction,
                                    bool input_grad, bool target_grad) {
  static const BinaryCrossEntropyBackend b{
      [](const BinaryCrossEntropyParams& p) { cpu::kernels().binary_cross_entropy_backward(p); },
      cpu::empty_like_gradient};
  return binary_cross_entropy_backward_impl(grad_loss, input, target, weight, pos_weight,
                                            reduction, input_grad, target_grad, b);
}

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, CPU, m) {
  m.impl("binary_cross_entropy_with_logits_forward", &weighted_loss::forward);
  m.impl("binary_cross_entropy_with_logits_backward", &weighted_loss::backward);
}
