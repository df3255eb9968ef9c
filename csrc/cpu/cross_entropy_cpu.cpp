// CPU registration of the cross-entropy ops: the shared glue with the CPU kernels of the widest
// capability this CPU runs.
#include <torch/library.h>


#include "../cross_entropy.h"
#include "grad_buffer.h"
#include "kernels.h"

namespace weighted_loss {
namespace {

using at::Tensor;

const CrossEntropyBackend& forward_backend() {
  static const CrossEntropyBackend b{[](const CrossEntropyParams& p) { cpu::kernels().cross_entropy_forward(p); },
                         cpu::empty_like_gradient};
  return b;
}
const CrossEntropyBackend& backward_backend() {
  static const CrossEntropyBackend b{
      [](const CrossEntropyParams& p) { cpu::kernels().cross_entropy_backward(p); },
      cpu::empty_like_gradient};
  return b;
}
const CrossEntropyBackend& target_backward_backend() {
  static const CrossEntropyBackend b{
      [](const CrossEntropyParams& p) { cpu::kernels().cross_entropy_target_backward(p); },
      cpu::empty_like_gradient};
  return b;
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& input, const Tensor& target,
                                           const std::optional<Tensor>& weight, int64_t reduction,
                                           int64_t ignore_index, double label_smoothing) {
  return cross_entropy_forward_impl(input, target, weight, reduction, ignore_index,
                                    label_smoothing, forward_backend());
}

Tensor backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                const std::optional<Tensor>& weight, const Tensor& lse,
                const Tensor& total_weight, int64_t reduction, int64_t ignore_index,
                double label_smoothing) {
  return cross_entropy_backward_impl(grad_loss, input, target, weight, lse, total_weight,
                                     reduction, ignore_index, label_smoothing, backward_backend());
}

std::tuple<Tensor, Tensor, Tensor> prob_forward(const Tensor& input, const Tensor& target,
                                                const std::optional<Tensor>& weight,
                                                int64_t reduction, double label_smoothing) {
  return cross_entropy_prob_forward_impl(input, target, weight, reduction, label_smoothing,
                                         forward_backend());
}

Tensor prob_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                     const std::optional<Tensor>& weight, const Tensor& lse, const Tensor& tsum,
                     int64_t reduction, double label_smoothing) {
  return cross_entropy_prob_backward_impl(grad_loss, input, target, weight, lse, tsum, reduction,
                                          label_smoothing, backward_backend());
}

Tensor prob_target_backward(const Tensor& grad_loss, const Tensor& input,
                            const std::optional<Tensor>& weight, const Tensor& lse,
                            int64_t reduction, double label_smoothing) {
  return cross_entropy_prob_target_backward_impl(grad_loss, input, weight, lse, reduction,
                                                 label_smoothing, target_backward_backend());
}

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, CPU, m) {
  m.impl("cross_entropy_forward", &weighted_loss::forward);
  m.impl("cross_entropy_backward", &weighted_loss::backward);
  m.impl("cross_entropy_prob_forward", &weighted_loss::prob_forward);
  m.impl("cross_entropy_prob_backward", &weighted_loss::prob_backward);
  m.impl("cross_entropy_prob_target_backward", &weighted_loss::prob_target_backward);
}
