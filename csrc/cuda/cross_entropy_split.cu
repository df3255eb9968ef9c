// CUDA cross-entropy forward of rows split across blocks: when there are too few rows for a
// block each to fill the GPU and the rows are long, each row is cut into chunks of classes.
// forward_split_kernel keeps each chunk's (max, sum-exp, weighted sums); forward_combine_kernel
// merges a row's chunks in chunk order (deterministic), finishes the row and the reduction. The
// backward is cross_entropy_rows.cu's, one block per (row, chunk).
#include "cross_entropy_launch.cuh"
#include "cross_entropy_range.cuh"
#include "cross_entropy_reduce.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

// Chunk blockIdx.x (of chunk_len classes) of row blockIdx.y: its (m, s, a, q) into
// state[(row * chunks + chunk) * 4 ...] (double: the sums as group_reduce leaves them).
template <typename T, int M, bool HasW>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>)
    forward_split_kernel(const CrossEntropyParams p, bool vector, int64_t chunk_len,
                         double* state) {
  using acc_t = typename AccOf<T>::type;
  __shared__ acc_t sh_m[kThreads / 32], sh_s[kThreads / 32];
  __shared__ double sh_a[kThreads / 32], sh_q[kThreads / 32];
  const int64_t r = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_len;
  const int64_t end = begin + chunk_len < p.classes ? begin + chunk_len : p.classes;
  const Smoothing<acc_t> smooth(p);
  const int64_t off = row_offset<T>(p, r);
  const T* x = static_cast<const T*>(p.input) + off;
  const auto* t = is_prob(M) ? static_cast<const TargetOf<T, M>*>(p.target) + off : nullptr;
  Lse<acc_t> l;
  Sums<acc_t> sm;
  Sums<double> chunk;
  {  // ignored rows too: their max and sum decide whether their gradient is NaN
    const acc_t ref = shift_of(logit_of(p, to_acc(x[0]), 0));
    for_range<T, TargetOf<T, M>, kThreads, is_prob(M)>(x, t, begin, end, p.stride_class, threadIdx.x, vector,
                                       [&](int64_t c0, const acc_t* xv, const acc_t* tv, int n) {
      accumulate<T, M, HasW>(p, l, sm, ref, smooth, c0, xv, tv, n);
    });
  }
  group_reduce<acc_t, kThreads, M != kPlain>(l, sm, chunk, sh_m, sh_s, sh_a, sh_q);
  if (threadIdx.x == 0) {
    double* st = state + 4 * (r * gridDim.x + blockIdx.x);
    st[0] = l.m;
    st[1] = l.s;
    st[2] = chunk.a;
    st[3] = chunk.q;
  }
}

// One thread per row: merges the row's chunk statistics in chunk order, then finishes the row and
// the reduction.
template <typename T, int M, bool HasW>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>)
    forward_combine_kernel(const CrossEntropyParams p, int64_t chunks, const double* state,
                           double* partial, unsigned int* done) {
  using acc_t = typename AccOf<T>::type;
  const int64_t rows = p.outer * p.inner;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  double my_l = 0, my_w = 0;
  if (r < rows) {
    const int64_t y = is_prob(M) ? -1 : target_of(p, r);
    const bool active = is_prob(M) || y >= 0;
    Lse<acc_t> l;
    Sums<double> sm;
    for (int64_t k = 0; k < chunks; ++k) {
      const double* st = state + 4 * (r * chunks + k);
      l.merge(static_cast<acc_t>(st[0]), static_cast<acc_t>(st[1]));
      sm.a += st[2];
      sm.q += st[3];
    }
    const T* x = static_cast<const T*>(p.input) + row_offset<T>(p, r);
    const acc_t ref = active ? shift_of(logit_of(p, to_acc(x[0]), 0)) : acc_t(0);
    const acc_t xy = active && !is_prob(M) ? target_logit(p, x, y) : acc_t(0);
    finish_row<T, M, HasW>(p, r, y, active, l, sm, ref, xy, my_l, my_w);
  }
  if (p.reduction == Reduction::None) return;
  finish_forward<T>(p, my_l, my_w, partial, done);
}

}  // namespace

cudaError_t ce::split_forward(const CrossEntropyParams& p, const Plan& plan, bool vector,
                              void* state, const Reduce& red, cudaStream_t stream) {
  return dispatch_kernel(p, [&](auto tag, auto mode, auto has_w) {
    using T = decltype(tag);
    constexpr int M = decltype(mode)::value;
    constexpr bool W = decltype(has_w)::value;
    auto* st = static_cast<double*>(state);
    const dim3 grid(static_cast<unsigned int>(plan.chunks),
                    static_cast<unsigned int>(p.outer * p.inner));
    launch<forward_split_kernel<T, M, W>>(grid, kThreads, stream, p, vector, plan.chunk_len, st);
    launch<forward_combine_kernel<T, M, W>>(plan.blocks, kThreads, stream, p, plan.chunks, st,
                                            red.partial, red.done);
  });
}

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
