"""Fused CPU products for the engine's decode steps (few rows, no gradient): NF4 and float32 linear layers, each
with the one LoRA of every row (a single chat) added inside the same call.

bitsandbytes' CPU path for a ``Linear4bit`` dequantizes the whole weight to float32 and then multiplies: per
token it reads half a byte a weight, writes four and reads them again, so an NF4 model decodes slower than its
float32 original. The NF4 kernel reads each 4-bit code once: each block's 16-value table is scaled once, each 16
bytes of codes become 32 weights with two table lookups in registers, and up to 8 input rows are served per pass
over the weights. The float32 kernel is a plain matrix-vector product split by weight rows across threads.

A decode step of one sequence makes ~200 such products, and a LoRA on a layer added two batched matmuls, a reshape
and an addition to each: ~40 small operations per block, a quarter of the step. With ``lora=(A, Bt, w)`` the
kernel computes ``h = w·x A`` once (``[rows, r]``, serial) and adds ``h Btᵀ`` to each output while the weight row
is hot.

The weight values are the layer's own (NF4: ``code[q] * absmax`` in float32, the double-quantized statistics
dequantized once); the sums run in another order than MKL's, so outputs equal ``F.linear(x, W) + w·(x A) B``
up to float32 rounding (tests: ``tests/test_fused.py``).

NOTE(build): the C source below is compiled once per machine with the system C compiler (``cc -O3
-march=native -fopenmp``) into hub_peft's cache (``base_model.cache_dir()``); OpenMP shares torch's libgomp thread
pool. Without a compiler, or on a layout a kernel does not take, layers keep their own path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base_model import cache_dir

logger = logging.getLogger(__name__)

MAX_ROWS = 32  # rows (tokens) up to which the fused NF4 product beats dequantize-then-GEMM (benchmarks/README.md)
MAX_ROWS_F32 = 8  # and the float32 one MKL's GEMM

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>

#define ROWS 8 /* input rows a pass over the weights serves */

#if defined(__AVX2__)
static inline float hsum256(const __m256 v) { /* the sum of a vector's 8 lanes */
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
#endif

/* The dots of one weight row with M (<= ROWS) input rows: out[m] = sum_k xs[m, k] * lut[q(k)] * scale[k / block].
   The weights never leave registers: each block's 16-entry table is scaled once, each 16 bytes of codes become
   32 weights with two table lookups (the 16 high nibbles, then the 16 low ones; xs holds each input row permuted
   the same way). M is a constant where this is inlined, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_dots(const float *xs, const int M, int64_t K,
                                                           const uint8_t *row, const float *scale, int64_t block,
                                                           const float *lut, float *out) {
#if defined(__AVX512F__)
    __m512 high[ROWS], low[ROWS];
    for (int m = 0; m < M; m++) high[m] = low[m] = _mm512_setzero_ps();
    const __m512 table = _mm512_loadu_ps(lut);
    const __m512i nibble = _mm512_set1_epi32(15);
    for (int64_t start = 0, blk = 0; start < K; start += block, blk++) {
        const __m512 t = _mm512_mul_ps(table, _mm512_set1_ps(scale[blk]));
        for (int64_t c = start; c < start + block; c += 32) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + (c >> 1))));
            const __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
            const __m512 wl = _mm512_permutexvar_ps(_mm512_and_si512(b, nibble), t);
            for (int m = 0; m < M; m++) {
                high[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xs + m * K + c), wh, high[m]);
                low[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xs + m * K + c + 16), wl, low[m]);
            }
        }
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(high[m], low[m]));
#elif defined(__AVX2__)
    __m256 acc[ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    const __m256i seven = _mm256_set1_epi32(7), nibble = _mm256_set1_epi32(15);
    for (int64_t start = 0, blk = 0; start < K; start += block, blk++) {
        const __m256 s = _mm256_set1_ps(scale[blk]);
        const __m256 t0 = _mm256_mul_ps(_mm256_loadu_ps(lut), s), t1 = _mm256_mul_ps(_mm256_loadu_ps(lut + 8), s);
        for (int64_t c = start; c < start + block; c += 32) {
            for (int half = 0; half < 2; half++) {
                const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + (c >> 1) + 8 * half)));
                for (int part = 0; part < 2; part++) {
                    const __m256i idx = part ? _mm256_and_si256(b, nibble) : _mm256_srli_epi32(b, 4);
                    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
                    const __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx),
                                                      _mm256_permutevar8x32_ps(t1, idx), upper);
                    const int64_t at = c + 16 * part + 8 * half;
                    for (int m = 0; m < M; m++) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xs + m * K + at), w, acc[m]);
                }
            }
        }
    }
    for (int m = 0; m < M; m++) {
        out[m] = hsum256(acc[m]);
    }
#else
    float acc[ROWS] = {0};
    for (int64_t start = 0, blk = 0; start < K; start += block, blk++) {
        float t[16];
        for (int j = 0; j < 16; j++) t[j] = lut[j] * scale[blk];
        for (int64_t c = start; c < start + block; c += 32)
            for (int j = 0; j < 16; j++) {
                const uint8_t q = row[(c >> 1) + j];
                for (int m = 0; m < M; m++)
                    acc[m] += xs[m * K + c + j] * t[q >> 4] + xs[m * K + c + 16 + j] * t[q & 15];
            }
    }
    for (int m = 0; m < M; m++) out[m] = acc[m];
#endif
}

/* h[m, j] = w * sum_k x[m, k] * A[k, j]: a LoRA's hidden rows (A is [K, r]), before any weight row is read. */
static float *lora_hidden(const float *x, int64_t M, int64_t K, const float *A, int64_t r, float w) {
    float *h = (float *)calloc(M * r > 0 ? M * r : 1, sizeof(float));
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) {
            const float xv = x[m * K + k];
            for (int64_t j = 0; j < r; j++) h[m * r + j] += xv * A[k * r + j];
        }
        for (int64_t j = 0; j < r; j++) h[m * r + j] *= w;
    }
    return h;
}

/* out + bias[n] + sum_j h[m, j] * Bt[n, j] (Bt is [N, r], a LoRA's B transposed: contiguous per output; h NULL:
   no LoRA) */
static inline float epilogue(float out, const float *bias, const float *h, const float *Bt, int64_t r, int64_t m,
                             int64_t n) {
    float t = out + (bias ? bias[n] : 0.0f);
    if (h) {
        const float *hm = h + m * r, *bn = Bt + n * r;
        for (int64_t j = 0; j < r; j++) t += hm[j] * bn[j];
    }
    return t;
}

/* y[m, n] = sum_k x[m, k] * lut[q(n, k)] * absmax[(n * K + k) / block] (+ bias[n]) (+ w * (x A Btᵀ)[m, n]);
   K % block == 0, block % 32 == 0. q: two 4-bit codes a byte, the first in the high nibble (bitsandbytes'
   layout). A: NULL, or a LoRA's [K, r] with Bt [N, r]. */
void nf4_linear(const float *x, int64_t M, int64_t K, const uint8_t *q, const float *absmax, int64_t block,
                int64_t N, const float *lut, const float *bias, float *y, const float *A, const float *Bt, int64_t r,
                float w) {
    float *xs = (float *)aligned_alloc(64, M * K * sizeof(float));
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 32)
            for (int j = 0; j < 16; j++) {
                xs[m * K + c + j] = x[m * K + c + 2 * j];
                xs[m * K + c + 16 + j] = x[m * K + c + 2 * j + 1];
            }
    float *h = A ? lora_hidden(x, M, K, A, r, w) : NULL;
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = q + n * (K / 2);
        const float *scale = absmax + n * (K / block);
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            float out[ROWS];
            const float *xm = xs + m0 * K;
            switch (M - m0 < ROWS ? M - m0 : ROWS) {
                case 1: row_dots(xm, 1, K, row, scale, block, lut, out); break;
                case 2: row_dots(xm, 2, K, row, scale, block, lut, out); break;
                case 3: row_dots(xm, 3, K, row, scale, block, lut, out); break;
                case 4: row_dots(xm, 4, K, row, scale, block, lut, out); break;
                case 5: row_dots(xm, 5, K, row, scale, block, lut, out); break;
                case 6: row_dots(xm, 6, K, row, scale, block, lut, out); break;
                case 7: row_dots(xm, 7, K, row, scale, block, lut, out); break;
                default: row_dots(xm, 8, K, row, scale, block, lut, out); break;
            }
            for (int64_t m = m0; m < M && m < m0 + ROWS; m++)
                y[m * N + n] = epilogue(out[m - m0], bias, h, Bt, r, m, n);
        }
    }
    free(h);
    free(xs);
}

/* out[j] = sum_k x[k] * float(W[j * K + k]) for COUNT (a constant where this is inlined, so the accumulators stay
   in registers) consecutive weight rows of float32 or int8. */
#define DEFINE_ROWS_DOT(NAME, T, LOAD512, LOAD256)                                                                 \
    static inline __attribute__((always_inline)) void NAME(const float *x, const T *W, int64_t K, const int COUNT,  \
                                                           float *out) {                                          \
        int64_t k = 0;                                                                                            \
        for (int j = 0; j < COUNT; j++) out[j] = 0.0f;                                                            \
        DOT_BODY(LOAD512, LOAD256)                                                                                \
        for (; k < K; k++)                                                                                        \
            for (int j = 0; j < COUNT; j++) out[j] += x[k] * (float)W[j * K + k];                                 \
    }
#if defined(__AVX512F__)
#define DOT_BODY(LOAD512, LOAD256)                                                                                 \
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};         \
    for (; k + 16 <= K; k += 16) {                                                                                \
        const __m512 xv = _mm512_loadu_ps(x + k);                                                                 \
        for (int j = 0; j < COUNT; j++) acc[j] = _mm512_fmadd_ps(xv, LOAD512(W + j * K + k), acc[j]);           \
    }                                                                                                             \
    for (int j = 0; j < COUNT; j++) out[j] = _mm512_reduce_add_ps(acc[j]);
#elif defined(__AVX2__)
#define DOT_BODY(LOAD512, LOAD256)                                                                                 \
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};         \
    for (; k + 8 <= K; k += 8) {                                                                                  \
        const __m256 xv = _mm256_loadu_ps(x + k);                                                                 \
        for (int j = 0; j < COUNT; j++) acc[j] = _mm256_fmadd_ps(xv, LOAD256(W + j * K + k), acc[j]);           \
    }                                                                                                             \
    for (int j = 0; j < COUNT; j++) out[j] = hsum256(acc[j]);
#else
#define DOT_BODY(LOAD512, LOAD256)
#endif
#define F32_512(p) _mm512_loadu_ps(p)
#define F32_256(p) _mm256_loadu_ps(p)
#define I8_512(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define I8_256(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
DEFINE_ROWS_DOT(f32_rows, float, F32_512, F32_256)
DEFINE_ROWS_DOT(i8_rows, int8_t, I8_512, I8_256)

/* the dots of rows [n0, n0 + count) of W with x, count <= 4: four streams in flight per core */
#define ROWS_DOT_SWITCH(FN, x, W, K, count, out)                                                                   \
    switch (count) {                                                                                              \
        case 4: FN(x, W, K, 4, out); break;                                                                       \
        case 3: FN(x, W, K, 3, out); break;                                                                       \
        case 2: FN(x, W, K, 2, out); break;                                                                       \
        default: FN(x, W, K, 1, out); break;                                                                      \
    }

/* y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) (+ w * (x A Btᵀ)[m, n]): float32 weights [N, K], rows split
   across threads four at a time. */
void f32_linear(const float *x, int64_t M, int64_t K, const float *W, int64_t N, const float *bias, float *y,
                const float *A, const float *Bt, int64_t r, float w) {
    float *h = A ? lora_hidden(x, M, K, A, r, w) : NULL;
    #pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const int count = N - n0 < 4 ? (int)(N - n0) : 4;
        for (int64_t m = 0; m < M; m++) {
            float out[4];
            ROWS_DOT_SWITCH(f32_rows, x + m * K, W + n0 * K, K, count, out)
            for (int j = 0; j < count; j++) y[m * N + n0 + j] = epilogue(out[j], bias, h, Bt, r, m, n0 + j);
        }
    }
    free(h);
}

/* y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] (+ bias[n]): int8 weights [N, K] with one scale per row (an 8-bit
   LM head), rows split across threads four at a time. */
void i8_linear(const float *x, int64_t M, int64_t K, const int8_t *q, const float *scale, int64_t N,
               const float *bias, float *y) {
    #pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const int count = N - n0 < 4 ? (int)(N - n0) : 4;
        for (int64_t m = 0; m < M; m++) {
            float out[4];
            ROWS_DOT_SWITCH(i8_rows, x + m * K, q + n0 * K, K, count, out)
            for (int j = 0; j < count; j++)
                y[m * N + n0 + j] = out[j] * scale[n0 + j] + (bias ? bias[n0 + j] : 0.0f);
        }
    }
}
"""


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@cache
def library(march: str = "native") -> Any | None:
    """The compiled kernel (``ctypes``), built once per machine into the user's cache; None without a compiler.
    ``march``: the instruction set (``-march=``); tests build ``x86-64-v3`` (AVX2) and ``x86-64`` (plain C) too,
    so every path of the source is checked on a machine that runs them."""
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *flags, platform.machine(), _cpu_flags()]).encode())
    target = cache_dir() / "kernels" / f"fused-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # nothing half-written under the name
                source, built = Path(tmp) / "fused.c", Path(tmp) / "fused.so"
                source.write_text(_SOURCE)
                subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True)
                os.replace(built, target)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
            logger.warning("Linear layers keep their own path: the fused kernels did not build (%s).", detail)
            return None
    lib = ctypes.CDLL(str(target))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lora: list[Any] = [pointer, pointer, size, ctypes.c_float]  # A, Bt, r, w
    lib.nf4_linear.restype = lib.f32_linear.restype = None
    lib.nf4_linear.argtypes = [pointer, size, size, pointer, pointer, size, size, pointer, pointer, pointer, *lora]
    lib.f32_linear.argtypes = [pointer, size, size, pointer, size, pointer, pointer, *lora]
    lib.i8_linear.restype = None
    lib.i8_linear.argtypes = [pointer, size, size, pointer, pointer, size, pointer, pointer]
    return lib


