// CUDA cross-entropy over class-contiguous rows: TPR threads per row (8 for rows of up to 64
// classes, a warp up to 1024, the whole block above), kThreads / TPR rows per block. The backward also writes
// the rows split across blocks by the forward of cross_entropy_split.cu: block (r, k) writes
// chunk k of row r, which needs no merging.
#include "cross_entropy_launch.cuh"
#include "cross_entropy_range.cuh"
#include "cross_entropy_reduce.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

template <typename T, int M, bool HasW, int TPR>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>)
    forward_rows_kernel(const CrossEntropyParams p, bool vector, double* partial,
                        unsigned int* done) {
  using acc_t = typename AccOf<T>::type;
  constexpr int RPB = kThreads / TPR;
  __shared__ acc_t sh_m[kThreads / 32], sh_s[kThreads / 32];
  __shared__ double sh_a[kThreads / 32], sh_q[kThreads / 32];
  __shared__ double row_l[RPB], row_w[RPB];
  const int64_t rows = p.outer * p.inner;
  const int group = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * RPB + group;
  const Smoothing<acc_t> smooth(p);
  double my_l = 0, my_w = 0;
  // every thread of a group takes part in the group's shuffles, valid row or not
  const bool valid = r < rows;
  int64_t y = -1;
  if (valid && !is_prob(M)) y = target_of(p, r);
  const bool active = valid && (is_prob(M) || y >= 0);
  const int64_t off = valid ? row_offset<T>(p, r) : 0;
  const T* x = static_cast<const T*>(p.input) + off;
  const auto* t = is_prob(M) ? static_cast<const TargetOf<T, M>*>(p.target) + off : nullptr;
  Lse<acc_t> l;
  Sums<acc_t> sm;
  Sums<double> row;  // the row's, in the group's first thread
  // (a row of no classes has no first logit: every target is ignore_index there)
  const acc_t ref = valid && p.classes > 0 ? shift_of(logit_of(p, to_acc(x[0]), 0)) : acc_t(0);
  if (valid) {  // ignored rows too: their max and sum decide whether their gradient is NaN
    for_range<T, TargetOf<T, M>, TPR, is_prob(M)>(x, t, 0, p.classes, p.stride_class, lane, vector,
                                  [&](int64_t c0, const acc_t* xv, const acc_t* tv, int n) {
      accumulate<T, M, HasW>(p, l, sm, ref, smooth, c0, xv, tv, n);
    });
  }
  group_reduce<acc_t, TPR, M != kPlain>(l, sm, row, sh_m, sh_s, sh_a, sh_q);
  if (soft_focal<M>(p)) {  // the focal loss over soft targets: a second pass (row.cuh)
    const acc_t sh = group_broadcast<acc_t, TPR>(l.shift(), sh_m);
    const acc_t L = group_broadcast<acc_t, TPR>(l.log_sum(), sh_m);
    Lse<acc_t> none;
    sm = Sums<acc_t>();
    if (active) {
      for_range<T, TargetOf<T, M>, TPR, is_prob(M)>(x, t, 0, p.classes, p.stride_class, lane, vector,
                                    [&](int64_t c0, const acc_t* xv, const acc_t* tv, int n) {
        for (int k = 0; k < n; ++k) focal_add<T, M, HasW>(p, sm, c0 + k, xv[k], tv[k], sh, L, smooth);
      });
    }
    group_reduce<acc_t, TPR, true>(none, sm, row, sh_m, sh_s, sh_a, sh_q);
  }
  if (lane == 0 && valid) {
    const acc_t xy = active && !is_prob(M) ? target_logit(p, x, y) : acc_t(0);
    finish_row<T, M, HasW>(p, r, y, active, l, row, ref, xy, my_l, my_w);
  }
  if (p.reduction == Reduction::None) return;
  if (lane == 0) {
    row_l[group] = my_l;
    row_w[group] = my_w;
  }
  __syncthreads();
  double bl = 0, bw = 0;
  if (threadIdx.x == 0) {
    for (int k = 0; k < RPB; ++k) {
      bl += row_l[k];
      bw += row_w[k];
    }
  }
  finish_forward<T>(p, bl, bw, partial, done);
}

