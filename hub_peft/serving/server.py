"""An OpenAI-compatible server over :class:`MultiAdapterModel`: ``/v1/chat/completions``,
``/v1/completions`` (with ``stream``), ``/v1/models``, admin routes to load/unload adapters, and
``/metrics`` in Prometheus text format.

Concurrent requests are gathered by a small scheduler (up to ``max_batch_size`` requests or
``max_wait_ms``) into one mixed-adapter batch. Decoding is greedy, so a request's tokens do not depend
on what it was batched with. Each request is validated before it joins a batch, and if a batch fails
its requests are retried one by one, so one bad request never fails the others.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import queue
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..errors import HubPeftError, IncompatibleAdapterError, InvalidInputError, NotFoundError
from .engine import MultiAdapterModel, Prompt, check_messages


@dataclass
class _Request:
    prompt: Prompt
    adapter: str | dict[str, float] | None
    max_tokens: int
    raw: bool
    label: str  # metrics label: the adapter name, "mix" or the base
    stream: queue.Queue | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Exception | None = None
    queued_at: float = field(default_factory=time.perf_counter)


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (adapter, status) -> count
        self.tokens = 0
        self.latency_sum = 0.0
        self.latency_count = 0
        self.batch_sizes: dict[int, int] = defaultdict(int)
        self.running: dict[str, int] = defaultdict(int)
        self.waiting: dict[str, int] = defaultdict(int)

    def render(self, engine: MultiAdapterModel) -> str:
        lines = ["# TYPE hub_peft_requests_total counter"]
        with self.lock:
            lines += [
                f'hub_peft_requests_total{{adapter="{a}",status="{s}"}} {n}'
                for (a, s), n in sorted(self.requests.items())
            ]
            lines += ["# TYPE hub_peft_generated_tokens_total counter",
                      f"hub_peft_generated_tokens_total {self.tokens}",
                      "# TYPE hub_peft_request_latency_seconds summary",
                      f"hub_peft_request_latency_seconds_sum {self.latency_sum:.6f}",
                      f"hub_peft_request_latency_seconds_count {self.latency_count}",
                      "# TYPE hub_peft_batch_size histogram"]  # fmt: skip
            cumulative = 0
            for bound in (1, 2, 4, 8, 16, 32, 64):
                cumulative += sum(n for size, n in self.batch_sizes.items() if (bound // 2) < size <= bound)
                lines.append(f'hub_peft_batch_size_bucket{{le="{bound}"}} {cumulative}')
            total = sum(self.batch_sizes.values())
            lines += [f'hub_peft_batch_size_bucket{{le="+Inf"}} {total}',
                      f"hub_peft_batch_size_sum {sum(s * n for s, n in self.batch_sizes.items())}",
                      f"hub_peft_batch_size_count {total}", "# TYPE hub_peft_adapter_running gauge"]  # fmt: skip
            lines += [f'hub_peft_adapter_running{{adapter="{a}"}} {n}' for a, n in sorted(self.running.items())]
            lines.append("# TYPE hub_peft_adapter_waiting gauge")
            lines += [f'hub_peft_adapter_waiting{{adapter="{a}"}} {n}' for a, n in sorted(self.waiting.items())]
        loaded = engine.loaded()
        lines += ["# TYPE hub_peft_loaded_adapters gauge", f"hub_peft_loaded_adapters {len(loaded)}",
                  "# TYPE hub_peft_resident_adapters gauge",
                  f"hub_peft_resident_adapters {sum(e['resident'] for e in loaded)}",
                  "# TYPE hub_peft_adapter_bytes gauge",
                  f"hub_peft_adapter_bytes {engine.resident_bytes()}"]  # fmt: skip
        for name in ("hits", "misses", "evictions", "loads"):
            lines += [f"# TYPE hub_peft_adapter_cache_{name}_total counter",
                      f"hub_peft_adapter_cache_{name}_total {engine.stats[name]}"]  # fmt: skip
        return "\n".join(lines) + "\n"


class Scheduler:
    """Gathers queued requests into batches and runs them on the engine in one worker thread."""

    def __init__(self, engine: MultiAdapterModel, metrics: Metrics, *, max_batch_size: int = 8,
                 max_wait_ms: float = 10.0) -> None:  # fmt: skip
        self.engine, self.metrics = engine, metrics
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.queue: queue.Queue[_Request] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="hub-peft-scheduler", daemon=True)
        self.thread.start()

    def submit(self, request: _Request) -> _Request:
        with self.metrics.lock:
            self.metrics.waiting[request.label] += 1
        self.queue.put(request)
        return request

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
            with self.metrics.lock:
                self.metrics.batch_sizes[len(batch)] += 1
                for r in batch:
                    self.metrics.waiting[r.label] -= 1
                    self.metrics.running[r.label] += 1
            try:
                self._run(batch)
            except Exception:  # isolate the failure: retry each request alone
                for r in batch:
                    try:
                        self._run([r])
                    except Exception as e:
                        r.error = e
            finally:
                with self.metrics.lock:
                    for r in batch:
                        self.metrics.running[r.label] -= 1
                for r in batch:
                    if r.stream is not None:
                        r.stream.put(None)
                    r.done.set()

    def _run(self, batch: list[_Request]) -> None:
        def on_token(row: int, token: int) -> None:
            if batch[row].stream is not None:
                batch[row].stream.put(token)

        results = self.engine.generate_tokens([r.prompt for r in batch], [r.adapter for r in batch],
                                              max_new_tokens=[r.max_tokens for r in batch], raw=[r.raw for r in batch],
                                              on_token=on_token)  # fmt: skip
        for r, result in zip(batch, results, strict=True):
            r.result = result


class _HttpError(Exception):
    def __init__(self, status: int, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field_name


def create_app(engine: MultiAdapterModel, *, base_name: str, allow_hub_pattern: str | None = None,
               max_batch_size: int = 8, max_wait_ms: float = 10.0, max_prompt_tokens: int = 1024,
               admin_token: str | None = None):  # fmt: skip
    """The Starlette app. ``allow_hub_pattern`` (fnmatch, e.g. ``"me/*"``) lets ``model`` name Hub repos
    that are then loaded on demand; off by default."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    metrics = Metrics()
    scheduler = Scheduler(engine, metrics, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    tokenizer = engine.tokenizer
    load_lock = threading.Lock()

    def error(status: int, message: str, field_name: str | None = None, **extra: Any) -> JSONResponse:
        body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                          "param": field_name, "code": status, **extra}}  # fmt: skip
        return JSONResponse(body, status_code=status)

    def resolve(model: Any) -> tuple[str | dict | None, str]:
        if model in (None, "", base_name):
            return None, "base"
        if isinstance(model, dict):  # hub_peft extension: a weighted mix
            for name in model:
                resolve(name)
            return model, "mix"
        if not isinstance(model, str):
            raise _HttpError(400, "model must be a string (an adapter name or the base model).", "model")
        known = {e["name"] for e in engine.loaded()}
        if model in known:
            return model, model
        if allow_hub_pattern and fnmatch.fnmatch(model, allow_hub_pattern) and model.count("/") == 1:
            with load_lock:
                if model not in {e["name"] for e in engine.loaded()}:
                    try:
                        engine.add(model, model)
                    except NotFoundError as e:
                        raise _HttpError(404, str(e), "model") from None
                    except HubPeftError as e:
                        raise _HttpError(422, str(e), "model") from None
            return model, model
        raise _HttpError(404, f"Unknown model {model!r}. Available: {sorted(known | {base_name})}.", "model")

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _HttpError(400, f"The request body is not valid JSON ({e}).") from None
        if not isinstance(body, dict):
            raise _HttpError(400, "The request body must be a JSON object.")
        return body

    def check_common(body: dict) -> tuple[int, bool]:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 64))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
            raise _HttpError(400, "max_tokens must be an integer between 1 and 4096.", "max_tokens")
        temperature = body.get("temperature", 0)
        if not isinstance(temperature, (int, float)) or temperature != 0:
            raise _HttpError(400, "This server decodes greedily (so batching never changes an answer): "
                                  "set temperature to 0 or leave it out.", "temperature")  # fmt: skip
        if body.get("n", 1) != 1:
            raise _HttpError(400, "Only n=1 is supported.", "n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _HttpError(400, "stream must be true or false.", "stream")
        return max_tokens, stream

    async def complete(request: Request, chat: bool):
        started = time.perf_counter()
        label = "unknown"
        try:
            body = await body_of(request)
            max_tokens, stream = check_common(body)
            if chat:
                messages = body.get("messages")
                try:
                    check_messages(messages)
                except InvalidInputError as e:
                    raise _HttpError(400, f"messages: {e}", "messages") from None
                prompt: Prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
                raw = False
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if not isinstance(prompt, str) or not prompt:
                    raise _HttpError(400, "prompt must be a non-empty string.", "prompt")
                raw = True
            adapter, label = await asyncio.to_thread(resolve, body.get("model"))
            texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
            n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
            if n_tokens > max_prompt_tokens:
                raise _HttpError(413, f"The prompt is {n_tokens} tokens; the limit is {max_prompt_tokens}.", "prompt")
        except _HttpError as e:
            with metrics.lock:
                metrics.requests[label, str(e.status)] += 1
            return error(e.status, e.message, e.field)
        job = _Request(prompt, adapter, max_tokens, raw, label, stream=queue.Queue() if stream else None)
        scheduler.submit(job)
        model_name = body.get("model") or base_name
        created, ident = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            return StreamingResponse(_sse(job, chat, model_name, created, ident, started),
                                     media_type="text/event-stream")  # fmt: skip
        await asyncio.to_thread(job.done.wait)
        return _finish(job, chat, model_name, created, ident, started)

    def _record(job: _Request, started: float) -> None:
        with metrics.lock:
            metrics.latency_sum += time.perf_counter() - started
            metrics.latency_count += 1
            metrics.requests[job.label, "200" if job.error is None else "500"] += 1
            if job.result is not None:
                metrics.tokens += len(job.result.tokens)

    def _finish(job: _Request, chat: bool, model_name, created, ident, started):
        _record(job, started)
        if job.error is not None:
            status = (
                404 if isinstance(job.error, NotFoundError) else 422 if isinstance(job.error, HubPeftError) else 500
            )
            return error(status, f"Generation failed: {job.error}")
        text = tokenizer.decode(job.result.tokens, skip_special_tokens=True)
        usage = {"prompt_tokens": job.result.prompt_tokens, "completion_tokens": len(job.result.tokens),
                 "total_tokens": job.result.prompt_tokens + len(job.result.tokens)}  # fmt: skip
        choice: dict[str, Any] = {"index": 0, "finish_reason": job.result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text.strip()}
        else:
            choice["text"] = text
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": model_name, "choices": [choice], "usage": usage})  # fmt: skip

    async def _sse(job: _Request, chat: bool, model_name, created, ident, started):
        obj = "chat.completion.chunk" if chat else "text_completion"
        tokens: list[int] = []
        sent = ""

        def chunk(delta: dict | str, finish: str | None) -> str:
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"delta": delta} if chat else {"text": delta})
            return "data: " + json.dumps({"id": ident, "object": obj, "created": created, "model": model_name,
                                          "choices": [choice]}) + "\n\n"  # fmt: skip

        if chat:
            yield chunk({"role": "assistant", "content": ""}, None)
        while (token := await asyncio.to_thread(job.stream.get)) is not None:
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            piece, sent = text[len(sent) :], text
            if piece:
                yield chunk({"content": piece} if chat else piece, None)
        await asyncio.to_thread(job.done.wait)
        _record(job, started)
        if job.error is not None:
            yield "data: " + json.dumps({"error": {"message": str(job.error)}}) + "\n\n"
        else:
            yield chunk({} if chat else "", job.result.finish_reason)
        yield "data: [DONE]\n\n"

    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    async def completions(request: Request):
        return await complete(request, chat=False)

    async def models(request: Request):
        data = [{"id": base_name, "object": "model", "owned_by": "hub_peft", "type": "base"}]
        data += [{"id": e["name"], "object": "model", "owned_by": "hub_peft", "type": e["type"],
                  "source": e["source"], "commit": e["commit"], "bytes": e["bytes"], "resident": e["resident"]}
                 for e in engine.loaded()]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    def authorized(request: Request) -> bool:
        return admin_token is None or request.headers.get("authorization") == f"Bearer {admin_token}"

    async def admin_load(request: Request):
        if not authorized(request):
            return error(401, "Admin routes need 'Authorization: Bearer <admin token>'.")
        try:
            body = await body_of(request)
        except _HttpError as e:
            return error(e.status, e.message)
        name, source = body.get("name"), body.get("source")
        if not isinstance(name, str) or not name or not isinstance(source, str) or not source:
            return error(400, "Give 'name' and 'source' (a repo id or folder), and optionally 'revision'.", "source")
        try:
            info = await asyncio.to_thread(engine.add, name, source, body.get("revision"), pin=bool(body.get("pin")))
        except NotFoundError as e:
            return error(404, str(e), "source")
        except (IncompatibleAdapterError, InvalidInputError, HubPeftError) as e:
            return error(422, str(e), "source")
        return JSONResponse(info)

    async def admin_unload(request: Request):
        if not authorized(request):
            return error(401, "Admin routes need 'Authorization: Bearer <admin token>'.")
        try:
            await asyncio.to_thread(engine.remove, request.path_params["name"])
        except NotFoundError as e:
            return error(404, str(e))
        return JSONResponse({"removed": request.path_params["name"]})

    async def metrics_route(request: Request):
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    async def health(request: Request):
        return JSONResponse({"status": "ok", "adapters": len(engine.loaded())})

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/admin/adapters", admin_load, methods=["POST"]),
        Route("/admin/adapters/{name:path}", admin_unload, methods=["DELETE"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ])  # fmt: skip
