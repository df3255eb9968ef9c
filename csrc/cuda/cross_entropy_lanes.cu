// CUDA cross-entropy over (N, C, d...) read in place: lanes along the contiguous spatial axis,
// each thread taking P consecutive rows (positions), so class c of neighbouring rows is read at
// neighbouring addresses, P of them in one load when P > 1 (the plan allows it when d is a
// multiple of the 16-byte vector and the pointers and strides are aligned).
#include "cross_entropy_launch.cuh"
#include "cross_entropy_range.cuh"
#include "cross_entropy_reduce.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

template <typename T, int P>
struct alignas(sizeof(T) * P) Lanes {
  T v[P];
};

// a += v compensated (Kahan; no fast-math here, so it is kept as written): c holds the low part
// lost so far, and a - c is the sum within a few ulp however many terms a thread adds; an
// infinite sum (a -inf logit's term) stays infinite.
template <typename acc_t>
__device__ __forceinline__ void kahan_add(acc_t& a, acc_t& c, acc_t v) {
  const acc_t y = v - c;
  const acc_t t = a + y;
  c = t - t == acc_t(0) ? (t - a) - y : acc_t(0);  // inf - inf would make every later sum NaN
  a = t;
}

// A lane's sums over its row: a thread adds every class in sequence (the row kernels' threads
// add a few each and reduce in a tree), so with K they are compensated: a plain float sum over
// 1,000 classes cost the loss and its gradient 7-10x PyTorch's error. The exp sum as Lse's
// (rescaled as the max rises, its compensation with it); a and q as Sums'.
template <typename acc_t, bool K>
struct LaneSums {
  acc_t m = -INFINITY, s = 0, cs = 0, a = 0, ca = 0, q = 0, cq = 0;
  __device__ __forceinline__ void add(acc_t x) {  // Lse's add_max, then add
    if (x > m) {
      if (m != -INFINITY) {
        const acc_t f = fast_exp(m - x);
        s *= f;
        if constexpr (K) cs *= f;
      }
      m = x;
    }
    if (m != -INFINITY) {
      if constexpr (K) {
        kahan_add(s, cs, fast_exp(x - m));
      } else {
        s += fast_exp(x - m);
      }
    } else if (x != x) {
      s = x;  // NaN in an all -inf row
    }
  }
  __device__ __forceinline__ void add_term(acc_t ta, acc_t tw, acc_t x,  // Sums::add_term
                                          acc_t ref) {
    const acc_t d = x - ref;
    if constexpr (K) {
      // d's rounding error e too (TwoSum: x - ref = d + e exactly). The loss is q (lse - ref) - a
      // with lse - ref exact in double; with mixed-sign weights the two cancel to a loss far
      // below either, and a rounded d left tw's share of 0.5 ulp(d) in it (PyTorch's
      // 4d_prob_target_weights samples: 2.9x its error). A -inf logit's e is 0, d stays -inf.
      const acc_t nr = -ref, back = d - x, e = (x - (d - back)) + (nr - back);
      kahan_add(a, ca, ta * d);
      if (e - e == acc_t(0)) ca -= ta * e;  // (the sum is a - ca)
    } else {
      a += ta * d;
    }
    add_q(tw);
  }
  __device__ __forceinline__ void add_a(acc_t v) {
    if constexpr (K) {
      kahan_add(a, ca, v);
    } else {
      a += v;
    }
  }
  __device__ __forceinline__ void add_q(acc_t v) {
    if constexpr (K) {
      kahan_add(q, cq, v);
    } else {
      q += v;
    }
  }
  __device__ __forceinline__ Lse<acc_t> lse() const {
    Lse<acc_t> l;
    l.m = m;
    l.s = K ? s - cs : s;
    return l;
  }
  __device__ __forceinline__ Sums<double> sums() const {
    if constexpr (!K) return {a, q};
    return {static_cast<double>(a) - static_cast<double>(ca),
            static_cast<double>(q) - static_cast<double>(cq)};
  }
};

