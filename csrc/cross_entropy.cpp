#include "cross_entropy.h"
#include "cross_entropy_layout.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <vector>

namespace weighted_loss {

using at::Tensor;

namespace ce_glue {

void check_common(const Tensor& input, const Tensor& target, const char* op) {
  dtype_of(input, op);
  TORCH_CHECK(input.dim() >= 1, op, ": input must have at least one dimension (the classes), got "
              "a 0-d tensor");
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
              " but input is on ", input.device());
}

Tensor check_weight(const std::optional<Tensor>& weight, const Tensor& input, int64_t classes,
                    const char* op) {
  if (!weight.has_value() || !weight->defined()) return Tensor();
  const Tensor& w = *weight;
  TORCH_CHECK(w.dim() == 1 && w.numel() == classes, op,
              ": weight tensor should be defined either for all ", classes,
              " classes or no classes but got weight tensor of shape: ", w.sizes());
  TORCH_CHECK(w.is_floating_point(), op, ": weight must be a floating point tensor, got ",
              w.scalar_type());
  TORCH_CHECK(w.device() == input.device(), op, ": weight is on ", w.device(),
              " but input is on ", input.device());
  // read as acc (params.h): a float32 weight beside bfloat16 logits (autocast) is used as it is
  return w.to(acc_type(input)).contiguous();
}

void check_terms(RowTerms terms, const char* op) {
  TORCH_CHECK_VALUE(terms.z_loss >= 0 && std::isfinite(terms.z_loss), op,
                    ": z_loss must be a finite number >= 0, got ", terms.z_loss);
  TORCH_CHECK_VALUE(terms.softcap >= 0 && std::isfinite(terms.softcap), op,
                    ": softcap must be a finite number > 0 (or None), got ", terms.softcap);
  TORCH_CHECK_VALUE(terms.focal_gamma >= 0 && std::isfinite(terms.focal_gamma), op,
                    ": gamma must be a finite number >= 0, got ", terms.focal_gamma);
}

// Planes of the saved lse of class-index targets: the shift and the log-sum, and for the focal
// loss each row's s_y, or with label smoothing its Q = sum_c w_c s_c (params.h: focal_gamma).
int64_t lse_planes(RowTerms terms, double label_smoothing) {
  return terms.focal_gamma > 0 ? 3 : 2;
}

void check_label_smoothing(double label_smoothing, const char* op) {
  TORCH_CHECK(label_smoothing <= 1.0, op, ": label_smoothing must be between 0.0 and 1.0. Got: ",
              label_smoothing);
}

// Class indices: (N, d...) for (N, C, d...) logits, () for (C,). Returns them contiguous, in
// their own dtype (the kernels read int64, int32 and uint8: no copy to int64).
Tensor check_index_target(const Tensor& input, const Tensor& target) {
  // a batch mismatch first, PyTorch's ValueError (a float target of another shape than the
  // logits' is taken for class indices, as by PyTorch)
  TORCH_CHECK_VALUE(input.dim() < 2 || target.dim() == 0 || target.size(0) == input.size(0),
                    "Expected input batch_size (", input.size(0), ") to match target batch_size (",
                    target.size(0), ").");
  const auto st = target.scalar_type();
  // PyTorch's wording first (its tests match it), then ours: int32 is taken too
  TORCH_CHECK(st == at::kLong || st == at::kInt || st == at::kByte,
              "expected target dtype to be Long or Byte, but got ", st,
              " (cross_entropy: target with class indices must be int64, int32 or uint8)");
  if (input.dim() == 1) {
    // (a (1,) target is taken as the 0-d one by the Python layer, _local, as by PyTorch)
    TORCH_CHECK_VALUE(target.dim() != 1, "For 1D input, 1D target must have size 1, but got "
                      "target size: ", target.size(0));
    TORCH_CHECK(target.dim() == 0, "0D or 1D target tensor expected, multi-target not supported "
                "(cross_entropy: for unbatched input of shape ", input.sizes(),
                " target must be 0-d, got shape ", target.sizes(), ")");
  } else if (input.dim() == 2) {
    TORCH_CHECK(target.dim() == 1, "cross_entropy: for input of shape ", input.sizes(),
                " target must be 1-d, got shape ", target.sizes());
  } else {
    std::vector<int64_t> expected{input.size(0)};
    for (int64_t d = 2; d < input.dim(); ++d) expected.push_back(input.size(d));
    TORCH_CHECK(target.sizes() == at::IntArrayRef(expected), "cross_entropy: Expected target size ",
                at::IntArrayRef(expected), ", got ", target.sizes());
  }
  return target.contiguous();
}

// The upstream gradient as the kernels read it: per row contiguous for reduction none; its dtype
// (the loss's) into p.loss_dtype.
Tensor grad_of(const Tensor& grad_loss, const Tensor& input, CrossEntropyParams& p) {
  const Reduction reduction = p.reduction;
  p.loss_dtype = aux_dtype_of(grad_loss.scalar_type(), input, "cross_entropy backward",
                              "grad_loss");
  if (reduction != Reduction::None) {
    TORCH_CHECK(grad_loss.numel() == 1, "cross_entropy backward: grad_loss must be a scalar for a "
                "reduced loss, got shape ", grad_loss.sizes());
  }
  return grad_loss.contiguous();
}

}  // namespace ce_glue

