"""Decode-sized int8, int4 and fp32 matrix products for AVX-512 CPUs, compiled on first use; torch's elsewhere.

Why our own: at one to four rows of activations, torch's `_weight_int8pack_mm` (bf16 activations) reads int8
weights at 11-25 GB/s on a 2-core AVX-512 Xeon where MKL's fp32 GEMV reads 28-39 GB/s, and `torch.compile` of the
dequantizing product reaches 9-11; its int4 kernel (`_weight_int4pack_mm_for_cpu`) reads about 9 GB/s in a decode
(bench/README.md, "Laptop decode"). The kernels here read weights packed at load four rows at a time
(`pack_rows`: the 64-byte pieces of four rows side by side, so that a thread's share is one sequential stream the
hardware prefetcher follows), widen the codes to fp32 in registers, use fp32 activations and sums, and run in
parallel over blocks of rows on torch's own threads (`at::parallel_for`):

- `int8_packed_mm`: int8 with one scale per row (torch's int8 layout, packed); up to MAX_ROWS activation rows, 1-4
  against four weight rows a pass, 5-8 against two. `f32_packed_mm`: the same loop over fp32 weights.
- `int4_rows_mm`: int4 of the file layout of `aquila quantize --bits 4` (two codes a byte, low nibble first, a bf16
  (scale, zero) pair per group), its code bytes packed. A byte's low and high nibbles meet x's even and odd columns
  (split once per call); a code becomes (code - 8) in fp32 by one permute from a 16-entry table, each group's sum
  is scaled once, and the zero points add `zero * sum(x over the group)`. One row of activations (batch-1 decode)
  is instead rounded to int8 per weight group, as llama.cpp's q4_0 x q8_0 does, and multiplied with VNNI's vpdpbusd
  where the CPU has it: about half the vector instructions (x is off by up to half a step, max|x| / 254;
  `int4_reference`).

Otherwise they are more exact than torch's bf16-activation kernels, so outputs change in the last bits.

They are built together with torch's C++ extension loader (`ninja` and a C++ compiler; ~20 s once, then cached
under torch's extensions directory) the first time one is needed on a CPU where torch dispatches AVX-512, and each
is checked against a float64 product before use. Without a compiler, elsewhere, or with AQUILA_INT8_KERNEL=0 /
AQUILA_INT4_KERNEL=0 / AQUILA_FP32_KERNEL=0, torch's kernels run (oneDNN or MKL for fp32), with one log line saying
why. `f32_packed_mm` is the int8 kernel's loop over fp32 weights: MKL's matrix-vector product reads fp32 at 15 GB/s
on a 2-core AMD EPYC (83% of the read probe on an Intel Xeon), the packed loop at memory speed on both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 64  # activation rows up to which the int8 and fp32 kernels run; longer prompts: gemm_by_blocks
PACK_BYTES = 64  # the packed layout's pieces: 64 bytes of each of four rows side by side (pack_rows)
_GEMM_BLOCKS = 64  # 4-row blocks unpacked at a time by gemm_by_blocks (256 rows: 2-6 MB of fp32 at 2048-5632 wide)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

static inline __m512 load16(const int8_t* p) {  // 16 int8 weights widened to fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// The int8 and fp32 kernels read weights packed four rows at a time: [N/4][K/P][4][P], the 64-byte pieces of
// columns Pc..Pc+P-1 of rows 4b..4b+3 side by side (`pack_rows`; P = 64 int8 or 16 fp32 weights). A thread's share
// is then one sequential stream, which the hardware prefetcher follows: on a 2-core EPYC int8 read 30 GB/s of a
// 33 GB/s read probe, against 21-25 GB/s for four rows read side by side from [N, K] (with or without software
// prefetch), and MKL's fp32 matrix-vector product read 15 GB/s there.

// MB activation rows (xs floats apart) against J weight rows (j0.., of the 4) of one packed block: each 16 weights
// are loaded (int8: widened to fp32) once and used for every activation row (a block of 4 x K weights stays in L1/L2
// over the passes). J = 4 up to 4 rows, J = 2 for 5 to 8 (8 x 2 sums in registers: half the loads and widenings of
// two passes of 4 x 4). Each output's sum runs in the same order whatever J and MB: a row's result does not depend
// on its batch. out [MB][J]
template <typename W, int J, int MB>
static inline void block_dot(const float* x, int64_t xs, const W* blk, int j0, int64_t K, float* out) {
  constexpr int P = 64 / sizeof(W);
  __m512 acc[J][MB];
  for (int j = 0; j < J; ++j)
    for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K; c += P) {
    const W* p = blk + 4 * c + P * j0;
    for (int q = 0; q < P; q += 16) {
      __m512 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + m * xs + c + q);
      for (int j = 0; j < J; ++j) {
        const __m512 wv = load16(p + P * j + q);
        for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_fmadd_ps(xv[m], wv, acc[j][m]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < J; ++j) out[m * J + j] = _mm512_reduce_add_ps(acc[j][m]);
}

// One block's 4 weight rows against activation rows m0..m0+mb-1 (1 <= mb <= 8) -> t [mb][4].
template <typename W>
static inline void block_rows(const float* x, int64_t K, const W* blk, int64_t mb, float* t) {
  float h[16];
  switch (mb) {
    case 1: block_dot<W, 4, 1>(x, K, blk, 0, K, t); return;
    case 2: block_dot<W, 4, 2>(x, K, blk, 0, K, t); return;
    case 3: block_dot<W, 4, 3>(x, K, blk, 0, K, t); return;
    case 4: block_dot<W, 4, 4>(x, K, blk, 0, K, t); return;
  }
  for (int j0 = 0; j0 < 4; j0 += 2) {
    switch (mb) {
      case 5: block_dot<W, 2, 5>(x, K, blk, j0, K, h); break;
      case 6: block_dot<W, 2, 6>(x, K, blk, j0, K, h); break;
      case 7: block_dot<W, 2, 7>(x, K, blk, j0, K, h); break;
      default: block_dot<W, 2, 8>(x, K, blk, j0, K, h); break;
    }
    for (int64_t m = 0; m < mb; ++m) t[m * 4 + j0] = h[m * 2], t[m * 4 + j0 + 1] = h[m * 2 + 1];
  }
}

// y [M, N] = x [M, K] (fp32) @ (W * scales)^T for W packed ([ceil(N/4), K/P, 4, P], zero rows past N; scales [>= N]
// or null for none), activations up to eight rows at a time.
template <typename W>
static void packed_mm(const float* xp, int64_t M, int64_t K, const W* wp, const float* sp, int64_t N, float* yp) {
  at::parallel_for(0, (N + 3) / 4, 4, [&](int64_t begin, int64_t end) {
    float t[32];
    for (int64_t b = begin; b < end; ++b) {
      const W* blk = wp + b * 4 * K;
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t mb = std::min<int64_t>(8, M - m0);
        block_rows(xp + m0 * K, K, blk, mb, t);
        for (int64_t m = 0; m < mb; ++m)
          for (int64_t j = 0; j < 4 && 4 * b + j < N; ++j)
            yp[(m0 + m) * N + 4 * b + j] = sp ? t[m * 4 + j] * sp[4 * b + j] : t[m * 4 + j];
      }
    }
  });
}

static void check_packed(const torch::Tensor& x, const torch::Tensor& w, int64_t N, int64_t P) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && w.is_contiguous() && x.dim() == 2);
  TORCH_CHECK(w.dim() == 4 && w.size(0) == (N + 3) / 4 && w.size(1) * P == x.size(1) && w.size(2) == 4);
  TORCH_CHECK(w.size(3) == P);
}

// int8 weights with one scale per row. (Rounding one row of x to int8 for VNNI, as the int4 kernel does, read 2-3%
// faster here: the packed read is at memory speed either way, so x stays fp32 and the result exact to fp32.)
torch::Tensor int8_packed_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, int64_t N) {
  check_packed(x, w, N, 64);
  TORCH_CHECK(w.dtype() == torch::kInt8 && scales.dtype() == torch::kFloat32 && scales.is_contiguous());
  TORCH_CHECK(scales.numel() >= N);
  auto y = torch::empty({x.size(0), N}, x.options());
  packed_mm(x.data_ptr<float>(), x.size(0), x.size(1), w.data_ptr<int8_t>(), scales.data_ptr<float>(), N,
            y.data_ptr<float>());
  return y;
}

// fp32 weights (decode and short prompts of fp32 models on CPU, `packing.py`).
torch::Tensor f32_packed_mm(torch::Tensor x, torch::Tensor w, int64_t N) {
  check_packed(x, w, N, 16);
  TORCH_CHECK(w.dtype() == torch::kFloat32);
  auto y = torch::empty({x.size(0), N}, x.options());
  packed_mm<float>(x.data_ptr<float>(), x.size(0), x.size(1), w.data_ptr<float>(), nullptr, N, y.data_ptr<float>());
  return y;
}

static inline float bf16_to_float(uint32_t bits) {
  const uint32_t u = bits << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

static const float kCodeValues[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

// The int4 kernels read the codes packed as the int8 one reads its weights (`pack_rows` of the [N, K/2] bytes):
// four rows' 64-byte pieces side by side, one sequential stream a thread (over the 1B shape's matrices on a 2-core
// EPYC the VNNI path reads 22-25 GB/s of a 33-35 GB/s probe). piece(r, j, c): byte c of row j of the block at r.
static inline const uint8_t* piece(const uint8_t* r, int j, int64_t c) { return r + 4 * (c & ~63) + 64 * j + (c & 63); }

// Dot products of x with the R = 4 int4 rows of a packed block at r (byte c of a row holds columns 2c (low nibble)
// and 2c+1), given x's even columns xe, odd columns xo and per-group sums xg. sz: the rows' (scale, zero) bf16
// pairs as uint32 (scale in the low half), `groups` per row, gb bytes per group (a multiple of 16).
template <int R>
static inline void int4_dot(const float* xe, const float* xo, const float* xg, const uint8_t* r, const uint32_t* sz,
                            int64_t groups, int64_t gb, float* out) {
  const __m512 table = _mm512_loadu_ps(kCodeValues);
  __m512 tot[R];
  float zsum[R];
  for (int j = 0; j < R; ++j) tot[j] = _mm512_setzero_ps(), zsum[j] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[R];
    for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c = g * gb; c < (g + 1) * gb; c += 16) {
      const __m512 ve = _mm512_loadu_ps(xe + c), vo = _mm512_loadu_ps(xo + c);
      for (int j = 0; j < R; ++j) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)piece(r, j, c)));
        // vpermps reads the low 4 bits of each lane: the low nibble as it is, the high one after a shift
        acc[j] = _mm512_fmadd_ps(ve, _mm512_permutexvar_ps(q, table), acc[j]);
        acc[j] = _mm512_fmadd_ps(vo, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table), acc[j]);
      }
    }
    for (int j = 0; j < R; ++j) {
      const uint32_t pair = sz[j * groups + g];
      tot[j] = _mm512_fmadd_ps(acc[j], _mm512_set1_ps(bf16_to_float(pair & 0xFFFFu)), tot[j]);
      zsum[j] += bf16_to_float(pair >> 16) * xg[g];
    }
  }
  for (int j = 0; j < R; ++j) out[j] = _mm512_reduce_add_ps(tot[j]) + zsum[j];
}

// A packed block's R = 4 int4 rows against MB activation rows at once (several sequences decoding together, or a
// prompt four rows at a time): each row's codes are dequantized in registers, (code - 8) * scale + zero, and used
// for all MB rows. x's rows are xs floats apart in xe/xo; out [MB][R].
template <int R, int MB>
static inline void int4_dot_rows(const float* xe, const float* xo, int64_t xs, const uint8_t* r, const uint32_t* sz,
                                 int64_t groups, int64_t gb, float* out) {
  const __m512 table = _mm512_loadu_ps(kCodeValues);
  __m512 acc[R][MB];
  for (int j = 0; j < R; ++j)
    for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    float scale[R], zero[R];
    for (int j = 0; j < R; ++j) {
      const uint32_t pair = sz[j * groups + g];
      scale[j] = bf16_to_float(pair & 0xFFFFu), zero[j] = bf16_to_float(pair >> 16);
    }
    for (int64_t c = g * gb; c < (g + 1) * gb; c += 16) {
      __m512 e[MB], o[MB];
      for (int m = 0; m < MB; ++m) e[m] = _mm512_loadu_ps(xe + m * xs + c), o[m] = _mm512_loadu_ps(xo + m * xs + c);
      for (int j = 0; j < R; ++j) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)piece(r, j, c)));
        const __m512 s = _mm512_set1_ps(scale[j]), z = _mm512_set1_ps(zero[j]);
        const __m512 lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(q, table), s, z);
        const __m512 hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table), s, z);
        for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_fmadd_ps(o[m], hi, _mm512_fmadd_ps(e[m], lo, acc[j][m]));
      }
    }
  }
  for (int j = 0; j < R; ++j)
    for (int m = 0; m < MB; ++m) out[m * R + j] = _mm512_reduce_add_ps(acc[j][m]);
}

// One activation row with int8 activations (llama.cpp's q4_0 x q8_0 idea): x is rounded per weight group to int8
// steps of max|x| / 127 (xqe/xqo: even/odd columns), and 64 bytes of codes (128 columns) meet them in two vpdpbusd.
// Lane l of a 64-byte chunk holds columns 8l..8l+7 of it; per chunk, dxv/qxv/zxv give each lane its group's step,
// -8 * step * (sum of the group's int8 x) and sum of the group's x, both shared out over the group's G / 8 lanes, so
//   sum over lanes of  scale * (D * dx + qx) + zero * zx  =  sum over groups of  scale * sum((q - 8) * x') + zero * sum(x)
// with x' the rounded activations. The R = 4 rows of the packed block at r, rb bytes each; sz the rows' pairs,
// `groups` per row; `lane_group` (each lane's group within its chunk) and `mask` (the chunk's 1, 2 or 4 groups) pick
// the pairs (see int4_rows_mm).
template <int R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void int4_dot_vnni(
    const int8_t* xqe, const int8_t* xqo, const float* dxv, const float* qxv, const float* zxv, const uint8_t* r,
    int64_t rb, const uint32_t* sz, int64_t groups, int64_t group, const int32_t* lane_group, __mmask16 mask, float* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), high16 = _mm512_set1_epi32((int)0xFFFF0000u);
  const __m512i idx = _mm512_loadu_si512(lane_group);
  __m512 tot[R];
  for (int j = 0; j < R; ++j) tot[j] = _mm512_setzero_ps();
  for (int64_t c = 0, ch = 0; c < rb; c += 64, ++ch) {
    const __m512i ve = _mm512_loadu_si512(xqe + c), vo = _mm512_loadu_si512(xqo + c);
    const __m512 dx = _mm512_loadu_ps(dxv + 16 * ch), qx = _mm512_loadu_ps(qxv + 16 * ch);
    const __m512 zx = _mm512_loadu_ps(zxv + 16 * ch);
    const int64_t first = 2 * c / group;  // the chunk's first group
    for (int j = 0; j < R; ++j) {
      const __m512i raw = _mm512_loadu_si512(piece(r, j, c));
      const __m512i lo = _mm512_and_si512(raw, low4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
      const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, ve), hi, vo);
      const __m512i pr = _mm512_permutexvar_epi32(idx, _mm512_maskz_loadu_epi32(mask, sz + j * groups + first));
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pr, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pr, high16));
      tot[j] = _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(d), dx, qx), scale, tot[j]);
      tot[j] = _mm512_fmadd_ps(zero, zx, tot[j]);
    }
  }
  for (int j = 0; j < R; ++j) out[j] = _mm512_reduce_add_ps(tot[j]);
}

// x [1, K] as the int8-activation path uses it: xqe/xqo [K/2] int8, dxv/qxv/zxv [K/128 * 16] (see int4_dot_vnni).
static void quantize_activations(const float* x, int64_t K, int64_t group, int8_t* xqe, int8_t* xqo, float* dxv,
                                 float* qxv, float* zxv) {
  const int64_t groups = K / group;
  std::vector<float> dx(groups), qx(groups), zx(groups);
  for (int64_t g = 0; g < groups; ++g) {
    float amax = 0.f, sum = 0.f;
    for (int64_t k = g * group; k < (g + 1) * group; ++k) amax = std::max(amax, std::fabs(x[k])), sum += x[k];
    const float step = amax / 127.f;
    int32_t qsum = 0;
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const int32_t q = step > 0.f ? (int32_t)std::nearbyint(x[k] / step) : 0;
      qsum += q;
      (k % 2 ? xqo : xqe)[k / 2] = (int8_t)q;
    }
    const float share = 8.f / (float)group;  // a lane's share of its group (G / 8 lanes)
    dx[g] = step, qx[g] = -8.f * step * (float)qsum * share, zx[g] = sum * share;
  }
  for (int64_t l = 0; l < K / 8; ++l) {  // lane l of the whole row: columns 8l..8l+7
    const int64_t g = 8 * l / group;
    dxv[l] = dx[g], qxv[l] = qx[g], zxv[l] = zx[g];
  }
}

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512vnni");
  return yes;
}

// y [M, N] = x [M, K] (fp32) @ W^T, W int4: w the [N, K/2] code bytes of the file layout packed (`pack_rows`:
// [ceil(N/4), ceil(K/128), 4, 64], zero rows past N and zero bytes past K/2), sz [4 * ceil(N/4), K/group] int32
// (bf16 pairs, zero rows past N). int8_x: one activation row goes through int4_dot_vnni where the CPU has VNNI (and
// K is a multiple of 128: no padding bytes).
torch::Tensor int4_rows_mm(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t group, int64_t N, bool int8_x) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kUInt8 && sz.dtype() == torch::kInt32);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && sz.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), blocks = (N + 3) / 4;
  TORCH_CHECK(x.dim() == 2 && w.dim() == 4 && group % 32 == 0 && K % group == 0);
  TORCH_CHECK(w.size(0) == blocks && w.size(1) == (K + 127) / 128 && w.size(2) == 4 && w.size(3) == 64);
  TORCH_CHECK(sz.dim() == 2 && sz.size(0) == 4 * blocks && sz.size(1) == K / group);
  const int64_t groups = K / group, half = K / 2, padded = w.size(1) * 64;  // a packed row's bytes
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint32_t* sp = reinterpret_cast<const uint32_t*>(sz.data_ptr<int32_t>());
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  if (M == 1 && int8_x && K % 128 == 0 && has_vnni()) {
    auto xq = torch::empty({K}, x.options().dtype(torch::kInt8));
    auto lanes = torch::empty({3, K / 8}, x.options());
    int8_t* qp = xq.data_ptr<int8_t>();
    float* lp = lanes.data_ptr<float>();
    quantize_activations(x.data_ptr<float>(), K, group, qp, qp + half, lp, lp + K / 8, lp + K / 4);
    int32_t lane_group[16];  // the group of each lane of a 64-byte chunk (128 columns), counted from the chunk's first
    for (int l = 0; l < 16; ++l) lane_group[l] = group >= 128 ? 0 : (int32_t)(8 * l / group);
    const __mmask16 mask = (__mmask16)((1u << (group >= 128 ? 1 : 128 / group)) - 1);
    at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
      float t[4];
      for (int64_t b = begin; b < end; ++b) {
        int4_dot_vnni<4>(qp, qp + half, lp, lp + K / 8, lp + K / 4, wp + 4 * b * padded, half, sp + 4 * b * groups,
                         groups, group, lane_group, mask, t);
        for (int64_t j = 0; j < 4 && 4 * b + j < N; ++j) yp[4 * b + j] = t[j];
      }
    });
    return y;
  }
  const int64_t Mp = M == 1 ? 1 : (M + 3) / 4 * 4;  // several rows go four at a time (zero rows pad the last four)
  auto xe = torch::zeros({Mp, half}, x.options()), xo = torch::zeros({Mp, half}, x.options());
  auto xg = torch::empty({groups}, x.options());  // x's group sums: one row only (several add zeros per row)
  const float* xp = x.data_ptr<float>();
  float *ep = xe.data_ptr<float>(), *op = xo.data_ptr<float>(), *gp = xg.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < half; ++c) ep[m * half + c] = xp[m * K + 2 * c], op[m * half + c] = xp[m * K + 2 * c + 1];
  if (M == 1) {
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += xp[k];
      gp[g] = s;
    }
  }
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    float t[16];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = 4 * b, rows = std::min<int64_t>(4, N - n0);
      const uint8_t* blk = wp + n0 * padded;
      const uint32_t* pairs = sp + n0 * groups;
      if (M == 1) {  // one sequence decoding: scale each group's sum once, zero points through x's group sums
        int4_dot<4>(ep, op, gp, blk, pairs, groups, group / 2, t);
        for (int64_t j = 0; j < rows; ++j) yp[n0 + j] = t[j];
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int4_dot_rows<4, 4>(ep + m0 * half, op + m0 * half, half, blk, pairs, groups, group / 2, t);
        for (int64_t m = 0; m < std::min<int64_t>(4, M - m0); ++m)
          for (int64_t j = 0; j < rows; ++j) yp[(m0 + m) * N + n0 + j] = t[m * 4 + j];
      }
    }
  });
  return y;
}
"""


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's loader runs `ninja` from PATH; a venv used without activating it has ninja beside its python."""
    if shutil.which("ninja"):
        yield
        return
    try:
        import ninja

        where = ninja.BIN_DIR
    except (ImportError, AttributeError):
        where = None
    old = os.environ.get("PATH", "")
    if where:
        os.environ["PATH"] = where + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _why_not_build() -> str | None:
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"torch dispatches {torch.backends.cpu.get_cpu_capability()} here, the kernels are for AVX-512"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++ or $CXX) on PATH"
    return None


