// Device-agnostic glue of the cross-entropy ops: argument checks that name the argument and the
// value, the (outer, classes, inner) view of the logits, output allocation. The device files
// (cpu/cross_entropy_cpu.cpp, cuda/cross_entropy_cuda.cpp) pass the kernel launcher in.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "params.h"

namespace weighted_loss {

using CrossEntropyBackend = Backend<CrossEntropyParams>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_impl(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, const CrossEntropyBackend& backend);

at::Tensor cross_entropy_backward_impl(const at::Tensor& grad_loss, const at::Tensor& input,
                                       const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight,
                                       const at::Tensor& lse, const at::Tensor& total_weight,
                                       int64_t reduction, int64_t ignore_index,
                                       double label_smoothing, const CrossEntropyBackend& backend);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_forward_impl(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, double label_smoothing, const CrossEntropyBackend& backend);

at::Tensor cross_entropy_prob_backward_impl(const at::Tensor& grad_loss, const at::Tensor& input,
                                            const at::Tensor& target,
                                            const std::optional<at::Tensor>& weight,
                                            const at::Tensor& lse, const at::Tensor& tsum,
                                            int64_t reduction, double label_smoothing,
                                            const CrossEntropyBackend& backend);

at::Tensor cross_entropy_prob_target_backward_impl(const at::Tensor& grad_loss,
                                                   const at::Tensor& input,
                                                   const std::optional<at::Tensor>& weight,
                                                   const at::Tensor& lse, int64_t reduction,
                                                   double label_smoothing, const CrossEntropyBackend& backend);

}  // namespace weighted_loss
