"""Iteration-level (continuous) batching over the engine (:class:`~.engine.Engine`).

Each :meth:`Scheduler.step` admits waiting requests into free cache slots (first come, first
served), runs **one** forward over the prompt chunks of newly admitted requests (at most
``prefill_budget`` prompt tokens, long prompts chunked) together with one token of every decoding
request, samples each row's next token, and retires the requests that ended: their slots are reused
at the next step. A request therefore joins at the step after it arrives and leaves at the step it
ends, whatever else runs. Cancelled and timed-out requests leave at the next step.

Adapters that cannot share a forward (DoRA, prefix tuning, ...; ``engine.cache.info(name)["mixable"]``
is False) and bases the ragged engine cannot run take the engine's ``generate`` path instead, one
sub-batch per adapter per step: correct, but those requests do not batch continuously.

:meth:`Scheduler.run` drives it from one worker thread for the server; ``MultiAdapterModel`` (:mod:`.offline`) uses the
same steps synchronously for its own ``generate_tokens``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..errors import InvalidInputError, QueueFullError
from .engine import Engine
from .request import Generation, Request, check_prompt_length
from .sampling import Sampled

logger = logging.getLogger(__name__)


class Scheduler:
    """Admission, steps, stop detection and cancellation for one engine (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_waiting: int = 256,
        prefill_budget: int = 2048,
        max_prompt_tokens: int | None = None,
    ) -> None:
        if prefill_budget < 128:
            raise InvalidInputError("prefill_budget must be at least 128 tokens.")
        self.engine, self.max_waiting, self.prefill_budget = engine, max_waiting, prefill_budget
        self.max_prompt_tokens = max_prompt_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.lock = threading.Condition()
        self.steps = 0
        self._thread: threading.Thread | None = None
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # work for the step thread, between steps
        self.on_step: Callable[[Scheduler, float], None] | None = None  # metrics hook: (scheduler, seconds)

    # --- submission ------------------------------------------------------------------------------

    def submit(self, *requests: Request) -> None:
        """Validate, tokenize and queue ``requests`` (all or none): :class:`QueueFullError` when the queue
        cannot take them all, :class:`PromptTooLongError` over ``max_prompt_tokens``."""
        engine = self.engine
        try:
            for request in requests:
                spec = request.spec = engine.normalize([request.adapter], 1)[0]
                solo = engine.solo_names(spec)
                request.solo = bool(solo)
                if solo and (request.constraint is not None or request.tools):
                    raise InvalidInputError(
                        f"{engine.cache.entries[solo[0]].solo_reason}, so structured output and tools are not "
                        "available with it; use a LoRA, IA3 or ReFT adapter for them."
                    )
                if request.solo:
                    prompt_ids = engine.encode([request.prompt], [spec], [request.raw])[0]
                    check_prompt_length(len(prompt_ids), self.max_prompt_tokens)
                    # NOTE(security): a solo adapter is attached (or re-attached after an eviction) here, on
                    # the submitting thread, and kept until the request ends: the step loop never attaches.
                    request.reserved = engine.cache.reserve(spec)
                else:
                    limit = self.max_prompt_tokens
                    request.generation = engine.generation(
                        request.prompt,
                        spec,
                        request.params,
                        raw=request.raw,
                        max_prompt_tokens=limit,
                        constraint=request.constraint,  # NOTE: compiled here, on the submitting thread
                        tools=request.tools,
                    )
            with self.lock:
                if len(self.waiting) + len(requests) > self.max_waiting:
                    raise QueueFullError(
                        f"{len(self.waiting)} requests are waiting, the most this server queues is {self.max_waiting}."
                    )
                self.waiting.extend(requests)
                self.lock.notify()
        except BaseException:
            for request in requests:
                self._unreserve(request)
            raise

    def _unreserve(self, request: Request) -> None:
        reserved, request.reserved = request.reserved, ()
        if reserved:
            self.engine.cache.unreserve(reserved)

    def cancel(self, request: Request) -> None:
        """Stop ``request`` at the next step (a closed stream, say); its slot is freed then."""
        request.cancelled = True
        with self.lock:
            self.lock.notify()

    def call(self, work: Callable[[], Any]) -> Future:
        """Run ``work()`` on the thread that runs the steps, before the next step; its result (or error) comes back
        in the future. For model work outside the completions (embeddings): torch's threads stay on one thread."""
        future: Future = Future()
        with self.lock:
            if len(self._calls) >= self.max_waiting:
                raise QueueFullError(f"{len(self._calls)} calls are waiting for the model; try again in a second.")
            self._calls.append((work, future))
            self.lock.notify()
        return future

    def _run_calls(self) -> None:
        while self._calls:
            with self.lock:
                work, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except Exception as e:  # the caller's error, not the loop's
                    future.set_exception(e)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._calls)

    # --- the loop --------------------------------------------------------------------------------

    def serve_forever(self, until: Callable[[], bool] = lambda: False) -> None:
        """Run steps in this thread whenever there is work, until ``until()`` (checked at least twice a
        second). A failed step never ends the loop: what was running fails, the rest keeps being served.

        Give the model's work one thread, the one that loaded the model where possible: libgomp (torch's
        OpenMP on Linux) turns every parallel region's spin-wait into sleeping once more of its threads
        exist than there are cores, and a second thread that ever ran a parallel torch op keeps its own
        threads for as long as it lives, which slows every step while it does (figures:
        ``benchmarks/README.md``, "Engine CPU facts")."""
        while not until():
            with self.lock:
                if not self.has_work():
                    self.lock.wait(0.5)
                    continue
            try:
                self.step()
            except Exception as error:  # never let the worker die: fail what was running, keep serving
                logger.exception("a scheduler step failed outside the model's forward")
                for request in list(self.running):
                    request.error = error
                    self._finish(request, "error")

    def run_forever(self) -> threading.Thread:
        """:meth:`serve_forever` in a daemon thread of its own."""
        self._thread = threading.Thread(target=self.serve_forever, name="hub-peft-scheduler", daemon=True)
        self._thread.start()
        return self._thread

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def step(self) -> None:
        started = time.perf_counter()
        self._run_calls()
        self._retire_aborted()
        self._admit()
        solo = [r for r in self.running if r.solo]
        if solo:
            self._run_solo(solo)
        ragged = [r for r in self.running if not r.solo]
        try:
            self._forward(ragged)
        except Exception as error:  # a failure in a shared forward: find the culprits one by one
            logger.exception("a batched step failed; retrying its requests one at a time")
            self._isolate(ragged, error)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self, time.perf_counter() - started)

    def _retire_aborted(self) -> None:
        now = time.monotonic()
        with self.lock:
            for queue in (self.waiting, self.running):
                for r in list(queue):
                    if r.finish_reason is None and (r.cancelled or (r.timeout and now - r.submitted > r.timeout)):
                        self._finish(r, "cancelled" if r.cancelled else "timeout")

    def _admit(self) -> None:
        with self.lock:
            while self.waiting:
                request = self.waiting[0]
                if not request.solo and not self.engine.admit(request.gen):
                    break
                self.waiting.popleft()
                self.running.append(request)

    def _forward(self, requests: list[Request]) -> None:
        """One forward: the next prompt chunks (``prefill_budget`` tokens at most, first come first served)
        and one token of every decoding request; then each row whose prompt is all in samples a token."""
        budget, rows = self.prefill_budget, []
        for r in requests:  # admission order
            gen = r.gen
            if r.finish_reason is not None:
                continue
            if not gen.prefilling:
                rows.append((r, 1))
            elif budget > 0 and (budget >= 128 or len(gen.prompt_ids) - gen.cached <= budget):
                n = self.engine.next_chunk(gen, budget)
                rows.append((r, n))
                budget -= n
        if not rows:
            return
        rows.sort(key=lambda row: row[0].gen.slot)
        logits = self.engine.forward_ragged([(r.gen, n) for r, n in rows])
        ready = [b for b, (r, _) in enumerate(rows) if not r.gen.prefilling]  # whole prompt in: a next token
        if not ready:
            return
        drawn = self.engine.sample_rows([rows[b][0].gen for b in ready], logits[ready])
        for b, sampled in zip(ready, drawn, strict=True):
            r = rows[b][0]
            if isinstance(sampled, Exception):  # its grammar failed: this request alone ends
                r.error = sampled
                self._finish(r, "error")
            else:
                self._sampled(r, sampled)

    def _isolate(self, requests: list[Request], error: Exception) -> None:
        """After a failed shared forward, each of its requests runs alone from where it was. Keys/values a
        failed forward wrote lie past ``cached``, so they are simply overwritten; a request that fails alone
        too ends with an error, and nothing is emitted twice."""
        for r in requests:
            if r.finish_reason is not None:
                continue
            gen = r.gen
            try:
                if gen.cached == len(gen.tokens):  # fed, but its token was never sampled
                    gen.cached -= 1
                while True:
                    n = self.engine.next_chunk(gen, self.prefill_budget) if gen.prefilling else 1
                    logits = self.engine.forward_ragged([(gen, n)])
                    if not gen.prefilling:
                        break
                self._sampled(r, self.engine.sample(gen, logits[0]))
            except Exception as e:
                logger.warning("request failed alone too: %s", e)
                r.error = e
                self._finish(r, "error")

    def _run_solo(self, requests: list[Request]) -> None:
        """Requests whose adapter cannot share a forward: the engine's ``generate`` path, whole completions."""
        for r in requests:
            try:
                out = self.engine.generate_static([r.prompt], [r.spec], [r.params], raw=[r.raw])[0]
            except Exception as e:
                r.error = e
                self._finish(r, "error")
                continue
            samples = out.logprobs or [Sampled(token) for token in out.tokens]
            r.generation = Generation([0] * out.prompt_tokens, (), r.params, output=out.tokens, samples=samples)
            self._sampled(r, None)
            if r.finish_reason is None:
                self._finish(r, out.finish_reason)

    # --- per token -------------------------------------------------------------------------------

    def _sampled(self, request: Request, sampled: Sampled | None) -> None:
        """Detokenize, look for stop strings, emit the new text, and retire the request if it ended."""
        gen, params, tokenizer = request.gen, request.params, self.engine.tokenizer
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
        eos = tokenizer.eos_token_id
        text = tokenizer.decode(gen.output, skip_special_tokens=True)
        finish = None
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:  # the text is cut each time, so the earliest stop string wins
                text, finish = text[:at], "stop"
        if finish is None:
            last = gen.output[-1] if gen.output else None
            grammar_done = gen.grammar is not None and gen.grammar.is_stopped()  # nothing may follow
            if (last == eos and not params.ignore_eos) or grammar_done:
                finish = "stop"
            elif len(gen.output) >= params.max_tokens:
                finish = "length"
        request.text = text
        visible = len(text) if finish else _safe_prefix(text, params.stop)
        delta = text[request.emitted : visible] if visible > request.emitted else ""
        request.emitted = max(request.emitted, visible)
        if request.on_update is not None:
            new = [sampled] if sampled is not None else list(gen.samples)
            request.on_update(request, new, delta)
        if finish is not None:
            self._finish(request, finish)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request.generation is not None:
            self.engine.release(request.generation)
        self._unreserve(request)
        with self.lock:
            if request in self.running:
                self.running.remove(request)
            elif request in self.waiting:
                self.waiting.remove(request)
        request.done.set()
        if request.on_finish is not None:
            request.on_finish(request)


def _safe_prefix(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be shown while streaming: not a trailing half character, and not a tail that
    might still become a stop string."""
    end = len(text.rstrip("\ufffd"))
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k : end] == stop[:k]:
                hold = max(hold, k)
                break
    return end - hold
