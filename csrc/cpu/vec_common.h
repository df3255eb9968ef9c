// Vector helpers shared by the CPU kernels of both losses: the accumulation type, block loads and
// stores between the storage dtype and acc, exp, horizontal sums, the dtype switch. Included by
// the kernel headers inside their capability namespace (see cross_entropy_avx2.cpp), so each
// capability gets its own copy.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../loss_math.h"
#include "../params.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Blocks of B = 2 vector widths of acc, loaded from and stored to scalar_t.
template <typename scalar_t>
struct IO {
  using acc_t = typename AccOf<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();
  static constexpr int64_t B = 2 * W;
  static constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;

  static inline void load(const scalar_t* p, Vec& a, Vec& b) {
    if constexpr (kSame) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + W);
    } else {
      at::vec::load_to_float<scalar_t>(p, a, b);
    }
  }
  // n < B valid elements; the rest read as zero.
  static inline void load(const scalar_t* p, int64_t n, Vec& a, Vec& b) {
    if (n == B) return load(p, a, b);
    acc_t tmp[B] = {};
    for (int64_t k = 0; k < n; ++k) tmp[k] = static_cast<acc_t>(p[k]);
    a = Vec::loadu(tmp);
    b = Vec::loadu(tmp + W);
  }
  static inline void store(scalar_t* p, const Vec& a, const Vec& b) {
    if constexpr (kSame) {
      a.store(p);
      b.store(p + W);
    } else {
      at::vec::convert_from_float<scalar_t>(a, b).store(p);
    }
  }
  static inline void store(scalar_t* p, int64_t n, const Vec& a, const Vec& b) {
    if (n == B) return store(p, a, b);
    acc_t tmp[B];
    a.store(tmp);
    b.store(tmp + W);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<scalar_t>(tmp[k]);
  }
};

// vexp's steps for float v: n = round(v / ln2), r = v - n ln2 and P(r) with exp(r) = 1 + r P(r)
// (the polynomial but for its last step), and 2^n times an e near 1 by the exponent bits.
struct ExpParts {
  Vectorized<float> n, r, P;
  explicit ExpParts(const Vectorized<float>& v) {
    using V = Vectorized<float>;
    const V x = at::vec::clamp_min(v, V(-87.f));
    n = (x * V(1.44269504088896341f)).round();
    r = at::vec::fmadd(n, V(-0.693145751953125f), x);
    r = at::vec::fmadd(n, V(-1.42860682030941723212e-6f), r);
    P = V(1.9875691500e-4f);
    P = at::vec::fmadd(P, r, V(1.3981999507e-3f));
    P = at::vec::fmadd(P, r, V(8.3334519073e-3f));
    P = at::vec::fmadd(P, r, V(4.1665795894e-2f));
    P = at::vec::fmadd(P, r, V(1.6666665459e-1f));
    P = at::vec::fmadd(P, r, V(5.0000001201e-1f));
    P = at::vec::fmadd(P, r, V(1.f));
  }
  // 2^n e, and 0 where v was below -87 (or NaN)
  Vectorized<float> scaled(const Vectorized<float>& e, const Vectorized<float>& v) const {
    using VI = Vectorized<int32_t>;
    const VI scale = at::vec::convert_to_int_of_same_size(n) << VI(23);
    return at::vec::cast<float>(at::vec::cast<int32_t>(e) + scale) & (v >= Vectorized<float>(-87.f));
  }
};

// exp for the softmax and BCE's exp(-|x|), inlined (Sleef's exp is an out-of-line call, which
// made the kernels compute-bound; at::vec's exp_u20 is about 20 ulp, which made the float32 loss
// and gradients several times less exact than PyTorch's). For float: Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, and a degree-7 Taylor-like polynomial of r in Horner form (Cephes'
// expf coefficients), then 2^n by the exponent bits: at most 0.9 ulp (measured over [-87, 0.5])
// with fused multiply-adds. Valid for v <= 88 (the kernels call it with v <= 0); below -87, where
// exp is subnormal, it gives 0, and -inf gives 0. NaN gives 0 too (one mask, not two): callers
// that can meet a NaN handle it themselves (cross-entropy per row, BCE per element).
// Sleef's 1-ulp exp for double (which keeps NaN).
inline Vectorized<float> vexp(const Vectorized<float>& v) {
  const ExpParts x(v);
  return x.scaled(at::vec::fmadd(x.P, x.r, Vectorized<float>(1.f)), v);
}
inline Vectorized<double> vexp(const Vectorized<double>& v) {
  return v.exp();
}