Lora = tuple[torch.Tensor, torch.Tensor, float]  # A [in, r], Bᵀ [out, r] (the adapter's scale folded in), weight


class Fused:
    """The product of one linear layer by few rows through a fused kernel, optionally with one LoRA's delta:
    ``fused(x, (A, Bt, w))`` is ``layer(x) + w·(x A) Btᵀ`` (``Bt``: B transposed, contiguous per output).
    Subclasses bind the kernel to the layer's weights."""

    in_features: int
    out_features: int
    max_rows: int
    _run: Callable[..., None]  # (x, rows, y, A, Bt, r, w): the kernel with this layer's arguments bound

    def __call__(self, x: torch.Tensor, lora: Lora | None = None) -> torch.Tensor:
        x = x if x.is_contiguous() else x.contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features)
        rows = x.numel() // self.in_features
        if lora is None:
            self._run(x.data_ptr(), rows, y.data_ptr(), None, None, 0, 1.0)
        else:
            A, Bt, weight = lora
            self._run(x.data_ptr(), rows, y.data_ptr(), A.data_ptr(), Bt.data_ptr(), A.shape[1], weight)
        return y

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this call should run here: float32 rows, at most ``max_rows``, no gradient to keep."""
        rows = x.numel() // self.in_features
        return x.dtype == torch.float32 and rows <= self.max_rows and not (torch.is_grad_enabled() and x.requires_grad)

    @staticmethod
    def takes_lora(A: torch.Tensor, Bt: torch.Tensor) -> bool:
        """Whether a LoRA's matrices can go inside the kernel (float32, contiguous)."""
        return A.dtype == Bt.dtype == torch.float32 and A.is_contiguous() and Bt.is_contiguous()


