"""The OpenAI-compatible server over HTTP on loopback (real uvicorn), driven by httpx and by the official openai
SDK: answers equal the engine's single-request answers whatever they are batched with, continuous batching,
the sampling surface, streaming, cancellation, backpressure, errors, admin routes, metrics."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from test_engine import PROMPTS, adapters  # noqa: F401 - module fixture
from test_peft_methods import load_tiny, tiny_base_repo, tiny_llama_config, tiny_tokenizer  # noqa: F401

from hub_peft import push_adapter, save_adapter
from hub_peft.hub.process import free_port
from hub_peft.serving import MultiAdapterModel, SamplingParams, create_app
from hub_peft.serving.scheduler import Request, Scheduler

BASE = "tiny-base"
GREEDY = {"temperature": 0}


@contextlib.contextmanager
def serving(engine, **options):
    import uvicorn

    app = create_app(engine, base_name=BASE, **options)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    # One connection per client thread, none ever closed by the pool: httpcore 1.0.9's pool can close a connection
    # it has already handed to a queued request (encode/httpcore#1110), which a 200-thread load test meets as
    # "ReadError: Bad file descriptor" on the client side, with the server never seeing the request fail.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=None)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as client:
        client.app = app
        yield client
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def engine(adapters):  # noqa: F811
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    for name in ("lora", "reft", "ia3"):
        engine.add(name, adapters[name], pin=True)
    return engine


@pytest.fixture(scope="module")
def server(engine, adapters):  # noqa: F811
    with serving(
        engine,
        allow_hub_pattern="alice/served-*",
        max_prompt_tokens=40,
        admin_token="secret-admin",
        adapter_dirs=[Path(adapters["ia3"]).parent],
    ) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=str(server.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)


@contextlib.contextmanager
def serve_process(*args: str):
    """``hub-peft serve ARGS`` on a free port, started as an operator starts it: yields the process and its URL
    once ``/health`` answers; then SIGTERM, after which it must exit with status 0."""
    import os
    import subprocess
    import sys

    port = free_port()
    command = [sys.executable, "-m", "hub_peft.cli", "serve", "--port", str(port), *args]
    process = subprocess.Popen(command, env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "hub-peft serve did not come up"
            try:
                httpx.get(f"{url}/health", timeout=10).raise_for_status()
                break
            except httpx.TransportError:
                time.sleep(0.3)
        yield process, url
    except BaseException:
        process.kill()
        process.wait(20)
        raise
    process.terminate()  # SIGTERM: the steps stop on the main thread, HTTP shuts down, exit status 0
    assert process.wait(20) == 0, process.stdout.read()


def chat_body(model, content, **extra) -> dict:
    """A greedy 5-token chat request for ``model`` with one user message; ``extra`` sets or replaces fields."""
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 5, **GREEDY, **extra}


def chat(client, model, content, **extra):
    return client.post("/v1/chat/completions", json=chat_body(model, content, **extra))


def reference(engine, prompt, model, n=5, raw=False):
    return engine.generate([prompt], [None if model in (None, BASE) else model], max_new_tokens=n, raw=raw)[0]


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        metric_name, _, rest = head.partition("{")
        if metric_name == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def test_models_lists_the_base_and_the_adapters(server):
    data = server.get("/v1/models").json()["data"]
    assert [(m["id"], m["type"]) for m in data][:4] == [
        (BASE, "base"),
        ("lora", "lora"),
        ("reft", "reft"),
        ("ia3", "ia3"),
    ]
    assert data[1]["commit"] is None and data[1]["key"].startswith("sha256:")  # a folder has no commit
    assert server.get("/openapi.json").json()["paths"]["/v1/chat/completions"]["post"]


def test_concurrent_requests_share_steps_and_each_equals_its_single_reference(server, engine):
    jobs = [(PROMPTS[i % len(PROMPTS)], [None, "lora", "reft", "ia3", BASE][i % 5]) for i in range(20)]
    expected = {(p, m): reference(engine, p, m) for p, m in set(jobs)}
    before = server.get("/metrics").text
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda job: chat(server, job[1], job[0]), jobs))
    for (prompt, model), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["model"] == (model or BASE)
        assert body["choices"][0]["message"]["content"].strip() == expected[prompt, model], (prompt, model)
        assert body["usage"]["completion_tokens"] <= 5
    assert len(set(expected.values())) >= 4, "the adapters should answer differently"
    after = server.get("/metrics").text
    steps = metric(after, "hub_peft:iteration_rows_count") - metric(before, "hub_peft:iteration_rows_count")
    alone = metric(after, "hub_peft:iteration_rows_bucket", le="1.0") - metric(
        before, "hub_peft:iteration_rows_bucket", le="1.0"
    )
    assert steps > alone, "concurrent requests should share engine steps"
    assert metric(after, "hub_peft:requests_total", adapter="reft", status="200") >= 4


def test_usage_counts_the_prompt_tokens_read_from_the_prefix_cache(server, engine):
    """A prompt that shares its first 34 tokens with an earlier one on the same adapter reuses their blocks:
    OpenAI's ``usage.prompt_tokens_details.cached_tokens``, the metric, and the same answer as computed whole."""
    shared = " ".join(f"w{i % 9}" for i in range(34))
    before = metric(server.get("/metrics").text, "hub_peft:prefix_cache_hit_tokens_total")
    bodies = []
    for question in ("a b c", "d e f"):
        response = chat(server, "lora", f"{shared} {question}")
        assert response.status_code == 200, response.text
        bodies.append(response.json())
    first, second = (b["usage"]["prompt_tokens_details"]["cached_tokens"] for b in bodies)
    assert first == 0 and second == 32  # two whole blocks of 16 of the shared tokens
    after = metric(server.get("/metrics").text, "hub_peft:prefix_cache_hit_tokens_total")
    assert after - before == second
    assert bodies[1]["choices"][0]["message"]["content"].strip() == reference(engine, f"{shared} d e f", "lora")