// p = exp(v) (vexp's bits) and q = 1 - p (= -expm1(v)) for v <= 0 from one polynomial: vexp's
// exp(r) = 1 + r P(r), so with v = n ln2 + r, q = -r P(r) where n = 0 (no cancellation as p -> 1),
// (1 - r P(r)) / 2 where n = -1, and 1 - p below (p < 0.36): about an ulp of q throughout, at the
// cost of one exp (the focal losses need both: Sleef's expm1 besides vexp cost twice as much).
// double: exp and expm1.
inline void vexp_pq(const Vectorized<float>& v, Vectorized<float>& p, Vectorized<float>& q) {
  using V = Vectorized<float>;
  const V one(1.f), zero(0.f);
  const ExpParts x(v);
  const V rp = x.P * x.r;
  p = x.scaled(at::vec::fmadd(x.P, x.r, one), v);
  q = V::blendv(one - p, (one - rp) * V(0.5f), x.n == V(-1.f));
  q = V::blendv(q, zero - rp, x.n == zero);
}
inline void vexp_pq(const Vectorized<double>& v, Vectorized<double>& p, Vectorized<double>& q) {
  p = v.exp();
  q = Vectorized<double>(0) - v.expm1();
}

// Stores a full block of B = 2 vectors of float to p, 64-byte aligned, bypassing the cache where
// the ISA has streaming stores: a gradient written once and not read back by this kernel then
// costs no read-for-ownership of its lines (a third of a lane backward's memory traffic). Call
// stream_fence() before the data is read by another thread. Other dtypes, and the baseline
// build, store normally.
template <typename scalar_t>
inline void stream_store(scalar_t* p, const Vectorized<float>& a, const Vectorized<float>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + Vectorized<float>::size(), b);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_stream_ps(p, a);
    _mm256_stream_ps(p + Vectorized<float>::size(), b);
    return;
  }
#endif
  IO<scalar_t>::store(p, a, b);
}
template <typename scalar_t>
inline void stream_store(scalar_t* p, const Vectorized<double>& a, const Vectorized<double>& b) {
  IO<scalar_t>::store(p, a, b);
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// A pair of float vectors' lanes kept in double: each take() adds the float lanes lane by lane,
// independent adds the compiler vectorizes (a horizontal sum in double per flush was a chain of
// 32 dependent adds, 20% of a smoothed row's time), and zeroes them. Rows (for_blocks_flushed)
// take one sum() at the end; the lane layout, a row per lane, loads the lanes back rounded once.
template <typename acc_t>
struct DoubleLanes {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();
  double d[2 * W] = {};
  inline void take(Vec& a, Vec& b) {
    acc_t tmp[2 * W];
    a.store(tmp);
    b.store(tmp + W);
    for (int64_t k = 0; k < 2 * W; ++k) d[k] += static_cast<double>(tmp[k]);
    a = b = Vec(0);
  }
  inline double sum() const {
    double s = 0;
    for (int64_t k = 0; k < 2 * W; ++k) s += d[k];
    return s;
  }
  inline void load(Vec& a, Vec& b) const {
    acc_t tmp[2 * W];
    for (int64_t k = 0; k < 2 * W; ++k) tmp[k] = static_cast<acc_t>(d[k]);
    a = Vec::loadu(tmp);
    b = Vec::loadu(tmp + W);
  }
};

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  acc_t tmp[Vectorized<acc_t>::size()];
  v.store(tmp);
  acc_t s = 0;
  for (int64_t k = 0; k < Vectorized<acc_t>::size(); ++k) s += tmp[k];
  return s;
}

// Runs body(k, n, std::true_type) over the full blocks [k, k + B) of [0, count) and
// body(k, n, std::false_type) once over the tail of n < B elements, if any.
template <int64_t B, typename F>
inline void for_blocks(int64_t count, F&& body) {
  const int64_t nv = count - count % B;
  for (int64_t k = 0; k < nv; k += B) body(k, B, std::true_type{});
  if (nv < count) body(nv, count - nv, std::false_type{});
}

