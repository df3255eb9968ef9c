#include "binary_cross_entropy.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace weighted_loss {
namespace {

using at::Tensor;

// Rows shorter than kMinRow are slow to walk (a few vectors each); when the weights repeat row
// after row, several rows are joined into one and the weights repeated to match: for inputs of
// kJoinNumel elements or more, below which building the repeated weights costs more than it saves.
constexpr int64_t kMinRow = 512;
constexpr int64_t kJoinNumel = 1 << 16;

void check_inputs(const Tensor& input, const Tensor& target, const char* op) {
  dtype_of(input, op);
  TORCH_CHECK(target.is_floating_point(), op, ": target must be a floating point tensor, got ",
              target.scalar_type());
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "Target size (", target.sizes(),
                    ") must be the same as input size (", input.sizes(), ")");
  aux_dtype_of(target.scalar_type(), input, op, "target");
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
              " but input is on ", input.device());
}

// A weight as the kernels read it: acc dtype, contiguous in its own shape. `strides` gets its
// stride along each of the input's dimensions, 0 where it is broadcast.
Tensor weight_of(const std::optional<Tensor>& weight, const Tensor& input, const char* name,
                 std::vector<int64_t>& strides, const char* op) {
  strides.assign(input.dim(), 0);
  if (!weight.has_value() || !weight->defined()) return Tensor();
  const Tensor& w = *weight;
  // integer and bool weights are promoted, as PyTorch's arithmetic promotes them
  TORCH_CHECK(!w.is_complex(), op, ": ", name, " must be a real tensor, got ", w.scalar_type());
  TORCH_CHECK(w.device() == input.device(), op, ": ", name, " is on ", w.device(),
              " but input is on ", input.device());
  const int64_t nd = input.dim(), wd = w.dim();
  bool ok = wd <= nd;
  for (int64_t d = 0; ok && d < wd; ++d) {
    const int64_t ws = w.size(d), is = input.size(nd - wd + d);
    ok = ws == 1 || ws == is;
  }
  TORCH_CHECK(ok, op, ": ", name, " of shape ", w.sizes(),
              " cannot be broadcast to the input's shape ", input.sizes());
  Tensor c = w.to(acc_type(input)).contiguous();
  for (int64_t d = 0; d < wd; ++d) {
    if (c.size(d) != 1) strides[nd - wd + d] = c.stride(d);
  }
  return c;
}

struct Dim {
  int64_t size, ws, ps, as;  // size, weight, pos_weight and alpha stride
};

// The input's dimensions with those of size 1 dropped and neighbours merged where every weight
// steps through them as through one: outermost first.
std::vector<Dim> merged_dims(const Tensor& input, const std::vector<int64_t>& ws,
                             const std::vector<int64_t>& ps, const std::vector<int64_t>& as) {
  std::vector<Dim> out;  // innermost first while building
  for (int64_t d = input.dim() - 1; d >= 0; --d) {
    const int64_t size = input.size(d);
    if (size == 1) continue;
    if (!out.empty()) {
      Dim& in = out.back();
      if (ws[d] == in.ws * in.size && ps[d] == in.ps * in.size && as[d] == in.as * in.size) {
        in.size *= size;
        continue;
      }
    }
    out.push_back({size, ws[d], ps[d], as[d]});
  }
  std::reverse(out.begin(), out.end());
  return out;
}

// Everything the kernels read, and the tensors that hold it.
struct Prepared {
  Tensor input, target, weight, pos_weight, alpha;
  BinaryCrossEntropyParams p{};
};

