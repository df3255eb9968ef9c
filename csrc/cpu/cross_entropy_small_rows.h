// The CPU cross-entropy over class-contiguous rows of at most kSmallClasses classes: B rows at a
// time transposed into a tile and run through the lane code (cross_entropy_lanes.h). Part of
// cross_entropy_kernel.h; included by it only.
#pragma once

#include "cross_entropy_lanes_backward.h"

namespace weighted_loss::cpu {
namespace CPU_CAPABILITY {
namespace {

// ---------------------------------------------------------------------------------------------
// Class-contiguous rows with few classes (a classifier with 10 classes, channels-last
// segmentation): vectorizing along a row of 19 would spend more on per-row horizontal work than
// on the row. Blocks of B rows are transposed into a small (C x B) tile on the stack and go
// through the lane-layout code, one lane per row.

constexpr int64_t kSmallClasses = 64;

template <typename scalar_t>
inline Units small_row_units(const CrossEntropyParams& p) {
  constexpr int64_t B = IO<scalar_t>::B;
  const int64_t rows = p.outer * p.inner;
  int64_t per = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.classes));
  per = (per + B - 1) / B * B;
  return {(rows + per - 1) / per, per, 0};
}

// Offsets of the rows r0 .. r0 + nl - 1 (one division for the block, not one per row).
template <typename scalar_t>
inline void row_offsets(const Ctx<scalar_t>& cx, int64_t r0, int64_t nl, int64_t* off) {
  int64_t o = r0 / cx.p.inner, i = r0 % cx.p.inner;
  for (int64_t k = 0; k < nl; ++k) {
    off[k] = cx.offset(o, i);
    if (++i == cx.p.inner) {
      i = 0;
      ++o;
    }
  }
}

template <typename scalar_t, typename T>
inline void gather_tile(const Ctx<scalar_t>& cx, const T* src, const int64_t* off, int64_t nl,
                        T* tile) {
  constexpr int64_t B = IO<scalar_t>::B;
  for (int64_t k = 0; k < nl; ++k) {
    const T* row = src + off[k];
    for (int64_t c = 0; c < cx.C; ++c) tile[c * B + k] = row[c];
  }
}

// Rows r0 .. r0 + nl - 1 into (C x B) tiles: their offsets, logits and (probabilities) target
// rows.
template <typename scalar_t, int M>
inline void load_row_tile(const Ctx<scalar_t>& cx, int64_t r0, int64_t nl, int64_t* off,
                          scalar_t* xt, Target<scalar_t, M>* tt) {
  row_offsets(cx, r0, nl, off);
  gather_tile(cx, cx.x, off, nl, xt);
  if constexpr (is_prob(M)) gather_tile(cx, cx.template target<M>(0), off, nl, tt);
}

template <typename scalar_t, int M, bool HasW>
void forward_small_rows(const Ctx<scalar_t>& cx) {
  constexpr int64_t B = IO<scalar_t>::B;
  const auto& p = cx.p;
  const Units u = small_row_units<scalar_t>(p);
  const int64_t rows = p.outer * p.inner;
  forward_units(cx, u.count, [&](int64_t unit, double& sl, double& sw) {
    alignas(64) scalar_t xt[kSmallClasses * B];
    alignas(64) Target<scalar_t, M> tt[is_prob(M) ? kSmallClasses * B : 1];
    LaneTile<scalar_t> lt;
    const int64_t r_end = std::min(rows, (unit + 1) * u.rows);
    for (int64_t r0 = unit * u.rows; r0 < r_end; r0 += B) {
      const int64_t nl = std::min(B, r_end - r0);
      int64_t off[B];
      load_row_tile<scalar_t, M>(cx, r0, nl, off, xt, tt);
      lanes_max<scalar_t, M>(cx, xt, tt, cx.C, B, nl, lt, /*pf=*/false);
      lanes_block_forward<scalar_t, M, HasW>(cx, xt, tt, B, nl, r0, sl, sw, lt, nullptr, nullptr, 0,
                                             lt);
    }
  });
}

template <typename scalar_t, int M, bool HasW>
void backward_small_rows(const Ctx<scalar_t>& cx) {
  constexpr int64_t B = IO<scalar_t>::B;
  const auto& p = cx.p;
  const Units u = small_row_units<scalar_t>(p);
  const int64_t rows = p.outer * p.inner;
  const double g_all = p.reduction == Reduction::None ? 0.0 : scalar_grad<scalar_t>(p);
  auto* gi = static_cast<scalar_t*>(p.grad_input);
  at::parallel_for(0, u.count, 1, [&](int64_t b, int64_t e) {
    alignas(64) scalar_t xt[kSmallClasses * B], gt[kSmallClasses * B];
    alignas(64) Target<scalar_t, M> tt[is_prob(M) ? kSmallClasses * B : 1];
    for (int64_t unit = b; unit < e; ++unit) {
      const int64_t r_end = std::min(rows, (unit + 1) * u.rows);
      for (int64_t r0 = unit * u.rows; r0 < r_end; r0 += B) {
        const int64_t nl = std::min(B, r_end - r0);
        int64_t off[B];
        load_row_tile<scalar_t, M>(cx, r0, nl, off, xt, tt);
        lanes_block_backward<scalar_t, M, HasW>(cx, xt, tt, gt, B, nl, r0, g_all, false,
                                                /*pf=*/false);
        for (int64_t k = 0; k < nl; ++k) {
          scalar_t* row = gi + off[k] + (r0 + k) / p.inner * (p.grad_stride_outer - p.stride_outer);
          for (int64_t c = 0; c < cx.C; ++c) row[c] = gt[c * B + k];
        }
      }
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace weighted_loss::cpu
