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

// The arguments every op of the family takes by value from its schema (csrc/ops.cpp), converted
// once here: the reduction by name, the terms None turns off.
inline RowTerms terms_of(double z_loss, std::optional<double> softcap,
                         std::optional<double> gamma, const std::optional<at::Tensor>& adjust) {
  TORCH_CHECK_VALUE(!softcap.has_value() || *softcap > 0, "cross_entropy: softcap must be a "
                    "finite number > 0 (or None), got ", softcap.value_or(0));
  return {z_loss, softcap.value_or(0), gamma.value_or(0), adjust.value_or(at::Tensor())};
}

// Device: Guard, forward(), backward(), target_backward() returning CrossEntropyBackend.
template <typename Device>
struct CrossEntropyOps {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  using OptDouble = std::optional<double>;
  using OptDtype = std::optional<at::ScalarType>;
  static constexpr const char* kOp = "cross_entropy";

  static std::tuple<Tensor, Tensor, Tensor> forward(
      const Tensor& input, const Tensor& target, const OptTensor& weight,
      c10::string_view reduction, int64_t ignore_index, double label_smoothing, double z_loss,
      OptDouble softcap, OptDouble gamma, const OptTensor& logit_adjustment, OptDtype out_dtype) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_forward_impl(input, target, weight, reduction_of(reduction, kOp),
                                      ignore_index, label_smoothing,
                                      terms_of(z_loss, softcap, gamma, logit_adjustment),
                                      out_dtype, Device::forward());
  }
  static Tensor backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                         const OptTensor& weight, const Tensor& lse, const Tensor& total_weight,
                         c10::string_view reduction, int64_t ignore_index,
                         double label_smoothing, double z_loss, OptDouble softcap,
                         OptDouble gamma, const OptTensor& logit_adjustment) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_backward_impl(grad_loss, input, target, weight, lse, total_weight,
                                       reduction_of(reduction, kOp), ignore_index,
                                       label_smoothing,
                                       terms_of(z_loss, softcap, gamma, logit_adjustment),
                                       Device::backward());
  }
  static void backward_inplace(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                               const OptTensor& weight, const Tensor& lse,
                               const Tensor& total_weight, c10::string_view reduction,
                               int64_t ignore_index, double label_smoothing, double z_loss,
                               OptDouble softcap, OptDouble gamma,
                               const OptTensor& logit_adjustment) {
    const typename Device::Guard guard(input.device());
    cross_entropy_backward_inplace_impl(grad_loss, input, target, weight, lse, total_weight,
                                        reduction_of(reduction, kOp), ignore_index,
                                        label_smoothing,
                                        terms_of(z_loss, softcap, gamma, logit_adjustment),
                                        Device::backward());
  }
  static std::tuple<Tensor, Tensor, Tensor> prob_forward(
      const Tensor& input, const Tensor& target, const OptTensor& weight,
      c10::string_view reduction, double label_smoothing, double z_loss, OptDouble softcap,
      OptDouble gamma, const OptTensor& logit_adjustment, OptDtype out_dtype) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_prob_forward_impl(input, target, weight, reduction_of(reduction, kOp),
                                           label_smoothing,
                                           terms_of(z_loss, softcap, gamma, logit_adjustment),
                                           out_dtype, Device::forward());
  }
  static Tensor prob_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                              const OptTensor& weight, const Tensor& lse, const Tensor& tsum,
                              c10::string_view reduction, double label_smoothing, double z_loss,
                              OptDouble softcap, OptDouble gamma,
                              const OptTensor& logit_adjustment) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_prob_backward_impl(grad_loss, input, target, weight, lse, tsum,
                                            reduction_of(reduction, kOp), label_smoothing,
                                            terms_of(z_loss, softcap, gamma, logit_adjustment),
                                            Device::backward());
  }
  static Tensor prob_target_backward(const Tensor& grad_loss, const Tensor& input,
                                     const OptTensor& weight, const Tensor& lse,
                                     c10::string_view reduction, double label_smoothing,
                                     double z_loss, OptDouble softcap, OptDouble gamma,
                                     const OptTensor& logit_adjustment, OptDtype target_dtype) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_prob_target_backward_impl(
        grad_loss, input, weight, lse, reduction_of(reduction, kOp), label_smoothing,
        terms_of(z_loss, softcap, gamma, logit_adjustment), target_dtype,
        Device::target_backward());
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor> overlap_forward(
      const Tensor& input, const Tensor& target, const OptTensor& weight,
      c10::string_view reduction, int64_t ignore_index, double label_smoothing, OptDouble gamma,
      bool squared, OptDtype out_dtype) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_overlap_forward_impl(
        input, target, weight, reduction_of(reduction, kOp), ignore_index, label_smoothing,
        terms_of(0, std::nullopt, gamma, std::nullopt), squared, out_dtype, Device::forward());
  }
  static Tensor overlap_backward(const Tensor& grad_loss, const Tensor& grad_sums,
                                 const Tensor& input, const Tensor& target,
                                 const OptTensor& weight, const Tensor& lse, const Tensor& aux,
                                 c10::string_view reduction, int64_t ignore_index,
                                 double label_smoothing, OptDouble gamma, bool squared) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_overlap_backward_impl(
        grad_loss, grad_sums, input, target, weight, lse, aux, reduction_of(reduction, kOp),
        ignore_index, label_smoothing, terms_of(0, std::nullopt, gamma, std::nullopt), squared,
        Device::backward());
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
                               const Tensor& total_weight, c10::string_view reduction,
                               int64_t ignore_index, double label_smoothing,
                               int64_t class_offset, int64_t total_classes) {
    const typename Device::Guard guard(input.device());
    return cross_entropy_shard_backward_impl(
        grad_loss, input, target, weight, lse, total_weight,
        reduction_of(reduction, "vocab_parallel_cross_entropy"), ignore_index, label_smoothing,
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

// The cross-entropy with the overlap sums (the CPU's kernels and the CUDA lanes path's).
template <typename Device>
void register_overlap_ops(torch::Library& m) {
  using Ops = CrossEntropyOps<Device>;
  m.impl("cross_entropy_overlap_forward", &Ops::overlap_forward);
  m.impl("cross_entropy_overlap_backward", &Ops::overlap_backward);
}

// Device: Guard, forward(), backward() returning BinaryCrossEntropyBackend. One pair of ops per
// loss the BCE kernels compute (BinaryLoss).
template <typename Device>
struct BinaryCrossEntropyOps {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  using OptDtype = std::optional<at::ScalarType>;
  using Kind = BinaryLoss::Kind;

  static Tensor forward(const Tensor& input, const Tensor& target, const OptTensor& weight,
                        const OptTensor& pos_weight, c10::string_view reduction,
                        const BinaryLoss& loss, OptDtype out_dtype, const char* op) {
    const typename Device::Guard guard(input.device());
    return binary_cross_entropy_forward_impl(input, target, weight, pos_weight,
                                             reduction_of(reduction, op), loss, out_dtype,
                                             Device::forward());
  }
  static std::tuple<Tensor, Tensor> backward(const Tensor& grad_loss, const Tensor& input,
                                             const Tensor& target, const OptTensor& weight,
                                             const OptTensor& pos_weight,
                                             c10::string_view reduction, const BinaryLoss& loss,
                                             bool input_grad, bool target_grad, const char* op) {
    const typename Device::Guard guard(input.device());
    return binary_cross_entropy_backward_impl(grad_loss, input, target, weight, pos_weight,
                                              reduction_of(reduction, op), loss, input_grad,
                                              target_grad, Device::backward());
  }

  static Tensor logits_forward(const Tensor& input, const Tensor& target, const OptTensor& weight,
                               const OptTensor& pos_weight, c10::string_view reduction,
                               OptDtype out_dtype) {
    return forward(input, target, weight, pos_weight, reduction, {Kind::WithLogits}, out_dtype,
                   "binary_cross_entropy_with_logits");
  }
  static std::tuple<Tensor, Tensor> logits_backward(const Tensor& grad_loss, const Tensor& input,
                                                    const Tensor& target,
                                                    const OptTensor& weight,
                                                    const OptTensor& pos_weight,
                                                    c10::string_view reduction, bool input_grad,
                                                    bool target_grad) {
    return backward(grad_loss, input, target, weight, pos_weight, reduction, {Kind::WithLogits},
                    input_grad, target_grad, "binary_cross_entropy_with_logits");
  }
  static Tensor focal_forward(const Tensor& input, const Tensor& target, double gamma,
                              std::optional<double> alpha, const OptTensor& alpha_tensor,
                              const OptTensor& weight, const OptTensor& pos_weight,
                              c10::string_view reduction, OptDtype out_dtype) {
    return forward(input, target, weight, pos_weight, reduction,
                   {Kind::SigmoidFocal, gamma, alpha, alpha_tensor}, out_dtype,
                   "sigmoid_focal_loss");
  }
  static std::tuple<Tensor, Tensor> focal_backward(
      const Tensor& grad_loss, const Tensor& input, const Tensor& target, double gamma,
      std::optional<double> alpha, const OptTensor& alpha_tensor, const OptTensor& weight,
      const OptTensor& pos_weight, c10::string_view reduction, bool input_grad,
      bool target_grad) {
    return backward(grad_loss, input, target, weight, pos_weight, reduction,
                    {Kind::SigmoidFocal, gamma, alpha, alpha_tensor}, input_grad, target_grad,
                    "sigmoid_focal_loss");
  }
  static Tensor prob_forward(const Tensor& input, const Tensor& target, const OptTensor& weight,
                             const OptTensor& pos_weight, c10::string_view reduction,
                             OptDtype out_dtype) {
    return forward(input, target, weight, pos_weight, reduction, {Kind::Probabilities},
                   out_dtype, "binary_cross_entropy");
  }
  static std::tuple<Tensor, Tensor> prob_backward(const Tensor& grad_loss, const Tensor& input,
                                                  const Tensor& target, const OptTensor& weight,
                                                  const OptTensor& pos_weight,
                                                  c10::string_view reduction, bool input_grad,
                                                  bool target_grad) {
    return backward(grad_loss, input, target, weight, pos_weight, reduction,
                    {Kind::Probabilities}, input_grad, target_grad, "binary_cross_entropy");
  }
};

template <typename Device>
void register_binary_cross_entropy_ops(torch::Library& m) {
  using Ops = BinaryCrossEntropyOps<Device>;
  m.impl("binary_cross_entropy_with_logits_forward", &Ops::logits_forward);
  m.impl("binary_cross_entropy_with_logits_backward", &Ops::logits_backward);
  m.impl("sigmoid_focal_loss_forward", &Ops::focal_forward);
  m.impl("sigmoid_focal_loss_backward", &Ops::focal_backward);
  m.impl("binary_cross_entropy_forward", &Ops::prob_forward);
  m.impl("binary_cross_entropy_backward", &Ops::prob_backward);
}

}  // namespace weighted_loss
