// Reading a class-contiguous row of the CUDA cross-entropy kernels: its classes spread over the
// threads of a row group, 16-byte vectors where the row's alignment allows, several in flight.
#pragma once

#include "cross_entropy_row.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

// 16-byte packs each thread loads before it uses the first, so that enough loads are in flight.
constexpr int kUnroll = 4;

// Calls f(c0, xv, tv, n) for classes [begin, end) of the row at x (probabilities at t, stored as
// U: T, or float beside 16-bit logits), spread over the TPR lanes of its group: n = 1 element at
// class c0, or a 16-byte pack of n = V consecutive classes from c0 (and the V targets beside
// them: 32 bytes of float). With `vector` (class-contiguous, and x, t and whatever the caller
// writes equally aligned: cross_entropy.cu's aligned_alike) the first classes up to a 16-byte
// boundary go one at a time, then each lane loads kUnroll packs before it processes them (rows
// of sub-warp groups, at most 64 classes, hold too few packs per lane for that to pay: one at a
// time, and fewer registers), then the tail.
template <typename T, typename U, int TPR, bool WithT, typename F>
__device__ __forceinline__ void for_range(const T* x, const U* t, int64_t begin, int64_t end,
                                          int64_t stride, int lane, bool vector, F&& f) {
  using acc_t = typename AccOf<T>::type;
  constexpr int V = Pack<T>::kSize;
  using TPack = Elems<U, V>;
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
  // (a row shorter than its head has no packs, and its pointer past the head no alignment)
  const auto* px = nv > 0 ? vector_ptr<Pack<T>>(x + vb) : nullptr;
  const TPack* pt = WithT && nv > 0 ? vector_ptr<TPack>(t + vb) : nullptr;
  auto use = [&](int64_t v, const Pack<T>& bx, const TPack& bt) {
    acc_t xv[V], tv[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      xv[k] = to_acc(bx.v[k]);
      tv[k] = WithT ? to_acc(bt.v[k]) : acc_t(0);
    }
    f(vb + v * V, xv, tv, V);
  };
  int64_t v = lane;
  constexpr int kU = TPR < 32 ? 1 : kUnroll;
  for (; v + (kU - 1) * TPR < nv; v += kU * TPR) {
    Pack<T> bx[kU];
    TPack bt[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      bx[u] = px[v + u * TPR];
      if constexpr (WithT) bt[u] = pt[v + u * TPR];
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) use(v + u * TPR, bx[u], bt[u]);
  }
  for (; v < nv; v += TPR) {
    TPack bt{};
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
  acc_t xc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) xc[k] = k < n ? logit_of(p, xv[k], c0 + k) : xv[k];  // (in bounds)
  acc_t mv = xc[0];
#pragma unroll
  for (int k = 1; k < V; ++k) {
    if (k < n) mv = fmax(mv, xc[k]);
  }
  l.add_max(mv);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (k < n) {
      l.add(xc[k]);
      sm.template add<T, M, HasW>(p, c0 + k, xc[k], tv[k], ref, smooth);
    }
  }
}

}  // namespace
}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