def test_a_short_request_sent_after_a_long_one_finishes_first(server, engine):
    """Continuous batching: the short request joins the running batch at the next step and leaves when it ends."""
    done: dict[str, float] = {}
    first_token = threading.Event()

    def long_request():
        body = chat_body("lora", "a b", max_tokens=40, ignore_eos=True, stream=True)
        with server.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    first_token.set()
        done["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert first_token.wait(30)
    short = chat(server, "reft", PROMPTS[2], max_tokens=2, ignore_eos=True)
    done["short"] = time.monotonic()
    thread.join(60)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 2
    assert done["short"] < done["long"]


def test_streaming_sends_the_same_text_as_server_sent_events(server):
    whole = chat(server, "reft", PROMPTS[1]).json()["choices"][0]["message"]["content"]
    body = chat_body("reft", PROMPTS[1], stream=True, stream_options={"include_usage": True})
    with server.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole and chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_plain_completions_take_the_prompt_as_is(server, engine):
    response = server.post("/v1/completions", json={"model": "lora", "prompt": "a b c", "max_tokens": 4, **GREEDY})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].strip() == reference(engine, "a b c", "lora", 4, raw=True)


def test_the_openai_sdk_and_every_sampling_field(sdk, server, engine):
    prompt = [{"role": "user", "content": PROMPTS[3]}]
    greedy = sdk.chat.completions.create(
        model="lora", messages=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    text = greedy.choices[0].message.content
    assert greedy.choices[0].finish_reason == "length" and greedy.usage.completion_tokens == 8
    assert text.strip() == reference(engine, PROMPTS[3], "lora", 8)

    # stop strings: the text ends before the stop string, also while streaming (never emitted)
    words = text.split()
    stop = " " + words[3]
    cut = sdk.chat.completions.create(model="lora", messages=prompt, max_tokens=8, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[: text.index(stop)]
    stream = sdk.chat.completions.create(
        model="lora",
        messages=prompt,
        max_tokens=8,
        temperature=0,
        stop=stop,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == cut.choices[0].message.content and chunks[-1].usage == cut.usage

    # logprobs: the model's own log-softmax, the top ones sorted
    lp = sdk.chat.completions.create(
        model="lora", messages=prompt, max_completion_tokens=3, temperature=0, logprobs=True, top_logprobs=4
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens == 3
    expected = torch.log_softmax(engine.next_token_logits([PROMPTS[3]], ["lora"])[0], -1)
    assert content[0].logprob == pytest.approx(expected.max().item(), abs=1e-4)
    assert [t.logprob for t in content[0].top_logprobs] == sorted(
        (t.logprob for t in content[0].top_logprobs), reverse=True
    )
    assert len(content[0].top_logprobs) == 4 and content[0].top_logprobs[0].token == content[0].token

    # n, seed, temperature, top_p, top_k, min_p, penalties: seeded sampling is reproducible and varied
    sampling = dict(
        model="lora",
        messages=prompt,
        max_tokens=6,
        temperature=1.3,
        top_p=0.95,
        seed=11,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        n=3,
        extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    first = sdk.chat.completions.create(**sampling)
    again = sdk.chat.completions.create(**sampling)
    texts = [c.message.content for c in first.choices]
    assert len(texts) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices] and len(set(texts)) > 1
    assert first.usage.completion_tokens == 18

    completion = sdk.completions.create(model="reft", prompt="a b c", max_tokens=3, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and "".join(logprobs.tokens) == completion.choices[0].text

    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        sdk.chat.completions.create(model="lora", messages=prompt, logit_bias={"5": 10})
    with pytest.raises(openai.NotFoundError, match="Available"):
        sdk.chat.completions.create(model="nope", messages=prompt)


def test_a_seeded_request_is_batch_invariant(sdk, engine):
    """The same seeded request alone and inside a busy mixed batch of other adapters gives the same text."""
    request = dict(
        model="reft",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=12,
        temperature=1.0,
        seed=1234,
        extra_body={"ignore_eos": True},
    )
    alone = sdk.chat.completions.create(**request).choices[0].message.content

    def other(i):
        return sdk.chat.completions.create(
            model=["lora", "ia3", None, "reft"][i % 4] or BASE,
            messages=[{"role": "user", "content": PROMPTS[i % 6]}],
            max_tokens=10 + i,
            temperature=0.9,
            extra_body={"ignore_eos": True},
        )

    with ThreadPoolExecutor(13) as pool:
        noise = [pool.submit(other, i) for i in range(6)]
        busy = [pool.submit(lambda: sdk.chat.completions.create(**request)) for _ in range(3)]
        noise += [pool.submit(other, i) for i in range(6, 12)]
        texts = [f.result().choices[0].message.content for f in busy]
        [f.result() for f in noise]
    assert texts == [alone] * 3
    with_engine = engine.generate_tokens(
        [request["messages"]],
        ["reft"],
        params=[SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)],
    )[0]
    assert engine.tokenizer.decode(with_engine.tokens, skip_special_tokens=True) == alone


def test_bad_requests_get_clear_errors_in_openais_shape(server):
    unknown = chat(server, "nope", "a")
    assert unknown.status_code == 404 and "Available: ['ia3', 'lora', 'reft', 'tiny-base']" in unknown.text
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert chat(server, "bob/x", "a").status_code == 404  # Hub names outside the allow-list are not loaded
    bad_json = server.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    for field, extra in [
        ("max_tokens", {"max_tokens": 0}),
        ("temperature", {"temperature": 7}),
        ("stream", {"stream": "yes"}),
        ("n", {"n": 0}),
        ("logit_bias", {"logit_bias": {"5": 10}}),
        ("top_logprobs", {"top_logprobs": 3}),
        ("tool_choice", {"tool_choice": "required"}),  # no tools to call
        ("response_format", {"response_format": {"type": "json_schema"}}),  # no schema
        ("structured_outputs", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}),
    ]:
        response = chat(server, "lora", "a", **extra)
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    unsupported = chat(server, "lora", "a", logit_bias={"5": 10}).json()["error"]["message"]
    assert "Unsupported field 'logit_bias'" in unsupported
    no_user = server.post(
        "/v1/chat/completions", json={"model": "lora", "messages": [{"role": "system", "content": "x"}]}
    )
    assert no_user.status_code == 400 and no_user.json()["error"]["param"] == "messages"
    too_long = chat(server, "lora", " ".join(["a"] * 41))
    assert too_long.status_code == 413 and "limit is 40" in too_long.text
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert metric(server.get("/metrics").text, "hub_peft:requests_total", adapter="lora", status="413") >= 1


def test_adapters_load_on_demand_and_through_admin_routes(server, adapters, alice, tmp_path):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    repo = "alice/served-lora"
    push_adapter(adapters["lora"], repo, token=alice)
    response = chat(server, repo, PROMPTS[0])
    assert response.status_code == 200
    assert (
        response.json()["choices"][0]["message"]["content"]
        == (chat(server, "lora", PROMPTS[0]).json()["choices"][0]["message"]["content"])
    )
    assert repo in [m["id"] for m in server.get("/v1/models").json()["data"]]

    assert server.post("/admin/adapters", json={"name": "x", "source": repo}).status_code == 401
    auth = {"authorization": "Bearer secret-admin"}
    assert server.post("/admin/adapters", json={"name": "x", "source": "bob/other"}, headers=auth).status_code == 403
    loaded = server.post("/admin/adapters", json={"name": "again", "source": str(adapters["ia3"])}, headers=auth)
    assert loaded.status_code == 200 and loaded.json()["type"] == "ia3"
    assert server.delete("/admin/adapters/again", headers=auth).json() == {"removed": "again"}
    assert chat(server, "again", "a").status_code == 404

    config = tiny_llama_config(hidden_size=32, max_position_embeddings=2048)
    other = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(target_modules=["q_proj"]))
    folder = str(save_adapter(other, Path(adapters["ia3"]).parent / "other"))  # under the served --adapter-dir
    elsewhere = str(save_adapter(other, tmp_path / "elsewhere"))
    outside = server.post("/admin/adapters", json={"name": "foreign", "source": elsewhere}, headers=auth)
    assert outside.status_code == 403 and "--adapter-dir" in outside.json()["error"]["message"]
    foreign = server.post("/admin/adapters", json={"name": "foreign", "source": folder}, headers=auth)
    assert foreign.status_code == 422 and "this adapter was made for" in foreign.json()["error"]["message"]


def test_admin_routes_are_closed_without_a_token(adapters):  # noqa: F811
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    with serving(engine) as client:
        denied = client.post(
            "/admin/adapters",
            json={"name": "x", "source": str(adapters["lora"])},
            headers={"authorization": "Bearer anything"},
        )
        assert denied.status_code == 403 and "HUB_PEFT_ADMIN_TOKEN" in denied.text
        assert client.delete("/admin/adapters/x").status_code == 403


def test_a_closed_stream_frees_its_slot_and_a_full_queue_answers_429(adapters, monkeypatch):  # noqa: F811
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()), max_running=1)
    engine.add("lora", adapters["lora"])
    step = engine.forward_ragged

    def slow_step(rows):  # 50 ms a step: the held request below runs for seconds, not for a fraction of one
        time.sleep(0.05)
        return step(rows)

    monkeypatch.setattr(engine, "forward_ragged", slow_step)
    with serving(engine, max_waiting=1, request_timeout=30) as client, ThreadPoolExecutor(1) as pool:
        body = chat_body("lora", "a", max_tokens=50, ignore_eos=True, stream=True)
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            [next(lines) for _ in range(4)]  # a few chunks, then the client goes away
        deadline = time.time() + 20
        while client.get("/health").json()["running"]:
            assert time.time() < deadline, "the cancelled request kept its slot"
            time.sleep(0.05)
        # the one slot is free again: a new request runs to its end
        assert chat(client, "lora", "b", max_tokens=3).status_code == 200
        assert metric(client.get("/metrics").text, "hub_peft:requests_total", status="499") == 1

        # a full queue: one request holds the running slot (its stream open), one waits, the next gets 429
        with client.stream("POST", "/v1/chat/completions", json=body) as held:
            next(held.iter_lines())
            waiting = pool.submit(chat, client, "lora", "c", max_tokens=3)
            deadline = time.time() + 20
            while client.get("/health").json()["waiting"] == 0:
                assert time.time() < deadline, "the second request never queued"
                time.sleep(0.01)
            refused = chat(client, "lora", "d", max_tokens=3)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
        assert waiting.result().status_code == 200  # admitted once the held stream closed