// Row blockIdx.x * RPB + group, classes [blockIdx.y * chunk_len, + chunk_len) of it.
template <typename T, int M, bool HasW, int TPR>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>)
    backward_rows_kernel(const CrossEntropyParams p, bool vector, int64_t chunk_len,
                         const void* w_sum) {
  using acc_t = typename AccOf<T>::type;
  constexpr int RPB = kThreads / TPR;
  constexpr int V = Pack<T>::kSize;
  const int64_t rows = p.outer * p.inner;
  const int group = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * RPB + group;
  if (r >= rows) return;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk_len;
  const int64_t end = begin + chunk_len < p.classes ? begin + chunk_len : p.classes;
  const Smoothing<acc_t> smooth(p);
  const int64_t off = row_offset<T>(p, r);
  const T* x = static_cast<const T*>(p.input) + off;
  const auto* t = is_prob(M) ? static_cast<const TargetOf<T, M>*>(p.target) + off : nullptr;
  T* gx = static_cast<T*>(p.grad_input) + off + r / p.inner * (p.grad_stride_outer - p.stride_outer);
  const Coef<acc_t> c = row_coef<T, M, HasW>(p, r, weight_sum<T, M, HasW>(p, w_sum));
  for_range<T, TargetOf<T, M>, TPR, is_prob(M)>(x, t, begin, end, p.stride_class, lane, vector,
                                [&](int64_t c0, const acc_t* xv, const acc_t* tv, int n) {
    acc_t out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      out[k] = k < n ? grad_element<T, M, HasW>(p, c, c0 + k, xv[k], tv[k], smooth) : acc_t(0);
    }
    if (n == V) {
      Pack<T> pk;
#pragma unroll
      for (int k = 0; k < V; ++k) pk.v[k] = from_acc<T>(out[k]);
      *reinterpret_cast<Pack<T>*>(gx + c0) = pk;
    } else {
      gx[c0 * p.stride_class] = from_acc<T>(out[0]);
    }
  });
}

}  // namespace

cudaError_t ce::rows_forward(const CrossEntropyParams& p, const Plan& plan, bool vector,
                             const Reduce& red, cudaStream_t stream) {
  return dispatch_kernel(p, [&](auto tag, auto mode, auto has_w) {
    using T = decltype(tag);
    constexpr int M = decltype(mode)::value;
    constexpr bool W = decltype(has_w)::value;
    if (plan.kind == Plan::kSubWarpRows) {
      launch<forward_rows_kernel<T, M, W, kSubWarpThreads>>(plan.blocks, kThreads, stream, p,
                                                            vector, red.partial, red.done);
    } else if (plan.kind == Plan::kWarpRows) {
      launch<forward_rows_kernel<T, M, W, 32>>(plan.blocks, kThreads, stream, p, vector,
                                               red.partial, red.done);
    } else {
      launch<forward_rows_kernel<T, M, W, kThreads>>(plan.blocks, kThreads, stream, p, vector,
                                                     red.partial, red.done);
    }
  });
}

cudaError_t ce::rows_backward(const CrossEntropyParams& p, const Plan& plan, bool vector,
                              const void* w_sum, cudaStream_t stream) {
  return dispatch_kernel(p, [&](auto tag, auto mode, auto has_w) {
    using T = decltype(tag);
    constexpr int M = decltype(mode)::value;
    constexpr bool W = decltype(has_w)::value;
    if (plan.kind == Plan::kSubWarpRows) {
      launch<backward_rows_kernel<T, M, W, kSubWarpThreads>>(plan.blocks, kThreads, stream, p,
                                                             vector, p.classes, w_sum);
    } else if (plan.kind == Plan::kWarpRows) {
      launch<backward_rows_kernel<T, M, W, 32>>(plan.blocks, kThreads, stream, p, vector,
                                                p.classes, w_sum);
    } else {
      const int64_t len = plan.kind == Plan::kSplitRows ? plan.chunk_len : p.classes;
      const dim3 grid(static_cast<unsigned int>(p.outer * p.inner),
                      static_cast<unsigned int>(plan.chunks));
      launch<backward_rows_kernel<T, M, W, kThreads>>(grid, kThreads, stream, p, vector, len,
                                                      w_sum);
    }
  });
}

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