def _why_not(bits: int) -> str | None:
    """Why the kernel for `bits`-bit weights (32: fp32) is not to be used here (None: it may be built and used)."""
    var = f"AQUILA_{_label(bits).upper()}_KERNEL"
    return f"{var}=0" if os.environ.get(var, "1") == "0" else _why_not_build()


def _label(bits: int) -> str:
    return "fp32" if bits == 32 else f"int{bits}"


_module = None  # the compiled extension, once built
_build_error: str | None = None


def _built():
    """The compiled extension (both kernels), built or loaded from torch's cache on the first call; else None."""
    global _module, _build_error
    if _module is None and _build_error is None:
        try:
            from torch.utils.cpp_extension import load_inline

            log.info("int8/int4 CPU decode kernels: building them (~20 s, once) or loading them from torch's cache")
            with _ninja_on_path():
                _module = load_inline(
                    "aquila_cpu_kernels",
                    cpp_sources=_SOURCE,
                    functions=["int8_packed_mm", "f32_packed_mm", "int4_rows_mm", "has_vnni"],
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                )
        except Exception as e:  # noqa: BLE001 - any build failure means: use torch's kernels
            _build_error = (
                f"it did not build ({str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__})"
            )
    return _module


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return bool((got - ref.float()).abs().max() <= 1e-5 * ref.abs().max())  # fp32 sums: ~1e-7 of the largest


