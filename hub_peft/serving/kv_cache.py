"""The engine's own KV cache: one slot per running sequence, and the attention that reads it.

Every decoder layer keeps keys and values as ``[slots, kv_heads, max_len, head_dim]`` (allocated
lazily: untouched pages cost no memory). A forward of the engine runs a ragged batch (one row per
sequence, each with its own number of new tokens and its own cached length) through transformers'
own model code with ``attn_implementation="hub_peft_ragged"``: the attention function below writes
each row's new keys/values into its slot and attends over that slot's tokens, with no per-batch
cache object and no padding of the cached part. Rows are ordered by slot, and each run of
consecutive slots is one ``scaled_dot_product_attention`` call on a view of the cache (grouped
query heads are folded into the query length, so keys are never repeated).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION = "hub_peft_ragged"
_STEP: ContextVar[RaggedStep] = ContextVar("hub_peft_ragged_step")


@dataclass
class RaggedStep:
    """One forward's layout: row ``b`` is slot ``slots[b]``, has ``starts[b]`` cached tokens and
    ``lengths[b]`` new ones (the rest of its query columns are padding)."""

    cache: SlotCache
    slots: list[int]
    starts: list[int]
    lengths: list[int]
    runs: list[tuple[int, int, int]]  # (first row, row count, key span) of each run of consecutive slots
    mask: torch.Tensor | None  # [rows, 1, q, span]: which cached/new key each query may see; None when q == 1
    span: int  # max(starts + lengths): the key positions a forward can read

    @classmethod
    def build(cls, cache: SlotCache, slots: list[int], starts: list[int], lengths: list[int]) -> RaggedStep:
        ends = [s + n for s, n in zip(starts, lengths, strict=True)]
        runs, first = [], 0
        for b in range(1, len(slots) + 1):
            if b == len(slots) or slots[b] != slots[b - 1] + 1:
                runs.append((first, b - first, max(ends[first:b])))
                first = b
        span = max(ends)
        for first, count, run_span in runs:
            for slot in slots[first : first + count]:
                cache.prepare(slot, run_span)
        width = max(lengths)
        keys = torch.arange(span)
        start = torch.tensor(starts)[:, None, None]
        last = torch.tensor(lengths)[:, None, None] - 1
        # query i of row b sees keys up to its own position (padding queries: up to the row's last token)
        visible = keys[None, None, :] <= start + torch.minimum(torch.arange(width)[None, :, None], last)
        return cls(cache, slots, starts, lengths, runs, visible[:, None], span)


class SlotCache:
    """Keys and values of up to ``slots`` sequences of at most ``max_len`` tokens, per decoder layer.

    The tensors are inference tensors, and every method writes them in inference mode: whichever thread
    or caller (a forward, a release between steps) touches the cache, the tensors are of one kind."""

    @torch.inference_mode()
    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:  # fmt: skip
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


def ragged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **_: object) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention interface over the engine's slots (see the module docstring)."""
    step = _STEP.get()
    layer = module.layer_idx
    keys, values = step.cache.keys[layer], step.cache.values[layer]
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if width == 1:
        slots, positions = torch.tensor(step.slots), torch.tensor(step.starts)
        keys[slots, :, positions] = key[:, :, 0].to(keys.dtype)
        values[slots, :, positions] = value[:, :, 0].to(values.dtype)
    else:
        for b, (slot, start, length) in enumerate(zip(step.slots, step.starts, step.lengths, strict=True)):
            keys[slot, :, start : start + length] = key[b, :, :length].to(keys.dtype)
            values[slot, :, start : start + length] = value[b, :, :length].to(values.dtype)
    # [rows, kv_heads, group * width, dim]: the query heads of one kv head side by side along the length
    folded = query.reshape(rows, kv_heads, group * width, dim).to(keys.dtype)
    out = torch.empty_like(folded)
    for first, count, span in step.runs:
        slot = step.slots[first]
        mask = None
        if step.mask is not None:
            mask = step.mask[first : first + count, :, :, :span].repeat(1, 1, group, 1)
        elif count > 1 or step.starts[first] + 1 < span:
            mask = (torch.arange(span)[None, :] <= torch.tensor(step.starts[first : first + count])[:, None])
            mask = mask[:, None, None, :]
        out[first : first + count] = nn.functional.scaled_dot_product_attention(
            folded[first : first + count], keys[slot : slot + count, :, :span], values[slot : slot + count, :, :span],
            attn_mask=mask, scale=scaling,
        )  # fmt: skip
    return out.reshape(rows, heads, width, dim).transpose(1, 2).to(query.dtype), None


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
