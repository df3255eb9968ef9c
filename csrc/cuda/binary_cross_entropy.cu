// CUDA kernels of the fused BCE with logits (and the sigmoid focal loss, BCE of probabilities).
// The per-element formulas are ../loss_math.h's, shared with the CPU kernels:
//   loss     = w [ (1 + (P - 1) t) log1p(e) + (x >= 0 ? (1 - t) x : -P t x) ],  e = exp(-|x|)
//   dloss/dx = w [ (1 + (P - 1) t) sigmoid(x) - P t ],  sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e)
//   dloss/dt = w [ (P - 1) (max(-x, 0) + log1p(e)) - x ]
// Each thread takes one 16-byte vector of consecutive elements (8 bf16/fp16, 4 float, 2 double),
// so loads coalesce. Broadcast weights are read through their strides: a thread divides its first
// element's index into (row, position) once and steps from there. The forward's reduction is
// deterministic: at most kReduceBlocks blocks, each thread a float64 sum of the vectors a grid
// apart, a fixed tree per block, and the last block to finish (a done-counter, no floating-point
// atomics) adds the partials in block order and writes the loss in the same launch. No host
// synchronization anywhere.
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

constexpr int kThreads = 256;
// The most blocks of a reducing forward: a full wave of an H100 at 256 threads per block.
constexpr int64_t kReduceBlocks = 1024;

struct Offsets {
  int64_t w, pw, a;
};

// Each weight's offset for row r, from r's multi-index over outer_sizes.
__device__ __forceinline__ Offsets row_offsets(const BinaryCrossEntropyParams& p, int64_t r) {
  Offsets o{0, 0, 0};
  for (int d = p.outer_dims - 1; d >= 0; --d) {
    const int64_t size = p.outer_sizes[d];
    const int64_t q = r / size;
    const int64_t idx = r - q * size;
    r = q;
    o.w += idx * p.weight.strides[d];
    o.pw += idx * p.pos_weight.strides[d];
    o.a += idx * p.alpha.strides[d];
  }
  return o;
}

__device__ __forceinline__ float exp_neg_abs(float x) { return __expf(-fabsf(x)); }
__device__ __forceinline__ double exp_neg_abs(double x) { return exp(-fabs(x)); }

// The shared formulas (../loss_math.h, the CPU kernels' too) on one element, with the GPU's
// exp: the loss, and BCE of probabilities' loss (with PyTorch's device assert on an input outside
// [0, 1] or NaN) and gradients.
template <typename acc_t>
using Ops = math::Scalar<acc_t>;
template <typename acc_t>
__device__ __forceinline__ acc_t bce_loss(acc_t x, acc_t t, acc_t pw) {
  return math::bce_loss<Ops<acc_t>>(x, t, pw, log1p(exp_neg_abs(x)));
}
template <typename acc_t>
__device__ __forceinline__ acc_t bce_prob_loss(acc_t p, acc_t t, acc_t pw) {
  assert(p >= acc_t(0) && p <= acc_t(1) && "all elements of input should be between 0 and 1");
  return math::bce_prob_loss<Ops<acc_t>>(p, t, pw);
}

// The sigmoid focal loss's factors and gradients (../loss_math.h: SigmoidFocal) with the
// params' gamma and alpha: a scalar alpha's 1 - alpha from the double, as torchvision's Python
// float gives it.
template <typename acc_t>
__device__ __forceinline__ math::SigmoidFocal<Ops<acc_t>, acc_t> focal_of(
    const BinaryCrossEntropyParams& p) {
  const bool scalar_alpha = p.focal_alpha >= 0 && p.alpha.data == nullptr;
  return {static_cast<acc_t>(p.focal_gamma >= 0 ? p.focal_gamma : 0.0), p.focal_alpha >= 0,
          scalar_alpha ? static_cast<acc_t>(1.0 - p.focal_alpha) : acc_t(-1)};
}

// The elements of one thread: [f0, f0 + n), n <= V (a Pack of the logits: 16 bytes of them), as
// acc, from elements of E (the logits' dtype, or float beside 16-bit logits: 32 bytes).
template <int V, typename E, typename acc_t>
__device__ __forceinline__ void load_elements(const E* src, int64_t f0, int n, bool vector,
                                              acc_t* out) {
  if (vector) {
    const Elems<E, V> pk = *vector_ptr<Elems<E, V>>(src + f0);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = to_acc(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = k < n ? to_acc(src[f0 + k]) : acc_t(0);
  }
}

template <int V, typename E, typename acc_t>
__device__ __forceinline__ void store_elements(E* dst, int64_t f0, int n, bool vector,
                                               const acc_t* in) {
  if (vector) {
    Elems<E, V> pk;
#pragma unroll
    for (int k = 0; k < V; ++k) pk.v[k] = from_acc<E>(in[k]);
    *vector_ptr<Elems<E, V>>(dst + f0) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < n) dst[f0 + k] = from_acc<E>(in[k]);
    }
  }
}

