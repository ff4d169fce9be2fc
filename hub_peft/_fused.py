"""Fused CPU products for the engine's decode steps (few rows, no gradient): NF4, float32 and int8 linear layers,
each row's LoRAs added inside the same call, and a whole decode step of a Llama-family decoder in one call.

bitsandbytes' CPU path for a ``Linear4bit`` dequantizes the whole weight to float32 and then multiplies: per
token it reads half a byte a weight, writes four and reads them again, so an NF4 model decodes slower than its
float32 original. The NF4 kernel reads each 4-bit code once: each block's 16-value table is scaled once, each 16
bytes of codes become 32 weights with two table lookups in registers, and up to 8 input rows are served per pass
over the weights. The float32 kernel is a plain matrix-vector product split by weight rows across threads.

A decode step of one sequence makes ~200 such products, and a LoRA on a layer added a gather, two batched
matmuls and a scatter to each. With :class:`KernelLoras` the kernel computes each row's ``h = w·x A`` once
(``[rows, r]``, serial) and adds ``h Btᵀ`` to each output while the weight row is hot; rows map to their own
adapter slots, a mix to several.

``decode_step`` runs every block of a Llama-family decoder (norms, rotation, attention on the engine's slot
cache, the products) in one OpenMP parallel region: see :class:`hub_peft.serving.lean.NativeStep`, which
describes the model to it (:class:`DecoderSpec`, :class:`BlockSpec`, :class:`LinearSpec`).

The weight values are the layer's own (NF4: ``code[q] * absmax`` in float32, the double-quantized statistics
dequantized once); the sums run in another order than MKL's, so outputs equal ``F.linear(x, W) + w·(x A) B``
up to float32 rounding (tests: ``tests/test_fused.py``).

NOTE(build): ``_fused.c`` is compiled once per machine with the system C compiler (``cc -O3 -march=native
-fopenmp``) into hub_peft's cache (``base_model.cache_dir()``); OpenMP shares torch's libgomp thread pool.
Without a compiler, or on a layout a kernel does not take, layers keep their own path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base_model import cache_dir

logger = logging.getLogger(__name__)

MAX_ROWS = 32  # rows (tokens) up to which the fused NF4 product beats dequantize-then-GEMM (benchmarks/README.md)
MAX_ROWS_F32 = 8  # and the float32 one MKL's GEMM

_SOURCE = Path(__file__).with_name("_fused.c")  # the kernels, compiled on first use (see NOTE(build))


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@cache
def library(march: str = "native") -> Any | None:
    """The compiled kernels (``ctypes``), built once per machine into the user's cache; None without a compiler.
    ``march``: the instruction set (``-march=``); tests build ``x86-64-v3`` (AVX2) and ``x86-64`` (plain C) too,
    so every path of the source is checked on a machine that runs them."""
    compiler = os.environ.get("CC", "cc")
    flags = ["-O3", f"-march={march}", "-fopenmp", "-shared", "-fPIC"]
    source = _SOURCE.read_text()
    key = hashlib.sha256("\0".join([source, compiler, *flags, platform.machine(), _cpu_flags()]).encode())
    target = cache_dir() / "kernels" / f"fused-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # nothing half-written under the name
                built = Path(tmp) / "fused.so"
                command = [compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"]
                subprocess.run(command, check=True, capture_output=True)
                os.replace(built, target)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
            logger.warning("Linear layers keep their own path: the fused kernels did not build (%s).", detail)
            return None
    lib = ctypes.CDLL(str(target))
    lib.linear.restype = lib.decode_step.restype = ctypes.c_int  # 0, or -1: out of memory
    lib.linear.argtypes = [ctypes.POINTER(LinearSpec), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.decode_step.argtypes = [ctypes.POINTER(DecoderSpec), size, pointer, pointer, pointer, pointer, pointer]
    lib.nf4_dequantize.restype = None
    lib.nf4_dequantize.argtypes = [ctypes.POINTER(LinearSpec), pointer]
    return lib


class LinearSpec(ctypes.Structure):
    """One linear layer as the kernels read it (``Linear`` in ``_fused.c``)."""

    _fields_ = [
        ("kind", ctypes.c_int64),  # KIND_F32 / KIND_NF4 / KIND_I8
        ("K", ctypes.c_int64),
        ("N", ctypes.c_int64),
        ("W", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("block", ctypes.c_int64),
        ("lut", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("A", ctypes.c_void_p),
        ("Bt", ctypes.c_void_p),
        ("r", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("first", ctypes.c_void_p),
        ("slot", ctypes.c_void_p),
    ]


KIND_F32, KIND_NF4, KIND_I8 = 0, 1, 2


class BlockSpec(ctypes.Structure):
    """One decoder block of a Llama-family model (``Block`` in ``_fused.c``)."""

    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("qk_eps", ctypes.c_float),
        *((name, LinearSpec) for name in ("q", "k", "v", "o", "gate", "up", "down")),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("window", ctypes.c_int64),
        ("scaling", ctypes.c_float),
    ]


class DecoderSpec(ctypes.Structure):
    """A whole decoder for ``decode_step`` (``Decoder`` in ``_fused.c``)."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "max_len")),
        ("final_norm", ctypes.c_void_p),
        ("final_eps", ctypes.c_float),
        ("blocks", ctypes.POINTER(BlockSpec)),
    ]