Prepared prepare(const Tensor& input, const Tensor& target,
                 const std::optional<Tensor>& weight, const std::optional<Tensor>& pos_weight,
                 const std::optional<Tensor>& alpha, Reduction reduction, const char* op) {
  check_inputs(input, target, op);
  Prepared r;
  std::vector<int64_t> ws, ps, as;
  r.weight = weight_of(weight, input, "weight", ws, op);
  r.pos_weight = weight_of(pos_weight, input, "pos_weight", ps, op);
  r.alpha = weight_of(alpha, input, "alpha", as, op);
  std::vector<Dim> dims = merged_dims(input, ws, ps, as);
  if (dims.size() > static_cast<size_t>(kMaxBroadcastDims) + 1) {
    // Weights that vary along more dimensions than the kernels index: expand them in full (an
    // input of 10 or more dimensions, each broadcast differently).
    if (r.weight.defined()) r.weight = r.weight.expand(input.sizes()).contiguous();
    if (r.pos_weight.defined()) r.pos_weight = r.pos_weight.expand(input.sizes()).contiguous();
    if (r.alpha.defined()) r.alpha = r.alpha.expand(input.sizes()).contiguous();
    std::vector<int64_t> full = input.contiguous().strides().vec();
    dims = merged_dims(input, r.weight.defined() ? full : ws, r.pos_weight.defined() ? full : ps,
                       r.alpha.defined() ? full : as);
  }
  BinaryCrossEntropyParams& p = r.p;
  p.dtype = dtype_of(input, op);
  p.target_dtype = aux_dtype_of(target.scalar_type(), input, op, "target");
  p.loss_dtype = p.target_dtype;
  p.reduction = reduction;
  p.numel = input.numel();
  p.inner = 1;
  p.outer_dims = 0;
  int64_t w_inner = 0, p_inner = 0, a_inner = 0;
  if (p.numel > 0 && !dims.empty()) {
    const Dim in = dims.back();
    p.inner = in.size;
    w_inner = in.ws;
    p_inner = in.ps;
    a_inner = in.as;
    // A contiguous weight steps by 1 along the last dimension it does not broadcast over.
    TORCH_INTERNAL_ASSERT((w_inner == 0 || w_inner == 1) && (p_inner == 0 || p_inner == 1) &&
                          (a_inner == 0 || a_inner == 1));
    bool periodic = true;
    for (size_t d = 0; d + 1 < dims.size(); ++d) {
      p.outer_sizes[d] = dims[d].size;
      p.weight.strides[d] = dims[d].ws;
      p.pos_weight.strides[d] = dims[d].ps;
      p.alpha.strides[d] = dims[d].as;
      periodic = periodic && dims[d].ws == 0 && dims[d].ps == 0 && dims[d].as == 0;
    }
    p.outer_dims = static_cast<int32_t>(dims.size() - 1);
    if (periodic && p.outer_dims > 0 && p.inner < kMinRow && p.numel >= kJoinNumel) {
      // Every row reads the same weights: rows of k * inner with the weights repeated k times.
      const int64_t k = (kMinRow + p.inner - 1) / p.inner;
      if (w_inner == 1) r.weight = r.weight.reshape({-1}).repeat({k});
      if (p_inner == 1) r.pos_weight = r.pos_weight.reshape({-1}).repeat({k});
      if (a_inner == 1) r.alpha = r.alpha.reshape({-1}).repeat({k});
      p.inner *= k;
      p.outer_dims = 0;
    }
  }
  r.input = input.contiguous();
  r.target = target.contiguous();
  // read-only inputs by const_data_ptr: a copy-on-write tensor (torch._lazy_clone) is read in
  // place, not materialized
  p.input = r.input.const_data_ptr();
  p.target = r.target.const_data_ptr();
  p.weight.data = r.weight.defined() ? r.weight.const_data_ptr() : nullptr;
  p.weight.inner_stride = w_inner;
  p.pos_weight.data = r.pos_weight.defined() ? r.pos_weight.const_data_ptr() : nullptr;
  p.pos_weight.inner_stride = p_inner;
  p.alpha.data = r.alpha.defined() ? r.alpha.const_data_ptr() : nullptr;
  p.alpha.inner_stride = a_inner;
  return r;
}

// The loss's terms as params.h has them (the kernels' compile-time switches read these): plain
// BCE is focal_gamma < 0, no alpha_t is focal_alpha < 0; an alpha tensor (already in p.alpha)
// replaces the scalar alpha.
void set_loss(BinaryCrossEntropyParams& p, const BinaryLoss& loss, const char* op) {
  const bool focal = loss.kind == BinaryLoss::Kind::SigmoidFocal;
  p.prob_input = loss.kind == BinaryLoss::Kind::Probabilities;
  TORCH_CHECK(!p.prob_input || p.target_dtype == p.dtype, op, ": probabilities and their target "
              "must share a dtype");
  p.focal_gamma = -1.0;
  p.focal_alpha = -1.0;
  if (!focal) return;
  TORCH_CHECK_VALUE(loss.gamma >= 0 && std::isfinite(loss.gamma), op,
                    ": gamma must be a finite number >= 0, got ", loss.gamma);
  TORCH_CHECK_VALUE(!loss.alpha.has_value() || *loss.alpha >= 0, op,
                    ": alpha must be a number >= 0 or None (no alpha_t), got ", *loss.alpha);
  TORCH_CHECK_VALUE(!(loss.alpha.has_value() && p.alpha.data != nullptr), op,
                    ": alpha and alpha_tensor are exclusive, got both");
  p.focal_gamma = loss.gamma;
  p.focal_alpha = p.alpha.data != nullptr ? 0.0 : loss.alpha.value_or(-1.0);
}

