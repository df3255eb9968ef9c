// The overlap sums of the Dice family on CUDA (params.h: overlap_sums), after the lanes forward
// has saved each position's (sh, L): per item and class, I = sum p t, P = sum p (or p^2),
// T = sum t (or t^2) over the positions not ignored, p = exp((x - sh) - L).
// A block takes kTiles * kThreads positions of one item; each thread adds its kTiles positions of
// kClasses classes at a time in registers, then a warp's threads add by shuffles, the block's
// warps in double, and a second kernel adds the blocks' partials in block order: deterministic,
// no atomics. The backward is the lanes backward's (cross_entropy_lanes.cu, Overlap), which
// recomputes each position's (sh, L) rather than reading them: the glue frees them after the
// forward (cross_entropy_overlap.cpp, keeps_planes).
// The logits are read a second time here, after the loss's pass (fusing the two waits for a GPU
// measurement: docs/segmentation.md).
#include "cross_entropy_launch.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

// Positions a thread adds before the warp's shuffles, and classes a pass keeps in registers
// (three sums each: 24 floats, or 48 registers for double).
constexpr int kTiles = 8, kClasses = 8;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// partial: (outer, blocks_per_item, 3, classes) doubles, this block's at (item, j).
template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
    overlap_sums_kernel(const CrossEntropyParams p, int64_t blocks_per_item, double* partial) {
  using acc_t = typename AccOf<T>::type;
  using U = TargetOf<T, M>;
  __shared__ double shared[kWarps][3][kClasses];
  const int64_t item = blockIdx.x / blocks_per_item, j = blockIdx.x % blocks_per_item;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows = p.outer * p.inner, C = p.classes;
  const auto* lse = static_cast<const acc_t*>(p.lse);
  const bool sq = p.overlap_squared;
  double* out = partial + (item * blocks_per_item + j) * 3 * C;
  for (int64_t c0 = 0; c0 < C; c0 += kClasses) {
    acc_t si[kClasses], sp[kClasses], st[kClasses];
#pragma unroll
    for (int u = 0; u < kClasses; ++u) si[u] = sp[u] = st[u] = acc_t(0);
    for (int tile = 0; tile < kTiles; ++tile) {
      const int64_t i = (j * kTiles + tile) * kThreads + threadIdx.x;  // the position in the item
      if (i >= p.inner) break;  // (no shuffle inside this loop: threads may leave it apart)
      const int64_t r = item * p.inner + i;
      const int64_t y = is_prob(M) ? -1 : target_of(p, r);
      if (!is_prob(M) && y < 0) continue;  // ignored: in none of the sums
      const acc_t sh = lse[r], L = lse[rows + r];
      const int64_t off = row_offset<T>(p, r);
      const T* x = static_cast<const T*>(p.input) + off;
      const U* t = is_prob(M) ? static_cast<const U*>(p.target) + off : nullptr;
#pragma unroll
      for (int u = 0; u < kClasses; ++u) {
        const int64_t c = c0 + u;
        if (c >= C) break;
        const acc_t pc = fast_exp((logit_of(p, to_acc(x[c * p.stride_class]), c) - sh) - L);
        const acc_t tc = is_prob(M) ? to_acc(t[c * p.stride_class]) : acc_t(c == y ? 1 : 0);
        si[u] += pc * tc;
        sp[u] += sq ? pc * pc : pc;
        st[u] += sq ? tc * tc : tc;
      }
    }
#pragma unroll
    for (int u = 0; u < kClasses; ++u) {
      const acc_t a = warp_sum(si[u]), b = warp_sum(sp[u]), c = warp_sum(st[u]);
      if (lane == 0) {
        shared[warp][0][u] = a;
        shared[warp][1][u] = b;
        shared[warp][2][u] = c;
      }
    }
    __syncthreads();
    if (threadIdx.x < 3 * kClasses) {
      const int plane = threadIdx.x / kClasses, u = threadIdx.x % kClasses;
      double s = 0;
      for (int w = 0; w < kWarps; ++w) s += shared[w][plane][u];
      if (c0 + u < C) out[plane * C + c0 + u] = s;
    }
    __syncthreads();
  }
}

// One thread per (item, plane, class): the blocks' partials added in block order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    overlap_finish_kernel(const CrossEntropyParams p, int64_t blocks_per_item,
                          const double* partial) {
  using acc_t = typename AccOf<T>::type;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t per_item = 3 * p.classes;
  if (e >= p.outer * per_item) return;
  const int64_t item = e / per_item, k = e - item * per_item;
  double s = 0;
  for (int64_t j = 0; j < blocks_per_item; ++j) {
    s += partial[(item * blocks_per_item + j) * per_item + k];
  }
  static_cast<acc_t*>(p.overlap_sums)[e] = static_cast<acc_t>(s);
}

}  // namespace

int64_t ce::overlap_blocks_per_item(const CrossEntropyParams& p) {
  constexpr int64_t span = int64_t(kTiles) * kThreads;
  return (p.inner + span - 1) / span;
}

cudaError_t ce::overlap_forward(const CrossEntropyParams& p, double* partial,
                                cudaStream_t stream) {
  const int64_t per_item = overlap_blocks_per_item(p);
  const int64_t n = p.outer * 3 * p.classes;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const auto blocks = static_cast<unsigned int>(p.outer * per_item);
    if (blocks > 0) {
      auto sums = [&](auto mode) {
        launch<overlap_sums_kernel<T, decltype(mode)::value>>(blocks, kThreads, stream, p,
                                                              per_item, partial);
      };
      if (!p.prob_target) {
        sums(std::integral_constant<int, kPlain>{});
      } else if (p.target_dtype == p.dtype) {
        sums(std::integral_constant<int, kProb>{});
      } else if constexpr (sizeof(T) == 2) {  // float probabilities beside 16-bit logits
        sums(std::integral_constant<int, kProbAcc>{});
      }
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    const auto finish = static_cast<unsigned int>((n + kThreads - 1) / kThreads);
    launch<overlap_finish_kernel<T>>(finish, kThreads, stream, p, per_item, partial);
    return cudaGetLastError();
  });
}

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
