"""Many adapters over one base model, a different adapter (or a weighted mix) per row, batched continuously.

The base is wrapped once: every linear layer inside the decoder blocks (``nn.Linear`` and its subclasses,
bitsandbytes' 4-bit and 8-bit layers included, and GPT-2's ``Conv1D``) gets a :class:`_RowDeltas` (it adds each
row group's LoRA/IA3 delta with small batched matmuls over that group's rows); the components ReFT adapters
intervene on get hooks when the first such adapter is added (they edit each row's prompt positions during its
prefill), so a base whose blocks lack a component still serves everything else. Nothing runs
per row in Python and no adapter runs on rows that are not its own. A mix ``{"a": 0.7, "b": 0.3}`` adds
``0.7·Δa + 0.3·Δb`` exactly (for LoRA ``Σ wᵢ·sᵢ·Bᵢ Aᵢ x``, never averaged A and B matrices).

Sequences (:class:`Generation`) run on the engine's own KV cache (:mod:`.kv_cache`): :meth:`forward_ragged`
is one forward over admitted sequences, each feeding its own number of new tokens; the
:class:`~.scheduler.Scheduler` decides which, step by step. A base whose attention cannot run there (ALiBi
biases, attention outside transformers' attention interface: ``ragged_reason`` says which) keeps the same
steps, streaming and adapters, but each sequence runs its own forward on a transformers ``DynamicCache``.
Adapters come from :class:`~.cache.AdapterCache` (names, resolved commits, LRU). Adapters that cannot share
a forward run through ``generate`` instead (:meth:`generate_static`).
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._bnb import keep_4bit_trainable
from .._onednn import PackedLinear, packable, packed_is_faster
from ..errors import IncompatibleAdapterError, InvalidInputError
from ..modeling import component_module, find_decoder, find_decoder_layers, innermost_model, text_config
from ..reft.model import edit_positions, input_edit_hook, output_edit_hook, prompt_positions
from . import kv_cache, solo
from .cache import AdapterCache, _Entry, _Ia3, _Lora, _Reft
from .sampling import Sampled, SamplingParams, sample_row

AdapterSpec = str | dict[str, float] | None
Prompt = str | Sequence[dict[str, str]]  # a prompt, or chat messages [{"role": ..., "content": ...}]
MAX_MIX_ADAPTERS = 8  # adapters in one weighted mix
MAX_MIX_WEIGHT = 16.0  # |weight| of one adapter in a mix: beyond it a mix only produces garbage (or inf/NaN)


class PromptTooLongError(InvalidInputError):
    """A prompt has more tokens than the server accepts."""


def check_prompt_length(tokens: int, limit: int | None) -> None:
    if limit is not None and tokens > limit:
        raise PromptTooLongError(f"The prompt is {tokens} tokens; the limit is {limit}.")


def _returns_a_tensor(module: nn.Module) -> bool:
    """Whether a linear layer's forward returns its output tensor: a subclass may override it (Llama 4's and
    PhiMoE's MoE routers return a tuple); such a layer is left unwrapped, and a LoRA on it runs solo through
    PEFT. Subclasses that override ``forward`` are tried once per class on one zero row."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    plain = (nn.Linear.forward, Conv1D.forward, bnb.nn.Linear4bit.forward, bnb.nn.Linear8bitLt.forward)
    if type(module).forward in plain:
        return True
    return _class_returns_a_tensor(type(module), module)


_TRIED: dict[type, bool] = {}


def _class_returns_a_tensor(cls: type, module: nn.Module) -> bool:
    if cls not in _TRIED:
        try:
            with torch.no_grad():
                _TRIED[cls] = isinstance(
                    module(torch.zeros(1, module.in_features, dtype=module.weight.dtype)), torch.Tensor
                )
        except Exception:
            _TRIED[cls] = False
    return _TRIED[cls]


