// Device helpers shared by the CUDA kernels: the accumulation type, conversions between the
// storage dtypes and it, and the one way a kernel is launched. CUDA headers and params.h only (no
// torch), so the kernels compile with nvcc alone (make cuda-check) and, with the emulator, with
// the host compiler (emulator/).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#if !defined(__CUDACC__)
#include "emulator/cuda_emulator.h"
#endif
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
// q^gamma for the focal losses: the usual gamma = 2 (and 1) as products, exact to the rounding
// of one multiply where pow is a few ulp and some 20 instructions (the CPU's pow_gamma).
template <typename acc_t>
__device__ __forceinline__ acc_t pow_gamma(acc_t q, acc_t gamma) {
  if (gamma == acc_t(2)) return q * q;
  if (gamma == acc_t(1)) return q;
  return pow(q, gamma);
}

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

// 16 bytes of consecutive elements, loaded and stored as one vector.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

}  // namespace weighted_loss::WEIGHTED_LOSS_CUDA_NS