// for_blocks in chunks of kFlushBlocks blocks, calling flush() after each: a long row's float
// vector sums go to double every chunk, so no lane adds more than kFlushBlocks terms in float
// (a float lane of 4,000 terms cost the smoothed and focal losses up to 3x PyTorch's error at
// 128k classes).
constexpr int64_t kFlushBlocks = 8;
template <int64_t B, typename F, typename G>
inline void for_blocks_flushed(int64_t count, F&& body, G&& flush) {
  for (int64_t c0 = 0; c0 < count; c0 += kFlushBlocks * B) {
    const int64_t n = std::min(kFlushBlocks * B, count - c0);
    for_blocks<B>(n, [&](int64_t k, int64_t cnt, auto full) { body(c0 + k, cnt, full); });
    flush();
  }
}

// s += v compensated (Kahan): the sum within a few ulp whatever the count of terms, at three
// more vector operations per term; c holds the low part lost so far (start both at 0).
template <typename Vec>
C10_ALWAYS_INLINE void kahan_add(Vec& s, Vec& c, const Vec& v) {
  const Vec y = v - c;
  const Vec t = s + y;
  c = (t - s) - y;
  s = t;
}

// The lane layout's per-lane weighted sums (a row per lane, its classes added one by one) go to
// DoubleLanes every kLaneFlush classes and come back rounded once, so a lane adds at most
// kLaneFlush terms in float (a row of 1,000 classes once cost the smoothed loss 4.5x PyTorch's
// error). Rows of at most kLaneFlush classes never flush.
constexpr int64_t kLaneFlush = 32;

// The two halves of a block of n <= B elements: valid lanes from v, the rest from fill.
template <typename Vec>
inline void keep_valid(int64_t n, const Vec& fill, Vec& v0, Vec& v1) {
  constexpr int64_t W = Vec::size();
  v0 = Vec::set(fill, v0, std::min<int64_t>(n, W));
  v1 = Vec::set(fill, v1, std::max<int64_t>(0, n - W));
}

// q^gamma for the focal losses: gamma 2 (the usual one) and 1 as products, exact and a few times
// faster than pow.
template <typename acc_t>
inline Vectorized<acc_t> pow_gamma(const Vectorized<acc_t>& q, acc_t gamma) {
  if (gamma == acc_t(2)) return q * q;
  if (gamma == acc_t(1)) return q;
  if (gamma == acc_t(0)) return Vectorized<acc_t>(1);
  return q.pow(Vectorized<acc_t>(gamma));
}

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, and atanh(s) / s as a
// degree-4 polynomial in s^2 on [0, 1/9] (least squares on Chebyshev nodes; 4e-9 off in exact
// arithmetic, about 4 ulp in float). Inline, and accurate for tiny e, where log(1 + e) would
// round to 0.
inline Vectorized<float> log1p_unit(const Vectorized<float>& e) {
  using V = Vectorized<float>;
  const V s = e / (e + V(2.f));
  const V s2 = s * s;
  V r = V(0.14087328f);
  r = at::vec::fmadd(r, s2, V(0.13980709f));
  r = at::vec::fmadd(r, s2, V(0.20012426f));
  r = at::vec::fmadd(r, s2, V(0.33333158f));
  r = at::vec::fmadd(r, s2, V(1.f));
  return (s + s) * r;
}
inline Vectorized<double> log1p_unit(const Vectorized<double>& e) {
  return e.log1p();
}

// The arithmetic the shared formulas (../loss_math.h) take from their caller, for vectors of
// acc: a mask is a vector of all-ones or all-zeros lanes, as at::vec's comparisons give.
template <typename acc_t>
struct VecOps {
  using V = Vectorized<acc_t>;
  static C10_ALWAYS_INLINE V where(const V& mask, const V& a, const V& b) {
    return V::blendv(b, a, mask);
  }
  static C10_ALWAYS_INLINE V fma(const V& a, const V& b, const V& c) {
    return at::vec::fmadd(a, b, c);
  }
  static C10_ALWAYS_INLINE V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static C10_ALWAYS_INLINE V log1p_unit(const V& e) { return CPU_CAPABILITY::log1p_unit(e); }
  static C10_ALWAYS_INLINE V log1p(const V& x) { return x.log1p(); }
  static C10_ALWAYS_INLINE V log(const V& x) { return x.log(); }
  static C10_ALWAYS_INLINE V pow_gamma(const V& q, acc_t gamma) {
    return CPU_CAPABILITY::pow_gamma(q, gamma);
  }
};

