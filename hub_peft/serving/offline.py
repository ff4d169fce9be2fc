"""``MultiAdapterModel``: the engine with offline helpers, a thin driver over the scheduler.

:meth:`MultiAdapterModel.generate_tokens` submits one :class:`~.request.Request` per prompt to a
:class:`~.scheduler.Scheduler` of its own and runs its steps in the caller's thread, exactly as the server's
scheduler runs them; :meth:`~MultiAdapterModel.next_token_logits` is one prefill on the engine's KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import InvalidInputError
from .engine import Engine
from .request import AdapterSpec, Completion, Prompt, Request
from .sampling import Sampled, SamplingParams
from .scheduler import Scheduler
from .static import _pick
from .structured import Constraint


class MultiAdapterModel(Engine):
    """One base model serving many LoRA/IA3/ReFT adapters, mixed per row (see :class:`~.engine.Engine`), with
    offline ``generate`` helpers. Adapters are managed with :meth:`add`/:meth:`remove` and ``.cache``
    (:class:`~.cache.AdapterCache`: what is loaded, resident bytes, statistics, the memory budget)."""

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
        constraints: Sequence[Constraint | None] | None = None,
    ) -> list[Completion]:
        """Completions as token ids, one per prompt (in the prompts' order); greedy unless ``params``.

        Rows run with continuous batching on the engine's KV cache (adapters that cannot share a forward, or
        a base that cannot run there, take the ``generate`` path). A row's tokens do not depend on what it is
        batched with: greedy rows by construction, sampled ones because their noise is keyed by their own
        seed and position. ``max_new_tokens`` may differ per row; ``on_token(row, token_id)`` streams them;
        ``ignore_eos`` generates exactly ``max_new_tokens`` per row (for benchmarks). ``params`` (one
        :class:`SamplingParams` per row) overrides ``max_new_tokens`` and ``ignore_eos``. ``constraints`` (one
        :class:`~.structured.Constraint` or None per row) holds a row's answer to a JSON schema, regex or grammar.
        """
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
        constraints = list(constraints) if constraints is not None else [None] * len(prompts)
        if len(constraints) != len(prompts):
            raise InvalidInputError(f"{len(prompts)} prompts but {len(constraints)} constraints.")
        self.normalize(adapters, len(prompts))  # clear errors before anything runs
        scheduler = Scheduler(self, max_waiting=len(prompts) + 1)

        def update(request: Request, samples: list[Sampled], _: str) -> None:
            if on_token is not None:
                for sampled in samples:
                    on_token(request.row, sampled.token)

        requests = []
        rows = zip(prompts, adapters, params, raws, constraints, strict=True)
        for row, (prompt, adapter, p, is_raw, constraint) in enumerate(rows):
            request = Request(prompt, adapter, p, raw=is_raw, row=row, on_update=update, constraint=constraint)
            scheduler.submit(request)
            requests.append(request)
        scheduler.run_until_done()
        for request in requests:
            if request.error is not None:
                raise request.error
        return [r.completion() for r in requests]

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
            solo = any(self.solo_names(spec) for spec in self.normalize(adapters, len(prompts)))
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
