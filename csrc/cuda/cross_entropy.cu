// CUDA kernels of the fused cross-entropy. Math as in ../cpu/cross_entropy_kernel.h, per row r
// with logits x, class weights w (1 when absent), C classes, smoothing s, W = sum_c w_c:
//   lse = log sum_c exp(x_c)                                    (saved, acc precision)
//   index target y:  loss = (1 - s) w_y (lse - x_y) + (s / C) sum_c w_c (lse - x_c)
//                    dx_k = (1 - s) w_y (p_k - [k == y]) + (s / C) (W p_k - w_k)
//   probabilities t, t' = (1 - s) t + s / C, S = sum_c w_c t'_c:
//                    loss = S lse - sum_c w_c t'_c x_c,  dx_k = S p_k - w_k t'_k,
//                    dt_k = -(1 - s) w_k (x_k - lse)
// Weighted sums of x are taken relative to ref = the row's first logit, so a large common offset
// does not cancel (0 when that logit is not finite: see shift_of). Layouts (the glue guarantees one): class-contiguous rows, a group of TPR threads
// per row (a warp for C up to 1024, a block above), reading 16-byte vectors when the row is
// aligned; or lanes along the contiguous spatial axis of (N, C, d...), one thread per row, so
// neighbouring threads read neighbouring addresses. Reductions are deterministic: fixed trees,
// per-block partial sums in float64 and a last-block-done pass in the same launch; no
// floating-point atomics, no host synchronization. An out-of-range class index (other than
// ignore_index) is never read through: it stops the kernel with a device-side assert, as
// PyTorch's CUDA kernels do.
#undef NDEBUG
#include <cassert>
#include <cfloat>
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

constexpr int kThreads = 256;
// Blocks per SM the register allocation must allow. Without the hint ptxas spilled a few bytes in
// some variants at 32-48 registers, aiming at a higher occupancy than these kernels need.
constexpr int kMinBlocks = 2;
enum Mode : int { kPlain = 0, kSmooth = 1, kProb = 2 };

__device__ __forceinline__ float fast_exp(float v) { return __expf(v); }
__device__ __forceinline__ double fast_exp(double v) { return exp(v); }

// Online log-sum-exp state: s = sum exp(x - m) over what was seen, m its max (-inf: nothing yet).
template <typename acc_t>
struct Lse {
  acc_t m = -INFINITY, s = 0;
  __device__ __forceinline__ void add_max(acc_t mv) {  // raise the shift to mv
    if (mv > m) {
      s = (m == -INFINITY) ? s : s * fast_exp(m - mv);  // s is 0, or NaN, until m is finite
      m = mv;
    }
  }
  __device__ __forceinline__ void add(acc_t x) {  // after add_max covered x
    if (m != -INFINITY) s += fast_exp(x - m);
    else if (x != x) s = x;  // NaN in an all -inf row
  }
  __device__ __forceinline__ void merge(acc_t m2, acc_t s2) {
    const acc_t mm = m > m2 ? m : m2;
    if (mm == -INFINITY) {
      s = s + s2;  // 0 unless NaN
      return;
    }
    s = (m == -INFINITY ? s : s * fast_exp(m - mm)) + (m2 == -INFINITY ? s2 : s2 * fast_exp(m2 - mm));
    m = mm;
  }
  __device__ __forceinline__ acc_t value() const { return m == -INFINITY ? m + s : m + log(s); }
};

// What a row's forward gathers besides the log-sum-exp: a = sum_c w_c t'_c (x_c - ref) and
// q = sum_c w_c t'_c (t' = 1 for kSmooth, so q = W).
// Label smoothing s as the kernels use it: t' = t * t_scale + t_shift = (1 - s) t + s / C.
template <typename acc_t>
struct Smoothing {
  acc_t s, t_scale, t_shift;
  __device__ __forceinline__ explicit Smoothing(const CrossEntropyParams& p)
      : s(p.label_smoothing > 0 ? static_cast<acc_t>(p.label_smoothing) : acc_t(0)),
        t_scale(acc_t(1) - s),
        t_shift(s / static_cast<acc_t>(p.classes)) {}
};

// w_c t'_c of class c (t' = 1 without probability targets, w = 1 without weight).
template <typename T, int M, bool HasW>
__device__ __forceinline__ typename AccOf<T>::type class_term(
    const CrossEntropyParams& p, int64_t c, typename AccOf<T>::type t,
    const Smoothing<typename AccOf<T>::type>& sm) {
  using acc_t = typename AccOf<T>::type;
  const acc_t wc = HasW ? to_acc(static_cast<const T*>(p.weight)[c]) : acc_t(1);
  return M == kProb ? wc * (t * sm.t_scale + sm.t_shift) : wc;
}

template <typename acc_t>
struct Sums {
  acc_t a = 0, q = 0;
  template <typename T, int M, bool HasW>
  __device__ __forceinline__ void add(const CrossEntropyParams& p, int64_t c, acc_t x, acc_t t,
                                      acc_t ref, const Smoothing<acc_t>& smooth) {
    if constexpr (M != kPlain) {
      const acc_t tw = class_term<T, M, HasW>(p, c, t, smooth);
      a += tw * (x - ref);
      q += tw;
    }
  }
};

