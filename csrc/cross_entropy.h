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

// Terms beside label smoothing that change each row's loss: z-loss, logit softcapping and the
// softmax focal loss's gamma (params.h; 0 leaves them off).
struct RowTerms {
  double z_loss = 0, softcap = 0, focal_gamma = 0;
  at::Tensor logit_adjust;  // (C,) added to every row's logits; undefined: off (params.h)
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward_impl(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    Reduction reduction, int64_t ignore_index, double label_smoothing, RowTerms terms,
    std::optional<at::ScalarType> out_dtype, const CrossEntropyBackend& backend);

at::Tensor cross_entropy_backward_impl(const at::Tensor& grad_loss, const at::Tensor& input,
                                       const at::Tensor& target,
                                       const std::optional<at::Tensor>& weight,
                                       const at::Tensor& lse, const at::Tensor& total_weight,
                                       Reduction reduction, int64_t ignore_index,
                                       double label_smoothing, RowTerms terms, const CrossEntropyBackend& backend);

// The same gradient written over the logits (input), which the caller gives up.
void cross_entropy_backward_inplace_impl(const at::Tensor& grad_loss, const at::Tensor& input,
                                         const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight,
                                         const at::Tensor& lse, const at::Tensor& total_weight,
                                         Reduction reduction, int64_t ignore_index,
                                         double label_smoothing, RowTerms terms,
                                         const CrossEntropyBackend& backend);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_prob_forward_impl(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    Reduction reduction, double label_smoothing, RowTerms terms,
    std::optional<at::ScalarType> out_dtype, const CrossEntropyBackend& backend);

at::Tensor cross_entropy_prob_backward_impl(const at::Tensor& grad_loss, const at::Tensor& input,
                                            const at::Tensor& target,
                                            const std::optional<at::Tensor>& weight,
                                            const at::Tensor& lse, const at::Tensor& tsum,
                                            Reduction reduction, double label_smoothing, RowTerms terms,
                                            const CrossEntropyBackend& backend);

// A vocab-parallel shard (params.h): the forward's statistics (5, rows) of acc, the shard's raw
// (max, log-sum) then shard_stats' three planes; the backward of the shard's logits from the
// merged (shift, log-sum) planes of the unsharded rows.
at::Tensor cross_entropy_shard_forward_impl(const at::Tensor& input, const at::Tensor& target,
                                            const std::optional<at::Tensor>& weight,
                                            int64_t ignore_index, double label_smoothing,
                                            int64_t class_offset, int64_t total_classes,
                                            const CrossEntropyBackend& backend);

at::Tensor cross_entropy_shard_backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& total_weight,
    Reduction reduction, int64_t ignore_index, double label_smoothing, int64_t class_offset,
    int64_t total_classes, const CrossEntropyBackend& backend);

// Cross-entropy with the overlap sums of the Dice family beside it (params.h: overlap_sums), for
// (N, C, d...) logits: class indices (an integer target) or probabilities (a floating one, the
// logits' shape). Returns (loss, sums, lse, aux): sums (N, 3, C) acc, the planes I, P, T; aux the
// mean's divisor (indices) or tsum (probabilities), as the cross-entropy ops return them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_overlap_forward_impl(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    Reduction reduction, int64_t ignore_index, double label_smoothing, RowTerms terms,
    bool squared, std::optional<at::ScalarType> out_dtype, const CrossEntropyBackend& backend);

// The logits' gradient of grad_loss * loss + sum(grad_sums * sums), grad_sums (N, 3, C) (T's
// plane is not read: T does not depend on the logits).
at::Tensor cross_entropy_overlap_backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& grad_sums, const at::Tensor& input,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, const at::Tensor& lse,
    const at::Tensor& aux, Reduction reduction, int64_t ignore_index, double label_smoothing,
    RowTerms terms, bool squared, const CrossEntropyBackend& backend);

// The argument checks both glue files use (cross_entropy.cpp), each naming the argument.
namespace ce_glue {
void check_common(const at::Tensor& input, const at::Tensor& target, const char* op);
at::Tensor check_weight(const std::optional<at::Tensor>& weight, const at::Tensor& input,
                        int64_t classes, const char* op);
void check_label_smoothing(double label_smoothing, const char* op);
// class indices of the logits' rows, contiguous, in their own integer dtype
at::Tensor check_index_target(const at::Tensor& input, const at::Tensor& target);
// the upstream gradient, contiguous, checked against p.reduction; its dtype into p.loss_dtype
at::Tensor grad_of(const at::Tensor& grad_loss, const at::Tensor& input, CrossEntropyParams& p);
}  // namespace ce_glue

at::Tensor cross_entropy_prob_target_backward_impl(const at::Tensor& grad_loss,
                                                   const at::Tensor& input,
                                                   const std::optional<at::Tensor>& weight,
                                                   const at::Tensor& lse, Reduction reduction,
                                                   double label_smoothing, RowTerms terms,
                                                   std::optional<at::ScalarType> target_dtype,
                                                   const CrossEntropyBackend& backend);

}  // namespace weighted_loss
