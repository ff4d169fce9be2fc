"""Structured output: a request's answer held to a JSON schema, a regex, a list of choices or a Lark grammar.

A :class:`Constraint` is a small value (what the answer must match); the engine's :class:`GrammarCompiler` turns it
into an llguidance matcher, which each constrained sequence advances token by token. At every step the scheduler
asks for the allowed-token masks of all constrained rows at once (:meth:`GrammarCompiler.masks`, one parallel call),
and the sampler drops the tokens a row's mask forbids before it draws (:func:`~.sampling.sample_row`): constrained
and free rows, any adapter, share one forward, and a row's mask depends on its own tokens only, so seeded sampling
stays batch-invariant.

NOTE(grammar-engine): llguidance, not xgrammar: it compiles a new schema several times faster and installs without
triton; xgrammar's masks are faster per token, but a mask is a small share of a decode step either way
(``benchmarks/grammar.py`` and ``benchmarks/online.py``; figures in ``benchmarks/README.md``).

NOTE(security): schemas and grammars come from strangers. Compiling runs on the submitting thread, never in the
step loop, bounded by llguidance's parser limits (lexer states, grammar size, fuel per step), by
:data:`MAX_SOURCE_CHARS` and by :data:`MAX_MASK_MS` (the time of its first mask); a grammar that breaks a limit
is refused with a 400, and one that fails mid-answer fails that request alone. Compiled grammars are cached
(:data:`CACHE_SIZE`, LRU) and copied per request.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import ConstraintError, GenerationError, InvalidInputError

MAX_SOURCE_CHARS = 64 * 1024  # a schema, regex or grammar longer than this is refused
MAX_CHOICES = 256
CACHE_SIZE = 128  # compiled grammars kept for later requests
MAX_MASK_MS = 10.0  # a constraint whose first token mask takes longer is refused (JSON schemas take far less)
# NOTE(json-format): compact JSON as json.dumps writes it (", " and ": "), no free whitespace: a small model
# cannot pad an answer with newlines until max_tokens, and answers compare equal across engines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

Kind = Literal["json", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class Constraint:
    """What an answer must match: ``kind`` ``"json"`` (``source`` a JSON schema, as JSON text), ``"regex"``,
    ``"choice"`` (``source`` a JSON list of strings) or ``"grammar"`` (Lark, as llguidance reads it; a GBNF grammar,
    llama.cpp's format, is converted). Build one with :meth:`json_schema`, :meth:`regex`, :meth:`choice` or
    :meth:`grammar`; it is hashable, the key of the compiled-grammar cache."""

    kind: Kind
    source: str

    @classmethod
    def json_schema(cls, schema: dict | bool | None = None) -> Constraint:
        """Any JSON object (``None``: OpenAI's ``json_object``), or a value valid under ``schema``."""
        schema = {"type": "object"} if schema is None else schema
        if not isinstance(schema, (dict, bool)):
            raise InvalidInputError("A JSON schema is an object (or true/false).")
        return cls("json", json.dumps(schema))  # key order kept: properties are generated in schema order

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> Constraint:
        choices = list(choices)
        if not choices or len(choices) > MAX_CHOICES or not all(isinstance(c, str) and c for c in choices):
            raise InvalidInputError(f"choice takes 1 to {MAX_CHOICES} non-empty strings.")
        return cls("choice", json.dumps(choices))

    @classmethod
    def grammar(cls, grammar: str) -> Constraint:
        return cls("grammar", grammar)

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's input format."""
        import llguidance

        if len(self.source) > MAX_SOURCE_CHARS:
            raise ConstraintError(f"The {self.kind} constraint is over {MAX_SOURCE_CHARS} characters; shorten it.")
        if self.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(self.source, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "choice":
            alternatives = " | ".join(json.dumps(c) for c in json.loads(self.source))
            return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            lark = any_to_lark(self.source)
        except Exception as e:  # the GBNF converter's own errors: the grammar is malformed
            raise ConstraintError(f"The grammar could not be read as Lark or GBNF: {e}") from None
        return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarCompiler:
    """Compiles :class:`Constraint` s for one tokenizer (cached) and computes the masks of many matchers at once.

    ``vocab_size`` is the width of the model's logits (it may exceed the tokenizer's vocabulary: those ids are
    never allowed). Built lazily by the engine, on the first constrained request: it reads the whole tokenizer
    and starts llguidance's threads."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf

        try:
            self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        except (ValueError, TypeError) as e:
            raise InvalidInputError(
                f"Structured output needs a fast (Rust) tokenizer; this base's cannot be read ({e})."
            ) from None
        self.vocab_size = vocab_size
        # NOTE(security): errors say what is wrong without echoing the parser's state (verbose_errors)
        self._limits = llguidance.LLParserLimits(
            max_lexer_states=50_000, max_grammar_size=100_000, verbose_errors=False
        )
        self._executor = llguidance.LLExecutor()
        self._compiled: OrderedDict[Constraint, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # constraints compiled (cache misses)
        self.mask_seconds = 0.0  # time the steps spent computing masks (the structured-output cost per step)
        warm = llguidance.LLMatcher(self._tokenizer, llguidance.LLMatcher.grammar_from_regex("warm"), log_level=0)
        self.masks([warm])  # the executor's threads start here, not in a step

    def matcher(self, constraint: Constraint) -> Any:
        """A fresh matcher for ``constraint`` (a copy of the cached compiled one); :class:`InvalidInputError`
        when the schema, regex or grammar is malformed or over a limit."""
        import llguidance
        from llguidance.torch import fill_next_token_bitmask

        with self._lock:
            template = self._compiled.get(constraint)
            if template is not None:
                self._compiled.move_to_end(constraint)
                return template.deep_copy()
        try:
            grammar = constraint.llguidance_grammar()
        except ValueError as e:  # llguidance: the schema is not JSON
            raise ConstraintError(f"The {constraint.kind} constraint is malformed: {e}") from None
        template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=self._limits)
        # NOTE(step-cost): every step computes the masks of all constrained rows, so one costly grammar would slow
        # every neighbour: its first mask is computed here, on the submitting thread, and one that takes over
        # MAX_MASK_MS of this thread's CPU time (not wall time: a busy server must not refuse a plain schema) refused
        started = time.thread_time()
        if not template.is_error():
            fill_next_token_bitmask(template, torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32))
        cost = (time.thread_time() - started) * 1e3
        if template.is_error():
            raise ConstraintError(f"The {constraint.kind} constraint cannot be used: {template.get_error()}")
        if cost > MAX_MASK_MS:
            raise ConstraintError(
                f"The {constraint.kind} constraint costs {cost:.0f} ms per token here, over this server's limit of "
                f"{MAX_MASK_MS} ms; simplify it (long fixed repetitions such as a{{10000}} cost the most)."
            )
        with self._lock:
            self.compiles += 1
            self._compiled[constraint] = template
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    def masks(self, matchers: Sequence[Any]) -> torch.Tensor:
        """The allowed next tokens of each matcher, ``[len(matchers), vocab_size]`` booleans (one parallel call)."""
        from llguidance.torch import fill_next_token_bitmask_par

        started = time.perf_counter()
        words = (self.vocab_size + 31) // 32
        bits = torch.zeros((len(matchers), words), dtype=torch.int32)
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bits)
        unpacked = (bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = unpacked.view(len(matchers), -1)[:, : self.vocab_size].bool()
        self.mask_seconds += time.perf_counter() - started
        return allowed


def advance(matcher: Any, token: int) -> None:
    """Feed the sampled ``token`` to a sequence's matcher; :class:`GenerationError` when it cannot take it (the
    grammar ran out of its per-step budget, say): that request fails, alone."""
    if not matcher.consume_token(token) or matcher.is_error():
        raise GenerationError(f"Structured output failed: {matcher.get_error() or 'the grammar refused the token'}.")
