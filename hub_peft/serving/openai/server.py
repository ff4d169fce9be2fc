"""The OpenAI-compatible HTTP API over the engine (FastAPI; models in :mod:`.protocol`,
responses in :mod:`.responses`).

As vLLM lays out its server: :class:`OpenAIServer` holds the state and does the work (resolve a model name,
load an adapter, submit a completion); the routes are thin functions that hand it the parsed request.

``/v1/chat/completions`` and ``/v1/completions`` (``stream`` as server-sent events, ``n``, ``logprobs``,
``stop``, seeded batch-invariant sampling, structured output, tools), ``/v1/embeddings``, ``/v1/models``,
``/metrics`` (Prometheus), ``/health``, and admin routes to load and unload adapters (hub_peft's
``/admin/adapters`` and vLLM's ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``), closed unless an admin
token is configured. Requests run on the continuous-batching :class:`Scheduler` in one worker thread.
Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field (named in
``param``), 401/403 for admin auth, 404 for an unknown model (the message lists the known ones), 413 for a prompt over
``max_prompt_tokens`` (``code: "context_length_exceeded"``) or a body over ``max_body_bytes``, 422 for an
adapter that cannot load, 429 with ``Retry-After`` when the queue is full, 504 when a request runs past
``request_timeout`` or an adapter's download and checks past ``adapter_load_timeout``.

Everything a client sends is untrusted (see SECURITY.md): a ``model`` is a Hub repo id, never a path, and
is loaded only when it matches ``allow_hub_pattern``; local folders are served only when the operator
loaded them at start or they lie under one of ``adapter_dirs`` (admin route); no filesystem path is shown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hmac
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette.sse import EventSourceResponse

from ...adapters import parse_adapter_spec, parse_hub_spec
from ...errors import (
    ApiError,
    ConstraintError,
    HubPeftError,
    InvalidInputError,
    NotFoundError,
    PromptTooLongError,
    QueueFullError,
)
from ..offline import MultiAdapterModel
from ..request import Request
from ..sampling import Sampled
from ..scheduler import Scheduler
from ..structured import Constraint
from ..tools import call_format
from .metrics import Metrics
from .protocol import (
    AdapterLoad,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    LoadLoraAdapter,
    MergeOptions,
    UnloadLoraAdapter,
)
from .responses import Answer, BodyLimit, api_error, error_body, http_status, public
from .settings import ServerSettings

logger = logging.getLogger(__name__)

LOAD_WORKERS = 2  # threads loading adapters (downloads, checks, decoding) at once
MAX_PENDING_LOADS = 16  # adapters loading or waiting for a thread; beyond it a request naming a new one gets 429


class OpenAIServer:
    """The server's state and work, for the routes of :func:`create_app` (see there for the options)."""

    def __init__(self, engine: MultiAdapterModel, settings: ServerSettings) -> None:
        self.engine, self.settings = engine, settings
        max_prompt_tokens = settings.max_prompt_tokens
        self.scheduler = Scheduler(engine, max_waiting=settings.max_waiting, max_prompt_tokens=max_prompt_tokens)
        self.metrics = Metrics(engine, self.scheduler)
        self.scheduler.on_step = self.metrics.step
        tokenizer = self.tokenizer = engine.tokenizer
        self.call_format = call_format(tokenizer)  # how the chat template asks for tool calls (see ..tools)
        # NOTE(security): a token's text is at most this many characters (byte-level BPE: one per byte), so a
        # prompt of more than max_prompt_tokens × this many characters is over the limit without tokenizing it
        max_token_chars = max(map(len, tokenizer.get_vocab()), default=1) if hasattr(tokenizer, "get_vocab") else 64
        self.max_prompt_chars = max_prompt_tokens * max_token_chars
        self.allowed_dirs = [Path(os.path.realpath(d)) for d in settings.adapter_dirs]
        # NOTE(security): adapter loads run on threads of their own: slow or hostile downloads hold at most
        # LOAD_WORKERS of them, never the threads that submit requests; a load that timed out keeps its place in
        # `loading` until its thread ends, so asking for the name again waits for it instead of starting another.
        self.load_pool = ThreadPoolExecutor(LOAD_WORKERS, thread_name_prefix="hub_peft-load")
        self.loading: dict[str, asyncio.Future] = {}  # adapters being loaded, by name
        self.merge_root: Path | None = None  # where per-request merges are written (a private temporary folder)

    # --- model names -----------------------------------------------------------------------------

    async def resolve(self, model: Any) -> tuple[Any, str]:
        """The engine's adapter spec for ``model`` and its metrics label."""
        if model in (None, "", self.settings.base_name):
            return None, "base"
        if isinstance(model, dict):  # hub_peft extension: a weighted mix
            for name in model:
                await self.resolve(name)
            return model, "mix"
        known = {e["name"] for e in self.engine.cache.loaded()}
        if model in known:
            return model, model
        if isinstance(model, str) and self.hub_allowed(model):  # REPO[@REVISION][:SUBFOLDER], loaded under that name
            await self.load(model, *parse_hub_spec(model), hub_only=True, param="model")
            return model, model
        raise ApiError(
            404,
            f"Unknown model {public(repr(model))}. Available: {sorted(known | {self.settings.base_name})}.",
            "model",
            "model_not_found",
        )

    async def merged(self, mix: Any, options: MergeOptions) -> str:
        """The name of ``mix`` merged with ``options`` (merged and loaded first when new, on a load thread with the
        adapter-load deadline, as ``hub-peft merge`` merges: the same tensors)."""
        from ...bridges.merge import MergeSpec

        if not isinstance(mix, dict):
            raise ApiError(400, 'merge needs model to be a mix of adapters, such as {"a": 0.6, "b": 0.4}.', "merge")
        try:
            spec = MergeSpec(**options.model_dump())
            name = self.engine.cache.merge_name(mix, spec)
        except HubPeftError as e:
            raise ApiError(400, public(str(e)), "merge") from None
        if spec.method not in self.settings.merge_methods:
            allowed = ", ".join(self.settings.merge_methods) or "none"
            raise ApiError(
                400,
                f"This server merges per request with {allowed}, not {spec.method}: merge offline with `hub-peft "
                "merge` and load the result, or ask the operator to allow it (--merge-methods).",
                "merge",
            )
        if name not in self.engine.cache.entries:
            if self.merge_root is None:
                self.merge_root = Path(tempfile.mkdtemp(prefix="hub_peft_merges_"))  # private to this process
            await self.load(name, "", None, param="merge", work=partial(self.engine.merge, mix, spec, self.merge_root))
        return name

    def close(self) -> None:
        """At shutdown: remove the per-request merges' folder (the adapters in it live in memory until then)."""
        if self.merge_root is not None:
            shutil.rmtree(self.merge_root, ignore_errors=True)

    def hub_allowed(self, spec: str) -> bool:
        """Whether ``spec`` (``REPO[@REVISION][:SUBFOLDER]``) names a repo that ``allow_hub_pattern`` lets in."""
        try:
            repo = parse_hub_spec(spec)[0]
        except InvalidInputError:
            return False
        pattern = self.settings.allow_hub_pattern
        return bool(pattern) and fnmatch.fnmatchcase(repo, pattern or "")

    def operator_folder(self, source: str) -> bool:
        """Whether ``source`` is a folder under one of ``adapter_dirs`` (symbolic links resolved first)."""
        real = Path(os.path.realpath(source))
        return real.is_dir() and any(real.is_relative_to(d) for d in self.allowed_dirs)

    async def load(
        self,
        name: str,
        source: str,
        revision: str | None,
        subfolder: str | None = None,
        pin: bool = False,
        hub_only: bool = False,
        param: str = "source",
        work: Any = None,
    ) -> Any:
        # NOTE(security): adapters are untrusted data: download, checks and decoding run on a worker thread,
        # never on the step loop, with a deadline; whatever fails is the adapter's fault (a 4xx that names the
        # problem), and the message never shows a path of this machine.
        call = work or partial(self.engine.add, name, source, revision, subfolder=subfolder, pin=pin, hub_only=hub_only)
        work = self.loading.get(name)
        if work is not None and param not in ("model", "merge"):
            raise ApiError(409, f"{name!r} is being loaded; try again when that load ends.", "name")
        if work is None:  # one load per name at a time (requests for it share it); other names load beside it
            if len(self.loading) >= MAX_PENDING_LOADS:
                raise ApiError(
                    429,
                    f"{len(self.loading)} adapters are loading; try again in a minute.",
                    param,
                    headers={"Retry-After": "30"},
                )
            work = self.loading[name] = asyncio.get_running_loop().run_in_executor(self.load_pool, call)
            work.add_done_callback(lambda done: (self.loading.pop(name, None), done.cancelled() or done.exception()))
        try:
            return await asyncio.wait_for(asyncio.shield(work), self.settings.adapter_load_timeout)
        except TimeoutError:
            raise ApiError(
                504,
                f"Loading {name!r} took longer than {self.settings.adapter_load_timeout:.0f} s; try again later, or "
                "ask the operator to load it at start.",
                param,
            ) from None
        except NotFoundError as e:
            raise api_error(e, param, "model_not_found" if param == "model" else None) from None
        except HubPeftError as e:  # whatever else fails is the adapter's fault, whichever class says so
            raise ApiError(422, public(str(e)), param, "invalid_adapter") from None
        except Exception as e:  # a malformed file that slipped past the checks: still the adapter's fault
            logger.warning("adapter %r failed to load: %r", name, e)
            raise ApiError(
                422,
                f"The adapter {name!r} could not be loaded ({type(e).__name__}: {public(str(e))[:300]}).",
                param,
                "invalid_adapter",
            ) from None

    # --- completions -----------------------------------------------------------------------------

    def prompt_of(self, body: ChatCompletionRequest | CompletionRequest, chat: bool) -> tuple[Any, int]:
        """The engine's prompt (text, or chat messages) and ``max_tokens`` of a request, its length checked by
        characters before anything is tokenized."""
        if isinstance(body, ChatCompletionRequest):
            prompt: Any = [_engine_message(m, i) for i, m in enumerate(body.messages)]
            if not any(m["role"] == "user" for m in prompt):
                raise ApiError(400, "messages: at least one message must have role 'user'.", "messages")
            max_tokens = body.max_completion_tokens or body.max_tokens or self.settings.default_max_tokens
        else:
            prompt, max_tokens = body.text(), body.max_tokens or 16
            if not prompt:
                raise ApiError(400, "prompt must be a non-empty string.", "prompt")
        chars = (
            sum(len(m["content"] or "") + len(str(m.get("tool_calls") or "")) for m in prompt) if chat else len(prompt)
        )
        if isinstance(body, ChatCompletionRequest) and body.tools:
            chars += sum(len(t.model_dump_json()) for t in body.tools)
        if chars > self.max_prompt_chars or (chat and len(prompt) > self.settings.max_prompt_tokens):
            raise ApiError(
                413,
                f"The prompt has {chars} characters in {len(prompt) if chat else 1} message(s), more "
                f"than fit in the limit of {self.settings.max_prompt_tokens} tokens; shorten it.",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        return prompt, max_tokens

    def structure_of(
        self, body: ChatCompletionRequest | CompletionRequest
    ) -> tuple[Constraint | None, list[dict] | None, str]:
        """What a request's answer must match, the tools shown to the model, and the field a constraint's error
        names (a schema or grammar is compiled later, at submission, off the event loop)."""
        forced = isinstance(body, ChatCompletionRequest) and body.tool_choice not in (None, "none", "auto")
        field = "tool_choice" if forced else "structured_outputs" if body.structured_outputs else "response_format"
        try:
            constraint = (
                body.constraint(self.call_format) if isinstance(body, ChatCompletionRequest) else body.constraint()
            )
        except (ValueError, InvalidInputError) as e:
            raise ApiError(400, str(e), field) from None
        return constraint, body.offered_tools() if isinstance(body, ChatCompletionRequest) else None, field

    async def complete(self, body: ChatCompletionRequest | CompletionRequest, http: HttpRequest, chat: bool):
        try:
            logprobs = body.wanted_logprobs() if isinstance(body, ChatCompletionRequest) else body.logprobs
        except ValueError as e:
            raise ApiError(400, str(e), "top_logprobs") from None
        prompt, max_tokens = self.prompt_of(body, chat)
        constraint, tools, field = self.structure_of(body)
        adapter, label = await self.resolve(body.model)
        if body.merge is not None:
            adapter, label = await self.merged(adapter, body.merge), "merge"
        echoed = None
        if isinstance(body, CompletionRequest) and body.echo and logprobs is not None:  # the prompt's logprobs
            limit = self.settings.max_prompt_tokens
            try:
                work = partial(self.engine.prompt_logprobs, prompt, adapter, logprobs, max_prompt_tokens=limit)
                echoed = await asyncio.wrap_future(self.scheduler.call(work))
            except HubPeftError as e:
                raise _submission_error(e, chat) from None
        try:
            params = body.sampling(max_tokens, logprobs)
        except InvalidInputError as e:
            raise ApiError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def updated(request: Request, samples: list[Sampled], delta: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (request, samples, delta))

        def finished(request: Request) -> None:  # metrics here: a stream whose client left reads no more events
            self.metrics.finished(request, http_status(request))
            loop.call_soon_threadsafe(events.put_nowait, (request, None, None))

        # choice i samples with seed + i (or its own random noise), so the n choices differ
        jobs = [
            Request(
                prompt,
                adapter,
                replace(params, seed=None if body.seed is None else body.seed + i),
                raw=not chat,
                constraint=constraint,
                tools=tools,
                label=label,
                row=i,
                timeout=self.settings.request_timeout,
                on_update=updated,
                on_finish=finished,
            )
            for i in range(body.n)
        ]
        try:
            await asyncio.to_thread(self.scheduler.submit, *jobs)
        except HubPeftError as e:
            error = api_error(e, field) if isinstance(e, ConstraintError) else _submission_error(e, chat)
            if error.status in (413, 429):
                self.metrics.requests.labels(label, str(error.status)).inc()
            raise error from None
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        base_name = self.settings.base_name
        name = body.model if isinstance(body.model, str) and body.model else base_name if not body.model else "mix"
        answer = Answer(
            ident,
            int(time.time()),
            name,
            chat,
            jobs,
            self.tokenizer,
            self.metrics,
            self.scheduler,
            tool_names={t["function"]["name"] for t in tools or []},
            call_format=self.call_format,
            echo=prompt if isinstance(body, CompletionRequest) and body.echo else "",
            echo_logprobs=echoed,
        )
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(answer.stream(events, include_usage), ping=15, sep="\n")
        return await answer.whole(events, http)

    async def embed(self, body: EmbeddingRequest) -> dict:
        """``/v1/embeddings``: last-token, L2-normalized (see :meth:`.engine.Engine.embed`), run on the step thread."""
        texts = body.texts()
        if any(len(t) > self.max_prompt_chars for t in texts):
            raise ApiError(413, "An input is longer than fits in max_prompt_tokens; shorten it.", "input")
        adapter, _ = await self.resolve(body.model)
        work = partial(self.engine.embed, texts, adapter, max_prompt_tokens=self.settings.max_prompt_tokens)
        try:  # tokenized once, on the step thread, each input's length checked before any forward
            future = self.scheduler.call(work)
            vectors, tokens = await asyncio.wait_for(asyncio.wrap_future(future), self.settings.request_timeout)
        except PromptTooLongError as e:
            raise api_error(e, "input", "context_length_exceeded") from None
        except HubPeftError as e:
            raise api_error(e, "model" if isinstance(e, NotFoundError) else "input") from None
        data = [
            {"object": "embedding", "index": i, "embedding": _embedding(v, body.encoding_format)}
            for i, v in enumerate(vectors.tolist())
        ]
        model = body.model if isinstance(body.model, str) and body.model else self.settings.base_name
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def _embedding(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()  # OpenAI's base64: float32 LE


def _engine_message(message: ChatMessage, index: int) -> dict:
    """An API message as the engine takes it: text content, an assistant's calls with their arguments parsed."""
    role = "system" if message.role == "developer" else message.role
    if message.tool_calls and role != "assistant":
        raise ApiError(400, f"messages[{index}]: only assistant messages carry tool_calls.", "messages")
    out: dict[str, Any] = {"role": role, "content": message.text()}
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ApiError(
                    400,
                    f"messages[{index}].tool_calls: the arguments of {call.id!r} are not a JSON object.",
                    "messages",
                )
            calls.append(
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}
            )
        out["tool_calls"], out["content"] = calls, message.text() or None
    elif message.content is None:
        raise ApiError(
            400, f"messages[{index}]: content is required (only an assistant's tool call may omit it).", "messages"
        )
    if role == "tool":
        out["tool_call_id"] = message.tool_call_id
    return out


def _submission_error(error: HubPeftError, chat: bool) -> ApiError:
    if isinstance(error, QueueFullError):
        return ApiError(429, str(error), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(error, PromptTooLongError):
        return api_error(error, "messages" if chat else "prompt", "context_length_exceeded")
    return api_error(error, "model" if isinstance(error, NotFoundError) else None)


# --- the app -------------------------------------------------------------------------------------

router = APIRouter()


def _server(http: HttpRequest) -> OpenAIServer:
    return http.app.state.server


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
    return await _server(http).complete(body, http, chat=True)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, http: HttpRequest):
    return await _server(http).complete(body, http, chat=False)


@router.get("/v1/models")
async def models(http: HttpRequest):
    server = _server(http)
    base = {"id": server.settings.base_name, "object": "model", "owned_by": "hub_peft", "type": "base"}
    data: list[dict[str, Any]] = [base]
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
        for e in server.engine.cache.loaded()
    ]
    return {"object": "list", "data": data}