// The weight, pos_weight and alpha of each of the thread's elements. Indexed: read through the
// broadcast strides; otherwise each is one value (absent: 1; alpha: the scalar focal_alpha).
template <typename T, bool Indexed>
__device__ __forceinline__ void load_weights(const BinaryCrossEntropyParams& p, int64_t f0, int n,
                                             typename AccOf<T>::type* wv,
                                             typename AccOf<T>::type* pv,
                                             typename AccOf<T>::type* av) {
  using acc_t = typename AccOf<T>::type;
  constexpr int V = Pack<T>::kSize;
  const auto* w = static_cast<const acc_t*>(p.weight.data);
  const auto* pw = static_cast<const acc_t*>(p.pos_weight.data);
  const auto* al = static_cast<const acc_t*>(p.alpha.data);
  const acc_t as = static_cast<acc_t>(p.focal_alpha);
  if constexpr (!Indexed) {
    const acc_t wc = w ? w[0] : acc_t(1), pc = pw ? pw[0] : acc_t(1), ac = al ? al[0] : as;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      wv[k] = wc;
      pv[k] = pc;
      av[k] = ac;
    }
  } else {
    int64_t r = f0 / p.inner;
    int64_t i = f0 - r * p.inner;
    Offsets o = row_offsets(p, r);
    if (i + V <= p.inner) {  // all in one row (the common case): independent loads, no branches
      const acc_t* wr = w ? w + o.w + i * p.weight.inner_stride : nullptr;
      const acc_t* pr = pw ? pw + o.pw + i * p.pos_weight.inner_stride : nullptr;
      const acc_t* ar = al ? al + o.a + i * p.alpha.inner_stride : nullptr;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        wv[k] = wr ? wr[k * p.weight.inner_stride] : acc_t(1);
        pv[k] = pr ? pr[k * p.pos_weight.inner_stride] : acc_t(1);
        av[k] = ar ? ar[k * p.alpha.inner_stride] : as;
      }
      return;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < n) {
        if (i == p.inner) {
          o = row_offsets(p, ++r);
          i = 0;
        }
        wv[k] = w ? w[o.w + i * p.weight.inner_stride] : acc_t(1);
        pv[k] = pw ? pw[o.pw + i * p.pos_weight.inner_stride] : acc_t(1);
        av[k] = al ? al[o.a + i * p.alpha.inner_stride] : as;
        ++i;
      } else {
        wv[k] = pv[k] = av[k] = acc_t(0);
      }
    }
  }
}

// Sum over the block in a fixed order: a shuffle tree per warp, then the warps' sums in order.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  acc_t s = 0;
  if (threadIdx.x == 0) {
    for (int k = 0; k < kThreads / 32; ++k) s += shared[k];
  }
  __syncthreads();
  return s;  // meaningful in thread 0
}

