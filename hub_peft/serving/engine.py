"""Many adapters over one base model, a different adapter (or a weighted mix) per row, batched continuously.

The base is wrapped once: every linear layer inside the decoder blocks (``nn.Linear`` and its subclasses,
bitsandbytes' 4-bit and 8-bit layers included, and GPT-2's ``Conv1D``) gets a :class:`~.row_deltas.RowDeltas`
(it adds each row group's LoRA/IA3 delta with small batched matmuls over that group's rows); the components
ReFT adapters intervene on get hooks when the first such adapter is added (they edit each row's prompt
positions during its prefill), so a base whose blocks lack a component still serves everything else. Nothing runs
per row in Python and no adapter runs on rows that are not its own. A mix ``{"a": 0.7, "b": 0.3}`` adds
``0.7·Δa + 0.3·Δb`` exactly (for LoRA ``Σ wᵢ·sᵢ·Bᵢ Aᵢ x``, never averaged A and B matrices).

Sequences (:class:`Generation`) run on the engine's own KV cache (:mod:`.kv_cache`): :meth:`forward_ragged`
is one forward over admitted sequences, each feeding its own number of new tokens; the
:class:`~.scheduler.Scheduler` decides which, step by step. A base whose attention cannot run there (ALiBi
biases, attention outside transformers' attention interface: ``ragged_reason`` says which) keeps the same
steps, streaming and adapters, but each sequence runs its own forward on a transformers ``DynamicCache``.
Adapters come from :class:`~.cache.AdapterCache` (names, resolved commits, LRU). Adapters that cannot share
a forward run through ``generate`` instead (:mod:`.static`, :mod:`.solo`). The engine never drives itself:
the scheduler (:mod:`.scheduler`) and the offline helpers (:mod:`.offline`) call its public methods.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._bnb import keep_4bit_trainable
from .._fused import Int8Linear, fused_linear, int8_head
from .._onednn import PackedLinear, packable, packed_is_faster
from ..errors import GenerationError, InvalidInputError
from ..modeling import component_module, find_decoder, find_decoder_layers, innermost_model, text_config
from ..reft.model import edit_positions, input_edit_hook, output_edit_hook
from . import kv_cache, solo
from .cache import AdapterCache, Ia3Payload, LoraPayload, ReftPayload
from .lean import LeanDecoder, lean_blocker
from .prefix_cache import BLOCK, PrefixCache
from .request import (
    AdapterSpec,
    Generation,
    Prompt,
    Spec,
    check_messages,
    check_prompt_length,
    has_tool_turns,
    last_user_turn,
    normalize_spec,
)
from .row_deltas import Group, LoraStacks, Plan, PlanSlot, RowDeltas, is_linear, returns_a_tensor
from .sampling import Sampled, SamplingParams, sample_row
from .static import StaticGeneration
from .structured import Constraint, GrammarCompiler, advance
from .tools import render as render_tools


class Engine(StaticGeneration):
    """One base model serving many LoRA/ReFT adapters, mixed per row: the model step and its adapters.

    ``base`` is ``(model, tokenizer)``; by default the embedded SmolLM2-135M-Instruct in NF4 4-bit.
    ``memory_budget`` bounds the bytes of loaded adapter weights (pinned ones always stay).
    ``packed_head``: the LM head's products in the engine's steps run on a copy of its weight reordered for
    oneDNN (:class:`~hub_peft._onednn.PackedLinear`, a second copy of the head's weight; see
    ``benchmarks/engine_cpu.py``); ``None`` (the default) does so where that was timed faster on this CPU, timed at the
    first step, on the thread that runs the steps (see :meth:`~.scheduler.Scheduler.serve_forever`).
    ``fused``: the linear layers of the blocks (NF4 and float32) multiply few rows (decode steps) with
    :mod:`hub_peft._fused`'s kernels, a single LoRA over every row inside the same call, equal to the layers' own
    products up to float32 rounding; False keeps the layers' own paths (bitsandbytes' for NF4).
    ``lean_decode``: decode steps of Llama-family bases run :mod:`.lean`'s step (same maths, fewer operations;
    checked against transformers' forward before the first sequence, ``lean_reason`` says why not where it
    does not run); False keeps transformers' forward for every step.
    ``head_bits``: 8 multiplies the LM head in the engine's steps through an 8-bit copy of its weight
    (:class:`~hub_peft._fused.Int8Linear`: a quarter of the bytes a token reads there, logits moved by the rounding;
    opt-in, None keeps it float32).
    ``prefix_cache_bytes``: the most memory the keys/values of finished prompts' blocks may take for later
    prompts on the same adapters to reuse (:mod:`.prefix_cache`); 0 turns prefix caching off.
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
        fused: bool = True,
        lean_decode: bool = True,
        prefix_cache_bytes: int = 256 * 2**20,
        head_bits: int | None = None,
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
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._slots: list[Generation] = []  # slot i holds _slots[i]; kept compact (no holes)
        self._decode_plan: tuple[tuple, Plan] | None = None
        self._stacks = LoraStacks()
        self.ragged_reason: str | None = _ragged_blocker(self.core)  # why the ragged engine cannot run, if so
        self.plans = PlanSlot()  # the plan of the forward under way, read by the RowDeltas wrappers
        self._lock = threading.RLock()
        self._layers = find_decoder_layers(self.core)
        self._wrapped: list[tuple[nn.Module, str, RowDeltas]] = []
        module_names = [name for name, _ in self.model.named_modules()]  # what PEFT sees (before the wrapping)
        self._wrap_linears(fused)
        self.lean_reason: str | None = lean_blocker(self.core) if lean_decode else "lean_decode=False"
        self._lean = LeanDecoder(self.core) if self.lean_reason is None else None
        self._packed_head = packed_head
        if head_bits not in (None, 8):
            raise InvalidInputError(f"head_bits must be 8 or None (float32), not {head_bits!r}.")
        self._head_bits = head_bits
        self._reft_sites: set[tuple[int, str]] = set()  # (layer, component) pairs with an edit hook
        self.cache = AdapterCache(
            memory_budget=memory_budget,
            targets={w.name for _, _, w in self._wrapped},
            base_config=self.core.config,
            base_name=_base_name(self.core),
            prepare=self._prepare_adapter,
            module_names=module_names,
            attach=self._attach_solo,
            base_weight=self._base_weight,
        )
        find_decoder(self.core).register_forward_pre_hook(self._count_forward)

    @property
    def started(self) -> bool:
        """Whether the engine has admitted a sequence (its KV cache exists; ``max_running`` is fixed from then)."""
        return self._kv is not None

    @property
    def lean_steps(self) -> int:
        """Decode steps run on the lean step so far (see ``lean_decode``); 0 where it does not run."""
        return 0 if self._lean is None else self._lean.steps

    @property
    def native_steps(self) -> int:
        """Of :attr:`lean_steps`, those run as one call of the fused kernels (:class:`.lean.NativeStep`)."""
        return 0 if self._lean is None else self._lean.native_steps

    @property
    def batching(self) -> str:
        """``"continuous"`` (one packed forward per step on the slot cache) or ``"per-sequence"`` (each
        sequence its own forward on transformers' cache, same steps; see ``ragged_reason``)."""
        return "continuous" if self.ragged_reason is None else "per-sequence"

    # --- wrapping --------------------------------------------------------------------------------

    def _wrap_linears(self, fused: bool) -> None:
        prefix = next(n for n, m in self.core.named_modules() if m is self._layers)
        for name, module in list(self.core.named_modules()):
            if not name.startswith(prefix + ".") or not is_linear(module) or not returns_a_tensor(module):
                continue
            parent, _, child = name.rpartition(".")
            wrapper = RowDeltas(self.plans, name, module, fused_linear(module) if fused else None)
            setattr(self.core.get_submodule(parent), child, wrapper)
            self._wrapped.append((self.core.get_submodule(parent), child, wrapper))

    def _attach_solo(self, folder: Path, config: Any) -> tuple[nn.Module, int]:
        """A solo adapter attached by PEFT to a shadow of the base (see :mod:`.solo`) and the bytes it adds:
        called by the cache when the adapter is loaded, never by a step."""
        swap = {id(wrapper): wrapper.base_layer for _, _, wrapper in self._wrapped}
        model = solo.attach(self.model, folder, config, swap=swap, lock=self._lock)
        return model, solo.own_bytes(model, self.model)

    def _base_weight(self, name: str) -> torch.Tensor:
        """The weight ``W`` [out, in] of the wrapped layer ``name``, dequantized to float32 (DoRA's column norms)."""
        from peft.utils.integrations import dequantize_module_weight
        from transformers.pytorch_utils import Conv1D

        layer = self.core.get_submodule(name)
        layer = getattr(layer, "base_layer", layer)
        with torch.no_grad():
            weight = dequantize_module_weight(layer).float()
        return weight.T if isinstance(layer, Conv1D) else weight

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
        if self.plans.current is not None:
            self.plans.current.forwards_seen += 1

    def _reft_edit(self, layer: int, component: str, hidden: torch.Tensor) -> torch.Tensor:
        plan = self.plans.current
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

    def add(self, name: str, source: str | Path, revision: str | None = None, **options: Any) -> dict:
        """Load an adapter under ``name``: :meth:`.cache.AdapterCache.add`, which says how and takes the
        ``options`` (``subfolder``, ``pin``, ``hub_only``)."""
        return self.cache.add(name, source, revision, **options)

    def merge(self, mix: dict[str, float], spec: Any, root: Path) -> str:
        """The name of the adapter merged from ``mix``'s loaded adapters with ``spec`` (a
        :class:`hub_peft.bridges.MergeSpec`), merging and loading it first if it is new (:meth:`.cache.AdapterCache.
        merge`, which keeps at most ``MAX_MERGES``; the oldest go)."""
        name, dropped = self.cache.merge(mix, spec, root)
        for old in dropped:
            self.remove(old)
        return name

    def remove(self, name: str) -> None:
        self.cache.remove(name)
        with self._lock:  # stacks and a kept decode plan hold payloads: let a removed adapter's memory go
            self._stacks.clear()
            self._decode_plan = None

    # --- inference -------------------------------------------------------------------------------

    def normalize(self, adapters: Sequence[AdapterSpec | Spec] | None, n: int) -> list[Spec]:
        """One :data:`~.request.Spec` per row (``adapters`` None: the bare base for all ``n``), every name loaded."""
        adapters = list(adapters) if adapters is not None else [None] * n
        if len(adapters) != n:
            raise InvalidInputError(f"{n} prompts but {len(adapters)} adapter entries; give one per prompt.")
        specs = [normalize_spec(adapter) for adapter in adapters]
        for spec in specs:
            for name, _ in spec:
                self.cache.get(name)
        return specs

    def encode(
        self,
        prompts: Sequence[Prompt],
        specs: Sequence[Spec],
        raw: Sequence[bool],
        tools: Sequence[list[dict] | None] | None = None,
    ) -> list[list[int]]:
        """Token ids per row: the adapter's recorded training template (single turn), else the chat template; a
        conversation with ``tools`` (or tool calls and results in it) always takes the chat template (:mod:`.tools`)."""
        from ..chat import PLACEHOLDER, encode_prompt, prompt_template

        chat = prompt_template(self.tokenizer)
        encoded = []
        tools = tools or [None] * len(prompts)
        for prompt, spec, is_raw, row_tools in zip(prompts, specs, raw, tools, strict=True):
            recorded = {t for n, _ in spec if (t := self.cache.entries[n].template) is not None}
            template = PLACEHOLDER if is_raw else recorded.pop() if len(recorded) == 1 else chat
            if isinstance(prompt, str):
                encoded.append(encode_prompt(self.tokenizer, prompt, template))
                continue
            if row_tools or has_tool_turns(prompt):  # tools need the conversation, in the model's own format
                if chat == PLACEHOLDER:
                    raise InvalidInputError("Tools need a chat template, and this base's tokenizer has none.")
                text = render_tools(self.tokenizer, prompt, row_tools)
            elif template == chat and chat != PLACEHOLDER:  # a whole conversation in the tokenizer's chat format
                text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            else:  # an adapter trained on single prompts answers the last user turn in its own format
                encoded.append(encode_prompt(self.tokenizer, last_user_turn(prompt), template))
                continue
            encoded.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return encoded

    # --- structured output (see structured.py) -------------------------------------------------------

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        """The compiler of this engine's constraints, made at the first constrained request (see there)."""
        width = self.core.get_output_embeddings().weight.shape[0]
        return GrammarCompiler(self.tokenizer, max(width, len(self.tokenizer)))

    def sample_rows(self, seqs: Sequence[Generation], logits: torch.Tensor) -> list[Sampled | GenerationError]:
        """Draw each sequence's next token from its logits row (masks of the constrained ones computed in one call)
        and append it; a sequence whose grammar fails gets its error instead (the others are unaffected)."""
        constrained = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        masks: dict[int, torch.Tensor] = {}
        if constrained:
            rows = self.grammars.masks([seqs[i].grammar for i in constrained])
            masks = dict(zip(constrained, rows, strict=True))
        out: list[Sampled | GenerationError] = []
        for i, (seq, row) in enumerate(zip(seqs, logits, strict=True)):
            try:
                out.append(self.sample(seq, row, masks.get(i)))
            except GenerationError as e:
                out.append(e)
        return out

    # --- the ragged engine: sequences on the engine's own KV cache -----------------------------------

    def generation(
        self,
        prompt: Prompt,
        adapter: AdapterSpec | Spec = None,
        params: SamplingParams | None = None,
        *,
        raw: bool = False,
        max_prompt_tokens: int | None = None,
        constraint: Constraint | None = None,
        tools: list[dict] | None = None,
    ) -> Generation:
        """A new, not yet admitted :class:`Generation` for one prompt (validated, tokenized with the chat template's
        ``tools``, adapters loaded, ``constraint`` compiled); :class:`PromptTooLongError` for a prompt over
        ``max_prompt_tokens`` (checked before the context length)."""
        params = params or SamplingParams()
        if not isinstance(prompt, str):
            check_messages(prompt)
        spec = self.normalize([adapter], 1)[0]
        solo = self.solo_names(spec)
        if solo:
            raise InvalidInputError(f"{self.cache.entries[solo[0]].solo_reason}; it runs through generate_tokens only.")
        if constraint is not None and params.ignore_eos:
            raise InvalidInputError(
                "ignore_eos cannot be combined with structured output: the grammar ends the answer."
            )
        prompt_ids = self.encode([prompt], [spec], [raw], [tools])[0]
        check_prompt_length(len(prompt_ids), max_prompt_tokens)
        grammar = self.grammars.matcher(constraint) if constraint is not None else None  # off the step loop
        parts = self.cache.hold(spec)  # the cache's own lock: never waits for a forward of the model
        seq = Generation(prompt_ids, spec, params, parts=parts, grammar=grammar)
        if not any(isinstance(payload, ReftPayload) for payload, _ in parts):  # see prefix_cache's NOTE(reft)
            seq.prefix_key = tuple((self.cache.get(name).cached.key, weight) for name, weight in spec)
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
            if self._kv is not None and self.prefix_cache is not None and seq.prefix_key is not None:
                blocks = self.prefix_cache.match(seq.prefix_key, seq.prompt_ids)
                if blocks:
                    self._kv.write(
                        seq.slot,
                        torch.cat([b.keys for b in blocks], dim=2),
                        torch.cat([b.values for b in blocks], dim=2),
                    )
                    seq.cached = seq.cached_prompt_tokens = len(blocks) * BLOCK
            return True

    @torch.inference_mode()
    def _check_slot_cache(self) -> str | None:
        """Whether the slot cache reproduces this model's own attention, checked once before the first sequence
        is admitted (so on the thread that runs the steps): two random sequences of 7 and 3 tokens in one packed
        prefill step, then one decode step, against the model's own forward over each whole sequence. The
        static checks of :func:`_ragged_blocker` cannot see everything an attention module may do (attention
        sinks, a KV layout of its own...); a difference beyond float noise sends the base to per-sequence
        mode, with the reason. Returns that reason, or None. A third step checks the lean decode step
        (:mod:`.lean`) the same way; where it differs, decode steps keep transformers' forward (``lean_reason``)."""
        vocab = self.core.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(0)
        probes = [
            Generation(torch.randint(vocab, (n,), generator=generator).tolist(), (), SamplingParams(max_tokens=3))
            for n in (7, 3)
        ]
        for probe in probes:
            probe.slot, probe.cached = len(self._slots), 0
            self._slots.append(probe)
        name = type(self.core).__name__
        try:
            for step in range(3 if self._lean is not None else 2):
                what = "the lean decode step" if step == 2 else "the slot cache's attention"
                try:
                    rows = [(probe, len(probe.tokens) - probe.cached) for probe in probes]
                    got = self._forward_packed(rows, lean=step == 2)
                    worst = 0.0
                    for probe, row in zip(probes, got, strict=True):
                        with self._packed_head_in():  # the head the steps use (an 8-bit one changes the logits)
                            expected = self.core(input_ids=torch.tensor([probe.tokens])).logits[0, -1]
                        gap = (row.float() - expected.float()).abs().max() / (1 + expected.float().abs().max())
                        worst = max(worst, gap.item())
                        probe.output.append(int(row.argmax()))
                    reason = None
                    if worst > (1e-4 if got.dtype == torch.float32 else 3e-2):
                        reason = (
                            f"{what} does not reproduce {name}'s own (logits differ by {worst:.1e} of their size "
                            f"at step {step + 1} of a check)"
                        )
                except Exception as e:  # whatever the model's attention needs that the slot cache lacks
                    reason = f"{what} fails on {name} ({type(e).__name__}: {e})"[:300]
                if reason is not None and step == 2:
                    self.lean_reason, self._lean = reason, None
                elif reason is not None:
                    return reason
            return None
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
        for b, (seq, n) in enumerate(rows):
            feed = seq.tokens[seq.cached : seq.cached + n]
            if len(feed) != n or n < 1:
                raise InvalidInputError(f"row {b} has {len(feed)} tokens to feed, not {n}.")
        if self.ragged_reason is not None or self._kv is None:  # no slot cache on this base
            return self._forward_each(rows)
        return self._forward_packed(rows, lean=self._lean is not None)

    def _forward_packed(self, rows: list[tuple[Generation, int]], *, lean: bool) -> torch.Tensor:
        """:meth:`forward_ragged` on the slot cache: a decode step (every row one new token past its prompt) on
        the lean step when ``lean``, else (and any step with a prompt chunk) transformers' forward."""
        kv = self._kv
        assert kv is not None  # forward_ragged sends steps here only on the slot cache
        step = kv_cache.RaggedStep.build(
            kv, [seq.slot for seq, _ in rows], [seq.cached for seq, _ in rows], [n for _, n in rows]
        )
        ids = torch.tensor([[t for seq, n in rows for t in seq.tokens[seq.cached : seq.cached + n]]])
        decoder = self._lean if lean and not any(seq.prefilling for seq, _ in rows) else None
        with self._lock, kv_cache.running(self.core, step), self._packed_head_in():
            plan = self.plans.current = self._ragged_plan(rows)
            try:
                if decoder is not None:
                    plan.forwards_seen = 1  # no decoder pre-hook runs; decode tokens take no ReFT edit anyway
                    logits = decoder(ids, step, plan)
                else:
                    logits = self.core(
                        input_ids=ids,
                        position_ids=step.token_positions[None],
                        use_cache=False,
                        logits_to_keep=step.last,
                    ).logits[0]
            finally:
                self.plans.current = None
        for seq, n in rows:
            was_prefilling = seq.prefilling
            seq.cached += n
            if was_prefilling and not seq.prefilling and self.prefix_cache is not None and seq.prefix_key is not None:
                self.prefix_cache.store(seq.prefix_key, seq.prompt_ids, kv.keys, kv.values, seq.slot)
        return logits

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
                cache = {} if seq.past in (None, _NO_CACHE) else {_cache_argument(self.core): seq.past}
                self.plans.current = self._ragged_plan([(seq, n)], reuse=False)
                try:
                    result = self.core(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
                except Exception:
                    seq.past_tokens = seq.cached + n  # some layers may hold the new tokens already
                    raise
                finally:
                    self.plans.current = None
                seq.past = getattr(result, "cache", None) or getattr(result, "past_key_values", None) or _NO_CACHE
                seq.cached += n
                seq.past_tokens = seq.cached
                out.append(result.logits[0, -1])
        return torch.stack(out)

    @functools.cached_property
    def _head(self) -> PackedLinear | Int8Linear | None:
        if self._head_bits == 8 and (head := int8_head(getattr(self.core, "lm_head", None))) is not None:
            return head
        return _packed_head(self.core, self._packed_head)

    @contextmanager
    def _packed_head_in(self) -> Iterator[None]:
        """The LM head swapped for its packed (or 8-bit) twin for one forward (the base itself stays a plain model)."""
        head = self._head
        if head is None or self.core.lm_head is not head.linear:
            yield
            return
        self.core.lm_head = head
        try:
            yield
        finally:
            self.core.lm_head = head.linear

    def _ragged_plan(self, rows: list[tuple[Generation, int]], *, reuse: bool = True) -> Plan:
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
            group = Group(tokens, span=(offsets[entries[0]], offsets[entries[0]] + n) if seq.prefilling else None)
            for payload, weight in seq.parts:
                if isinstance(payload, LoraPayload):
                    group.loras.append((payload, weight))
                elif isinstance(payload, Ia3Payload):
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
        plan = Plan(groups, stacks=self._stacks.get(batched), packed=True)
        plan.forwards_seen = 0  # the forward's pre-hook makes it 1: the ReFT edits of this chunk apply
        if decoding:
            self._decode_plan = (signature, plan)
        return plan

    @torch.inference_mode()
    def embed(
        self, prompts: Sequence[str], adapter: AdapterSpec | Spec = None, max_prompt_tokens: int | None = None
    ) -> tuple[torch.Tensor, int]:
        """Embeddings of raw texts under ``adapter`` (a name, a mix, None for the base): the final hidden state
        of each text's last token (after the final norm), L2-normalized, as vLLM pools a decoder by default;
        ``[len(prompts), hidden]`` and the tokens read. Each text runs its own forward with its adapters (ReFT
        edits included), so a text's embedding does not depend on the others. Every text is checked against
        ``max_prompt_tokens`` before any forward. Call it from the thread that runs the steps
        (:meth:`.scheduler.Scheduler.call`)."""
        spec = self._whole_forward_spec(adapter, "embeddings")
        decoder = find_decoder(self.core)
        encoded = self.encode(prompts, [spec] * len(prompts), [True] * len(prompts))
        for ids in encoded:
            if not ids:
                raise InvalidInputError("An input to embed is empty.")
            check_prompt_length(len(ids), max_prompt_tokens)
        rows, tokens = [], 0
        for ids in encoded:
            hidden = self._whole_forward(decoder, ids, spec).last_hidden_state
            rows.append(hidden[0, -1].float())
            tokens += len(ids)
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1), tokens

    @torch.inference_mode()
    def prompt_logprobs(
        self, prompt: str, adapter: AdapterSpec | Spec = None, top: int = 0, max_prompt_tokens: int | None = None
    ) -> list[Sampled]:
        """The logprob of each token of a raw ``prompt`` after the ones before it, with the ``top`` most likely
        (``Sampled(token)`` without a logprob for the first token, which follows nothing), under ``adapter``: what
        completions' ``echo`` with ``logprobs`` reports (scoring a text). One forward of the whole prompt, on the
        thread that runs the steps (:meth:`.scheduler.Scheduler.call`), with the steps' LM head."""
        spec = self._whole_forward_spec(adapter, "prompt logprobs")
        ids = self.encode([prompt], [spec], [True])[0]
        check_prompt_length(len(ids), max_prompt_tokens)
        with self._packed_head_in():
            logits = self._whole_forward(self.core, ids, spec).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        out = [Sampled(ids[0])]
        for position, token in enumerate(ids[1:]):
            row = logprobs[position]
            values, best = row.topk(top) if top else (row[:0], row[:0].long())
            out.append(Sampled(token, float(row[token]), list(zip(best.tolist(), values.tolist(), strict=True))))
        return out

    def _whole_forward_spec(self, adapter: AdapterSpec | Spec, what: str) -> Spec:
        spec = self.normalize([adapter], 1)[0]
        if solo := self.solo_names(spec):
            raise InvalidInputError(f"{self.cache.entries[solo[0]].solo_reason}; {what} need a LoRA, IA3 or ReFT.")
        return spec

    def _whole_forward(self, module: nn.Module, ids: list[int], spec: Spec) -> Any:
        """``module`` (the model or its decoder) over one whole sequence with ``spec``'s adapters, no cache."""
        seq = Generation(ids, spec, SamplingParams(max_tokens=1), parts=self.cache.hold(spec))
        with self._lock:
            self.plans.current = self._ragged_plan([(seq, len(ids))], reuse=False)
            try:
                return module(input_ids=torch.tensor([ids]), use_cache=False)
            finally:
                self.plans.current = None

    def sample(self, seq: Generation, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> Sampled:
        """Draw ``seq``'s next token from its logits row and append it (its grammar's mask: ``allowed``, computed
        here when not given), advancing its grammar."""
        if seq.grammar is not None and allowed is None:
            allowed = self.grammars.masks([seq.grammar])[0]
        sampled = sample_row(
            logits,
            seq.params,
            len(seq.output),
            seq.prompt_ids,
            seq.output,
            eos=self.tokenizer.eos_token_id,
            suppress_eos=seq.params.ignore_eos,
            allowed=allowed,
        )
        if seq.grammar is not None:
            advance(seq.grammar, sampled.token)
        seq.output.append(sampled.token)
        seq.samples.append(sampled)
        return sampled

    def solo_names(self, spec: tuple[tuple[str, float], ...]) -> list[str]:
        """The adapters of a normalized spec that cannot share a forward (they run through ``generate``)."""
        return [name for name, _ in spec if self.cache.entries[name].kind == "solo"]


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
        if not _uses_attention_interface(attention[0]):
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
        raise GenerationError(
            f"this request's cache cannot be rolled back after a failed step ({e}); send the request again."
        ) from None  # a server-side failure of this request alone (HTTP 500)
    return past


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` (transformers 5.25+), else ``past_key_values``."""
    return "cache" if "cache" in _forward_signature(model.__class__).parameters else "past_key_values"


def _uses_attention_interface(module: nn.Module) -> bool:
    return _forward_uses_attention_interface(module.__class__)


@functools.cache
def _forward_signature(cls: Any) -> inspect.Signature:
    return inspect.signature(cls.forward)


@functools.cache
def _forward_uses_attention_interface(cls: Any) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


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