def test_a_request_past_its_timeout_ends_with_504(adapters):  # noqa: F811
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    with serving(engine, request_timeout=0.01) as client:  # 55 decode steps take longer than 10 ms
        slow = chat(client, BASE, "a", max_tokens=55, ignore_eos=True)
        assert slow.status_code == 504 and "timeout" in slow.json()["error"]["message"]


def test_a_failing_request_does_not_fail_its_neighbours_and_nothing_is_streamed_twice(adapters):  # noqa: F811
    from hub_peft.serving.cache import CachedCopy

    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    for name in ("lora", "reft", "ia3"):
        engine.add(name, adapters[name])
    engine.add("broken", adapters["lora"])
    scheduler = Scheduler(engine)
    streamed: dict[int, list[int]] = {}

    def update(request, samples, _):
        streamed.setdefault(request.row, []).extend(s.token for s in samples)

    names = ["lora", "broken", "reft", "ia3"]
    jobs = [
        Request(PROMPTS[i], name, SamplingParams(max_tokens=4), row=i, on_update=update) for i, name in enumerate(names)
    ]
    entry = engine.cache.entries["broken"]
    entry.cached = CachedCopy("damaged", entry.kind, entry.folder)  # its own copy of the weights, then damaged
    engine.cache.materialize(entry)
    module, (A, B) = next(iter(entry.payload.weights.items()))
    entry.payload.weights[module] = (A[:-1], B)  # a shape no matmul accepts
    scheduler.submit(*jobs)
    scheduler.run_until_done()
    assert jobs[1].finish_reason == "error" and "shapes cannot be multiplied" in str(jobs[1].error)
    for job in (jobs[0], jobs[2], jobs[3]):
        assert job.error is None and job.finish_reason in ("stop", "length")
        assert job.tokens == engine.generate_tokens([job.prompt], [job.adapter], max_new_tokens=4)[0].tokens
        assert streamed[job.row] == job.tokens
    assert torch.is_grad_enabled()


