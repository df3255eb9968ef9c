// CUDA registration of the cross-entropy ops: the shared glue (checks, layout, allocation) with
// the launchers of cross_entropy.cu, under a guard of the input's device, on the current stream,
// with the launch checked.
#include "../registration.h"
#include "glue.h"
#include "kernels.h"

namespace weighted_loss {
namespace {

struct Cuda {
  using Guard = cuda_glue::Guard;
  static const CrossEntropyBackend& forward() {
    static const CrossEntropyBackend b =
        cuda_glue::backend(&cuda::cross_entropy_forward, &cuda::cross_entropy_forward_workspace);
    return b;
  }
  static const CrossEntropyBackend& backward() {
    static const CrossEntropyBackend b =
        cuda_glue::backend(&cuda::cross_entropy_backward, &cuda::cross_entropy_backward_workspace);
    return b;
  }
  static const CrossEntropyBackend& target_backward() {
    static const CrossEntropyBackend b = cuda_glue::backend(&cuda::cross_entropy_target_backward);
    return b;
  }
};

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, CUDA, m) {
  weighted_loss::register_cross_entropy_ops<weighted_loss::Cuda>(m);
  weighted_loss::register_overlap_ops<weighted_loss::Cuda>(m);
}
