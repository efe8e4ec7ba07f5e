"""A batch-1 int8 weight-only matrix product for AVX-512 CPUs, compiled on first use; torch's kernel elsewhere.

Why our own: at one to four rows of activations, torch's `_weight_int8pack_mm` (bf16 activations) reads int8
weights at 11-25 GB/s on a 2-core AVX-512 Xeon where MKL's fp32 GEMV reads 28-39 GB/s, and `torch.compile` of the
dequantizing product reaches 9-11 (bench/README.md, "Laptop decode"). This kernel streams four weight rows at a
time (int8 -> fp32 in registers, fp32 activations and sums), parallel over rows with torch's own threads
(`at::parallel_for`). It is more exact than the bf16 path (fp32 activations), so outputs change in the last bits.

It is built with torch's C++ extension loader (`ninja` and a C++ compiler; ~20 s once, then cached under
torch's extensions directory) the first time an int8 layer runs on a CPU where torch dispatches AVX-512, and
checked against a float64 product before use. Without a compiler, elsewhere, or with AQUILA_INT8_KERNEL=0, the
int8 layers use torch's kernel, with one log line saying why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 4  # activation rows up to which this kernel runs (decode steps); prompts use torch's kernel

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// Dot products of x with four consecutive rows of r (row length K): four weight streams in flight, each
// activation load used four times, and the next four rows prefetched at the same columns (from DRAM, 1.2 GB of
// weights, this read 20-29 GB/s against 16-25 without it; a prefetch past the last row does not fault).
static inline void dot4(const float* x, const int8_t* r, int64_t K, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    _mm_prefetch((const char*)(r + k + 512), _MM_HINT_T0);
    _mm_prefetch((const char*)(r + K + k + 512), _MM_HINT_T0);
    _mm_prefetch((const char*)(r + 2 * K + k + 512), _MM_HINT_T0);
    _mm_prefetch((const char*)(r + 3 * K + k + 512), _MM_HINT_T0);
    for (int j = 4; j < 8; ++j) _mm_prefetch((const char*)(r + j * K + k), _MM_HINT_T0);  // the next 4 rows
    const __m512 xv = _mm512_loadu_ps(x + k);
    a0 = _mm512_fmadd_ps(xv, widen16(r + k), a0);
    a1 = _mm512_fmadd_ps(xv, widen16(r + K + k), a1);
    a2 = _mm512_fmadd_ps(xv, widen16(r + 2 * K + k), a2);
    a3 = _mm512_fmadd_ps(xv, widen16(r + 3 * K + k), a3);
  }
  out[0] = _mm512_reduce_add_ps(a0);
  out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2);
  out[3] = _mm512_reduce_add_ps(a3);
  for (; k < K; ++k)
    for (int j = 0; j < 4; ++j) out[j] += x[k] * (float)r[j * K + k];
}

static inline float dot1(const float* x, const int8_t* r, int64_t K) {
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += x[k] * (float)r[k];
  return s;
}

// y [M, N] = x [M, K] (fp32) @ (w [N, K] int8 * scales [N])^T
torch::Tensor int8_rows_mm(torch::Tensor x, torch::Tensor w, torch::Tensor scales) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kInt8 && scales.dtype() == torch::kFloat32);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && scales.is_contiguous());
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && scales.numel() == w.size(0));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 3) / 4, 4, [&](int64_t begin, int64_t end) {
    float t[4];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = 4 * b;
      for (int64_t m = 0; m < M; ++m) {
        if (n0 + 4 <= N) {
          dot4(xp + m * K, wp + n0 * K, K, t);
          for (int j = 0; j < 4; ++j) yp[m * N + n0 + j] = t[j] * sp[n0 + j];
        } else {
          for (int64_t n = n0; n < N; ++n) yp[m * N + n] = dot1(xp + m * K, wp + n * K, K) * sp[n];
        }
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


def _why_not() -> str | None:
    if os.environ.get("AQUILA_INT8_KERNEL", "1") == "0":
        return "AQUILA_INT8_KERNEL=0"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return f"torch dispatches {torch.backends.cpu.get_cpu_capability()} here, the kernel is for AVX-512"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++ or $CXX) on PATH"
    return None


def _matches_reference(fn: Callable) -> bool:
    gen = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 70, 200), (3, 64, 128)):  # row and column tails, several rows of activations
        x = torch.randn(m, k, generator=gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        s = torch.rand(n, generator=gen)
        ref = (x.double() @ (w.double() * s.double()[:, None]).t()).float()
        if (fn(x, w, s) - ref).abs().max() > 1e-5 * ref.abs().max():  # fp32 sums: ~1e-7 of the largest
            return False
    return True


_kernel: Callable | None = None
_tried = False


def int8_rows_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The compiled `int8_rows_mm(x fp32 [m, k], w int8 [n, k], scales fp32 [n])`, or None (torch's kernel then)."""
    global _kernel, _tried
    if _tried:
        return _kernel
    _tried = True
    why = _why_not()
    if why is None:
        try:
            from torch.utils.cpp_extension import load_inline

            log.info("int8 batch-1 CPU kernel: building it (~20 s, once) or loading it from torch's extensions cache")
            with _ninja_on_path():
                module = load_inline(
                    "aquila_int8_rows",
                    cpp_sources=_SOURCE,
                    functions=["int8_rows_mm"],
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                )
            if _matches_reference(module.int8_rows_mm):
                _kernel = module.int8_rows_mm
            else:
                why = "its result differs from a float64 product"
        except Exception as e:  # noqa: BLE001 - any build failure means: use torch's kernel
            why = f"it did not build ({str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__})"
    if _kernel is None:
        log.info("int8 decode uses torch's kernel: %s", why)
    return _kernel