namespace {
using namespace ce_glue;
constexpr const char* kOp = "cross_entropy";
}  // namespace


std::tuple<Tensor, Tensor, Tensor> cross_entropy_forward_impl(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    Reduction reduction, int64_t ignore_index, double label_smoothing, RowTerms terms,
    std::optional<at::ScalarType> out_dtype, const CrossEntropyBackend& backend) {
  check_common(input, target, "cross_entropy");
  check_label_smoothing(label_smoothing, "cross_entropy");
  check_terms(terms, "cross_entropy");
  const Tensor y = check_index_target(input, target);
  const Layout l = layout_of(input, /*in_place_rows=*/true);
  const Tensor w = check_weight(weight, input, l.classes, "cross_entropy");
  CrossEntropyParams p = params_of(l, y, w, reduction, false, ignore_index, label_smoothing, terms);
  const auto acc = input.options().dtype(acc_type(input));
  const auto lo = input.options().dtype(loss_dtype_of(out_dtype, input.scalar_type(), input, kOp));
  Tensor loss = p.reduction == Reduction::None ? at::empty(target.sizes(), lo) : at::empty({}, lo);
  p.loss_dtype = dtype_of(loss, kOp);
  Tensor lse = at::empty({lse_planes(terms, label_smoothing), l.outer * l.inner}, acc);
  Tensor total_weight = at::zeros({}, acc);
  p.loss = loss.data_ptr();
  p.lse = lse.data_ptr();
  p.total_weight = total_weight.data_ptr();
  backend.launch(p);
  // no classes: every target must be ignore_index (the kernels raised otherwise); PyTorch's
  // smoothing term is (s / C) times an empty sum, 0 / 0 in every row, ignored or not
  if (l.classes == 0 && label_smoothing > 0) loss.fill_(std::numeric_limits<double>::quiet_NaN());
  return {loss, lse, total_weight};
}

namespace {

// The backward of class-index targets: out_of_place writes a new gradient; otherwise it
// overwrites the logits (when the kernels read them in place: every element is read before it is
// written, by the thread that writes it), or a contiguous copy of them, then copied back.
Tensor index_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                      const std::optional<Tensor>& weight, const Tensor& lse,
                      const Tensor& total_weight, Reduction reduction, int64_t ignore_index,
                      double label_smoothing, RowTerms terms, const CrossEntropyBackend& backend,
                      bool out_of_place) {
  check_common(input, target, "cross_entropy backward");
  const Tensor y = check_index_target(input, target);
  const Layout l = layout_of(input, /*in_place_rows=*/true);
  const Tensor w = check_weight(weight, input, l.classes, "cross_entropy backward");
  CrossEntropyParams p = params_of(l, y, w, reduction, false, ignore_index, label_smoothing, terms);
  const Tensor g = grad_of(grad_loss, input, p);
  TORCH_CHECK(lse.numel() == lse_planes(terms, label_smoothing) * l.outer * l.inner &&
                  lse.scalar_type() == acc_type(input),
              "cross_entropy backward: lse does not match the input");
  const Tensor lse_c = lse.contiguous();
  p.lse = const_cast<void*>(lse_c.const_data_ptr());  // read by the backward
  p.total_weight = const_cast<void*>(total_weight.const_data_ptr());
  p.grad_loss = g.const_data_ptr();
  if (!out_of_place) {
    if (input.numel() == 0) return input;
    p.grad_input = l.input.data_ptr();  // grad_stride_outer == stride_outer
    backend.launch(p);
    if (!l.input.is_same(input)) input.copy_(l.input);
    return input;
  }
  return with_strides_of(backend, input, l, p, [&](Tensor& out) {
    p.grad_input = out.data_ptr();
    backend.launch(p);
  });
}

}  // namespace

Tensor cross_entropy_backward_impl(const Tensor& grad_loss, const Tensor& input,
                                   const Tensor& target, const std::optional<Tensor>& weight,
                                   const Tensor& lse, const Tensor& total_weight,
                                   Reduction reduction, int64_t ignore_index,
                                   double label_smoothing, RowTerms terms, const CrossEntropyBackend& backend) {
  return index_backward(grad_loss, input, target, weight, lse, total_weight, reduction,
                        ignore_index, label_smoothing, terms, backend, true);
}

void cross_entropy_backward_inplace_impl(const Tensor& grad_loss, const Tensor& input,
                                         const Tensor& target,
                                         const std::optional<Tensor>& weight, const Tensor& lse,
                                         const Tensor& total_weight, Reduction reduction,
                                         int64_t ignore_index, double label_smoothing,
                                         RowTerms terms, const CrossEntropyBackend& backend) {
  index_backward(grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index,
                 label_smoothing, terms, backend, false);
}

