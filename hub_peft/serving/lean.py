"""A lean decode step for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3): the same maths as transformers'
modules, with fewer operations per block.

A decode step of one chat is a few hundred small operations around the weight products, and each costs a few
microseconds of dispatch whatever its size: transformers' blocks spend eight of them on an RMSNorm, fourteen on
the rotary embedding of the queries and keys, and more on transposes, output records and hooks. This step runs the
blocks' own modules (the engine's :class:`~.row_deltas.RowDeltas` linear layers, so every row's LoRA/IA3 deltas
and the fused NF4 kernel apply as in any step) and replaces only the glue: ``rms_norm`` in one call, the rotary
embedding of queries and keys together in three (a sign-folded sine and ``roll`` instead of ``rotate_half``),
the attention straight on the slot cache (:func:`.kv_cache.attend`) without transposes.

It runs decode steps only (one new token per sequence): prompt chunks keep transformers' forward, which also
carries the ReFT edits (they touch prompt positions only). The engine checks it against transformers' own forward
once, before the first sequence (:meth:`.engine.Engine._check_slot_cache`), and keeps transformers' path, with the
reason, where the two differ beyond float rounding; the sums run in another order (``addcmul``, ``rms_norm``), so
logits agree to ~1e-6, not bit for bit (tests: ``tests/test_lean.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modeling import text_config
from . import kv_cache

MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # their blocks: norm, attention, norm, gated MLP

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


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

    def __call__(self, ids: torch.Tensor, step: kv_cache.RaggedStep) -> torch.Tensor:
        tokens, heads, kv_heads, dim = ids.shape[1], self.heads, self.kv_heads, self.head_dim
        half = dim // 2
        hidden = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(hidden, step.token_positions[None])
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