def pack_rows(w: torch.Tensor) -> torch.Tensor:
    """A matrix w [n, k] (int8 or fp32 weights, or int4's code bytes) in the kernels' layout [ceil(n/4), ceil(k/P),
    4, P] with P = 64 bytes' worth of elements: four rows' 64-byte pieces side by side, zero rows after the last and
    zeros after column k (the int8 and fp32 kernels take k a multiple of P only; the int4 one any)."""
    n, k = w.shape
    piece = PACK_BYTES // w.element_size()
    rows, cols = -(-n // 4) * 4, -(-k // piece) * piece
    padded = w if (rows, cols) == (n, k) else torch.nn.functional.pad(w, (0, cols - k, 0, rows - n))
    return padded.view(rows // 4, 4, cols // piece, piece).transpose(1, 2).contiguous()


def unpack_rows(packed: torch.Tensor, n: int, k: int | None = None) -> torch.Tensor:
    """The [n, k] matrix of `pack_rows`'s layout (the rows of those blocks if `packed` is a slice of blocks)."""
    blocks, pieces, _, piece = packed.shape
    return packed.transpose(1, 2).reshape(blocks * 4, pieces * piece)[:n, :k]


def packed_mm(x: torch.Tensor, packed: torch.Tensor, n: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] fp32 (contiguous) @ (the packed matrix (* scales per row))^T -> [m, n], exact to fp32: int8 weights
    (with their scales) or fp32 ones, up to MAX_ROWS rows by our kernel, longer prompts by `gemm_by_blocks`."""
    if x.shape[0] > MAX_ROWS:
        return gemm_by_blocks(x, packed, n, scales)
    return f32_packed_kernel()(x, packed, n) if scales is None else int8_packed_kernel()(x, packed, scales, n)


def gemm_by_blocks(x: torch.Tensor, packed: torch.Tensor, n: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [m, k] fp32 @ (the packed matrix (* scales per row))^T -> [m, n] by MKL's GEMM, 256 rows unpacked to fp32 at
    a time: for prompts longer than MAX_ROWS, where our kernels' loop runs at matrix-vector speed and MKL's does not."""
    out = torch.empty(x.shape[0], n)
    for b in range(0, packed.shape[0], _GEMM_BLOCKS):
        start, stop = 4 * b, min(n, 4 * (b + _GEMM_BLOCKS))
        rows = unpack_rows(packed[b : b + _GEMM_BLOCKS], stop - start).float()
        if scales is not None:
            rows.mul_(scales[start:stop, None])
        out[:, start:stop] = x @ rows.t()
    return out


def _int8_matches_reference(fn: Callable) -> bool:
    gen = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 70, 256), (3, 64, 128), (6, 9, 320)):  # a row tail, one, several, more than 4 rows
        x = torch.randn(m, k, generator=gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        s = torch.rand(n, generator=gen)
        if not _close(fn(x, pack_rows(w), s, n), x.double() @ (w.double() * s.double()[:, None]).t()):
            return False
    return True


def rounded_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [m, k] fp32 as the int8-activation int4 path uses it: each group of `group` columns rounded to steps of
    max|x| / 127 (float32 arithmetic, as the kernel's)."""
    g = x.float().reshape(x.shape[0], -1, group)
    step = g.abs().amax(-1, keepdim=True) / 127
    q = torch.where(step > 0, torch.round(g / torch.where(step > 0, step, 1)), 0)
    return (q * step).reshape(x.shape)


def int4_reference(x: torch.Tensor, w: torch.Tensor, pairs: torch.Tensor, int8_x: bool) -> torch.Tensor:
    """float64 result of `int4_rows_mm(x, w, pairs as int32, group, int8_x)`: the scaled codes meet x, rounded per
    group where one row takes the int8-activation path; the zero points always meet x itself."""
    from aquila.inference.int4 import dequantize_int4

    group = x.shape[1] // pairs.shape[1]
    scales, zeros = pairs.clone(), pairs.clone()
    scales[..., 1], zeros[..., 0] = 0, 0
    rounds = int8_x and x.shape[0] == 1 and x.shape[1] % 128 == 0 and _built() is not None and _built().has_vnni()
    xs = rounded_activations(x, group) if rounds else x
    return xs.double() @ dequantize_int4(w, scales).double().t() + x.double() @ dequantize_int4(w, zeros).double().t()


def pack_pairs(sz: torch.Tensor) -> torch.Tensor:
    """int4's (scale, zero) pairs as int32 [n, groups] with zero rows up to `pack_rows`' padded row count."""
    return torch.nn.functional.pad(sz, (0, 0, 0, -sz.shape[0] % 4))


def _int4_matches_reference(fn: Callable) -> bool:
    gen = torch.Generator().manual_seed(0)
    for m, n, k, group in ((1, 70, 256, 64), (3, 64, 128, 32), (6, 9, 512, 256), (1, 3, 64, 32), (1, 9, 384, 32)):
        x = torch.randn(m, k, generator=gen)
        w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        pairs = (torch.rand(n, k // group, 2, generator=gen) - 0.5).bfloat16()
        sz = pack_pairs(pairs.view(torch.int32).squeeze(-1))
        for int8_x in (False, True):
            if not _close(fn(x, pack_rows(w), sz, group, n, int8_x), int4_reference(x, w, pairs, int8_x)):
                return False
    return True


def _f32_matches_reference(fn: Callable) -> bool:
    gen = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 70, 64), (6, 9, 160)):  # a row tail; one, more than 4 rows
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        if not _close(fn(x, pack_rows(w), n), x.double() @ w.double().t()):
            return False
    return True


_CHECKS = {
    8: ("int8_packed_mm", _int8_matches_reference),
    4: ("int4_rows_mm", _int4_matches_reference),
    32: ("f32_packed_mm", _f32_matches_reference),
}
_kernels: dict[int, Callable | None] = {}


def _kernel_for(bits: int) -> Callable | None:
    if bits in _kernels:
        return _kernels[bits]
    why, fn = _why_not(bits), None
    if why is None:
        module = _built()
        name, check = _CHECKS[bits]
        if module is None:
            why = _build_error
        elif check(getattr(module, name)):
            fn = getattr(module, name)
        else:
            why = "its result differs from a float64 product"
    if fn is None:
        log.info("%s decode uses torch's kernel: %s", _label(bits), why)
    _kernels[bits] = fn
    return fn


def int8_packed_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
    """The compiled `int8_packed_mm(x fp32 [m, k], pack_rows(w) [ceil(n/4), k/64, 4, 64], scales fp32 [n], n)`, or
    None (torch's kernel then)."""
    return _kernel_for(8)


def f32_packed_kernel() -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None:
    """The compiled `f32_packed_mm(x fp32 [m, k], pack_rows(w fp32 [n, k]) [ceil(n/4), k/16, 4, 16], n)`, or None."""
    return _kernel_for(32)


def int4_rows_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, bool], torch.Tensor] | None:
    """The compiled `int4_rows_mm(x fp32 [m, k], pack_rows(w uint8 [n, k/2]), pack_pairs(sz int32 [n, k/group]),
    group, n, int8_x)` over the file layout's codes and bf16 (scale, zero) pairs (`int4.py`), or None (torch's int4
    kernel then). With `int8_x`, one row of x is rounded to int8 per group and multiplied by VNNI instructions where
    the CPU has them (`int4_reference` says exactly what is computed)."""
    return _kernel_for(4)
