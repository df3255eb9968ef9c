// The CPU kernel entry points, one set per CPU capability, and the run-time choice between them.
#pragma once

#include "../params.h"

namespace weighted_loss::cpu {

#define WEIGHTED_LOSS_DECLARE_KERNELS(cap)                              \
  namespace cap {                                                       \
  void cross_entropy_forward(const CrossEntropyParams& p);              \
  void cross_entropy_backward(const CrossEntropyParams& p);             \
  void cross_entropy_target_backward(const CrossEntropyParams& p);      \
  void binary_cross_entropy_forward(const BinaryCrossEntropyParams& p); \
  void binary_cross_entropy_backward(const BinaryCrossEntropyParams& p);\
  }

WEIGHTED_LOSS_DECLARE_KERNELS(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
WEIGHTED_LOSS_DECLARE_KERNELS(AVX2)
WEIGHTED_LOSS_DECLARE_KERNELS(AVX512)
#endif
#undef WEIGHTED_LOSS_DECLARE_KERNELS

struct Kernels {
  const char* name;
  void (*cross_entropy_forward)(const CrossEntropyParams&);
  void (*cross_entropy_backward)(const CrossEntropyParams&);
  void (*cross_entropy_target_backward)(const CrossEntropyParams&);
  void (*binary_cross_entropy_forward)(const BinaryCrossEntropyParams&);
  void (*binary_cross_entropy_backward)(const BinaryCrossEntropyParams&);
};

// The widest set this CPU runs, capped by ATEN_CPU_CAPABILITY (default|avx2|avx512) as PyTorch's
// own CPU kernels are; chosen once per process.
const Kernels& kernels();

}  // namespace weighted_loss::cpu