// Calls f(c, xl, tl) for every class c of the P rows at x (t, stored as U: T, or float beside
// 16-bit logits), loading kUnroll classes before using the first.
template <typename T, typename U, int P, bool WithT, typename F>
__device__ __forceinline__ void for_lanes(const T* x, const U* t, int64_t classes, int64_t stride,
                                          F&& f) {
  const auto* px = vector_ptr<Lanes<T, P>>(x);
  const auto* pt = WithT ? vector_ptr<Lanes<U, P>>(t) : nullptr;
  const int64_t s = stride / P;
  // float targets beside 16-bit logits take twice the registers: half as many classes in flight
  constexpr int kU = WithT && sizeof(U) > sizeof(T) ? kUnroll / 2 : kUnroll;
  int64_t c = 0;
  for (; c + kU <= classes; c += kU) {
    Lanes<T, P> bx[kU];
    Lanes<U, P> bt[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      bx[u] = px[(c + u) * s];
      if constexpr (WithT) bt[u] = pt[(c + u) * s];
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) f(c + u, bx[u], bt[u]);
  }
  for (; c < classes; ++c) {
    Lanes<U, P> bt{};
    if constexpr (WithT) bt = pt[c * s];
    f(c, px[c * s], bt);
  }
}

template <typename T, int M, bool HasW, int P>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>)
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
    const auto* t = is_prob(M) ? static_cast<const TargetOf<T, M>*>(p.target) + off : nullptr;
    acc_t ref[P];
    // eight 16-bit rows a thread have no registers for the compensation (12-136 bytes of
    // spills on sm_80): theirs are plain float sums, as before (a 16-bit logit's rounding is
    // 2^15 times a float sum's step; the rows a thread of float32 or unaligned logits: compensated)
    LaneSums<acc_t, P == 1 || sizeof(T) >= 4> ls[P];
    if (p.classes > 0) {  // (no classes: no first logit, every target ignore_index)
      const Lanes<T, P> x0 = *vector_ptr<Lanes<T, P>>(x);
#pragma unroll
      for (int k = 0; k < P; ++k) {
        ref[k] = shift_of(P == 1 ? logit_of(p, to_acc(x0.v[k]), 0) : capped(p, to_acc(x0.v[k])));
      }
    } else {
#pragma unroll
      for (int k = 0; k < P; ++k) ref[k] = acc_t(0);
    }
    for_lanes<T, TargetOf<T, M>, P, is_prob(M)>(
        x, t, p.classes, p.stride_class,
        [&](int64_t c, const Lanes<T, P>& xl, const Lanes<TargetOf<T, M>, P>& tl) {
      // the class's weight once for the P rows (loaded per row, sm_90 spilled 10 bytes)
      const acc_t wc = M != kPlain ? class_weight<HasW, acc_t>(p, c) : acc_t(1);
#pragma unroll
      for (int k = 0; k < P; ++k) {
        // the logit adjustment only at one row a thread (plan_of: none of the P > 1 kernels'
        // registers go to it; the 8-row bfloat16 ones spilled)
        const acc_t xk = P == 1 ? logit_of(p, to_acc(xl.v[k]), c) : capped(p, to_acc(xl.v[k]));
        ls[k].add(xk);
        if constexpr (M != kPlain) {
          const acc_t tw =
              weighted_target<M>(wc, is_prob(M) ? to_acc(tl.v[k]) : acc_t(0), smooth);
          ls[k].add_term(M == kSmooth ? tw * smooth.t_shift : tw, tw, xk, ref[k]);
        }
      }
    });
    // the focal loss over soft targets: a second pass (row.cuh); not in the kernels of eight
    // 16-bit rows a thread, which have no register for it (plan_of sends it to one row a thread)
    constexpr bool kFocal = P == 1 || sizeof(T) >= 4;
    assert((kFocal || !soft_focal<M>(p)) && "the focal loss's second pass at 16-bit lanes");
    if (kFocal && soft_focal<M>(p)) {
      acc_t sh[P], L[P];
#pragma unroll
      for (int k = 0; k < P; ++k) {
        sh[k] = ls[k].lse().shift();
        L[k] = ls[k].lse().log_sum();
        ls[k].a = ls[k].ca = ls[k].q = ls[k].cq = acc_t(0);  // now the focal sums, compensated
      }
      for_lanes<T, TargetOf<T, M>, P, is_prob(M)>(
          x, t, p.classes, p.stride_class,
          [&](int64_t c, const Lanes<T, P>& xl, const Lanes<TargetOf<T, M>, P>& tl) {
        const acc_t wc = class_weight<HasW, acc_t>(p, c);  // once for the P rows (as above)
#pragma unroll
        for (int k = 0; k < P; ++k) {
          Sums<acc_t> one;  // the class's terms
          const acc_t f =
              weighted_target<M>(wc, is_prob(M) ? to_acc(tl.v[k]) : acc_t(0), smooth);
          focal_add_term<M, acc_t, P == 1>(p, one, to_acc(xl.v[k]), c,
                                           M == kSmooth ? f * smooth.t_shift : f, f, sh[k], L[k]);
          ls[k].add_a(one.a);
          ls[k].add_q(one.q);
        }
      });
    }
