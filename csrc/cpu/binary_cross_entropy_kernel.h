// CPU kernels of the fused BCE with logits, written once against at::vec and compiled once per CPU
// capability (binary_cross_entropy_{default,avx2,avx512}.cpp include this file). Include it from
// those files only.
//
// Math, per element with logit x, target t in [0, 1], weight w and pos_weight P (1 when absent):
//   loss  = w [ (1 - t) x - (1 + (P - 1) t) log sigmoid(x) ]                      (PyTorch's)
//         = w [ (1 + (P - 1) t) log1p(e) + (1 - t) max(x, 0) + P t max(-x, 0) ],  e = exp(-|x|)
//   (the log-sigmoid split on the sign of x, -log sigmoid(x) = max(-x, 0) + log1p(e)): no exp
//   overflows and nothing cancels for |x| up to the dtype's range.
//   dloss/dx = w [ (1 + (P - 1) t) sigmoid(x) - P t ],  sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e)
//   dloss/dt = w [ (P - 1) softplus(-x) - x ],  softplus(-x) = -log sigmoid(x)
// and with the focal switch (Focal, binary_cross_entropy_math.h) the loss and both gradients
// times its factors. The elementwise math is in binary_cross_entropy_math.h, the traversal here.
// Both passes read x and t once; the forward reduces in the same pass over fixed blocks of
// kBlock elements whose partial sums are added in block order (the same bits for any thread
// count); the backward writes each wanted gradient element once. Broadcast weights are read
// through their strides (BroadcastWeight), never expanded.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../params.h"
#include "binary_cross_entropy_math.h"
#include "kernels.h"
#include "vec_common.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

// Elements per reduction block, and blocks per parallel task (about 64K elements).
constexpr int64_t kBlock = 4096;
constexpr int64_t kGrainBlocks = 16;

// One weight along a row segment: a vector load when contiguous, one value otherwise.
template <typename acc_t, bool Contiguous>
inline void load_weight(const acc_t* w, int64_t n, Vectorized<acc_t>& a, Vectorized<acc_t>& b) {
  if constexpr (Contiguous) {
    load_acc(w, n, a, b);
  } else {
    a = b = Vectorized<acc_t>(*w);
  }
}

// One block of n <= B elements from k on, as acc: logits, targets (stored as target_t: the
// logits' dtype, or acc beside 16-bit logits), weights. Full: n == B.
template <typename scalar_t, typename target_t, bool WC, bool PC, bool Full>
inline void load_elements(const scalar_t* x, const target_t* t,
                          const typename AccOf<scalar_t>::type* w,
                          const typename AccOf<scalar_t>::type* pw, int64_t k, int64_t n,
                          Vectorized<typename AccOf<scalar_t>::type> (&xv)[2],
                          Vectorized<typename AccOf<scalar_t>::type> (&tv)[2],
                          Vectorized<typename AccOf<scalar_t>::type> (&wv)[2],
                          Vectorized<typename AccOf<scalar_t>::type> (&pv)[2]) {
  using acc_t = typename AccOf<scalar_t>::type;
  if constexpr (Full) {
    IO<scalar_t>::load(x + k, xv[0], xv[1]);
    IO<target_t>::load(t + k, tv[0], tv[1]);
  } else {
    IO<scalar_t>::load(x + k, n, xv[0], xv[1]);
    IO<target_t>::load(t + k, n, tv[0], tv[1]);
  }
  load_weight<acc_t, WC>(w + (WC ? k : 0), n, wv[0], wv[1]);
  load_weight<acc_t, PC>(pw + (PC ? k : 0), n, pv[0], pv[1]);
}

// Rows shorter than this are not walked row by row (a call and a partial block each): their
// weights are gathered element by element into buffers of kChunk and read as contiguous.
constexpr int64_t kGatherRow = 32;
constexpr int64_t kChunk = 256;

inline bool gathers(const BinaryCrossEntropyParams& p) {
  return p.outer_dims > 0 && p.inner < kGatherRow;
}

// One call's pointers and constants: logits of scalar_t, targets (and their gradient) of
// target_t, the loss (and its gradient) of scalar_t or, with loss_acc, acc.
template <typename scalar_t_, typename target_t_>
struct BceCtx {
  using scalar_t = scalar_t_;
  using target_t = target_t_;
  using acc_t = typename AccOf<scalar_t>::type;
  const BinaryCrossEntropyParams& p;
  const scalar_t* x;
  const target_t* t;
  const acc_t* w;    // the weight, or `one` when absent (inner stride 0)
  const acc_t* pw;
  const acc_t* al;   // the alpha tensor, or nullptr: the scalar alpha
  acc_t one = 1, alpha;
  bool focal, al_contiguous, loss_acc;
  Focal<acc_t> fl;

