// The layout of the logits and the params built from it (cross_entropy_layout.h).
#include "cross_entropy_layout.h"

#include <c10/util/Exception.h>

namespace weighted_loss::ce_glue {

namespace {
constexpr const char* kOp = "cross_entropy";
}  // namespace

static bool view_of(const Tensor& x, Layout& l) {
  l.input = x;
  if (x.dim() == 1) {
    l.outer = 1;
    l.classes = x.size(0);
    l.inner = 1;
    l.stride_outer = 0;
    l.stride_class = x.stride(0);
    l.stride_inner = 1;
  } else {
    l.outer = x.size(0);
    l.stride_outer = x.stride(0);
    l.classes = x.size(1);
    l.stride_class = x.stride(1);
    l.inner = 1;
    l.stride_inner = 1;
    // the spatial dims must collapse to one stride
    int64_t last = -1;
    for (int64_t d = 2; d < x.dim(); ++d) {
      l.inner *= x.size(d);
      if (x.size(d) == 1) continue;
      if (last >= 0 && x.stride(last) != x.stride(d) * x.size(d)) return false;
      last = d;
    }
    if (last >= 0) l.stride_inner = x.stride(last);
  }
  if (l.classes <= 1) l.stride_class = 1;
  if (l.stride_class == 1) return true;
  if (l.inner > 1) return l.stride_inner == 1;
  if (l.stride_outer == 1 || l.outer <= 1) {
    // (N, C) with N contiguous, e.g. a transposed (C, N): lanes along N
    l.inner = l.outer;
    l.stride_inner = 1;
    l.outer = 1;
    l.stride_outer = 0;
    return true;
  }
  return false;
}

// (N, C) logits whose rows are contiguous but padded apart (row stride > C: a slice of a wider
// buffer, e.g. a vocabulary padded to a multiple of 64): read in place, not copied.
bool row_strided(const Tensor& x) {
  return x.dim() == 2 && x.size(1) > 1 && x.stride(1) == 1 && x.stride(0) > x.size(1);
}

// in_place_rows: the op may read row-strided logits in place (index targets; probability
// targets would need strides of their own)
Layout layout_of(const Tensor& input, bool in_place_rows) {
  Layout l;
  if (input.numel() == 0) {  // nothing is read: the sizes as if contiguous (their strides may
                             // be anything: (2, 5, 0, 3) has no single spatial stride)
    l.input = input;
    l.classes = input.size(input.dim() == 1 ? 0 : 1);
    l.outer = input.dim() == 1 ? 1 : input.size(0);
    for (int64_t d = 2; d < input.dim(); ++d) l.inner *= input.size(d);
    l.stride_inner = 1;
    l.stride_class = l.inner > 1 ? l.inner : 1;
    l.stride_outer = l.classes * l.inner;
    return l;
  }
  if ((input.is_non_overlapping_and_dense() || (in_place_rows && row_strided(input))) &&
      view_of(input, l)) {
    return l;
  }
  const bool ok = view_of(input.contiguous(), l);
  TORCH_INTERNAL_ASSERT(ok);
  return l;
}

// Probability targets: the logits' shape, their dtype or float32 beside 16-bit logits (read in
// place: params.h target_dtype), laid out with the logits' strides.
Tensor check_prob_target(const Layout& l, const Tensor& input, const Tensor& target) {
  TORCH_CHECK(target.sizes() == input.sizes(), "cross_entropy: target with class probabilities "
              "must have the input's shape ", input.sizes(), ", got ", target.sizes());
  aux_dtype_of(target.scalar_type(), input, "cross_entropy", "target with class probabilities");
  if (target.strides() == l.input.strides() || target.numel() == 0) return target;
  Tensor t = at::empty_like(l.input, target.options());
  t.copy_(target);
  return t;
}

std::vector<int64_t> row_shape(const Tensor& input) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d < input.dim(); ++d) {
    if (d != (input.dim() == 1 ? 0 : 1)) s.push_back(input.size(d));
  }
  return s;
}

// terms.logit_adjust, when given, is checked and replaced by the acc copy the kernels read (the
// caller's terms hold it for the launch).
CrossEntropyParams params_of(const Layout& l, const Tensor& target, const Tensor& weight,
                             Reduction reduction, bool prob, int64_t ignore_index,
                             double label_smoothing, RowTerms& terms) {
  CrossEntropyParams p{};
  p.dtype = dtype_of(l.input, kOp);
  p.target_dtype = prob ? aux_dtype_of(target.scalar_type(), l.input, kOp, "target") : p.dtype;
  p.loss_dtype = p.dtype;
  p.outer = l.outer;
  p.classes = l.classes;
  p.inner = l.inner;
  p.stride_outer = l.stride_outer;
  p.stride_class = l.stride_class;
  p.stride_inner = l.stride_inner;
  p.grad_stride_outer = l.stride_outer;
  p.reduction = reduction;
  p.prob_target = prob;
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing;
  p.class_offset = 0;
  p.total_classes = l.classes;
  p.z_loss = terms.z_loss;
  p.softcap = terms.softcap;
  p.focal_gamma = terms.focal_gamma;
  // read-only inputs by const_data_ptr: a copy-on-write tensor (torch._lazy_clone) is read in
  // place, not materialized
  p.input = l.input.const_data_ptr();
  p.target = target.const_data_ptr();
  p.target_type = target.scalar_type() == at::kInt    ? TargetType::Int32
                  : target.scalar_type() == at::kByte ? TargetType::UInt8
                                                      : TargetType::Int64;
  p.weight = weight.defined() ? weight.const_data_ptr() : nullptr;
  p.logit_adjust = nullptr;
  if (terms.logit_adjust.defined()) {
    const Tensor& a = terms.logit_adjust;
    TORCH_CHECK(a.dim() == 1 && a.numel() == l.classes, kOp,
                ": logit_adjustment must have one value per class, shape (", l.classes,
                ",), got ", a.sizes());
    TORCH_CHECK(a.is_floating_point(), kOp, ": logit_adjustment must be a floating point tensor, "
                "got ", a.scalar_type());
    TORCH_CHECK(a.device() == l.input.device(), kOp, ": logit_adjustment is on ", a.device(),
                " but input is on ", l.input.device());
    TORCH_CHECK(terms.softcap == 0, kOp, ": logit_adjustment beside softcap is not read by the "
                "kernels (add it to the logits)");
    terms.logit_adjust = a.to(acc_type(l.input)).contiguous();
    p.logit_adjust = terms.logit_adjust.const_data_ptr();
  }
  return p;
}

}  // namespace weighted_loss::ce_glue
