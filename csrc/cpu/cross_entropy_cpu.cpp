// CPU registration of the cross-entropy ops: the shared glue with the CPU kernels of the widest
// capability this CPU runs.
#include "../registration.h"
#include "grad_buffer.h"
#include "kernels.h"

namespace weighted_loss {
namespace {

struct Cpu {
  using Guard = NoGuard;
  static const CrossEntropyBackend& forward() {
    static const CrossEntropyBackend b{
        [](const CrossEntropyParams& p) { cpu::kernels().cross_entropy_forward(p); },
        cpu::empty_like_gradient};
    return b;
  }
  static const CrossEntropyBackend& backward() {
    static const CrossEntropyBackend b{
        [](const CrossEntropyParams& p) { cpu::kernels().cross_entropy_backward(p); },
        cpu::empty_like_gradient};
    return b;
  }
  static const CrossEntropyBackend& target_backward() {
    static const CrossEntropyBackend b{
        [](const CrossEntropyParams& p) { cpu::kernels().cross_entropy_target_backward(p); },
        cpu::empty_like_gradient};
    return b;
  }
};

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, CPU, m) {
  weighted_loss::register_cross_entropy_ops<weighted_loss::Cpu>(m);
  weighted_loss::register_overlap_ops<weighted_loss::Cpu>(m);
}
