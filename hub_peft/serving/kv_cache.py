"""The engine's own KV cache: one slot per running sequence, and the attention that reads it.

Every decoder layer keeps keys and values as ``[slots, kv_heads, max_len, head_dim]`` (allocated
lazily: untouched pages cost no memory). A forward of the engine is one *packed* sequence: the new
tokens of every running sequence (a prompt chunk of a prefilling one, the last sampled token of a
decoding one) side by side in one row ``[1, tokens]``, with no padding, through transformers' own model
code with ``attn_implementation="hub_peft_ragged"``. The attention function below writes each token's
key/value into its sequence's slot (one indexed write for the whole step) and attends over that slot:
each run of decoding sequences in consecutive slots is one ``scaled_dot_product_attention`` call on a
view of the cache, each prompt chunk one causal call of its own (grouped query heads are folded into
the query length, so keys are never repeated).

Layers with a sliding window (Mistral, Gemma 2/3) get the window the model
passes for that layer (a key ``k`` is seen from position ``q`` when ``q - window < k <= q``, transformers'
``sliding_window_overlay``); soft-capped attention logits (Gemma 2) take the explicit
``softcap · tanh(scores / softcap)`` path of transformers' eager attention, since SDPA has no soft cap.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

ATTENTION = "hub_peft_ragged"
_STEP: ContextVar[RaggedStep] = ContextVar("hub_peft_ragged_step")


@dataclass
class _Run:
    """One attention call: ``count`` sequences in consecutive slots from ``slot``, whose new tokens are
    ``tokens`` of the packed row (one each for decoding sequences; a chunk for a single prefilling one)."""

    slot: int
    count: int
    tokens: torch.Tensor | slice
    span: int  # key positions read
    mask: torch.Tensor | None  # [count, 1, q, span] (q: new tokens per sequence); None: every key visible
    positions: torch.Tensor  # [count, q] the position of each new token in its sequence
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)  # sliding window -> its mask, built once

    def mask_for(self, window: int | None) -> torch.Tensor | None:
        """The run's mask, narrowed to a sliding window of ``window`` keys when given (one per step and size)."""
        if not window or int(self.positions.max()) < window:  # no query reaches past its window yet
            return self.mask
        if window not in self.windowed:
            keys = torch.arange(self.span)
            inside = keys[None, None, :] > self.positions[:, :, None] - window  # [count, q, span]
            causal = keys[None, None, :] <= self.positions[:, :, None]
            self.windowed[window] = (inside & causal)[:, None]
        return self.windowed[window]


@dataclass
class RaggedStep:
    """One forward's layout: sequence ``b`` is slot ``slots[b]``, has ``starts[b]`` cached tokens and
    ``lengths[b]`` new ones, packed in that order into one row of ``sum(lengths)`` tokens."""

    cache: SlotCache
    slots: list[int]
    starts: list[int]
    lengths: list[int]
    runs: list[_Run]
    token_slots: torch.Tensor  # [tokens] the slot of each packed token
    token_positions: torch.Tensor  # [tokens] its position in its sequence (also its rotary position)
    last: torch.Tensor  # [sequences] the packed index of each sequence's last new token

    @classmethod
    def build(cls, cache: SlotCache, slots: list[int], starts: list[int], lengths: list[int]) -> RaggedStep:
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        runs: list[_Run] = []
        b = 0
        while b < len(slots):
            if lengths[b] > 1:  # a prompt chunk: causal over its own new tokens, after all its cached ones
                start, n = starts[b], lengths[b]
                span = start + n
                mask = torch.arange(span)[None, :] <= start + torch.arange(n)[:, None]
                runs.append(
                    _Run(
                        slots[b],
                        1,
                        slice(offsets[b], offsets[b + 1]),
                        span,
                        mask[None, None],
                        (start + torch.arange(n))[None],
                    )
                )
                b += 1
                continue
            end = b + 1  # a run of single new tokens in consecutive slots
            while end < len(slots) and lengths[end] == 1 and slots[end] == slots[end - 1] + 1:
                end += 1
            ends = torch.tensor(starts[b:end]) + 1
            span = int(ends.max())
            mask = None
            if end - b > 1 or int(ends[0]) < span:
                mask = (torch.arange(span)[None, :] < ends[:, None])[:, None, None, :]
            runs.append(_Run(slots[b], end - b, torch.tensor(offsets[b:end]), span, mask, (ends - 1)[:, None]))
            b = end
        for run in runs:
            for slot in range(run.slot, run.slot + run.count):
                cache.prepare(slot, run.span)
        token_slots = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths))
        token_positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        return cls(cache, slots, starts, lengths, runs, token_slots, token_positions, torch.tensor(offsets[1:]) - 1)


