// CPU kernels of the fused cross-entropy, written once against at::vec and compiled once per CPU
// capability: cross_entropy_{default,avx2,avx512}.cpp define CPU_CAPABILITY and include this file,
// so everything here lands in weighted_loss::cpu::<capability> and dispatch.cpp picks one at run
// time. Include it from those files only. The math and the layouts: cross_entropy_common.h (the
// focal loss's: cross_entropy_focal.h); the paths: cross_entropy_rows.h, cross_entropy_lanes.h
// (its backward: cross_entropy_lanes_backward.h) and cross_entropy_small_rows.h; here the
// gradient of probability targets, the compile-time switches and the entry points.

#include "cross_entropy_common.h"
#include "cross_entropy_focal.h"
#include "cross_entropy_lanes.h"
#include "cross_entropy_lanes_backward.h"
#include "cross_entropy_rows.h"
#include "cross_entropy_small_rows.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------
// Gradient of the loss with respect to probability targets: -g (1 - s) w_k (x_k - lse), times
// m_k = (1 - p_k)^gamma for the focal loss (its loss is sum_c w_c t'_c m_c nll_c).

template <typename scalar_t, int M, bool HasW>
void target_backward(const Ctx<scalar_t>& cx) {
  using io = IO<scalar_t>;
  using tio = IO<Target<scalar_t, M>>;
  using acc_t = typename io::acc_t;
  using Vec = typename io::Vec;
  constexpr int64_t B = io::B, W = io::W;
  const auto& p = cx.p;
  const int64_t C = cx.C, rows = p.outer * p.inner, sC = p.stride_class;
  const double g_all = p.reduction == Reduction::None ? 0.0 : scalar_grad<scalar_t>(p);
  const auto* sh_in = static_cast<const acc_t*>(p.lse);
  const auto* L_in = sh_in + rows;
  auto* gt = static_cast<Target<scalar_t, M>*>(p.grad_target);
  const bool none = p.reduction == Reduction::None;
  const acc_t gamma = static_cast<acc_t>(cx.gamma);
  auto coef = [&](int64_t r) {
    const double g = none ? cx.grad_loss(r) : g_all;
    return static_cast<acc_t>(-g * math::smoothing_scale(p.label_smoothing));
  };
  if (sC == 1) {
    const Units u = row_units(p);
    at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b * u.rows; r < std::min(rows, e * u.rows); ++r) {
        const int64_t off = cx.offset(r / p.inner, r % p.inner);
        const acc_t k0 = coef(r);
        const Vec vk(k0), vsh(sh_in[r]), vL(L_in[r]);
        for_blocks<B>(C, [&](int64_t k, int64_t cnt, auto full) {
          Vec v0, v1;
          load_block<decltype(full)::value>(cx, cx.x + off + k, k, cnt, v0, v1);
          Vec g0 = vk * ((v0 - vsh) - vL), g1 = vk * ((v1 - vsh) - vL);
          if (gamma > 0) focal_target_factor(gamma, v0, v1, vsh, vsh, vL, vL, g0, g1);
          if constexpr (HasW) {
            Vec w0, w1;
            load_acc(cx.w + k, cnt, w0, w1);
            g0 = g0 * w0;
            g1 = g1 * w1;
          }
          if constexpr (decltype(full)::value) {
            tio::store(gt + off + k, g0, g1);
          } else {
            tio::store(gt + off + k, cnt, g0, g1);
          }
        });
      }
    });
    return;
  }
  const Units u = lane_units<scalar_t>(p);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    for (int64_t unit = b; unit < e; ++unit) {
      const LaneSpan span(p, u, unit);
      const int64_t o = span.o, i_begin = span.begin, i_end = span.end;
      for (int64_t i0 = i_begin; i0 < i_end; i0 += B) {
        const int64_t nl = std::min(B, i_end - i0);
        const int64_t base = cx.offset(o, i0);
        acc_t kk[B] = {};
        for (int64_t k = 0; k < nl; ++k) kk[k] = coef(o * p.inner + i0 + k);
        const Vec k0 = Vec::loadu(kk), k1 = Vec::loadu(kk + W);
        const int64_t r0 = o * p.inner + i0;
        Vec s0, s1, l0, l1;
        load_acc(sh_in + r0, nl, s0, s1);
        load_acc(L_in + r0, nl, l0, l1);
        for (int64_t c = 0; c < C; ++c) {
          Vec v0, v1;
          prefetch(cx.x + base + c * sC + u.rows);
          io::load(cx.x + base + c * sC, nl, v0, v1);
          cx.lane_logits(v0, c);
          cx.lane_logits(v1, c);
          Vec g0 = k0 * ((v0 - s0) - l0), g1 = k1 * ((v1 - s1) - l1);
          if (gamma > 0) focal_target_factor(gamma, v0, v1, s0, s1, l0, l1, g0, g1);
          if constexpr (HasW) {
            const Vec wc(cx.w[c]);
            g0 = g0 * wc;
            g1 = g1 * wc;
          }
          tio::store(gt + base + c * sC, nl, g0, g1);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Compile-time switches.

// Which kernels read the layout: rows along contiguous classes, few-class rows through
// transposed tiles, or lanes along the contiguous spatial axis.
enum class Path { kRows, kSmallRows, kLanes };

inline Path path_of(const CrossEntropyParams& p) {
  if (p.total_classes != p.classes) return Path::kRows;  // a vocab-parallel shard (glue: rows)
  // the overlap sums: the lane code only (the glue gives it stride_inner == 1)
  if (p.overlap_sums != nullptr || p.grad_sums != nullptr) return Path::kLanes;
  if (p.stride_class != 1) return Path::kLanes;
  return p.classes <= kSmallClasses ? Path::kSmallRows : Path::kRows;
}

// f(mode, has_weight) as compile-time constants; probabilities stored as acc beside 16-bit logits
// (params.h: target_dtype) are a mode of their own.
template <typename scalar_t, typename F>
void dispatch_mode(const CrossEntropyParams& p, F&& f) {
  const bool has_w = p.weight != nullptr;
  auto with_w = [&](auto mode) {
    if (has_w) {
      f(mode, std::true_type{});
    } else {
      f(mode, std::false_type{});
    }
  };
  if (p.prob_target) {
    if constexpr (!std::is_same_v<scalar_t, typename AccOf<scalar_t>::type>) {
      if (p.target_dtype != p.dtype) return with_w(std::integral_constant<int, kProbAcc>{});
    }
    with_w(std::integral_constant<int, kProb>{});
  } else if (p.label_smoothing > 0) {
    with_w(std::integral_constant<int, kSmooth>{});
  } else {
    with_w(std::integral_constant<int, kPlain>{});
  }
}

}  // namespace

void cross_entropy_forward(const CrossEntropyParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<typename AccOf<scalar_t>::type> w_buf;
    const Ctx<scalar_t> cx(p, w_buf);
    dispatch_mode<scalar_t>(p, [&](auto mode, auto has_w) {
      constexpr int M = decltype(mode)::value;
      constexpr bool HasW = decltype(has_w)::value;
      if (p.shard_stats != nullptr) {
        if constexpr (!is_prob(M)) forward_shard_rows<scalar_t, M, HasW>(cx);
        return;
      }
      switch (path_of(p)) {
        case Path::kSmallRows: return forward_small_rows<scalar_t, M, HasW>(cx);
        case Path::kRows: return forward_rows<scalar_t, M, HasW>(cx);
        case Path::kLanes: return forward_lanes<scalar_t, M, HasW>(cx);
      }
    });
  });
}

void cross_entropy_backward(const CrossEntropyParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<typename AccOf<scalar_t>::type> w_buf;
    const Ctx<scalar_t> cx(p, w_buf);
    dispatch_mode<scalar_t>(p, [&](auto mode, auto has_w) {
      constexpr int M = decltype(mode)::value;
      constexpr bool HasW = decltype(has_w)::value;
      switch (path_of(p)) {
        case Path::kSmallRows: return backward_small_rows<scalar_t, M, HasW>(cx);
        case Path::kRows: return backward_rows<scalar_t, M, HasW>(cx);
        case Path::kLanes: return backward_lanes<scalar_t, M, HasW>(cx);
      }
    });
  });
}

void cross_entropy_target_backward(const CrossEntropyParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<typename AccOf<scalar_t>::type> w_buf;
    const Ctx<scalar_t> cx(p, w_buf);
    dispatch_mode<scalar_t>(p, [&](auto mode, auto has_w) {
      constexpr int M = decltype(mode)::value;
      if constexpr (is_prob(M)) target_backward<scalar_t, M, decltype(has_w)::value>(cx);
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
