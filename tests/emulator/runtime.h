// The emulator's runtime: the device's settings, CUDA's per-thread error state, the part of the
// runtime API the kernels' launchers call, the registry of kernel instantiations, and launch<K>(),
// which runs every block of a grid (block.h) and counts the launch. No macros here: torch glue
// may include this header to read the error state, the settings and the counts.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "block.h"

namespace wl_emu {

// The emulated device. sm_count is what cudaDevAttrMultiProcessorCount reports (an H100's by
// default), so that launch plans choose what they would on that GPU; tests lower it to reach the
// paths meant for few rows. With shuffle_blocks a launch runs its blocks in an order drawn afresh
// each launch, and alternates the order of threads between barriers, so that a kernel whose
// result depends on either shows it as a run-to-run difference.
struct Settings {
  std::atomic<int> sm_count{132};
  std::atomic<bool> shuffle_blocks{true};
};
inline Settings& settings() {
  static Settings s;
  return s;
}

// Every kernel instantiation a launch site names registers itself when the library loads (see
// Registered below); each launch counts.
class Registry {
 public:
  int add(std::string name) {
    std::lock_guard<std::mutex> g(mu_);
    names_.push_back(std::move(name));
    counts_.push_back(0);
    return static_cast<int>(names_.size()) - 1;
  }
  void count(int id) {
    std::lock_guard<std::mutex> g(mu_);
    ++counts_[id];
  }
  std::vector<std::pair<std::string, int64_t>> snapshot() const {
    std::lock_guard<std::mutex> g(mu_);
    std::vector<std::pair<std::string, int64_t>> out;
    for (size_t i = 0; i < names_.size(); ++i) out.emplace_back(names_[i], counts_[i]);
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> names_;
  std::vector<int64_t> counts_;
};
inline Registry& registry() {
  static Registry r;
  return r;
}

// CUDA's last error, per host thread, and what the emulator knows of its cause.
struct ErrorState {
  cudaError_t code = cudaSuccess;
  std::string detail;
};
inline ErrorState& error_state() {
  static thread_local ErrorState e;
  return e;
}
inline cudaError_t fail(cudaError_t code, std::string detail) {
  ErrorState& e = error_state();
  if (e.code == cudaSuccess) {
    e.code = code;
    e.detail = std::move(detail);
  }
  return code;
}
inline const std::string& last_error_detail() { return error_state().detail; }

// ---------------------------------------------------------------- the runtime API used

inline cudaError_t get_last_error() {
  const cudaError_t c = error_state().code;
  error_state().code = cudaSuccess;
  return c;
}
inline cudaError_t peek_at_last_error() { return error_state().code; }

inline const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unrecognized error code";
  }
}

inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return fail(cudaErrorInvalidValue, "the emulator has one device, 0");
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = settings().sm_count.load(); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = kWarpSize; return cudaSuccess;
    default:
      return fail(cudaErrorInvalidValue,
                  "cudaDeviceGetAttribute: attribute " + std::to_string(attr) + " is not emulated");
  }
}

inline cudaError_t memset_async(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

// ---------------------------------------------------------------- launches

// The kernel's name with its template arguments, e.g. "forward_rows_kernel<float, 0, true, 32>".
template <auto K>
const char* kernel_name() {
  static const std::string name = [](std::string s) {
    const size_t at = s.find("K = ");
    s = at == std::string::npos ? s : s.substr(at + 4);
    if (!s.empty() && s.back() == ']') s.pop_back();
    if (!s.empty() && s.front() == '&') s.erase(0, 1);
    const size_t args = std::min(s.find('<'), s.size());
    const size_t scope = s.rfind("::", args);
    return scope == std::string::npos ? s : s.substr(scope + 2);
  }(__PRETTY_FUNCTION__);
  return name.c_str();
}

template <auto K>
struct Registered {
  static const int id;
};
template <auto K>
const int Registered<K>::id = registry().add(kernel_name<K>());

// The block runner of this OS thread: its fibers' stacks serve every launch.
inline Block& runner() {
  static thread_local Block b;
  return b;
}

// The kernel's parameters, as the values a launch copies.
template <typename F>
struct ParamsOf;
template <typename... P>
struct ParamsOf<void (*)(P...)> {
  using type = std::tuple<std::decay_t<P>...>;
};

template <auto K, typename Tuple>
void invoke(const void* args) {
  std::apply(K, *static_cast<const Tuple*>(args));
}

inline std::string check_config(const char* name, const dim3& grid, const dim3& block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  std::string why;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    why = "a grid of " + str(uint3{grid.x, grid.y, grid.z}) + " has no blocks";
  } else if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    why = "grid " + str(uint3{grid.x, grid.y, grid.z}) +
          " exceeds the limits (2^31 - 1, 65535, 65535)";
  } else if (threads == 0 || threads > 1024 || block.z > 64) {
    why = "a block of " + str(uint3{block.x, block.y, block.z}) + " threads (" +
          std::to_string(threads) + "): a block holds 1 to 1024 threads, at most 64 along z";
  }
  return why.empty() ? why : std::string(name) + ": " + why;
}

// K<<<grid, block, 0, stream>>>(args...): every block runs to completion before this returns
// (the stream is ignored: the work is done when it is queued). A failure (bad launch shape, device
// assert, divergence) becomes the last error, as a launch or kernel failure would on a GPU.
template <auto K, typename... Args>
void launch(dim3 grid, dim3 block, cudaStream_t, Args... args) {
  const char* name = kernel_name<K>();
  registry().count(Registered<K>::id);
  std::string bad = check_config(name, grid, block);
  if (!bad.empty()) {
    fail(cudaErrorInvalidConfiguration, std::move(bad));
    return;
  }
  using Tuple = typename ParamsOf<decltype(K)>::type;
  const Tuple params(args...);  // converted to the parameters' types and copied, as on the GPU
  const Kernel kernel{name, &invoke<K, Tuple>, &params};
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  static std::atomic<uint64_t> launches{0};
  const uint64_t seed = launches.fetch_add(1);
  const bool shuffle = settings().shuffle_blocks.load();
  if (shuffle) std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
  for (uint64_t b : order) {
    const uint3 idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                    static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    std::string failed = runner().run(kernel, grid, block, idx, shuffle);
    if (!failed.empty()) {
      fail(cudaErrorLaunchFailure, std::move(failed));
      return;
    }
  }
}

}  // namespace wl_emu