// The shift of a row's weighted sums: its first logit, or 0 when that is -inf (a masked class),
// +inf or NaN. Shifted by -inf, x - ref is NaN for every -inf logit, where PyTorch's loss is +inf
// (a -inf logit with w t' > 0) or NaN (w t' = 0); unshifted, the sums give exactly those.
template <typename acc_t>
__device__ __forceinline__ acc_t shift_of(acc_t x0) {
  return isfinite(x0) ? x0 : acc_t(0);
}

template <typename T>
__device__ __forceinline__ int64_t row_offset(const CrossEntropyParams& p, int64_t r) {
  const int64_t o = r / p.inner;
  return o * p.stride_outer + (r - o * p.inner) * p.stride_inner;
}

// Class index of row r: -1 when ignored. Anything else out of range stops the kernel.
__device__ __forceinline__ int64_t target_of(const CrossEntropyParams& p, int64_t r) {
  const int64_t y = static_cast<const int64_t*>(p.target)[r];
  if (y == p.ignore_index) return -1;
  assert(y >= 0 && y < p.classes && "Target is out of bounds");
  return (y >= 0 && y < p.classes) ? y : -1;
}

// 16-byte packs each thread loads before it uses the first, so that enough loads are in flight.
constexpr int kUnroll = 4;

// Calls f(c0, xv, tv, n) for classes [begin, end) of the row at x (probabilities at t), spread
// over the TPR lanes of its group: n = 1 element at class c0, or a 16-byte pack of n = V
// consecutive classes from c0. With `vector` (class-contiguous, and x, t and whatever the caller
// writes equally aligned) the first classes up to a 16-byte boundary go one at a time, then each
// lane loads kUnroll packs before it processes them, then the tail.
template <typename T, int TPR, bool WithT, typename F>
__device__ __forceinline__ void for_range(const T* x, const T* t, int64_t begin, int64_t end,
                                          int64_t stride, int lane, bool vector, F&& f) {
  using acc_t = typename AccOf<T>::type;
  constexpr int V = Pack<T>::kSize;
  auto one = [&](int64_t c) {
    acc_t xv[V] = {}, tv[V] = {};
    xv[0] = to_acc(x[c * stride]);
    if constexpr (WithT) tv[0] = to_acc(t[c * stride]);
    f(c, xv, tv, 1);
  };
  if (!vector) {
    for (int64_t c = begin + lane; c < end; c += TPR) one(c);
    return;
  }
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(x + begin) % 16 / sizeof(T));
  const int64_t head = mis == 0 ? 0 : (V - mis < end - begin ? V - mis : end - begin);
  if (lane < head) one(begin + lane);
  const int64_t vb = begin + head, nv = (end - vb) / V;
  const auto* px = reinterpret_cast<const Pack<T>*>(x + vb);
  const auto* pt = reinterpret_cast<const Pack<T>*>(WithT ? t + vb : x + vb);
  auto use = [&](int64_t v, const Pack<T>& bx, const Pack<T>& bt) {
    acc_t xv[V], tv[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      xv[k] = to_acc(bx.v[k]);
      tv[k] = WithT ? to_acc(bt.v[k]) : acc_t(0);
    }
    f(vb + v * V, xv, tv, V);
  };
  int64_t v = lane;
  for (; v + (kUnroll - 1) * TPR < nv; v += kUnroll * TPR) {
    Pack<T> bx[kUnroll], bt[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      bx[u] = px[v + u * TPR];
      if constexpr (WithT) bt[u] = pt[v + u * TPR];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) use(v + u * TPR, bx[u], bt[u]);
  }
  for (; v < nv; v += TPR) {
    Pack<T> bt{};
    if constexpr (WithT) bt = pt[v];
    use(v, px[v], bt);
  }
  for (int64_t c = vb + nv * V + lane; c < end; c += TPR) one(c);
}

// Adds the n classes from c0 (values xv, probabilities tv) to a row's log-sum-exp and sums.
template <typename T, int M, bool HasW>
__device__ __forceinline__ void accumulate(const CrossEntropyParams& p,
                                           Lse<typename AccOf<T>::type>& l,
                                           Sums<typename AccOf<T>::type>& sm,
                                           typename AccOf<T>::type ref,
                                           const Smoothing<typename AccOf<T>::type>& smooth,
                                           int64_t c0, const typename AccOf<T>::type* xv,
                                           const typename AccOf<T>::type* tv, int n) {
  using acc_t = typename AccOf<T>::type;
  constexpr int V = Pack<T>::kSize;
  acc_t mv = xv[0];
#pragma unroll
  for (int k = 1; k < V; ++k) {
    if (k < n) mv = fmax(mv, xv[k]);
  }
  l.add_max(mv);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k < n) {
      l.add(xv[k]);
      sm.template add<T, M, HasW>(p, c0 + k, xv[k], tv[k], ref, smooth);
    }
  }
}

