"""The engine's per-row adapter maths: a plan of row groups per forward, and the linear-layer wrapper that
adds each group's LoRA/IA3 deltas.

A :class:`Plan` says, for one forward, which rows (or packed tokens) share which adapters. Each wrapped linear
layer (:class:`RowDeltas`) reads the current plan from the :class:`PlanSlot` the engine gives it (never the
engine itself) and adds the deltas of its own layer; with no plan it is the plain layer.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._fused import Fused, KernelLoras
from ..errors import IncompatibleAdapterError
from .cache import Ia3Payload, LoraPayload, ReftPayload


@dataclass
class PlanSlot:
    """The plan of the forward under way (None between forwards), shared by the engine and its wrappers."""

    current: Plan | None = None


def returns_a_tensor(module: nn.Module) -> bool:
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


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA/IA3 can adapt: ``nn.Linear`` or a subclass (FalconLinear, bitsandbytes' Linear4bit and
    Linear8bitLt), or transformers' ``Conv1D`` (GPT-2: ``x @ W + b`` with W stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


@dataclass
class Group:
    rows: torch.Tensor  # indices (ascending) of the batch rows, or packed tokens, that share one adapter spec
    span: tuple[int, int] | None = None  # packed: the group is the one prompt chunk at tokens [start, end)
    loras: list[tuple[LoraPayload, float]] = field(default_factory=list)
    ia3s: list[tuple[Ia3Payload, float]] = field(default_factory=list)
    refts: list[tuple[ReftPayload, float, dict[str, torch.Tensor]]] = field(default_factory=list)  # + positions


@dataclass
class LoraPack:
    """One linear layer's LoRA work for a whole batch as two batched matmuls: one slot per (row group,
    adapter of the group) pair, so a slot computes ``wᵢ·sᵢ·Bᵢ Aᵢ x`` for its group's rows and a mix's slots
    add up to ``Σ wᵢ·sᵢ·Bᵢ Aᵢ x`` exactly (never averaged A and B); ranks are zero-padded."""

    rows: torch.Tensor  # [slots * m] batch row of each slot position (padding repeats a row, masked out)
    keep: torch.Tensor | None  # [slots * m] which positions are real rows; None when no slot is padded
    weights: torch.Tensor | None  # [slots, 1, 1] mix weight of each slot; None when all are 1
    A: torch.Tensor  # [slots, in, r]
    B: torch.Tensor  # [slots, r, out], the adapter's scale folded in
    kernel: dict[int, KernelLoras | None] = field(default_factory=dict)  # rows -> the kernel's (_kernel_loras)


def pack_loras(plan: Plan, name: str) -> LoraPack | None:
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
    return LoraPack(rows, keep, weights, A, B)


class LoraStacks:
    """Stacked LoRA A/B per layer for the last few sequences of LoRA payloads a plan used. When a row
    leaves or joins, the next decode plan usually holds the same adapters in the same order, and its
    layers reuse these stacks instead of stacking again (stacking is a visible share of a saturated decode step).
    An entry holds its payloads, so their ids are never reused while it lives; at most ``size`` kept."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.entries: OrderedDict[tuple[int, ...], tuple[tuple[LoraPayload, ...], dict]] = OrderedDict()

    def get(self, loras: tuple[LoraPayload, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        key = tuple(map(id, loras))
        entry = self.entries.pop(key, None) or (loras, {})
        self.entries[key] = entry
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return entry[1]

    def clear(self) -> None:
        self.entries.clear()


@dataclass
class Plan:
    groups: list[Group]
    forwards_seen: int = 0
    packs: dict[str, LoraPack | None] = field(default_factory=dict)
    layouts: dict[tuple, tuple] = field(default_factory=dict)
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (A, B)
    packed: bool = False  # rows are packed tokens of one row (forward_ragged), not batch rows (generate)

    @functools.cached_property
    def touched(self) -> frozenset[str]:
        """The layers some LoRA or IA3 of this plan changes (the others run as they are)."""
        names = {n for g in self.groups for lora, _ in g.loras for n in lora.weights}
        return frozenset(names | {n for g in self.groups for ia3, _ in g.ia3s for n in ia3.scales})

    @functools.cached_property
    def own_work(self) -> list[Group]:
        """The groups a layer handles one by one (IA3, DoRA's rescaling, a prompt chunk's LoRA); the rest are in
        the LoRA packs."""
        return [
            g for g in self.groups if g.ia3s or (g.span is not None and g.loras) or any(lo.dora for lo, _ in g.loras)
        ]

    @functools.cached_property
    def dora_layers(self) -> frozenset[str]:
        """The layers some DoRA of this plan rescales: their LoRA products run after the base's, never inside it."""
        return frozenset(n for g in self.groups for lora, _ in g.loras for n in lora.dora)

    def lora_pack(self, name: str) -> LoraPack | None:
        if name not in self.packs:  # built at the first forward, reused by every later one with this plan
            self.packs[name] = pack_loras(self, name)
        return self.packs[name]


class RowDeltas(nn.Module):
    """A linear layer of the base plus the weight-space deltas of each row group of the current batch.

    For rows ``x`` of one group and its adapters ``i`` with weights ``wᵢ``: LoRA adds
    ``Σ wᵢ·sᵢ·Bᵢ(Aᵢ x)``; IA3 adds ``(Σ wᵢ(lᵢ − 1)) ⊙ (W x + b)`` (output scaling) or
    ``W(x ⊙ Σ wᵢ(lᵢ − 1))`` (feed-forward input scaling); DoRA adds ``wᵢ·((gᵢ − 1) ⊙ W x + gᵢ ⊙ sᵢ·Bᵢ(Aᵢ x))``
    with ``gᵢ = mᵢ / ‖W + sᵢ·Bᵢ Aᵢ‖`` (its LoRA product, ``gᵢ`` folded into ``Bᵢ``, plus a rescaling of the base
    output). Each term is the adapter's exact change of this layer's output, computed from the base output alone,
    so a mix is the weighted sum of the adapters' deltas.
    """

    def __init__(self, plans: PlanSlot, name: str, base_layer: nn.Module, fused: Fused | None = None) -> None:
        super().__init__()
        self.plans, self.name, self.base_layer = plans, name, base_layer
        self.fused = fused  # the base layer's product for few rows without gradient (see hub_peft._fused)

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
        plan = self.plans.current
        touched = plan is not None and self.name in plan.touched
        pack = plan.lora_pack(self.name) if plan is not None and touched else None
        fused = self.fused
        if fused is not None and fused.takes(x):
            tokens = x.numel() // x.shape[-1]
            rows = tokens if plan is not None and plan.packed else x.shape[0]
            rescaled = plan is not None and self.name in plan.dora_layers  # DoRA needs the base output alone
            inside = _kernel_loras(pack, rows, tokens) if pack is not None and not rescaled else None
            out = fused(x, inside)
            if inside is not None:
                pack = None  # its delta is in out already
        elif fused is not None and fused.takes_many(x):
            out = fused.many(x)
        else:
            out = self.base_layer(x, *args, **kwargs)
        if not touched:  # no adapter of this step changes this layer
            return out
        assert plan is not None  # touched
        if not isinstance(out, torch.Tensor):
            raise IncompatibleAdapterError(
                f"{self.name} returns {type(out).__name__}, not a tensor: the engine adds "
                "LoRA/IA3 deltas to plain linear outputs only."
            )
        # rows of the plan's groups: packed tokens ([1, tokens, in] seen as [tokens, 1, in]) or batch rows
        shape = (-1, 1) if plan.packed else (x.shape[0], -1)
        xs, outs = x.reshape(*shape, x.shape[-1]), out.view(*shape, out.shape[-1])  # a view: writing outs writes out
        rescaling = self._rescaling(plan, outs)  # from the base output, before any LoRA product is added to it
        if pack is not None:
            slots, fan_in = pack.A.shape[:2]
            # NOTE(perf): one slot over every row (a single chat, or all requests on one adapter) needs no gather
            # and no scatter, which cost more than the LoRA maths itself on a one-row step
            whole = slots == 1 and pack.keep is None and len(pack.rows) == len(xs)
            rows = xs if whole else xs.index_select(0, pack.rows)  # [slots * m, T, in]
            hidden = torch.bmm(rows.reshape(slots, -1, fan_in).float(), pack.A)
            delta = torch.bmm(hidden, pack.B)
            if pack.weights is not None:
                delta = delta * pack.weights
            delta = delta.reshape(rows.shape[0], *outs.shape[1:])
            if whole:
                outs += delta.to(out.dtype)
            elif pack.keep is None:
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
            parts = _ia3_scales(group, self.name, feed_forward=True)
            if parts:  # feed-forward IA3: the layer again on the rescaled input
                rows, s = xs[group.rows], torch.stack(parts).sum(0)
                bias = getattr(self.base_layer, "bias", None)
                scaled = self.base_layer((rows * s.to(rows.dtype)).to(rows.dtype))
                outs[group.rows] += (scaled if bias is None else scaled - bias).to(out.dtype)
        for rows, delta in rescaling:
            outs[rows] += delta.to(out.dtype)
        return out

    def _rescaling(self, plan: Plan, outs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each group's change of this layer that scales its base output: IA3's ``(Σ wᵢ(lᵢ − 1)) ⊙ (W x + b)``
        and DoRA's ``(Σ wᵢ(gᵢ − 1)) ⊙ W x``, as ``(rows, delta)`` to add once the LoRA products are in."""
        out = []
        bias = getattr(self.base_layer, "bias", None)
        for group in plan.own_work:
            ia3 = _ia3_scales(group, self.name, feed_forward=False)
            dora = [w * lora.dora[self.name] for lora, w in group.loras if self.name in lora.dora]
            if not ia3 and not dora:
                continue
            base = outs[group.rows].float()
            delta = base * torch.stack(ia3).sum(0) if ia3 else torch.zeros_like(base)
            if dora:
                delta += (base if bias is None else base - bias.float()) * torch.stack(dora).sum(0)
            out.append((group.rows, delta))
        return out

    def kernel_loras(self, rows: int) -> tuple[bool, KernelLoras | None]:
        """The current plan's change of this layer on ``rows`` packed tokens as LoRAs inside the fused kernel
        (a whole decode step in one call, :mod:`.lean`): ``(True, None)`` when no adapter changes this layer,
        ``(True, loras)``, or ``(False, None)`` when the change needs this layer's own forward (IA3, a prompt
        chunk, LoRAs in another dtype)."""
        plan = self.plans.current
        if plan is None or self.name not in plan.touched:
            return True, None
        pack = plan.lora_pack(self.name)
        loras = None if plan.own_work or pack is None else _kernel_loras(pack, rows, rows)
        return loras is not None, loras


def _ia3_scales(group: Group, name: str, *, feed_forward: bool) -> list[torch.Tensor]:
    """``wᵢ(lᵢ − 1)`` of the group's IA3 adapters on layer ``name`` that scale its input (feed-forward) or output."""
    return [w * ia3.scales[name][0] for ia3, w in group.ia3s if ia3.scales.get(name, (None, None))[1] is feed_forward]


def _kernel_loras(pack: LoraPack, rows: int, tokens: int) -> KernelLoras | None:
    """``pack`` as LoRA slots for the fused kernel (built once per pack and row count: a decode plan serves many
    steps), or None where the batched path must add it: LoRAs in another dtype, or several slots over batch rows
    of more than one token each. One slot over every row needs no row map (a single chat, one adapter for all)."""
    if rows not in pack.kernel:
        slots, width = pack.A.shape[0], len(pack.rows) // pack.A.shape[0]
        whole = slots == 1 and pack.keep is None and len(pack.rows) == rows
        loras = None
        if KernelLoras.takes(pack.A, pack.B) and (whole or tokens == rows):
            Bt = pack.B.transpose(1, 2).contiguous()
            weights = torch.ones(slots) if pack.weights is None else pack.weights.reshape(-1).float().contiguous()
            first = slot = None
            if not whole:  # each row's slots, in row order (a mix: several slots on one row)
                members, owner = pack.rows, torch.arange(slots).repeat_interleave(width)
                if pack.keep is not None:
                    members, owner = members[pack.keep], owner[pack.keep]
                order = torch.argsort(members, stable=True)
                slot = owner[order].contiguous()
                first = torch.cat(
                    [torch.zeros(1, dtype=torch.int64), torch.bincount(members, minlength=rows).cumsum(0)]
                )
            loras = KernelLoras(pack.A.contiguous(), Bt, weights, first, slot)
        pack.kernel[rows] = loras
    return pack.kernel[rows]
