"""llama.cpp itself serves what ``hub-peft export --to gguf`` writes (opt-in, marker ``llamacpp``; never in CI).

Set ``HUB_PEFT_LLAMA_CPP`` to the llama.cpp source folder that ``../shared/tools/build_llama_server.sh`` prints
(its ``build/bin/llama-server``, its converters) and ``HUB_PEFT_LLAMA_CPP_PYTHON`` to a Python that runs
``convert_hf_to_gguf.py`` (torch, transformers, sentencepiece: the vLLM venv of benchmarks/README.md does). The
real SmolLM2-135M base is converted to an F32 GGUF by llama.cpp's own converter; three adapters (a LoRA on every
linear layer, an rsLoRA with per-module ranks, and their exact ``cat`` merge) are exported by hub_peft and loaded
with ``--lora``; llama.cpp's greedy tokens, per request and adapter, must equal hub_peft's engine's on the same
F32 base and token ids, and differ from the base's (so the adapters really apply).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hub_peft import save_adapter

LLAMA_CPP = os.environ.get("HUB_PEFT_LLAMA_CPP")
CONVERT_PYTHON = os.environ.get("HUB_PEFT_LLAMA_CPP_PYTHON", sys.executable)
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Three reasons to learn Rust:",
]
NEW_TOKENS = 24

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(not LLAMA_CPP, reason="opt-in: set HUB_PEFT_LLAMA_CPP to a llama.cpp build (see docstring)"),
]


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> Path:
    """SmolLM2-135M as an F32 GGUF, by llama.cpp's own convert_hf_to_gguf.py."""
    from hub_peft.base_model import resolve_base

    source = Path(LLAMA_CPP or "")
    out = tmp_path_factory.mktemp("llamacpp") / "base-f32.gguf"
    convert = [CONVERT_PYTHON, str(source / "convert_hf_to_gguf.py"), resolve_base(None)[1], "--outtype", "f32"]
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    subprocess.run([*convert, "--outfile", str(out)], check=True, env=env, capture_output=True)
    return out


