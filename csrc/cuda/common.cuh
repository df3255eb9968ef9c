// Device helpers shared by the CUDA kernels: the accumulation type, conversions between the
// storage dtypes and it, and the one way a kernel is launched. CUDA headers and params.h only (no
// torch), so the kernels compile with nvcc alone (make cuda-check) and, with the emulator, with
// the host compiler (tests/emulator/: the tests' build only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#if !defined(__CUDACC__)
#include "cuda_emulator.h"  // tests/emulator/, on the emulated build's include path
#endif
#include "../loss_math.h"
#include "kernels.h"

namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS {

// Kernel<<<grid, block, 0, stream>>>(args...) under nvcc; built by the host compiler, the
// emulator runs it (and counts it by name and template arguments).
template <auto Kernel, typename... Args>
inline void launch(dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
#if defined(__CUDACC__)
  Kernel<<<grid, block, 0, stream>>>(args...);
#else
  wl_emu::launch<Kernel>(grid, block, stream, args...);
#endif
}

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return v; }

// Runs f(scalar_t{}) for the storage dtype.
template <typename F>
inline cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::Float64: return f(double{});
    case DType::Float32: return f(float{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// f(T{}, U{}): the logits' storage dtype T and the targets' U (params.h: target_dtype), which is
// T or, beside 16-bit logits, float (mixed precision).
template <typename F>
inline cudaError_t dispatch_dtypes(DType dt, DType target_dt, F&& f) {
  return dispatch_dtype(dt, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 2) {
      if (target_dt != dt) return f(tag, float{});
    }
    return f(tag, tag);
  });
}

// 16 bytes of consecutive elements, loaded and stored as one vector.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// N consecutive elements of E beside a Pack of N logits: a Pack itself when E is their dtype,
// 32 bytes (two 16-byte loads) for float beside bfloat16/float16 (mixed precision).
template <typename E, int N>
struct alignas(16) Elems {
  E v[N];
};

// p viewed as vectors of V: p must be aligned as V is. The emulator checks it, where a GPU
// would fault on a misaligned address.
template <typename V, typename E>
__device__ __forceinline__ const V* vector_ptr(const E* p) {
#if !defined(__CUDACC__)
  assert(reinterpret_cast<uintptr_t>(p) % alignof(V) == 0 && "misaligned vector access");
#endif
  return reinterpret_cast<const V*>(p);
}
template <typename V, typename E>
__device__ __forceinline__ V* vector_ptr(E* p) {
#if !defined(__CUDACC__)
  assert(reinterpret_cast<uintptr_t>(p) % alignof(V) == 0 && "misaligned vector access");
#endif
  return reinterpret_cast<V*>(p);
}

// A value of a tensor that mixed precision may store as acc beside 16-bit logits (params.h: the
// loss and its gradient, loss_dtype): as T, or with as_acc as acc.
template <typename T, typename acc_t>
__device__ __forceinline__ void store_value(void* base, bool as_acc, int64_t i, acc_t v) {
  if (as_acc) {
    static_cast<acc_t*>(base)[i] = v;
  } else {
    static_cast<T*>(base)[i] = from_acc<T>(v);
  }
}
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type load_value(const void* base, bool as_acc,
                                                              int64_t i) {
  using acc_t = typename AccOf<T>::type;
  return as_acc ? static_cast<const acc_t*>(base)[i] : to_acc(static_cast<const T*>(base)[i]);
}

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