  explicit BceCtx(const BinaryCrossEntropyParams& prm) : p(prm) {
    focal = p.focal_gamma >= 0;
    fl = {static_cast<acc_t>(focal ? p.focal_gamma : 0.0), focal && p.focal_alpha >= 0};
    if (focal && p.focal_alpha >= 0 && p.alpha.data == nullptr) {
      fl.one_minus_alpha = static_cast<acc_t>(1.0 - p.focal_alpha);
    }
    al = focal ? static_cast<const acc_t*>(p.alpha.data) : nullptr;
    alpha = static_cast<acc_t>(p.focal_alpha);
    al_contiguous = p.alpha.inner_stride == 1 || gathers(p);
    x = static_cast<const scalar_t*>(p.input);
    t = static_cast<const target_t*>(p.target);
    loss_acc = stored_as_acc<scalar_t>(p.loss_dtype, p.dtype);
    w = p.weight.data ? static_cast<const acc_t*>(p.weight.data) : &one;
    pw = p.pos_weight.data ? static_cast<const acc_t*>(p.pos_weight.data) : &one;
  }
};

// The alpha of the n <= B elements from k on (a, from for_segments) as two vectors.
template <typename Cx>
inline void load_alpha(const Cx& cx, const typename Cx::acc_t* a, int64_t k, int64_t n,
                       Vectorized<typename Cx::acc_t> (&av)[2]) {
  using V = Vectorized<typename Cx::acc_t>;
  if (a == nullptr) {
    av[0] = av[1] = V(cx.alpha);
  } else if (cx.al_contiguous) {
    load_acc(a + k, n, av[0], av[1]);
  } else {
    av[0] = av[1] = V(*a);
  }
}

// Where the weights of element f = r * inner + i are: each weight's offset for row r, from r's
// multi-index over outer_sizes, counted up like an odometer from one division at the start.
struct RowCursor {
  const BinaryCrossEntropyParams& p;
  int64_t i, ow = 0, opw = 0, oa = 0;
  int64_t idx[kMaxBroadcastDims] = {};

  RowCursor(const BinaryCrossEntropyParams& prm, int64_t f) : p(prm) {
    int64_t r = f / p.inner;
    i = f % p.inner;
    for (int d = p.outer_dims - 1; d >= 0; --d) {
      idx[d] = r % p.outer_sizes[d];
      r /= p.outer_sizes[d];
      ow += idx[d] * p.weight.strides[d];
      opw += idx[d] * p.pos_weight.strides[d];
      oa += idx[d] * p.alpha.strides[d];
    }
  }
  inline int64_t w_off() const { return ow + i * p.weight.inner_stride; }
  inline int64_t pw_off() const { return opw + i * p.pos_weight.inner_stride; }
  inline int64_t a_off() const { return oa + i * p.alpha.inner_stride; }
  inline void next_row() {
    i = 0;
    for (int d = p.outer_dims - 1; d >= 0; --d) {
      ow += p.weight.strides[d];
      opw += p.pos_weight.strides[d];
      oa += p.alpha.strides[d];
      if (++idx[d] < p.outer_sizes[d]) return;
      ow -= idx[d] * p.weight.strides[d];
      opw -= idx[d] * p.pos_weight.strides[d];
      oa -= idx[d] * p.alpha.strides[d];
      idx[d] = 0;
    }
  }
};

