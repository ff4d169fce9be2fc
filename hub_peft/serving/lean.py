"""A lean decode step for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3): the same maths as transformers'
modules, with fewer operations per block.

A decode step of one chat is a few hundred small operations around the weight products, and each costs a few
microseconds of dispatch whatever its size: transformers' blocks spend eight of them on an RMSNorm, fourteen on
the rotary embedding of the queries and keys, and more on transposes, output records and hooks. This step runs the
blocks' own modules (the engine's :class:`~.row_deltas.RowDeltas` linear layers, so every row's LoRA/IA3 deltas
and the fused NF4 kernel apply as in any step) and replaces only the glue: ``rms_norm`` in one call, the rotary
embedding of queries and keys together in three (a sign-folded sine and ``roll`` instead of ``rotate_half``),
the attention straight on the slot cache (:func:`.kv_cache.attend`) without transposes.

Where every block linear has a fused kernel, :class:`NativeStep` goes further: the whole step (norms, rotation,
attention, every product with the rows' LoRAs inside) is one call of ``decode_step`` in ``hub_peft/_fused.c``.

It runs decode steps only (one new token per sequence): prompt chunks keep transformers' forward, which also
carries the ReFT edits (they touch prompt positions only). The engine checks it against transformers' own forward
once, before the first sequence (:meth:`.engine.Engine._check_slot_cache`), and keeps transformers' path, with the
reason, where the two differ beyond float rounding; the sums run in another order (``addcmul``, ``rms_norm``), so
logits agree to ~1e-6, not bit for bit (tests: ``tests/test_architectures.py``).
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import nn

from .._fused import BlockSpec, DecoderSpec, Fused, LinearSpec, check_status, library
from ..modeling import text_config
from . import kv_cache
from .row_deltas import Plan, RowDeltas

MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # their blocks: norm, attention, norm, gated MLP

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")
# a block's linear layers in the order of BlockSpec's (q, k, v, o, gate, up, down)
_BLOCK_LINEARS = (*(f"self_attn.{n}" for n in _ATTENTION[:4]), *(f"mlp.{n}" for n in _MLP[:3]))


def lean_blocker(core: nn.Module) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``core`` (a ``*ForCausalLM``), or None."""
    config = text_config(core.config)
    if config.model_type not in MODEL_TYPES:
        return f"no lean decode step for {config.model_type!r} models (only {', '.join(sorted(MODEL_TYPES))})"
    body: Any = getattr(core, "model", None)
    if not all(hasattr(body, a) for a in ("embed_tokens", "rotary_emb", "layers", "norm")) or not hasattr(
        core, "lm_head"
    ):
        return f"{type(core).__name__} lacks the modules of a Llama-family causal LM"
    for layer in body.layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(hasattr(attention, a) for a in _ATTENTION) or not all(hasattr(mlp, a) for a in _MLP):
            return f"{type(layer).__name__} is not a Llama-family block (attention and gated MLP)"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        if any(not hasattr(norm, "variance_epsilon") for norm in norms):
            return f"{type(norms[0]).__name__} is not an RMSNorm"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return "its logits are scaled or soft-capped"
    return None


