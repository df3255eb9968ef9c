// CUDA kernels of the fused cross-entropy: the launchers of kernels.h. One Plan per call picks how
// the rows are covered (cross_entropy_launch.cuh), the same for the forward, its workspace and the
// backward; each path lives in a file of its own:
//   class-contiguous rows of up to 64 classes: 8 threads per row; up to 1024: a warp per row;
//     longer rows: a block per row (cross_entropy_rows.cu), 16-byte vectors where aligned;
//   few rows with many classes: each row split into chunks across blocks, merged in chunk order
//     (cross_entropy_split.cu);
//   (N, C, d...): lanes along the contiguous spatial axis, one thread per row (position), so
//     neighbouring threads read neighbouring addresses (cross_entropy_lanes.cu); with the
//     overlap sums of the Dice family after it (cross_entropy_overlap.cu).
// The per-row math is cross_entropy_row.cuh's, the reductions cross_entropy_reduce.cuh's: fixed
// trees, per-block partial sums in float64 and a last-block-done pass in the same launch; no
// floating-point atomics, no host synchronization. This file also holds the two small kernels
// every path shares: the sum of the class weights for the smoothing gradient, and the gradient
// of probability targets.
#include "cross_entropy_launch.cuh"
#include "cross_entropy_reduce.cuh"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {
namespace {

using ce::Plan;

template <typename T>
__global__ void __launch_bounds__(kThreads) weight_sum_kernel(const CrossEntropyParams p,
                                                              void* out) {
  using acc_t = typename AccOf<T>::type;
  __shared__ double shared[kThreads / 32];
  double s = 0;
  for (int64_t c = threadIdx.x; c < p.total_classes; c += kThreads) {
    s += static_cast<const acc_t*>(p.weight)[c];
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) *static_cast<acc_t*>(out) = static_cast<acc_t>(s);
}

// Gradient of probability targets (stored as U: params.h target_dtype):
// dt_k = -(1 - s) w_k ((x_k - sh) - L) g, times the focal loss's m_k = (1 - p_k)^gamma, one thread
// per element.
template <typename T, typename U, bool HasW>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>) target_backward_kernel(const CrossEntropyParams p) {
  using acc_t = typename AccOf<T>::type;
  const int64_t rows = p.outer * p.inner;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= rows * p.classes) return;
  const int64_t r = e / p.classes, k = e - r * p.classes;
  acc_t g = load_value<T>(p.grad_loss, loss_as_acc(p), p.reduction == Reduction::None ? r : 0);
  if (p.reduction == Reduction::Mean) g /= static_cast<acc_t>(rows);
  const Smoothing<acc_t> smooth(p);
  const int64_t at = row_offset<T>(p, r) + k * p.stride_class;
  const acc_t wk = HasW ? static_cast<const acc_t*>(p.weight)[k] : acc_t(1);
  const acc_t sh = static_cast<const acc_t*>(p.lse)[r], L = static_cast<const acc_t*>(p.lse)[rows + r];
  const acc_t lp = (logit_of(p, to_acc(static_cast<const T*>(p.input)[at]), k) - sh) - L;
  acc_t m = 1, s;
  if (p.focal_gamma > 0) focal_factors<acc_t>(static_cast<acc_t>(p.focal_gamma), -lp, m, s);
  static_cast<U*>(p.grad_target)[at] = from_acc<U>(-smooth.t_scale * wk * lp * m * g);
}

// A split row's chunks hold at least this many classes, a multiple of kChunkAlign.
constexpr int64_t kMinChunk = 4096, kChunkAlign = 256;

size_t dtype_size(DType d) {
  return d == DType::Float64 ? 8 : d == DType::Float32 ? 4 : 2;
}