class FusedNF4(Fused):
    """A ``Linear4bit`` (NF4, float32 compute): its own packed codes (no copy), its block scales in float32."""

    max_rows = MAX_ROWS

    def __init__(self, layer: nn.Module, lib: Any) -> None:
        import bitsandbytes.functional as F

        state = layer.weight.quant_state
        self.out_features, self.in_features = (int(d) for d in state.shape)
        self.codes = layer.weight.data  # uint8, two codes a byte
        absmax = state.absmax
        if state.nested:  # double quantization: the scales are themselves 8-bit; dequantized once here
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        self.absmax = absmax.float().contiguous()
        self.code = state.code.float().contiguous()
        self.bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        # NOTE(perf): a decode step makes ~200 of these calls; the fixed arguments are bound once
        head = (self.in_features, self.codes.data_ptr(), self.absmax.data_ptr(), int(state.blocksize))
        tail = (self.out_features, self.code.data_ptr(), 0 if self.bias is None else self.bias.data_ptr())
        self._run = lambda x, rows, y, *lora: lib.nf4_linear(x, rows, *head, *tail, y, *lora)


class FusedF32(Fused):
    """A float32 ``nn.Linear``: its own weight (no copy)."""

    max_rows = MAX_ROWS_F32

    def __init__(self, layer: nn.Module, lib: Any) -> None:
        self.out_features, self.in_features = layer.weight.shape
        self.weight = layer.weight.detach()
        self.bias = None if layer.bias is None else layer.bias.detach()
        fixed = (self.in_features, self.weight.data_ptr(), self.out_features)
        bias = 0 if self.bias is None else self.bias.data_ptr()
        self._run = lambda x, rows, y, *lora: lib.f32_linear(x, rows, *fixed, bias, y, *lora)


