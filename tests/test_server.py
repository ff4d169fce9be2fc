"""The OpenAI-compatible server, over HTTP on loopback: answers equal the engine's single-request answers
whatever they are batched with, streaming, on-demand Hub loading, errors, metrics."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from test_engine import PROMPTS, adapters  # noqa: F401 - module fixture
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401

from hub_peft import push_adapter, save_adapter
from hub_peft.hub.process import free_port
from hub_peft.serving import MultiAdapterModel, create_app
from hub_peft.serving.server import Metrics, Scheduler, _Request

BASE = "tiny-base"


@pytest.fixture(scope="module")
def engine(adapters):  # noqa: F811
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    for name in ("lora", "reft", "ia3"):
        engine.add(name, adapters[name], pin=True)
    return engine


@pytest.fixture(scope="module")
def server(engine):
    import uvicorn

    app = create_app(engine, base_name=BASE, allow_hub_pattern="alice/served-*", max_batch_size=8,
                     max_wait_ms=50, max_prompt_tokens=40, admin_token="secret-admin")  # fmt: skip
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    uv.should_exit = True
    thread.join(10)


def chat(client, model, content, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 5, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_models_lists_the_base_and_the_adapters(server):
    data = server.get("/v1/models").json()["data"]
    assert [(m["id"], m["type"]) for m in data][:4] == [(BASE, "base"), ("lora", "lora"), ("reft", "reft"),
                                                        ("ia3", "ia3")]  # fmt: skip


def test_concurrent_requests_are_batched_and_each_equals_its_single_reference(server, engine):
    jobs = [(PROMPTS[i % len(PROMPTS)], [None, "lora", "reft", "ia3", BASE][i % 5]) for i in range(20)]
    expected = {
        (p, m): engine.generate([p], [None if m in (None, BASE) else m], max_new_tokens=5)[0] for p, m in set(jobs)
    }
    before = server.get("/metrics").text
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda job: chat(server, job[1], job[0]), jobs))
    for (prompt, model), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["model"] == (model or BASE)
        assert body["choices"][0]["message"]["content"] == expected[prompt, model], (prompt, model)
        assert body["usage"]["completion_tokens"] <= 5
    assert len({e for e in expected.values()}) >= 4, "the adapters should answer differently"
    batches = _metric(server.get("/metrics").text, "hub_peft_batch_size_sum") - _metric(
        before, "hub_peft_batch_size_sum"
    )
    count = _metric(server.get("/metrics").text, "hub_peft_batch_size_count") - _metric(
        before, "hub_peft_batch_size_count"
    )
    assert batches == 20 and count < 20, "concurrent requests should share batches"


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split("{")[0].split(" ")[0] == name)


def test_streaming_sends_the_same_text_as_server_sent_events(server):
    whole = chat(server, "reft", PROMPTS[1]).json()["choices"][0]["message"]["content"]
    body = {"model": "reft", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 5, "stream": True}
    with server.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == whole and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_plain_completions_take_the_prompt_as_is(server, engine):
    response = server.post("/v1/completions", json={"model": "lora", "prompt": "a b c", "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"].strip() == engine.generate(["a b c"], ["lora"], max_new_tokens=4,
                                                                              raw=True)[0]  # fmt: skip


def test_bad_requests_get_clear_errors(server):
    unknown = chat(server, "nope", "a")
    assert unknown.status_code == 404 and "Available: ['ia3', 'lora', 'reft', 'tiny-base']" in unknown.text
    assert chat(server, "bob/x", "a").status_code == 404  # Hub names outside the allow-list are not loaded
    bad_json = server.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    for field, extra in [("max_tokens", {"max_tokens": 0}), ("temperature", {"temperature": 0.7}),
                         ("stream", {"stream": "yes"})]:  # fmt: skip
        response = chat(server, "lora", "a", **extra)
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    no_user = server.post(
        "/v1/chat/completions", json={"model": "lora", "messages": [{"role": "system", "content": "x"}]}
    )
    assert no_user.status_code == 400 and no_user.json()["error"]["param"] == "messages"
    too_long = chat(server, "lora", " ".join(["a"] * 41))
    assert too_long.status_code == 413 and "limit is 40" in too_long.text
    assert 'hub_peft_requests_total{adapter="unknown",status="404"}' in server.get("/metrics").text


def test_adapters_load_on_demand_from_the_hub_and_through_admin_routes(server, adapters, alice, tmp_path):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    repo = "alice/served-lora"
    push_adapter(adapters["lora"], repo, token=alice)
    response = chat(server, repo, PROMPTS[0])
    assert (
        response.status_code == 200
        and response.json()["choices"][0]["message"]["content"]
        == (chat(server, "lora", PROMPTS[0]).json()["choices"][0]["message"]["content"])
    )
    assert repo in [m["id"] for m in server.get("/v1/models").json()["data"]]

    assert server.post("/admin/adapters", json={"name": "x", "source": repo}).status_code == 401
    auth = {"authorization": "Bearer secret-admin"}
    loaded = server.post("/admin/adapters", json={"name": "again", "source": str(adapters["ia3"])}, headers=auth)
    assert loaded.status_code == 200 and loaded.json()["type"] == "ia3"
    assert server.delete("/admin/adapters/again", headers=auth).json() == {"removed": "again"}
    assert chat(server, "again", "a").status_code == 404

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    other = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(target_modules=["q_proj"]))
    folder = str(save_adapter(other, tmp_path / "other"))
    foreign = server.post("/admin/adapters", json={"name": "foreign", "source": folder}, headers=auth)
    assert foreign.status_code == 422 and "this adapter was made for" in foreign.json()["error"]["message"]


def test_a_failing_request_does_not_fail_its_batch(engine):
    scheduler = Scheduler(engine, Metrics(), max_batch_size=4, max_wait_ms=200)
    jobs = [_Request(PROMPTS[0], "lora", 3, False, "lora"), _Request(PROMPTS[1], "missing", 3, False, "missing"),
            _Request(PROMPTS[2], "reft", 3, False, "reft")]  # fmt: skip
    for job in jobs:
        scheduler.submit(job)
    for job in jobs:
        assert job.done.wait(60)
    assert jobs[1].error is not None and "No adapter named 'missing'" in str(jobs[1].error)
    for job in (jobs[0], jobs[2]):
        assert job.error is None
        assert job.result.tokens == engine.generate_tokens([job.prompt], [job.adapter], max_new_tokens=3)[0].tokens
    assert torch.is_grad_enabled()


def test_the_serve_command(adapters, alice, tiny_base_repo, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys

    commit = push_adapter(adapters["reft"], "alice/served-reft", token=alice).rsplit("/", 1)[-1]
    port = free_port()
    command = [sys.executable, "-m", "hub_peft.cli", "serve", "--base", tiny_base_repo, "--port", str(port),
               "--adapter", f"lora={adapters['lora']}", "--adapter", f"reft=alice/served-reft@{commit}"]  # fmt: skip
    process = subprocess.Popen(command, env=os.environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.time() + 90
            while True:
                assert process.poll() is None, process.stdout.read()
                assert time.time() < deadline, "hub-peft serve did not come up"
                try:
                    models = client.get("/v1/models").json()["data"]
                    break
                except httpx.TransportError:
                    time.sleep(0.3)
            assert {m["id"]: m.get("commit") for m in models}["reft"] == commit
            answer = chat(client, "reft", PROMPTS[1])
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    finally:
        process.terminate()
        process.wait(20)
    bad = subprocess.run([*command[:4], "--adapter", "no-equals-sign"], capture_output=True, text=True, env=os.environ)
    assert bad.returncode == 2 and "--adapter takes NAME=REPO_ID[@REVISION]" in bad.stderr