// Whether b (elements of eb bytes) is as misaligned as a (elements of ea bytes) from a 16-byte
// vector of a's: the same element offset modulo its V = 16 / ea elements, so that where a reaches
// a 16-byte boundary, b reaches one of V * eb bytes (16 for the same dtype, 32 for float targets
// beside 16-bit logits). b == nullptr: nothing to match.
bool aligned_alike(const void* a, size_t ea, const void* b, size_t eb) {
  if (b == nullptr) return true;
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  const uintptr_t v = 16 / ea;
  return x % ea == 0 && y % eb == 0 && (x / ea) % v == (y / eb) % v;
}

bool aligned_to(const void* a, size_t bytes) {
  return a == nullptr || reinterpret_cast<uintptr_t>(a) % bytes == 0;
}
bool aligned16(const void* a) { return aligned_to(a, 16); }

// The probability targets beside the logits, or nullptr for class indices.
const void* prob_targets(const CrossEntropyParams& p) { return p.prob_target ? p.target : nullptr; }

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

template <typename T>
Plan plan_of(const CrossEntropyParams& p) {
  const int64_t rows = p.outer * p.inner;
  Plan plan{};
  auto blocks = [](int64_t threads) {
    const int64_t b = (threads + kThreads - 1) / kThreads;
    return static_cast<unsigned int>(b > 0 ? b : 1);
  };
  // the overlap sums (params.h) are the lanes path's, one position a thread
  const bool overlap = p.overlap_sums != nullptr || p.grad_sums != nullptr;
  if (p.stride_class != 1 || overlap) {
    // a vector of P positions per thread needs every lane group to start 16-byte aligned
    constexpr int V = Pack<T>::kSize;
    const int64_t e = sizeof(T);
    const bool vec = p.stride_inner == 1 && p.inner % V == 0 && p.stride_outer * e % 16 == 0 &&
                     p.stride_class * e % 16 == 0 && aligned16(p.input) &&
                     aligned_to(prob_targets(p), dtype_size(p.target_dtype) * V) &&
                     aligned16(p.grad_input);
    plan.kind = Plan::kLanes;
    // (a logit adjustment, and the focal loss over soft targets beside 16-bit logits: one row a
    // thread; the eight rows a thread of 16-bit logits have no register left for them: a spill
    // on sm_90)
    const bool soft_focal = p.focal_gamma > 0 && (p.prob_target || p.label_smoothing > 0);
    plan.lanes =
        vec && !overlap && p.logit_adjust == nullptr && !(sizeof(T) == 2 && soft_focal) ? V : 1;
    plan.blocks = blocks(rows / plan.lanes);
    return plan;
  }
  if (p.classes <= ce::kSubWarpClasses) {
    plan.kind = Plan::kSubWarpRows;
    plan.blocks = blocks(rows * ce::kSubWarpThreads);
    return plan;
  }
  if (p.classes <= ce::kWarpRowClasses) {
    plan.kind = Plan::kWarpRows;
    plan.blocks = blocks(rows * 32);
    return plan;
  }
  plan.kind = Plan::kBlockRows;
  plan.blocks = static_cast<unsigned int>(rows > 0 ? rows : 1);
  const int64_t sms = sm_count();
  // the focal loss over soft targets needs each row's lse before its second pass: a block each
  const bool soft_focal = p.focal_gamma > 0 && (p.prob_target || p.label_smoothing > 0);
  if (rows > 0 && rows < 2 * sms && p.classes >= 2 * kMinChunk && !soft_focal) {
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

// The plan of p's dtype.
Plan plan_for(const CrossEntropyParams& p) {
  Plan plan;
  dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    plan = plan_of<decltype(tag)>(p);
    return cudaSuccess;
  });
  return plan;
}

// The forward's workspace: per-block (loss, divisor) partials and the done-counter when the loss
// is reduced, then a split row's chunk statistics, or the overlap sums' per-block partials.
struct Workspace {
  size_t partial_bytes = 0, state_bytes = 0;
  size_t bytes() const { return partial_bytes + state_bytes; }
};