@dataclass(frozen=True)
class KernelLoras:
    """LoRA slots for the kernels to add inside a product: input row ``m`` gets, for each entry ``e`` in
    ``first[m]:first[m + 1]`` and its slot ``s = slot[e]``, ``weights[s]·(x_m A[s]) Bt[s]ᵀ`` (a mix: several
    entries on one row). ``first`` None: every row has slot 0 alone (a single chat, or one adapter for all)."""

    A: torch.Tensor  # [slots, in, r] float32, contiguous (ranks zero-padded to the largest)
    Bt: torch.Tensor  # [slots, out, r]: B transposed, contiguous per output, the adapter's scale folded in
    weights: torch.Tensor  # [slots] float32
    first: torch.Tensor | None = None  # [rows + 1] int64
    slot: torch.Tensor | None = None  # [entries] int64

    @classmethod
    def one(cls, A: torch.Tensor, Bt: torch.Tensor, weight: float = 1.0) -> KernelLoras:
        """One LoRA (``A`` ``[in, r]``, ``Bt`` ``[out, r]``) on every row."""
        return cls(A[None].contiguous(), Bt[None].contiguous(), torch.tensor([float(weight)]))

    @staticmethod
    def takes(A: torch.Tensor, B: torch.Tensor) -> bool:
        """Whether LoRA matrices of this kind can go inside the kernels (float32)."""
        return A.dtype == B.dtype == torch.float32


def _no_grad_float32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)