// Reduce (lse state, sums) over the TPR threads of a row group in a fixed order; the result is
// valid in the group's first thread. shared holds one slot per warp for TPR > 32.
template <typename acc_t, int TPR>
__device__ __forceinline__ void group_reduce(Lse<acc_t>& l, Sums<acc_t>& sm, acc_t* sh_m,
                                             acc_t* sh_s, acc_t* sh_a, acc_t* sh_q) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_down_sync(0xffffffffu, l.m, off);
    const acc_t s2 = __shfl_down_sync(0xffffffffu, l.s, off);
    l.merge(m2, s2);
    sm.a += __shfl_down_sync(0xffffffffu, sm.a, off);
    sm.q += __shfl_down_sync(0xffffffffu, sm.q, off);
  }
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      sh_m[warp] = l.m;
      sh_s[warp] = l.s;
      sh_a[warp] = sm.a;
      sh_q[warp] = sm.q;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int k = 1; k < TPR / 32; ++k) {
        l.merge(sh_m[k], sh_s[k]);
        sm.a += sh_a[k];
        sm.q += sh_q[k];
      }
    }
    __syncthreads();
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
    *static_cast<T*>(p.loss) = from_acc<T>(static_cast<acc_t>(out));
  }
}

// The loss of row r from its statistics; wy gets the mean's divisor contribution.
template <typename T, int M, bool HasW>
__device__ __forceinline__ typename AccOf<T>::type row_loss(
    const CrossEntropyParams& p, int64_t y, typename AccOf<T>::type lse,
    typename AccOf<T>::type ref, const Sums<typename AccOf<T>::type>& sm, typename AccOf<T>::type xy,
    typename AccOf<T>::type& wy) {
  using acc_t = typename AccOf<T>::type;
  if constexpr (M == kProb) {
    wy = 1;
    return sm.q * (lse - ref) - sm.a;
  } else {
    wy = HasW ? to_acc(static_cast<const T*>(p.weight)[y]) : acc_t(1);
    const acc_t nll = lse - xy;
    if constexpr (M == kSmooth) {
      const Smoothing<acc_t> s(p);
      return s.t_scale * wy * nll + s.t_shift * (sm.q * (lse - ref) - sm.a);
    } else {
      return wy * nll;
    }
  }
}

// The backward coefficients of row r: grad_k = cp p_k - cw w_k t'_k - [k == y] gy.
template <typename acc_t>
struct Coef {
  acc_t lse = 0, cp = 0, cw = 0, gy = 0;
  int64_t y = -1;
  bool zero = true;
};

// Writes row r's forward results (lse, tsum; the loss itself for Reduction::None), or adds its
// (loss, divisor) share of a reduced loss to (my_l, my_w).
template <typename T, int M>
__device__ __forceinline__ void store_row(const CrossEntropyParams& p, int64_t r,
                                          typename AccOf<T>::type lse, typename AccOf<T>::type loss,
                                          typename AccOf<T>::type wy, typename AccOf<T>::type q,
                                          double& my_l, double& my_w) {
  using acc_t = typename AccOf<T>::type;
  static_cast<acc_t*>(p.lse)[r] = lse;
  if constexpr (M == kProb) static_cast<acc_t*>(p.tsum)[r] = q;
  if (p.reduction == Reduction::None) {
    static_cast<T*>(p.loss)[r] = from_acc<T>(loss);
  } else {
    my_l += loss;
    my_w += wy;
  }
}

// One element of a row's gradient: cp p_k - cw w_k t'_k - [k == y] gy.
template <typename T, int M, bool HasW>
__device__ __forceinline__ typename AccOf<T>::type grad_element(
    const CrossEntropyParams& p, const Coef<typename AccOf<T>::type>& c, int64_t k,
    typename AccOf<T>::type x, typename AccOf<T>::type t,
    const Smoothing<typename AccOf<T>::type>& sm) {
  using acc_t = typename AccOf<T>::type;
  if (c.zero) return acc_t(0);
  acc_t v = c.cp * fast_exp(x - c.lse);
  if constexpr (M != kPlain) v -= c.cw * class_term<T, M, HasW>(p, k, t, sm);
  if (k == c.y) v -= c.gy;
  return v;
}


// Row r's forward from its statistics: the log-sum-exp, the loss, the stores (see store_row).
template <typename T, int M, bool HasW>
__device__ __forceinline__ void finish_row(const CrossEntropyParams& p, int64_t r, int64_t y,
                                           bool active, const Lse<typename AccOf<T>::type>& l,
                                           const Sums<typename AccOf<T>::type>& sm,
                                           typename AccOf<T>::type ref,
                                           typename AccOf<T>::type xy, double& my_l,
                                           double& my_w) {
  using acc_t = typename AccOf<T>::type;
  acc_t lse = 0, loss = 0, wy = 0;
  if (active) {
    lse = l.value();
    loss = row_loss<T, M, HasW>(p, y, lse, ref, sm, xy, wy);
  }
  store_row<T, M>(p, r, lse, loss, wy, sm.q, my_l, my_w);
}

