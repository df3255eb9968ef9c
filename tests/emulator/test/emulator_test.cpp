// The emulator's own tests: kernels that use each feature correctly give the GPU's answer, and
// kernels that break a rule fail their launch with a message naming what and where. Built and run
// by tests/test_emulator.py (plain host compiler, CUDA headers, no torch); exits non-zero and
// names the first check that failed.
#include <cassert>

#include "../cuda_emulator.h"

#include <cstdio>
#include <string>
#include <vector>

namespace {

int failures = 0;

#define CHECK(cond, ...)                                                              \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::printf("FAIL %s:%d: %s ", __FILE__, __LINE__, #cond);                      \
      std::printf(__VA_ARGS__);                                                       \
      std::printf("\n");                                                              \
      ++failures;                                                                     \
    }                                                                                 \
  } while (0)

// The error of the last launch, and its detail; clears it.
std::pair<cudaError_t, std::string> last() {
  const std::string detail = wl_emu::last_error_detail();
  const cudaError_t e = cudaGetLastError();
  return {e, e == cudaSuccess ? std::string() : detail};
}

bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// ---------------------------------------------------------------- kernels that are right

// Sum of v[0..n) by a grid of 256-thread blocks: a shuffle tree per warp, the warps' sums through
// shared memory, and the last block to finish adds the blocks' partials (done-counter).
__global__ void sum_kernel(const double* v, long n, double* partial, unsigned* done, double* out) {
  __shared__ double warp_sums[8];
  __shared__ bool last;
  double s = 0;
  for (long i = blockIdx.x * 256L + threadIdx.x; i < n; i += 256L * gridDim.x) s += v[i];
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double b = 0;
    for (int w = 0; w < 8; ++w) b += warp_sums[w];
    partial[blockIdx.x] = b;
    __threadfence();
    last = atomicAdd(done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    double t = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) t += partial[b];
    *out = t;
  }
}

// Each thread writes its flat global index, from 3-D blocks in a 3-D grid.
__global__ void index_kernel(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[block * (blockDim.x * blockDim.y * blockDim.z) + thread] = block * 1000 + thread;
}

// Every shuffle kind over one warp: lane l's value is 100 + l.
__global__ void shuffle_kernel(int* out) {
  const int l = threadIdx.x, v = 100 + l;
  out[0 * 32 + l] = __shfl_sync(0xffffffffu, v, 5);
  out[1 * 32 + l] = __shfl_up_sync(0xffffffffu, v, 3);
  out[2 * 32 + l] = __shfl_down_sync(0xffffffffu, v, 3);
  out[3 * 32 + l] = __shfl_xor_sync(0xffffffffu, v, 1);
  out[4 * 32 + l] = __shfl_down_sync(0xffffffffu, v, 2, 8);  // within groups of 8 lanes
  out[5 * 32 + l] = __shfl_sync(0xffffffffu, v, 1, 8);
}

// Shared memory is the block's: each block sums its own threads' indices through it.
__global__ void shared_kernel(int* out) {
  __shared__ int slots[64];
  slots[threadIdx.x] = static_cast<int>(blockIdx.x * 64 + threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int i = 0; i < 64; ++i) s += slots[i];
    out[blockIdx.x] = s;
  }
}

// Lanes of half a warp shuffle among themselves (mask 0xffff), the others do not.
__global__ void half_warp_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x < 16) v += __shfl_down_sync(0x0000ffffu, v, 8, 16);
  out[threadIdx.x] = v;
}

// ---------------------------------------------------------------- kernels that break a rule

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_before_barrier_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_against_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
  } else {
    __syncthreads();
  }
}

__global__ void partial_warp_kernel(int* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
}

__global__ void assert_kernel(const long* v, long n) {
  const long i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) assert(v[i] >= 0 && "value is negative");
}

__global__ void noop_kernel() {}

