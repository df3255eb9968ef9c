// CPU registration of the cross-entropy ops: the shared glue with the CPU kernels of the widest
// capability this CPU runs.
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdint>

#include "../cross_entropy.h"
#include "kernels.h"

namespace weighted_loss {
namespace {

using at::Tensor;

int64_t element_size(DType dt) {
  return dt == DType::Float64 ? 8 : dt == DType::Float32 ? 4 : 2;
}

// A fresh gradient of N x C elements is a fresh mmap: writing it faults in every 4 KiB page, and
// for a 256 MB gradient the faults cost several times the write itself. Ask for transparent huge
// pages on it before the kernel writes (what PyTorch's THP_MEM_ALLOC_ENABLE does for all large
// CPU tensors). Advice only: where THP is off this changes nothing.
void advise_huge_pages(void* ptr, const CrossEntropyParams& p) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t nbytes = uintptr_t(p.outer * p.classes * p.inner * element_size(p.dtype));
  if (ptr == nullptr || nbytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)p;
#endif
}

void launch_forward(const CrossEntropyParams& p) { cpu::kernels().cross_entropy_forward(p); }
void launch_backward(const CrossEntropyParams& p) {
  advise_huge_pages(p.grad_input, p);
  cpu::kernels().cross_entropy_backward(p);
}
void launch_target_backward(const CrossEntropyParams& p) {
  advise_huge_pages(p.grad_target, p);
  cpu::kernels().cross_entropy_target_backward(p);
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& input, const Tensor& target,
                                           const std::optional<Tensor>& weight, int64_t reduction,
                                           int64_t ignore_index, double label_smoothing) {
  return cross_entropy_forward_impl(input, target, weight, reduction, ignore_index,
                                    label_smoothing, launch_forward);
}

Tensor backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                const std::optional<Tensor>& weight, const Tensor& lse,
                const Tensor& total_weight, int64_t reduction, int64_t ignore_index,
                double label_smoothing) {
  return cross_entropy_backward_impl(grad_loss, input, target, weight, lse, total_weight,
                                     reduction, ignore_index, label_smoothing, launch_backward);
}

std::tuple<Tensor, Tensor, Tensor> prob_forward(const Tensor& input, const Tensor& target,
                                                const std::optional<Tensor>& weight,
                                                int64_t reduction, double label_smoothing) {
  return cross_entropy_prob_forward_impl(input, target, weight, reduction, label_smoothing,
                                         launch_forward);
}

Tensor prob_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                     const std::optional<Tensor>& weight, const Tensor& lse, const Tensor& tsum,
                     int64_t reduction, double label_smoothing) {
  return cross_entropy_prob_backward_impl(grad_loss, input, target, weight, lse, tsum, reduction,
                                          label_smoothing, launch_backward);
}

Tensor prob_target_backward(const Tensor& grad_loss, const Tensor& input,
                            const std::optional<Tensor>& weight, const Tensor& lse,
                            int64_t reduction, double label_smoothing) {
  return cross_entropy_prob_target_backward_impl(grad_loss, input, weight, lse, reduction,
                                                 label_smoothing, launch_target_backward);
}

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, CPU, m) {
  m.impl("cross_entropy_forward", &weighted_loss::forward);
  m.impl("cross_entropy_backward", &weighted_loss::backward);
  m.impl("cross_entropy_prob_forward", &weighted_loss::prob_forward);
  m.impl("cross_entropy_prob_backward", &weighted_loss::prob_backward);
  m.impl("cross_entropy_prob_target_backward", &weighted_loss::prob_target_backward);
}