template <typename T, int M, bool HasW>
__device__ __forceinline__ Coef<typename AccOf<T>::type> row_coef(const CrossEntropyParams& p,
                                                                  int64_t r,
                                                                  typename AccOf<T>::type w_sum) {
  using acc_t = typename AccOf<T>::type;
  Coef<acc_t> c;
  acc_t g;
  if (p.reduction == Reduction::None) {
    g = to_acc(static_cast<const T*>(p.grad_loss)[r]);
  } else {
    g = to_acc(*static_cast<const T*>(p.grad_loss));
    if (p.reduction == Reduction::Mean) {
      g /= p.prob_target ? static_cast<acc_t>(p.outer * p.inner)
                         : *static_cast<const acc_t*>(p.total_weight);
    }
  }
  c.lse = static_cast<const acc_t*>(p.lse)[r];
  if constexpr (M == kProb) {
    c.cp = g * static_cast<const acc_t*>(p.tsum)[r];
    c.cw = g;
    c.zero = false;
  } else {
    const int64_t y = target_of(p, r);
    if (y < 0) return c;
    const acc_t wy = HasW ? to_acc(static_cast<const T*>(p.weight)[y]) : acc_t(1);
    c.y = y;
    c.zero = false;
    if constexpr (M == kSmooth) {
      const Smoothing<acc_t> s(p);
      c.cp = g * (s.t_scale * wy + s.t_shift * w_sum);
      c.cw = g * s.t_shift;
      c.gy = g * s.t_scale * wy;
    } else {
      c.cp = g * wy;
      c.gy = g * wy;
    }
  }
  return c;
}

