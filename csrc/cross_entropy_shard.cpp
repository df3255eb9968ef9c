// Device-agnostic glue of the vocab-parallel shard ops (weighted_loss/vocab_parallel.py): the
// shard's (rows, classes) logits read in place, its statistics' allocation, and its gradient from
// the merged statistics. The kernels are the cross-entropy kernels in shard mode (params.h:
// class_offset, total_classes, shard_stats).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "cross_entropy.h"

namespace weighted_loss {
namespace {

using at::Tensor;
using namespace ce_glue;

constexpr const char* kOp = "vocab_parallel_cross_entropy";

// The shard's logits as rows the kernels read in place: 2-D with contiguous classes (rows may be
// padded apart); anything else is copied.
Tensor shard_rows(const Tensor& input) {
  TORCH_CHECK(input.dim() == 2, kOp, ": the shard's logits must be 2-D (rows, classes of the "
              "shard), got shape ", input.sizes());
  return input.size(1) <= 1 || input.stride(1) == 1 ? input : input.contiguous();
}

CrossEntropyParams shard_params(const Tensor& x, const Tensor& y, const Tensor& w,
                                Reduction reduction, int64_t ignore_index,
                                double label_smoothing, int64_t class_offset,
                                int64_t total_classes) {
  TORCH_CHECK(class_offset >= 0 && class_offset + x.size(1) <= total_classes, kOp,
              ": the shard's classes [", class_offset, ", ", class_offset + x.size(1),
              ") are not within the ", total_classes, " classes");
  CrossEntropyParams p{};
  p.dtype = dtype_of(x, kOp);
  p.target_dtype = p.loss_dtype = p.dtype;
  p.outer = x.size(0);
  p.classes = x.size(1);
  p.inner = 1;
  p.stride_outer = x.stride(0);
  p.stride_class = 1;
  p.stride_inner = 1;
  p.grad_stride_outer = p.stride_outer;
  p.reduction = reduction;
  p.prob_target = false;
  p.target_type = y.scalar_type() == at::kInt    ? TargetType::Int32
                  : y.scalar_type() == at::kByte ? TargetType::UInt8
                                                 : TargetType::Int64;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.class_offset = class_offset;
  p.total_classes = total_classes;
  p.input = x.const_data_ptr();  // read in place, copy-on-write tensors too
  p.target = y.const_data_ptr();
  p.weight = w.defined() ? w.const_data_ptr() : nullptr;
  return p;
}

}  // namespace

Tensor cross_entropy_shard_forward_impl(const Tensor& input, const Tensor& target,
                                        const std::optional<Tensor>& weight, int64_t ignore_index,
                                        double label_smoothing, int64_t class_offset,
                                        int64_t total_classes, const CrossEntropyBackend& backend) {
  check_common(input, target, kOp);
  check_label_smoothing(label_smoothing, kOp);
  const Tensor x = shard_rows(input);
  const Tensor y = check_index_target(x, target);
  const Tensor w = check_weight(weight, x, total_classes, kOp);
  CrossEntropyParams p = shard_params(x, y, w, Reduction::None, ignore_index,
                                      label_smoothing > 0 ? label_smoothing : 0.0, class_offset,
                                      total_classes);
  const int64_t rows = x.size(0);
  Tensor stats = at::empty({5, rows}, x.options().dtype(acc_type(x)));
  p.lse = stats.data_ptr();
  p.shard_stats = rows > 0 ? stats[2].data_ptr() : stats.data_ptr();
  backend.launch(p);
  return stats;
}

Tensor cross_entropy_shard_backward_impl(const Tensor& grad_loss, const Tensor& input,
                                         const Tensor& target, const std::optional<Tensor>& weight,
                                         const Tensor& lse, const Tensor& total_weight,
                                         Reduction reduction, int64_t ignore_index,
                                         double label_smoothing, int64_t class_offset,
                                         int64_t total_classes,
                                         const CrossEntropyBackend& backend) {
  check_common(input, target, kOp);
  const Tensor x = shard_rows(input);
  const Tensor y = check_index_target(x, target);
  const Tensor w = check_weight(weight, x, total_classes, kOp);
  CrossEntropyParams p = shard_params(x, y, w, reduction, ignore_index,
                                      label_smoothing > 0 ? label_smoothing : 0.0, class_offset,
                                      total_classes);
  const Tensor g = grad_of(grad_loss, x, p);
  TORCH_CHECK(lse.numel() == 2 * x.size(0) && lse.scalar_type() == acc_type(x), kOp,
              " backward: lse must be (2, ", x.size(0), ") of ", acc_type(x), ", got ",
              lse.sizes(), " of ", lse.scalar_type());
  TORCH_CHECK(total_weight.numel() == 1 && total_weight.scalar_type() == acc_type(x), kOp,
              " backward: total_weight must be one ", acc_type(x), " value, got ",
              total_weight.sizes(), " of ", total_weight.scalar_type());
  const Tensor lse_c = lse.contiguous(), tw = total_weight.contiguous();
  p.lse = const_cast<void*>(lse_c.const_data_ptr());
  p.total_weight = const_cast<void*>(tw.const_data_ptr());
  p.grad_loss = g.const_data_ptr();
  // the gradient has empty_like(input)'s strides (the fake kernel's promise); the kernels write
  // rows with contiguous classes and a row stride of their own
  Tensor out = backend.empty_like(input);
  Tensor dst = out.size(1) <= 1 || out.stride(1) == 1 ? out : at::empty_like(x);
  p.grad_stride_outer = dst.stride(0);
  p.grad_input = dst.data_ptr();
  backend.launch(p);
  if (!dst.is_same(out)) out.copy_(dst);
  return out;
}

}  // namespace weighted_loss