def check_status(status: int) -> None:
    """A kernel's status: 0, or -1 when its scratch memory could not be allocated (nothing written)."""
    if status != 0:
        raise MemoryError("the fused kernel could not allocate its scratch memory; free memory or run fewer rows")


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class Fused:
    """The product of one linear layer by few rows through a fused kernel, optionally with one LoRA's delta:
    ``fused(x, (A, Bt, w))`` is ``layer(x) + w·(x A) Btᵀ`` (``Bt``: B transposed, contiguous per output).
    Subclasses describe the layer's weights to the kernel (``spec``, whose tensors they keep alive)."""

    in_features: int
    out_features: int
    max_rows: int
    spec: LinearSpec  # the layer without a LoRA

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self._with: tuple[KernelLoras, LinearSpec] | None = (
            None  # the last LoRA's spec (a decode plan serves many steps)
        )

    def with_lora(self, loras: KernelLoras | None) -> LinearSpec:
        """``spec`` with ``loras`` inside (kept for the next call with the same ones: a decode plan serves many
        steps)."""
        if loras is None:
            return self.spec
        if self._with is None or self._with[0] is not loras:
            spec = LinearSpec.from_buffer_copy(self.spec)
            spec.A, spec.Bt, spec.r, spec.w = (
                loras.A.data_ptr(),
                loras.Bt.data_ptr(),
                loras.A.shape[2],
                loras.weights.data_ptr(),
            )
            spec.first, spec.slot = _address(loras.first), _address(loras.slot)
            self._with = (loras, spec)
        return self._with[1]

    def __call__(self, x: torch.Tensor, loras: KernelLoras | None = None) -> torch.Tensor:
        x = x if x.is_contiguous() else x.contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features)
        rows = x.numel() // self.in_features
        check_status(self._lib.linear(ctypes.byref(self.with_lora(loras)), x.data_ptr(), rows, y.data_ptr()))
        return y

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this call should run here: float32 rows, at most ``max_rows``, no gradient to keep."""
        return _no_grad_float32(x) and x.numel() // self.in_features <= self.max_rows

    def takes_many(self, x: torch.Tensor) -> bool:
        """Whether :meth:`many` takes ``x``: float32 rows, no gradient to keep (a layer of its own may)."""
        return self.many_rows and _no_grad_float32(x)

    many_rows = False  # whether :meth:`many` beats the layer's own product beyond ``max_rows``

    def many(self, x: torch.Tensor) -> torch.Tensor:
        """The product of more rows than ``max_rows`` (no LoRA inside), where :attr:`many_rows`."""
        raise NotImplementedError


class FusedNF4(Fused):
    """A ``Linear4bit`` (NF4, float32 compute): its own packed codes (no copy), its block scales in float32."""

    max_rows = MAX_ROWS

    def __init__(self, layer: nn.Module, lib: Any) -> None:
        import bitsandbytes.functional as F

        super().__init__(lib)
        state = layer.weight.quant_state
        self.out_features, self.in_features = (int(d) for d in state.shape)
        self.codes = layer.weight.data  # uint8, two codes a byte
        absmax = state.absmax
        if state.nested:  # double quantization: the scales are themselves 8-bit; dequantized once here
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        self.absmax = absmax.float().contiguous()
        self.code = state.code.float().contiguous()
        self.bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        self.spec = LinearSpec(
            kind=KIND_NF4,
            K=self.in_features,
            N=self.out_features,
            W=self.codes.data_ptr(),
            scales=self.absmax.data_ptr(),
            block=int(state.blocksize),
            lut=self.code.data_ptr(),
            bias=_address(self.bias),
        )

    many_rows = True

    def many(self, x: torch.Tensor) -> torch.Tensor:
        """Many rows (a prompt chunk, a saturated step): the weight dequantized once into a scratch buffer of this
        thread, then one GEMM. bitsandbytes' CPU path dequantizes too, more slowly than this kernel (which writes
        each weight once, from registers): figures in benchmarks/README.md, "Single-stream decode"."""
        weight = _scratch(self.out_features * self.in_features).view(self.out_features, self.in_features)
        self._lib.nf4_dequantize(ctypes.byref(self.spec), weight.data_ptr())
        return nn.functional.linear(x, weight, self.bias)


_SCRATCH = threading.local()


def _scratch(floats: int) -> torch.Tensor:
    """A float32 buffer of at least ``floats``, one per thread, kept (a fresh multi-megabyte tensor per product
    would be fresh pages each time)."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.numel() < floats:
        buffer = _SCRATCH.buffer = torch.empty(floats)
    return buffer[:floats]


class FusedF32(Fused):
    """A float32 ``nn.Linear``: its own weight (no copy)."""

    max_rows = MAX_ROWS_F32

    def __init__(self, layer: nn.Module, lib: Any) -> None:
        super().__init__(lib)
        self.out_features, self.in_features = layer.weight.shape
        self.weight = layer.weight.detach()
        self.bias = None if layer.bias is None else layer.bias.detach()
        self.spec = LinearSpec(
            kind=KIND_F32, K=self.in_features, N=self.out_features, W=self.weight.data_ptr(), bias=_address(self.bias)
        )


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
        out_features, in_features = self.codes.shape
        self.spec = LinearSpec(
            kind=KIND_I8,
            K=in_features,
            N=out_features,
            W=self.codes.data_ptr(),
            scales=self.scale.data_ptr(),
            bias=_address(self.bias),
        )
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
        y = torch.empty(*x.shape[:-1], self.codes.shape[0])
        rows = x.numel() // self.codes.shape[1]
        check_status(self._lib.linear(ctypes.byref(self.spec), x.data_ptr(), rows, y.data_ptr()))
        return y


def int8_head(module: nn.Module) -> Int8Linear | None:
    """An :class:`Int8Linear` for a float32 CPU ``nn.Linear`` head when the kernels build; else None."""
    if not isinstance(module, nn.Linear) or module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
        return None
    lib = library()
    return None if lib is None else Int8Linear(module, lib)