def test_two_hundred_concurrent_requests_over_sixteen_adapters(adapters, tmp_path):  # noqa: F811
    """A load test on the tiny model: 0 errors, every answer equal to its single-request reference."""
    from test_engine import make_lora

    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    names = []
    for i in range(14):  # 16 adapters in all
        names.append(f"l{i}")
        engine.add(f"l{i}", save_adapter(make_lora(40 + i, 4), tmp_path / f"l{i}"))
    names += ["reft", "ia3"]
    engine.add("reft", adapters["reft"])
    engine.add("ia3", adapters["ia3"])
    jobs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)], 2 + i % 5) for i in range(200)]
    expected = {job: reference(engine, *job) for job in set(jobs)}
    with serving(engine) as client, ThreadPoolExecutor(200) as pool:
        answers = list(pool.map(lambda job: chat(client, job[1], job[0], max_tokens=job[2]), jobs))
    failed = [(i, a.status_code, a.text[:300]) for i, a in enumerate(answers) if a.status_code != 200]
    assert not failed, failed[:3]
    got = [a.json()["choices"][0]["message"]["content"].strip() for a in answers]
    wrong = [(i, jobs[i], got[i], expected[jobs[i]]) for i in range(200) if got[i] != expected[jobs[i]]]
    assert not wrong, wrong[:3]


def test_the_serve_command(adapters, alice, tiny_base_repo, tmp_path, engine):  # noqa: F811
    import os
    import subprocess
    import sys

    commit = push_adapter(adapters["reft"], "alice/served-reft", token=alice).rsplit("/", 1)[-1]
    served = ["--base", tiny_base_repo, "--adapter", f"lora={adapters['lora']}"]
    served += ["--adapter", f"reft=alice/served-reft@{commit}"]
    with serve_process(*served) as (_, url), httpx.Client(base_url=url, timeout=30) as client:
        models = client.get("/v1/models").json()["data"]
        assert {m["id"]: m.get("commit") for m in models}["reft"] == commit
        answer = chat(client, "reft", PROMPTS[1])
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        assert answer.json()["choices"][0]["message"]["content"].strip() == reference(engine, PROMPTS[1], "reft")
    command = [sys.executable, "-m", "hub_peft.cli", "serve", "--adapter", "no-equals-sign"]
    bad = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    assert bad.returncode == 2 and "--adapter takes NAME=REPO_ID[@REVISION]" in bad.stderr
