// Plain parameter structs shared by the CPU kernels, the CUDA kernels and the torch glue.
// No torch types here: the .cu files include this header and compile without torch.
#pragma once

#include <cstdint>

namespace weighted_loss {

// Same numbering as at::Reduction.
enum class Reduction : int32_t { None = 0, Mean = 1, Sum = 2 };

enum class DType : int32_t { Float64 = 0, Float32 = 1, BFloat16 = 2, Float16 = 3 };

// The dtype of class-index targets, read as they are (no copy to int64).
enum class TargetType : int32_t { Int64 = 0, Int32 = 1, UInt8 = 2 };

#if defined(__CUDACC__)
#define WEIGHTED_LOSS_HOST_DEVICE __host__ __device__
#else
#define WEIGHTED_LOSS_HOST_DEVICE
#endif

// Class index r of targets of type tt, as int64 (for the CPU and CUDA kernels alike).
WEIGHTED_LOSS_HOST_DEVICE inline int64_t target_value(const void* target, TargetType tt, int64_t r) {
  switch (tt) {
    case TargetType::Int32: return static_cast<const int32_t*>(target)[r];
    case TargetType::UInt8: return static_cast<const uint8_t*>(target)[r];
    default: return static_cast<const int64_t*>(target)[r];
  }
}

// Cross-entropy over logits viewed as (outer, classes, inner): row r = o * inner + i holds the
// `classes` logits input[o * stride_outer + c * stride_class + i * stride_inner]. A probability
// target and every gradient of the logits' shape use the same strides (the glue guarantees it),
// except the gradient's row stride (grad_stride_outer).
// Per-row tensors (index target, per-row loss, lse, tsum) are contiguous over r.
// `acc` below is float for float32/bfloat16/float16 logits and double for float64 logits.
// Mixed precision (autocast, or float32 targets beside bfloat16/float16 logits): the logits and
// their gradient stay in `dtype`, read and written in place, while probability targets (and their
// gradient) may be stored as acc (target_dtype) and the loss (and grad_loss) too (loss_dtype);
// both are `dtype` otherwise.
struct CrossEntropyParams {
  DType dtype;
  DType target_dtype;        // probability targets and grad_target: dtype, or Float32 for 16-bit
  DType loss_dtype;          // loss and grad_loss: dtype, or Float32 for 16-bit dtype
  int64_t outer, classes, inner;
  int64_t stride_outer, stride_class, stride_inner;
  // The gradient of the logits has the logits' strides but for its row stride (stride_outer),
  // which differs for (N, C) logits read in place from a padded buffer (row stride > C): their
  // gradient is contiguous. Elsewhere grad_stride_outer == stride_outer.
  int64_t grad_stride_outer;
  Reduction reduction;
  bool prob_target;          // false: class indices (target_type); true: probabilities (dtype)
  TargetType target_type;    // index targets
  int64_t ignore_index;      // index targets only
  double label_smoothing;    // <= 0 means none
  double z_loss;             // adds z_loss * lse^2 per row, weighted as the row's loss (w_y for
                             // index targets, 1 for probabilities); 0: off
  double softcap;            // > 0: every logit x is read as softcap * tanh(x / softcap), and its
                             // gradient gets the factor 1 - (that / softcap)^2; 0: off
  double focal_gamma;        // > 0: the softmax focal loss, each class term's nll_c = -log p_c
                             // times (1 - p_c)^gamma: w_y nll_y (1 - p_y)^gamma for plain indices;
                             // with probabilities or smoothing a sum over the classes, which
                             // needs Q = sum_c w_c t'_c s_c per row (the gradient's coefficient,
                             // s_c the focal gradient factor) saved in tsum (probabilities) or a
                             // third plane of lse (smoothed indices); plain indices save s_y
                             // there; 0: off

  // Vocab-parallel shards (index targets only): the logits hold classes [class_offset,
  // class_offset + classes) of total_classes. Targets are global class indices, checked against
  // total_classes; the weight is the full (total_classes,) one, class c of the shard reading
  // weight[class_offset + c]; label smoothing spreads over total_classes. Unsharded:
  // class_offset = 0, total_classes = classes.
  int64_t class_offset;
  int64_t total_classes;

  const void* input;         // logits, dtype
  const void* target;        // index rows (contiguous), or probabilities (target_dtype) with the
                             // logits' strides
  const void* weight;        // (classes,) acc, contiguous; nullptr when absent
  const void* logit_adjust;  // (classes,) acc, contiguous, added to every row's logits before
                             // anything else reads them (the loss and every gradient are those
                             // of input + logit_adjust); nullptr when absent. Not with softcap,
                             // nor in shard mode