#pragma unroll
    for (int k = 0; k < P; ++k) {
      const int64_t y = is_prob(M) ? -1 : target_of(p, r0 + k);
      const bool active = is_prob(M) || y >= 0;
      const acc_t xy =
          active && !is_prob(M)
              ? (P == 1 ? logit_of(p, to_acc(x[y * p.stride_class + k]), y)
                        : capped(p, to_acc(x[y * p.stride_class + k])))
              : acc_t(0);
      finish_row<T, M, HasW>(p, r0 + k, y, active, ls[k].lse(), ls[k].sums(), ref[k], xy, my_l,
                             my_w);
    }
  }
  if (p.reduction == Reduction::None) return;
  finish_forward<T>(p, my_l, my_w, partial, done);
}

// The overlap sums' gradient at one position (params.h: grad_sums), added to the loss's:
// with d_c = dL/dp_c = a_c t_c + b_c m_c (m_c = 1, or 2 p_c when squared) and
// S = sum_k p_k d_k, class c gets p_c (d_c - S).
template <typename acc_t>
struct OverlapGrad {
  const acc_t* ab = nullptr;  // the item's (dL/dI, dL/dP) planes of grad_sums
  int64_t classes = 0;
  bool squared = false;
  acc_t S = 0;
  __device__ __forceinline__ acc_t d(int64_t c, acc_t pc, acc_t tc) const {
    const acc_t b = ab[classes + c];
    return ab[c] * tc + (squared ? b * acc_t(2) * pc : b);
  }
};

// The (sh, L, q) the forward would have saved for row r, recomputed as forward_lanes_kernel
// computes them at one row a thread (p.lse null: the overlap backward keeps nothing of the
// logits' size). No focal term: the glue saves the planes for it.
template <typename T, int M, bool HasW>
__device__ __forceinline__ void recompute_row(const CrossEntropyParams& p, const T* x,
                                              const TargetOf<T, M>* t, int64_t r,
                                              const Smoothing<typename AccOf<T>::type>& smooth,
                                              typename AccOf<T>::type* out) {
  using acc_t = typename AccOf<T>::type;
  LaneSums<acc_t, true> ls;
  for_lanes<T, TargetOf<T, M>, 1, is_prob(M)>(
      x, t, p.classes, p.stride_class,
      [&](int64_t c, const Lanes<T, 1>& xl, const Lanes<TargetOf<T, M>, 1>& tl) {
    ls.add(logit_of(p, to_acc(xl.v[0]), c));
    if constexpr (is_prob(M)) {
      ls.add_q(weighted_target<M>(class_weight<HasW, acc_t>(p, c), to_acc(tl.v[0]), smooth));
    }
  });
  const Lse<acc_t> l = ls.lse();
  const bool active = is_prob(M) || target_of(p, r) >= 0;
  out[0] = active ? l.shift() : acc_t(0);
  out[1] = active ? l.log_sum() : l.ignored();
  out[2] = is_prob(M) ? static_cast<acc_t>(ls.sums().q) : acc_t(0);
}

