"""The cached ReFT trainer: exact, several times faster on a CPU than the plain loop.

The base model is frozen and the interventions only touch chosen prompt positions at chosen layers,
so for each example everything below the lowest intervened layer, and the keys/values of every
position before the first intervened one, are the same in every epoch. :class:`_CachedSteps` computes
them once (no-grad forwards of the plain model; the tokens all examples start with, such as a chat
template's system prompt, only once for all) and each step then runs only the layers from the lowest
intervened one up (above it, for a block_output edit), on the positions from the first intervened one
on, all examples packed into one sequence without padding (attention per example over its cached
prefix), with logits only where a response token is predicted.

The step's few rows are kept cheap by :mod:`hub_peft.reft._kernels` (each linear layer on the GEMM that is
faster here for its shape, an in-place chunked cross-entropy) and :mod:`hub_peft.reft._lean_layer`
(Llama-family layers as one autograd Function each). Before training, the cached path checks its logits on
one example against a plain forward; where it cannot reproduce them it raises :class:`_NotCacheable` and
:func:`hub_peft.training.reft_loop.train_reft` uses the plain loop.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..modeling import find_decoder, innermost_model, text_config
from ..reft._kernels import Gemms, OneDnnLinears, faster_gemms, is_frozen_float32_linear, linear_cross_entropy
from ..reft._lean_layer import LeanLayer
from ..reft.model import ReftModel, prompt_positions
from .optimize import Example

_CHUNK = 16  # examples per precompute forward


class _NotCacheable(Exception):
    """The cached trainer cannot reproduce the plain loop on this model or data."""


def _sliding_window(core: nn.Module) -> int | None:
    """The model's attention window, if some of its layers see only the last that many tokens."""
    config = text_config(core.config)
    window, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    return window if window and (types is None or "sliding_attention" in types) else None


