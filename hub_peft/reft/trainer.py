"""Train ReFT interventions on prompt → response pairs, fast on a CPU without changing the math.

The base model is frozen and the interventions only touch chosen prompt positions at chosen layers,
so for each example everything below the lowest intervened layer, and the keys/values of every
position before the first intervened one, are the same in every epoch. :func:`train_reft` computes
them once (one no-grad forward of the plain model) and each step then runs only the layers from the
lowest intervened one up (above it, for a block_output edit), on the positions from the first
intervened one on, all examples packed into one sequence without padding (attention per example over
its cached prefix), with logits only where a response token is predicted. ``method="full"`` is the
plain reference loop (whole forward, same loss); both give the same losses up to float rounding.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._bnb import keep_4bit_trainable
from ..errors import InvalidInputError
from ..optimize import Example, TrainResult, fit, pad_batch
from .model import ReftModel, innermost_model, prompt_positions


def train_reft(
    model: ReftModel,
    examples: list[Example],
    *,
    epochs: int = 100,
    lr: float = 4e-3,
    batch_size: int = 10,
    weight_decay: float = 0.0,
    schedule: str = "linear",
    target_loss: float | None = None,
    seed: int = 0,
    method: str = "cached",
    on_step: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model``'s interventions (see :func:`hub_peft.optimize.fit` for the loop and stopping rules).

    ``method="cached"`` (default) is the fast path described above; ``"full"`` the plain loop.
    """
    if method not in ("cached", "full"):
        raise InvalidInputError(f"method must be 'cached' or 'full', got {method!r}.")
    if not examples:
        raise InvalidInputError("No training examples.")
    keep_4bit_trainable(model.base_model)
    named = list(model.interventions.named_parameters())
    for _, p in named:
        p.requires_grad_(True)
    model.base_model.eval()
    model.interventions.train()
    try:
        steps = _CachedSteps(model, examples) if method == "cached" else _FullSteps(model, examples)
        return fit(
            # No weight decay on R's orthogonal parametrization: decaying its (gradient-free) diagonal would break R.
            [p for n, p in named if "parametrizations" not in n],
            steps.loss,
            len(examples),
            frozen_decay=[p for n, p in named if "parametrizations" in n],
            epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, schedule=schedule,
            target_loss=target_loss, seed=seed, on_step=on_step, should_stop=should_stop,
        )  # fmt: skip
    finally:
        model.interventions.eval()
        for _, p in named:
            p.requires_grad_(False)


class _FullSteps:
    """Reference: a right-padded forward of whole examples with labels on response tokens."""

    def __init__(self, model: ReftModel, examples: list[Example]) -> None:
        self.model, self.examples = model, examples

    def loss(self, rows: list[int]) -> torch.Tensor:
        batch = [self.examples[i] for i in rows]
        ids, mask, labels = pad_batch(batch)
        lengths = torch.tensor([len(ex.prompt_ids) for ex in batch])
        return self.model(input_ids=ids, attention_mask=mask, prompt_lengths=lengths, labels=labels).loss


@dataclass
class _Cached:
    start: int  # first intervened position; everything before it is a cached prefix
    hidden: torch.Tensor  # [n, d]: hidden state entering the first computed layer, positions start..T-2
    keys: list[torch.Tensor]  # per layer [kv_heads, start, head_dim]
    values: list[torch.Tensor]
    ids: torch.Tensor  # [n]
    targets: torch.Tensor  # [n]: the next token where the loss counts, else -100
    positions: dict[str, torch.Tensor]  # group -> [k], relative to start