def _is_linear(module: nn.Module) -> bool:
    """A layer LoRA/IA3 can adapt: ``nn.Linear`` or a subclass (FalconLinear, bitsandbytes' Linear4bit and
    Linear8bitLt), or transformers' ``Conv1D`` (GPT-2: ``x @ W + b`` with W stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


@dataclass
class _Group:
    rows: torch.Tensor  # indices (ascending) of the batch rows, or packed tokens, that share one adapter spec
    span: tuple[int, int] | None = None  # packed: the group is the one prompt chunk at tokens [start, end)
    loras: list[tuple[_Lora, float]] = field(default_factory=list)
    ia3s: list[tuple[_Ia3, float]] = field(default_factory=list)
    refts: list[tuple[_Reft, float, dict[str, torch.Tensor]]] = field(default_factory=list)  # + positions


@dataclass
class Completion:
    tokens: list[int]  # generated ids, EOS included when the model stopped
    prompt_tokens: int
    finish_reason: str  # stop | length
    logprobs: list[Sampled] | None = None  # per generated token, when asked for


@dataclass(eq=False)
class Generation:
    """One completion running on the engine's KV cache (see :meth:`MultiAdapterModel.forward_ragged`)."""

    prompt_ids: list[int]
    spec: tuple[tuple[str, float], ...]  # ((adapter, weight), ...); () is the bare base
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    samples: list[Sampled] = field(default_factory=list)
    slot: int = -1  # -1: holds no slot
    cached: int = 0  # tokens whose keys/values are in the slot
    past: Any = None  # a per-sequence transformers cache, on bases that cannot use the slots (see ragged_reason)
    past_tokens: int = 0  # tokens ``past`` may hold: more than ``cached`` after a failed or retried step
    parts: tuple = ()  # ((payload, weight), ...) for spec, held even if the cache evicts them meanwhile

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt_ids)

    @property
    def capacity(self) -> int:
        """Cache positions this sequence can need: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.params.max_tokens


class _SampleProcessor:
    """A ``generate`` logits processor that picks each row's token with :func:`sample_row` (the same maths as
    the KV-cache path) and leaves only that token possible, so greedy decoding takes it."""

    def __init__(self, params: list[SamplingParams], prompt_ids: list[list[int]], eos: int | None):
        self.params, self.prompt_ids, self.eos = params, prompt_ids, eos
        self.samples: list[list[Sampled]] = [[] for _ in params]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))
        for row, p in enumerate(self.params):
            mine = self.samples[row]
            done = mine and (len(mine) >= p.max_tokens or (mine[-1].token == self.eos and not p.ignore_eos))
            if done:  # finished rows keep decoding until the batch ends; their tokens are cut off later
                out[row, scores[row].argmax()] = 0
                continue
            output = [s.token for s in self.samples[row]]
            sampled = sample_row(
                scores[row], p, len(output), self.prompt_ids[row], output, eos=self.eos, suppress_eos=p.ignore_eos
            )
            self.samples[row].append(sampled)
            out[row, sampled.token] = 0
        return out


@dataclass
class _LoraPack:
    """One linear layer's LoRA work for a whole batch as two batched matmuls: one slot per (row group,
    adapter of the group) pair, so a slot computes ``wᵢ·sᵢ·Bᵢ Aᵢ x`` for its group's rows and a mix's slots
    add up to ``Σ wᵢ·sᵢ·Bᵢ Aᵢ x`` exactly (never averaged A and B); ranks are zero-padded."""

    rows: torch.Tensor  # [slots * m] batch row of each slot position (padding repeats a row, masked out)
    keep: torch.Tensor | None  # [slots * m] which positions are real rows; None when no slot is padded
    weights: torch.Tensor | None  # [slots, 1, 1] mix weight of each slot; None when all are 1
    A: torch.Tensor  # [slots, in, r]
    B: torch.Tensor  # [slots, r, out], the adapter's scale folded in


def _pack_loras(plan: _Plan, name: str) -> _LoraPack | None:
    members = [
        (g, lora.weights[name], w)
        for g, group in enumerate(plan.groups)
        if group.span is None
        for lora, w in group.loras
        if name in lora.weights
    ]
    if not members:
        return None
    if name not in plan.stacks:  # the same adapters in the same order as a recent plan: its stacks serve
        rank = max(At.shape[1] for _, (At, _), _ in members)
        if all(At.shape[1] == rank for _, (At, _), _ in members):
            A = torch.stack([At for _, (At, _), _ in members])
            B = torch.stack([Bt for _, (_, Bt), _ in members])
        else:
            A = torch.stack([nn.functional.pad(At, (0, rank - At.shape[1])) for _, (At, _), _ in members])
            B = torch.stack([nn.functional.pad(Bt, (0, 0, 0, rank - Bt.shape[0])) for _, (_, Bt), _ in members])
        plan.stacks[name] = (A, B)
    A, B = plan.stacks[name]
    layout = tuple((g, w) for g, _, w in members)
    if layout not in plan.layouts:  # the same for most layers: built once per plan
        width = max(len(plan.groups[g].rows) for g, _ in layout)
        index = torch.stack(
            [
                torch.cat([plan.groups[g].rows, plan.groups[g].rows[:1].expand(width - len(plan.groups[g].rows))])
                for g, _ in layout
            ]
        )
        keep = torch.arange(width)[None, :] < torch.tensor([len(plan.groups[g].rows) for g, _ in layout])[:, None]
        weights = torch.tensor([w for _, w in layout])[:, None, None]
        plan.layouts[layout] = (
            index.reshape(-1),
            None if keep.all() else keep.reshape(-1),
            None if bool((weights == 1).all()) else weights,
        )
    rows, keep, weights = plan.layouts[layout]
    return _LoraPack(rows, keep, weights, A, B)


class _Stacks:
    """Stacked LoRA A/B per layer for the last few sequences of LoRA payloads a plan used. When a row
    leaves or joins, the next decode plan usually holds the same adapters in the same order, and its
    layers reuse these stacks instead of stacking again (stacking was about 4% of a saturated decode step).
    An entry holds its payloads, so their ids are never reused while it lives; at most ``size`` kept."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[int, ...], tuple[tuple[_Lora, ...], dict]] = OrderedDict()

    def get(self, loras: tuple[_Lora, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        key = tuple(map(id, loras))
        entry = self.entries.pop(key, None) or (loras, {})
        self.entries[key] = entry
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return entry[1]

    def clear(self) -> None:
        self.entries.clear()


@dataclass
class _Plan:
    groups: list[_Group]
    forwards_seen: int = 0
    packs: dict[str, _LoraPack | None] = field(default_factory=dict)
    layouts: dict[tuple, tuple] = field(default_factory=dict)
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (A, B)
    packed: bool = False  # rows are packed tokens of one row (forward_ragged), not batch rows (generate)

    @functools.cached_property
    def touched(self) -> frozenset[str]:
        """The layers some LoRA or IA3 of this plan changes (the others run as they are)."""
        names = {n for g in self.groups for lora, _ in g.loras for n in lora.weights}
        return frozenset(names | {n for g in self.groups for ia3, _ in g.ia3s for n in ia3.scales})

    @functools.cached_property
    def own_work(self) -> list[_Group]:
        """The groups a layer handles one by one (IA3, a prompt chunk's LoRA); the rest are in the LoRA packs."""
        return [g for g in self.groups if g.ia3s or (g.span is not None and g.loras)]

    def lora_pack(self, name: str) -> _LoraPack | None:
        if name not in self.packs:  # built at the first forward, reused by every later one with this plan
            self.packs[name] = _pack_loras(self, name)
        return self.packs[name]


class _RowDeltas(nn.Module):
    """A linear layer of the base plus the weight-space deltas of each row group of the current batch.

    For rows ``x`` of one group and its adapters ``i`` with weights ``wᵢ``: LoRA adds
    ``Σ wᵢ·sᵢ·Bᵢ(Aᵢ x)``; IA3 adds ``(Σ wᵢ(lᵢ − 1)) ⊙ W x`` (output scaling) or
    ``W(x ⊙ Σ wᵢ(lᵢ − 1))`` (feed-forward input scaling). Each term is the adapter's exact change of this
    layer's output, so a mix is the weighted sum of the adapters' deltas.
    """

    def __init__(self, engine: MultiAdapterModel, name: str, base_layer: nn.Module) -> None:
        super().__init__()
        self.engine, self.name, self.base_layer = engine, name, base_layer

    def __getattr__(self, name: str) -> Any:
        """The wrapped layer's attributes (``weight``, ``in_features``...), for model code that reads them, as
        PEFT's layers do."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        plan = self.engine._plan
        if plan is None or self.name not in plan.touched:  # no adapter of this step changes this layer
            return out
        if not isinstance(out, torch.Tensor):
            raise IncompatibleAdapterError(
                f"{self.name} returns {type(out).__name__}, not a tensor: the engine adds "
                "LoRA/IA3 deltas to plain linear outputs only."
            )
        # rows of the plan's groups: packed tokens ([1, tokens, in] seen as [tokens, 1, in]) or batch rows
        shape = (-1, 1) if plan.packed else (x.shape[0], -1)
        xs, outs = x.reshape(*shape, x.shape[-1]), out.view(*shape, out.shape[-1])  # a view: writing outs writes out
        pack = plan.lora_pack(self.name)
        if pack is not None:
            slots, fan_in = pack.A.shape[:2]
            rows = xs.index_select(0, pack.rows)  # [slots * m, T, in]
            hidden = torch.bmm(rows.reshape(slots, -1, fan_in).float(), pack.A)
            delta = torch.bmm(hidden, pack.B)
            if pack.weights is not None:
                delta = delta * pack.weights
            delta = delta.reshape(rows.shape[0], *outs.shape[1:])
            if pack.keep is None:
                outs.index_add_(0, pack.rows, delta.to(out.dtype))
            else:
                outs.index_add_(0, pack.rows[pack.keep], delta[pack.keep].to(out.dtype))
        for group in plan.own_work:
            if group.span is not None and group.loras:  # a prompt chunk: plain matmuls on its contiguous tokens
                start, end = group.span
                chunk = xs[start:end, 0].float()
                for lora, w in group.loras:
                    if self.name in lora.weights:
                        A, B = lora.weights[self.name]
                        delta = (chunk @ A) @ B
                        outs[start:end, 0] += (delta if w == 1 else w * delta).to(out.dtype)
            scales = [(ia3.scales[self.name], w) for ia3, w in group.ia3s if self.name in ia3.scales]
            if not scales:
                continue
            rows = xs[group.rows]
            delta = torch.zeros(outs[group.rows].shape, dtype=torch.float32)
            for feed_forward in (False, True):
                parts = [w * s for (s, ff), w in scales if ff == feed_forward]
                if not parts:
                    continue
                s = torch.stack(parts).sum(0)
                if feed_forward:
                    bias = getattr(self.base_layer, "bias", None)
                    scaled = self.base_layer((rows * s.to(rows.dtype)).to(rows.dtype))
                    delta += (scaled if bias is None else scaled - bias).float()
                else:
                    delta += outs[group.rows].float() * s
            outs[group.rows] += delta.to(out.dtype)
        return out


class MultiAdapterModel:
    """One base model serving many LoRA/ReFT adapters, mixed per row.

    ``base`` is ``(model, tokenizer)``; by default the embedded SmolLM2-135M-Instruct in NF4 4-bit.
    ``memory_budget`` bounds the bytes of loaded adapter weights (pinned ones always stay).
    ``packed_head``: the LM head's products in the engine's steps run on a copy of its weight reordered for
    oneDNN (:class:`~hub_peft._onednn.PackedLinear`: 1.5-3.2x faster at 1-64 rows on an AVX2 EPYC; 113 MB
    for SmolLM2's head); ``None`` (the default) does so where that was timed faster on this CPU, timed at the
    first step, on the thread that runs the steps (see :meth:`~.scheduler.Scheduler.serve_forever`).
    """

    def __init__(
        self,
        base: tuple[Any, Any] | None = None,
        *,
        load_in_4bit: bool = True,
        memory_budget: int = 256 * 2**20,
        max_running: int = 32,
        max_model_len: int | None = None,
        packed_head: bool | None = None,
    ) -> None:
        from ..base_model import load_base_model
        from ..tasks import require_causal_lm

        self.model, self.tokenizer = base or load_base_model(None, load_in_4bit=load_in_4bit)
        require_causal_lm(self.model)  # a classifier or seq2seq base: say so, not fail in the wrapping
        self.core = innermost_model(self.model)
        keep_4bit_trainable(self.core)  # exact float32 dequantize-and-matmul, never bitsandbytes' bf16 CPU kernel
        config = text_config(self.core.config)
        self.max_running = max_running
        self.max_model_len = max_model_len or min(getattr(config, "max_position_embeddings", 2048) or 2048, 4096)
        self._kv: kv_cache.SlotCache | None = None
        self._slots: list[Generation] = []  # slot i holds _slots[i]; kept compact (no holes)
        self._decode_plan: tuple[tuple, _Plan] | None = None
        self._stacks = _Stacks()
        self.ragged_reason: str | None = _ragged_blocker(self.core)  # why the ragged engine cannot run, if so
        self._plan: _Plan | None = None
        self._lock = threading.RLock()
        self._layers = find_decoder_layers(self.core)
        self._wrapped: list[tuple[nn.Module, str, _RowDeltas]] = []
        module_names = [name for name, _ in self.model.named_modules()]  # what PEFT sees (before the wrapping)
        self._wrap_linears()
        self._packed_head = packed_head
        self._reft_sites: set[tuple[int, str]] = set()  # (layer, component) pairs with an edit hook
        self.cache = AdapterCache(
            memory_budget=memory_budget,
            targets={w.name for _, _, w in self._wrapped},
            base_config=self.core.config,
            base_name=_base_name(self.core),
            prepare=self._prepare_adapter,
            module_names=module_names,
            attach=self._attach_solo,
        )
        find_decoder(self.core).register_forward_pre_hook(self._count_forward)

    @property
    def batching(self) -> str:
        """``"continuous"`` (one packed forward per step on the slot cache) or ``"per-sequence"`` (each
        sequence its own forward on transformers' cache, same steps; see ``ragged_reason``)."""
        return "continuous" if self.ragged_reason is None else "per-sequence"

    # --- wrapping --------------------------------------------------------------------------------

    def _wrap_linears(self) -> None:
        prefix = next(n for n, m in self.core.named_modules() if m is self._layers)
        for name, module in list(self.core.named_modules()):
            if not name.startswith(prefix + ".") or not _is_linear(module) or not _returns_a_tensor(module):
                continue
            parent, _, child = name.rpartition(".")
            wrapper = _RowDeltas(self, name, module)
            setattr(self.core.get_submodule(parent), child, wrapper)
            self._wrapped.append((self.core.get_submodule(parent), child, wrapper))

    def _attach_solo(self, folder: Path, config: Any) -> tuple[nn.Module, int]:
        """A solo adapter attached by PEFT to a shadow of the base (see :mod:`.solo`) and the bytes it adds:
        called by the cache when the adapter is loaded, never by a step."""
        swap = {id(wrapper): wrapper.base_layer for _, _, wrapper in self._wrapped}
        model = solo.attach(self.model, folder, config, swap=swap, snapshot=lambda: self._lock)
        return model, solo.own_bytes(model, self.model)

    def _prepare_adapter(self, config: dict) -> None:
        """Before an adapter is added: hook the components its ReFT interventions edit (once per component;
        a component this base's blocks lack refuses the adapter with the reason)."""
        if config.get("peft_type") != "REFT":
            return
        from ..reft.config import ReftConfig

        sites = {(layer, component) for layer, component, _ in ReftConfig.from_dict(dict(config)).sites()}
        with self._lock:  # never while a forward runs: hooks are added between steps
            modules = {site: component_module(self._layers[site[0]], site[1]) for site in sites - self._reft_sites}
            for (layer, component), module in sorted(modules.items()):
                if component == "block_input":
                    module.register_forward_pre_hook(input_edit_hook(self._reft_edit, layer), with_kwargs=True)
                else:
                    module.register_forward_hook(output_edit_hook(self._reft_edit, layer, component))
                self._reft_sites.add((layer, component))

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        if self._plan is not None:
            self._plan.forwards_seen += 1

    def _reft_edit(self, layer: int, component: str, hidden: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if plan is None or plan.forwards_seen != 1:  # ReFT edits prompt positions in the prefill only
            return hidden
        for group in plan.groups:
            if not group.refts:
                continue
            rows = hidden if plan.packed else hidden[group.rows]  # packed: positions index the one row
            total = torch.zeros_like(rows)
            touched = False
            for reft, weight, positions in group.refts:
                edited = rows
                for grp, intervention in reft.sites.get((layer, component), []):
                    present = {g: positions[g] for g in grp if g in positions}  # a prefill chunk may hold one group
                    if present:
                        edited = edit_positions(edited, present, grp, intervention)
                        touched = True
                total = total + weight * (edited - rows)
            if touched:
                if plan.packed:
                    hidden = rows + total
                else:
                    hidden = hidden.clone()
                    hidden[group.rows] = rows + total
        return hidden

    # --- the adapter cache (see cache.py) -----------------------------------------------------------

    def add(
        self,
        name: str,
        source: str | Path,
        revision: str | None = None,
        *,
        subfolder: str | None = None,
        pin: bool = False,
        hub_only: bool = False,
    ) -> dict:
        """Load an adapter (folder or repo id; the one in its ``subfolder`` if given) under ``name`` without
        touching the base or the others; a Hub repo is resolved to one commit first (see :class:`AdapterCache`).
        ``hub_only``: ``source`` is read as a Hub repo id, never as a local folder (a name from a stranger)."""
        return self.cache.add(name, source, revision, subfolder=subfolder, pin=pin, hub_only=hub_only)

    def remove(self, name: str) -> None:
        self.cache.remove(name)
        with self._lock:  # stacks and a kept decode plan hold payloads: let a removed adapter's memory go
            self._stacks.clear()
            self._decode_plan = None

    def pin(self, name: str, pinned: bool = True) -> None:
        self.cache.pin(name, pinned)

    def info(self, name: str) -> dict:
        return self.cache.info(name)

    def loaded(self) -> list[dict]:
        return self.cache.loaded()

    def resident_bytes(self) -> int:
        return self.cache.resident_bytes()

    @property
    def stats(self) -> dict[str, int]:
        return self.cache.stats

    @property
    def memory_budget(self) -> int:
        return self.cache.memory_budget

    @memory_budget.setter
    def memory_budget(self, value: int) -> None:
        self.cache.memory_budget = value

    @property
    def _entries(self) -> dict[str, _Entry]:
        return self.cache.entries

    def _get(self, name: str) -> _Entry:
        return self.cache.get(name)

    def _materialize(self, entry: _Entry) -> None:
        self.cache.materialize(entry)

    def _evict(self, keep: set[str] = frozenset()) -> None:
        self.cache.evict(keep)

    # --- inference -------------------------------------------------------------------------------

    @contextmanager
    def _planned(self, specs: list[tuple[tuple[str, float], ...]], attention_mask: torch.Tensor) -> Iterator[None]:
        groups, start = [], 0
        while start < len(specs):
            end = start
            while end < len(specs) and specs[end] == specs[start]:
                end += 1
            group = _Group(torch.arange(start, end))
            for name, weight in specs[start]:
                payload = self._entries[name].payload
                if isinstance(payload, _Lora):
                    group.loras.append((payload, weight))
                elif isinstance(payload, _Ia3):
                    group.ia3s.append((payload, weight))
                else:
                    first, last = payload.config.first_last
                    group.refts.append((payload, weight, prompt_positions(attention_mask[start:end], first, last)))
            groups.append(group)
            start = end
        self._plan = _Plan(groups)
        try:
            yield
        finally:
            self._plan = None

    def _normalize(self, adapters: Sequence[AdapterSpec] | None, n: int) -> list[tuple[tuple[str, float], ...]]:
        adapters = list(adapters) if adapters is not None else [None] * n
        if len(adapters) != n:
            raise InvalidInputError(f"{n} prompts but {len(adapters)} adapter entries; give one per prompt.")
        out = []
        for spec in adapters:
            if spec is None or spec == "":
                out.append(())
            elif isinstance(spec, str):
                self._get(spec)
                out.append(((spec, 1.0),))
            elif isinstance(spec, dict) and spec:
                if len(spec) > MAX_MIX_ADAPTERS:
                    raise InvalidInputError(f"A mix takes at most {MAX_MIX_ADAPTERS} adapters, got {len(spec)}.")
                for name, weight in spec.items():
                    self._get(name)
                    if (
                        isinstance(weight, bool)
                        or not isinstance(weight, (int, float))
                        or not abs(weight) <= MAX_MIX_WEIGHT
                    ):
                        raise InvalidInputError(
                            f"Mix weight for {name!r} must be a finite number between "
                            f"-{MAX_MIX_WEIGHT} and {MAX_MIX_WEIGHT}, got {weight!r}."
                        )
                out.append(tuple(sorted((k, float(v)) for k, v in spec.items())))
            else:
                raise InvalidInputError(f"An adapter entry is a name, a {{name: weight}} mix or None, got {spec!r}.")
        return out

    def _encode(self, prompts: Sequence[Prompt], specs, raw: Sequence[bool]) -> list[list[int]]:
        """Token ids per row: the adapter's recorded training template (single turn), else the chat template."""
        from ..chat import PLACEHOLDER, encode_prompt, prompt_template

        chat = prompt_template(self.tokenizer)
        encoded = []
        for prompt, spec, is_raw in zip(prompts, specs, raw, strict=True):
            recorded = {self._entries[n].template for n, _ in spec} - {None}
            template = PLACEHOLDER if is_raw else recorded.pop() if len(recorded) == 1 else chat
            if isinstance(prompt, str):
                encoded.append(encode_prompt(self.tokenizer, prompt, template))
            elif template == chat and chat != PLACEHOLDER:  # a whole conversation in the tokenizer's chat format
                text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
                encoded.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            else:  # an adapter trained on single prompts answers the last user turn in its own format
                encoded.append(encode_prompt(self.tokenizer, _last_user_turn(prompt), template))
        return encoded

    def _batch(self, prompts: Sequence[Prompt], adapters, raw: bool | Sequence[bool]):
        if isinstance(prompts, str):
            raise InvalidInputError("prompts must be a list (of strings or chat message lists), not one string.")
        for prompt in prompts:
            if not isinstance(prompt, str):
                check_messages(prompt)
        specs = self._normalize(adapters, len(prompts))
        raw = [raw] * len(prompts) if isinstance(raw, bool) else list(raw)
        needed = {n for spec in specs for n, _ in spec}
        for name in needed:
            self._materialize(self._entries[name])
        self._evict(keep=needed)
        order = sorted(range(len(prompts)), key=lambda i: specs[i])
        encoded = self._encode([prompts[i] for i in order], [specs[i] for i in order], [raw[i] for i in order])
        width = max(map(len, encoded))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(encoded):  # left padding, as decoding needs
            ids[i, width - len(seq) :], mask[i, width - len(seq) :] = torch.tensor(seq), 1
        return order, [specs[i] for i in order], ids, mask

    def generate_tokens(
        self,
        prompts: Sequence[Prompt],
        adapters: Sequence[AdapterSpec] | None = None,
        *,
        max_new_tokens: int | Sequence[int] = 64,
        raw: bool | Sequence[bool] = False,
        on_token: Callable[[int, int], None] | None = None,
        ignore_eos: bool = False,
        params: Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Completions as token ids, one per prompt (in the prompts' order); greedy unless ``params``.

        Rows run with continuous batching on the engine's KV cache (adapters that cannot share a forward, or
        a base that cannot run there, take the ``generate`` path). A row's tokens do not depend on what it is
        batched with: greedy rows by construction, sampled ones because their noise is keyed by their own
        seed and position. ``max_new_tokens`` may differ per row; ``on_token(row, token_id)`` streams them;
        ``ignore_eos`` generates exactly ``max_new_tokens`` per row (for benchmarks). ``params`` (one
        :class:`SamplingParams` per row) overrides ``max_new_tokens`` and ``ignore_eos``.
        """
        from .scheduler import Request, Scheduler

        if isinstance(prompts, str):
            raise InvalidInputError("prompts must be a list (of strings or chat message lists), not one string.")
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts) or any(not isinstance(n, int) or n < 1 for n in limits):
            raise InvalidInputError("max_new_tokens must be >= 1, one value or one per prompt.")
        if params is None:
            params = [SamplingParams(max_tokens=n, ignore_eos=ignore_eos) for n in limits]
        elif len(params) != len(prompts):
            raise InvalidInputError(f"{len(prompts)} prompts but {len(params)} sampling parameters.")
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        raws = [raw] * len(prompts) if isinstance(raw, bool) else list(raw)
        self._normalize(adapters, len(prompts))  # clear errors before anything runs
        scheduler = Scheduler(self, max_waiting=len(prompts) + 1)

        def update(request: Request, samples: list[Sampled], _: str) -> None:
            if on_token is not None:
                for sampled in samples:
                    on_token(request.row, sampled.token)

        requests = []
        for row, (prompt, adapter, p, is_raw) in enumerate(zip(prompts, adapters, params, raws, strict=True)):
            request = Request(prompt, adapter, p, raw=is_raw, row=row, on_update=update)
            scheduler.submit(request)
            requests.append(request)
        scheduler.run_until_done()
        for request in requests:
            if request.error is not None:
                raise request.error
        return [r.completion() for r in requests]

    @torch.inference_mode()
    def generate_static(
        self,
        prompts: Sequence[Prompt],
        adapters: Sequence[AdapterSpec] | None,
        params: Sequence[SamplingParams],
        *,
        raw: bool | Sequence[bool] = False,
    ) -> list[Completion]:
        """Whole completions with transformers' ``generate`` on one padded batch per sub-batch (the path for
        adapters that cannot share a forward); sampling goes through :func:`sample_row` as on the KV cache."""
        with self._lock:
            parts = self._parts(prompts, adapters)
            if len(parts) > 1:  # adapters that cannot share a batch run in sub-batches of their own
                out: list[Completion | None] = [None] * len(prompts)
                for rows in parts:
                    part = self.generate_static(
                        [prompts[i] for i in rows],
                        _pick(adapters, rows),
                        [params[i] for i in rows],
                        raw=_pick(raw, rows),
                    )
                    for i, completion in zip(rows, part, strict=True):
                        out[i] = completion
                return out
            order, specs, ids, mask = self._batch(prompts, adapters, raw)
            ordered = [params[i] for i in order]
            prompt_ids = [ids[i][mask[i].bool()].tolist() for i in range(len(order))]
            eos = self.tokenizer.eos_token_id
            processor = _SampleProcessor(ordered, prompt_ids, eos)
            longest = max(p.max_tokens for p in ordered)
            with self._runner(specs, mask) as (model, extra):
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=longest,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    logits_processor=[processor],
                    pad_token_id=self.tokenizer.pad_token_id,
                    **extra,
                )
        out = [None] * len(prompts)
        for position, original in enumerate(order):
            samples, p = processor.samples[position], ordered[position]
            tokens = [s.token for s in samples]
            if eos in tokens and not p.ignore_eos:
                tokens, samples = tokens[: tokens.index(eos) + 1], samples[: tokens.index(eos) + 1]
            tokens, samples = tokens[: p.max_tokens], samples[: p.max_tokens]
            finish = "stop" if tokens and tokens[-1] == eos and not p.ignore_eos else "length"
            out[original] = Completion(
                tokens, len(prompt_ids[position]), finish, samples if p.logprobs is not None else None
            )
        return out

    def generate(
        self,
        prompts: Sequence[Prompt],
        adapters: Sequence[AdapterSpec] | None = None,
        *,
        max_new_tokens: int = 64,
        raw: bool = False,
    ) -> list[str]:
        """Greedy answers, one per prompt; ``adapters[i]`` is a name, a ``{name: weight}`` mix, or None."""
        completions = self.generate_tokens(prompts, adapters, max_new_tokens=max_new_tokens, raw=raw)
        return [self.tokenizer.decode(c.tokens, skip_special_tokens=True).strip() for c in completions]

    @torch.inference_mode()
    def next_token_logits(
        self, prompts: Sequence[Prompt], adapters: Sequence[AdapterSpec] | None = None, *, raw: bool = False
    ) -> torch.Tensor:
        """Logits of the token after each prompt, ``[len(prompts), vocab]`` in the prompts' order."""
        with self._lock:
            parts = self._parts(prompts, adapters)
            if len(parts) > 1:
                pieces = [
                    self.next_token_logits([prompts[i] for i in rows], _pick(adapters, rows), raw=_pick(raw, rows))
                    for rows in parts
                ]
                result = torch.empty(len(prompts), pieces[0].shape[-1], dtype=pieces[0].dtype)
                for rows, piece in zip(parts, pieces, strict=True):
                    result[torch.tensor(rows)] = piece
                return result
            solo = any(self.solo_names(spec) for spec in self._normalize(adapters, len(prompts)))
            if not solo and len(self._slots) + len(prompts) <= self.max_running:
                return self._prefill_logits(prompts, adapters, raw)
            order, specs, ids, mask = self._batch(prompts, adapters, raw)
            with self._runner(specs, mask) as (model, extra):
                logits = model(input_ids=ids, attention_mask=mask, **extra).logits[:, -1]
        result = torch.empty_like(logits)
        result[torch.tensor(order)] = logits
        return result

    def _prefill_logits(
        self, prompts: Sequence[Prompt], adapters: Sequence[AdapterSpec] | None, raw: bool | Sequence[bool]
    ) -> torch.Tensor:
        """next_token_logits on the engine's KV cache: the prompts' prefill, as the server runs it."""
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        raws = [raw] * len(prompts) if isinstance(raw, bool) else list(raw)
        gens = [
            self.generation(p, a, SamplingParams(max_tokens=1), raw=r)
            for p, a, r in zip(prompts, adapters, raws, strict=True)
        ]
        for gen in gens:
            self.admit(gen)
        logits: dict[int, torch.Tensor] = {}
        try:
            while any(g.prefilling for g in gens):
                rows = [(g, self.next_chunk(g, 4096)) for g in sorted(gens, key=lambda g: g.slot) if g.prefilling]
                for (gen, _), row in zip(rows, self.forward_ragged(rows), strict=True):
                    if not gen.prefilling:
                        logits[id(gen)] = row
        finally:
            for gen in gens:
                self.release(gen)
        return torch.stack([logits[id(g)] for g in gens])

    # --- the ragged engine: sequences on the engine's own KV cache -----------------------------------

    def generation(
        self,
        prompt: Prompt,
        adapter: AdapterSpec = None,
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        max_prompt_tokens: int | None = None,
    ) -> Generation:
        """A new, not yet admitted :class:`Generation` for one prompt (validated, tokenized, adapters loaded);
        :class:`PromptTooLongError` for a prompt over ``max_prompt_tokens`` (checked before the context length)."""
        params = params or SamplingParams()
        if not isinstance(prompt, str):
            check_messages(prompt)
        spec = self._normalize([adapter], 1)[0]
        solo = self.solo_names(spec)
        if solo:
            raise InvalidInputError(f"{self._entries[solo[0]].solo_reason}; it runs through generate_tokens only.")
        prompt_ids = self._encode([prompt], [spec], [raw])[0]
        check_prompt_length(len(prompt_ids), max_prompt_tokens)
        parts = self.cache.hold(spec)  # the cache's own lock: never waits for a forward of the model
        seq = Generation(prompt_ids, spec, params, parts=parts)
        if seq.capacity > self.max_model_len:
            raise InvalidInputError(
                f"The prompt ({len(seq.prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceed this engine's max_model_len of {self.max_model_len} tokens."
            )
        return seq

    def admit(self, seq: Generation) -> bool:
        """Give ``seq`` a cache slot; False when all ``max_running`` slots are taken."""
        with self._lock:
            if len(self._slots) >= self.max_running:
                return False
            if self._kv is None and self.ragged_reason is None:
                config = text_config(self.core.config)
                heads = config.num_attention_heads
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
                dtype = self.core.get_input_embeddings().weight.dtype
                self._kv = kv_cache.SlotCache(
                    len(self._layers),
                    self.max_running,
                    self.max_model_len,
                    getattr(config, "num_key_value_heads", heads),
                    head_dim,
                    torch.float32 if not dtype.is_floating_point else dtype,
                )
                kv_cache.register()
                self.ragged_reason = self._check_slot_cache()
                if self.ragged_reason is not None:
                    self._kv = None
            seq.slot, seq.cached = len(self._slots), 0
            self._slots.append(seq)
            return True

    @torch.inference_mode()
    def _check_slot_cache(self) -> str | None:
        """Whether the slot cache reproduces this model's own attention, checked once before the first sequence
        is admitted (so on the thread that runs the steps): two random sequences of 7 and 3 tokens in one packed
        prefill step, then one decode step, against the model's own forward over each whole sequence. The
        static checks of :func:`_ragged_blocker` cannot see everything an attention module may do (attention
        sinks, a KV layout of its own...); a difference beyond float noise sends the base to per-sequence
        mode, with the reason. Returns that reason, or None."""
        vocab = self.core.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(0)
        probes = [
            Generation(torch.randint(vocab, (n,), generator=generator).tolist(), (), SamplingParams(max_tokens=2))
            for n in (7, 3)
        ]
        for probe in probes:
            probe.slot, probe.cached = len(self._slots), 0
            self._slots.append(probe)
        try:
            worst = 0.0
            for step in range(2):
                rows = [(probe, len(probe.tokens) - probe.cached) for probe in probes]
                got = self.forward_ragged(rows)
                for probe, row in zip(probes, got, strict=True):
                    expected = self.core(input_ids=torch.tensor([probe.tokens])).logits[0, -1]
                    gap = (row.float() - expected.float()).abs().max() / (1 + expected.float().abs().max())
                    worst = max(worst, gap.item())
                    if worst > (1e-4 if row.dtype == torch.float32 else 3e-2):
                        return (
                            f"the slot cache's attention does not reproduce {type(self.core).__name__}'s own "
                            f"(logits differ by {worst:.1e} of their size at step {step + 1} of a check)"
                        )
                    probe.output.append(int(row.argmax()))
            return None
        except Exception as e:  # whatever the model's attention needs that the slot cache lacks
            return f"the slot cache's attention fails on {type(self.core).__name__} ({type(e).__name__}: {e})"[:300]
        finally:
            del self._slots[-len(probes) :]

    def release(self, seq: Generation) -> None:
        """Free ``seq``'s slot; the last slot's sequence moves into it, so slots stay compact."""
        with self._lock:
            if seq.slot < 0:
                return
            seq.past, seq.past_tokens = None, 0
            last = self._slots.pop()
            if last is not seq:
                if self._kv is not None:
                    self._kv.move(last.slot, seq.slot, last.cached)
                last.slot = seq.slot
                self._slots[seq.slot] = last
            seq.slot = -1

    def running(self) -> list[Generation]:
        return list(self._slots)

    @staticmethod
    def next_chunk(seq: Generation, budget: int) -> int:
        """How many prompt tokens ``seq`` feeds next with ``budget`` tokens (>= 128) to spend. A long prompt
        is cut so that its first 64 tokens are in the first chunk and its last 64 in the last one: a ReFT
        position group (at most 64 first or last tokens) is then never split across two forwards."""
        remaining = len(seq.prompt_ids) - seq.cached
        if remaining <= budget:
            return remaining
        return max(1, min(budget, remaining - 64))

    @torch.inference_mode()
    def forward_ragged(self, rows: list[tuple[Generation, int]]) -> torch.Tensor:
        """One forward over admitted sequences, each feeding its next ``n`` tokens (a prompt chunk, or the
        last sampled token), with every row's own adapters; the logits after each row's last new token
        ``[rows, vocab]``. Rows must be in slot order. The new tokens are packed into one row without
        padding (see :mod:`.kv_cache`): prefill chunks and decode tokens share the forward, and each weight
        matrix is read once for all of them."""
        slots = [seq.slot for seq, _ in rows]
        if any(b <= a for a, b in itertools.pairwise(slots)) or slots[0] < 0:
            raise InvalidInputError("forward_ragged needs admitted sequences in slot order.")
        new: list[int] = []
        for b, (seq, n) in enumerate(rows):
            feed = seq.tokens[seq.cached : seq.cached + n]
            if len(feed) != n or n < 1:
                raise InvalidInputError(f"row {b} has {len(feed)} tokens to feed, not {n}.")
            new += feed
        if self.ragged_reason is not None:
            return self._forward_each(rows)
        step = kv_cache.RaggedStep.build(self._kv, slots, [seq.cached for seq, _ in rows], [n for _, n in rows])
        ids = torch.tensor([new])
        with self._lock, kv_cache.running(self.core, step), self._packed_head_in():
            self._plan = self._ragged_plan(rows)
            try:
                logits = self.core(
                    input_ids=ids, position_ids=step.token_positions[None], use_cache=False, logits_to_keep=step.last
                ).logits
            finally:
                self._plan = None
        for seq, n in rows:
            seq.cached += n
        return logits[0]

    def _forward_each(self, rows: list[tuple[Generation, int]]) -> torch.Tensor:
        """:meth:`forward_ragged` on a base that cannot use the slot cache: each sequence feeds its new tokens
        through the model's own attention and cache (the cache the model makes at its first forward, as in
        ``generate`` for one prompt), with its adapters as in a packed step of one sequence. Streamed like any
        step, exact. When a sequence is fed again from an earlier point (the scheduler retries a failed step
        row by row), its cache is cropped back first; a cache that cannot be cropped (state-space layers)
        fails that sequence, with the reason."""
        out = []
        with self._lock:
            for seq, n in rows:
                if seq.past not in (None, _NO_CACHE) and seq.past_tokens > seq.cached:
                    seq.past = _rolled_back(seq.past, seq.cached)
                    seq.past_tokens = seq.cached
                if seq.past is _NO_CACHE:  # a model without a KV cache (GPT-1): the whole sequence again
                    seq.cached, n = 0, seq.cached + n
                ids = torch.tensor([seq.tokens[seq.cached : seq.cached + n]])
                cache = {} if seq.past in (None, _NO_CACHE) else {_cache_argument(type(self.core)): seq.past}
                self._plan = self._ragged_plan([(seq, n)], reuse=False)
                try:
                    result = self.core(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
                except Exception:
                    seq.past_tokens = seq.cached + n  # some layers may hold the new tokens already
                    raise
                finally:
                    self._plan = None
                seq.past = getattr(result, "cache", None) or getattr(result, "past_key_values", None) or _NO_CACHE
                seq.cached += n
                seq.past_tokens = seq.cached
                out.append(result.logits[0, -1])
        return torch.stack(out)

    @functools.cached_property
    def _head(self) -> PackedLinear | None:
        return _packed_head(self.core, self._packed_head)

    @contextmanager
    def _packed_head_in(self) -> Iterator[None]:
        """The LM head swapped for its packed twin for one forward (the base itself stays a plain model)."""
        head = self._head
        if head is None or self.core.lm_head is not head.linear:
            yield
            return
        self.core.lm_head = head
        try:
            yield
        finally:
            self.core.lm_head = head.linear

    def _ragged_plan(self, rows: list[tuple[Generation, int]], *, reuse: bool = True) -> _Plan:
        """Groups of packed tokens with one adapter spec: the decoding rows of each spec together, each prompt
        chunk on its own (a contiguous span; its ReFT positions in this chunk, as packed indices)."""
        decoding = reuse and all(not seq.prefilling for seq, _ in rows)
        signature = tuple(tuple((id(p), w) for p, w in seq.parts) for seq, _ in rows)
        if decoding and self._decode_plan is not None and self._decode_plan[0] == signature:
            plan = self._decode_plan[1]  # the same rows and adapters as the last decode step: reuse its LoRA packs
            plan.forwards_seen = 1
            return plan
        members: dict[tuple, list[int]] = {}
        offsets = [0]
        for b, (seq, n) in enumerate(rows):
            offsets.append(offsets[-1] + n)
            key = (tuple((id(p), w) for p, w in seq.parts), b if seq.prefilling else -1)
            members.setdefault(key, []).append(b)
        groups = []
        for _, entries in sorted(members.items(), key=lambda item: item[0]):  # stable order: stacks reused
            tokens = torch.cat([torch.arange(offsets[b], offsets[b + 1]) for b in entries])
            seq, n = rows[entries[0]]
            group = _Group(tokens, span=(offsets[entries[0]], offsets[entries[0]] + n) if seq.prefilling else None)
            for payload, weight in seq.parts:
                if isinstance(payload, _Lora):
                    group.loras.append((payload, weight))
                elif isinstance(payload, _Ia3):
                    group.ia3s.append((payload, weight))
                else:
                    chunks = [_chunk_positions(rows[b][0], rows[b][1], payload.config.first_last) for b in entries]
                    if chunks[0]:  # prompt chunks only: decode tokens are never edited
                        positions = {
                            g: torch.tensor(
                                [[offsets[b] + p for b, c in zip(entries, chunks, strict=True) for p in c[g]]]
                            )
                            for g in chunks[0]
                        }
                        group.refts.append((payload, weight, positions))
            groups.append(group)
        batched = tuple(lora for g in groups if g.span is None for lora, _ in g.loras)  # what _pack_loras stacks
        plan = _Plan(groups, stacks=self._stacks.get(batched), packed=True)
        plan.forwards_seen = 0  # the forward's pre-hook makes it 1: the ReFT edits of this chunk apply
        if decoding:
            self._decode_plan = (signature, plan)
        return plan

    def sample(self, seq: Generation, logits: torch.Tensor) -> Sampled:
        """Draw ``seq``'s next token from its logits row and append it."""
        eos = self.tokenizer.eos_token_id
        sampled = sample_row(
            logits, seq.params, len(seq.output), seq.prompt_ids, seq.output, eos=eos, suppress_eos=seq.params.ignore_eos
        )
        seq.output.append(sampled.token)
        seq.samples.append(sampled)
        return sampled

    def solo_names(self, spec: tuple[tuple[str, float], ...]) -> list[str]:
        """The adapters of a normalized spec that cannot share a forward (they run through ``generate``)."""
        return [name for name, _ in spec if self._entries[name].kind == "solo"]

    def _parts(self, prompts: Sequence[Prompt], adapters: Sequence[AdapterSpec] | None) -> list[list[int]]:
        """Row indices per sub-batch: every row that can share a batch, then one part per solo adapter."""
        shared: list[int] = []
        solo: dict[str, list[int]] = {}
        for i, spec in enumerate(self._normalize(adapters, len(prompts))):
            names = self.solo_names(spec)
            if names and (len(spec) > 1 or spec[0][1] != 1.0):
                raise InvalidInputError(
                    f"{self._entries[names[0]].solo_reason}, so it cannot be part of a weighted mix."
                )
            (solo.setdefault(names[0], []) if names else shared).append(i)
        return ([shared] if shared else []) + list(solo.values())

    @contextmanager
    def _runner(
        self, specs: list[tuple[tuple[str, float], ...]], mask: torch.Tensor
    ) -> Iterator[tuple[nn.Module, dict]]:
        """The model to run one (already partitioned) batch on, and the extra inputs it needs."""
        solo = {n for spec in specs for n in self.solo_names(spec)}
        if solo:
            entry = self._entries[solo.pop()]
            extra = {}
            if entry.peft_type == "multitask_prompt_tuning":  # its prompts per task: the engine serves task 0
                extra["task_ids"] = torch.zeros(mask.shape[0], dtype=torch.long)
            # built when it was loaded; a queued request reserved it (Scheduler.submit), so this is a hit
            yield self.cache.materialize(entry).model, extra
        else:
            with self._planned(specs, mask):
                yield self.model, {}


def _packed_head(core: nn.Module, wanted: bool | None) -> PackedLinear | None:
    """The packed twin of ``core``'s LM head (see :class:`MultiAdapterModel`), or None: not wanted, not a
    float32 ``nn.Linear`` on the CPU, or (``wanted`` None) not faster here at 1, 8 and 64 rows."""
    head = getattr(core, "lm_head", None)
    if wanted is False or not packable(head) or (wanted is None and not packed_is_faster(head, (1, 8, 64))):
        return None
    return PackedLinear(head)


def _ragged_blocker(core: nn.Module) -> str | None:
    """Why this base cannot run on the engine's slot cache (its sequences then run one by one, see
    :meth:`MultiAdapterModel._forward_each`), or None. The slot cache replaces transformers' attention
    function and mask, so each block's attention module must dispatch through the attention interface and
    number itself (``layer_idx``), and no position information may ride on the mask (ALiBi)."""
    config = text_config(core.config)
    if getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False):
        return "it adds ALiBi position biases to the attention mask"
    for i, layer in enumerate(find_decoder_layers(core)):
        attention = [m for m in layer.modules() if "Attention" in type(m).__name__ and hasattr(m, "layer_idx")]
        if len(attention) != 1 or attention[0].layer_idx != i:
            return f"its decoder blocks ({type(layer).__name__}) do not hold one numbered attention module each"
        if not _uses_attention_interface(type(attention[0])):
            return f"{type(attention[0]).__name__} does not dispatch through transformers' attention interface"
    return None


_NO_CACHE = object()  # the model returned no KV cache: each step feeds the whole sequence


def _rolled_back(past: Any, length: int) -> Any:
    """``past`` cropped to its first ``length`` tokens, layer by layer (a failed forward may have written the new
    tokens into its first layers only); ``crop(-k)`` removes a layer's last ``k`` tokens."""
    try:
        for layer in getattr(past, "layers", None) or [past]:
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)
    except Exception as e:
        raise RuntimeError(
            f"this request's cache cannot be rolled back after a failed step ({e}); send the request again."
        ) from None  # a server-side failure of this request alone (HTTP 500)
    return past


@functools.cache
def _cache_argument(cls: type) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers 5.25+), else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


@functools.cache
def _uses_attention_interface(cls: type) -> bool:
    import inspect

    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _pick(values: Any, rows: list[int]) -> Any:
    """``values`` (None, a scalar for every row, or a per-row list) restricted to ``rows``."""
    return values if values is None or isinstance(values, (bool, int)) else [values[i] for i in rows]


def check_messages(messages: Any) -> None:
    roles = ("system", "user", "assistant")
    ok = (
        isinstance(messages, (list, tuple))
        and messages
        and all(isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in messages)
    )
    if not ok or not any(m["role"] == "user" for m in messages):
        raise InvalidInputError(
            "A chat prompt is a non-empty list of {'role': 'system'|'user'|'assistant', 'content': str} messages "
            "with at least one user message."
        )


def _last_user_turn(messages: Sequence[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def _base_name(core: nn.Module) -> str:
    source = getattr(core, "hub_peft_source", None)
    return getattr(source, "hub_id", None) or getattr(core.config, "_name_or_path", None) or "the base model"


def _chunk_positions(seq: Generation, n: int, first_last: tuple[int, int]) -> dict[str, list[int]]:
    """The ReFT position groups (``"f"``/``"l"``) that fall in ``seq``'s next ``n`` tokens, relative to them
    (the same positions :func:`prompt_positions` gives for the whole prompt)."""
    start, length = seq.cached, len(seq.prompt_ids)
    if start >= length:
        return {}
    first, last = first_last
    wanted = {"f": [min(o, length - 1) for o in range(first)], "l": [max(length - last + o, 0) for o in range(last)]}
    out = {}
    for group, where in wanted.items():
        inside = [start <= p < start + n for p in where]
        if where and all(inside):
            out[group] = [p - start for p in where]
        elif any(inside):
            raise InvalidInputError(f"a prompt chunk splits ReFT position group {group!r}; see next_chunk.")
    return out
