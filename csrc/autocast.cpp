// The autocast rule of the weighted_loss ops (AutocastCPU and AutocastCUDA): PyTorch's policy for
// its own losses is float32 ("fp32": cross_entropy, nll_loss, binary_cross_entropy_with_logits
// are computed on a float32 copy of bfloat16/float16 logits). The observable result is kept: the
// loss comes back in float32, its gradient flows to the logits in their own dtype, and weights,
// targets and alphas of any floating dtype are accepted. The copy is not made: the kernels read
// 16-bit logits in place and accumulate in float32 already, so the rule only asks the op for a
// float32 loss (out_dtype) and hands float32 targets through as they are (params.h: mixed
// precision). Backward ops need no rule: they take the dtypes their forward produced.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace weighted_loss {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using OptDtype = std::optional<at::ScalarType>;

// PyTorch's message (autocast_mode.cpp) where its CUDA autocast meets binary_cross_entropy
constexpr const char* kBceBanned =
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
    "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
    "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
    "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
    "safe to autocast.";

bool is_16bit(const Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// The loss's dtype under autocast: float32 for 16-bit logits, else what the op would choose.
OptDtype autocast_loss_dtype(const Tensor& input, OptDtype out_dtype) {
  return is_16bit(input) ? OptDtype(at::kFloat) : out_dtype;
}

// A floating tensor beside the logits (probability or BCE targets) as the op takes it: in place
// when it has the logits' dtype or float32 beside 16-bit logits; otherwise cast as the policy
// would (16-bit ones to float32; with float32/float64 logits, to the logits' dtype).
Tensor autocast_target(const Tensor& target, const Tensor& input) {
  if (!target.is_floating_point() || target.scalar_type() == input.scalar_type()) return target;
  if (is_16bit(input)) return target.scalar_type() == at::kFloat ? target : target.to(at::kFloat);
  return target.to(input.scalar_type());
}

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_of(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

template <c10::DispatchKey Key>
struct Rule {
  using OptDouble = std::optional<double>;
  using Sv = c10::string_view;

  static std::tuple<Tensor, Tensor, Tensor> ce_forward(
      const Tensor& input, const Tensor& target, const OptTensor& weight, Sv reduction,
      int64_t ignore_index, double label_smoothing, double z_loss, OptDouble softcap,
      OptDouble gamma, const OptTensor& logit_adjustment, OptDtype out_dtype) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
    static const auto op = op_of<decltype(ce_forward)>("weighted_loss::cross_entropy_forward");
    return op.call(input, target, weight, reduction, ignore_index, label_smoothing, z_loss,
                   softcap, gamma, logit_adjustment, autocast_loss_dtype(input, out_dtype));
  }
  static std::tuple<Tensor, Tensor, Tensor> ce_prob_forward(
      const Tensor& input, const Tensor& target, const OptTensor& weight, Sv reduction,
      double label_smoothing, double z_loss, OptDouble softcap, OptDouble gamma,
      const OptTensor& logit_adjustment, OptDtype out_dtype) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
    static const auto op =
        op_of<decltype(ce_prob_forward)>("weighted_loss::cross_entropy_prob_forward");
    return op.call(input, autocast_target(target, input), weight, reduction, label_smoothing,
                   z_loss, softcap, gamma, logit_adjustment,
                   autocast_loss_dtype(input, out_dtype));
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor> overlap_forward(
      const Tensor& input, const Tensor& target, const OptTensor& weight, Sv reduction,
      int64_t ignore_index, double label_smoothing, OptDouble gamma, bool squared,
      OptDtype out_dtype) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
    static const auto op =
        op_of<decltype(overlap_forward)>("weighted_loss::cross_entropy_overlap_forward");
    return op.call(input, autocast_target(target, input), weight, reduction, ignore_index,
                   label_smoothing, gamma, squared, autocast_loss_dtype(input, out_dtype));
  }
  // The elementwise losses: float32 for 16-bit logits; with float32 logits a 16-bit target is
  // cast, and the loss takes its new dtype.
  static Tensor bce_logits_forward(const Tensor& input, const Tensor& target,
                                   const OptTensor& weight, const OptTensor& pos_weight,
                                   Sv reduction, OptDtype out_dtype) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
    static const auto op = op_of<decltype(bce_logits_forward)>(
        "weighted_loss::binary_cross_entropy_with_logits_forward");
    return op.call(input, autocast_target(target, input), weight, pos_weight, reduction,
                   autocast_loss_dtype(input, out_dtype));
  }
  static Tensor sigmoid_focal_forward(const Tensor& input, const Tensor& target, double gamma,
                                      OptDouble alpha, const OptTensor& alpha_tensor,
                                      const OptTensor& weight, const OptTensor& pos_weight,
                                      Sv reduction, OptDtype out_dtype) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
    static const auto op =
        op_of<decltype(sigmoid_focal_forward)>("weighted_loss::sigmoid_focal_loss_forward");
    return op.call(input, autocast_target(target, input), gamma, alpha, alpha_tensor, weight,
                   pos_weight, reduction, autocast_loss_dtype(input, out_dtype));
  }
  static Tensor bce_prob_forward(const Tensor& input, const Tensor& target,
                                 const OptTensor& weight, const OptTensor& pos_weight,
                                 Sv reduction, OptDtype out_dtype) {
    // PyTorch's CUDA autocast refuses BCE of probabilities (its CPU autocast runs it in float32)
    TORCH_CHECK(Key != c10::DispatchKey::AutocastCUDA, kBceBanned);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(Key);
    static const auto op =
        op_of<decltype(bce_prob_forward)>("weighted_loss::binary_cross_entropy_forward");
    return op.call(input, autocast_target(target, input), weight, pos_weight, reduction,
                   autocast_loss_dtype(input, out_dtype));
  }
  static void register_all(torch::Library& m) {
    m.impl("cross_entropy_forward", &ce_forward);
    m.impl("cross_entropy_prob_forward", &ce_prob_forward);
    m.impl("cross_entropy_overlap_forward", &overlap_forward);
    m.impl("binary_cross_entropy_with_logits_forward", &bce_logits_forward);
    m.impl("sigmoid_focal_loss_forward", &sigmoid_focal_forward);
    m.impl("binary_cross_entropy_forward", &bce_prob_forward);
  }
};

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, AutocastCPU, m) {
  weighted_loss::Rule<c10::DispatchKey::AutocastCPU>::register_all(m);
}

TORCH_LIBRARY_IMPL(weighted_loss, AutocastCUDA, m) {
  weighted_loss::Rule<c10::DispatchKey::AutocastCUDA>::register_all(m);
}