def _prefix_cache_bytes(core: nn.Module, examples: list[Example], layers: int) -> int:
    """An upper bound on the keys and values the cached trainer keeps at each of ``layers`` layers:
    every prompt token's, the tokens all examples start with once per precompute chunk."""
    config = text_config(core.config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * layers * getattr(config, "num_key_value_heads", heads) * head_dim
    dtype = core.get_input_embeddings().weight.dtype
    prompts = [ex.prompt_ids for ex in examples]
    shared = _shared_prefix_length(prompts, min(map(len, prompts)))
    tokens = -(-len(prompts) // _CHUNK) * shared + sum(len(p) - shared for p in prompts)
    return tokens * per_token * (dtype.itemsize if dtype.is_floating_point else 4)


def _free_memory() -> int | None:
    """Bytes of memory available now, page cache included (None where the OS does not say)."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class _Cached:
    start: int  # first intervened position; everything before it is a cached prefix
    hidden: torch.Tensor  # [n, d]: hidden state entering the first computed layer, positions start..T-2
    shared: int  # the prefix's first positions, the same tokens in every example of its precompute chunk
    shared_keys: dict[int, torch.Tensor]  # layer -> [kv_heads, shared, head_dim]: one tensor for the chunk
    shared_values: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]  # layer -> [kv_heads, start - shared, head_dim], computed layers only
    values: dict[int, torch.Tensor]
    ids: torch.Tensor  # [n]
    targets: torch.Tensor  # [n]: the next token where the loss counts, else -100
    positions: dict[str, torch.Tensor]  # group -> [k], relative to start


class _CachedSteps:
    """Each step runs the layers from the lowest intervened one up, on the positions from the first
    intervened one on, as one packed sequence (see the module docstring)."""

    def __init__(self, model: ReftModel, examples: list[Example], batch_size: int) -> None:
        self.model = model
        self.core = innermost_model(model.base_model)
        self.decoder = find_decoder(self.core)
        self.layers = model._layers
        config = model.reft_config
        lowest = config.layers[0]
        # A block_output edit at the lowest layer leaves that layer's own computation unchanged: start above it.
        self.skip_lowest = config.components == ["block_output"] and lowest + 1 < len(self.layers)
        self.first_layer = lowest + 1 if self.skip_lowest else lowest
        self.first, self.last = config.first_last
        self.head = self.core.get_output_embeddings()
        # The fused loss needs logits that are exactly head(decoder output): checked in the precompute's forward.
        self.fused_loss: bool | None = None if is_frozen_float32_linear(self.head) and self.head.bias is None else False
        self._batch: tuple[tuple[int, ...], _Batch] | None = None
        window, longest = _sliding_window(self.core), max(len(ex.prompt_ids) + len(ex.response_ids) for ex in examples)
        if window is not None and longest >= window:
            raise _NotCacheable(f"an example has {longest} tokens and the model attends over windows of {window}")
        needed, available = (
            _prefix_cache_bytes(self.core, examples, len(self.layers) - self.first_layer),
            _free_memory(),
        )
        if available is not None and needed > available // 2:
            raise _NotCacheable(
                f"caching the prefixes' keys and values could take {needed / 2**20:,.0f} MB, "
                f"more than half of the {available / 2**20:,.0f} MB free"
            )
        self.cached: list[_Cached] = []
        try:
            with torch.no_grad():
                for i in range(0, len(examples), _CHUNK):
                    self.cached.extend(self._prepare(examples[i : i + _CHUNK]))
                if self.fused_loss is None:  # no example had a prefix to run through the whole model
                    self.fused_loss = _forward_checking_head(self, input_ids=torch.arange(1, 4)[None])[1]
        except (TypeError, ValueError, RuntimeError, AttributeError, KeyError, IndexError) as error:
            raise _NotCacheable(f"its precompute failed on this model: {type(error).__name__}: {error}") from error
        # The GEMMs for a step's rows (a batch's suffixes): oneDNN where it is faster here than the default.
        rows = max(1, sum(len(c.ids) for c in self.cached) * min(batch_size, len(examples)) // len(examples))
        self.linears = OneDnnLinears(list(self.layers[self.first_layer :]), rows)
        self.head_gemms = faster_gemms(self.head.weight, rows) if self.fused_loss else Gemms()
        # Llama-family layers run as one Function each (see _lean_layer), unless an intervention sits inside
        # them; they are used once the first batch shows that they give the model's own outputs.
        inside = {layer for layer, component in model._by_site if component in ("attention_output", "mlp_output")}
        lean = {j: LeanLayer.of(self.layers[j], self.linears.gemms) for j in range(self.first_layer, len(self.layers))}
        self.lean_layers = {j: layer for j, layer in lean.items() if layer is not None and j not in inside}
        self.lean = bool(self.lean_layers)
        self._check_against_the_plain_model(examples[0])

    def _prepare(self, examples: list[Example]) -> list[_Cached]:
        """No-grad forwards of the plain base model. The tokens every example starts with (a chat
        template's system prompt, say) run once, through every layer. Then the rest of the examples
        (right-padded; causal, so padding changes nothing) run up to the first computed layer, whose
        input is kept; and from that layer on, the rest of the prefixes (positions before the first
        intervened one), whose keys and values are kept."""
        seqs = [ex.prompt_ids + ex.response_ids for ex in examples]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        positions = [
            prompt_positions(mask[i : i + 1, : len(seq)], self.first, self.last, torch.tensor([len(ex.prompt_ids)]))
            for i, (ex, seq) in enumerate(zip(examples, seqs, strict=True))
        ]
        starts = [int(min(p.min() for p in where.values())) for where in positions]
        shared = _shared_prefix_length(seqs, min(starts))
        common = self.decoder(input_ids=ids[:1, :shared], use_cache=True).past_key_values if shared else None
        hidden = _input_of_layer(  # [examples, positions shared.., d]
            self.decoder,
            self.layers[self.first_layer],
            input_ids=ids[:, shared:],
            attention_mask=mask,
            position_ids=torch.arange(shared, ids.shape[1])[None],
            past_key_values=_repeated(common, len(seqs)),
        )
        keys, values, n_prefix = {}, {}, max(starts)
        if n_prefix > shared:
            with _start_at_layer(self.layers, self.first_layer, lambda: hidden[:, : n_prefix - shared]):
                out, same = _forward_checking_head(
                    self,
                    input_ids=ids[:, shared:n_prefix],
                    attention_mask=(torch.arange(n_prefix)[None] < torch.tensor(starts)[:, None]).long(),
                    position_ids=torch.arange(shared, n_prefix)[None],
                    past_key_values=_repeated(common, len(seqs)),
                    use_cache=True,
                )
            self.fused_loss = same if self.fused_loss is None else self.fused_loss and same
            common = out.past_key_values
        if common is not None:  # [examples or 1, kv_heads, n_prefix, head_dim] per computed layer
            computed = range(self.first_layer, len(self.layers))
            keys = {j: common.layers[j].keys.expand(len(seqs), -1, -1, -1) for j in computed}
            values = {j: common.layers[j].values.expand(len(seqs), -1, -1, -1) for j in computed}
        shared_keys = {j: k[0, :, :shared].clone() for j, k in keys.items()}  # none when no example has a prefix
        shared_values = {j: v[0, :, :shared].clone() for j, v in values.items()}
        result = []
        for i, (ex, seq, start) in enumerate(zip(examples, seqs, starts, strict=True)):
            n_prompt, end = len(ex.prompt_ids), len(seq) - 1  # the final EOS predicts nothing: never computed
            targets = torch.full((len(seq),), -100, dtype=torch.long)
            targets[n_prompt - 1 : -1] = torch.tensor(ex.response_ids)
            result.append(
                _Cached(
                    start=start,
                    hidden=hidden[i, start - shared : end - shared].clone(),
                    shared=shared,
                    shared_keys=shared_keys,
                    shared_values=shared_values,
                    keys={j: k[i, :, shared:start].clone() for j, k in keys.items()},
                    values={j: v[i, :, shared:start].clone() for j, v in values.items()},
                    ids=ids[i, start:end],
                    targets=targets[start:end],
                    positions={g: p[0] - start for g, p in positions[i].items()},
                )
            )
        return result

    def batch(self, rows: list[int]) -> _Batch:
        """The packed batch of ``rows`` (kept while the same rows come back, as every step does when one
        batch holds all examples)."""
        key = tuple(sorted(rows))  # the loss is a mean over the batch: its row order does not matter
        if self._batch is None or self._batch[0] != key:
            self._batch = key, _Batch.build([self.cached[i] for i in key])
        return self._batch[1]

    def loss(self, rows: list[int]) -> torch.Tensor:
        """The examples' suffixes packed back to back into one sequence (no padding in the matmuls);
        attention runs per example over its cached prefix and itself (see :func:`_packed_attention`)."""
        batch = self.batch(rows)
        with self._running(batch, lean=self.lean):
            if self.fused_loss:
                hidden = self.decoder(**batch.inputs).last_hidden_state[0, batch.keep]
                return linear_cross_entropy(hidden, self.head, batch.targets, gemms=self.head_gemms)
            logits = self.core(**batch.inputs, logits_to_keep=batch.keep).logits  # logits only where the loss counts
        return nn.functional.cross_entropy(logits[0].float(), batch.targets)

    @contextmanager
    def _running(self, batch: _Batch, lean: bool) -> Iterator[None]:
        """Set up one forward of the packed ``batch`` through the decoder."""
        lowest = self.model.reft_config.layers[0]
        feed = (lambda: self.model._edit(lowest, "block_output", batch.hidden)) if self.skip_lowest else None
        with ExitStack() as stack:
            stack.enter_context(_start_at_layer(self.layers, self.first_layer, feed or (lambda: batch.hidden)))
            stack.enter_context(_packed_attention_for(self.core, batch))
            stack.enter_context(self.linears.active())
            stack.enter_context(self.model.intervening(batch.positions))
            if lean:
                stack.enter_context(_lean_forwards(self.layers, self.lean_layers, batch))
            yield

    def _check_against_the_plain_model(self, example: Example) -> None:
        """The logits where ``example``'s loss counts, from this trainer (with the lean layers if there
        are any, else without) and from a plain forward of the whole example; :class:`_NotCacheable` if
        they differ. Checked on one example: the computation is the same for every batch."""
        ids, n_prompt = torch.tensor([example.prompt_ids + example.response_ids]), len(example.prompt_ids)
        batch = _Batch.build([self.cached[0]])
        training = self.model.interventions.training
        self.model.interventions.eval()  # no dropout: both forwards must make the same edits
        try:
            with torch.no_grad():
                plain = self.model(input_ids=ids, prompt_lengths=torch.tensor([n_prompt])).logits[0, n_prompt - 1 : -1]
                for lean in [True, False] if self.lean else [False]:
                    with self._running(batch, lean):
                        mine = self.core(**batch.inputs, logits_to_keep=batch.keep).logits[0]
                    if mine.shape == plain.shape and torch.allclose(mine, plain, rtol=1e-4, atol=1e-4):
                        self.lean = lean
                        return
        except (TypeError, ValueError, RuntimeError, AttributeError, KeyError, IndexError) as error:
            raise _NotCacheable(f"its forward failed on this model: {type(error).__name__}: {error}") from error
        finally:
            self.model.interventions.train(training)
        raise _NotCacheable("its logits on an example differ from the plain model's")


def _shared_prefix_length(seqs: list[list[int]], limit: int) -> int:
    """How many leading tokens all ``seqs`` have in common, at most ``limit``."""
    n = 0
    while n < limit and all(seq[n] == seqs[0][n] for seq in seqs):
        n += 1
    return n


def _repeated(cache: Any, n: int) -> Any:
    """A fresh cache holding ``cache``'s keys and values (batch 1) for each of ``n`` examples."""
    if cache is None:
        return None
    from transformers import DynamicCache

    out = DynamicCache()
    for j, layer in enumerate(cache.layers):
        out.update(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1), j)
    return out


class _Stop(Exception):
    pass


def _input_of_layer(decoder: nn.Module, layer: nn.Module, **inputs: Any) -> torch.Tensor:
    """The hidden state entering ``layer`` in a forward of ``decoder``, which is stopped there."""
    captured = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    hook = layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        decoder(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    return captured[0]


def _forward_checking_head(steps: _CachedSteps, **inputs: Any) -> tuple[Any, bool]:
    """The model's forward (last position's logits only), and whether those logits are exactly its
    output layer on the decoder's output (no scaling, soft-capping, ...): seen, not assumed."""
    outputs = []
    hook = steps.decoder.register_forward_hook(
        lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)
    )
    try:
        out = steps.core(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    mine = steps.head(outputs[0][:, -1:])
    return out, torch.allclose(mine, out.logits.to(mine.dtype), rtol=1e-4, atol=1e-4)


@dataclass
class _Batch:
    """Examples' suffixes packed into one sequence, and where each example sits in it.

    Attention runs on a small padded view: row r holds example r's queries, and its keys are its
    cached prefix (padded to the longest prefix) followed by its own suffix (padded to the longest)."""

    hidden: torch.Tensor  # [1, packed, d]
    ids: torch.Tensor  # [1, packed]
    position_ids: torch.Tensor  # [1, packed]
    keep: torch.Tensor  # [packed] bool: where a response token is predicted
    targets: torch.Tensor  # [kept]
    positions: dict[str, torch.Tensor]  # group -> [1, k] packed indices
    rows: int
    width: int  # longest suffix
    row_index: torch.Tensor  # [rows * width] -> packed position (0 where padded)
    packed_index: torch.Tensor  # [packed] -> position in the [rows * width] view
    prefix: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> keys, values [rows, kv_heads, prefix, dim]
    mask: torch.Tensor  # [rows, 1, width, prefix + width] additive
    placeholder_mask: torch.Tensor  # a 4D mask transformers passes through untouched to the attention function

    @property
    def inputs(self) -> dict[str, Any]:
        """The decoder's keyword arguments for a forward of this batch."""
        return {
            "input_ids": self.ids,
            "attention_mask": self.placeholder_mask,
            "position_ids": self.position_ids,
            "use_cache": False,
        }

    @classmethod
    def build(cls, batch: list[_Cached]) -> _Batch:
        starts, lengths = [c.start for c in batch], [len(c.ids) for c in batch]
        rows, width, n_prefix = len(batch), max(lengths), max(starts)
        targets = torch.cat([c.targets for c in batch])
        offsets = [0, *itertools.accumulate(lengths)]
        row_index = torch.zeros(rows, width, dtype=torch.long)
        allowed = torch.zeros(rows, width, n_prefix + width, dtype=torch.bool)
        for r, (s, n) in enumerate(zip(starts, lengths, strict=True)):
            row_index[r, :n] = torch.arange(offsets[r], offsets[r] + n)
            allowed[r, :n, :s] = True
            allowed[r, :n, n_prefix : n_prefix + n] = torch.ones(n, n, dtype=torch.bool).tril()
            allowed[r, n:, 0] = True  # padded queries look at something, so no row of the softmax is empty
        valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        dtype = batch[0].hidden.dtype
        prefix = {}
        for layer, own in batch[0].keys.items():  # each example's prefix, padded to the longest
            keys = own.new_zeros(rows, own.shape[0], n_prefix, own.shape[2])
            values = torch.zeros_like(keys)
            for r, c in enumerate(batch):
                keys[r, :, : c.shared], keys[r, :, c.shared : c.start] = c.shared_keys[layer], c.keys[layer]
                values[r, :, : c.shared], values[r, :, c.shared : c.start] = c.shared_values[layer], c.values[layer]
            prefix[layer] = keys, values
        return cls(
            hidden=torch.cat([c.hidden for c in batch])[None],
            ids=torch.cat([c.ids for c in batch])[None],
            position_ids=torch.cat([c.start + torch.arange(n) for c, n in zip(batch, lengths, strict=True)])[None],
            keep=targets != -100,
            targets=targets[targets != -100],
            positions={
                g: torch.cat([c.positions[g] + o for c, o in zip(batch, offsets, strict=False)])[None]
                for g in batch[0].positions
            },
            rows=rows,
            width=width,
            row_index=row_index.flatten(),
            packed_index=valid.flatten().nonzero()[:, 0],
            prefix=prefix,
            mask=torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None],
            placeholder_mask=torch.zeros(1, 1, 1, 1, dtype=dtype),
        )


_ACTIVE_BATCH: ContextVar[tuple[_Batch, Callable]] = ContextVar("hub_peft_packed_batch")
_PACKED = "hub_peft_packed"


def _packed_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Attention of a packed sequence done per example: each example's queries, and its cached prefix
    plus its own keys, in a small padded batch; the result scattered back. Exactly the attention each
    example would get alone, without paying for the (mostly masked) packed-by-packed score matrix."""
    batch, inner = _ACTIVE_BATCH.get()

    def by_row(x: torch.Tensor) -> torch.Tensor:  # [1, heads, packed, dim] -> [rows, heads, width, dim]
        heads, dim = x.shape[1], x.shape[-1]
        return x[0].index_select(1, batch.row_index).view(heads, batch.rows, batch.width, dim).transpose(0, 1)

    q, k, v = by_row(query), by_row(key), by_row(value)
    if module.layer_idx in batch.prefix:
        prefix_keys, prefix_values = batch.prefix[module.layer_idx]
        k, v = torch.cat([prefix_keys, k], 2), torch.cat([prefix_values, v], 2)
    if any(kwargs.get(name) for name in ("dropout", "softcap", "sliding_window", "s_aux")):
        out, _ = inner(module, q, k, v, batch.mask, **kwargs)  # the model's own attention, for its extras
    else:
        out = _grouped_attention(q, k, v, batch.mask, kwargs.get("scaling") or module.scaling)
    return out.reshape(-1, *out.shape[2:]).index_select(0, batch.packed_index)[None], None


def _grouped_attention(q, k, v, mask, scaling: float) -> torch.Tensor:
    """Eager attention (softmax in float32) for grouped-query heads without repeating the keys and
    values per head group: each key/value head's query heads are stacked along the query axis.
    q [rows, heads, n, dim], k/v [rows, kv_heads, keys, dim], mask [rows, 1, n, keys] -> [rows, n, heads, dim]."""
    rows, heads, n, dim = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    scores = torch.matmul(q.reshape(rows, kv_heads, -1, dim), k.transpose(2, 3)) * scaling
    scores = scores.view(rows, kv_heads, heads // kv_heads, n, n_keys) + mask[:, None]
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype).view(rows, kv_heads, -1, n_keys)
    return torch.matmul(probs, v).view(rows, heads, n, dim).transpose(1, 2)


@contextmanager
def _packed_attention_for(core: nn.Module, batch: _Batch) -> Iterator[None]:
    from transformers import AttentionInterface

    config = core.config
    previous = config._attn_implementation
    attention = next((m for m in core.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")), None)
    if attention is None:
        raise _NotCacheable(f"{type(core).__name__} has no attention module that runs through transformers' interface")
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    inner = AttentionInterface().get_interface(previous, eager) if previous != "eager" else eager
    if inner is None:
        raise _NotCacheable(f"no attention function found for {previous!r} in {type(core).__name__}")
    AttentionInterface.register(_PACKED, _packed_attention)
    token = _ACTIVE_BATCH.set((batch, inner))
    config._attn_implementation = _PACKED
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE_BATCH.reset(token)


@contextmanager
def _lean_forwards(layers: nn.ModuleList, lean: dict[int, LeanLayer], batch: _Batch) -> Iterator[None]:
    """Run ``layers[j]`` as ``lean[j]`` for one forward. Only the layer's ``forward`` is replaced, so the
    hooks on the layer itself (the interventions on its input and output) still run."""

    def forward_of(layer: LeanLayer) -> Callable:
        def forward(hidden_states: torch.Tensor, *args: Any, position_embeddings: Any, **kwargs: Any) -> torch.Tensor:
            cos, sin = position_embeddings
            return layer.forward(hidden_states[0], cos[0], sin[0], batch)[None]

        return forward

    for j, layer in lean.items():
        layers[j].forward = forward_of(layer)
    try:
        yield
    finally:
        for j in lean:
            del layers[j].forward


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
