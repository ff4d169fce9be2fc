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


def test_llamacpp_answers_like_the_engine(tmp_path):
    import httpx

    from hub_peft import load_base_model
    from hub_peft.base_model import resolve_base
    from hub_peft.bridges import MergeSpec, merge_adapters
    from hub_peft.bridges.gguf import export_gguf
    from hub_peft.hub.process import free_port
    from hub_peft.serving import MultiAdapterModel

    source = Path(LLAMA_CPP or "")
    server_bin = source / "build" / "bin" / "llama-server"
    assert server_bin.is_file(), f"no llama-server under {source}: run ../shared/tools/build_llama_server.sh"
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
    base_gguf = tmp_path / "base-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    convert = [CONVERT_PYTHON, str(source / "convert_hf_to_gguf.py"), resolve_base(None)[1], "--outtype", "f32"]
    subprocess.run(
        [*convert, "--outfile", str(base_gguf)],
        check=True,
        env=env,
        capture_output=True,
    )
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

    port = free_port()
    args = [str(server_bin), "-m", str(base_gguf), "--port", str(port), "-np", "4", "-c", "4096", "--no-webui"]
    for path in ggufs:
        args += ["--lora", str(path)]
    process = subprocess.Popen([*args, "--lora-init-without-apply"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=120) as client:
            deadline = time.time() + 120
            while time.time() < deadline:
                assert process.poll() is None, process.stderr.read().decode()[-2000:] if process.stderr else ""
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
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