// Store: the loss of every element (Reduction::None), one vector per thread. Otherwise the grid
// is at most kReduceBlocks blocks and each thread walks the elements a grid apart, so the last
// block adds at most kReduceBlocks partials (a fixed count: the same sum on every GPU). Logits
// of T, targets of U (params.h: target_dtype), a stored loss of L (loss_dtype: T or float; a
// compile-time choice: two stores under a runtime branch made sm_90 spill 12 bytes).
template <typename T, typename U, typename L, bool Indexed, bool Store, bool Prob>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const BinaryCrossEntropyParams p, bool aligned, double* partial,
                   unsigned int* done) {
  using acc_t = typename AccOf<T>::type;
  constexpr int V = Pack<T>::kSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads * V;
  double sum = 0;
  for (int64_t f0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
       f0 < p.numel; f0 += step) {
    const int n = static_cast<int>(p.numel - f0 < V ? p.numel - f0 : V);
    const bool vector = aligned && n == V;
    acc_t x[V], t[V], w[V], pw[V], a[V], l[V];
    // the weights first: their row offsets' 64-bit divisions are calls that the elements would
    // otherwise stay live across (register spills on sm_80)
    load_weights<T, Indexed>(p, f0, n, w, pw, a);
    load_elements<V>(static_cast<const T*>(p.input), f0, n, vector, x);
    load_elements<V>(static_cast<const U*>(p.target), f0, n, vector, t);
    acc_t part = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      l[k] = k >= n ? acc_t(0)
                    : w[k] * (Prob ? bce_prob_loss(x[k], t[k], pw[k]) : bce_loss(x[k], t[k], pw[k]));
      if (p.focal_gamma >= 0 && k < n) {
        l[k] *= focal_of<acc_t>(p).factor(x[k], t[k], a[k], exp_neg_abs(x[k]));
      }
      part += l[k];
    }
    if constexpr (Store) {
      store_elements<V>(static_cast<L*>(p.loss), f0, n, vector, l);
    } else {
      sum += part;
    }
  }
  if constexpr (!Store) {
    __shared__ double shared[kThreads / 32];
    __shared__ bool last;
    const double s = block_sum<double>(sum, shared);
    if (threadIdx.x == 0) {
      partial[blockIdx.x] = s;
      __threadfence();  // the partial is visible before the counter says so
      last = atomicAdd(done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    double acc = 0;
    for (unsigned int b = threadIdx.x; b < gridDim.x; b += kThreads) {
      acc += *static_cast<volatile double*>(partial + b);
    }
    const double total = block_sum<double>(acc, shared);
    if (threadIdx.x == 0) {
      const double out = p.reduction == Reduction::Mean ? total / static_cast<double>(p.numel)
                                                        : total;
      store_value<T>(p.loss, p.loss_dtype != p.dtype, 0, static_cast<acc_t>(out));
    }
  }
}

// Blocks per SM the backward's register allocation must allow: without the hint ptxas spilled 8
// bytes in the focal variants (float64; 16-bit with a scalar upstream gradient) to fit 64
// registers, aiming at a higher occupancy than a kernel this heavy needs (as the cross-entropy
// kernels' kMinBlocks).
constexpr int kBackwardMinBlocks = 2;

template <typename T, typename U, bool Indexed, bool GX, bool GT, bool GScalar, bool Prob>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocks)
    backward_kernel(const BinaryCrossEntropyParams p, bool aligned) {
  using acc_t = typename AccOf<T>::type;
  constexpr int V = Pack<T>::kSize;
  const int64_t f0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  if (f0 >= p.numel) return;
  const int n = static_cast<int>(p.numel - f0 < V ? p.numel - f0 : V);
  const bool vector = aligned && n == V;
  acc_t x[V], t[V], w[V], pw[V], a[V], g[V], dx[V], dt[V];
  load_weights<T, Indexed>(p, f0, n, w, pw, a);  // first: as in forward_kernel
  load_elements<V>(static_cast<const T*>(p.input), f0, n, vector, x);
  load_elements<V>(static_cast<const U*>(p.target), f0, n, vector, t);
  const bool loss_acc = p.loss_dtype != p.dtype;  // after the weights' divisions (see above)
  if constexpr (GScalar) {
    acc_t gs = load_value<T>(p.grad_loss, loss_acc, 0);
    if (p.reduction == Reduction::Mean) gs /= static_cast<acc_t>(p.numel);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = gs;
  } else if (loss_acc) {
    load_elements<V>(static_cast<const acc_t*>(p.grad_loss), f0, n, vector, g);
  } else {
    load_elements<V>(static_cast<const T*>(p.grad_loss), f0, n, vector, g);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const acc_t gw = g[k] * w[k];
    if constexpr (Prob) {  // probabilities
      if constexpr (GX) dx[k] = math::bce_prob_grad<Ops<acc_t>>(x[k], t[k], pw[k], g[k], w[k]);
      if constexpr (GT) dt[k] = gw * math::bce_prob_grad_target<Ops<acc_t>>(x[k], pw[k]);
      continue;
    }
    const acc_t e = exp_neg_abs(x[k]);
    if constexpr (GX) {
      dx[k] = gw * (p.focal_gamma >= 0
                        ? focal_of<acc_t>(p).grad(x[k], t[k], a[k], pw[k], e,
                                                  bce_loss(x[k], t[k], pw[k]))
                        : math::bce_grad<Ops<acc_t>>(x[k], t[k], pw[k], e));
    }
    if constexpr (GT) {
      const acc_t dce_t = math::bce_grad_target<Ops<acc_t>>(x[k], pw[k], log1p(e));
      dt[k] = gw * (p.focal_gamma >= 0
                        ? focal_of<acc_t>(p).grad_target(x[k], t[k], a[k], e,
                                                         bce_loss(x[k], t[k], pw[k]), dce_t)
                        : dce_t);
    }
  }
  if constexpr (GX) store_elements<V>(static_cast<T*>(p.grad_input), f0, n, vector, dx);
  if constexpr (GT) store_elements<V>(static_cast<U*>(p.grad_target), f0, n, vector, dt);
}

bool aligned16(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

bool indexed(const BinaryCrossEntropyParams& p) {
  const bool w = p.weight.data && (p.weight.inner_stride != 0 || p.outer_dims > 0);
  const bool pw = p.pos_weight.data && (p.pos_weight.inner_stride != 0 || p.outer_dims > 0);
  const bool a = p.alpha.data && (p.alpha.inner_stride != 0 || p.outer_dims > 0);
  return w || pw || a;
}

template <typename T>
unsigned int blocks_of(const BinaryCrossEntropyParams& p) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * Pack<T>::kSize;
  const int64_t b = (p.numel + per_block - 1) / per_block;
  return static_cast<unsigned int>(b > 0 ? b : 1);
}

