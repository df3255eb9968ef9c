// CUDA registration of the BCE-with-logits ops: the shared glue (checks, broadcast strides,
// allocation) with the launchers of binary_cross_entropy.cu, under a guard of the input's device,
// on the current stream, with the launch checked.
#include "../registration.h"
#include "glue.h"
#include "kernels.h"

namespace weighted_loss {
namespace {

struct Cuda {
  using Guard = cuda_glue::Guard;
  static const BinaryCrossEntropyBackend& forward() {
    static const BinaryCrossEntropyBackend b{
        [](const BinaryCrossEntropyParams& p) {
          const size_t bytes = p.reduction == Reduction::None
                                   ? 0
                                   : cuda::binary_cross_entropy_forward_workspace(p);
          cuda_glue::launch_with_scratch(&cuda::binary_cross_entropy_forward, bytes, p);
        },
        cuda_glue::empty_like_gradient};
    return b;
  }
  static const BinaryCrossEntropyBackend& backward() {
    static const BinaryCrossEntropyBackend b{
        [](const BinaryCrossEntropyParams& p) {
          cuda_glue::check(cuda::binary_cross_entropy_backward(p, cuda_glue::stream()));
        },
        cuda_glue::empty_like_gradient};
    return b;
  }
};

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, CUDA, m) {
  weighted_loss::register_binary_cross_entropy_ops<weighted_loss::Cuda>(m);
}