// The sum of the class weights (C without weight) the smoothing gradient needs: computed once per
// backward by weight_sum_kernel.
template <typename T, int M, bool HasW>
__device__ __forceinline__ typename AccOf<T>::type weight_sum(const CrossEntropyParams& p,
                                                              const void* w_sum) {
  using acc_t = typename AccOf<T>::type;
  if constexpr (M != kSmooth) return acc_t(0);
  if constexpr (!HasW) return static_cast<acc_t>(p.classes);
  return *static_cast<const acc_t*>(w_sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) weight_sum_kernel(const CrossEntropyParams p,
                                                              void* out) {
  using acc_t = typename AccOf<T>::type;
  __shared__ double shared[kThreads / 32];
  double s = 0;
  for (int64_t c = threadIdx.x; c < p.classes; c += kThreads) {
    s += to_acc(static_cast<const T*>(p.weight)[c]);
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) *static_cast<acc_t*>(out) = static_cast<acc_t>(s);
}

// ---------------------------------------------------------------------------------------------
// Class-contiguous rows: TPR threads per row (a warp, or the whole block), kThreads / TPR rows per
// block. A row too long for the few rows there are to fill the GPU is split into chunks of
// classes across blocks: forward_split_kernel keeps each chunk's statistics and
// forward_combine_kernel merges them in chunk order; the backward needs no merging, each block
// writes its chunk of the gradient.

template <typename T, int M, bool HasW, int TPR>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_rows_kernel(const CrossEntropyParams p, bool vector, double* partial,
                        unsigned int* done) {
  using acc_t = typename AccOf<T>::type;
  constexpr int RPB = kThreads / TPR;
  __shared__ acc_t sh_m[kThreads / 32], sh_s[kThreads / 32], sh_a[kThreads / 32],
      sh_q[kThreads / 32];
  __shared__ double row_l[RPB], row_w[RPB];
  const int64_t rows = p.outer * p.inner;
  const int group = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * RPB + group;
  const Smoothing<acc_t> smooth(p);
  double my_l = 0, my_w = 0;
  // every thread of a group takes part in the group's shuffles, valid row or not
  const bool valid = r < rows;
  int64_t y = -1;
  if (valid && M != kProb) y = target_of(p, r);
  const bool active = valid && (M == kProb || y >= 0);
  const int64_t off = valid ? row_offset<T>(p, r) : 0;
  const T* x = static_cast<const T*>(p.input) + off;
  const T* t = M == kProb ? static_cast<const T*>(p.target) + off : nullptr;
  Lse<acc_t> l;
  Sums<acc_t> sm;
  const acc_t ref = active ? shift_of(to_acc(x[0])) : acc_t(0);
  if (active) {
    for_range<T, TPR, M == kProb>(x, t, 0, p.classes, p.stride_class, lane, vector,
                                  [&](int64_t c0, const acc_t* xv, const acc_t* tv, int n) {
      accumulate<T, M, HasW>(p, l, sm, ref, smooth, c0, xv, tv, n);
    });
  }
  group_reduce<acc_t, TPR>(l, sm, sh_m, sh_s, sh_a, sh_q);
  if (lane == 0 && valid) {
    const acc_t xy = active && M != kProb ? to_acc(x[y * p.stride_class]) : acc_t(0);
    finish_row<T, M, HasW>(p, r, y, active, l, sm, ref, xy, my_l, my_w);
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

// Chunk blockIdx.x (of chunk_len classes) of row blockIdx.y: its (m, s, a, q) into
// state[(row * chunks + chunk) * 4 ...].
template <typename T, int M, bool HasW>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_split_kernel(const CrossEntropyParams p, bool vector, int64_t chunk_len,
                         typename AccOf<T>::type* state) {
  using acc_t = typename AccOf<T>::type;
  __shared__ acc_t sh_m[kThreads / 32], sh_s[kThreads / 32], sh_a[kThreads / 32],
      sh_q[kThreads / 32];
  const int64_t r = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_len;
  const int64_t end = begin + chunk_len < p.classes ? begin + chunk_len : p.classes;
  const Smoothing<acc_t> smooth(p);
  const bool active = M == kProb || target_of(p, r) >= 0;
  const int64_t off = row_offset<T>(p, r);
  const T* x = static_cast<const T*>(p.input) + off;
  const T* t = M == kProb ? static_cast<const T*>(p.target) + off : nullptr;
  Lse<acc_t> l;
  Sums<acc_t> sm;
  if (active) {
    const acc_t ref = shift_of(to_acc(x[0]));
    for_range<T, kThreads, M == kProb>(x, t, begin, end, p.stride_class, threadIdx.x, vector,
                                       [&](int64_t c0, const acc_t* xv, const acc_t* tv, int n) {
      accumulate<T, M, HasW>(p, l, sm, ref, smooth, c0, xv, tv, n);
    });
  }
  group_reduce<acc_t, kThreads>(l, sm, sh_m, sh_s, sh_a, sh_q);
  if (threadIdx.x == 0) {
    acc_t* st = state + 4 * (r * gridDim.x + blockIdx.x);
    st[0] = l.m;
    st[1] = l.s;
    st[2] = sm.a;
    st[3] = sm.q;
  }
}

// One thread per row: merges the row's chunk statistics in chunk order, then finishes the row and
// the reduction.
template <typename T, int M, bool HasW>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_combine_kernel(const CrossEntropyParams p, int64_t chunks,
                           const typename AccOf<T>::type* state, double* partial,
                           unsigned int* done) {
  using acc_t = typename AccOf<T>::type;
  const int64_t rows = p.outer * p.inner;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  double my_l = 0, my_w = 0;
  if (r < rows) {
    const int64_t y = M == kProb ? -1 : target_of(p, r);
    const bool active = M == kProb || y >= 0;
    Lse<acc_t> l;
    Sums<acc_t> sm;
    for (int64_t k = 0; k < chunks; ++k) {
      const acc_t* st = state + 4 * (r * chunks + k);
      l.merge(st[0], st[1]);
      sm.a += st[2];
      sm.q += st[3];
    }
    const T* x = static_cast<const T*>(p.input) + row_offset<T>(p, r);
    const acc_t ref = active ? shift_of(to_acc(x[0])) : acc_t(0);
    const acc_t xy = active && M != kProb ? to_acc(x[y * p.stride_class]) : acc_t(0);
    finish_row<T, M, HasW>(p, r, y, active, l, sm, ref, xy, my_l, my_w);
  }
  if (p.reduction == Reduction::None) return;
  finish_forward<T>(p, my_l, my_w, partial, done);
}

// Row blockIdx.x * RPB + group, classes [blockIdx.y * chunk_len, + chunk_len) of it.
template <typename T, int M, bool HasW, int TPR>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
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
  const T* t = M == kProb ? static_cast<const T*>(p.target) + off : nullptr;
  T* gx = static_cast<T*>(p.grad_input) + off;
  const Coef<acc_t> c = row_coef<T, M, HasW>(p, r, weight_sum<T, M, HasW>(p, w_sum));
  for_range<T, TPR, M == kProb>(x, t, begin, end, p.stride_class, lane, vector,
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

// ---------------------------------------------------------------------------------------------
// Lanes along the contiguous spatial axis of (N, C, d...): each thread takes P consecutive rows
// (positions), so class c of neighbouring rows is read at neighbouring addresses, P of them in
// one load when P > 1 (the glue's strides and pointers allow it: see lanes_of).

template <typename T, int P>
struct alignas(sizeof(T) * P) Lanes {
  T v[P];
};

// Calls f(c, xl, tl) for every class c of the P rows at x (t), loading kUnroll classes before
// using the first.
template <typename T, int P, bool WithT, typename F>
__device__ __forceinline__ void for_lanes(const T* x, const T* t, int64_t classes, int64_t stride,
                                          F&& f) {
  const auto* px = reinterpret_cast<const Lanes<T, P>*>(x);
  const auto* pt = reinterpret_cast<const Lanes<T, P>*>(WithT ? t : x);
  const int64_t s = stride / P;
  int64_t c = 0;
  for (; c + kUnroll <= classes; c += kUnroll) {
    Lanes<T, P> bx[kUnroll], bt[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      bx[u] = px[(c + u) * s];
      if constexpr (WithT) bt[u] = pt[(c + u) * s];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) f(c + u, bx[u], bt[u]);
  }
  for (; c < classes; ++c) {
    Lanes<T, P> bt{};
    if constexpr (WithT) bt = pt[c * s];
    f(c, px[c * s], bt);
  }
}

template <typename T, int M, bool HasW, int P>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_lanes_kernel(const CrossEntropyParams p, double* partial, unsigned int* done) {
  using acc_t = typename AccOf<T>::type;
  const int64_t groups = p.outer * p.inner / P;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const Smoothing<acc_t> smooth(p);
  double my_l = 0, my_w = 0;
  if (g < groups) {
    const int64_t r0 = g * P;
    const int64_t off = row_offset<T>(p, r0);
    const T* x = static_cast<const T*>(p.input) + off;
    const T* t = M == kProb ? static_cast<const T*>(p.target) + off : nullptr;
    acc_t ref[P];
    Lse<acc_t> l[P];
    Sums<acc_t> sm[P];
    {
      const Lanes<T, P> x0 = *reinterpret_cast<const Lanes<T, P>*>(x);
#pragma unroll
      for (int k = 0; k < P; ++k) ref[k] = shift_of(to_acc(x0.v[k]));
    }
    for_lanes<T, P, M == kProb>(x, t, p.classes, p.stride_class,
                                [&](int64_t c, const Lanes<T, P>& xl, const Lanes<T, P>& tl) {
#pragma unroll
      for (int k = 0; k < P; ++k) {
        const acc_t xk = to_acc(xl.v[k]);
        l[k].add_max(xk);
        l[k].add(xk);
        sm[k].template add<T, M, HasW>(p, c, xk, M == kProb ? to_acc(tl.v[k]) : acc_t(0), ref[k],
                                       smooth);
      }
    });
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t y = M == kProb ? -1 : target_of(p, r0 + k);
      const bool active = M == kProb || y >= 0;
      const acc_t xy = active && M != kProb ? to_acc(x[y * p.stride_class + k]) : acc_t(0);
      finish_row<T, M, HasW>(p, r0 + k, y, active, l[k], sm[k], ref[k], xy, my_l, my_w);
    }
  }
  if (p.reduction == Reduction::None) return;
  finish_forward<T>(p, my_l, my_w, partial, done);
}

template <typename T, int M, bool HasW, int P>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    backward_lanes_kernel(const CrossEntropyParams p, const void* w_sum) {
  using acc_t = typename AccOf<T>::type;
  const int64_t groups = p.outer * p.inner / P;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= groups) return;
  const Smoothing<acc_t> smooth(p);
  const int64_t r0 = g * P;
  const int64_t off = row_offset<T>(p, r0);
  const T* x = static_cast<const T*>(p.input) + off;
  const T* t = M == kProb ? static_cast<const T*>(p.target) + off : nullptr;
  auto* gx = reinterpret_cast<Lanes<T, P>*>(static_cast<T*>(p.grad_input) + off);
  const acc_t ws = weight_sum<T, M, HasW>(p, w_sum);
  Coef<acc_t> c[P];
#pragma unroll
  for (int k = 0; k < P; ++k) c[k] = row_coef<T, M, HasW>(p, r0 + k, ws);
  const int64_t s = p.stride_class / P;
  for_lanes<T, P, M == kProb>(x, t, p.classes, p.stride_class,
                              [&](int64_t cls, const Lanes<T, P>& xl, const Lanes<T, P>& tl) {
    Lanes<T, P> out;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      out.v[k] = from_acc<T>(grad_element<T, M, HasW>(
          p, c[k], cls, to_acc(xl.v[k]), M == kProb ? to_acc(tl.v[k]) : acc_t(0), smooth));
    }
    gx[cls * s] = out;
  });
}

// Gradient of probability targets: dt_k = -(1 - s) w_k (x_k - lse) g, one thread per element.
template <typename T, bool HasW>
__global__ void __launch_bounds__(kThreads, kMinBlocks) target_backward_kernel(const CrossEntropyParams p) {
  using acc_t = typename AccOf<T>::type;
  const int64_t rows = p.outer * p.inner;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= rows * p.classes) return;
  const int64_t r = e / p.classes, k = e - r * p.classes;
  acc_t g;
  if (p.reduction == Reduction::None) {
    g = to_acc(static_cast<const T*>(p.grad_loss)[r]);
  } else {
    g = to_acc(*static_cast<const T*>(p.grad_loss));
    if (p.reduction == Reduction::Mean) g /= static_cast<acc_t>(rows);
  }
  const Smoothing<acc_t> smooth(p);
  const int64_t at = row_offset<T>(p, r) + k * p.stride_class;
  const acc_t wk = HasW ? to_acc(static_cast<const T*>(p.weight)[k]) : acc_t(1);
  const acc_t lse = static_cast<const acc_t*>(p.lse)[r];
  static_cast<T*>(p.grad_target)[at] = from_acc<T>(
      -smooth.t_scale * wk * (to_acc(static_cast<const T*>(p.input)[at]) - lse) * g);
}