template <typename acc_t>
inline void load_acc(const acc_t* w, int64_t n, Vectorized<acc_t>& a, Vectorized<acc_t>& b) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  if (n == 2 * W) {
    a = Vectorized<acc_t>::loadu(w);
    b = Vectorized<acc_t>::loadu(w + W);
  } else {
    a = Vectorized<acc_t>::loadu(w, std::min<int64_t>(n, W));
    b = Vectorized<acc_t>::loadu(w + W, std::max<int64_t>(0, n - W));
  }
}

template <typename acc_t>
inline void store_acc(acc_t* p, int64_t n, const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
  constexpr int64_t W = Vectorized<acc_t>::size();
  if (n == 2 * W) {
    a.store(p);
    b.store(p + W);
  } else {
    a.store(p, std::min<int64_t>(n, W));
    if (n > W) b.store(p + W, n - W);
  }
}

// Tensors that mixed precision may store as acc beside 16-bit logits (params.h: the loss and its
// gradient, loss_dtype): one value, or a block of n <= B, as scalar_t or, with as_acc, as acc.
template <typename scalar_t>
inline void store_value(void* base, bool as_acc, int64_t i, double v) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (as_acc) {
    static_cast<acc_t*>(base)[i] = static_cast<acc_t>(v);
  } else {
    static_cast<scalar_t*>(base)[i] = static_cast<scalar_t>(v);
  }
}
template <typename scalar_t>
inline double load_value(const void* base, bool as_acc, int64_t i) {
  using acc_t = typename AccOf<scalar_t>::type;
  return as_acc ? static_cast<double>(static_cast<const acc_t*>(base)[i])
                : static_cast<double>(static_cast<const scalar_t*>(base)[i]);
}
template <typename scalar_t>
inline void store_values(void* base, bool as_acc, int64_t i, int64_t n,
                         const Vectorized<typename AccOf<scalar_t>::type>& a,
                         const Vectorized<typename AccOf<scalar_t>::type>& b) {
  if (as_acc) {
    store_acc(static_cast<typename AccOf<scalar_t>::type*>(base) + i, n, a, b);
  } else {
    IO<scalar_t>::store(static_cast<scalar_t*>(base) + i, n, a, b);
  }
}
template <typename scalar_t>
inline void load_values(const void* base, bool as_acc, int64_t i, int64_t n,
                        Vectorized<typename AccOf<scalar_t>::type>& a,
                        Vectorized<typename AccOf<scalar_t>::type>& b) {
  if (as_acc) {
    load_acc(static_cast<const typename AccOf<scalar_t>::type*>(base) + i, n, a, b);
  } else {
    IO<scalar_t>::load(static_cast<const scalar_t*>(base) + i, n, a, b);
  }
}
// Whether a tensor of dtype `stored` beside logits of scalar_t is stored as acc (mixed precision).
template <typename scalar_t>
inline bool stored_as_acc(DType stored, DType dtype) {
  return !std::is_same_v<scalar_t, typename AccOf<scalar_t>::type> && stored != dtype;
}

template <typename F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::Float64: return f(double{});
    case DType::Float32: return f(float{});
    case DType::BFloat16: return f(c10::BFloat16{});
    case DType::Float16: return f(c10::Half{});
  }
  TORCH_INTERNAL_ASSERT(false, "weighted_loss: unknown dtype");
}

// f(scalar_t{}, target_t{}): the logits' dtype, and the targets' (params.h: target_dtype), which
// is the logits' or, beside 16-bit logits, acc (float).
template <typename F>
void dispatch_dtypes(DType dt, DType target_dt, F&& f) {
  dispatch_dtype(dt, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccOf<scalar_t>::type;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (target_dt != dt) return f(tag, acc_t{});
    }
    return f(tag, tag);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
