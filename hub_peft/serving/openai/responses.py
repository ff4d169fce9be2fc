"""What the OpenAI server sends back: error bodies (one mapping from hub_peft's errors to HTTP statuses), the
response of one request whole or streamed (:class:`Answer`), and the body-size guard (:class:`BodyLimit`)."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from ...errors import (
    ApiError,
    HubPeftError,
    IncompatibleAdapterError,
    InvalidInputError,
    NotFoundError,
    PromptTooLongError,
    QueueFullError,
)
from ..request import Request
from ..sampling import Sampled
from ..scheduler import Scheduler
from ..tools import CallStream, Format, parse_calls
from .metrics import Metrics

# NOTE: the one mapping from hub_peft's errors to HTTP statuses; the first class an error is an instance of wins
STATUS = (
    (PromptTooLongError, 413),
    (QueueFullError, 429),
    (NotFoundError, 404),
    (InvalidInputError, 400),
    (HubPeftError, 422),
)


def status_of(error: BaseException) -> int:
    return next((status for kind, status in STATUS if isinstance(error, kind)), 500)


def api_error(error: HubPeftError, param: str | None = None, code: str | None = None) -> ApiError:
    """``error`` as the API's error: its status from :data:`STATUS`, its message with no path of this machine."""
    return ApiError(status_of(error), public(str(error)), param, code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = (
        "invalid_request_error"
        if status in (400, 404, 409, 413, 422)
        else "authentication_error"
        if status in (401, 403)
        else "rate_limit_error"
        if status == 429
        else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code or status}}


# an absolute path of two or more parts (not the path of a URL: no word character, ':' or '/' just before it)
_PATH = re.compile(r"(?<![\w:/.])(?:/[^\s/'\"(),:;]+){2,}/?")