  // forward outputs
  void* loss;                // rows of loss_dtype (Reduction::None) or a 0-d loss_dtype scalar
  void* lse;                 // 2 x rows of acc: each row's shift sh (its max; 0 if all -inf), then
                             // L = log sum_c exp(x_c - sh); lse = sh + L. L is NaN where the row's
                             // log_softmax is (NaN, +inf, all -inf). Ignored rows: (0, +inf), or
                             // (0, NaN) where their log_softmax is NaN
  void* total_weight;        // 0-d acc: the mean's divisor (sum of weight[target] or row count)
  void* tsum;                // rows of acc, probability targets: sum_c weight_c * target'_c
                             // (the focal loss: Q, see focal_gamma)
  void* shard_stats;         // a shard's forward (nullptr otherwise): no loss, no reduction;
                             // lse gets the shard's raw (max m, log sum_c exp(x_c - s)) with
                             // s = m (0 when m = -inf; m may be NaN or +inf, the log -inf), every
                             // row (ignored too), and shard_stats 3 x rows of acc: x_y where the
                             // target is in the shard (else 0), ref, sum_c (s / C) w_c (x_c - ref)
                             // (with label smoothing; else 0), ref a shift of the kernel's choice

  // The overlap sums of the Dice family, beside the loss (the lane layout only; nullptr: off).
  // Per item o and class c, over the positions not ignored, with p the softmax:
  // I = sum p_c t_c, P = sum p_c (p_c^2 when overlap_squared), T = sum t_c (t_c^2), t the
  // one-hot target (index targets) or the probabilities as given (no smoothing).
  void* overlap_sums;        // forward: (outer, 3, classes) acc, the planes I, P, T
  const void* grad_sums;     // backward: (outer, 3, classes) acc, dL/dI, dL/dP (and dL/dT,
                             // not read), whose gradient through the softmax is added to the
                             // loss's. There lse (and tsum) may be null: the kernel recomputes
                             // each row's (sh, L, tsum) from the logits (no focal term)
  bool overlap_squared;

  // backward
  const void* grad_loss;     // rows of loss_dtype (None) or 0-d loss_dtype
  void* grad_input;          // logits' shape and strides, dtype
  void* grad_target;         // probability target gradient, logits' shape and strides,
                             // target_dtype
};

// Most dimensions of a broadcast weight's row index (after merging the dimensions that can be).
constexpr int kMaxBroadcastDims = 8;

// A weight broadcast against the elements of BinaryCrossEntropyParams without being expanded:
// row r's offset is sum_d idx_d(r) * strides[d] over the rows' multi-index, and along a row the
// weight steps by inner_stride, which is 0 (one value per row) or 1 (contiguous).
struct BroadcastWeight {
  const void* data;                     // acc dtype; nullptr when absent
  int64_t inner_stride;
  int64_t strides[kMaxBroadcastDims];   // per outer dimension, in elements; 0 where broadcast
};

// BCE with logits over `numel` elements: input, target and every elementwise output or gradient
// are contiguous and share one index. The elements form rows of `inner` (the last row may be
// cut short by numel); a row's multi-index runs over outer_sizes, outermost first. Mixed
// precision as for cross-entropy: the target (and its gradient) and the loss (and grad_loss) may
// be stored as float32 beside bfloat16/float16 logits.
struct BinaryCrossEntropyParams {
  DType dtype;
  DType target_dtype;          // target and grad_target: dtype, or Float32 for 16-bit dtype
  DType loss_dtype;            // loss and grad_loss: dtype, or Float32 for 16-bit dtype
  int64_t numel;
  int64_t inner;
  int32_t outer_dims;
  int64_t outer_sizes[kMaxBroadcastDims];
  BroadcastWeight weight;      // rescales each element's loss
  BroadcastWeight pos_weight;  // weights the positive term: -pos_weight * t * log sigmoid(x)
  Reduction reduction;
  // The sigmoid focal loss (Lin et al.): each element's loss times alpha_t (1 - p_t)^gamma, with
  // p_t = t sigmoid(x) + (1 - t) sigmoid(-x) and alpha_t = alpha t + (1 - alpha) (1 - t).
  // focal_gamma < 0: plain BCE; focal_alpha < 0: no alpha_t (torchvision's alpha = -1). With
  // alpha.data set (and focal_alpha >= 0), each element's alpha is read from it, broadcast as
  // the weights are.
  double focal_gamma;
  double focal_alpha;
  BroadcastWeight alpha;
  // BCE of probabilities (F.binary_cross_entropy; not with the focal loss): `input` holds p in
  // [0, 1], the loss PyTorch's -w (P t max(log p, -100) + (1 - t) max(log1p(-p), -100)) with
  // pos_weight P scaling the positive term as for logits, dloss/dp = w (p (1 + (P - 1) t) - P t)
  // / max(p (1 - p), eps) (PyTorch's (p - t) / max(p (1 - p), eps) at P = 1, eps its float 1e-12)
  // and dloss/dt = w (log1p(-p) - P log p) (-w logit(p) at P = 1); an input outside [0, 1] or NaN
  // is an error of the forward (a device assert on a GPU), as PyTorch's.
  bool prob_input;

  const void* input;           // logits, dtype
  const void* target;          // probabilities in [0, 1], target_dtype

  // forward output: numel of loss_dtype (Reduction::None) or a 0-d loss_dtype scalar
  void* loss;

  // backward
  const void* grad_loss;       // numel of loss_dtype, or one value when grad_loss_scalar
  bool grad_loss_scalar;       // a reduced loss, or an upstream gradient expanded from a scalar
  void* grad_input;            // dtype, numel; nullptr when not wanted
  void* grad_target;           // target_dtype, numel; nullptr when not wanted
};

}  // namespace weighted_loss