class _CachedSteps:
    """Each step runs the layers from the lowest intervened one up, on the positions from the first
    intervened one on, as one packed sequence (see the module docstring)."""

    def __init__(self, model: ReftModel, examples: list[Example]) -> None:
        self.model = model
        self.core = innermost_model(model.base_model)
        self.layers = model._layers
        config = model.reft_config
        lowest = config.layers[0]
        # A block_output edit at the lowest layer leaves that layer's own computation unchanged: start above it.
        self.skip_lowest = config.components == ["block_output"] and lowest + 1 < len(self.layers)
        self.first_layer = lowest + 1 if self.skip_lowest else lowest
        self.first, self.last = config.first_last
        self.cached: list[_Cached] = []
        with torch.no_grad():
            for i in range(0, len(examples), 16):
                self.cached.extend(self._prepare(examples[i : i + 16]))

    def _prepare(self, examples: list[Example]) -> list[_Cached]:
        """One right-padded no-grad forward of the plain base model (causal, so padding changes nothing)."""
        seqs = [ex.prompt_ids + ex.response_ids for ex in examples]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        captured: dict[str, torch.Tensor] = {}

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["h"] = args[0] if args else kwargs["hidden_states"]

        hook = self.layers[self.first_layer].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            cache = self.core(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).past_key_values
        finally:
            hook.remove()
        out = []
        for i, (ex, seq) in enumerate(zip(examples, seqs, strict=True)):
            n_prompt, end = len(ex.prompt_ids), len(seq) - 1  # the final EOS predicts nothing: never computed
            positions = prompt_positions(mask[i : i + 1, : len(seq)], self.first, self.last, torch.tensor([n_prompt]))
            start = int(min(p.min() for p in positions.values()))
            targets = torch.full((len(seq),), -100, dtype=torch.long)
            targets[n_prompt - 1 : -1] = torch.tensor(ex.response_ids)
            out.append(_Cached(
                start=start,
                hidden=captured["h"][i, start:end].clone(),
                keys=[layer.keys[i, :, :start].clone() for layer in cache.layers],
                values=[layer.values[i, :, :start].clone() for layer in cache.layers],
                ids=ids[i, start:end],
                targets=targets[start:end],
                positions={g: p[0] - start for g, p in positions.items()},
            ))  # fmt: skip
        return out

    def loss(self, rows: list[int]) -> torch.Tensor:
        """The examples' suffixes packed back to back into one sequence (no padding in the matmuls);
        attention runs per example over its cached prefix and itself (see :func:`_packed_attention`)."""
        from transformers import DynamicCache

        batch = [self.cached[i] for i in rows]
        hidden = torch.cat([c.hidden for c in batch])[None]
        ids = torch.cat([c.ids for c in batch])[None]
        targets = torch.cat([c.targets for c in batch])[None]
        position_ids = torch.cat([c.start + torch.arange(len(c.ids)) for c in batch])[None]
        layout = _Layout.build([c.start for c in batch], [len(c.ids) for c in batch], hidden.dtype)
        positions: dict[str, list[torch.Tensor]] = {g: [] for g in batch[0].positions}
        offset = 0
        for c in batch:
            for g, p in c.positions.items():
                positions[g].append(p + offset)
            offset += len(c.ids)
        cache = None
        if layout.n_prefix:
            cache = DynamicCache(config=self.core.config)
            for layer in range(len(batch[0].keys)):
                keys = torch.cat([c.keys[layer] for c in batch], dim=1)[None]
                cache.update(keys, torch.cat([c.values[layer] for c in batch], dim=1)[None], layer)
        keep = targets != -100
        lowest = self.model.reft_config.layers[0]
        feed = (lambda: self.model._edit(lowest, "block_output", hidden)) if self.skip_lowest else (lambda: hidden)
        with (
            _start_at_layer(self.layers, self.first_layer, feed),
            _packed_attention_for(self.core, layout),
            self.model.intervening({g: torch.cat(p)[None] for g, p in positions.items()}),
        ):
            logits = self.core(
                input_ids=ids,
                attention_mask=layout.placeholder_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                logits_to_keep=keep,  # logits only where a response token is predicted
            ).logits
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets[keep])