template <typename T, int M, bool HasW, int P, bool Overlap>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>)
    backward_lanes_kernel(const CrossEntropyParams p, const void* w_sum) {
  using acc_t = typename AccOf<T>::type;
  static_assert(!Overlap || P == 1, "the overlap sums' gradient: one position a thread");
  const int64_t groups = p.outer * p.inner / P;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g >= groups) return;
  const Smoothing<acc_t> smooth(p);
  const int64_t r0 = g * P;
  const int64_t off = row_offset<T>(p, r0);
  const T* x = static_cast<const T*>(p.input) + off;
  const auto* t = is_prob(M) ? static_cast<const TargetOf<T, M>*>(p.target) + off : nullptr;
  auto* gx = vector_ptr<Lanes<T, P>>(static_cast<T*>(p.grad_input) + off);
  const acc_t ws = weight_sum<T, M, HasW>(p, w_sum);
  Coef<acc_t> c[P];
  if constexpr (Overlap) {  // (sh, L, q) recomputed where the forward saved none
    acc_t given[3];
    const bool recompute = p.lse == nullptr;
    if (recompute) recompute_row<T, M, HasW>(p, x, t, r0, smooth, given);
    c[0] = row_coef<T, M, HasW>(p, r0, ws, recompute ? given : nullptr);
  } else {
#pragma unroll
    for (int k = 0; k < P; ++k) c[k] = row_coef<T, M, HasW>(p, r0 + k, ws);
  }
  // the overlap term: p_c from (sh, L), none at an ignored position
  OverlapGrad<acc_t> ov;
  bool keep = false;
  int64_t y = -1;
  if constexpr (Overlap) {
    y = is_prob(M) ? -1 : target_of(p, r0);
    keep = is_prob(M) || y >= 0;
    ov.ab = static_cast<const acc_t*>(p.grad_sums) + (r0 / p.inner) * 3 * p.classes;
    ov.classes = p.classes;
    ov.squared = p.overlap_squared;
    if (keep) {
      for_lanes<T, TargetOf<T, M>, 1, is_prob(M)>(
          x, t, p.classes, p.stride_class,
          [&](int64_t cls, const Lanes<T, 1>& xl, const Lanes<TargetOf<T, M>, 1>& tl) {
        const acc_t pc = fast_exp((logit_of(p, to_acc(xl.v[0]), cls) - c[0].sh) - c[0].L);
        const acc_t tc = is_prob(M) ? to_acc(tl.v[0]) : acc_t(cls == y ? 1 : 0);
        ov.S += pc * ov.d(cls, pc, tc);
      });
    }
  }
  const int64_t s = p.stride_class / P;
  for_lanes<T, TargetOf<T, M>, P, is_prob(M)>(
      x, t, p.classes, p.stride_class,
      [&](int64_t cls, const Lanes<T, P>& xl, const Lanes<TargetOf<T, M>, P>& tl) {
    Lanes<T, P> out;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      acc_t v = grad_element<T, M, HasW>(p, c[k], cls, to_acc(xl.v[k]),
                                         is_prob(M) ? to_acc(tl.v[k]) : acc_t(0), smooth);
      if constexpr (Overlap) {
        if (keep) {
          const acc_t pc = fast_exp((logit_of(p, to_acc(xl.v[k]), cls) - c[k].sh) - c[k].L);
          const acc_t tc = is_prob(M) ? to_acc(tl.v[k]) : acc_t(cls == y ? 1 : 0);
          v += pc * (ov.d(cls, pc, tc) - ov.S);
        }
      }
      out.v[k] = from_acc<T>(v);
    }
    gx[cls * s] = out;
  });
}

}  // namespace

cudaError_t ce::lanes_forward(const CrossEntropyParams& p, const Plan& plan, const Reduce& red,
                              cudaStream_t stream) {
  return dispatch_kernel(p, [&](auto tag, auto mode, auto has_w) {
    using T = decltype(tag);
    constexpr int M = decltype(mode)::value;
    constexpr bool W = decltype(has_w)::value;
    if (plan.lanes > 1) {
      launch<forward_lanes_kernel<T, M, W, Pack<T>::kSize>>(plan.blocks, kThreads, stream, p,
                                                            red.partial, red.done);
    } else {
      launch<forward_lanes_kernel<T, M, W, 1>>(plan.blocks, kThreads, stream, p, red.partial,
                                               red.done);
    }
  });
}

cudaError_t ce::lanes_backward(const CrossEntropyParams& p, const Plan& plan, const void* w_sum,
                               cudaStream_t stream) {
  return dispatch_kernel(p, [&](auto tag, auto mode, auto has_w) {
    using T = decltype(tag);
    constexpr int M = decltype(mode)::value;
    constexpr bool W = decltype(has_w)::value;
    if (p.grad_sums != nullptr) {  // (plan_of: one position a thread)
      launch<backward_lanes_kernel<T, M, W, 1, true>>(plan.blocks, kThreads, stream, p, w_sum);
    } else if (plan.lanes > 1) {
      launch<backward_lanes_kernel<T, M, W, Pack<T>::kSize, false>>(plan.blocks, kThreads,
                                                                    stream, p, w_sum);
    } else {
      launch<backward_lanes_kernel<T, M, W, 1, false>>(plan.blocks, kThreads, stream, p, w_sum);
    }
  });
}

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