template <typename T, int N>
__global__ void templated_kernel(T* out) {
  out[threadIdx.x] = static_cast<T>(N);
}

// ---------------------------------------------------------------- the checks

void right_answers() {
  const long n = 100003;
  std::vector<double> v(n);
  double want = 0;
  for (long i = 0; i < n; ++i) want += (v[i] = static_cast<double>(i % 97) - 40);
  const unsigned blocks = 37;
  std::vector<double> partial(blocks);
  unsigned done = 0;
  double out = 0;
  wl_emu::launch<sum_kernel>(blocks, 256, nullptr, v.data(), n, partial.data(), &done, &out);
  CHECK(last().first == cudaSuccess, "sum_kernel failed");
  CHECK(out == want, "sum %f, want %f", out, want);
  CHECK(done == blocks, "done-counter %u", done);

  const dim3 grid(3, 2, 2), block(4, 3, 2);
  std::vector<unsigned> idx(12 * 24, 0xffffffffu);
  wl_emu::launch<index_kernel>(grid, block, nullptr, idx.data());
  CHECK(last().first == cudaSuccess, "index_kernel failed");
  for (unsigned i = 0; i < idx.size(); ++i) CHECK(idx[i] == (i / 24) * 1000 + i % 24, "idx[%u] = %u", i, idx[i]);

  std::vector<int> sh(6 * 32);
  wl_emu::launch<shuffle_kernel>(1, 32, nullptr, sh.data());
  CHECK(last().first == cudaSuccess, "shuffle_kernel failed");
  for (int l = 0; l < 32; ++l) {
    const int seg = l & ~7;
    CHECK(sh[l] == 105, "shfl lane %d: %d", l, sh[l]);
    CHECK(sh[32 + l] == (l >= 3 ? 100 + l - 3 : 100 + l), "shfl_up lane %d: %d", l, sh[32 + l]);
    CHECK(sh[64 + l] == (l + 3 < 32 ? 103 + l : 100 + l), "shfl_down lane %d: %d", l, sh[64 + l]);
    CHECK(sh[96 + l] == 100 + (l ^ 1), "shfl_xor lane %d: %d", l, sh[96 + l]);
    CHECK(sh[128 + l] == (l - seg + 2 < 8 ? 102 + l : 100 + l), "width 8 lane %d: %d", l, sh[128 + l]);
    CHECK(sh[160 + l] == 100 + seg + 1, "shfl width 8 lane %d: %d", l, sh[160 + l]);
  }

  std::vector<int> sums(5);
  wl_emu::launch<shared_kernel>(5, 64, nullptr, sums.data());
  CHECK(last().first == cudaSuccess, "shared_kernel failed");
  for (int b = 0; b < 5; ++b) CHECK(sums[b] == 64 * 64 * b + 63 * 32, "block %d: %d", b, sums[b]);

  std::vector<int> half(32);
  wl_emu::launch<half_warp_kernel>(1, 32, nullptr, half.data());
  CHECK(last().first == cudaSuccess, "half_warp_kernel failed: %s", wl_emu::last_error_detail().c_str());
  for (int l = 0; l < 32; ++l) CHECK(half[l] == (l < 8 ? 2 * l + 8 : l < 16 ? 2 * l : l), "half warp lane %d: %d", l, half[l]);
}

