"""A Llama-family decoder layer (RMSNorm, rotary attention with grouped key/value heads, SiLU-gated
MLP: Llama, SmolLM, Mistral, Qwen2, ...) as one autograd Function with its backward written out, for
the cached ReFT trainer's steps.

Why: a step runs every upper layer on only a few hundred rows. At that size the ~100 small tensor ops
autograd records per layer, and the engine's bookkeeping for them, cost a third of the step on top of
the matrix products. The weights are frozen, so the backward carries only the input's gradient and
needs no weight gradient: about 30 ops per layer, forward and backward together.

The trainer uses it only for layers built exactly like this (:meth:`LeanLayer.of`) and only after
checking, on one example, that it gives the plain model's logits (see ``hub_peft/training/reft_cache.py``).
The attention is per example over its cached prefix, as in the trainer's packed attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._kernels import Gemms, is_frozen_float32_linear, matmul, matmul_back

_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "act_fn"}


@dataclass(frozen=True, eq=False)
class LeanLayer:
    """One decoder layer's weights, and the GEMMs each linear layer runs on (``gemms``: by weight id;
    torch's default GEMM for a weight not there)."""

    norm1: nn.Module
    norm2: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    layer_idx: int
    gemms: dict[int, Gemms]

    @classmethod
    def of(cls, layer: nn.Module, gemms: dict[int, Gemms] | None = None) -> LeanLayer | None:
        """The lean version of ``layer``, or None unless it is built exactly like a Llama decoder layer
        with frozen float32 weights and an attention without extras (sliding window, soft-capping)."""
        parts = dict(layer.named_children())
        if set(parts) != _LAYER_PARTS:
            return None
        attention, mlp = parts["self_attn"], parts["mlp"]
        if set(dict(attention.named_children())) != _ATTENTION_PARTS or set(dict(mlp.named_children())) != _MLP_PARTS:
            return None
        linears = [getattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        norms = [parts["input_layernorm"], parts["post_attention_layernorm"]]
        if not all(is_frozen_float32_linear(m) for m in linears):  # biases are fine: they need no gradient
            return None
        if not all(_is_rms_norm(n) for n in norms) or type(mlp.act_fn).__name__ not in ("SiLUActivation", "SiLU"):
            return None
        window = getattr(
            attention, "sliding_window", getattr(getattr(attention, "config", None), "sliding_window", None)
        )
        if window or getattr(attention, "softcap", None) or getattr(attention, "attn_logit_softcapping", None):
            return None  # Qwen2 sets its window per layer, Mistral in its config
        head_dim = getattr(attention, "head_dim", None)
        if not head_dim or not hasattr(attention, "scaling") or not hasattr(attention, "layer_idx"):
            return None
        heads, kv_heads = linears[0].out_features // head_dim, linears[1].out_features // head_dim
        q, k, v, o, gate, up, down = linears
        return cls(
            norms[0],
            norms[1],
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            scaling=attention.scaling,
            layer_idx=attention.layer_idx,
            gemms=gemms or {},
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Any) -> torch.Tensor:
        """The layer on packed ``hidden`` [n, d] (``cos``/``sin`` [n, head_dim]; ``batch``: the trainer's
        packed batch, for the attention per example)."""
        return _LayerFunction.apply(hidden.contiguous(), self, cos, sin, batch)

    def project(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        return matmul(x, linear.weight, linear.bias, self.gemms.get(id(linear.weight), Gemms()).forward)

    def project_back(self, grad: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """The gradient of :meth:`project`'s input."""
        return matmul_back(grad, linear.weight, self.gemms.get(id(linear.weight), Gemms()).backward)


def _is_rms_norm(norm: nn.Module) -> bool:
    return (
        type(norm).__name__.endswith("RMSNorm")
        and not list(norm.children())
        and isinstance(getattr(norm, "weight", None), torch.Tensor)
        and not norm.weight.requires_grad
        and norm.weight.dtype == torch.float32
        and isinstance(_norm_eps(norm), float)
    )


def _norm_eps(norm: nn.Module) -> Any:
    return getattr(norm, "variance_epsilon", getattr(norm, "eps", None))  # Llama's name, then the usual one


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight * x / rms(x)`` and what its backward needs (the normalized x, 1 / rms)."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _norm_eps(norm))
    normed = x * rstd
    return normed * norm.weight, normed, rstd


def _rms_norm_back(grad: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    grad = grad * norm.weight
    return rstd * (grad - normed * (grad * normed).mean(-1, keepdim=True))


def _rotate(x: torch.Tensor) -> torch.Tensor:
    """Llama's ``rotate_half``: (a, b) -> (-b, a) on the two halves of the last axis."""
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


def _rotate_back(x: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`_rotate`: (a, b) -> (b, -a)."""
    a, b = x.chunk(2, -1)
    return torch.cat((b, -a), -1)


class _PerExample:
    """Moves packed rows [n, heads * dim] to a padded view [examples, heads, width, dim] and back."""

    def __init__(self, batch: Any, dim: int) -> None:
        self.batch, self.dim = batch, dim

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batch
        return x.index_select(0, b.row_index).view(b.rows, b.width, -1, self.dim).transpose(1, 2)

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        b = self.batch
        return x.transpose(1, 2).reshape(b.rows * b.width, -1).index_select(0, b.packed_index)

    def rows_of_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """:meth:`packed`'s transpose: the gradient placed back in the padded view, zero at padding."""
        b = self.batch
        full = grad.new_zeros(b.rows * b.width, grad.shape[1]).index_copy_(0, b.packed_index, grad)
        return full.view(b.rows, b.width, -1, self.dim).transpose(1, 2)


class _LayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer: LeanLayer, cos, sin, batch):
        n, dim, kv, groups = x.shape[0], layer.head_dim, layer.kv_heads, layer.heads // layer.kv_heads
        view = _PerExample(batch, dim)
        h, normed1, rstd1 = _rms_norm(x, layer.norm1)
        cos3, sin3 = cos[:, None], sin[:, None]
        q = layer.project(h, layer.q).view(n, -1, dim)
        k = layer.project(h, layer.k).view(n, -1, dim)
        q = (q * cos3).add_(_rotate(q).mul_(sin3))
        k = (k * cos3).add_(_rotate(k).mul_(sin3))
        queries = view.rows(q.view(n, -1)).reshape(batch.rows, kv, -1, dim)  # [examples, kv, groups * width, dim]
        keys, values = view.rows(k.view(n, -1)), view.rows(layer.project(h, layer.v))
        prefix = batch.prefix.get(layer.layer_idx)
        if prefix is not None:
            keys, values = torch.cat([prefix[0], keys], 2), torch.cat([prefix[1], values], 2)
        scores = torch.matmul(queries, keys.transpose(2, 3)).mul_(layer.scaling)
        scores = scores.view(batch.rows, kv, groups, batch.width, -1).add_(batch.mask[:, None])
        probs = scores.softmax(-1).view(batch.rows, kv, groups * batch.width, -1)
        attended = torch.matmul(probs, values).view(batch.rows, layer.heads, batch.width, dim)
        x2 = x + layer.project(view.packed(attended), layer.o)
        h2, normed2, rstd2 = _rms_norm(x2, layer.norm2)
        gate, up = layer.project(h2, layer.gate), layer.project(h2, layer.up)
        act = nn.functional.silu(gate)
        out = x2 + layer.project(act * up, layer.down)
        ctx.layer, ctx.view = layer, view
        ctx.kept = (normed1, rstd1, cos3, sin3, queries, keys, values, probs, normed2, rstd2, gate, up, act)
        return out

    @staticmethod
    def backward(ctx, grad):
        layer, view = ctx.layer, ctx.view
        normed1, rstd1, cos3, sin3, queries, keys, values, probs, normed2, rstd2, gate, up, act = ctx.kept
        ctx.kept = None
        b, n, dim, kv = view.batch, grad.shape[0], layer.head_dim, layer.kv_heads
        grad = grad.contiguous()
        # MLP: out = x2 + down(silu(gate(h2)) * up(h2)), h2 = norm2(x2)
        grad_mlp = layer.project_back(grad, layer.down)
        grad_up = grad_mlp * act
        grad_gate = torch.ops.aten.silu_backward(grad_mlp.mul_(up), gate)
        grad_h2 = layer.project_back(grad_gate, layer.gate).add_(layer.project_back(grad_up, layer.up))
        grad_x2 = _rms_norm_back(grad_h2, normed2, rstd2, layer.norm2).add_(grad)
        # attention: x2 = x + o(attention(rotary(q(h)), rotary(k(h)), v(h))), h = norm1(x)
        grad_attended = view.rows_of_grad(layer.project_back(grad_x2, layer.o)).reshape(b.rows, kv, -1, dim)
        grad_probs = torch.matmul(grad_attended, values.transpose(2, 3))
        grad_values = torch.matmul(probs.transpose(2, 3), grad_attended)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(layer.scaling)
        grad_queries = torch.matmul(grad_scores, keys).view(b.rows, layer.heads, b.width, dim)
        grad_keys = torch.matmul(grad_scores.transpose(2, 3), queries)
        own = slice(keys.shape[2] - b.width, None)  # this step's own keys and values, after the cached prefix
        grad_q = view.packed(grad_queries).view(n, -1, dim)
        grad_k = view.packed(grad_keys[:, :, own]).view(n, -1, dim)
        grad_q = (grad_q * cos3).add_(_rotate_back(grad_q * sin3)).view(n, -1)
        grad_k = (grad_k * cos3).add_(_rotate_back(grad_k * sin3)).view(n, -1)
        grad_h = layer.project_back(grad_q, layer.q)
        grad_h.add_(layer.project_back(grad_k, layer.k)).add_(
            layer.project_back(view.packed(grad_values[:, :, own]), layer.v)
        )
        return _rms_norm_back(grad_h, normed1, rstd1, layer.norm1).add_(grad_x2), None, None, None, None