// ---------------------------------------------------------------------------------------------
// Launch.

template <typename F>
cudaError_t dispatch_mode(const CrossEntropyParams& p, F&& f) {
  auto with_w = [&](auto mode) -> cudaError_t {
    if (p.weight != nullptr) return f(mode, std::true_type{});
    return f(mode, std::false_type{});
  };
  if (p.prob_target) return with_w(std::integral_constant<int, kProb>{});
  if (p.label_smoothing > 0) return with_w(std::integral_constant<int, kSmooth>{});
  return with_w(std::integral_constant<int, kPlain>{});
}

// Rows of up to this many classes get a warp each; longer rows a block.
constexpr int64_t kWarpRowClasses = 1024;
// A split row's chunks hold at least this many classes, a multiple of kChunkAlign.
constexpr int64_t kMinChunk = 4096, kChunkAlign = 256;

bool aligned_alike(const void* a, const void* b) {
  return b == nullptr ||
         reinterpret_cast<uintptr_t>(a) % 16 == reinterpret_cast<uintptr_t>(b) % 16;
}

bool aligned16(const void* a) { return a == nullptr || reinterpret_cast<uintptr_t>(a) % 16 == 0; }

// The current device's SM count. cudaDeviceGetAttribute is a cheap lookup (no synchronization),
// and asking on every plan lets the emulator's SM count change between launches.
int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    return 1;  // no split; the launch reports the error
  }
  return sms;
}