def public(message: str) -> str:
    """``message`` with every absolute filesystem path cut to its last part, for a client to read."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes (by ``Content-Length`` or as it streams in) gets
    an OpenAI-shaped 413 before the app parses any of it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(
            error_body(
                413, f"The request body is over this server's limit of {self.limit} bytes.", code="request_too_large"
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen, refused, started = 0, False, False

        async def limited() -> dict:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not started:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}  # the app stops reading; its own answer is dropped
            return message

        async def guarded(message: dict) -> None:
            nonlocal started
            if not refused:
                started = True
                await send(message)

        try:
            await self.app(scope, limited, guarded)
        except Exception:
            if not refused:
                raise


def http_status(job: Request) -> int:
    """The HTTP status a finished request stands for (499: the client went away)."""
    if job.finish_reason in ("stop", "length"):
        return 200
    if job.finish_reason in ("timeout", "cancelled"):
        return 504 if job.finish_reason == "timeout" else 499
    if isinstance(job.error, (NotFoundError, IncompatibleAdapterError)):
        return status_of(job.error)
    return 500


class Answer:
    """The response of one request (``n`` choices), whole or as server-sent events; with ``tool_names`` (a chat
    that offered tools) the calls in each answer become ``tool_calls``, and ``echo`` goes before a completion's text."""

    def __init__(
        self,
        ident: str,
        created: int,
        model: str,
        chat: bool,
        jobs: list[Request],
        tokenizer,
        metrics: Metrics,
        scheduler: Scheduler,
        *,
        tool_names: set[str] | frozenset[str] = frozenset(),
        call_format: Format = "hermes",
        echo: str = "",
        echo_logprobs: list[Sampled] | None = None,
    ) -> None:
        self.ident, self.created, self.model, self.chat = ident, created, model, chat
        self.jobs, self.tokenizer, self.metrics, self.scheduler = jobs, tokenizer, metrics, scheduler
        self.object = "chat.completion" if chat else "text_completion"
        self.offsets = [0] * len(jobs)  # characters of text already described by completion logprobs
        self.described = [0] * len(jobs)  # tokens already described by logprobs
        self.last_token = [0.0] * len(jobs)
        self.tool_names = set(tool_names)  # functions offered (chat with tools): calls are read out of the answers
        self.echo = echo  # completions with echo: the prompt's text, before each choice's
        self.echo_logprobs = echo_logprobs  # and, asked with logprobs, its tokens' (see Engine.prompt_logprobs)
        self.call_format = call_format
        self.calls = [CallStream(self.tool_names, call_format) for _ in jobs]  # streaming: content and calls per choice

    def _finish_reason(self, job: Request, calls: list[dict] | bool) -> str | None:
        return "tool_calls" if calls and job.finish_reason == "stop" else job.finish_reason

    def _observe(self, job: Request, samples: list[Sampled]) -> None:
        now = time.monotonic()
        if self.last_token[job.row] and samples:
            for _ in samples:
                self.metrics.itl.observe(now - self.last_token[job.row])
        if samples:
            self.last_token[job.row] = now

    def usage(self) -> dict:
        """OpenAI's usage, with the prompt tokens read from the prefix cache (``prompt_tokens_details``)."""
        generation = self.jobs[0].generation
        prompt = len(generation.prompt_ids) if generation else 0
        completion = sum(len(j.tokens) for j in self.jobs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": generation.cached_prompt_tokens if generation else 0},
        }

    def _piece(self, context: list[int], token: int) -> str:
        """The text ``token`` adds after ``context`` (so a completion's pieces add up to its text)."""
        before = self.tokenizer.decode(context[-8:], skip_special_tokens=True) if context else ""
        return self.tokenizer.decode([*context[-8:], token], skip_special_tokens=True)[len(before) :]

    def logprobs(self, job: Request, samples: list[Sampled]) -> dict | None:
        if job.params.logprobs is None:
            return None
        output = job.gen.output
        first = self.described[job.row]
        self.described[job.row] += len(samples)
        entries = []
        for k, s in enumerate(samples, start=first):
            context = output[:k]
            entries.append(
                (self._piece(context, s.token), s.logprob, [(self._piece(context, t), lp) for t, lp in s.top])
            )
        if self.chat:
            return {
                "content": [
                    {
                        "token": t,
                        "logprob": lp,
                        "bytes": list(t.encode()),
                        "top_logprobs": [{"token": tt, "logprob": tl, "bytes": list(tt.encode())} for tt, tl in top],
                    }
                    for t, lp, top in entries
                ]
            }
        return self._text_logprobs(job.row, entries)

    def _text_logprobs(self, row: int, entries: list[tuple[str, float | None, list]]) -> dict:
        """Completions' logprobs shape; ``text_offset`` counts from the start of the choice's text."""
        offsets = []
        for t, _, _ in entries:
            offsets.append(self.offsets[row])
            self.offsets[row] += len(t)
        return {
            "tokens": [t for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) if lp is not None else None for _, lp, top in entries],
            "text_offset": offsets,
        }

    @functools.cached_property
    def _echo_entries(self) -> list[tuple[str, float | None, list]]:
        """The echoed prompt's tokens as text pieces with their logprobs, decoded once for all the choices."""
        samples = self.echo_logprobs or []
        ids = [s.token for s in samples]
        return [
            (self._piece(ids[:k], s.token), s.logprob, [(self._piece(ids[:k], t), lp) for t, lp in s.top])
            for k, s in enumerate(samples)
        ]

    def _echoed(self, job: Request) -> dict | None:
        """The logprobs of the echoed prompt's tokens (the first has none: it follows nothing)."""
        if self.echo_logprobs is None:
            return None
        return self._text_logprobs(job.row, self._echo_entries)

    def _failure(self, job: Request) -> ApiError:
        if job.finish_reason == "timeout":
            return ApiError(504, f"The request ran past the server's timeout of {job.timeout:.0f} s.")
        return ApiError(http_status(job), f"Generation failed: {public(str(job.error))}")

    async def whole(self, events: asyncio.Queue, http) -> dict:
        pending = {id(j) for j in self.jobs}
        try:
            while pending:
                try:
                    job, samples, _ = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if samples is None:
                    pending.discard(id(job))
                else:
                    self._observe(job, samples)
        except asyncio.CancelledError:
            for job in self.jobs:
                self.scheduler.cancel(job)
            raise
        failed = [j for j in self.jobs if j.finish_reason not in ("stop", "length")]
        if failed:
            raise self._failure(failed[0])
        choices = []
        for job in self.jobs:
            content, calls = (
                parse_calls(job.text, self.tool_names, self.call_format) if self.tool_names else (job.text, [])
            )
            echoed = self._echoed(job)
            logprobs = self.logprobs(job, job.gen.samples)
            if echoed is not None and logprobs is not None:
                logprobs = {key: echoed[key] + logprobs[key] for key in logprobs}
            choice: dict[str, Any] = {
                "index": job.row,
                "finish_reason": self._finish_reason(job, calls),
                "logprobs": logprobs,
            }
            if self.chat:
                choice["message"] = {"role": "assistant", "content": content}
                if calls:
                    choice["message"]["tool_calls"] = calls
            else:
                choice["text"] = self.echo + job.text
            choices.append(choice)
        return {
            "id": self.ident,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        body: dict[str, Any] = {
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return {"data": json.dumps(body)}

    def _delta(self, job: Request, content: str, calls: list[dict], logprobs: dict | None) -> dict:
        """A streamed choice: new text, and (chat) tool calls, each whole, numbered in the order they came."""
        choice: dict[str, Any] = {"index": job.row, "finish_reason": None, "logprobs": logprobs}
        if not self.chat:
            choice["text"] = content
            return choice
        delta: dict[str, Any] = {"content": content} if content or not calls else {}
        if calls:
            first = self.calls[job.row].calls - len(calls)
            delta["tool_calls"] = [{"index": first + k, **call} for k, call in enumerate(calls)]
        choice["delta"] = delta
        return choice

    async def stream(self, events: asyncio.Queue, include_usage: bool) -> AsyncIterator[dict]:
        pending = {id(j) for j in self.jobs}
        try:
            if self.chat:
                yield self._chunk(
                    [
                        {
                            "index": j.row,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for j in self.jobs
                    ]
                )
            elif self.echo:
                yield self._chunk(
                    [
                        {"index": j.row, "text": self.echo, "logprobs": self._echoed(j), "finish_reason": None}
                        for j in self.jobs
                    ]
                )
            while pending:
                job, samples, delta = await events.get()
                if samples is None:
                    pending.discard(id(job))
                    if job.finish_reason not in ("stop", "length"):
                        failure = self._failure(job)
                        yield {"data": json.dumps(error_body(failure.status, failure.message))}
                        continue
                    if self.tool_names:  # what the call reader held back
                        content, calls = self.calls[job.row].feed(delta or "", final=True)
                        if content or calls:
                            yield self._chunk([self._delta(job, content, calls, None)])
                    stream = self.calls[job.row]
                    end: dict[str, Any] = {
                        "index": job.row,
                        "finish_reason": self._finish_reason(job, bool(stream.calls)),
                        "logprobs": None,
                    }
                    if self.chat:
                        end["delta"] = {}
                    else:
                        end["text"] = ""
                    yield self._chunk([end])
                    continue
                self._observe(job, samples)
                logprobs = self.logprobs(job, samples)
                content, calls = self.calls[job.row].feed(delta) if self.tool_names else (delta, [])
                if not content and not calls and logprobs is None:
                    continue
                yield self._chunk([self._delta(job, content, calls, logprobs)])
            if include_usage:
                yield self._chunk([], self.usage())
            yield {"data": "[DONE]"}
        finally:
            if pending:  # the client went away: free the slots at the next step
                for job in self.jobs:
                    self.scheduler.cancel(job)
