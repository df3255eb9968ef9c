// Every schema of the weighted_loss namespace, and the Python module the package imports to load
// this library. Kernels are registered per device in cpu/ and cuda/; fake kernels and autograd in
// weighted_loss/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/kernels.h"

extern "C" {  // NOLINT
// An empty module: importing weighted_loss._C loads this shared library, which runs the
// registrations below. The ops are reached through torch.ops.weighted_loss.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
std::string cpu_capability() { return weighted_loss::cpu::kernels().name; }
}  // namespace

TORCH_LIBRARY(weighted_loss, m) {
  // Arguments are read by name on both sides (weighted_loss/_named.py): the Python rules find
  // them through these schemas. Optional means optional: None turns a term off. reduction is
  // "none", "mean" or "sum". out_dtype: the loss's dtype, by default the input's (the targets'
  // for probabilities and BCE: the input's, or float32 beside bfloat16/float16 logits); float32
  // beside 16-bit logits is what the autocast rule (autocast.cpp) asks for. Weights of any
  // floating dtype are read as float32 (float64 for float64 logits); the logits are read in
  // place, never upcast.
  //
  // Cross-entropy of class indices. z_loss adds z_loss * lse^2 per row; softcap reads each logit
  // as softcap * tanh(x / softcap); gamma makes it the softmax focal loss; logit_adjustment is a
  // (C,) vector added to the logits (not with softcap). params.h has the math. Returns (loss,
  // lse, total_weight): lse (2, rows) (3 with gamma), each row's max and log-sum shifted by it
  // (float32, float64 for float64 logits); total_weight the mean's divisor sum(weight[target]).
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight=None, "
      "str reduction=\"mean\", int ignore_index=-100, float label_smoothing=0., "
      "float z_loss=0., float? softcap=None, float? gamma=None, "
      "Tensor? logit_adjustment=None, ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, str reduction=\"mean\", int ignore_index=-100, "
      "float label_smoothing=0., float z_loss=0., float? softcap=None, float? gamma=None, "
      "Tensor? logit_adjustment=None) -> Tensor");
  // The same, written over the logits (weighted_loss/_linear_chunks.py: a chunk's logits it no
  // longer needs).
  m.def(
      "cross_entropy_backward_(Tensor grad_loss, Tensor(a!) input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, str reduction=\"mean\", int ignore_index=-100, "
      "float label_smoothing=0., float z_loss=0., float? softcap=None, float? gamma=None, "
      "Tensor? logit_adjustment=None) -> ()");
  // Probability targets (the logits' shape). Returns (loss, lse, tsum): tsum per row is
  // sum_c weight_c * target'_c, the softmax coefficient of the backward.
  m.def(
      "cross_entropy_prob_forward(Tensor input, Tensor target, Tensor? weight=None, "
      "str reduction=\"mean\", float label_smoothing=0., float z_loss=0., float? softcap=None, "
      "float? gamma=None, Tensor? logit_adjustment=None, ScalarType? out_dtype=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_prob_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor tsum, str reduction=\"mean\", float label_smoothing=0., "
      "float z_loss=0., float? softcap=None, float? gamma=None, "
      "Tensor? logit_adjustment=None) -> Tensor");
  m.def(
      "cross_entropy_prob_target_backward(Tensor grad_loss, Tensor input, Tensor? weight, "
      "Tensor lse, str reduction=\"mean\", float label_smoothing=0., float z_loss=0., "
      "float? softcap=None, float? gamma=None, Tensor? logit_adjustment=None, "
      "ScalarType? target_dtype=None) -> Tensor");
  // Cross-entropy (or the softmax focal loss) of (N, C, d...) logits with the Dice family's
  // overlap sums beside it, in one pass (params.h: overlap_sums). An integer target holds class
  // indices, a floating one probabilities (the logits' shape). Returns (loss, sums, lse, aux):
  // sums (N, 3, C) the planes I = sum p t, P = sum p (p^2 when squared), T = sum t (t^2);
  // aux the mean's divisor (indices) or tsum (probabilities). The backward adds the gradient of
  // sum(grad_sums * sums), grad_sums (N, 3, C), to the loss's.
  m.def(
      "cross_entropy_overlap_forward(Tensor input, Tensor target, Tensor? weight=None, "
      "str reduction=\"mean\", int ignore_index=-100, float label_smoothing=0., "
      "float? gamma=None, bool squared=False, ScalarType? out_dtype=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_overlap_backward(Tensor grad_loss, Tensor grad_sums, Tensor input, "
      "Tensor target, Tensor? weight, Tensor lse, Tensor aux, str reduction=\"mean\", "
      "int ignore_index=-100, float label_smoothing=0., float? gamma=None, "
      "bool squared=False) -> Tensor");
  // A vocab-parallel shard of the classes: the logits (rows, classes) hold classes
  // [class_offset, class_offset + classes) of total_classes; targets are global indices, weight
  // the full (total_classes,). The forward returns the shard's statistics (5, rows) (params.h),
  // which weighted_loss/_sharded.py merges across the group; the backward takes the merged
  // (shift, log-sum) planes and the mean's divisor, and writes the shard's gradient.
  m.def(
      "cross_entropy_shard_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int class_offset, int total_classes) -> Tensor");
  m.def(
      "cross_entropy_shard_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, str reduction, int ignore_index, float label_smoothing, "
      "int class_offset, int total_classes) -> Tensor");
  // The elementwise losses of the BCE kernels: weight and pos_weight broadcast against input as
  // in PyTorch; target has the input's shape. Each backward returns (grad_input, grad_target),
  // each an empty (0,) tensor unless asked for.
  // BCE with logits (F.binary_cross_entropy_with_logits).
  m.def(
      "binary_cross_entropy_with_logits_forward(Tensor input, Tensor target, "
      "Tensor? weight=None, Tensor? pos_weight=None, str reduction=\"mean\", "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "binary_cross_entropy_with_logits_backward(Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor? weight, Tensor? pos_weight, str reduction, bool input_grad, bool target_grad) "
      "-> (Tensor, Tensor)");
  // The sigmoid focal loss (torchvision.ops.sigmoid_focal_loss, with weight and pos_weight):
  // alpha_t (1 - p_t)^gamma times BCE with logits; alpha None: no alpha_t (torchvision's -1);
  // alpha_tensor (instead of alpha) each element's alpha, broadcast as weight.
  m.def(
      "sigmoid_focal_loss_forward(Tensor input, Tensor target, float gamma, float? alpha, "
      "Tensor? alpha_tensor=None, Tensor? weight=None, Tensor? pos_weight=None, "
      "str reduction=\"none\", ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "sigmoid_focal_loss_backward(Tensor grad_loss, Tensor input, Tensor target, float gamma, "
      "float? alpha, Tensor? alpha_tensor, Tensor? weight, Tensor? pos_weight, str reduction, "
      "bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  // BCE of probabilities (F.binary_cross_entropy), with pos_weight as for logits; input and
  // target share a dtype.
  m.def(
      "binary_cross_entropy_forward(Tensor input, Tensor target, Tensor? weight=None, "
      "Tensor? pos_weight=None, str reduction=\"mean\", ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "binary_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor? weight, Tensor? pos_weight, str reduction, bool input_grad, bool target_grad) "
      "-> (Tensor, Tensor)");
  // Which CPU kernel build runs here: DEFAULT, AVX2 or AVX512.
  m.def("cpu_capability() -> str", &cpu_capability);
}
