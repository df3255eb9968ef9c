// How the CUDA cross-entropy covers the rows (Plan, chosen once per call in cross_entropy.cu and
// the same for the forward, its workspace and the backward), and the launchers of each path, one
// file each: cross_entropy_rows.cu (class-contiguous rows: a warp or a block per row, and the
// backward of split rows), cross_entropy_split.cu (the forward of rows split across blocks),
// cross_entropy_lanes.cu (lanes along the contiguous spatial axis of (N, C, d...)), and
// cross_entropy_overlap.cu (the Dice family's sums beside the lanes' loss).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cross_entropy_row.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS::ce {

// Threads per row of each class-contiguous path: rows of up to 64 classes share a warp among
// 4 rows (a warp each left most lanes idle: channels_last segmentation at a few % of bandwidth),
// up to 1024 classes a warp each, longer rows a block each (split or not).
constexpr int kSubWarpThreads = 8;
constexpr int64_t kSubWarpClasses = 64, kWarpRowClasses = 1024;

struct Plan {
  enum Kind { kSubWarpRows, kWarpRows, kBlockRows, kSplitRows, kLanes } kind = kWarpRows;
  int64_t chunks = 1, chunk_len = 0;  // kSplitRows: chunks of chunk_len classes per row
  int lanes = 1;                      // kLanes: rows per thread (1, or a 16-byte vector's worth)
  unsigned int blocks = 1;            // of the kernel that finishes the forward's reduction
};

// What a reducing forward's kernels share: per-block (loss, divisor) partials and the
// done-counter of the last-block pass (both null for Reduction::None).
struct Reduce {
  double* partial = nullptr;
  unsigned int* done = nullptr;
};

// f(mode, has_weight) with both as compile-time constants, for logits of T: probabilities
// stored as float beside 16-bit logits (params.h: target_dtype) are a mode of their own.
template <typename T, typename F>
cudaError_t dispatch_mode(const CrossEntropyParams& p, F&& f) {
  auto with_w = [&](auto mode) -> cudaError_t {
    if (p.weight != nullptr) return f(mode, std::true_type{});
    return f(mode, std::false_type{});
  };
  if constexpr (sizeof(T) == 2) {
    if (p.prob_target && p.target_dtype != p.dtype) {
      return with_w(std::integral_constant<int, kProbAcc>{});
    }
  }
  if (p.prob_target) return with_w(std::integral_constant<int, kProb>{});
  if (p.label_smoothing > 0) return with_w(std::integral_constant<int, kSmooth>{});
  return with_w(std::integral_constant<int, kPlain>{});
}

// f(T{}, mode, has_weight) for p's storage dtype T, mode and weighting, all compile-time; then
// the launch error. Each path's launcher is one such call.
template <typename F>
cudaError_t dispatch_kernel(const CrossEntropyParams& p, F&& f) {
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    return dispatch_mode<decltype(tag)>(p, [&](auto mode, auto has_w) -> cudaError_t {
      f(tag, mode, has_w);
      return cudaGetLastError();
    });
  });
}

// kSubWarpRows, kWarpRows and kBlockRows. `vector`: the rows may be read (and written) with
// 16-byte loads past a scalar head.
cudaError_t rows_forward(const CrossEntropyParams& p, const Plan& plan, bool vector,
                         const Reduce& red, cudaStream_t stream);
// kSubWarpRows, kWarpRows and kBlockRows, and the backward of kSplitRows (each block writes its
// chunk).
cudaError_t rows_backward(const CrossEntropyParams& p, const Plan& plan, bool vector,
                          const void* w_sum, cudaStream_t stream);
// state: the chunks' statistics, 4 acc values per (row, chunk).
cudaError_t split_forward(const CrossEntropyParams& p, const Plan& plan, bool vector, void* state,
                          const Reduce& red, cudaStream_t stream);
cudaError_t lanes_forward(const CrossEntropyParams& p, const Plan& plan, const Reduce& red,
                          cudaStream_t stream);
cudaError_t lanes_backward(const CrossEntropyParams& p, const Plan& plan, const void* w_sum,
                           cudaStream_t stream);
// The overlap sums (cross_entropy_overlap.cu), after lanes_forward: partial holds
// outer * overlap_blocks_per_item(p) * 3 * classes doubles.
int64_t overlap_blocks_per_item(const CrossEntropyParams& p);
cudaError_t overlap_forward(const CrossEntropyParams& p, double* partial, cudaStream_t stream);

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS::ce