@dataclass
class _Layout:
    """Where each example of a packed sequence sits: its queries, and its keys (cached prefix, then itself)."""

    n_prefix: int
    q_index: torch.Tensor  # [rows, max_len] -> packed query position (0 where padded)
    k_index: torch.Tensor  # [rows, max_keys] -> position in [prefix..., suffix...] keys (0 where padded)
    mask: torch.Tensor  # [rows, 1, max_len, max_keys] additive float mask
    valid: torch.Tensor  # [rows, max_len] real queries
    placeholder_mask: torch.Tensor  # a 4D mask transformers passes through untouched to the attention function

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], dtype: torch.dtype) -> _Layout:
        rows, width, n_prefix = len(starts), max(lengths), sum(starts)
        n_keys = max(s + n for s, n in zip(starts, lengths, strict=True))
        q_index = torch.zeros(rows, width, dtype=torch.long)
        k_index = torch.zeros(rows, n_keys, dtype=torch.long)
        allowed = torch.zeros(rows, width, n_keys, dtype=torch.bool)
        allowed[:, :, 0] = True  # padded queries look at something, so no row of the softmax is empty
        prefix_at = suffix_at = 0
        for r, (s, n) in enumerate(zip(starts, lengths, strict=True)):
            q_index[r, :n] = torch.arange(suffix_at, suffix_at + n)
            k_index[r, :s] = torch.arange(prefix_at, prefix_at + s)
            k_index[r, s : s + n] = n_prefix + torch.arange(suffix_at, suffix_at + n)
            allowed[r, :n, :s] = True
            allowed[r, :n, s : s + n] = torch.ones(n, n, dtype=torch.bool).tril()
            prefix_at, suffix_at = prefix_at + s, suffix_at + n
        valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        return cls(n_prefix, q_index, k_index, mask, valid, torch.zeros(1, 1, 1, 1, dtype=dtype))


_ACTIVE_LAYOUT: ContextVar[tuple[_Layout, Callable]] = ContextVar("hub_peft_packed_layout")
_PACKED = "hub_peft_packed"


def _packed_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Attention of a packed sequence done per example: gather each example's queries and keys into a
    small padded batch, run the model's usual attention on it, and scatter back. Exactly the attention
    each example would get alone, without paying for the (mostly masked) packed-by-packed score matrix."""
    layout, inner = _ACTIVE_LAYOUT.get()
    q = query[0][:, layout.q_index].transpose(0, 1)  # [heads, rows, len, dim] -> [rows, heads, len, dim]
    k = key[0][:, layout.k_index].transpose(0, 1)
    v = value[0][:, layout.k_index].transpose(0, 1)
    out, _ = inner(module, q, k, v, layout.mask, **kwargs)
    return out[layout.valid][None], None  # [1, packed, heads, dim]


@contextmanager
def _packed_attention_for(core: nn.Module, layout: _Layout) -> Iterator[None]:
    from transformers import AttentionInterface

    config = core.config
    previous = config._attn_implementation
    attention = next(m for m in core.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling"))
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    inner = AttentionInterface().get_interface(previous, eager) if previous != "eager" else eager
    if inner is None:
        raise RuntimeError(f"No attention function found for {previous!r} in {type(core).__name__}.")
    AttentionInterface.register(_PACKED, _packed_attention)
    token = _ACTIVE_LAYOUT.set((layout, inner))
    config._attn_implementation = _PACKED
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE_LAYOUT.reset(token)


class _Passthrough(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def _start_at_layer(layers: nn.ModuleList, first: int, feed: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Skip layers ``0..first-1`` and give layer ``first`` the hidden state ``feed()`` for one forward."""
    saved = [layers[i] for i in range(first)]
    skip = _Passthrough()
    for i in range(first):
        layers[i] = skip

    def feed_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (feed(), *args[1:]), kwargs
        kwargs["hidden_states"] = feed()
        return args, kwargs

    handle = layers[first].register_forward_pre_hook(feed_hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()
        for i, layer in enumerate(saved):
            layers[i] = layer
