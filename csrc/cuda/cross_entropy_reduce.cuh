// Reductions of the CUDA cross-entropy kernels, in a fixed order so results are the same on every
// run: a row group's (lse, sums) state over its threads, a block's sums, and the end of a reducing
// forward (per-block partials, then the last block to finish adds them in block order). No
// floating-point atomics, no host synchronization.
#pragma once

#include "cross_entropy_row.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

// Reduce (lse state, sums) over the TPR threads of a row group in a fixed order; the result is
// valid in the group's first thread: the lse state in place, the sums into `out` (double, see
// Sums; only WithSums: modes that have them). Groups narrower than a warp (TPR < 32) reduce
// within their own TPR lanes (the shuffles' width), every lane of the warp taking part. shared
// holds one slot per warp for TPR > 32.
template <typename acc_t, int TPR, bool WithSums>
__device__ __forceinline__ void group_reduce(Lse<acc_t>& l, const Sums<acc_t>& sm,
                                             Sums<double>& out, acc_t* sh_m, acc_t* sh_s,
                                             double* sh_a, double* sh_q) {
  constexpr int kWidth = TPR < 32 ? TPR : 32;
  out.a = sm.a;
  out.q = sm.q;
#pragma unroll
  for (int off = kWidth / 2; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_down_sync(0xffffffffu, l.m, off, kWidth);
    const acc_t s2 = __shfl_down_sync(0xffffffffu, l.s, off, kWidth);
    l.merge(m2, s2);
    if constexpr (WithSums) {
      out.a += __shfl_down_sync(0xffffffffu, out.a, off, kWidth);
      out.q += __shfl_down_sync(0xffffffffu, out.q, off, kWidth);
    }
  }
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      sh_m[warp] = l.m;
      sh_s[warp] = l.s;
      sh_a[warp] = out.a;
      sh_q[warp] = out.q;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 1; k < TPR / 32; ++k) {
        l.merge(sh_m[k], sh_s[k]);
        if constexpr (WithSums) {
          out.a += sh_a[k];
          out.q += sh_q[k];
        }
      }
    }
    __syncthreads();
  }
}

// The value of v in the group's first thread, in every thread of the group (all take part).
template <typename acc_t, int TPR>
__device__ __forceinline__ acc_t group_broadcast(acc_t v, acc_t* slot) {
  if constexpr (TPR <= 32) {
    return __shfl_sync(0xffffffffu, v, 0, TPR);
  } else {
    if (threadIdx.x == 0) *slot = v;
    __syncthreads();
    v = *slot;
    __syncthreads();
    return v;
  }
}

// Sum of v over the block in a fixed order, valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  double s = 0;
  if (threadIdx.x == 0) {
    for (int k = 0; k < kThreads / 32; ++k) s += shared[k];
  }
  __syncthreads();
  return s;
}

// The end of every reducing forward: this block's (loss, divisor) partial sums are stored; the
// last block to finish adds all blocks' in block order and writes the loss and total_weight.
template <typename T>
__device__ __forceinline__ void finish_forward(const CrossEntropyParams& p, double block_loss,
                                               double block_w,
                               double* partial, unsigned int* done) {
  using acc_t = typename AccOf<T>::type;
  __shared__ double shared[kThreads / 32];
  __shared__ bool last;
  const double bl = block_sum(block_loss, shared);
  const double bw = block_sum(block_w, shared);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = bl;
    partial[2 * blockIdx.x + 1] = bw;
    __threadfence();
    last = atomicAdd(done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  double al = 0, aw = 0;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += kThreads) {
    al += *static_cast<volatile double*>(partial + 2 * b);
    aw += *static_cast<volatile double*>(partial + 2 * b + 1);
  }
  const double total = block_sum(al, shared);
  const double wsum = block_sum(aw, shared);
  if (threadIdx.x == 0) {
    const double rows = static_cast<double>(p.outer * p.inner);
    const double denom = p.prob_target ? rows : wsum;
    if (!p.prob_target) *static_cast<acc_t*>(p.total_weight) = static_cast<acc_t>(wsum);
    const double out = p.reduction == Reduction::Mean ? total / denom : total;
    store_value<T>(p.loss, loss_as_acc(p), 0, static_cast<acc_t>(out));
  }
}

}  // namespace
}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
