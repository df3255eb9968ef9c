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
    static const BinaryCrossEntropyBackend b = cuda_glue::backend(
        &cuda::binary_cross_entropy_forward, &cuda::binary_cross_entropy_forward_workspace);
    return b;
  }
  static const BinaryCrossEntropyBackend& backward() {
    static const BinaryCrossEntropyBackend b =
        cuda_glue::backend(&cuda::binary_cross_entropy_backward);
    return b;
  }
};

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, CUDA, m) {
  weighted_loss::register_binary_cross_entropy_ops<weighted_loss::Cuda>(m);
}
