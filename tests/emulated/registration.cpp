// The CUDA kernels on CPU tensors. The host compiler builds the .cu files with the emulator
// (kernels_*.cpp); their launchers become backends of a Device policy of registration.h, exactly
// as the CUDA glue makes them, except that scratch comes from host memory and errors carry the
// emulator's explanation. This is its own extension (tests/emulation.py builds it; the product
// neither compiles nor loads it): emulated_cuda() there calls weighted_loss_emulated::enable, which
// registers those backends for the CPU dispatch key of the weighted_loss ops in a torch::Library of
// its own, over the CPU kernels; disable drops that library, and the CPU kernels are back.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "registration.h"
#define WEIGHTED_LOSS_CUDA_NS emulated
#include "runtime.h"
#include "cuda/kernels.h"

namespace weighted_loss {
namespace {

// What the real glue does with a launcher's result (C10_CUDA_CHECK, then the launch check), with
// the same message, followed by what the emulator saw.
void check(cudaError_t err) {
  const cudaError_t last = wl_emu::get_last_error();
  if (err == cudaSuccess) err = last;
  TORCH_CHECK(err == cudaSuccess, "CUDA error: ", wl_emu::error_string(err),
              "\nCUDA emulator: ", wl_emu::last_error_detail());
}

// Device memory holds whatever was there before: outputs and scratch start as 0xff bytes (NaN
// for every floating dtype), so an element a kernel forgets to write shows.
void poison(void* ptr, size_t bytes) {
  if (ptr != nullptr && bytes > 0) std::memset(ptr, 0xff, bytes);
}

size_t dtype_size(DType d) {
  switch (d) {
    case DType::Float64: return 8;
    case DType::Float32: return 4;
    default: return 2;
  }
}

void poison_outputs(const CrossEntropyParams& p) {
  const size_t rows = static_cast<size_t>(p.outer * p.inner);
  const size_t acc = p.dtype == DType::Float64 ? 8 : 4;
  const bool none = p.reduction == Reduction::None;
  if (p.grad_input == nullptr && p.grad_target == nullptr) {  // a forward
    poison(p.loss, (none ? rows : 1) * dtype_size(p.loss_dtype));
    poison(p.lse, rows * acc);
    poison(p.tsum, p.prob_target ? rows * acc : 0);
    poison(p.shard_stats, p.shard_stats != nullptr ? 3 * rows * acc : 0);
    poison(p.overlap_sums, p.overlap_sums != nullptr ? 3 * size_t(p.outer * p.classes) * acc : 0);
  }
  // gradients are written where the logits' strides put them (the input's with its own row
  // stride); (outer, classes, inner) spans them
  auto span = [&](int64_t stride_outer, DType dtype) {
    return static_cast<size_t>((p.outer - 1) * stride_outer + (p.classes - 1) * p.stride_class +
                               (p.inner - 1) * p.stride_inner + 1) * dtype_size(dtype);
  };
  if (rows > 0 && p.classes > 0 && p.grad_input != p.input) {  // in place: the logits
    poison(p.grad_input, span(p.grad_stride_outer, p.dtype));
    poison(p.grad_target, span(p.stride_outer, p.target_dtype));
  }
}

void poison_outputs(const BinaryCrossEntropyParams& p) {
  const size_t n = static_cast<size_t>(p.numel);
  if (p.grad_input == nullptr && p.grad_target == nullptr) {
    poison(p.loss, (p.reduction == Reduction::None ? n : 1) * dtype_size(p.loss_dtype));
  }
  poison(p.grad_input, n * dtype_size(p.dtype));
  poison(p.grad_target, n * dtype_size(p.target_dtype));
}

at::Tensor empty_like_gradient(const at::Tensor& like) { return at::empty_like(like); }

template <typename Params>
Backend<Params> backend(cudaError_t (*launcher)(const Params&, void*, cudaStream_t),
                        size_t (*workspace)(const Params&)) {
  return {[launcher, workspace](const Params& p) {
            const size_t bytes = workspace(p);
            at::Tensor scratch;
            if (bytes > 0) scratch = at::empty({static_cast<int64_t>(bytes)}, at::kByte);
            poison(bytes > 0 ? scratch.data_ptr() : nullptr, bytes);
            poison_outputs(p);
            check(launcher(p, bytes > 0 ? scratch.data_ptr() : nullptr, nullptr));
          },
          empty_like_gradient};
}

template <typename Params>
Backend<Params> backend(cudaError_t (*launcher)(const Params&, cudaStream_t)) {
  return {[launcher](const Params& p) {
            poison_outputs(p);
            check(launcher(p, nullptr));
          },
          empty_like_gradient};
}

struct EmulatedCrossEntropy {
  using Guard = NoGuard;
  static const CrossEntropyBackend& forward() {
    static const CrossEntropyBackend b = backend(&emulated::cross_entropy_forward,
                                                 &emulated::cross_entropy_forward_workspace);
    return b;
  }
  static const CrossEntropyBackend& backward() {
    static const CrossEntropyBackend b = backend(&emulated::cross_entropy_backward,
                                                 &emulated::cross_entropy_backward_workspace);
    return b;
  }
  static const CrossEntropyBackend& target_backward() {
    static const CrossEntropyBackend b = backend(&emulated::cross_entropy_target_backward);
    return b;
  }
};

struct EmulatedBinaryCrossEntropy {
  using Guard = NoGuard;
  static const BinaryCrossEntropyBackend& forward() {
    static const BinaryCrossEntropyBackend b =
        backend(&emulated::binary_cross_entropy_forward,
                &emulated::binary_cross_entropy_forward_workspace);
    return b;
  }
  static const BinaryCrossEntropyBackend& backward() {
    static const BinaryCrossEntropyBackend b = backend(&emulated::binary_cross_entropy_backward);
    return b;
  }
};

std::unique_ptr<torch::Library>& override_library() {
  static std::unique_ptr<torch::Library> lib;
  return lib;
}

// Swallows the dispatcher's warning that our library overrides the CPU kernels: that is the point.
struct Silent : c10::WarningHandler {
  void process(const c10::Warning&) override {}
};

void enable(int64_t sm_count, bool shuffle_blocks) {
  TORCH_CHECK(sm_count >= 1 && sm_count <= 100000,
              "emulated_cuda: sm_count must be between 1 and 100000, got ", sm_count);
  wl_emu::settings().sm_count = static_cast<int>(sm_count);
  wl_emu::settings().shuffle_blocks = shuffle_blocks;
  auto& lib = override_library();
  if (lib) return;
  Silent silent;
  const c10::WarningUtils::WarningHandlerGuard quiet(&silent);
  lib = std::make_unique<torch::Library>(torch::Library::IMPL, "weighted_loss",
                                         c10::DispatchKey::CPU, __FILE__, __LINE__);
  register_cross_entropy_ops<EmulatedCrossEntropy>(*lib);
  register_overlap_ops<EmulatedCrossEntropy>(*lib);
  register_binary_cross_entropy_ops<EmulatedBinaryCrossEntropy>(*lib);
}

void disable() {
  override_library().reset();
  wl_emu::settings().sm_count = 132;
  wl_emu::settings().shuffle_blocks = true;
}

// Every kernel instantiation the launchers can choose, with its launches so far.
std::tuple<std::vector<std::string>, std::vector<int64_t>> launches() {
  std::vector<std::string> names;
  std::vector<int64_t> counts;
  for (auto& [name, count] : wl_emu::registry().snapshot()) {
    names.push_back(name);
    counts.push_back(count);
  }
  return {names, counts};
}

}  // namespace
}  // namespace weighted_loss

TORCH_LIBRARY(weighted_loss_emulated, m) {
  m.def("enable(int sm_count, bool shuffle_blocks) -> ()", &weighted_loss::enable);
  m.def("disable() -> ()", &weighted_loss::disable);
  m.def("launches() -> (str[], int[])", &weighted_loss::launches);
}