const char* name_of(const BinaryLoss& loss) {
  switch (loss.kind) {
    case BinaryLoss::Kind::SigmoidFocal: return "sigmoid_focal_loss";
    case BinaryLoss::Kind::Probabilities: return "binary_cross_entropy";
    default: return "binary_cross_entropy_with_logits";
  }
}

}  // namespace

Tensor binary_cross_entropy_forward_impl(const Tensor& input, const Tensor& target,
                                         const std::optional<Tensor>& weight,
                                         const std::optional<Tensor>& pos_weight,
                                         Reduction reduction, const BinaryLoss& loss,
                                         std::optional<at::ScalarType> out_dtype,
                                         const BinaryCrossEntropyBackend& backend) {
  const char* op = name_of(loss);
  Prepared r = prepare(input, target, weight, pos_weight, loss.alpha_tensor, reduction, op);
  set_loss(r.p, loss, op);
  // the target's dtype, as PyTorch's result has, unless out_dtype says otherwise
  const auto lo = input.options().dtype(loss_dtype_of(out_dtype, target.scalar_type(), input, op));
  Tensor out = r.p.reduction == Reduction::None ? at::empty(input.sizes(), lo) : at::empty({}, lo);
  r.p.loss_dtype = dtype_of(out, op);
  r.p.loss = out.data_ptr();
  backend.launch(r.p);
  return out;
}

std::tuple<Tensor, Tensor> binary_cross_entropy_backward_impl(
    const Tensor& grad_loss, const Tensor& input, const Tensor& target,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& pos_weight,
    Reduction reduction, const BinaryLoss& loss, bool input_grad, bool target_grad,
    const BinaryCrossEntropyBackend& backend) {
  const std::string name = std::string(name_of(loss)) + " backward";
  const char* op = name.c_str();
  Prepared r = prepare(input, target, weight, pos_weight, loss.alpha_tensor, reduction, op);
  BinaryCrossEntropyParams& p = r.p;
  set_loss(p, loss, op);
  p.loss_dtype = aux_dtype_of(grad_loss.scalar_type(), input, op, "grad_loss");
  TORCH_CHECK(grad_loss.device() == input.device(), op, ": grad_loss is on ", grad_loss.device(),
              " but input is on ", input.device());
  Tensor g;
  if (p.reduction != Reduction::None) {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must be a scalar for a reduced loss, "
                "got shape ", grad_loss.sizes());
    g = grad_loss.contiguous();
    p.grad_loss_scalar = true;
  } else {
    TORCH_CHECK(grad_loss.sizes() == input.sizes(), op, ": grad_loss must have the input's shape ",
                input.sizes(), ", got ", grad_loss.sizes());
    // The upstream gradient of loss.sum() / loss.mean() is one value expanded: read it once.
    const auto st = grad_loss.strides();
    p.grad_loss_scalar =
        grad_loss.numel() > 0 && std::all_of(st.begin(), st.end(), [](int64_t s) { return s == 0; });
    g = p.grad_loss_scalar ? grad_loss : grad_loss.contiguous();
  }
  p.grad_loss = g.const_data_ptr();
  Tensor gx = input_grad ? backend.empty_like(r.input) : at::empty({0}, input.options());
  Tensor gt = target_grad ? backend.empty_like(r.target) : at::empty({0}, input.options());
  p.grad_input = input_grad ? gx.data_ptr() : nullptr;
  p.grad_target = target_grad ? gt.data_ptr() : nullptr;
  if (input_grad || target_grad) backend.launch(p);
  return {gx, gt};
}

}  // namespace weighted_loss
