"""The OpenAI-compatible HTTP API over :class:`MultiAdapterModel` (FastAPI; models in :mod:`.protocol`).

``/v1/chat/completions`` and ``/v1/completions`` (``stream`` as server-sent events, ``n``, ``logprobs``,
``stop``, seeded batch-invariant sampling), ``/v1/models``, ``/metrics`` (Prometheus), ``/health``, and
admin routes to load and unload adapters, closed unless an admin token is configured. Requests run on the
continuous-batching :class:`Scheduler` in one worker thread. Errors have OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field (named in ``param``), 401/403
for admin auth, 404 for an unknown model (the message lists the known ones), 413 for a prompt over
``max_prompt_tokens`` (``code: "context_length_exceeded"``) or a body over ``max_body_bytes``, 422 for an
adapter that cannot load, 429 with ``Retry-After`` when the queue is full, 504 when a request runs past
``request_timeout`` or an adapter's download and checks past ``adapter_load_timeout``.

Everything a client sends is untrusted (see SECURITY.md): a ``model`` is a Hub repo id, never a path, and
is loaded only when it matches ``allow_hub_pattern``; local folders are served only when the operator
loaded them at start or they lie under one of ``adapter_dirs`` (admin route); no filesystem path is shown.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from ..adapters import parse_adapter_spec, parse_hub_spec
from ..errors import HubPeftError, IncompatibleAdapterError, InvalidInputError, NotFoundError
from .engine import MultiAdapterModel, PromptTooLongError
from .metrics import Metrics
from .protocol import AdapterLoad, ChatCompletionRequest, CompletionRequest
from .sampling import Sampled
from .scheduler import QueueFullError, Request, Scheduler

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


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


LOAD_WORKERS = 2  # threads loading adapters (downloads, checks, decoding) at once
MAX_PENDING_LOADS = 16  # adapters loading or waiting for a thread; beyond it a request naming a new one gets 429


def create_app(
    engine: MultiAdapterModel,
    *,
    base_name: str,
    allow_hub_pattern: str | None = None,
    max_prompt_tokens: int = 1024,
    max_waiting: int = 256,
    max_running: int | None = None,
    default_max_tokens: int = 256,
    request_timeout: float = 600.0,
    admin_token: str | None = None,
    start_scheduler: bool = True,
    adapter_dirs: Sequence[str | Path] = (),
    max_body_bytes: int = 4 * 2**20,
    adapter_load_timeout: float = 120.0,
):
    """The FastAPI app. ``allow_hub_pattern`` (fnmatch, e.g. ``"me/*"``) lets ``model`` name Hub repos,
    loaded on demand and through the admin routes; off by default. ``adapter_dirs``: folders whose adapters
    the admin route may load (none by default). ``max_running`` caps the sequences decoding at once (the
    engine's cache slots), ``max_waiting`` the queue behind them. The scheduler (``app.state.scheduler``)
    runs in a thread of its own unless ``start_scheduler`` is False: then call its ``serve_forever()`` from
    the thread that should do the model's work (see there; ``hub-peft serve`` does)."""
    if max_running is not None:
        if engine._kv is not None and max_running != engine.max_running:
            raise InvalidInputError("max_running must be set before the engine runs its first request.")
        engine.max_running = max_running
    scheduler = Scheduler(engine, max_waiting=max_waiting, max_prompt_tokens=max_prompt_tokens)
    metrics = Metrics(engine, scheduler)
    scheduler.on_step = metrics.step
    if start_scheduler:
        scheduler.run_forever()
    tokenizer = engine.tokenizer
    # NOTE(security): a token's text is at most this many characters (byte-level BPE: one per byte), so a
    # prompt of more than max_prompt_tokens × this many characters is over the limit without tokenizing it
    max_token_chars = max(map(len, tokenizer.get_vocab()), default=1) if hasattr(tokenizer, "get_vocab") else 64
    max_prompt_chars = max_prompt_tokens * max_token_chars
    allowed_dirs = [Path(os.path.realpath(d)) for d in adapter_dirs]
    # NOTE(security): adapter loads run on threads of their own: slow or hostile downloads hold at most
    # LOAD_WORKERS of them, never the threads that submit requests; a load that timed out keeps its place in
    # `loading` until its thread ends, so asking for the name again waits for it instead of starting another.
    load_pool = ThreadPoolExecutor(LOAD_WORKERS, thread_name_prefix="hub_peft-load")
    loading: dict[str, asyncio.Future] = {}  # adapters being loaded, by name
    app = FastAPI(title="hub_peft", description=__doc__.split("\n\n")[0], version="1")
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: HttpRequest, e: Exception) -> JSONResponse:  # a bug: say so, show no traceback
        logger.exception("unexpected error")
        return JSONResponse(error_body(500, f"Internal error ({type(e).__name__}); see the server's log."), 500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HttpRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = loc[0] if loc else None
        if first.get("type") == "json_invalid":
            message = f"The request body is not valid JSON ({first.get('msg')})."
        elif first.get("type") == "extra_forbidden":
            message = f"Unsupported field {'.'.join(loc)!r}: this server does not implement it."
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg')}"
        return JSONResponse(error_body(400, message, param), status_code=400)

    # --- model names -----------------------------------------------------------------------------

    async def resolve(model: Any) -> tuple[Any, str]:
        """The engine's adapter spec for ``model`` and its metrics label."""
        if model in (None, "", base_name):
            return None, "base"
        if isinstance(model, dict):  # hub_peft extension: a weighted mix
            for name in model:
                await resolve(name)
            return model, "mix"
        known = {e["name"] for e in engine.loaded()}
        if model in known:
            return model, model
        if isinstance(model, str) and hub_allowed(model):  # REPO[@REVISION][:SUBFOLDER], loaded under that name
            await load(model, *parse_hub_spec(model), hub_only=True, param="model")
            return model, model
        raise ApiError(
            404,
            f"Unknown model {_public(repr(model))}. Available: {sorted(known | {base_name})}.",
            "model",
            "model_not_found",
        )

    def hub_allowed(spec: str) -> bool:
        """Whether ``spec`` (``REPO[@REVISION][:SUBFOLDER]``) names a repo that ``allow_hub_pattern`` lets in."""
        try:
            repo = parse_hub_spec(spec)[0]
        except InvalidInputError:
            return False
        return bool(allow_hub_pattern) and fnmatch.fnmatchcase(repo, allow_hub_pattern)

    def operator_folder(source: str) -> bool:
        """Whether ``source`` is a folder under one of ``adapter_dirs`` (symbolic links resolved first)."""
        real = Path(os.path.realpath(source))
        return real.is_dir() and any(real.is_relative_to(d) for d in allowed_dirs)

    async def load(
        name: str,
        source: str,
        revision: str | None,
        subfolder: str | None = None,
        pin: bool = False,
        hub_only: bool = False,
        param: str = "source",
    ) -> dict:
        # NOTE(security): adapters are untrusted data: download, checks and decoding run on a worker thread,
        # never on the step loop, with a deadline; whatever fails is the adapter's fault (a 4xx that names the
        # problem), and the message never shows a path of this machine.
        work = loading.get(name)
        if work is not None and param != "model":
            raise ApiError(409, f"{name!r} is being loaded; try again when that load ends.", "name")
        if work is None:  # one load per name at a time (requests for it share it); other names load beside it
            if len(loading) >= MAX_PENDING_LOADS:
                raise ApiError(
                    429,
                    f"{len(loading)} adapters are loading; try again in a minute.",
                    param,
                    headers={"Retry-After": "30"},
                )
            call = partial(engine.add, name, source, revision, subfolder=subfolder, pin=pin, hub_only=hub_only)
            work = loading[name] = asyncio.get_running_loop().run_in_executor(load_pool, call)
            work.add_done_callback(lambda done: (loading.pop(name, None), done.cancelled() or done.exception()))
        try:
            return await asyncio.wait_for(asyncio.shield(work), adapter_load_timeout)
        except TimeoutError:
            raise ApiError(
                504,
                f"Loading {name!r} took longer than {adapter_load_timeout:.0f} s; try again later, or "
                "ask the operator to load it at start.",
                param,
            ) from None
        except NotFoundError as e:
            raise ApiError(404, _public(str(e)), param, "model_not_found" if param == "model" else None) from None
        except HubPeftError as e:
            raise ApiError(422, _public(str(e)), param, "invalid_adapter") from None
        except Exception as e:  # a malformed file that slipped past the checks: still the adapter's fault
            logger.warning("adapter %r failed to load: %r", name, e)
            raise ApiError(
                422,
                f"The adapter {name!r} could not be loaded ({type(e).__name__}: {_public(str(e))[:300]}).",
                param,
                "invalid_adapter",
            ) from None

    # --- completions -----------------------------------------------------------------------------

    async def complete(body: ChatCompletionRequest | CompletionRequest, http: HttpRequest, chat: bool):
        try:
            logprobs = body.wanted_logprobs() if chat else body.logprobs
        except ValueError as e:
            raise ApiError(400, str(e), "top_logprobs") from None
        if chat:
            prompt: Any = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
            ]
            if not any(m["role"] == "user" for m in prompt):
                raise ApiError(400, "messages: at least one message must have role 'user'.", "messages")
            max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
        else:
            prompt, max_tokens = body.text(), body.max_tokens or 16
            if not prompt:
                raise ApiError(400, "prompt must be a non-empty string.", "prompt")
        chars = sum(len(m["content"]) for m in prompt) if chat else len(prompt)
        if chars > max_prompt_chars or (chat and len(prompt) > max_prompt_tokens):
            raise ApiError(
                413,
                f"The prompt has {chars} characters in {len(prompt) if chat else 1} message(s), more "
                f"than fit in the limit of {max_prompt_tokens} tokens; shorten it.",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        adapter, label = await resolve(body.model)
        try:
            params = body.sampling(max_tokens, logprobs)
        except InvalidInputError as e:
            raise ApiError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def updated(request: Request, samples: list[Sampled], delta: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (request, samples, delta))

        def finished(request: Request) -> None:  # metrics here: a stream whose client left reads no more events
            metrics.finished(request, _status(request))
            loop.call_soon_threadsafe(events.put_nowait, (request, None, None))

        # choice i samples with seed + i (or its own random noise), so the n choices differ
        jobs = [
            Request(
                prompt,
                adapter,
                replace(params, seed=None if body.seed is None else body.seed + i),
                raw=not chat,
                label=label,
                row=i,
                timeout=request_timeout,
                on_update=updated,
                on_finish=finished,
            )
            for i in range(body.n)
        ]
        try:
            await asyncio.to_thread(scheduler.submit, *jobs)
        except QueueFullError as e:
            metrics.requests.labels(label, "429").inc()
            raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except PromptTooLongError as e:
            metrics.requests.labels(label, "413").inc()
            raise ApiError(413, str(e), "messages" if chat else "prompt", "context_length_exceeded") from None
        except NotFoundError as e:
            raise ApiError(404, str(e), "model") from None
        except InvalidInputError as e:
            raise ApiError(400, str(e)) from None
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        name = body.model if isinstance(body.model, str) and body.model else base_name if not body.model else "mix"
        answer = _Answer(ident, int(time.time()), name, chat, jobs, tokenizer, metrics, scheduler)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(answer.stream(events, include_usage), ping=15, sep="\n")
        return await answer.whole(events, http)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        return await complete(body, http, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        return await complete(body, http, chat=False)

    @app.get("/v1/models")
    async def models():
        data = [{"id": base_name, "object": "model", "owned_by": "hub_peft", "type": "base"}]
        data += [
            {
                "id": e["name"],
                "object": "model",
                "owned_by": "hub_peft",
                "type": e["type"],
                "source": e["source"] if e["commit"] else None,  # a local folder's path is not for clients
                "commit": e["commit"],
                "key": e["key"],
                "bytes": e["bytes"],
                "resident": e["resident"],
            }
            for e in engine.loaded()
        ]
        return {"object": "list", "data": data}

    # --- admin -----------------------------------------------------------------------------------

    def authorize(http: HttpRequest) -> None:
        if admin_token is None:
            raise ApiError(403, "Admin routes are disabled: start the server with HUB_PEFT_ADMIN_TOKEN set.")
        given = http.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
            raise ApiError(401, "Admin routes need 'Authorization: Bearer <admin token>'.")

    @app.post("/admin/adapters")
    async def admin_load(body: AdapterLoad, http: HttpRequest):
        authorize(http)
        try:
            source, revision, subfolder = parse_adapter_spec(body.source)
        except InvalidInputError as e:
            raise ApiError(400, str(e), "source") from None
        for field, given, in_source in (
            ("revision", body.revision, revision),
            ("subfolder", body.subfolder, subfolder),
        ):
            if given is not None and in_source is not None and given != in_source:
                raise ApiError(
                    400, f"{field} is given twice ({in_source!r} in source, {given!r} as {field}); give it once.", field
                )
        if operator_folder(source):
            hub_only = False
        elif hub_allowed(body.source):
            hub_only = True
            source, revision, subfolder = parse_hub_spec(body.source)
        else:
            raise ApiError(
                403,
                f"{body.source!r} is neither under a folder the server was started with "
                f"(--adapter-dir) nor a Hub repo matching --allow-hub-pattern "
                f"({allow_hub_pattern or 'off'}).",
                "source",
            )
        return await load(
            body.name, source, revision or body.revision, subfolder or body.subfolder, pin=body.pin, hub_only=hub_only
        )

    @app.delete("/admin/adapters/{name:path}")
    async def admin_unload(name: str, http: HttpRequest):
        authorize(http)
        try:
            await asyncio.to_thread(engine.remove, name)
        except NotFoundError as e:
            raise ApiError(404, str(e)) from None
        return {"removed": name}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "adapters": len(engine.loaded()),
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
        }

    app.state.scheduler, app.state.metrics = scheduler, metrics
    return app


# an absolute path of two or more parts (not the path of a URL: no word character, ':' or '/' just before it)
_PATH = re.compile(r"(?<![\w:/.])(?:/[^\s/'\"(),:;]+){2,}/?")


def _public(message: str) -> str:
    """``message`` with every absolute filesystem path cut to its last part, for a client to read."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


class _BodyLimit:
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


def _status(job: Request) -> int:
    """The HTTP status a finished request stands for (499: the client went away)."""
    if job.finish_reason in ("stop", "length"):
        return 200
    if job.finish_reason in ("timeout", "cancelled"):
        return 504 if job.finish_reason == "timeout" else 499
    if isinstance(job.error, (NotFoundError, IncompatibleAdapterError)):
        return 404 if isinstance(job.error, NotFoundError) else 422
    return 500


class _Answer:
    """The response of one request (``n`` choices), whole or as server-sent events."""

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
    ) -> None:
        self.ident, self.created, self.model, self.chat = ident, created, model, chat
        self.jobs, self.tokenizer, self.metrics, self.scheduler = jobs, tokenizer, metrics, scheduler
        self.object = "chat.completion" if chat else "text_completion"
        self.offsets = [0] * len(jobs)  # characters of text already described by completion logprobs
        self.described = [0] * len(jobs)  # tokens already described by logprobs
        self.last_token = [0.0] * len(jobs)

    def _observe(self, job: Request, samples: list[Sampled]) -> None:
        now = time.monotonic()
        if self.last_token[job.row] and samples:
            for _ in samples:
                self.metrics.itl.observe(now - self.last_token[job.row])
        if samples:
            self.last_token[job.row] = now

    def usage(self) -> dict:
        prompt = len(self.jobs[0].generation.prompt_ids) if self.jobs[0].generation else 0
        completion = sum(len(j.tokens) for j in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _piece(self, context: list[int], token: int) -> str:
        """The text ``token`` adds after ``context`` (so a completion's pieces add up to its text)."""
        before = self.tokenizer.decode(context[-8:], skip_special_tokens=True) if context else ""
        return self.tokenizer.decode([*context[-8:], token], skip_special_tokens=True)[len(before) :]

    def logprobs(self, job: Request, samples: list[Sampled]) -> dict | None:
        if job.params.logprobs is None:
            return None
        output = job.generation.output
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
        offsets = []
        for t, _, _ in entries:
            offsets.append(self.offsets[job.row])
            self.offsets[job.row] += len(t)
        return {
            "tokens": [t for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(top) for _, _, top in entries],
            "text_offset": offsets,
        }

    def _failure(self, job: Request) -> ApiError:
        if job.finish_reason == "timeout":
            return ApiError(504, f"The request ran past the server's timeout of {job.timeout:.0f} s.")
        return ApiError(_status(job), f"Generation failed: {_public(str(job.error))}")

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
            choice: dict[str, Any] = {
                "index": job.row,
                "finish_reason": job.finish_reason,
                "logprobs": self.logprobs(job, job.generation.samples),
            }
            if self.chat:
                choice["message"] = {"role": "assistant", "content": job.text}
            else:
                choice["text"] = job.text
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
        body = {
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return {"data": json.dumps(body)}

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
            while pending:
                job, samples, delta = await events.get()
                if samples is None:
                    pending.discard(id(job))
                    if job.finish_reason not in ("stop", "length"):
                        failure = self._failure(job)
                        yield {"data": json.dumps(error_body(failure.status, failure.message))}
                        continue
                    end = {"index": job.row, "finish_reason": job.finish_reason, "logprobs": None}
                    end.update({"delta": {}} if self.chat else {"text": ""})
                    yield self._chunk([end])
                    continue
                self._observe(job, samples)
                logprobs = self.logprobs(job, samples)
                if not delta and logprobs is None:
                    continue
                choice = {"index": job.row, "finish_reason": None, "logprobs": logprobs}
                choice.update({"delta": {"content": delta}} if self.chat else {"text": delta})
                yield self._chunk([choice])
            if include_usage:
                yield self._chunk([], self.usage())
            yield {"data": "[DONE]"}
        finally:
            if pending:  # the client went away: free the slots at the next step
                for job in self.jobs:
                    self.scheduler.cancel(job)
