// CUDA kernels of the fused cross-entropy: the launchers of kernels.h. One Plan per call picks how
// the rows are covered (cross_entropy_launch.cuh), the same for the forward, its workspace and the
// backward; each path lives in a file of its own:
//   class-contiguous rows of up to 64 classes: 8 threads per row; up to 1024: a warp per row;
//     longer rows: a block per row (cross_entropy_rows.cu), 16-byte vectors where aligned;
//   few rows with many classes: each row split into chunks across blocks, merged in chunk order
//     (cross_entropy_split.cu);
//   (N, C, d...): lanes along the contiguous spatial axis, one thread per row (position), so
//     neighbouring threads read neighbouring addresses (cross_entropy_lanes.cu).
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
    s += to_acc(static_cast<const T*>(p.weight)[c]);
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) *static_cast<acc_t*>(out) = static_cast<acc_t>(s);
}

// Gradient of probability targets: dt_k = -(1 - s) w_k ((x_k - sh) - L) g, times the focal
// loss's m_k = (1 - p_k)^gamma, one thread per element.
template <typename T, bool HasW>
__global__ void __launch_bounds__(kThreads, kMinBlocksOf<T>) target_backward_kernel(const CrossEntropyParams p) {
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
  const acc_t sh = static_cast<const acc_t*>(p.lse)[r], L = static_cast<const acc_t*>(p.lse)[rows + r];
  const acc_t lp = (capped(p, to_acc(static_cast<const T*>(p.input)[at])) - sh) - L;
  acc_t m = 1, s;
  if (p.focal_gamma > 0) focal_factors<acc_t>(static_cast<acc_t>(p.focal_gamma), -lp, m, s);
  static_cast<T*>(p.grad_target)[at] = from_acc<T>(-smooth.t_scale * wk * lp * m * g);
}

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
// is reduced, then a split row's chunk statistics.
struct Workspace {
  size_t partial_bytes = 0, state_bytes = 0;
  size_t bytes() const { return partial_bytes + state_bytes; }
};

Workspace workspace_of(const CrossEntropyParams& p, const Plan& plan) {
  Workspace w;
  if (p.reduction != Reduction::None) w.partial_bytes = size_t(plan.blocks) * 2 * sizeof(double) + 16;
  if (plan.kind == Plan::kSplitRows) {
    const size_t acc = p.dtype == DType::Float64 ? sizeof(double) : sizeof(float);
    w.state_bytes = size_t(p.outer * p.inner * plan.chunks) * 4 * acc;
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
  if (rows == 0 && p.reduction == Reduction::None) return cudaSuccess;
  // 16-byte loads along class-contiguous rows: the logits and the targets read with them
  // equally aligned (each row then starts with the same few elements before a boundary)
  const bool vector = aligned_alike(p.input, p.prob_target ? p.target : nullptr);
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
    case Plan::kLanes: return ce::lanes_forward(p, plan, red, stream);
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
  const size_t e = p.dtype == DType::Float64 ? 8 : p.dtype == DType::Float32 ? 4 : 2;
  const bool vector = aligned_alike(p.input, p.grad_input) &&
                      (p.grad_stride_outer - p.stride_outer) * e % 16 == 0 &&
                      aligned_alike(p.input, p.prob_target ? p.target : nullptr);
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