class LeanDecoder:
    """One decode step of a Llama-family ``core`` over the engine's slot cache: ``decoder(ids, step)`` gives the
    logits ``[tokens, vocab]`` of the packed new tokens ``ids`` ``[1, tokens]`` laid out by ``step``."""

    def __init__(self, core: nn.Module) -> None:
        config = text_config(core.config)
        self.core, self.body = core, core.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        # NOTE(layout): Qwen2/3 name each layer's window on its attention module; Mistral's applies to every layer
        self.windows = [getattr(layer.self_attn, "sliding_window", window) for layer in self.body.layers]
        self.steps = 0  # decode steps run here (tests check the fast path really ran)
        self.native_reason = native_blocker(core)
        self._native = NativeStep(self) if self.native_reason is None else None

    @property
    def native_steps(self) -> int:
        """Steps run as one call of the fused kernels' ``decode_step`` (see :class:`NativeStep`)."""
        return 0 if self._native is None else self._native.steps

    def __call__(self, ids: torch.Tensor, step: kv_cache.RaggedStep, plan: Plan | None = None) -> torch.Tensor:
        tokens, heads, kv_heads, dim = ids.shape[1], self.heads, self.kv_heads, self.head_dim
        half = dim // 2
        hidden = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(hidden, step.token_positions[None])
        if self._native is not None and self._native.run(hidden, cos, sin, step, plan):
            self.steps += 1
            return self.core.lm_head(hidden)[0]
        cos = cos[0, :, None]  # [tokens, 1, dim], broadcast over heads
        # rotate_half(x) * sin == roll(x, half) * [-sin[:half], sin[half:]]
        sin = torch.cat([-sin[0, :, None, :half], sin[0, :, None, half:]], dim=-1)
        for index, layer in enumerate(self.body.layers):
            attention, mlp = layer.self_attn, layer.mlp
            x = _rms(layer.input_layernorm, hidden)
            q = attention.q_proj(x).view(tokens, heads, dim)
            k = attention.k_proj(x).view(tokens, kv_heads, dim)
            v = attention.v_proj(x).view(tokens, kv_heads, dim)
            if hasattr(attention, "q_norm"):  # Qwen3: an RMSNorm over each head before the rotation
                q, k = _rms(attention.q_norm, q), _rms(attention.k_norm, k)
            qk = torch.cat([q, k], dim=1)
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
            queries = qk[:, :heads].view(tokens, kv_heads, heads // kv_heads, dim)
            out = kv_cache.attend(step, index, queries, qk[:, heads:], v, attention.scaling, self.windows[index], None)
            hidden = hidden + attention.o_proj(out.view(1, tokens, heads * dim).to(hidden.dtype))
            x = _rms(layer.post_attention_layernorm, hidden)
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        self.steps += 1
        return self.core.lm_head(_rms(self.body.norm, hidden))[0]


def _rms(norm: Any, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def native_blocker(core: nn.Module) -> str | None:
    """Why :class:`NativeStep` cannot run ``core``'s decode steps (on top of :func:`lean_blocker`), or None: every
    block linear must be the engine's :class:`~.row_deltas.RowDeltas` with a fused kernel (float32 or NF4), the MLP
    a SiLU-gated one, the norms and embeddings float32."""
    if library() is None:
        return "the fused kernels did not build"
    body: Any = core.model
    if body.embed_tokens.weight.dtype != torch.float32 or body.norm.weight.dtype != torch.float32:
        return "its embeddings and final norm are not float32"
    if getattr(text_config(core.config), "hidden_act", None) != "silu":
        return "its MLP is not SiLU-gated"
    for layer in body.layers:
        for name in _BLOCK_LINEARS:
            module = layer.get_submodule(name)
            if not isinstance(module, RowDeltas) or module.fused is None:
                return f"{name} is not a linear layer the fused kernels take (float32 or NF4 weights)"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [getattr(layer.self_attn, n) for n in ("q_norm", "k_norm") if hasattr(layer.self_attn, n)]
        if any(norm.weight.dtype != torch.float32 or not norm.weight.is_contiguous() for norm in norms):
            return "its norms' weights are not contiguous float32"  # the kernel reads them as float arrays
        if layer.input_layernorm.variance_epsilon != layer.post_attention_layernorm.variance_epsilon:
            return "its two norms of a block differ in epsilon"
    return None


class NativeStep:
    """A whole decode step as one call of ``decode_step`` in :mod:`hub_peft._fused`: the norms, the rotation, the
    slot cache's attention and every product of every block in one parallel region of the kernels' threads, with
    the rows' LoRAs (one per row, or a weighted mix) inside each product. It takes decode steps up to the kernels'
    row limit whose adapters are LoRAs or none; any other step (IA3 rows, more rows) runs the lean step's Python
    (``run`` returns False).

    NOTE(perf): the lean step still makes ~20 calls per block (products, norms, the rotation, the attention), each
    a few microseconds of Python, dispatch and thread wake-up: with 30 blocks, more time than the products of a
    one-row step of a small model. Here the threads meet at a barrier after each product instead."""

    def __init__(self, lean: LeanDecoder) -> None:
        body, config = lean.body, text_config(lean.core.config)
        lib = library()
        assert lib is not None  # native_blocker checked that it builds
        self._lib = lib
        self.steps = 0
        self._modules = []
        blocks = (BlockSpec * len(body.layers))()
        for spec, layer, window in zip(blocks, body.layers, lean.windows, strict=True):
            attention = layer.self_attn
            self._modules.append([layer.get_submodule(name) for name in _BLOCK_LINEARS])
            spec.input_norm = layer.input_layernorm.weight.data_ptr()
            spec.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            spec.eps = layer.input_layernorm.variance_epsilon
            if hasattr(attention, "q_norm"):
                spec.q_norm, spec.k_norm = attention.q_norm.weight.data_ptr(), attention.k_norm.weight.data_ptr()
                spec.qk_eps = attention.q_norm.variance_epsilon
            spec.window, spec.scaling = window or 0, attention.scaling
        self._blocks = blocks
        inter = body.layers[0].mlp.gate_proj.out_features
        self._spec = DecoderSpec(
            layers=len(body.layers),
            hidden=config.hidden_size,
            heads=lean.heads,
            kv_heads=lean.kv_heads,
            head_dim=lean.head_dim,
            inter=inter,
            final_norm=body.norm.weight.data_ptr(),
            final_eps=body.norm.variance_epsilon,
            blocks=blocks,
        )
        self.max_rows = min(m.fused.max_rows for linears in self._modules for m in linears)
        self._plan: tuple[Plan | None, int] | None = None  # the plan and rows the specs' LoRAs are set for
        self._cache: kv_cache.SlotCache | None = None  # the slot cache the specs point into

    def _set_loras(self, plan: Plan | None, rows: int) -> bool:
        """Put each layer's LoRA of ``plan`` into the specs; False when the plan needs the layers' own path."""
        if self._plan is not None and self._plan[0] is plan and self._plan[1] == rows:
            return True
        chosen: list[list[LinearSpec]] = []
        for linears in self._modules:
            specs = []
            for module in linears:
                fits, loras = module.kernel_loras(rows)
                if not fits:
                    return False
                fused: Fused = module.fused
                specs.append(fused.with_lora(loras))
            chosen.append(specs)
        for block, specs in zip(self._blocks, chosen, strict=True):
            block.q, block.k, block.v, block.o, block.gate, block.up, block.down = specs
        self._plan = (plan, rows)
        return True

    def _set_cache(self, cache: kv_cache.SlotCache) -> bool:
        if cache is not self._cache:
            if any(t.dtype != torch.float32 or not t.is_contiguous() for t in (*cache.keys, *cache.values)):
                return False
            for block, keys, values in zip(self._blocks, cache.keys, cache.values, strict=True):
                block.keys, block.values = keys.data_ptr(), values.data_ptr()
            self._spec.max_len = cache.max_len
            self._cache = cache
        return True

    def run(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: kv_cache.RaggedStep, plan: Plan | None
    ) -> bool:
        """The step's blocks and final norm on ``hidden`` ``[1, tokens, hidden]`` (the embeddings, replaced in
        place), when this step is one the kernel takes; False (nothing done) otherwise."""
        rows = hidden.shape[1]
        if rows > self.max_rows or hidden.dtype != torch.float32 or not self._set_cache(step.cache):
            return False
        if not self._set_loras(plan, rows):
            return False
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        slots, positions = step.token_slots.contiguous(), step.token_positions.contiguous()
        status = self._lib.decode_step(
            ctypes.byref(self._spec),
            rows,
            hidden.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            positions.data_ptr(),
        )
        check_status(status)
        self.steps += 1
        return True
