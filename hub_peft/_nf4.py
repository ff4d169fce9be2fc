"""A fused NF4 matrix product for bitsandbytes' 4-bit layers on the CPU, for decode steps (few rows, no gradient).

bitsandbytes' CPU path for a ``Linear4bit`` dequantizes the whole weight to float32 and then multiplies: per
token it reads half a byte a weight, writes four and reads them again, so an NF4 model decodes slower than its
float32 original. This kernel decodes one weight row at a time into a buffer that stays in the core's cache and
takes its dot products with every input row there, so a step reads each 4-bit code once.

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

MAX_ROWS = 8  # rows (tokens) up to which the fused product beats dequantize-then-GEMM; beyond, bitsandbytes' path

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <immintrin.h>

/* 16 bytes of codes -> 32 weights lut[q] * s: the 16 high-nibble weights at w, the 16 low ones at w + 16. */
static inline void decode32(const uint8_t *bytes, const float *lut, const float s, float *w) {
#if defined(__AVX512F__)
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
    const __m512 table = _mm512_loadu_ps(lut), scale = _mm512_set1_ps(s);
    _mm512_storeu_ps(w, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), scale));
    const __m512i low = _mm512_and_si512(b, _mm512_set1_epi32(15));
    _mm512_storeu_ps(w + 16, _mm512_mul_ps(_mm512_permutexvar_ps(low, table), scale));
#elif defined(__AVX2__)
    const __m256 low8 = _mm256_loadu_ps(lut), high8 = _mm256_loadu_ps(lut + 8), scale = _mm256_set1_ps(s);
    for (int half = 0; half < 2; half++) {
        const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + 8 * half)));
        const __m256i idx[2] = {_mm256_srli_epi32(b, 4), _mm256_and_si256(b, _mm256_set1_epi32(15))};
        for (int part = 0; part < 2; part++) {
            const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx[part], _mm256_set1_epi32(7)));
            const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low8, idx[part]),
                                              _mm256_permutevar8x32_ps(high8, idx[part]), upper);
            _mm256_storeu_ps(w + 16 * part + 8 * half, _mm256_mul_ps(v, scale));
        }
    }
#else
    for (int j = 0; j < 16; j++) {
        w[j] = lut[bytes[j] >> 4] * s;
        w[16 + j] = lut[bytes[j] & 15] * s;
    }
#endif
}

/* sum x[k] * w[k] over k < K (a multiple of 32), in 16 lanes */
static inline float dot(const float *x, const float *w, int64_t K) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), acc);
    return _mm512_reduce_add_ps(acc);
#else
    float acc[16] = {0}, total = 0;
    for (int64_t k = 0; k < K; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += x[k + j] * w[k + j];
    for (int j = 0; j < 16; j++) total += acc[j];
    return total;
#endif
}

/* y[m, n] = sum_k x[m, k] * lut[q(n, k)] * absmax[(n * K + k) / block] (+ bias[n]); K % block == 0,
   block % 32 == 0. q: two 4-bit codes a byte, the first in the high nibble (bitsandbytes' layout).
   A weight row is decoded 16 bytes (32 weights) at a time into w, the high-nibble weights of the 16 bytes
   first and then the low ones; xs holds each input row permuted the same way, so the dots run on contiguous
   vectors. */
void nf4_linear(const float *x, int64_t M, int64_t K, const uint8_t *q, const float *absmax, int64_t block,
                int64_t N, const float *lut, const float *bias, float *y) {
    float *xs = (float *)aligned_alloc(64, M * K * sizeof(float));
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 32)
            for (int j = 0; j < 16; j++) {
                xs[m * K + c + j] = x[m * K + c + 2 * j];
                xs[m * K + c + 16 + j] = x[m * K + c + 2 * j + 1];
            }
    #pragma omp parallel
    {
        float *w = (float *)aligned_alloc(64, K * sizeof(float));
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *row = q + n * (K / 2);
            const float *scale = absmax + n * (K / block);
            for (int64_t start = 0, blk = 0; start < K; start += block, blk++) {
                const float s = scale[blk];
                for (int64_t c = start; c < start + block; c += 32) decode32(row + (c >> 1), lut, s, w + c);
            }
            for (int64_t m = 0; m < M; m++) {
                const float *xm = xs + m * K;
                const float total = dot(xm, w, K);
                y[m * N + n] = total + (bias ? bias[n] : 0.0f);
            }
        }
        free(w);
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
def library() -> Any | None:
    """The compiled kernel (``ctypes``), built once per machine into the user's cache; None without a compiler."""
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(flat.shape[0], self.out_features)
        self.lib.nf4_linear(
            flat.data_ptr(),
            flat.shape[0],
            self.in_features,
            self.codes.data_ptr(),
            self.absmax.data_ptr(),
            self.block,
            self.out_features,
            self.code.data_ptr(),
            0 if self.bias is None else self.bias.data_ptr(),
            y.data_ptr(),
        )
        return y.view(*x.shape[:-1], self.out_features)

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