class SlotCache:
    """Keys and values of up to ``slots`` sequences of at most ``max_len`` tokens, per decoder layer.

    The tensors are inference tensors, and every method writes them in inference mode: whichever thread
    or caller (a forward, a release between steps) touches the cache, the tensors are of one kind."""

    @torch.inference_mode()
    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.slots, self.max_len = slots, max_len
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        # Positions below ready[slot] hold finite numbers (written or zeroed). A row's attention reads up to its
        # run's longest row, and a masked key still multiplies its value by 0: never-written memory (NaN, say)
        # must be zeroed first. Each position is zeroed at most once.
        self.ready = [0] * slots

    @torch.inference_mode()
    def prepare(self, slot: int, span: int) -> None:
        """Make positions ``[0, span)`` of ``slot`` finite, so that masked keys contribute exactly nothing."""
        if self.ready[slot] >= span:
            return
        end = min(self.max_len, max(span, self.ready[slot] + 32))  # in blocks: not 60 tiny writes per token
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[slot, :, self.ready[slot] : end] = 0
        self.ready[slot] = end

    @torch.inference_mode()
    def write(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put ``keys``/``values`` ``[layers, kv_heads, n, head_dim]`` at positions ``[0, n)`` of ``slot``."""
        n = keys.shape[2]
        self.prepare(slot, n)
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.keys[layer][slot, :, :n] = k
            self.values[layer][slot, :, :n] = v

    @torch.inference_mode()
    def move(self, source: int, target: int, length: int) -> None:
        """Copy a sequence's first ``length`` cached tokens from one slot to another (compaction)."""
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[target, :, :length] = layer[source, :, :length]

    @staticmethod
    def bytes_per_token(config) -> int:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return 2 * config.num_hidden_layers * getattr(config, "num_key_value_heads", heads) * head_dim * 4


def ragged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface over the engine's slots (see the module docstring): ``query``
    ``[1, heads, tokens, dim]`` of the packed row; returns ``[1, tokens, heads, dim]``. ``sliding_window`` and
    ``softcap`` are what the model passes for this layer."""
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    # [tokens, kv_heads, group, dim]: the query heads of one kv head side by side
    queries = query[0].transpose(0, 1).reshape(tokens, kv_heads, heads // kv_heads, dim)
    out = attend(
        _STEP.get(),
        module.layer_idx,
        queries,
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        scaling,
        sliding_window,
        softcap,
    )
    return out.reshape(1, tokens, heads, dim).to(query.dtype), None


def attend(
    step: RaggedStep,
    layer: int,
    queries: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write the packed tokens' ``key``/``value`` ``[tokens, kv_heads, dim]`` into their slots of ``layer`` and
    attend: ``queries`` ``[tokens, kv_heads, group, dim]`` (the query heads of one kv head side by side), the
    result in the same layout. Used by :func:`ragged_attention` and by the lean decode step (:mod:`.lean`)."""
    keys, values = step.cache.keys[layer], step.cache.values[layer]
    _, kv_heads, group, dim = queries.shape
    keys[step.token_slots, :, step.token_positions] = key.to(keys.dtype)
    values[step.token_slots, :, step.token_positions] = value.to(values.dtype)
    queries = queries.to(keys.dtype)
    out = torch.empty_like(queries)
    for run in step.runs:
        cached_keys = keys[run.slot : run.slot + run.count, :, : run.span]
        cached_values = values[run.slot : run.slot + run.count, :, : run.span]
        mask = run.mask_for(sliding_window)
        if isinstance(run.tokens, slice):  # one prompt chunk: [1, kv_heads, group * n, dim], query-major per head
            q = queries[run.tokens].permute(1, 2, 0, 3).reshape(1, kv_heads, -1, dim)
            if group > 1 and mask is not None:
                mask = mask.repeat(1, 1, group, 1)
            attended = _attend(q, cached_keys, cached_values, mask, scaling, softcap)
            out[run.tokens] = attended.reshape(kv_heads, group, -1, dim).permute(2, 0, 1, 3)
        else:  # one new token per sequence: [count, kv_heads, group, dim]
            out[run.tokens] = _attend(queries[run.tokens], cached_keys, cached_values, mask, scaling, softcap)
    return out


def _attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of ``query`` over ``keys``/``values`` (``mask`` True where a key is seen): SDPA, or with
    ``softcap`` the soft-capped scores as transformers' eager attention computes them (softmax in float32)."""
    if softcap is None:
        return nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, values)


def register() -> None:
    """Make ``attn_implementation="hub_peft_ragged"`` known to transformers (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION, ragged_attention)
    AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)  # the step's own mask is used


class running:
    """Context manager: run ``model``'s forwards under ``step``'s layout."""

    def __init__(self, model: nn.Module, step: RaggedStep) -> None:
        self.model, self.step = model, step

    def __enter__(self) -> None:
        self.token = _STEP.set(self.step)
        self.previous = self.model.config._attn_implementation
        self.model.config._attn_implementation = ATTENTION

    def __exit__(self, *exc: object) -> None:
        self.model.config._attn_implementation = self.previous
        _STEP.reset(self.token)
