// Gradient buffers for the CPU backward.
#pragma once

#include <ATen/core/Tensor.h>

namespace weighted_loss::cpu {

// An uninitialized tensor with the sizes and strides at::empty_like(like) gives. Large ones (a
// logits gradient of 4 MiB or more) come from a small cache of blocks freed by earlier
// gradients of the same size: a fresh multi-MB allocation is a fresh mmap, and first-touch page
// faults (plus, in a VM, the host's) cost the backward up to several times its own memory
// traffic, with large run-to-run variance. New blocks get transparent-huge-page advice. At most
// two blocks are kept while no tensor uses them; WEIGHTED_LOSS_GRAD_CACHE=0 turns the cache off.
at::Tensor empty_like_gradient(const at::Tensor& like);

}  // namespace weighted_loss::cpu