std::tuple<Tensor, Tensor, Tensor> cross_entropy_prob_forward_impl(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    Reduction reduction, double label_smoothing, RowTerms terms,
    std::optional<at::ScalarType> out_dtype, const CrossEntropyBackend& backend) {
  check_common(input, target, "cross_entropy");
  check_label_smoothing(label_smoothing, "cross_entropy");
  check_terms(terms, "cross_entropy");
  const Layout l = layout_of(input, /*in_place_rows=*/false);
  const Tensor t = check_prob_target(l, input, target);
  const Tensor w = check_weight(weight, input, l.classes, "cross_entropy");
  CrossEntropyParams p = params_of(l, t, w, reduction, true, -100, label_smoothing, terms);
  const auto acc = input.options().dtype(acc_type(input));
  // the loss has the targets' dtype (the input's, or float32 beside 16-bit logits), as PyTorch's
  // promotion gives it, unless out_dtype says otherwise
  const auto lo = input.options().dtype(loss_dtype_of(out_dtype, t.scalar_type(), input, kOp));
  Tensor loss = p.reduction == Reduction::None ? at::empty(row_shape(input), lo)
                                               : at::empty({}, lo);
  p.loss_dtype = dtype_of(loss, kOp);
  Tensor lse = at::empty({2, l.outer * l.inner}, acc);
  Tensor tsum = at::empty({l.outer * l.inner}, acc);
  if (l.classes == 0) {
    // no classes, nothing to read: PyTorch's -sum over none of them is -0 per row, and its mean
    // divides by numel / C = 0 / 0
    lse.select(0, 0).zero_();
    lse.select(0, 1).fill_(-std::numeric_limits<double>::infinity());
    tsum.zero_();
    loss.fill_(p.reduction == Reduction::Mean ? std::numeric_limits<double>::quiet_NaN() : -0.0);
    return {loss, lse, tsum};
  }
  p.loss = loss.data_ptr();
  p.lse = lse.data_ptr();
  p.tsum = tsum.data_ptr();
  backend.launch(p);
  return {loss, lse, tsum};
}

Tensor cross_entropy_prob_backward_impl(const Tensor& grad_loss, const Tensor& input,
                                        const Tensor& target, const std::optional<Tensor>& weight,
                                        const Tensor& lse, const Tensor& tsum, Reduction reduction,
                                        double label_smoothing, RowTerms terms, const CrossEntropyBackend& backend) {
  check_common(input, target, "cross_entropy backward");
  const Layout l = layout_of(input, /*in_place_rows=*/false);
  const Tensor t = check_prob_target(l, input, target);
  const Tensor w = check_weight(weight, input, l.classes, "cross_entropy backward");
  CrossEntropyParams p = params_of(l, t, w, reduction, true, -100, label_smoothing, terms);
  const Tensor g = grad_of(grad_loss, input, p);
  TORCH_CHECK(lse.numel() == 2 * l.outer * l.inner && tsum.numel() == l.outer * l.inner,
              "cross_entropy backward: lse and tsum do not match the input");
  const Tensor lse_c = lse.contiguous(), tsum_c = tsum.contiguous();
  p.lse = const_cast<void*>(lse_c.const_data_ptr());  // read by the backward
  p.tsum = const_cast<void*>(tsum_c.const_data_ptr());
  p.grad_loss = g.const_data_ptr();
  return with_strides_of(backend, input, l, p, [&](Tensor& out) {
    p.grad_input = out.data_ptr();
    backend.launch(p);
  });
}

Tensor cross_entropy_prob_target_backward_impl(const Tensor& grad_loss, const Tensor& input,
                                               const std::optional<Tensor>& weight,
                                               const Tensor& lse, Reduction reduction,
                                               double label_smoothing, RowTerms terms,
                                               std::optional<at::ScalarType> target_dtype,
                                               const CrossEntropyBackend& backend) {
  constexpr const char* op = "cross_entropy target backward";
  check_common(input, input, op);
  const Layout l = layout_of(input, /*in_place_rows=*/false);
  const Tensor w = check_weight(weight, input, l.classes, op);
  CrossEntropyParams p = params_of(l, l.input, w, reduction, true, -100, label_smoothing, terms);
  const at::ScalarType tst = target_dtype.value_or(input.scalar_type());
  p.target_dtype = aux_dtype_of(tst, input, op, "target_dtype");
  const Tensor g = grad_of(grad_loss, input, p);
  const Tensor lse_c = lse.contiguous();
  p.lse = const_cast<void*>(lse_c.const_data_ptr());  // read by the backward
  p.grad_loss = g.const_data_ptr();
  return with_strides_of(
      backend, input, l, p,
      [&](Tensor& out) {
        p.grad_target = out.data_ptr();
        backend.launch(p);
      },
      tst);
}

}  // namespace weighted_loss
