"""ReFT on the real embedded SmolLM2-135M-Instruct: the "answer only in emoji" demo, trained with
hub_peft and imported from a real pyreft save, must turn held-out prompts into emoji answers."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch

from hub_peft.chat import generate_reply, prompt_template
from hub_peft.presets import held_out_prompts, load_preset
from hub_peft.reft import ReftConfig, get_reft_model
from hub_peft.training import DEFAULTS, encode_examples, train_reft

pytestmark = pytest.mark.slow

PYREFT_SAVE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "pyreft_emoji"
PYREFT_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"  # see shared/README.md
HELD_OUT = ["Provide a recipe for a plum cake?", "Write a poem about the sea"]


def emoji_only(text: str) -> bool:
    """No letters at all, and at least two pictographs (keycap digits and the like are allowed)."""
    text = text.replace("\ufffd", "")  # a multi-byte emoji cut off by max_new_tokens
    symbols = sum(unicodedata.category(c) == "So" for c in text)
    return symbols >= 2 and not any(unicodedata.category(c).startswith("L") for c in text)


@pytest.fixture(scope="module", params=[False, True], ids=["fp32", "nf4"])
def smollm(request):
    from hub_peft.base_model import load_base_model

    return load_base_model(None, load_in_4bit=request.param)


def test_held_out_prompts_are_in_the_preset_file():
    assert set(HELD_OUT) <= set(held_out_prompts())
    assert not set(HELD_OUT) & {row["prompt"] for row in load_preset()}


def test_the_emoji_demo_trains_to_emoji_answers(smollm, tmp_path):
    from hub_peft import load_adapter, save_adapter

    model, tokenizer = smollm
    for prompt in HELD_OUT:  # the control: the base model answers in words
        assert not emoji_only(generate_reply(model, tokenizer, prompt, max_new_tokens=12))
    template = prompt_template(tokenizer)
    examples = encode_examples(tokenizer, load_preset(), template)
    torch.manual_seed(0)
    reft = get_reft_model(model, ReftConfig(layers=[8, 16], rank=4, positions="l1", prompt_template=template))
    result = train_reft(reft, examples, epochs=DEFAULTS["reft"]["epochs"], lr=DEFAULTS["reft"]["lr"])
    assert result.history[-1]["loss"] < result.history[0]["loss"] - 0.7
    answers = {p: generate_reply(reft, tokenizer, p, max_new_tokens=12) for p in HELD_OUT}
    assert all(emoji_only(a) for a in answers.values()), answers
    assert len(set(answers.values())) > 1, answers  # emoji that depend on the prompt, not one fixed reply

    folder = save_adapter(reft, tmp_path / "emoji", training_rows=load_preset(), history=result.history)
    reft.remove_hooks()
    restored = load_adapter(model, folder)
    try:
        assert {p: generate_reply(restored, tokenizer, p, max_new_tokens=12) for p in HELD_OUT} == answers
    finally:
        restored.remove_hooks()


def test_a_real_pyreft_save_imports_and_answers_in_emoji(smollm, tmp_path):
    from hub_peft import load_adapter
    from hub_peft.reft.pyreft_import import import_pyreft

    model, tokenizer = smollm
    folder = import_pyreft(PYREFT_SAVE, tmp_path / "imported", positions="l1", prompt_template=PYREFT_TEMPLATE)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["layers"], config["rank"], config["intervention"]) == ([8, 16], 4, "loreft")
    reft = load_adapter(model, folder)
    try:
        for prompt in HELD_OUT:
            answer = generate_reply(reft, tokenizer, prompt, max_new_tokens=12)
            assert emoji_only(answer), (prompt, answer)
    finally:
        reft.remove_hooks()


def test_the_lora_defaults_also_train_the_emoji_preset(tmp_path):
    """The Space's other method, with its defaults, on the full-precision base."""
    from hub_peft.base_model import load_base_model
    from hub_peft.training import TrainSettings, save_trained, train_adapter

    model, tokenizer = load_base_model(None)
    trained = train_adapter(load_preset(), TrainSettings(method="lora"), base=(model, tokenizer))
    try:
        answers = {p: generate_reply(trained.model, tokenizer, p, max_new_tokens=12) for p in HELD_OUT}
        assert all(emoji_only(a) for a in answers.values()), answers
        assert (save_trained(trained, tmp_path / "lora") / "adapter_model.safetensors").is_file()
    finally:
        trained.release()