def fused_linear(layer: nn.Module) -> Fused | None:
    """A :class:`Fused` product for ``layer`` when a kernel takes it and builds; else None (the layer keeps its own
    path). NF4: a ``Linear4bit`` with float32 compute, unpacked CPU weights, blocks of a multiple of 32 that tile its
    rows. Float32: a plain ``nn.Linear`` (not a subclass with a forward of its own) with contiguous CPU weights."""
    if type(layer).__name__ == "Linear4bit":
        state = getattr(layer.weight, "quant_state", None)
        if state is None or state.quant_type != "nf4" or getattr(state, "packing_format_for_cpu", False):
            return None
        compute = getattr(layer, "compute_dtype", torch.float32)
        if layer.weight.device.type != "cpu" or compute not in (None, torch.float32):
            return None
        out_features, in_features = (int(d) for d in state.shape)
        tiled = layer.weight.numel() * 2 == out_features * in_features
        if state.blocksize % 32 or in_features % state.blocksize or not tiled:
            return None
        lib = library()
        return None if lib is None else FusedNF4(layer, lib)
    if isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward:
        weight, bias = layer.weight, layer.bias
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
            return None
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            return None
        lib = library()
        return None if lib is None else FusedF32(layer, lib)
    return None


class Int8Linear(nn.Module):
    """A float32 ``nn.Linear`` (an LM head) multiplied through an 8-bit copy of its weight: one scale per output
    row (``max|W_n| / 127``), codes rounded to nearest. The layer itself is kept (``self.linear``: its weight may
    be tied to the input embedding, which stays float32); a product that needs a gradient goes through it.

    NOTE(precision): this changes the model (llama.cpp's GGUF quantizations do so for the head too): each logit
    moves by at most ``Σ|x_k| · scale_n / 2``. Opt-in (``Engine(head_bits=8)``); a 49152 x 576 head reads 28 MB
    per token instead of 113."""

    def __init__(self, module: nn.Linear, lib: Any) -> None:
        super().__init__()
        self.linear = module
        weight = module.weight.detach().float()
        self.scale = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).contiguous()
        self.codes = torch.round(weight / self.scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.bias = None if module.bias is None else module.bias.detach().float().contiguous()
        self._lib = lib

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (for tests and error bounds)."""
        return self.codes.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
            return self.linear(x)
        x = x if x.is_contiguous() else x.contiguous()
        out_features, in_features = self.codes.shape
        y = torch.empty(*x.shape[:-1], out_features)
        bias = 0 if self.bias is None else self.bias.data_ptr()
        rows = x.numel() // in_features
        self._lib.i8_linear(
            x.data_ptr(),
            rows,
            in_features,
            self.codes.data_ptr(),
            self.scale.data_ptr(),
            out_features,
            bias,
            y.data_ptr(),
        )
        return y


def int8_head(module: nn.Module) -> Int8Linear | None:
    """An :class:`Int8Linear` for a float32 CPU ``nn.Linear`` head when the kernels build; else None."""
    if not isinstance(module, nn.Linear) or module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
        return None
    lib = library()
    return None if lib is None else Int8Linear(module, lib)