def _authorize(http: HttpRequest) -> OpenAIServer:
    server = _server(http)
    if server.settings.admin_token is None:
        raise ApiError(403, "Admin routes are disabled: start the server with HUB_PEFT_ADMIN_TOKEN set.")
    given = http.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {server.settings.admin_token}".encode()):
        raise ApiError(401, "Admin routes need 'Authorization: Bearer <admin token>'.")
    return server


def _admitted_source(server: OpenAIServer, spec: str, param: str) -> tuple[str, str | None, str | None, bool]:
    """``(source, revision, subfolder, hub_only)`` of an adapter an admin asks to load: a folder under
    ``adapter_dirs`` or a Hub repo that ``allow_hub_pattern`` lets in (403 otherwise)."""
    try:
        source, revision, subfolder = parse_adapter_spec(spec)
    except InvalidInputError as e:
        raise ApiError(400, str(e), param) from None
    if server.operator_folder(source):
        return source, revision, subfolder, False
    if server.hub_allowed(spec):
        return *parse_hub_spec(spec), True
    raise ApiError(
        403,
        f"{spec!r} is neither under a folder the server was started with (--adapter-dir) nor a Hub "
        f"repo matching --allow-hub-pattern ({server.settings.allow_hub_pattern or 'off'}).",
        param,
    )