// Calls seg(f, n, w, pw, a) on pieces covering elements [f0, f1): n elements from f, with each
// present weight's values for them at w (pw, a: the alpha tensor): contiguous, or one value when
// the weight is constant along the piece. Absent weights point at a single 1; a at nullptr.
template <typename Cx, typename F>
inline void for_segments(const Cx& cx, int64_t f0, int64_t f1, F&& seg) {
  using acc_t = typename Cx::acc_t;
  const auto& p = cx.p;
  const bool has_w = p.weight.data != nullptr, has_pw = p.pos_weight.data != nullptr;
  const bool has_a = cx.al != nullptr;
  RowCursor cur(p, f0);
  if (gathers(p)) {
    acc_t wbuf[kChunk], pbuf[kChunk], abuf[kChunk];
    auto gather = [](acc_t* dst, const acc_t* src, int64_t stride, int64_t n) {
      if (stride == 0) {
        std::fill_n(dst, n, *src);
      } else {
        std::copy_n(src, n, dst);
      }
    };
    for (int64_t f = f0; f < f1; f += kChunk) {
      const int64_t m = std::min(kChunk, f1 - f);
      for (int64_t j = 0; j < m;) {
        const int64_t n = std::min(p.inner - cur.i, m - j);
        if (has_w) gather(wbuf + j, cx.w + cur.w_off(), p.weight.inner_stride, n);
        if (has_pw) gather(pbuf + j, cx.pw + cur.pw_off(), p.pos_weight.inner_stride, n);
        if (has_a) gather(abuf + j, cx.al + cur.a_off(), p.alpha.inner_stride, n);
        j += n;
        cur.i += n;
        if (cur.i == p.inner) cur.next_row();
      }
      seg(f, m, has_w ? wbuf : cx.w, has_pw ? pbuf : cx.pw, has_a ? abuf : nullptr);
    }
    return;
  }
  for (int64_t f = f0; f < f1;) {
    const int64_t n = std::min(p.inner - cur.i, f1 - f);
    seg(f, n, has_w ? cx.w + cur.w_off() : cx.w, has_pw ? cx.pw + cur.pw_off() : cx.pw,
        has_a ? cx.al + cur.a_off() : nullptr);
    f += n;
    cur.next_row();
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <typename Cx, bool WC, bool PC, bool Store, bool Prob>
inline void forward_segment(const Cx& cx, int64_t f, int64_t n, const typename Cx::acc_t* w,
                            const typename Cx::acc_t* pw, const typename Cx::acc_t* a,
                            double* sum) {
  using scalar_t = typename Cx::scalar_t;
  using acc_t = typename Cx::acc_t;
  using Io = IO<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t B = Io::B;
  const scalar_t* x = cx.x + f;
  const auto* t = cx.t + f;
  auto* out = static_cast<scalar_t*>(cx.p.loss) + f;
  for_blocks<B>(n, [&](int64_t k, int64_t cnt, auto full) {
    V xv[2], tv[2], wv[2], pv[2];
    load_elements<scalar_t, typename Cx::target_t, WC, PC, decltype(full)::value>(
        x, t, w, pw, k, cnt, xv, tv, wv, pv);
    V l0, l1;
    if constexpr (Prob) {  // probabilities: each checked in [0, 1], as PyTorch's forward does
      TORCH_CHECK(!outside_unit(xv[0]) && !outside_unit(xv[1]),
                  "all elements of input should be between 0 and 1");
      l0 = bce_prob_loss(xv[0], tv[0], pv[0]) * wv[0];
      l1 = bce_prob_loss(xv[1], tv[1], pv[1]) * wv[1];
    } else {
      l0 = bce_loss(xv[0], tv[0], pv[0]) * wv[0];
      l1 = bce_loss(xv[1], tv[1], pv[1]) * wv[1];
    }
    if (cx.focal) {
      V av[2];
      load_alpha(cx, a, k, cnt, av);
      l0 = l0 * cx.fl.factor(xv[0], tv[0], av[0], exp_neg_abs(xv[0]));
      l1 = l1 * cx.fl.factor(xv[1], tv[1], av[1], exp_neg_abs(xv[1]));
    }
    if constexpr (Store) {
      if (cx.loss_acc) {
        store_values<scalar_t>(cx.p.loss, true, f + k, cnt, l0, l1);
      } else if constexpr (decltype(full)::value) {
        Io::store(out + k, l0, l1);
      } else {
        Io::store(out + k, cnt, l0, l1);
      }
    } else {
      // added in double, lane by lane: a float sum of terms of both signs (negative weights)
      // would lose what PyTorch's cascade sum keeps
      if constexpr (!decltype(full)::value) keep_valid(cnt, V(0), l0, l1);
      acc_t tmp[B];
      l0.store(tmp);
      l1.store(tmp + Io::W);
      for (int64_t j = 0; j < B; ++j) sum[j] += static_cast<double>(tmp[j]);
    }
  });
}

template <typename Cx, bool WC, bool PC, bool Prob>
void forward(const Cx& cx) {
  using scalar_t = typename Cx::scalar_t;
  using acc_t = typename Cx::acc_t;
  const auto& p = cx.p;
  const int64_t blocks = (p.numel + kBlock - 1) / kBlock;
  if (p.reduction == Reduction::None) {
    at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b, int64_t e) {
      for_segments(cx, b * kBlock, std::min(p.numel, e * kBlock),
                   [&](int64_t f, int64_t n, const acc_t* w, const acc_t* pw, const acc_t* a) {
                     forward_segment<Cx, WC, PC, true, Prob>(cx, f, n, w, pw, a, nullptr);
                   });
    });
    return;
  }
  std::vector<double> part(blocks, 0.0);
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b, int64_t e) {
    for (int64_t blk = b; blk < e; ++blk) {
      double sum[IO<scalar_t>::B] = {};
      for_segments(cx, blk * kBlock, std::min(p.numel, (blk + 1) * kBlock),
                   [&](int64_t f, int64_t n, const acc_t* w, const acc_t* pw, const acc_t* a) {
                     forward_segment<Cx, WC, PC, false, Prob>(cx, f, n, w, pw, a, sum);
                   });
      double total = 0;
      for (const double v : sum) total += v;
      part[blk] = total;
    }
  });
  double total = 0;
  for (const double v : part) total += v;
  if (p.reduction == Reduction::Mean) total /= static_cast<double>(p.numel);  // 0/0: NaN, as torch
  store_value<scalar_t>(p.loss, cx.loss_acc, 0, total);
}

