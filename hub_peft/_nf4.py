"""A fused NF4 matrix product for bitsandbytes' 4-bit layers on the CPU, for decode steps (few rows, no gradient).

bitsandbytes' CPU path for a ``Linear4bit`` dequantizes the whole weight to float32 and then multiplies: per
token it reads half a byte a weight, writes four and reads them again, so an NF4 model decodes slower than its
float32 original. This kernel decodes one weight row at a time into a buffer that stays in the core's cache and
takes its dot products with every input row there, so a step reads each 4-bit code once: each block's 16-value
table is scaled once, each 16 bytes of codes become 32 weights with two table lookups in registers, and up to 8
input rows are served per pass over the weights.

The weight values are bitsandbytes' own (``code[q] * absmax`` in float32, the double-quantized statistics
dequantized once); the sums run in another order than MKL's, so outputs equal
``F.linear(x, dequantize_4bit(W))`` up to float32 rounding (tests: ``tests/test_nf4.py``).

NOTE(build): the C source below is compiled once per machine with the system C compiler (``cc -O3
-march=native -fopenmp``) into hub_peft's cache (``base_model.cache_dir()``); OpenMP shares torch's libgomp thread pool.
Without a compiler, or on a layout the kernel does not take, layers keep bitsandbytes' path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base_model import cache_dir

logger = logging.getLogger(__name__)

MAX_ROWS = 32  # rows (tokens) up to which the fused product beats dequantize-then-GEMM (benchmarks/README.md)

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>

#define ROWS 8 /* input rows a pass over the weights serves */

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
        const __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
        const __m128 r2 = _mm_add_ps(r, _mm_movehl_ps(r, r));
        out[m] = _mm_cvtss_f32(_mm_add_ss(r2, _mm_movehdup_ps(r2)));
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

/* y[m, n] = sum_k x[m, k] * lut[q(n, k)] * absmax[(n * K + k) / block] (+ bias[n]); K % block == 0,
   block % 32 == 0. q: two 4-bit codes a byte, the first in the high nibble (bitsandbytes' layout). */
void nf4_linear(const float *x, int64_t M, int64_t K, const uint8_t *q, const float *absmax, int64_t block,
                int64_t N, const float *lut, const float *bias, float *y) {
    float *xs = (float *)aligned_alloc(64, M * K * sizeof(float));
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 32)
            for (int j = 0; j < 16; j++) {
                xs[m * K + c + j] = x[m * K + c + 2 * j];
                xs[m * K + c + 16 + j] = x[m * K + c + 2 * j + 1];
            }
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
            for (int64_t m = m0; m < M && m < m0 + ROWS; m++) y[m * N + n] = out[m - m0] + (bias ? bias[n] : 0.0f);
        }
    }
    free(xs);
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
    target = cache_dir() / "kernels" / f"nf4-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # nothing half-written under the name
                source, built = Path(tmp) / "nf4.c", Path(tmp) / "nf4.so"
                source.write_text(_SOURCE)
                subprocess.run([compiler, *flags, str(source), "-o", str(built)], check=True, capture_output=True)
                os.replace(built, target)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
            logger.warning("NF4 layers keep bitsandbytes' path: the fused kernel did not build (%s).", detail)
            return None
    lib = ctypes.CDLL(str(target))
    lib.nf4_linear.restype = None
    lib.nf4_linear.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    return lib


class FusedNF4:
    """The product of one ``Linear4bit`` (NF4, float32 compute) by few rows, through the fused kernel.
    Holds the layer's own packed codes (no copy) and its block scales in float32."""

    def __init__(self, layer: nn.Module, lib: Any) -> None:
        import bitsandbytes.functional as F

        state = layer.weight.quant_state
        self.lib, self.block = lib, int(state.blocksize)
        self.out_features, self.in_features = (int(d) for d in state.shape)
        self.codes = layer.weight.data  # uint8, two codes a byte
        absmax = state.absmax
        if state.nested:  # double quantization: the scales are themselves 8-bit; dequantized once here
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        self.absmax = absmax.float().contiguous()
        self.code = state.code.float().contiguous()
        self.bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        fixed = (self.in_features, self.codes.data_ptr(), self.absmax.data_ptr(), self.block, self.out_features)
        tail = (self.code.data_ptr(), 0 if self.bias is None else self.bias.data_ptr())
        self._run = lambda x, rows, y: lib.nf4_linear(x, rows, *fixed, *tail, y)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE(perf): a decode step makes ~200 of these calls; the fixed arguments are bound once (~1/3 of a
        # small layer's call was Python before)
        x = x if x.is_contiguous() else x.contiguous()
        rows = x.numel() // self.in_features
        y = torch.empty(*x.shape[:-1], self.out_features)
        self._run(x.data_ptr(), rows, y.data_ptr())
        return y

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this call should run here: float32 rows, at most :data:`MAX_ROWS`, no gradient to keep."""
        rows = x.numel() // self.in_features
        return x.dtype == torch.float32 and rows <= MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad)


def fused_nf4(layer: nn.Module) -> FusedNF4 | None:
    """A :class:`FusedNF4` for ``layer`` when it is a ``Linear4bit`` the kernel takes (NF4, float32 compute,
    unpacked CPU weights, blocks of a multiple of 32 that tile its rows) and the kernel builds; else None (the
    layer keeps its own path)."""
    if type(layer).__name__ != "Linear4bit":
        return None
    state = getattr(layer.weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or getattr(state, "packing_format_for_cpu", False):
        return None
    if layer.weight.device.type != "cpu" or getattr(layer, "compute_dtype", torch.float32) not in (None, torch.float32):
        return None
    out_features, in_features = (int(d) for d in state.shape)
    if state.blocksize % 32 or in_features % state.blocksize or layer.weight.numel() * 2 != out_features * in_features:
        return None
    lib = library()
    return None if lib is None else FusedNF4(layer, lib)