@router.post("/admin/adapters")
async def admin_load(body: AdapterLoad, http: HttpRequest):
    server = _authorize(http)
    source, revision, subfolder, hub_only = _admitted_source(server, body.source, "source")
    for field, given, in_source in (("revision", body.revision, revision), ("subfolder", body.subfolder, subfolder)):
        if given is not None and in_source is not None and given != in_source:
            raise ApiError(
                400, f"{field} is given twice ({in_source!r} in source, {given!r} as {field}); give it once.", field
            )
    return await server.load(
        body.name, source, revision or body.revision, subfolder or body.subfolder, pin=body.pin, hub_only=hub_only
    )


# NOTE(vllm-compat): vLLM's runtime adapter routes, same bodies and plain-text answers, so tools written for
# vLLM (VLLM_ALLOW_RUNTIME_LORA_UPDATING) work unchanged; here they need the admin token, like /admin/adapters.
@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapter, http: HttpRequest):
    server = _authorize(http)
    if not body.load_inplace and body.lora_name in {e["name"] for e in server.engine.cache.loaded()}:
        raise ApiError(400, f"The lora adapter '{body.lora_name}' has already been loaded.", "lora_name")
    source, revision, subfolder, hub_only = _admitted_source(server, body.lora_path, "lora_path")
    await server.load(body.lora_name, source, revision, subfolder, hub_only=hub_only, param="lora_path")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapter, http: HttpRequest):
    server = _authorize(http)
    try:
        await asyncio.to_thread(server.engine.remove, body.lora_name)
    except NotFoundError:
        raise ApiError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "lora_name") from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, http: HttpRequest):
    return await _server(http).embed(body)