// ---------------------------------------------------------------------------------------------
// Backward. g is the upstream gradient of the element's loss (divided by numel for the mean).

template <typename Cx, bool WC, bool PC, bool GX, bool GT, bool GScalar, bool Prob>
inline void backward_segment(const Cx& cx, int64_t f, int64_t n, const typename Cx::acc_t* w,
                             const typename Cx::acc_t* pw, const typename Cx::acc_t* a,
                             typename Cx::acc_t g_scalar) {
  using scalar_t = typename Cx::scalar_t;
  using target_t = typename Cx::target_t;
  using acc_t = typename Cx::acc_t;
  using Io = IO<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t B = Io::B;
  const auto& p = cx.p;
  const scalar_t* x = cx.x + f;
  const target_t* t = cx.t + f;
  auto* gx = static_cast<scalar_t*>(p.grad_input) + f;
  auto* gt = static_cast<target_t*>(p.grad_target) + f;
  const V zero(0), one(1);
  for_blocks<B>(n, [&](int64_t k, int64_t cnt, auto full) {
    constexpr bool kFull = decltype(full)::value;
    V xv[2], tv[2], wv[2], pv[2], g0, g1, u0, u1;  // u: the upstream gradient, g: times w
    load_elements<scalar_t, target_t, WC, PC, kFull>(x, t, w, pw, k, cnt, xv, tv, wv, pv);
    if constexpr (GScalar) {
      u0 = u1 = V(g_scalar);
      g0 = wv[0] * V(g_scalar);
      g1 = wv[1] * V(g_scalar);
    } else {
      load_values<scalar_t>(p.grad_loss, cx.loss_acc, f + k, cnt, u0, u1);
      g0 = u0 * wv[0];
      g1 = u1 * wv[1];
    }
    V av[2] = {V(1), V(1)};  // read by the focal gradients only
    if (cx.focal) load_alpha(cx, a, k, cnt, av);
    auto grads = [&](const V& xv, const V& tv, const V& av, const V& pv, const V& gv,
                     const V& uv, const V& wh, V& dx, V& dt) {
      if constexpr (Prob) {  // probabilities (binary_cross_entropy_math.h)
        if constexpr (GX) dx = math::bce_prob_grad<VecOps<acc_t>>(xv, tv, pv, uv, wh);
        if constexpr (GT) dt = gv * math::bce_prob_grad_target<VecOps<acc_t>>(xv, pv);
        return;
      }
      const V e = exp_neg_abs(xv);
      if constexpr (GX) {
        if (cx.focal) {
          dx = gv * cx.fl.grad(xv, tv, av, pv, e, bce_loss(xv, tv, pv));
        } else {
          dx = gv * math::bce_grad<VecOps<acc_t>>(xv, tv, pv, e);
        }
      }
      if constexpr (GT) {
        const V dce_t = math::bce_grad_target<VecOps<acc_t>>(xv, pv, log1p_unit(e));
        dt = gv * (cx.focal ? cx.fl.grad_target(xv, tv, av, e, bce_loss(xv, tv, pv), dce_t)
                            : dce_t);
      }
    };
    V dx0, dx1, dt0, dt1;
    grads(xv[0], tv[0], av[0], pv[0], g0, u0, wv[0], dx0, dt0);
    grads(xv[1], tv[1], av[1], pv[1], g1, u1, wv[1], dx1, dt1);
    if constexpr (kFull) {
      if constexpr (GX) Io::store(gx + k, dx0, dx1);
      if constexpr (GT) IO<target_t>::store(gt + k, dt0, dt1);
    } else {
      if constexpr (GX) Io::store(gx + k, cnt, dx0, dx1);
      if constexpr (GT) IO<target_t>::store(gt + k, cnt, dt0, dt1);
    }
  });
}