// How a launch covers the rows, the same for the forward, its workspace and the backward.
struct Plan {
  enum Kind { kWarpRows, kBlockRows, kSplitRows, kLanes } kind;
  int64_t chunks = 1, chunk_len = 0;  // kSplitRows: chunks of chunk_len classes per row
  int lanes = 1;                      // kLanes: rows per thread (1, or a 16-byte vector's worth)
  unsigned int blocks = 1;            // of the kernel that finishes the forward's reduction
};

template <typename T>
Plan plan_of(const CrossEntropyParams& p) {
  const int64_t rows = p.outer * p.inner;
  Plan plan{};
  auto blocks = [](int64_t threads) {
    const int64_t b = (threads + kThreads - 1) / kThreads;
    return static_cast<unsigned int>(b > 0 ? b : 1);
  };
  if (p.stride_class != 1) {
    // a vector of P positions per thread needs every lane group to start 16-byte aligned
    constexpr int V = Pack<T>::kSize;
    const int64_t e = sizeof(T);
    const bool vec = p.stride_inner == 1 && p.inner % V == 0 && p.stride_outer * e % 16 == 0 &&
                     p.stride_class * e % 16 == 0 && aligned16(p.input) &&
                     aligned16(p.prob_target ? p.target : nullptr) && aligned16(p.grad_input);
    plan.kind = Plan::kLanes;
    plan.lanes = vec ? V : 1;
    plan.blocks = blocks(rows / plan.lanes);
    return plan;
  }
  if (p.classes <= kWarpRowClasses) {
    plan.kind = Plan::kWarpRows;
    plan.blocks = blocks(rows * 32);
    return plan;
  }
  plan.kind = Plan::kBlockRows;
  plan.blocks = static_cast<unsigned int>(rows > 0 ? rows : 1);
  const int64_t sms = sm_count();
  if (rows > 0 && rows < 2 * sms && p.classes >= 2 * kMinChunk) {
    // about four blocks per SM in all, each over at least kMinChunk classes
    int64_t chunks = (4 * sms + rows - 1) / rows;
    if (chunks > p.classes / kMinChunk) chunks = p.classes / kMinChunk;
    int64_t len = (p.classes + chunks - 1) / chunks;
    len = (len + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
    plan.kind = Plan::kSplitRows;
    plan.chunk_len = len;
    plan.chunks = (p.classes + len - 1) / len;
    plan.blocks = blocks(rows);
  }
  return plan;
}

// The forward's workspace: per-block (loss, divisor) partials and the done-counter when the loss
// is reduced, then a split row's chunk statistics.
struct Workspace {
  size_t partial_bytes = 0, state_bytes = 0;
  size_t bytes() const { return partial_bytes + state_bytes; }
};

template <typename T>
Workspace workspace_of(const CrossEntropyParams& p, const Plan& plan) {
  Workspace w;
  if (p.reduction != Reduction::None) w.partial_bytes = size_t(plan.blocks) * 2 * sizeof(double) + 16;
  if (plan.kind == Plan::kSplitRows) {
    w.state_bytes = size_t(p.outer * p.inner * plan.chunks) * 4 * sizeof(typename AccOf<T>::type);
  }
  return w;
}

template <typename T, int M, bool W>
void launch_forward(const CrossEntropyParams& p, const Plan& plan, bool vector, double* partial,
                    unsigned int* done, void* state, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  const int64_t rows = p.outer * p.inner;
  switch (plan.kind) {
    case Plan::kLanes:
      if (plan.lanes > 1) {
        launch<forward_lanes_kernel<T, M, W, Pack<T>::kSize>>(plan.blocks, kThreads, stream, p, partial, done);
      } else {
        launch<forward_lanes_kernel<T, M, W, 1>>(plan.blocks, kThreads, stream, p, partial, done);
      }
      break;
    case Plan::kWarpRows:
      launch<forward_rows_kernel<T, M, W, 32>>(plan.blocks, kThreads, stream, p, vector, partial, done);
      break;
    case Plan::kBlockRows:
      launch<forward_rows_kernel<T, M, W, kThreads>>(plan.blocks, kThreads, stream, p, vector, partial, done);
      break;
    case Plan::kSplitRows: {
      auto* st = static_cast<acc_t*>(state);
      const dim3 grid(static_cast<unsigned int>(plan.chunks), static_cast<unsigned int>(rows));
      launch<forward_split_kernel<T, M, W>>(grid, kThreads, stream, p, vector, plan.chunk_len, st);
      launch<forward_combine_kernel<T, M, W>>(plan.blocks, kThreads, stream, p, plan.chunks, st, partial, done);
      break;
    }
  }
}

}  // namespace