@router.delete("/admin/adapters/{name:path}")
async def admin_unload(name: str, http: HttpRequest):
    server = _authorize(http)
    try:
        await asyncio.to_thread(server.engine.remove, name)
    except NotFoundError as e:
        raise api_error(e) from None
    return {"removed": name}


@router.get("/metrics")
async def metrics_route(http: HttpRequest):
    return Response(_server(http).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/health")
async def health(http: HttpRequest):
    server = _server(http)
    return {
        "status": "ok",
        "adapters": len(server.engine.cache.loaded()),
        "running": len(server.scheduler.running),
        "waiting": len(server.scheduler.waiting),
    }


async def _api_error(_: HttpRequest, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)


async def _unexpected(_: HttpRequest, e: Exception) -> JSONResponse:  # a bug: say so, show no traceback
    logger.exception("unexpected error")
    return JSONResponse(error_body(500, f"Internal error ({type(e).__name__}); see the server's log."), 500)


async def _invalid(_: HttpRequest, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
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


def create_app(
    engine: MultiAdapterModel,
    settings: ServerSettings | None = None,
    *,
    start_scheduler: bool = True,
    **options: Any,
) -> FastAPI:
    """The FastAPI app over ``engine`` with ``settings`` (:class:`.ServerSettings`; ``options`` replace its
    fields by name, e.g. ``create_app(engine, base_name="me/base", max_waiting=16)``). The scheduler
    (``app.state.scheduler``) runs in a thread of its own unless ``start_scheduler`` is False: then call its
    ``serve_forever()`` from the thread that should do the model's work (see there; ``hub-peft serve`` does)."""
    try:
        settings = ServerSettings(**options) if settings is None else replace(settings, **options)
    except TypeError as e:
        raise InvalidInputError(f"{e}: create_app's options are the fields of ServerSettings.") from None
    if settings.max_running is not None:
        if engine.started and settings.max_running != engine.max_running:
            raise InvalidInputError("max_running must be set before the engine runs its first request.")
        engine.max_running = settings.max_running
    server = OpenAIServer(engine, settings)
    if start_scheduler:
        server.scheduler.run_forever()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.close()

    app = FastAPI(title="hub_peft", description=__doc__.split("\n\n")[0], version="1", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.include_router(router)
    app.state.server, app.state.scheduler, app.state.metrics = server, server.scheduler, server.metrics
    return app