template <typename Cx, bool WC, bool PC, bool GX, bool GT, bool GScalar, bool Prob>
void backward(const Cx& cx) {
  using acc_t = typename Cx::acc_t;
  const auto& p = cx.p;
  acc_t g = 0;
  if constexpr (GScalar) {
    g = static_cast<acc_t>(load_value<typename Cx::scalar_t>(p.grad_loss, cx.loss_acc, 0));
    if (p.reduction == Reduction::Mean) g /= static_cast<acc_t>(p.numel);
  }
  const int64_t blocks = (p.numel + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b, int64_t e) {
    for_segments(cx, b * kBlock, std::min(p.numel, e * kBlock),
                 [&](int64_t f, int64_t n, const acc_t* w, const acc_t* pw, const acc_t* a) {
                   backward_segment<Cx, WC, PC, GX, GT, GScalar, Prob>(cx, f, n, w, pw, a, g);
                 });
  });
}

// ---------------------------------------------------------------------------------------------
// Compile-time switches: contiguous or per-row weights; which gradients; scalar upstream gradient;
// probabilities (params.h: prob_input, whose target has the input's dtype: the glue checks it).

template <typename scalar_t, typename target_t, typename F>
void dispatch_prob(const BinaryCrossEntropyParams& p, F&& f) {
  if constexpr (std::is_same_v<scalar_t, target_t>) {
    if (p.prob_input) return f(std::true_type{});
  }
  f(std::false_type{});
}

template <typename F>
void dispatch_weights(const BinaryCrossEntropyParams& p, F&& f) {
  const bool g = gathers(p);
  const bool wc = p.weight.data != nullptr && (p.weight.inner_stride == 1 || g);
  const bool pc = p.pos_weight.data != nullptr && (p.pos_weight.inner_stride == 1 || g);
  if (wc) {
    if (pc) return f(std::true_type{}, std::true_type{});
    return f(std::true_type{}, std::false_type{});
  }
  if (pc) return f(std::false_type{}, std::true_type{});
  return f(std::false_type{}, std::false_type{});
}

}  // namespace

void binary_cross_entropy_forward(const BinaryCrossEntropyParams& p) {
  if (p.numel == 0 && p.reduction == Reduction::None) return;
  dispatch_dtypes(p.dtype, p.target_dtype, [&](auto tag, auto target_tag) {
    using Cx = BceCtx<decltype(tag), decltype(target_tag)>;
    const Cx cx(p);
    dispatch_prob<decltype(tag), decltype(target_tag)>(p, [&](auto prob) {
      dispatch_weights(p, [&](auto wc, auto pc) {
        forward<Cx, decltype(wc)::value, decltype(pc)::value, decltype(prob)::value>(cx);
      });
    });
  });
}

void binary_cross_entropy_backward(const BinaryCrossEntropyParams& p) {
  if (p.numel == 0) return;
  dispatch_dtypes(p.dtype, p.target_dtype, [&](auto tag, auto target_tag) {
    using Cx = BceCtx<decltype(tag), decltype(target_tag)>;
    const Cx cx(p);
    dispatch_prob<decltype(tag), decltype(target_tag)>(p, [&](auto prob) {
      constexpr bool Prob = decltype(prob)::value;
      dispatch_weights(p, [&](auto wc, auto pc) {
        constexpr bool WC = decltype(wc)::value, PC = decltype(pc)::value;
        auto with_g = [&](auto gx, auto gt) {
          constexpr bool GX = decltype(gx)::value, GT = decltype(gt)::value;
          if (p.grad_loss_scalar) {
            backward<Cx, WC, PC, GX, GT, true, Prob>(cx);
          } else {
            backward<Cx, WC, PC, GX, GT, false, Prob>(cx);
          }
        };
        if (p.grad_input != nullptr && p.grad_target != nullptr) {
          with_g(std::true_type{}, std::true_type{});
        } else if (p.grad_input != nullptr) {
          with_g(std::true_type{}, std::false_type{});
        } else if (p.grad_target != nullptr) {
          with_g(std::false_type{}, std::true_type{});
        }
      });
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
