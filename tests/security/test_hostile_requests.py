"""Hostile clients and hostile adapters against the OpenAI server (real uvicorn on loopback, tiny models, the
local Hub): each finding of the security review reproduced, and the good request beside it unharmed."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_engine import PROMPTS, adapters, make_loha, make_lora  # noqa: F401 - module fixture
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401
from test_server import BASE, chat, reference, serving

from hub_peft import push_adapter, save_adapter
from hub_peft.adapters import WEIGHTS_NAME
from hub_peft.serving import MultiAdapterModel
from hub_peft.serving.openai import server as api_server

HOSTILE_REGEX = "(.|.)*!"  # backtracks exponentially in the length of every module name under Python's re


def rewrite_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def hostile_adapter(kind: str, good: Path, dest: Path) -> Path:
    """A copy of the ``good`` LoRA folder made hostile in one way."""
    shutil.copytree(good, dest)
    weights = dest / "adapter_model.safetensors"
    if kind == "regex":
        return rewrite_config(dest, target_modules=HOSTILE_REGEX, use_dora=True)
    if kind == "rank":  # rank-4 tensors, a config that makes PEFT allocate 3M-rank matrices
        return rewrite_config(dest, r=3_000_000, lora_alpha=8)
    if kind == "targets-type":
        return rewrite_config(dest, target_modules=5)
    if kind == "header-not-object":
        write_safetensors(weights, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": 7}, b"")
        return dest
    if kind == "huge-shape":  # a [100000, 100000] tensor said to be in 1 KB
        name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        write_safetensors(
            weights, {name: {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 1024]}}, bytes(1024)
        )
        return dest
    raise ValueError(kind)


@pytest.fixture(scope="module")
def engine(adapters):  # noqa: F811
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()), max_model_len=64)
    engine.add("lora", adapters["lora"], pin=True)
    return engine


@pytest.fixture(scope="module")
def hostile_repos(adapters, alice, tmp_path_factory):  # noqa: F811
    """Hostile adapters on the local Hub, as any stranger could push them: kind -> repo id."""
    root = tmp_path_factory.mktemp("hostile")
    repos = {}
    for kind in ("regex", "rank", "targets-type", "header-not-object", "huge-shape"):
        repo = f"alice/served-evil-{kind}"
        folder = hostile_adapter(kind, Path(adapters["lora"]), root / kind)
        # NOTE: pushed as raw files: push_adapter validates, and a stranger need not use it
        from huggingface_hub import HfApi

        api = HfApi(token=alice)
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder)
        repos[kind] = repo
    return repos


def expected(engine, prompt: str, model: str | None = "lora") -> str:
    return reference(engine, prompt, model).strip()


def test_each_hostile_adapter_gets_a_4xx_and_the_good_request_beside_it_is_unharmed(engine, hostile_repos):
    want = expected(engine, PROMPTS[0])
    with serving(engine, allow_hub_pattern="alice/served-*") as client:
        for kind, repo in hostile_repos.items():
            with ThreadPoolExecutor(3) as pool:
                start = time.monotonic()
                bad = pool.submit(chat, client, repo, PROMPTS[1])
                good = pool.submit(chat, client, "lora", PROMPTS[0])
                health = pool.submit(client.get, "/health")
                bad, good, health = bad.result(), good.result(), health.result()
                took = time.monotonic() - start
            assert 400 <= bad.status_code < 500, (kind, bad.status_code, bad.text)
            error = bad.json()["error"]
            assert error["param"] == "model" and error["message"], (kind, error)
            assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"].strip() == want, kind
            assert health.status_code == 200, kind
            assert took < 20, f"{kind}: the three requests took {took:.1f} s"
        regex = chat(client, hostile_repos["regex"], "a").json()["error"]["message"]
        assert "target_modules" in regex, regex
        rank = chat(client, hostile_repos["rank"], "a").json()["error"]["message"]
        assert "3000000" in rank, rank
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {BASE, "lora"}


def test_a_request_name_is_a_hub_id_never_a_local_folder(engine, adapters, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    shutil.copytree(adapters["lora"], tmp_path / "alice" / "localonly")
    (tmp_path / "alice" / "notanadapter").mkdir()
    shutil.copytree(adapters["lora"], tmp_path / "lora1")
    with serving(engine, allow_hub_pattern="*/*") as client:
        answers = {
            name: chat(client, name, "a")
            for name in ("alice/localonly", "alice/notanadapter", "alice/missing", "../lora1", "./lora1")
        }
        for name, answer in answers.items():
            assert answer.status_code == 404, (name, answer.text)
            assert str(tmp_path) not in answer.text and "/tmp" not in answer.text, answer.text
        # a folder that exists and one that does not read alike: nothing tells which folders exist
        same = {
            a.json()["error"]["message"].replace(name.split("/")[-1], "X")
            for name, a in answers.items()
            if name.startswith("alice/")
        }
        assert len(same) == 1, same
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {BASE, "lora"}


def test_models_and_errors_show_no_filesystem_path(engine, hostile_repos, adapters):  # noqa: F811
    with serving(engine, allow_hub_pattern="alice/served-*") as client:
        listed = client.get("/v1/models").text
        assert str(Path(adapters["lora"]).parent) not in listed and '"source":null' in listed.replace(" ", "")
        for repo in hostile_repos.values():
            text = chat(client, repo, "a").text
            assert os.environ["HF_HOME"] not in text and "/snapshots/" not in text, text


def test_bodies_and_prompts_are_limited_before_they_are_parsed_or_tokenized(engine, monkeypatch):
    encoded = []
    real_encode = engine.encode
    monkeypatch.setattr(engine, "encode", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    with serving(engine, max_prompt_tokens=40, max_body_bytes=2**20) as client:
        start = time.monotonic()
        huge = chat(client, "lora", "a " * (5 * 2**20))  # 10 MB
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large", huge.text
        assert time.monotonic() - start < 5

        def chunks():  # no Content-Length: counted as it streams in
            yield b'{"model": "lora", "messages": [{"role": "user", "content": "'
            for _ in range(40):
                yield b"a " * 2**15
            yield b'"}]}'

        streamed = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413, streamed.text

        long = chat(client, "lora", "a " * 100_000)  # 200 KB: under the body limit, far over 40 tokens
        assert long.status_code == 413 and long.json()["error"]["code"] == "context_length_exceeded", long.text
        empty = [{"role": "user", "content": ""}] * 41
        many = client.post("/v1/chat/completions", json={"model": "lora", "max_tokens": 2, "messages": empty})
        assert many.status_code == 413, many.text
        assert not encoded, "a prompt over the limit in characters was tokenized"

        # over max_prompt_tokens (40) and over the engine's max_model_len (64): the documented 413, not a 400
        over = chat(client, "lora", " ".join(["a"] * 70))
        assert over.status_code == 413 and "limit is 40" in over.json()["error"]["message"], over.text
        assert chat(client, "lora", PROMPTS[0]).status_code == 200


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity", "1e308", "17"])
def test_mix_weights_must_be_finite_and_bounded(engine, weight):
    with serving(engine) as client:
        body = '{"model": {"lora": ' + weight + '}, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2}'
        answer = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "model", answer.text
    with pytest.raises(Exception, match="finite number"):
        engine.generate(["a"], [{"lora": float(weight)}], max_new_tokens=1)


def test_admin_loads_local_folders_only_under_an_adapter_dir(engine, adapters, tmp_path):  # noqa: F811
    outside = shutil.copytree(adapters["lora"], tmp_path / "outside")
    inside_dir = tmp_path / "served"
    inside = shutil.copytree(adapters["lora"], inside_dir / "mine")
    (inside_dir / "escape").symlink_to(outside)
    auth = {"authorization": "Bearer s3cret"}
    with serving(engine, admin_token="s3cret", adapter_dirs=[inside_dir]) as client:
        for source in (str(outside), str(inside_dir / "escape"), str(inside_dir / ".." / "outside")):
            denied = client.post("/admin/adapters", json={"name": "x", "source": source}, headers=auth)
            assert denied.status_code == 403, denied.text
        loaded = client.post("/admin/adapters", json={"name": "mine", "source": str(inside)}, headers=auth)
        assert loaded.status_code == 200, loaded.text
        assert chat(client, "mine", PROMPTS[0]).json()["choices"][0]["message"]["content"].strip() == expected(
            engine, PROMPTS[0]
        )
        client.delete("/admin/adapters/mine", headers=auth)


def test_a_slow_hub_load_answers_504_and_blocks_no_other_request(engine, adapters, alice, monkeypatch):  # noqa: F811
    push_adapter(adapters["lora"], "alice/served-slow", token=alice)
    real_add = engine.cache.add
    release, finished, calls = threading.Event(), threading.Event(), []

    def slow_add(name, *args, **kwargs):
        if name != "alice/served-slow":
            return real_add(name, *args, **kwargs)
        calls.append(name)
        release.wait(30)  # a download that hangs until the test lets it go
        try:
            return real_add(name, *args, **kwargs)
        finally:
            finished.set()

    monkeypatch.setattr(engine.cache, "add", slow_add)
    want = expected(engine, PROMPTS[0])
    with (
        serving(engine, allow_hub_pattern="alice/served-*", adapter_load_timeout=1) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        slow = pool.submit(chat, client, "alice/served-slow", "a")
        time.sleep(0.2)
        start = time.monotonic()
        good = chat(client, "lora", PROMPTS[0])
        assert time.monotonic() - start < 2.5
        assert good.json()["choices"][0]["message"]["content"].strip() == want
        assert slow.result().status_code == 504, slow.result().text
        # asking again waits for the load under way (no second download beside it), within the same deadline
        assert chat(client, "alice/served-slow", "a").status_code == 504
        assert calls == ["alice/served-slow"]
        monkeypatch.setattr(api_server, "MAX_PENDING_LOADS", 1)  # a second name, while the first still loads
        busy = chat(client, "alice/served-good", "a")
        assert busy.status_code == 429 and busy.headers["retry-after"], busy.text
        release.set()
        assert finished.wait(30)
    engine.remove("alice/served-slow")


def test_validate_refuses_every_hostile_adapter_the_server_refuses(tmp_path):
    from hub_peft.validate import validate_adapter

    good = save_adapter(make_lora(1, 4), tmp_path / "good")
    for kind in ("regex", "rank", "targets-type", "header-not-object", "huge-shape"):
        report = validate_adapter(hostile_adapter(kind, Path(good), tmp_path / kind))
        assert not report.ok, kind


def test_a_request_body_that_is_not_utf8_or_has_nul_gets_a_400(engine):
    with serving(engine) as client:
        for body in (b"\xff\xfe{}", b'{"model": "lora\\u0000", "messages": [{"role": "user", "content": "a"}]}'):
            answer = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert 400 <= answer.status_code < 500 and answer.json()["error"]["message"], answer.text
        assert client.get("/health").status_code == 200  # and the server is still up


def test_a_solo_adapter_is_attached_once_off_the_step_loop_and_a_slow_attach_blocks_no_one(
    engine, alice, tmp_path, monkeypatch
):
    """LoHa (a solo adapter) is attached by PEFT when it is loaded, on a load thread, and again after an
    eviction on the thread that submits the request, never on the scheduler's; meanwhile the shared base is
    never touched, and a LoRA request beside a slow attach answers at once."""
    from peft import PeftModel

    from hub_peft.chat import encode_prompt, prompt_template
    from hub_peft.serving import solo

    folder = save_adapter(make_loha(5), tmp_path / "loha")
    push_adapter(folder, "alice/served-loha", token=alice)
    real_attach, threads, release = solo.attach, [], threading.Event()

    def slow_attach(*args, **kwargs):
        threads.append(threading.current_thread().name)
        release.wait(30)  # a large adapter's attach, say
        return real_attach(*args, **kwargs)

    monkeypatch.setattr(solo, "attach", slow_attach)
    modules_before = [(n, id(m)) for n, m in engine.model.named_modules()]
    want = expected(engine, PROMPTS[0])
    peft = PeftModel.from_pretrained(load_tiny(), folder).eval()  # the ordinary PEFT way
    ids = torch.tensor([encode_prompt(tiny_tokenizer(), "a", prompt_template(tiny_tokenizer()))])
    with torch.inference_mode():
        tokens = peft.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=2
        )[0, ids.shape[1] :]
    loha_answer = tiny_tokenizer().decode(tokens, skip_special_tokens=True).strip()
    assert loha_answer != expected(engine, "a", None)  # the adapter changes the answer
    with serving(engine, allow_hub_pattern="alice/served-*") as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(chat, client, "alice/served-loha", "a")
        deadline = time.monotonic() + 30
        while not threads:
            assert time.monotonic() < deadline, "the adapter was never attached on its load"
            time.sleep(0.01)
        start = time.monotonic()
        good = chat(client, "lora", PROMPTS[0])
        assert time.monotonic() - start < 2.5 and client.get("/health").status_code == 200
        assert good.json()["choices"][0]["message"]["content"].strip() == want
        release.set()
        assert slow.result().json()["choices"][0]["message"]["content"].strip() == loha_answer
        info = engine.cache.info("alice/served-loha")
        assert info["resident"] and info["bytes"] == sum(t.nbytes for t in load_file(folder / WEIGHTS_NAME).values())
        budget, engine.cache.memory_budget = engine.cache.memory_budget, 0  # evicted as soon as no request holds it
        try:
            engine.cache.evict()
            assert not engine.cache.info("alice/served-loha")["resident"]
            again = chat(client, "alice/served-loha", "a")  # re-attached by the request's submission
            assert again.json()["choices"][0]["message"]["content"].strip() == loha_answer
            assert not engine.cache.info("alice/served-loha")["resident"]  # released once it ended
        finally:
            engine.cache.memory_budget = budget
    assert len(threads) == 2 and "hub-peft-scheduler" not in threads, threads
    assert [(n, id(m)) for n, m in engine.model.named_modules()] == modules_before  # the base was never touched
    engine.remove("alice/served-loha")


def test_a_reserved_adapter_stays_resident_until_its_request_ends(engine, tmp_path):
    folder = save_adapter(make_loha(6), tmp_path / "loha")
    engine.add("loha", folder)
    budget, engine.cache.memory_budget = engine.cache.memory_budget, 0
    try:
        reserved = engine.cache.reserve((("loha", 1.0),))
        engine.cache.evict()
        assert engine.cache.info("loha")["resident"]
        engine.cache.unreserve(reserved)
        assert not engine.cache.info("loha")["resident"] and engine.cache.info("lora")["resident"]  # pinned stays
    finally:
        engine.cache.memory_budget = budget
        engine.remove("loha")
