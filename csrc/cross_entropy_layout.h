// The cross-entropy glue's layout of the logits and its params, shared by the ops' glue files
// (cross_entropy.cpp, cross_entropy_overlap.cpp): the (outer, classes, inner) view the kernels
// read in place, the params built from it, and the gradient written in it.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cross_entropy.h"

namespace weighted_loss::ce_glue {

using at::Tensor;

// The logits as (outer, classes, inner) with one stride each, in a layout the kernels read in
// place: stride_class == 1 (rows along the classes), or stride_inner == 1 (lanes along the
// contiguous spatial axis). Anything else is copied to contiguous first.
struct Layout {
  at::Tensor input;
  int64_t outer = 1, classes = 1, inner = 1;
  int64_t stride_outer = 0, stride_class = 1, stride_inner = 1;
};

// (N, C) logits whose rows are contiguous but padded apart (row stride > C): read in place.
bool row_strided(const Tensor& x);

// in_place_rows: the op may read row-strided logits in place (index targets; probability
// targets would need strides of their own)
Layout layout_of(const Tensor& input, bool in_place_rows);

// Probability targets: the logits' shape, their dtype or float32 beside 16-bit logits (read in
// place: params.h target_dtype), laid out with the logits' strides.
Tensor check_prob_target(const Layout& l, const Tensor& input, const Tensor& target);

// The per-row shape of (N, C, d...) logits: (N, d...).
std::vector<int64_t> row_shape(const Tensor& input);

void check_terms(RowTerms terms, const char* op);

// Planes of the saved lse of class-index targets (2, or 3 with the focal loss).
int64_t lse_planes(RowTerms terms, double label_smoothing);

// terms.logit_adjust, when given, is checked and replaced by the acc copy the kernels read (the
// caller's terms hold it for the launch).
CrossEntropyParams params_of(const Layout& l, const Tensor& target, const Tensor& weight,
                             Reduction reduction, bool prob, int64_t ignore_index,
                             double label_smoothing, RowTerms& terms);

// A gradient written in the layout `l` the kernels use, handed back with the strides
// empty_like(like) has (what the fake kernels promise), of `dtype` (like's when not given).
// Row-strided logits get their contiguous gradient written directly: only its row stride differs
// (p.grad_stride_outer).
template <typename F>
Tensor with_strides_of(const CrossEntropyBackend& backend, const Tensor& like, const Layout& l,
                       CrossEntropyParams& p, F&& run,
                       std::optional<at::ScalarType> dtype = std::nullopt) {
  const bool same = !dtype.has_value() || *dtype == like.scalar_type();
  Tensor out = same ? backend.empty_like(like) : at::empty_like(like, like.options().dtype(*dtype));
  if (out.numel() == 0) return out;  // nothing to write (no rows, or no classes)
  p.grad_stride_outer = p.stride_outer;
  if (out.strides() == l.input.strides()) {
    run(out);
    return out;
  }
  if (row_strided(l.input) && out.is_contiguous()) {
    p.grad_stride_outer = out.stride(0);
    run(out);
    return out;
  }
  Tensor tmp = at::empty_like(l.input, out.options());
  run(tmp);
  out.copy_(tmp);
  return out;
}

}  // namespace weighted_loss::ce_glue
