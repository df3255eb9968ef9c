// CUDA registration of the cross-entropy ops: the shared glue (checks, layout, allocation) with
// the launchers of cross_entropy.cu, under a guard of the input's device, on the current stream,
// with the launch checked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cross_entropy.h"
#include "kernels.h"

namespace weighted_loss {
namespace {

using at::Tensor;

Tensor empty_like_gradient(const Tensor& like) { return at::empty_like(like); }

void launch_forward(const CrossEntropyParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor workspace;  // reduction scratch, stream-ordered by the caching allocator
  if (p.reduction != Reduction::None) {
    const auto bytes = static_cast<int64_t>(cuda::cross_entropy_forward_workspace(p));
    workspace = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(
                                       at::kCUDA, c10::cuda::current_device()));
  }
  C10_CUDA_CHECK(cuda::cross_entropy_forward(
      p, workspace.defined() ? workspace.data_ptr() : nullptr, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_backward(const CrossEntropyParams& p) {
  C10_CUDA_CHECK(cuda::cross_entropy_backward(p, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_target_backward(const CrossEntropyParams& p) {
  C10_CUDA_CHECK(cuda::cross_entropy_target_backward(p, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const CrossEntropyBackend& forward_backend() {
  static const CrossEntropyBackend b{launch_forward, empty_like_gradient};
  return b;
}
const CrossEntropyBackend& backward_backend() {
  static const CrossEntropyBackend b{launch_backward, empty_like_gradient};
  return b;
}
const CrossEntropyBackend& target_backward_backend() {
  static const CrossEntropyBackend b{launch_target_backward, empty_like_gradient};
  return b;
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& input, const Tensor& target,
                                           const std::optional<Tensor>& weight, int64_t reduction,
                                           int64_t ignore_index, double label_smoothing) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cross_entropy_forward_impl(input, target, weight, reduction, ignore_index,
                                    label_smoothing, forward_backend());
}

Tensor backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                const std::optional<Tensor>& weight, const Tensor& lse,
                const Tensor& total_weight, int64_t reduction, int64_t ignore_index,
                double label_smoothing) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cross_entropy_backward_impl(grad_loss, input, target, weight, lse, total_weight,
                                     reduction, ignore_index, label_smoothing, backward_backend());
}

std::tuple<Tensor, Tensor, Tensor> prob_forward(const Tensor& input, const Tensor& target,
                                                const std::optional<Tensor>& weight,
                                                int64_t reduction, double label_smoothing) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cross_entropy_prob_forward_impl(input, target, weight, reduction, label_smoothing,
                                         forward_backend());
}

Tensor prob_backward(const Tensor& grad_loss, const Tensor& input, const Tensor& target,
                     const std::optional<Tensor>& weight, const Tensor& lse, const Tensor& tsum,
                     int64_t reduction, double label_smoothing) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cross_entropy_prob_backward_impl(grad_loss, input, target, weight, lse, tsum, reduction,
                                          label_smoothing, backward_backend());
}

Tensor prob_target_backward(const Tensor& grad_loss, const Tensor& input,
                            const std::optional<Tensor>& weight, const Tensor& lse,
                            int64_t reduction, double label_smoothing) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cross_entropy_prob_target_backward_impl(grad_loss, input, weight, lse, reduction,
                                                 label_smoothing, target_backward_backend());
}

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY_IMPL(weighted_loss, CUDA, m) {
  m.impl("cross_entropy_forward", &weighted_loss::forward);
  m.impl("cross_entropy_backward", &weighted_loss::backward);
  m.impl("cross_entropy_prob_forward", &weighted_loss::prob_forward);
  m.impl("cross_entropy_prob_backward", &weighted_loss::prob_backward);
  m.impl("cross_entropy_prob_target_backward", &weighted_loss::prob_target_backward);
}
