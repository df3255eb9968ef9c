// What a .cu file sees when the host compiler builds it to run in the emulator (common.cuh
// includes this header when __CUDACC__ is not defined): the CUDA headers, then the device side of
// CUDA the kernels use, defined on top of block.h and runtime.h. Under a host compiler the CUDA
// headers define __global__, __device__ and __host__ as nothing, which is what we want of them;
// the rest is defined here:
//   threadIdx, blockIdx, blockDim, gridDim, warpSize   the running fiber's
//   __shared__                                         one instance per OS thread, which runs one
//                                                      block at a time: per block
//   __syncthreads(), __shfl_{,up_,down_,xor_}sync()    real waits of the block / warp (block.h)
//   atomicAdd, __threadfence                           host atomics and fences
//   __expf                                             exp2f(x * log2 e), flushing what would be a
//                                                      denormal to 0, as the GPU's ex2.approx.ftz
//   assert                                             a device assert: the launch fails with
//                                                      cudaErrorAssert, naming block and thread
//   cudaGetLastError, cudaPeekAtLastError, cudaGetErrorString, cudaGetDevice,
//   cudaDeviceGetAttribute, cudaMemsetAsync            the emulator's (runtime.h)
// Include this header after <cassert> (a later <cassert> would bring back the host's assert).
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulator.h is for the host compiler; nvcc compiles the .cu files as they are"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cassert>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <string>
#include <type_traits>

#include "block.h"
#include "runtime.h"

namespace wl_emu {

inline Block& block() { return *Block::current(); }

inline void syncthreads(const char* file, int line) {
  Block& b = block();
  Thread& t = b.thread();
  t.state = Thread::kBarrier;
  t.site = Site{file, line};
  b.wait();
}

template <typename T>
T shfl(Shfl kind, const char* file, int line, unsigned mask, T var, int arg,
       int width = kWarpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t),
                "a shuffled value is at most 8 bytes");
  Block& b = block();
  Thread& t = b.thread();
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    b.set_failure(b.where(t) + ": shuffle at " + Site{file, line}.str() + " with width " +
                  std::to_string(width) + ", not a power of 2 up to 32");
    b.exit();
  }
  t.state = Thread::kShuffle;
  t.site = Site{file, line};
  t.mask = mask;
  t.kind = kind;
  t.arg = arg;
  t.width = width;
  t.value = 0;
  std::memcpy(&t.value, &var, sizeof(T));
  b.wait();
  T out;
  std::memcpy(&out, &t.result, sizeof(T));
  return out;
}

[[noreturn]] inline void device_assert(const char* expr, const char* file, int line,
                                       const char* func) {
  Block* b = Block::current();
  if (b == nullptr) {  // host code: the host's assert
    std::fprintf(stderr, "%s:%d: %s: Assertion `%s' failed.\n", file, line, func, expr);
    std::abort();
  }
  {  // the message CUDA prints for a failed device assert; gone before the stack is abandoned
    const Thread& t = b->thread();
    const uint3& bi = b->idx();
    std::string msg = std::string(file) + ":" + std::to_string(line) + ": " + func +
                      ": block: [" + std::to_string(bi.x) + "," + std::to_string(bi.y) + "," +
                      std::to_string(bi.z) + "], thread: [" + std::to_string(t.idx.x) + "," +
                      std::to_string(t.idx.y) + "," + std::to_string(t.idx.z) + "] Assertion `" +
                      expr + "` failed (in " + b->where(t) + ")";
    fail(cudaErrorAssert, msg);
    b->set_failure(std::move(msg));
  }
  b->exit();
}

inline unsigned atomic_add(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline int atomic_add(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomic_add(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);
}
template <typename F, typename = std::enable_if_t<std::is_floating_point_v<F>>>
F atomic_add(F* a, F v) {
  return std::atomic_ref<F>(*a).fetch_add(v);
}

inline void threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline float fast_expf(float x) {
  const float y = std::exp2(x * 1.44269504088896341f);
  return y < FLT_MIN ? 0.0f : y;  // NaN stays NaN
}

}  // namespace wl_emu

#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static thread_local
#define threadIdx (::wl_emu::block().thread().idx)
#define blockIdx (::wl_emu::block().idx())
#define blockDim (::wl_emu::block().dim())
#define gridDim (::wl_emu::block().grid())
#define warpSize (::wl_emu::kWarpSize)
#define __syncthreads() ::wl_emu::syncthreads(__FILE__, __LINE__)
#define __shfl_sync(...) ::wl_emu::shfl(::wl_emu::Shfl::kIdx, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::wl_emu::shfl(::wl_emu::Shfl::kUp, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::wl_emu::shfl(::wl_emu::Shfl::kDown, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::wl_emu::shfl(::wl_emu::Shfl::kXor, __FILE__, __LINE__, __VA_ARGS__)
#define atomicAdd ::wl_emu::atomic_add
#define __threadfence ::wl_emu::threadfence
#define __expf ::wl_emu::fast_expf
#undef assert
#define assert(e) \
  (static_cast<bool>(e) ? void(0) : ::wl_emu::device_assert(#e, __FILE__, __LINE__, __func__))
#define cudaGetLastError ::wl_emu::get_last_error
#define cudaPeekAtLastError ::wl_emu::peek_at_last_error
#define cudaGetErrorString ::wl_emu::error_string
#define cudaGetDevice ::wl_emu::get_device
#define cudaDeviceGetAttribute ::wl_emu::device_get_attribute
#define cudaMemsetAsync ::wl_emu::memset_async
