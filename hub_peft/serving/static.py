"""The path for adapters that cannot share a forward (DoRA, LoHa, prefix tuning...; :mod:`.solo`): whole
completions with transformers' ``generate`` on one padded batch per sub-batch, each solo adapter's rows in a
sub-batch of their own on the model PEFT built for it at load. Sampling goes through :func:`.sampling.sample_row`,
as on the engine's KV cache, so a row's tokens are the same on either path.

:class:`StaticGeneration` is a mixin of :class:`.engine.Engine` (as transformers' ``GenerationMixin`` is of its
models): it uses the engine's tokenizer, cache, lock and plan slot.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InvalidInputError
from ..modeling import GREEDY_GENERATE
from ..reft.model import prompt_positions
from .cache import AdapterCache, Ia3Payload, LoraPayload, ReftPayload, SoloPayload
from .request import AdapterSpec, Completion, Prompt, Spec, check_messages
from .row_deltas import Group, Plan, PlanSlot
from .sampling import Sampled, SamplingParams, sample_row


class StaticGeneration:
    """``generate_static`` and the padded-batch helpers it shares with ``next_token_logits``."""

    # what the engine this is mixed into provides
    model: nn.Module
    tokenizer: Any
    cache: AdapterCache
    plans: PlanSlot
    _lock: threading.RLock

    if TYPE_CHECKING:

        def normalize(self, adapters: Sequence[AdapterSpec | Spec] | None, n: int) -> list[Spec]: ...

        def encode(self, prompts: Sequence[Prompt], specs: Sequence[Spec], raw: Sequence[bool]) -> list[list[int]]: ...

        def solo_names(self, spec: Spec) -> list[str]: ...

    @contextmanager
    def _planned(self, specs: list[Spec], attention_mask: torch.Tensor) -> Iterator[None]:
        groups, start = [], 0
        while start < len(specs):
            end = start
            while end < len(specs) and specs[end] == specs[start]:
                end += 1
            group = Group(torch.arange(start, end))
            for name, weight in specs[start]:
                payload = self.cache.entries[name].payload
                if isinstance(payload, LoraPayload):
                    group.loras.append((payload, weight))
                elif isinstance(payload, Ia3Payload):
                    group.ia3s.append((payload, weight))
                else:
                    assert isinstance(payload, ReftPayload), name  # materialized by _batch; solo rows never plan
                    first, last = payload.config.first_last
                    group.refts.append((payload, weight, prompt_positions(attention_mask[start:end], first, last)))
            groups.append(group)
            start = end
        self.plans.current = Plan(groups)
        try:
            yield
        finally:
            self.plans.current = None

    def _batch(self, prompts: Sequence[Prompt], adapters, raw: bool | Sequence[bool]):
        if isinstance(prompts, str):
            raise InvalidInputError("prompts must be a list (of strings or chat message lists), not one string.")
        for prompt in prompts:
            if not isinstance(prompt, str):
                check_messages(prompt)
        specs = self.normalize(adapters, len(prompts))
        raw = [raw] * len(prompts) if isinstance(raw, bool) else list(raw)
        needed = {n for spec in specs for n, _ in spec}
        for name in needed:
            self.cache.materialize(self.cache.entries[name])
        self.cache.evict(keep=needed)
        order = sorted(range(len(prompts)), key=lambda i: specs[i])
        encoded = self.encode([prompts[i] for i in order], [specs[i] for i in order], [raw[i] for i in order])
        width = max(map(len, encoded))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(encoded):  # left padding, as decoding needs
            ids[i, width - len(seq) :], mask[i, width - len(seq) :] = torch.tensor(seq), 1
        return order, [specs[i] for i in order], ids, mask

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
                done: dict[int, Completion] = {}
                for rows in parts:
                    part = self.generate_static(
                        [prompts[i] for i in rows],
                        _pick(adapters, rows),
                        [params[i] for i in rows],
                        raw=_pick(raw, rows),
                    )
                    done.update(zip(rows, part, strict=True))
                return [done[i] for i in range(len(prompts))]
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
                    logits_processor=[processor],
                    pad_token_id=self.tokenizer.pad_token_id,
                    **GREEDY_GENERATE,
                    **extra,
                )
        out: dict[int, Completion] = {}
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
        return [out[i] for i in range(len(prompts))]

    def _parts(self, prompts: Sequence[Prompt], adapters: Sequence[AdapterSpec] | None) -> list[list[int]]:
        """Row indices per sub-batch: every row that can share a batch, then one part per solo adapter."""
        shared: list[int] = []
        solo: dict[str, list[int]] = {}
        for i, spec in enumerate(self.normalize(adapters, len(prompts))):
            names = self.solo_names(spec)
            if names and (len(spec) > 1 or spec[0][1] != 1.0):
                raise InvalidInputError(
                    f"{self.cache.entries[names[0]].solo_reason}, so it cannot be part of a weighted mix."
                )
            (solo.setdefault(names[0], []) if names else shared).append(i)
        return ([shared] if shared else []) + list(solo.values())

    @contextmanager
    def _runner(self, specs: list[Spec], mask: torch.Tensor) -> Iterator[tuple[nn.Module, dict]]:
        """The model to run one (already partitioned) batch on, and the extra inputs it needs."""
        solo = {n for spec in specs for n in self.solo_names(spec)}
        if solo:
            entry = self.cache.entries[solo.pop()]
            extra = {}
            if entry.peft_type == "multitask_prompt_tuning":  # its prompts per task: the engine serves task 0
                extra["task_ids"] = torch.zeros(mask.shape[0], dtype=torch.long)
            # built when it was loaded; a queued request reserved it (Scheduler.submit), so this is a hit
            payload = self.cache.materialize(entry)
            assert isinstance(payload, SoloPayload), entry.name  # solo_names: only solo adapters come here
            yield payload.model, extra
        else:
            with self._planned(specs, mask):
                yield self.model, {}


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


def _pick(values: Any, rows: list[int]) -> Any:
    """``values`` (None, a scalar for every row, or a per-row list) restricted to ``rows``."""
    return values if values is None or isinstance(values, (bool, int)) else [values[i] for i in rows]