void loud_failures() {
  std::vector<int> out(64);
  wl_emu::launch<divergent_barrier_kernel>(2, 64, nullptr, out.data());
  auto [e, why] = last();
  CHECK(e == cudaErrorLaunchFailure && has(why, "barrier divergence") &&
            has(why, "divergent_barrier_kernel") && has(why, "block ("),
        "%s", why.c_str());

  wl_emu::launch<exit_before_barrier_kernel>(1, 64, nullptr, out.data());
  std::tie(e, why) = last();
  CHECK(e == cudaErrorLaunchFailure && has(why, "thread (5,0,0) exited") && has(why, "__syncthreads"),
        "%s", why.c_str());

  wl_emu::launch<exited_lane_kernel>(1, 32, nullptr, out.data());
  std::tie(e, why) = last();
  CHECK(e == cudaErrorLaunchFailure && has(why, "lane 3") && has(why, "has exited"), "%s", why.c_str());

  wl_emu::launch<shuffle_against_barrier_kernel>(1, 32, nullptr, out.data());
  std::tie(e, why) = last();
  CHECK(e == cudaErrorLaunchFailure && has(why, "waits at __syncthreads"), "%s", why.c_str());

  wl_emu::launch<partial_warp_kernel>(1, 40, nullptr, out.data());
  std::tie(e, why) = last();
  CHECK(e == cudaErrorLaunchFailure && has(why, "only 8 threads"), "%s", why.c_str());

  wl_emu::launch<noop_kernel>(1, 2048, nullptr);
  std::tie(e, why) = last();
  CHECK(e == cudaErrorInvalidConfiguration && has(why, "noop_kernel") && has(why, "2048"), "%s", why.c_str());
  wl_emu::launch<noop_kernel>(0, 32, nullptr);
  std::tie(e, why) = last();
  CHECK(e == cudaErrorInvalidConfiguration && has(why, "no blocks"), "%s", why.c_str());
  wl_emu::launch<noop_kernel>(dim3(1, 70000), 32, nullptr);
  std::tie(e, why) = last();
  CHECK(e == cudaErrorInvalidConfiguration && has(why, "limits"), "%s", why.c_str());

  std::vector<long> v(1000, 1);
  v[777] = -3;
  wl_emu::launch<assert_kernel>(4, 256, nullptr, v.data(), static_cast<long>(v.size()));
  std::tie(e, why) = last();
  CHECK(e == cudaErrorAssert && has(why, "block: [3,0,0], thread: [9,0,0]") &&
            has(why, "value is negative") && has(why, "assert_kernel"),
        "%s", why.c_str());
  CHECK(std::string(cudaGetErrorString(cudaErrorAssert)) == "device-side assert triggered", "string");
  // the emulator goes on after a failed launch
  wl_emu::launch<sum_kernel>(1, 256, nullptr, static_cast<const double*>(nullptr), 0L,
                             std::vector<double>(1).data(), std::vector<unsigned>(1).data(),
                             std::vector<double>(1).data());
  CHECK(last().first == cudaSuccess, "launch after a failure");
}

void device_and_registry() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess && sms == 132,
        "default SM count %d", sms);
  wl_emu::settings().sm_count = 8;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  CHECK(sms == 8, "SM count %d after setting 8", sms);
  wl_emu::settings().sm_count = 132;

  std::vector<float> f(4);
  std::vector<double> d(4);
  wl_emu::launch<templated_kernel<float, 3>>(1, 4, nullptr, f.data());
  wl_emu::launch<templated_kernel<float, 3>>(1, 4, nullptr, f.data());
  wl_emu::launch<templated_kernel<double, 7>>(1, 4, nullptr, d.data());
  CHECK(f[3] == 3.0f && d[0] == 7.0, "templated kernels ran");
  bool seen_f = false, seen_d = false;
  for (const auto& [name, count] : wl_emu::registry().snapshot()) {
    if (name == "templated_kernel<float, 3>") seen_f = count == 2;
    if (name == "templated_kernel<double, 7>") seen_d = count == 1;
  }
  CHECK(seen_f && seen_d, "launch counts by name and template arguments");
  CHECK(wl_emu::fast_expf(0.0f) == 1.0f && wl_emu::fast_expf(-200.0f) == 0.0f &&
            std::isnan(wl_emu::fast_expf(NAN)) && std::isinf(wl_emu::fast_expf(INFINITY)),
        "__expf corners");
}

}  // namespace

int main() {
  right_answers();
  loud_failures();
  device_and_registry();
  if (failures == 0) std::printf("emulator_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