size_t cross_entropy_forward_workspace(const CrossEntropyParams& p) {
  size_t bytes = 0;
  dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    bytes = workspace_of<T>(p, plan_of<T>(p)).bytes();
    return cudaSuccess;
  });
  return bytes;
}

cudaError_t cross_entropy_forward(const CrossEntropyParams& p, void* workspace,
                                  cudaStream_t stream) {
  const int64_t rows = p.outer * p.inner;
  if (rows == 0 && p.reduction == Reduction::None) return cudaSuccess;
  // 16-byte loads along class-contiguous rows: the logits and the targets read with them
  // equally aligned (each row then starts with the same few elements before a boundary)
  const bool vector = aligned_alike(p.input, p.prob_target ? p.target : nullptr);
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const Plan plan = plan_of<T>(p);
    const Workspace ws = workspace_of<T>(p, plan);
    auto* partial = static_cast<double*>(workspace);
    unsigned int* done = nullptr;
    if (p.reduction != Reduction::None) {
      done = reinterpret_cast<unsigned int*>(partial + 2 * size_t(plan.blocks));
      const cudaError_t err = cudaMemsetAsync(done, 0, sizeof(unsigned int), stream);
      if (err != cudaSuccess) return err;
    }
    void* state = static_cast<char*>(workspace) + ws.partial_bytes;
    return dispatch_mode(p, [&](auto mode, auto has_w) -> cudaError_t {
      launch_forward<T, decltype(mode)::value, decltype(has_w)::value>(p, plan, vector, partial,
                                                                         done, state, stream);
      return cudaGetLastError();
    });
  });
}

size_t cross_entropy_backward_workspace(const CrossEntropyParams& p) {
  // the sum of the class weights, for label smoothing with weights
  const bool smooth_w = !p.prob_target && p.label_smoothing > 0 && p.weight != nullptr;
  return smooth_w ? 16 : 0;
}

cudaError_t cross_entropy_backward(const CrossEntropyParams& p, void* workspace,
                                   cudaStream_t stream) {
  const int64_t rows = p.outer * p.inner;
  if (rows == 0 || p.classes == 0) return cudaSuccess;
  const bool vector = aligned_alike(p.input, p.grad_input) &&
                      aligned_alike(p.input, p.prob_target ? p.target : nullptr);
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const Plan plan = plan_of<T>(p);
    if (cross_entropy_backward_workspace(p) > 0) {
      launch<weight_sum_kernel<T>>(1, kThreads, stream, p, workspace);
    }
    return dispatch_mode(p, [&](auto mode, auto has_w) -> cudaError_t {
      constexpr int M = decltype(mode)::value;
      constexpr bool W = decltype(has_w)::value;
      switch (plan.kind) {
        case Plan::kLanes:
          if (plan.lanes > 1) {
            launch<backward_lanes_kernel<T, M, W, Pack<T>::kSize>>(plan.blocks, kThreads, stream, p, workspace);
          } else {
            launch<backward_lanes_kernel<T, M, W, 1>>(plan.blocks, kThreads, stream, p, workspace);
          }
          break;
        case Plan::kWarpRows:
          launch<backward_rows_kernel<T, M, W, 32>>(plan.blocks, kThreads, stream, p, vector, p.classes, workspace);
          break;
        case Plan::kBlockRows:
        case Plan::kSplitRows: {
          const int64_t len = plan.kind == Plan::kSplitRows ? plan.chunk_len : p.classes;
          const dim3 grid(static_cast<unsigned int>(rows), static_cast<unsigned int>(plan.chunks));
          launch<backward_rows_kernel<T, M, W, kThreads>>(grid, kThreads, stream, p, vector, len, workspace);
          break;
        }
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t cross_entropy_target_backward(const CrossEntropyParams& p, cudaStream_t stream) {
  const int64_t n = p.outer * p.inner * p.classes;
  if (n == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned int>((n + kThreads - 1) / kThreads);
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (p.weight != nullptr) {
      launch<target_backward_kernel<T, true>>(blocks, kThreads, stream, p);
    } else {
      launch<target_backward_kernel<T, false>>(blocks, kThreads, stream, p);
    }
    return cudaGetLastError();
  });
}

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
