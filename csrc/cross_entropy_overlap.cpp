// Glue of the cross-entropy with the overlap sums (cross_entropy.h): checks, the lane layout the
// sums need (one outer index per item), allocation. The kernels: cpu/cross_entropy_overlap.h.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "cross_entropy.h"
#include "cross_entropy_layout.h"

namespace weighted_loss {

using at::Tensor;

namespace {

using namespace ce_glue;

constexpr const char* kOp = "cross_entropy_overlap";

// The logits in the lane layout with outer = N: the sums are per item. Anything else (channels
// last, a transposed (N, C)) is read from a contiguous copy.
Layout overlap_layout_of(const Tensor& input) {
  Layout l = layout_of(input, /*in_place_rows=*/false);
  const bool lanes = l.inner == 1 || l.stride_inner == 1;
  const bool class_rows = l.stride_class == 1 && l.inner > 1 && l.classes > 1;
  if (l.outer == input.size(0) && lanes && !class_rows) return l;
  return layout_of(input.contiguous(), /*in_place_rows=*/false);
}

void check_input(const Tensor& input, const Tensor& target, double label_smoothing,
                 RowTerms terms, const char* op) {
  check_common(input, target, op);
  TORCH_CHECK_VALUE(input.dim() >= 2, op, ": input must be (N, C, d1, ..., dk), got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(input.size(1) > 0, op, ": input must have at least one class, got shape ",
                    input.sizes());
  check_label_smoothing(label_smoothing, op);
  check_terms(terms, op);
  TORCH_CHECK_VALUE(terms.z_loss == 0 && terms.softcap == 0 && !terms.logit_adjust.defined(), op,
                    ": z_loss, softcap and logit_adjustment are not read beside the sums");
}

// Whether the forward hands its per-position planes (lse; tsum for probabilities) to the
// backward. Only the focal term's are kept: without it the backward recomputes (sh, L, q) from
// the logits per block, so that nothing of the logits' size lives between the two passes.
bool keeps_planes(RowTerms terms) { return terms.focal_gamma > 0; }

Tensor target_of(const Layout& l, const Tensor& input, const Tensor& target) {
  return target.is_floating_point() ? check_prob_target(l, input, target)
                                    : check_index_target(input, target);
}

// What both ops build from their arguments: the checked inputs in the kernels' layout, and the
// params over them.
struct Call {
  bool prob;  // probabilities (a floating target), or class indices
  Layout l;
  Tensor t, w;
  RowTerms terms;  // (params_of may keep a tensor in it for the launch)
  CrossEntropyParams p;
};

Call prepare(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
             Reduction reduction, int64_t ignore_index, double label_smoothing, RowTerms terms,
             const char* op) {
  check_input(input, target, label_smoothing, terms, op);
  Call c;
  c.prob = target.is_floating_point();
  c.l = overlap_layout_of(input);
  c.t = target_of(c.l, input, target);
  c.w = check_weight(weight, input, c.l.classes, op);
  c.terms = terms;
  c.p = params_of(c.l, c.t, c.w, reduction, c.prob, ignore_index, label_smoothing, c.terms);
  return c;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> cross_entropy_overlap_forward_impl(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    Reduction reduction, int64_t ignore_index, double label_smoothing, RowTerms terms,
    bool squared, std::optional<at::ScalarType> out_dtype, const CrossEntropyBackend& backend) {
  Call c = prepare(input, target, weight, reduction, ignore_index, label_smoothing, terms, kOp);
  const bool prob = c.prob;
  const Layout& l = c.l;
  CrossEntropyParams& p = c.p;
  const auto acc = input.options().dtype(acc_type(input));
  // the loss's dtype as the cross-entropy ops give it: the targets' for probabilities
  const auto lo = input.options().dtype(
      loss_dtype_of(out_dtype, prob ? c.t.scalar_type() : input.scalar_type(), input, kOp));
  Tensor loss = p.reduction != Reduction::None ? at::empty({}, lo)
                : prob                          ? at::empty(row_shape(input), lo)
                                                : at::empty(target.sizes(), lo);
  p.loss_dtype = dtype_of(loss, kOp);
  const int64_t rows = l.outer * l.inner;
  Tensor lse = at::empty({prob ? 2 : lse_planes(terms, label_smoothing), rows}, acc);
  Tensor aux = prob ? at::empty({rows}, acc) : at::zeros({}, acc);
  Tensor sums = at::empty({l.outer, 3, l.classes}, acc);
  p.loss = loss.data_ptr();
  p.lse = lse.data_ptr();
  (prob ? p.tsum : p.total_weight) = aux.data_ptr();
  p.overlap_sums = sums.data_ptr();
  p.overlap_squared = squared;
  backend.launch(p);
  if (!keeps_planes(terms)) {  // scratch: the backward recomputes them
    return {loss, sums, at::empty({0}, acc), prob ? at::empty({0}, acc) : aux};
  }
  return {loss, sums, lse, aux};
}

Tensor cross_entropy_overlap_backward_impl(
    const Tensor& grad_loss, const Tensor& grad_sums, const Tensor& input, const Tensor& target,
    const std::optional<Tensor>& weight, const Tensor& lse, const Tensor& aux,
    Reduction reduction, int64_t ignore_index, double label_smoothing, RowTerms terms,
    bool squared, const CrossEntropyBackend& backend) {
  constexpr const char* op = "cross_entropy_overlap backward";
  Call c = prepare(input, target, weight, reduction, ignore_index, label_smoothing, terms, op);
  const bool prob = c.prob;
  const Layout& l = c.l;
  CrossEntropyParams& p = c.p;
  const Tensor g = grad_of(grad_loss, input, p);
  const int64_t rows = l.outer * l.inner;
  const bool kept = keeps_planes(terms);
  const int64_t planes = !kept ? 0 : prob ? 2 : lse_planes(terms, label_smoothing);
  TORCH_CHECK(lse.numel() == planes * rows && lse.scalar_type() == acc_type(input) &&
                  aux.numel() == (!prob ? 1 : kept ? rows : 0) &&
                  aux.scalar_type() == acc_type(input),
              op, ": lse and aux do not match the input");
  TORCH_CHECK(grad_sums.sizes() == at::IntArrayRef({l.outer, 3, l.classes}), op,
              ": grad_sums must have shape (", l.outer, ", 3, ", l.classes, "), got ",
              grad_sums.sizes());
  const Tensor gs = grad_sums.to(acc_type(input)).contiguous();
  const Tensor lse_c = lse.contiguous(), aux_c = aux.contiguous();
  // read by the backward; null where it recomputes them
  p.lse = kept ? const_cast<void*>(lse_c.const_data_ptr()) : nullptr;
  (prob ? p.tsum : p.total_weight) =
      kept || !prob ? const_cast<void*>(aux_c.const_data_ptr()) : nullptr;
  p.grad_loss = g.const_data_ptr();
  p.grad_sums = gs.const_data_ptr();
  p.overlap_squared = squared;
  return with_strides_of(backend, input, l, p, [&](Tensor& out) {
    p.grad_input = out.data_ptr();
    backend.launch(p);
  });
}

}  // namespace weighted_loss