def start_server(base: Path, loras: list[Path]) -> tuple[subprocess.Popen, str]:
    """llama-server on ``base`` with ``loras`` loaded unapplied, once it answers /health (or has exited)."""
    import httpx

    from hub_peft.hub.process import free_port

    server_bin = Path(LLAMA_CPP or "") / "build" / "bin" / "llama-server"
    assert server_bin.is_file(), f"no {server_bin}: run ../shared/tools/build_llama_server.sh"
    port = free_port()
    args = [str(server_bin), "-m", str(base), "--port", str(port), "-np", "4", "-c", "4096", "--no-webui"]
    for path in loras:
        args += ["--lora", str(path)]
    process = subprocess.Popen([*args, "--lora-init-without-apply"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return process, url


def random_lora(base, seed: int, **kwargs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **kwargs)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)  # large enough to change greedy answers, small enough to keep them text
    return model


def test_llamacpp_answers_like_the_engine(tmp_path, base_gguf):
    import httpx

    from hub_peft import load_base_model
    from hub_peft.bridges import MergeSpec, merge_adapters
    from hub_peft.bridges.gguf import export_gguf
    from hub_peft.serving import MultiAdapterModel

    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    folders = {
        "lora": save_adapter(random_lora(load_base_model(None)[0], 1, r=8, target_modules=linear), tmp_path / "l"),
        "rslora": save_adapter(
            random_lora(
                load_base_model(None)[0],
                2,
                r=16,
                lora_alpha=8,
                use_rslora=True,
                target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                rank_pattern={"v_proj": 4},
            ),
            tmp_path / "r",
        ),
    }
    folders["merged"] = merge_adapters(
        [folders["lora"], folders["rslora"]], [0.6, 0.4], tmp_path / "m", MergeSpec("cat")
    )
    names = list(folders)
    ggufs = [export_gguf(folders[n], tmp_path / f"{n}.gguf") for n in names]
    engine = MultiAdapterModel(load_base_model(None))
    for name in names:
        engine.add(name, folders[name])
    chat = engine.tokenizer.apply_chat_template
    texts = [chat([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    ids = [engine.encode([t], [()], [True])[0] for t in texts]
    rows = [(i, a) for i in range(len(texts)) for a in [None, *names]]
    expected = engine.generate_tokens(
        [texts[i] for i, _ in rows], [a for _, a in rows], raw=True, max_new_tokens=NEW_TOKENS
    )

    process, url = start_server(base_gguf, ggufs)
    try:
        assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
        with httpx.Client(timeout=120) as client:
            got = []
            for i, adapter in rows:
                lora = [{"id": j, "scale": 1.0 if name == adapter else 0.0} for j, name in enumerate(names)]
                body = {
                    "prompt": ids[i],
                    "n_predict": NEW_TOKENS,
                    "temperature": 0,
                    "lora": lora,
                    "cache_prompt": False,
                    "return_tokens": True,
                }
                response = client.post(f"{url}/completion", json=body)
                assert response.status_code == 200, response.text
                got.append(response.json()["tokens"])
    finally:
        process.terminate()
        process.wait(30)
    tokenizer = engine.tokenizer
    eos = tokenizer.eos_token_id
    equal = 0
    for (i, adapter), ours, theirs in zip(rows, expected, got, strict=True):
        ours_ids = [t for t in ours.tokens if t != eos]
        theirs = theirs[: len(ours_ids)]
        if ours_ids == theirs:
            equal += 1
        else:
            print(f"{adapter} on {PROMPTS[i]!r}:\n  hub_peft  {tokenizer.decode(ours_ids)!r}")
            print(f"  llama.cpp {tokenizer.decode(theirs)!r}")
    print(f"llama.cpp greedy answers equal to hub_peft's engine: {equal}/{len(rows)}")
    assert equal == len(rows)
    by = {(i, a): c.tokens for (i, a), c in zip(rows, expected, strict=True)}
    for name in names:  # each adapter changes answers: the comparison above is not base against base
        assert any(by[(i, name)] != by[(i, None)] for i in range(len(texts))), name


REFUSED = {  # what validate --for llama.cpp refuses on SmolLM2 (tied embeddings)
    "dora": {"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
    "lm_head on tied embeddings": {"r": 8, "target_modules": ["q_proj", "lm_head"]},
    "modules_to_save": {"r": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


def test_llamacpp_refuses_what_validate_refuses(tmp_path, base_gguf):
    """llama.cpp gives the verdict `validate --for llama.cpp` gives on the variants hub_peft refuses (an IA3, too:
    not LoRA): its own convert_lora_to_gguf.py fails, or llama-server refuses the file it wrote. The accepted
    variants are served in the test above."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from hub_peft import load_base_model
    from hub_peft.base_model import resolve_base
    from hub_peft.validate import validate_adapter

    source = Path(LLAMA_CPP or "")
    folders = {}
    for name, kwargs in REFUSED.items():
        model = get_peft_model(load_base_model(None)[0], LoraConfig(init_lora_weights=False, **kwargs))
        folders[name] = save_adapter(model, tmp_path / name.replace(" ", "_"))
    ia3 = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    folders["ia3"] = save_adapter(get_peft_model(load_base_model(None)[0], ia3), tmp_path / "ia3")
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    for name, folder in folders.items():
        report = validate_adapter(folder, for_engine="llama.cpp")
        assert not report.ok, name
        out = tmp_path / f"{folder.name}.gguf"
        command = [CONVERT_PYTHON, str(source / "convert_lora_to_gguf.py"), "--base", resolve_base(None)[1]]
        done = subprocess.run([*command, "--outfile", str(out), str(folder)], env=env, capture_output=True, text=True)
        said = [line for line in done.stderr.splitlines() if "ERROR" in line][-1:]
        if done.returncode == 0:  # the converter wrote a file: llama-server must then refuse to load it
            process, _ = start_server(base_gguf, [out])
            if process.poll() is None:
                process.terminate()
            status = process.wait(30)
            said = [line for line in process.stderr.read().decode().splitlines() if "LoRA" in line][-1:]
            assert status != 0 and said, f"llama.cpp served {name}"
        print(f"{name}: hub_peft: {report.problems[0].point[:80]!r}; llama.cpp: {said}")
