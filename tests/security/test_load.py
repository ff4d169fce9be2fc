"""The load test of the threat model: 200 requests, one in ten hostile, against ``hub-peft serve`` (a process of
its own, Hub adapters allowed): every good request answers what the engine answers alone, every hostile one gets
a 4xx, and the server's memory stays bounded (its peak is printed)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from test_engine import PROMPTS, adapters  # noqa: F401 - module fixture
from test_hostile_requests import engine, hostile_repos  # noqa: F401 - module fixtures
from test_peft_methods import tiny_base_repo  # noqa: F401
from test_server import serve_process

from hub_peft import push_adapter


def _memory(pid: int) -> tuple[int, int]:
    """(current, peak) resident memory of ``pid`` in MiB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def _hostile(kind: str, repos: dict[str, str]) -> tuple[str, dict]:
    """(how to send it, what) for one hostile request."""
    user = [{"role": "user", "content": "a"}]
    if kind in repos:
        return "json", {"model": repos[kind], "messages": user, "max_tokens": 3}
    return {
        "path": ("json", {"model": "../lora", "messages": user}),
        "nul-revision": ("json", {"model": "alice/served-good@main\x00", "messages": user}),
        "nan-mix": ("raw", b'{"model": {"lora": NaN}, "messages": [{"role": "user", "content": "a"}]}'),
        "huge-body": ("raw", b'{"model": "lora", "prompt": "' + b"a " * 2**20 + b'"}'),
        "long-prompt": ("json", {"model": "lora", "messages": [{"role": "user", "content": "a " * 50_000}]}),
    }[kind]


def test_two_hundred_requests_one_in_ten_hostile_against_hub_peft_serve(
    engine,  # noqa: F811
    hostile_repos,  # noqa: F811
    adapters,  # noqa: F811
    alice,
    tiny_base_repo,  # noqa: F811
):
    push_adapter(adapters["lora"], "alice/served-good", token=alice)
    goods = [(model, prompt) for model in (None, "lora", "alice/served-good") for prompt in PROMPTS[:3]]
    want = {
        (m, p): engine.generate([p], [None if m is None else "lora"], max_new_tokens=5)[0].strip() for m, p in goods
    }
    kinds = [*hostile_repos, "path", "nul-revision", "nan-mix", "huge-body", "long-prompt"]
    served = ["--base", tiny_base_repo, "--adapter", f"lora={adapters['lora']}", "--max-body-mb", "1"]
    served += ["--allow-hub-pattern", "alice/served-*", "--max-prompt-tokens", "40"]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=None)
    with serve_process(*served) as (server, url), httpx.Client(base_url=url, timeout=120, limits=limits) as client:
        started, _ = _memory(server.pid)

        def send(i: int) -> tuple[int, str | None, str | None]:
            if i % 10 == 9:
                kind = kinds[(i // 10) % len(kinds)]
                how, what = _hostile(kind, hostile_repos)
                if how == "raw":
                    answer = client.post(
                        "/v1/completions" if b'"prompt"' in what else "/v1/chat/completions",
                        content=what,
                        headers={"content-type": "application/json"},
                    )
                else:
                    answer = client.post("/v1/chat/completions", json=what)
                return answer.status_code, kind, answer.text
            model, prompt = goods[i % len(goods)]
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 5, "temperature": 0}
            answer = client.post("/v1/chat/completions", json=body | ({"model": model} if model else {}))
            text = answer.json()["choices"][0]["message"]["content"].strip() if answer.status_code == 200 else None
            return answer.status_code, None, None if text == want[(model, prompt)] else answer.text

        start = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(send, range(200)))
        took = time.monotonic() - start
        current, peak = _memory(server.pid)
        assert client.get("/health").status_code == 200
    hostile = [(status, kind, text) for status, kind, text in results if kind]
    good = [(status, text) for status, kind, text in results if not kind]
    assert len(hostile) == 20 and len(good) == 180
    assert all(400 <= status < 500 for status, _, _ in hostile), [h for h in hostile if not 400 <= h[0] < 500]
    wrong = [(status, text) for status, text in good if status != 200 or text is not None]
    assert not wrong, wrong[:3]
    print(
        f"\n200 requests (20 hostile) in {took:.1f} s; server RSS {started} MiB after start, {current} MiB after, "
        f"peak {peak} MiB"
    )
    assert peak - started < 300, f"the server grew from {started} to a peak of {peak} MiB"
