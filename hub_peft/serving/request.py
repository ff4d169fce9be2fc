"""The serving layer's value types: what a caller asks (:class:`Request`, an :data:`AdapterSpec` normalized
once into a :data:`Spec`, a :data:`Prompt`) and what the engine runs and returns (:class:`Generation`,
:class:`Completion`). They hold data only; the engine and the scheduler act on them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import GenerationError, InvalidInputError, PromptTooLongError
from .sampling import Sampled, SamplingParams
from .structured import Constraint

AdapterSpec = str | dict[str, float] | None  # a name, a {name: weight} mix, or None (the bare base)
Spec = tuple[tuple[str, float], ...]  # an AdapterSpec normalized: ((name, weight), ...) sorted; () the bare base
Prompt = str | Sequence[dict[str, Any]]  # a prompt, or chat messages [{"role": ..., "content": ...}]
MAX_MIX_ADAPTERS = 8  # adapters in one weighted mix
MAX_MIX_WEIGHT = 16.0  # |weight| of one adapter in a mix: beyond it a mix only produces garbage (or inf/NaN)


def check_prompt_length(tokens: int, limit: int | None) -> None:
    if limit is not None and tokens > limit:
        raise PromptTooLongError(f"The prompt is {tokens} tokens; the limit is {limit}.")


def normalize_spec(adapter: AdapterSpec | Spec) -> Spec:
    """``adapter`` as a :data:`Spec`: a name is ``((name, 1.0),)``, a mix its sorted ``(name, weight)`` pairs
    (at most :data:`MAX_MIX_ADAPTERS`, each weight finite and within :data:`MAX_MIX_WEIGHT`), None or "" the
    bare base ``()``; a Spec is returned as it is. Whether the names are loaded is the engine's question."""
    if adapter is None or adapter == "":
        return ()
    if isinstance(adapter, tuple):
        return adapter
    if isinstance(adapter, str):
        return ((adapter, 1.0),)
    if isinstance(adapter, dict) and adapter:
        if len(adapter) > MAX_MIX_ADAPTERS:
            raise InvalidInputError(f"A mix takes at most {MAX_MIX_ADAPTERS} adapters, got {len(adapter)}.")
        for name, weight in adapter.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not abs(weight) <= MAX_MIX_WEIGHT:
                raise InvalidInputError(
                    f"Mix weight for {name!r} must be a finite number between "
                    f"-{MAX_MIX_WEIGHT} and {MAX_MIX_WEIGHT}, got {weight!r}."
                )
        return tuple(sorted((k, float(v)) for k, v in adapter.items()))
    raise InvalidInputError(f"An adapter entry is a name, a {{name: weight}} mix or None, got {adapter!r}.")


def check_messages(messages: Any) -> None:
    """A chat prompt: system/user/assistant/tool messages with text content, at least one from the user; an
    assistant message may carry ``tool_calls`` (``{"function": {"name": str, "arguments": dict}}``) instead."""

    def ok(m: Any) -> bool:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            return False
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if calls is not None:
            good = isinstance(calls, list) and all(
                isinstance(c, dict)
                and isinstance(f := c.get("function"), dict)
                and isinstance(f.get("name"), str)
                and isinstance(f.get("arguments"), dict)
                for c in calls
            )
            return good and (m.get("content") is None or isinstance(m["content"], str))
        return isinstance(m.get("content"), str)

    if (
        not isinstance(messages, (list, tuple))
        or not all(map(ok, messages))
        or not any(m["role"] == "user" for m in messages)
    ):
        raise InvalidInputError(
            "A chat prompt is a non-empty list of {'role': 'system'|'user'|'assistant'|'tool', 'content': str} "
            "messages with at least one user message (an assistant message may hold tool_calls instead of content)."
        )


def has_tool_turns(messages: Sequence[dict]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def last_user_turn(messages: Sequence[dict[str, Any]]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


@dataclass
class Completion:
    tokens: list[int]  # generated ids, EOS included when the model stopped
    prompt_tokens: int
    finish_reason: str  # stop | length
    logprobs: list[Sampled] | None = None  # per generated token, when asked for
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values the prefix cache gave (see .prefix_cache)


@dataclass(eq=False)
class Generation:
    """One completion running on the engine's KV cache (see :meth:`.engine.Engine.forward_ragged`)."""

    prompt_ids: list[int]
    spec: Spec
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    samples: list[Sampled] = field(default_factory=list)
    slot: int = -1  # -1: holds no slot
    cached: int = 0  # tokens whose keys/values are in the slot
    past: Any = None  # a per-sequence transformers cache, on bases that cannot use the slots (see ragged_reason)
    past_tokens: int = 0  # tokens ``past`` may hold: more than ``cached`` after a failed or retried step
    parts: tuple = ()  # ((payload, weight), ...) for spec, held even if the cache evicts them meanwhile
    # the adapters' content keys and weights that name its prompt's cached blocks (see .prefix_cache); None: its
    # prompt neither reuses nor stores blocks (a ReFT adapter, an engine check's probe)
    prefix_key: tuple | None = None
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    grammar: Any = None  # an llguidance matcher its tokens must satisfy (see .structured), advanced as it samples

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


@dataclass(eq=False)
class Request:
    """One completion asked of the scheduler. ``on_update(request, samples, text_delta)`` is called from
    the scheduler's thread with each step's new tokens and the text they complete (stop strings held
    back until they are ruled out, never emitted); ``finish_reason`` is set before ``done`` fires."""

    prompt: Prompt
    adapter: AdapterSpec
    params: SamplingParams
    spec: Spec = ()  # ``adapter`` normalized, once, when the request is submitted
    raw: bool = False
    constraint: Constraint | None = None  # what the answer must match (structured output, forced tool calls)
    tools: list[dict] | None = None  # functions the chat template shows the model (OpenAI's ``tools``)
    on_update: Callable[[Request, list[Sampled], str], None] | None = None
    on_finish: Callable[[Request], None] | None = None  # called from the scheduler's thread once it ended
    timeout: float | None = None  # seconds from submission
    label: str = "base"  # for metrics
    row: int = 0  # the caller's index (a choice of a request with n > 1, a row of generate_tokens)
    generation: Generation | None = None
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    error: Exception | None = None
    text: str = ""  # the completion's text so far (stop string excluded)
    emitted: int = 0  # characters of text already handed to on_update
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    solo: bool = False
    reserved: tuple = ()  # a solo request's adapter copies, kept resident (built) until it ends

    @property
    def tokens(self) -> list[int]:
        return self.generation.output if self.generation is not None else []

    @property
    def gen(self) -> Generation:
        """``generation``, which a request has from its submission (a solo one once it ran)."""
        if self.generation is None:
            raise GenerationError("This request has not been submitted (or, run solo, has not run) yet.")
        return self.generation

    def completion(self) -> Completion:
        gen = self.gen
        finish = "stop" if self.finish_reason == "stop" else "length"
        return Completion(
            list(gen.output),
            len(gen.prompt_ids),
            finish,
            list(gen.samples) if self.params.logprobs is not None else None,
            gen.cached_prompt_tokens,
        )