Workspace workspace_of(const CrossEntropyParams& p, const Plan& plan) {
  Workspace w;
  if (p.reduction != Reduction::None) w.partial_bytes = size_t(plan.blocks) * 2 * sizeof(double) + 16;
  if (plan.kind == Plan::kSplitRows) {
    w.state_bytes = size_t(p.outer * p.inner * plan.chunks) * 4 * sizeof(double);
  }
  if (p.overlap_sums != nullptr) {
    w.state_bytes =
        size_t(p.outer * ce::overlap_blocks_per_item(p) * 3 * p.classes) * sizeof(double);
  }
  return w;
}

}  // namespace

size_t cross_entropy_forward_workspace(const CrossEntropyParams& p) {
  return workspace_of(p, plan_for(p)).bytes();
}

cudaError_t cross_entropy_forward(const CrossEntropyParams& p, void* workspace,
                                  cudaStream_t stream) {
  const int64_t rows = p.outer * p.inner;
  if (rows == 0 && p.reduction == Reduction::None && p.overlap_sums == nullptr) return cudaSuccess;
  // 16-byte loads along class-contiguous rows: the logits and the targets read with them
  // equally aligned (each row then starts with the same few elements before a boundary)
  const size_t e = dtype_size(p.dtype);
  const bool vector = aligned_alike(p.input, e, prob_targets(p), dtype_size(p.target_dtype));
  const Plan plan = plan_for(p);
  const Workspace ws = workspace_of(p, plan);
  ce::Reduce red;
  if (p.reduction != Reduction::None) {
    red.partial = static_cast<double*>(workspace);
    red.done = reinterpret_cast<unsigned int*>(red.partial + 2 * size_t(plan.blocks));
    const cudaError_t err = cudaMemsetAsync(red.done, 0, sizeof(unsigned int), stream);
    if (err != cudaSuccess) return err;
  }
  switch (plan.kind) {
    case Plan::kLanes: {
      cudaError_t err = rows > 0 || p.reduction != Reduction::None
                            ? ce::lanes_forward(p, plan, red, stream)
                            : cudaSuccess;
      if (err == cudaSuccess && p.overlap_sums != nullptr) {
        err = ce::overlap_forward(
            p, reinterpret_cast<double*>(static_cast<char*>(workspace) + ws.partial_bytes), stream);
      }
      return err;
    }
    case Plan::kSplitRows:
      return ce::split_forward(p, plan, vector, static_cast<char*>(workspace) + ws.partial_bytes,
                               red, stream);
    default: return ce::rows_forward(p, plan, vector, red, stream);
  }
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
  // every row of the gradient as misaligned as its row of the logits: the same base alignment,
  // and row strides that differ by a multiple of 16 bytes
  const size_t e = dtype_size(p.dtype);
  const bool vector = aligned_alike(p.input, e, p.grad_input, e) &&
                      (p.grad_stride_outer - p.stride_outer) * e % 16 == 0 &&
                      aligned_alike(p.input, e, prob_targets(p), dtype_size(p.target_dtype));
  const Plan plan = plan_for(p);
  if (cross_entropy_backward_workspace(p) > 0) {
    const cudaError_t err = dispatch_dtype(p.dtype, [&](auto tag) -> cudaError_t {
      launch<weight_sum_kernel<decltype(tag)>>(1, kThreads, stream, p, workspace);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  if (plan.kind == Plan::kLanes) return ce::lanes_backward(p, plan, workspace, stream);
  return ce::rows_backward(p, plan, vector, workspace, stream);
}

cudaError_t cross_entropy_target_backward(const CrossEntropyParams& p, cudaStream_t stream) {
  const int64_t n = p.outer * p.inner * p.classes;
  if (n == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned int>((n + kThreads - 1) / kThreads);
  return dispatch_dtypes(p.dtype, p.target_dtype, [&](auto tag, auto target_tag) -> cudaError_t {
    using T = decltype(tag);
    using U = decltype(target_tag);
    if (p.weight != nullptr) {
      launch<target_backward_kernel<T, U, true>>(blocks, kThreads, stream, p);
    } else {
      launch<target_backward_kernel<T, U, false>>(blocks, kThreads, stream, p);
    }
    return cudaGetLastError();
  });
}

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
