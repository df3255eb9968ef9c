// What the CUDA glue files share: the device policy pieces for registration.h and the launch
// around a torch-free launcher (current stream, scratch from the caching allocator, error checks).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstddef>

#include "../common.h"

namespace weighted_loss::cuda_glue {

using Guard = c10::cuda::CUDAGuard;

inline at::Tensor empty_like_gradient(const at::Tensor& like) { return at::empty_like(like); }

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Checks what a launcher returned, then the launch itself.
inline void check(cudaError_t err) {
  C10_CUDA_CHECK(err);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs launcher(p, scratch, stream) on the current stream with `bytes` of device scratch (none
// when 0). The scratch comes from the caching allocator: stream-ordered, so it may be freed once
// the launch is queued, and the op stays capturable in a CUDA graph.
template <typename Params>
void launch_with_scratch(cudaError_t (*launcher)(const Params&, void*, cudaStream_t),
                         size_t bytes, const Params& p) {
  at::Tensor scratch;
  if (bytes > 0) {
    scratch = at::empty({static_cast<int64_t>(bytes)},
                        at::TensorOptions().dtype(at::kByte).device(
                            at::kCUDA, c10::cuda::current_device()));
  }
  check(launcher(p, scratch.defined() ? scratch.data_ptr() : nullptr, stream()));
}

// The backend of a launcher that takes workspace(p) bytes of scratch (0: none).
template <typename Params>
Backend<Params> backend(cudaError_t (*launcher)(const Params&, void*, cudaStream_t),
                        size_t (*workspace)(const Params&)) {
  return {[launcher, workspace](const Params& p) { launch_with_scratch(launcher, workspace(p), p); },
          empty_like_gradient};
}

// The backend of a launcher without scratch.
template <typename Params>
Backend<Params> backend(cudaError_t (*launcher)(const Params&, cudaStream_t)) {
  return {[launcher](const Params& p) { check(launcher(p, stream())); }, empty_like_gradient};
}

}  // namespace weighted_loss::cuda_glue
