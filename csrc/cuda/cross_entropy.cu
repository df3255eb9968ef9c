// CUDA kernels of the fused cross-entropy. Math as in ../cpu/cross_entropy_kernel.h, per row r
// with logits x, class weights w (1 when absent), C classes, smoothing s, W = sum_c w_c:
//   lse = log sum_c exp(x_c)                                    (saved, acc precision)
//   index target y:  loss = (1 - s) w_y (lse - x_y) + (s / C) sum_c w_c (lse - x_c)
//                    dx_k = (1 - s) w_y (p_k - [k == y]) + (s / C) (W p_k - w_k)
//   probabilities t, t' = (1 - s) t + s / C, S = sum_c w_c t'_c:
//                    loss = S lse - sum_c w_c t'_c x_c,  dx_k = S p_k - w_k t'_k,
//                    dt_k = -(1 - s) w_k (x_k - lse)
// Weighted sums of x are taken relative to ref = the row's first logit, so a large common offset
// does not cancel. Layouts (the glue guarantees one): class-contiguous rows, a group of TPR threads
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

namespace weighted_loss::cuda {
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
      s = (m == -INFINITY) ? acc_t(0) : s * fast_exp(m - mv);
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
    s = (m == -INFINITY ? acc_t(0) : s * fast_exp(m - mm)) +
        (m2 == -INFINITY ? acc_t(0) : s2 * fast_exp(m2 - mm));
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

// Calls f(c, x_c[, t_c]) for the classes of the row this thread covers: lane `lane` of TPR,
// 16-byte vectors when the row is class-contiguous and aligned.
template <typename T, int TPR, bool WithT, typename F>
__device__ __forceinline__ void for_row(const T* x, const T* t, int64_t C, int64_t stride,
                                        int lane, bool vector, F&& f) {
  using acc_t = typename AccOf<T>::type;
  constexpr int V = Pack<T>::kSize;
  if (vector) {
    const int64_t nv = C / V;
    for (int64_t v = lane; v < nv; v += TPR) {
      const Pack<T> px = reinterpret_cast<const Pack<T>*>(x)[v];
      Pack<T> pt;
      if constexpr (WithT) pt = reinterpret_cast<const Pack<T>*>(t)[v];
      acc_t xv[V], tv[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        xv[k] = to_acc(px.v[k]);
        tv[k] = WithT ? to_acc(pt.v[k]) : acc_t(0);
      }
      f(v * V, xv, tv, V);
    }
    for (int64_t c = nv * V + lane; c < C; c += TPR) {
      acc_t xv[V] = {}, tv[V] = {};
      xv[0] = to_acc(x[c]);
      if constexpr (WithT) tv[0] = to_acc(t[c]);
      f(c, xv, tv, 1);
    }
  } else {
    for (int64_t c = lane; c < C; c += TPR) {
      acc_t xv[V] = {}, tv[V] = {};
      xv[0] = to_acc(x[c * stride]);
      if constexpr (WithT) tv[0] = to_acc(t[c * stride]);
      f(c, xv, tv, 1);
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

// Writes row r's forward results (lse, tsum; the loss itself for Reduction::None) and returns its
// (loss, divisor) share of a reduced loss.
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
    my_l = loss;
    my_w = wy;
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

// ---------------------------------------------------------------------------------------------
// Class-contiguous rows: TPR threads per row, kThreads / TPR rows per block.

template <typename T, int M, bool HasW, int TPR>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_rows_kernel(const CrossEntropyParams p, bool aligned, double* partial,
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
  const acc_t ref = active ? to_acc(x[0]) : acc_t(0);
  if (active) {
    const bool vector = aligned && p.stride_class == 1 &&
                        reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                        (M != kProb || reinterpret_cast<uintptr_t>(t) % 16 == 0);
    constexpr int V = Pack<T>::kSize;
    for_row<T, TPR, M == kProb>(x, t, p.classes, p.stride_class, lane, vector,
                                [&](int64_t c0, const acc_t* xv, const acc_t* tv, int n) {
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
    });
  }
  group_reduce<acc_t, TPR>(l, sm, sh_m, sh_s, sh_a, sh_q);
  if (lane == 0 && valid) {
    acc_t lse = 0, loss = 0, wy = 0;
    if (active) {
      lse = l.value();
      const acc_t xy = M == kProb ? acc_t(0) : to_acc(x[y * p.stride_class]);
      loss = row_loss<T, M, HasW>(p, y, lse, ref, sm, xy, wy);
    }
    store_row<T, M>(p, r, lse, loss, wy, sm.q, my_l, my_w);
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
  finish_forward<T>(p, threadIdx.x == 0 ? bl : 0.0, threadIdx.x == 0 ? bw : 0.0, partial, done);
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

// Sum of the class weights (C without weight), which the smoothing gradient needs, computed by
// every block from the cached weight (C reads against the row's C logits).
template <typename T, bool HasW>
__device__ __forceinline__ typename AccOf<T>::type weight_sum(const CrossEntropyParams& p,
                                                              double* shared) {
  using acc_t = typename AccOf<T>::type;
  if constexpr (!HasW) {
    return static_cast<acc_t>(p.classes);
  } else {
    __shared__ acc_t total;
    double s = 0;
    for (int64_t c = threadIdx.x; c < p.classes; c += kThreads) {
      s += to_acc(static_cast<const T*>(p.weight)[c]);
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0) total = static_cast<acc_t>(s);
    __syncthreads();
    return total;
  }
}

template <typename T, int M, bool HasW, int TPR>
__global__ void __launch_bounds__(kThreads, kMinBlocks) backward_rows_kernel(const CrossEntropyParams p,
                                                                 bool aligned) {
  using acc_t = typename AccOf<T>::type;
  constexpr int RPB = kThreads / TPR;
  constexpr int V = Pack<T>::kSize;
  __shared__ double shared[kThreads / 32];
  const acc_t w_sum = M == kSmooth ? weight_sum<T, HasW>(p, shared) : acc_t(0);
  const int64_t rows = p.outer * p.inner;
  const int group = threadIdx.x / TPR, lane = threadIdx.x % TPR;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * RPB + group;
  if (r >= rows) return;
  const Smoothing<acc_t> smooth(p);
  const int64_t off = row_offset<T>(p, r);
  const T* x = static_cast<const T*>(p.input) + off;
  const T* t = M == kProb ? static_cast<const T*>(p.target) + off : nullptr;
  T* gx = static_cast<T*>(p.grad_input) + off;
  const Coef<acc_t> c = row_coef<T, M, HasW>(p, r, w_sum);
  const bool vector = aligned && p.stride_class == 1 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(gx) % 16 == 0 &&
                      (M != kProb || reinterpret_cast<uintptr_t>(t) % 16 == 0);
  for_row<T, TPR, M == kProb>(x, t, p.classes, p.stride_class, lane, vector,
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
// Lanes along the contiguous spatial axis of (N, C, d...): one thread per row, reading class c
// of neighbouring rows at neighbouring addresses.

template <typename T, int M, bool HasW>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_lanes_kernel(const CrossEntropyParams p, double* partial, unsigned int* done) {
  using acc_t = typename AccOf<T>::type;
  const int64_t rows = p.outer * p.inner;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const Smoothing<acc_t> smooth(p);
  double my_l = 0, my_w = 0;
  if (r < rows) {
    int64_t y = -1;
    if (M != kProb) y = target_of(p, r);
    const int64_t off = row_offset<T>(p, r);
    const T* x = static_cast<const T*>(p.input) + off;
    const T* t = M == kProb ? static_cast<const T*>(p.target) + off : nullptr;
    acc_t lse = 0, loss = 0, wy = 0;
    Sums<acc_t> sm;
    if (M == kProb || y >= 0) {
      const acc_t ref = to_acc(x[0]);
      Lse<acc_t> l;
      for (int64_t c = 0; c < p.classes; ++c) {
        const acc_t xc = to_acc(x[c * p.stride_class]);
        l.add_max(xc);
        l.add(xc);
        const acc_t tc = M == kProb ? to_acc(t[c * p.stride_class]) : acc_t(0);
        sm.template add<T, M, HasW>(p, c, xc, tc, ref, smooth);
      }
      lse = l.value();
      const acc_t xy = M == kProb ? acc_t(0) : to_acc(x[y * p.stride_class]);
      loss = row_loss<T, M, HasW>(p, y, lse, ref, sm, xy, wy);
    }
    store_row<T, M>(p, r, lse, loss, wy, sm.q, my_l, my_w);
  }
  if (p.reduction == Reduction::None) return;
  finish_forward<T>(p, my_l, my_w, partial, done);
}

template <typename T, int M, bool HasW>
__global__ void __launch_bounds__(kThreads, kMinBlocks) backward_lanes_kernel(const CrossEntropyParams p) {
  using acc_t = typename AccOf<T>::type;
  __shared__ double shared[kThreads / 32];
  const acc_t w_sum = M == kSmooth ? weight_sum<T, HasW>(p, shared) : acc_t(0);
  const int64_t rows = p.outer * p.inner;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= rows) return;
  const Smoothing<acc_t> smooth(p);
  const int64_t off = row_offset<T>(p, r);
  const T* x = static_cast<const T*>(p.input) + off;
  const T* t = M == kProb ? static_cast<const T*>(p.target) + off : nullptr;
  T* gx = static_cast<T*>(p.grad_input) + off;
  const Coef<acc_t> c = row_coef<T, M, HasW>(p, r, w_sum);
  for (int64_t k = 0; k < p.classes; ++k) {
    const acc_t tk = M == kProb ? to_acc(t[k * p.stride_class]) : acc_t(0);
    gx[k * p.stride_class] = from_acc<T>(
        grad_element<T, M, HasW>(p, c, k, to_acc(x[k * p.stride_class]), tk, smooth));
  }
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

bool rows_layout(const CrossEntropyParams& p) { return p.stride_class == 1; }

template <typename T>
unsigned int row_blocks(const CrossEntropyParams& p, int tpr) {
  const int64_t rows = p.outer * p.inner, rpb = kThreads / tpr;
  const int64_t b = (rows + rpb - 1) / rpb;
  return static_cast<unsigned int>(b > 0 ? b : 1);
}

unsigned int lane_blocks(const CrossEntropyParams& p) {
  const int64_t rows = p.outer * p.inner;
  const int64_t b = (rows + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b > 0 ? b : 1);
}

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

int64_t forward_blocks(const CrossEntropyParams& p) {
  if (!rows_layout(p)) return lane_blocks(p);
  return row_blocks<float>(p, p.classes <= kWarpRowClasses ? 32 : kThreads);
}

}  // namespace

size_t cross_entropy_forward_workspace(const CrossEntropyParams& p) {
  return static_cast<size_t>(forward_blocks(p)) * 2 * sizeof(double) + 16;
}

cudaError_t cross_entropy_forward(const CrossEntropyParams& p, void* workspace,
                                  cudaStream_t stream) {
  const int64_t rows = p.outer * p.inner;
  if (rows == 0 && p.reduction == Reduction::None) return cudaSuccess;
  auto* partial = static_cast<double*>(workspace);
  unsigned int* done = nullptr;
  if (p.reduction != Reduction::None) {
    done = reinterpret_cast<unsigned int*>(partial + 2 * forward_blocks(p));
    const cudaError_t err = cudaMemsetAsync(done, 0, sizeof(unsigned int), stream);
    if (err != cudaSuccess) return err;
  }
  const bool aligned = reinterpret_cast<uintptr_t>(p.input) % 16 == 0 &&
                       (!p.prob_target || reinterpret_cast<uintptr_t>(p.target) % 16 == 0);
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return dispatch_mode(p, [&](auto mode, auto has_w) -> cudaError_t {
      constexpr int M = decltype(mode)::value;
      constexpr bool W = decltype(has_w)::value;
      if (!rows_layout(p)) {
        forward_lanes_kernel<T, M, W><<<lane_blocks(p), kThreads, 0, stream>>>(p, partial, done);
      } else if (p.classes <= kWarpRowClasses) {
        forward_rows_kernel<T, M, W, 32>
            <<<row_blocks<T>(p, 32), kThreads, 0, stream>>>(p, aligned, partial, done);
      } else {
        forward_rows_kernel<T, M, W, kThreads>
            <<<row_blocks<T>(p, kThreads), kThreads, 0, stream>>>(p, aligned, partial, done);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t cross_entropy_backward(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.outer * p.inner == 0 || p.classes == 0) return cudaSuccess;
  const bool aligned = reinterpret_cast<uintptr_t>(p.input) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.grad_input) % 16 == 0 &&
                       (!p.prob_target || reinterpret_cast<uintptr_t>(p.target) % 16 == 0);
  return dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    return dispatch_mode(p, [&](auto mode, auto has_w) -> cudaError_t {
      constexpr int M = decltype(mode)::value;
      constexpr bool W = decltype(has_w)::value;
      if (!rows_layout(p)) {
        backward_lanes_kernel<T, M, W><<<lane_blocks(p), kThreads, 0, stream>>>(p);
      } else if (p.classes <= kWarpRowClasses) {
        backward_rows_kernel<T, M, W, 32><<<row_blocks<T>(p, 32), kThreads, 0, stream>>>(p, aligned);
      } else {
        backward_rows_kernel<T, M, W, kThreads>
            <<<row_blocks<T>(p, kThreads), kThreads, 0, stream>>>(p, aligned);
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
      target_backward_kernel<T, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      target_backward_kernel<T, false><<<blocks, kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace weighted_loss::cuda
