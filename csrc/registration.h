// The ops as a device registers them: the same wrappers for every device, around the
// device-agnostic glue, given a Device policy:
//   Device::Guard            built from the input's device before anything runs (CUDA: a device
//                            guard, so allocations and the current stream are that device's)
//   Device::forward(), ...   the Backend of each op (kernel launcher + gradient allocator)
// Each device file defines its policy and calls register_*_ops<Policy>(m) in its
// TORCH_LIBRARY_IMPL block.
#pragma once

#include <torch/library.h>

#include "binary_cross_entropy.h"
#include "cross_entropy.h"

namespace weighted_loss {

// The guard of a device that needs none.
struct NoGuard {
  explicit NoGuard(const c10::Device&) {}
};

// Device: Guard, forward(), backward(), target_backward() returning CrossEntropyBackend.
template <typename Device>
struct CrossEntropyOps {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;

  static RowTerms terms_of(double z_loss, double softcap, double gamma, const OptTensor& adjust) {
    return {z_loss, softcap, gamma, adjust.value_or(Tensor())};
  }

  static std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& input, const Tensor& target,
                                                    const OptTensor& weight, int64_t reduction,
                                                    int64_t ignore_index, double label_smoothing,
                                                    double z_loss, double softcap, double gamma,
                                                    std::optional<at::ScalarType> out_dtype,
                                                    const OptTensor& adjust) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_forward_impl(input, target, weight, reduction, ignore_index,
                                      label_smoothing, terms_of(z_loss, softcap, gamma, adjust), out_dtype,
                                      Device::forward());
  }
  static Tensor backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                         const OptTensor& weight, const Tensor& lse, const Tensor& total_weight,
                         int64_t reduction, int64_t ignore_index, double label_smoothing,
                         double z_loss, double softcap, double gamma, const OptTensor& adjust) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_backward_impl(grad_loss, input, target, weight, lse, total_weight,
                                       reduction, ignore_index, label_smoothing,
                                       terms_of(z_loss, softcap, gamma, adjust), Device::backward());
  }
  static void backward_inplace(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                               const OptTensor& weight, const Tensor& lse,
                               const Tensor& total_weight, int64_t reduction,
                               int64_t ignore_index, double label_smoothing, double z_loss,
                               double softcap, double gamma, const OptTensor& adjust) {
    const typename Device::Guard guard(input.device());
    cross_entropy_backward_inplace_impl(grad_loss, input, target, weight, lse, total_weight,
                                        reduction, ignore_index, label_smoothing,
                                        terms_of(z_loss, softcap, gamma, adjust), Device::backward());
  }
  static std::tuple<Tensor, Tensor, Tensor> prob_forward(const Tensor& input, const Tensor& target,
                                                         const OptTensor& weight,
                                                         int64_t reduction,
                                                         double label_smoothing, double z_loss,
                                                         double softcap, double gamma,
                                                         std::optional<at::ScalarType> out_dtype,
                                                         const OptTensor& adjust) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_prob_forward_impl(input, target, weight, reduction, label_smoothing,
                                           terms_of(z_loss, softcap, gamma, adjust), out_dtype,
                                           Device::forward());
  }
  static Tensor prob_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                              const OptTensor& weight, const Tensor& lse, const Tensor& tsum,
                              int64_t reduction, double label_smoothing, double z_loss,
                              double softcap, double gamma, const OptTensor& adjust) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_prob_backward_impl(grad_loss, input, target, weight, lse, tsum,
                                            reduction, label_smoothing, terms_of(z_loss, softcap, gamma, adjust),
                                            Device::backward());
  }
  static Tensor prob_target_backward(const Tensor& grad_loss, const Tensor& input,
                                     const OptTensor& weight, const Tensor& lse,
                                     int64_t reduction, double label_smoothing, double z_loss,
                                     double softcap, double gamma,
                                     std::optional<at::ScalarType> target_dtype,
                                     const OptTensor& adjust) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_prob_target_backward_impl(grad_loss, input, weight, lse, reduction,
                                                   label_smoothing, terms_of(z_loss, softcap, gamma, adjust),
                                                   target_dtype, Device::target_backward());
  }
  static Tensor shard_forward(const Tensor& input, const Tensor& target, const OptTensor& weight,
                              int64_t ignore_index, double label_smoothing, int64_t class_offset,
                              int64_t total_classes) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_shard_forward_impl(input, target, weight, ignore_index, label_smoothing,
                                            class_offset, total_classes, Device::forward());
  }
  static Tensor shard_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                               const OptTensor& weight, const Tensor& lse,
                               const Tensor& total_weight, int64_t reduction,
                               int64_t ignore_index, double label_smoothing,
                               int64_t class_offset, int64_t total_classes) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_shard_backward_impl(grad_loss, input, target, weight, lse, total_weight,
                                             reduction, ignore_index, label_smoothing,
                                             class_offset, total_classes, Device::backward());
  }
};

template <typename Device>
void register_cross_entropy_ops(torch::Library& m) {
  using Ops = CrossEntropyOps<Device>;
  m.impl("cross_entropy_forward", &Ops::forward);
  m.impl("cross_entropy_backward", &Ops::backward);
  m.impl("cross_entropy_backward_", &Ops::backward_inplace);
  m.impl("cross_entropy_prob_forward", &Ops::prob_forward);
  m.impl("cross_entropy_prob_backward", &Ops::prob_backward);
  m.impl("cross_entropy_prob_target_backward", &Ops::prob_target_backward);
  m.impl("cross_entropy_shard_forward", &Ops::shard_forward);
  m.impl("cross_entropy_shard_backward", &Ops::shard_backward);
}

// Device: Guard, forward(), backward() returning BinaryCrossEntropyBackend.
template <typename Device>
struct BinaryCrossEntropyOps {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;

  static Tensor forward(const Tensor& input, const Tensor& target, const OptTensor& weight,
                        const OptTensor& pos_weight, int64_t reduction, double gamma,
                        double alpha, const OptTensor& alpha_tensor,
                        std::optional<at::ScalarType> out_dtype, bool prob_input) {
    const typename Device::Guard guard(input.device());
    return binary_cross_entropy_forward_impl(input, target, weight, pos_weight, reduction, gamma,
                                             alpha, alpha_tensor, out_dtype, prob_input,
                                             Device::forward());
  }
  static std::tuple<Tensor, Tensor> backward(const Tensor& grad_loss, const Tensor& input,
                                             const Tensor& target, const OptTensor& weight,
                                             const OptTensor& pos_weight, int64_t reduction,
                                             bool input_grad, bool target_grad, double gamma,
                                             double alpha, const OptTensor& alpha_tensor,
                                             bool prob_input) {
    const typename Device::Guard guard(input.device());
    return binary_cross_entropy_backward_impl(grad_loss, input, target, weight, pos_weight,
                                              reduction, input_grad, target_grad, gamma, alpha,
                                              alpha_tensor, prob_input, Device::backward());
  }
};

template <typename Device>
void register_binary_cross_entropy_ops(torch::Library& m) {
  using Ops = BinaryCrossEntropyOps<Device>;
  m.impl("binary_cross_entropy_with_logits_forward", &Ops::forward);
  m.impl("binary_cross_entropy_with_logits_backward", &Ops::backward);
}

}  // namespace weighted_loss
