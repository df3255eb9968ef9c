// CUDA registration of the BCE-with-logits ops: the shared glue (checks, broadcast strides,
// allocation) with the launchers of binary_cross_entropy.cu, under a guard of the input's device,
// on the current stream, with the launch checked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../binary_cross_entropy.h"
#include "kernels.h"

namespace weighted_loss {
namespace {

using at::Tensor;

at::Tensor empty_like_gradient(const at::Tensor& like) { return at::empty_like(like); }

void launch_forward(const BinaryCrossEntropyParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Scratch for the reduction, from the caching allocator: stream-ordered, so it may be freed
  // once the launch is queued, and the op stays capturable in a CUDA graph.
  Tensor workspace;
  if (p.reduction != Reduction::None) {
    const auto bytes = static_cast<int64_t>(cuda::binary_cross_entropy_forward_workspace(p));
    workspace = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(
                                       at::kCUDA, c10::cuda::current_device()));
  }
  C10_CUDA_CHECK(cuda::binary_cross_entropy_forward(
      p, workspace.defined() ? workspace.data_ptr() : nullptr, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_backward(const BinaryCrossEntropyParams& p) {
  C10_CUDA_CHECK(cuda::binary_cross_entropy_backward(p, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor forward(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
               const std::optional<Tensor>& pos_weight, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(input.device());
  static const BinaryCrossEntropyBackend b{launch_forward, empty_like_gradient};
  return binary_cross_entropy_forward_impl(input, target, weight, pos_weight, reduction, b);
}

std::tuple<Tensor, Tensor> backward(const Tensor& grad_loss, const Tensor& input,
                                    const Tensor& target, const std::optional<Tensor>& weight,
                                    const std::optional<Tensor>& pos_weight, int64_t reduction,
                                    bool input_grad, bool target_grad) {
  const c10::cuda::CUDAGuard guard(input.device());
  static const BinaryCrossEntropyBackend b{launch_backward, empty_like_gradient};
  return binary_cross_entropy_backward_impl(grad_loss, input, target, weight, pos_weight,
                                            reduction, input_grad, target_grad, b);
}

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, CUDA, m) {
  m.impl("binary_cross_entropy_with_logits_forward", &weighted_loss::forward);
  m.impl("binary_cross_entropy_with_logits_backward", &weighted_loss::backward);
}