template <typename F>
cudaError_t with_indexed(const BinaryCrossEntropyParams& p, F&& f) {
  if (indexed(p)) return f(std::true_type{});
  return f(std::false_type{});
}

// f(prob_input) as a compile-time constant: probabilities have the input's dtype (the glue
// checks it), so only T == U instantiates it.
template <typename T, typename U, typename F>
cudaError_t with_prob(const BinaryCrossEntropyParams& p, F&& f) {
  if constexpr (std::is_same_v<T, U>) {
    if (p.prob_input) return f(std::true_type{});
  }
  return f(std::false_type{});
}

}  // namespace

size_t binary_cross_entropy_forward_workspace(const BinaryCrossEntropyParams& p) {
  if (p.reduction == Reduction::None) return 0;  // nothing to reduce
  return static_cast<size_t>(kReduceBlocks) * sizeof(double) + 16;  // partials, then the counter
}

cudaError_t binary_cross_entropy_forward(const BinaryCrossEntropyParams& p, void* workspace,
                                         cudaStream_t stream) {
  if (p.numel == 0 && p.reduction == Reduction::None) return cudaSuccess;
  return dispatch_dtypes(p.dtype, p.target_dtype, [&](auto tag, auto target_tag) -> cudaError_t {
    using T = decltype(tag);
    using U = decltype(target_tag);
    const unsigned int blocks = blocks_of<T>(p);
    const bool aligned = aligned16(p.input) && aligned16(p.target) &&
                         (p.reduction != Reduction::None || aligned16(p.loss));
    auto* partial = static_cast<double*>(workspace);
    auto* done = reinterpret_cast<unsigned int*>(partial + kReduceBlocks);
    const auto reduce_blocks =
        static_cast<unsigned int>(blocks < kReduceBlocks ? blocks : kReduceBlocks);
    return with_prob<T, U>(p, [&](auto prob) -> cudaError_t {
      constexpr bool P = decltype(prob)::value;
      return with_indexed(p, [&](auto idx) -> cudaError_t {
        constexpr bool I = decltype(idx)::value;
        if (p.reduction == Reduction::None) {
          if constexpr (sizeof(T) == 2) {
            if (p.loss_dtype != p.dtype) {  // float32 losses of 16-bit logits (mixed precision)
              launch<forward_kernel<T, U, float, I, true, P>>(blocks, kThreads, stream, p,
                                                              aligned, nullptr, nullptr);
              return cudaGetLastError();
            }
          }
          launch<forward_kernel<T, U, T, I, true, P>>(blocks, kThreads, stream, p, aligned,
                                                      nullptr, nullptr);
          return cudaGetLastError();
        }
        const cudaError_t err = cudaMemsetAsync(done, 0, sizeof(unsigned int), stream);
        if (err != cudaSuccess) return err;
        launch<forward_kernel<T, U, T, I, false, P>>(reduce_blocks, kThreads, stream, p, aligned,
                                                     partial, done);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t binary_cross_entropy_backward(const BinaryCrossEntropyParams& p, cudaStream_t stream) {
  if (p.numel == 0 || (p.grad_input == nullptr && p.grad_target == nullptr)) return cudaSuccess;
  return dispatch_dtypes(p.dtype, p.target_dtype, [&](auto tag, auto target_tag) -> cudaError_t {
    using T = decltype(tag);
    using U = decltype(target_tag);
    const unsigned int blocks = blocks_of<T>(p);
    const bool aligned = aligned16(p.input) && aligned16(p.target) && aligned16(p.grad_input) &&
                         aligned16(p.grad_target) && (p.grad_loss_scalar || aligned16(p.grad_loss));
    return with_prob<T, U>(p, [&](auto prob) -> cudaError_t {
      constexpr bool P = decltype(prob)::value;
      return with_indexed(p, [&](auto idx) -> cudaError_t {
        constexpr bool I = decltype(idx)::value;
        auto run = [&](auto gx, auto gt) -> cudaError_t {
          constexpr bool GX = decltype(gx)::value, GT = decltype(gt)::value;
          if (p.grad_loss_scalar) {
            launch<backward_kernel<T, U, I, GX, GT, true, P>>(blocks, kThreads, stream, p,
                                                              aligned);
          } else {
            launch<backward_kernel<T, U, I, GX, GT, false, P>>(blocks, kThreads, stream, p,
                                                               aligned);
          }
          return cudaGetLastError();
        };
        if (p.grad_input && p.grad_target) return run(std::true_type{}, std::true_type{});
        if (p.grad_input) return run(std::true_type{}, std::false_type{});
        return run(std::false_type{}, std::true_type{});
      });
    });
  });
}

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
