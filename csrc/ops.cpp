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
  // logit_adjustment (params.h: a (C,) vector added to the logits; not with softcap) defaults to
  // off in the cross-entropy ops of whole rows.
  // z_loss and softcap (params.h) default to off in every cross-entropy op, and so does gamma
  // (the softmax focal loss) in those of class-index targets. out_dtype: the loss's dtype, by
  // default the input's (the targets' for probabilities and BCE: the input's, or float32 beside
  // bfloat16/float16 logits); float32 beside 16-bit logits is what the autocast rule
  // (autocast.cpp) asks for. Weights of any floating dtype are read as float32 (float64 for
  // float64 logits); the logits are always read in place, never upcast.
  // Class-index targets. Returns (loss, lse, total_weight): lse (2, rows) (float32, float64 for
  // float64 logits), each row's max and log-sum shifted by it (params.h), total_weight the weighted mean's divisor sum(weight[target]).
  m.def(
      "cross_entropy_forward(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float z_loss=0., float softcap=0., "
      "float gamma=0., ScalarType? out_dtype=None, "
      "Tensor? logit_adjustment=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, int reduction, int ignore_index, float label_smoothing, "
      "float z_loss=0., float softcap=0., float gamma=0., "
      "Tensor? logit_adjustment=None) -> Tensor");
  // The same, written over the logits (weighted_loss/linear.py: a chunk's logits it no longer
  // needs).
  m.def(
      "cross_entropy_backward_(Tensor grad_loss, Tensor(a!) input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, int reduction, int ignore_index, float label_smoothing, "
      "float z_loss=0., float softcap=0., float gamma=0., "
      "Tensor? logit_adjustment=None) -> ()");
  // Probability targets (the logits' shape). Returns (loss, lse, tsum): tsum per row is
  // sum_c weight_c * target'_c, the softmax coefficient of the backward.
  m.def(
      "cross_entropy_prob_forward(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "float label_smoothing, float z_loss=0., float softcap=0., float gamma=0., "
      "ScalarType? out_dtype=None, "
      "Tensor? logit_adjustment=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "cross_entropy_prob_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor tsum, int reduction, float label_smoothing, float z_loss=0., "
      "float softcap=0., float gamma=0., "
      "Tensor? logit_adjustment=None) -> Tensor");
  m.def(
      "cross_entropy_prob_target_backward(Tensor grad_loss, Tensor input, Tensor? weight, "
      "Tensor lse, int reduction, float label_smoothing, float z_loss=0., float softcap=0., "
      "float gamma=0., ScalarType? target_dtype=None, "
      "Tensor? logit_adjustment=None) -> Tensor");
  // A vocab-parallel shard of the classes: the logits (rows, classes) hold classes
  // [class_offset, class_offset + classes) of total_classes; targets are global indices, weight
  // the full (total_classes,). The forward returns the shard's statistics (5, rows) (params.h),
  // which weighted_loss/vocab_parallel.py merges across the group; the backward takes the merged
  // (shift, log-sum) planes and the mean's divisor, and writes the shard's gradient.
  m.def(
      "cross_entropy_shard_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int class_offset, int total_classes) -> Tensor");
  m.def(
      "cross_entropy_shard_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor total_weight, int reduction, int ignore_index, float label_smoothing, "
      "int class_offset, int total_classes) -> Tensor");
  // BCE with logits. weight and pos_weight broadcast against input as in PyTorch; target has the
  // input's shape and dtype; gamma >= 0 makes it the sigmoid focal loss (params.h), with
  // alpha_tensor (broadcast as weight) each element's alpha when given. The backward
  // returns (grad_input, grad_target), each an empty (0,) tensor unless asked for. prob_input:
  // the input holds probabilities (F.binary_cross_entropy with pos_weight; params.h).
  m.def(
      "binary_cross_entropy_with_logits_forward(Tensor input, Tensor target, Tensor? weight, "
      "Tensor? pos_weight, int reduction, float gamma=-1., float alpha=-1., "
      "Tensor? alpha_tensor=None, ScalarType? out_dtype=None, bool prob_input=False) -> Tensor");
  m.def(
      "binary_cross_entropy_with_logits_backward(Tensor grad_loss, Tensor input, Tensor target, "
      "Tensor? weight, Tensor? pos_weight, int reduction, bool input_grad, bool target_grad, "
      "float gamma=-1., float alpha=-1., Tensor? alpha_tensor=None, bool prob_input=False) "
      "-> (Tensor, Tensor)");
  // Which CPU kernel build runs here: DEFAULT, AVX2 or AVX512.
  m.def("cpu_capability() -> str", &cpu_capability);
}
