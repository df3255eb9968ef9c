// The CUDA launchers: a params struct and a stream in, a CUDA error out. Plain C++ with the CUDA
// runtime API, so both the .cu files and the torch glue include it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "../params.h"

// The launchers' namespace: weighted_loss::cuda, or another where the host compiler builds the
// same files for the emulator beside a real CUDA build (emulated/kernels_*.cpp).
#ifndef WEIGHTED_LOSS_CUDA_NS
#define WEIGHTED_LOSS_CUDA_NS cuda
#endif

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {

// Bytes of device scratch the cross-entropy forward needs (per-block partial sums and the
// reduction's done-counter; the chunk statistics of rows split across blocks), and the backward
// (the sum of the class weights for label smoothing); the glue allocates them on the launch
// stream. 0 when none.
size_t cross_entropy_forward_workspace(const CrossEntropyParams& p);
cudaError_t cross_entropy_forward(const CrossEntropyParams& p, void* workspace,
                                  cudaStream_t stream);
size_t cross_entropy_backward_workspace(const CrossEntropyParams& p);
cudaError_t cross_entropy_backward(const CrossEntropyParams& p, void* workspace,
                                   cudaStream_t stream);
cudaError_t cross_entropy_target_backward(const CrossEntropyParams& p, cudaStream_t stream);

// Bytes of device scratch the BCE forward needs (the reduction's per-block partial sums and its
// done-counter; 0 for Reduction::None); the glue allocates them on the launch stream.
size_t binary_cross_entropy_forward_workspace(const BinaryCrossEntropyParams& p);
cudaError_t binary_cross_entropy_forward(const BinaryCrossEntropyParams& p, void* workspace,
                                         cudaStream_t stream);
cudaError_t binary_cross_entropy_backward(const BinaryCrossEntropyParams& p, cudaStream_t stream);

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
