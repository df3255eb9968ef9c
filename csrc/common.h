// Glue shared by the losses: what a device hands the device-agnostic glue, and the argument
// conversions every op does.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <functional>
#include <optional>
#include <string>

#include "params.h"

namespace weighted_loss {

// What a device gives the glue: the kernel launcher, and the allocator of gradients (shape and
// strides as at::empty_like).
template <typename Params>
struct Backend {
  std::function<void(const Params&)> launch;
  std::function<at::Tensor(const at::Tensor&)> empty_like;
};

inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kDouble: return DType::Float64;
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: break;
  }
  // NotImplementedError, as PyTorch's losses raise for integer logits
  TORCH_CHECK_NOT_IMPLEMENTED(false, op, ": input must be a floating point tensor (float64, "
                              "float32, bfloat16 or float16), got ", t.scalar_type());
}

// float32 accumulation, float64 for float64 data.
inline at::ScalarType acc_type(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// The dtype of a tensor the kernels read or write beside the logits `input` (probability targets,
// the loss, their gradients): the input's, or float32 beside bfloat16/float16 logits (mixed
// precision, params.h). Anything else is an error that names `what`.
inline DType aux_dtype_of(at::ScalarType st, const at::Tensor& input, const char* op,
                          const char* what) {
  TORCH_CHECK(st == input.scalar_type() || (st == at::kFloat && is_16bit(input)), op, ": ", what,
              " must have the input's dtype ", input.scalar_type(),
              is_16bit(input) ? " (or float32)" : "", ", got ", st);
  return st == input.scalar_type() ? dtype_of(input, op) : DType::Float32;
}

// The loss's dtype: `out_dtype` when given (the autocast rule asks for float32), else `dflt`.
inline at::ScalarType loss_dtype_of(const std::optional<at::ScalarType>& out_dtype,
                                    at::ScalarType dflt, const at::Tensor& input, const char* op) {
  const at::ScalarType st = out_dtype.value_or(dflt);
  aux_dtype_of(st, input, op, "the loss (out_dtype)");
  return st;
}

// The ops' reduction argument, named as PyTorch names it: "none", "mean" or "sum".
inline Reduction reduction_of(c10::string_view reduction, const char* op) {
  if (reduction == "none") return Reduction::None;
  if (reduction == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(reduction == "sum", op, ": reduction must be 'none', 'mean' or 'sum', got '",
                    std::string(reduction), "'");
  return Reduction::Sum;
}

}  // namespace weighted_loss
