#include <cctype>
#include <cstdlib>
#include <string>

#include "kernels.h"

namespace weighted_loss::cpu {
namespace {

#define WEIGHTED_LOSS_KERNELS(cap)                                                     \
  Kernels {                                                                            \
    #cap, &cap::cross_entropy_forward, &cap::cross_entropy_backward,                   \
        &cap::cross_entropy_target_backward, &cap::binary_cross_entropy_forward,       \
        &cap::binary_cross_entropy_backward                                            \
  }

enum Level { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

Level cpu_level() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kDefault;
}

Level env_cap(Level level) {
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env == nullptr) return level;
  std::string v(env);
  for (auto& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (v == "default") return kDefault;
  if (v == "avx2") return level < kAvx2 ? level : kAvx2;
  return level;
}

Kernels choose() {
#if defined(__x86_64__) || defined(_M_X64)
  switch (env_cap(cpu_level())) {
    case kAvx512: return WEIGHTED_LOSS_KERNELS(AVX512);
    case kAvx2: return WEIGHTED_LOSS_KERNELS(AVX2);
    default: break;
  }
#endif
  return WEIGHTED_LOSS_KERNELS(DEFAULT);
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k = choose();
  return k;
}

}  // namespace weighted_loss::cpu
