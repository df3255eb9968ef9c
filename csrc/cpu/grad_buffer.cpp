#include "grad_buffer.h"

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace weighted_loss::cpu {
namespace {

constexpr size_t kMinBytes = size_t(4) << 20;
constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMaxFreeBlocks = 2;

bool cache_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("WEIGHTED_LOSS_GRAD_CACHE");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return on;
}

void* allocate_block(size_t nbytes) {
  void* ptr = nullptr;
  TORCH_CHECK(posix_memalign(&ptr, kHuge, nbytes) == 0 && ptr != nullptr,
              "weighted_loss: out of memory allocating a ", nbytes, "-byte gradient");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(ptr, (nbytes + kHuge - 1) & ~(kHuge - 1), MADV_HUGEPAGE);  // advice only
#endif
  return ptr;
}

class BlockCache {
 public:
  void* get(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t k = 0; k < free_.size(); ++k) {
        if (free_[k].first == nbytes) {
          void* ptr = free_[k].second;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(k));
          return ptr;
        }
      }
    }
    return allocate_block(nbytes);
  }
  void put(void* ptr, size_t nbytes) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (free_.size() == kMaxFreeBlocks) {
        evicted = free_.front().second;
        free_.erase(free_.begin());
      }
      free_.emplace_back(nbytes, ptr);
    }
    std::free(evicted);
  }

 private:
  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;  // oldest first
};

// Never destroyed: tensors freed during interpreter shutdown still return their blocks.
BlockCache& cache() {
  static auto* c = new BlockCache();
  return *c;
}

}  // namespace

at::Tensor empty_like_gradient(const at::Tensor& like) {
  const size_t nbytes = like.numel() * like.element_size();
  if (!cache_enabled() || nbytes < kMinBytes || !like.is_non_overlapping_and_dense()) {
    return at::empty_like(like);
  }
  void* ptr = cache().get(nbytes);
  // reported like the CPU allocator's own, so the profiler's memory view (and the benchmark's
  // peak-memory column) counts the gradient as allocated by the op, cached or not
  const c10::Device cpu(c10::kCPU);
  c10::reportMemoryUsageToProfiler(ptr, static_cast<int64_t>(nbytes), 0, 0, cpu);
  return at::from_blob(
      ptr, like.sizes(), like.strides(),
      [nbytes, cpu](void* p) {
        c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(nbytes), 0, 0, cpu);
        cache().put(p, nbytes);
      },
      like.options());
}

}  // namespace weighted_loss::cpu
