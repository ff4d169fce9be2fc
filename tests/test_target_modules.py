"""LoRA target modules (``hub-peft train --target-modules``, ``TrainSettings.target_modules``) on architectures
without q/k/v/o_proj, and ``hub-peft validate --base`` against a base model's config."""

from __future__ import annotations

import json

import pytest
import torch
from test_peft_methods import tiny_llama_config, tiny_tokenizer

from hub_peft import load_adapter
from hub_peft.base_model import load_base_model
from hub_peft.cli import main
from hub_peft.errors import InvalidInputError
from hub_peft.training import TrainSettings, save_trained, train_adapter

ROWS = [{"prompt": f"{a} {b}", "response": f"{b} {a} {b}"} for a, b in zip("abcdefgh", "ijklmnop", strict=True)]
IDS = torch.tensor([[5, 9, 17, 33, 40, 7]])
TOKENS = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "initializer_range": 0.3}


def _configs():
    from transformers import FalconConfig, GPT2Config, GPTNeoXConfig

    return {
        # Conv1D layers, weights stored transposed
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **TOKENS),
        # FalconLinear (an nn.Linear subclass), fused query_key_value
        "falcon": FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **TOKENS),
        "gpt_neox": GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            **TOKENS,
        ),
    }


# the linear layers of each block, read off transformers' modeling code (the output head is not one of them)
BLOCK_LINEARS = {
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "falcon": {"self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "gpt_neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
}
BLOCKS = {"gpt2": "transformer.h", "falcon": "transformer.h", "gpt_neox": "gpt_neox.layers"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Seeded 2-layer GPT-2, Falcon and GPT-NeoX models with the tiny word-level tokenizer, each in a folder."""
    from transformers import AutoModelForCausalLM

    folders = {}
    for name, config in _configs().items():
        torch.manual_seed(0)
        folders[name] = tmp_path_factory.mktemp(name)
        AutoModelForCausalLM.from_config(config).save_pretrained(folders[name])
        tiny_tokenizer().save_pretrained(folders[name])
    return folders


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["gpt2", "falcon", "gpt_neox"])
def test_default_lora_trains_every_linear_layer_and_loads_in_plain_peft(arch, bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = TrainSettings(method="lora", epochs=3, lr=5e-2, batch_size=4)
    trained = train_adapter(ROWS, settings, base=load_base_model(str(bases[arch])))
    assert trained.settings.target_modules == "all-linear"
    history = trained.result.history
    assert len(history) == 6 and history[-1]["loss"] < history[0]["loss"]
    trained_logits = _logits(trained.model)
    folder = save_trained(trained, tmp_path / "adapter")

    config = json.loads((folder / "adapter_config.json").read_text())
    expected = {f"{BLOCKS[arch]}.{i}.{layer}" for i in range(2) for layer in BLOCK_LINEARS[arch]}
    assert set(config["target_modules"]) == expected
    assert config["fan_in_fan_out"] is (arch == "gpt2")  # GPT-2's Conv1D stores its weight transposed
    card = json.loads((folder / "hub_peft_card.json").read_text())
    assert card["training_args"]["target_modules"] == "all-linear"
    assert "| `target_modules` | `all-linear` |" in (folder / "README.md").read_text()

    base = AutoModelForCausalLM.from_pretrained(bases[arch]).eval()
    base_logits = _logits(base)
    plain = PeftModel.from_pretrained(base, folder).eval()  # PEFT alone, no hub_peft
    plain_logits = _logits(plain)
    assert (plain_logits - base_logits).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(plain_logits, trained_logits, rtol=1e-4, atol=1e-4)
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(bases[arch]).eval(), folder)
    torch.testing.assert_close(_logits(ours), plain_logits, rtol=1e-5, atol=1e-5)


def test_cli_target_modules_names_peft_default_and_clear_errors(bases, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    examples = tmp_path / "rows.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def train(arch: str, out: str, *extra: str) -> int:
        return main(
            [
                "train",
                "--examples",
                str(examples),
                "--method",
                "lora",
                "--base",
                str(bases[arch]),
                "--out",
                str(tmp_path / out),
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--lr",
                "0.05",
                *extra,
            ]
        )

    assert train("gpt2", "q", "--target-modules", "q_proj") == 2
    err = capsys.readouterr().err
    assert "target module(s) q_proj not found in this gpt2 model" in err, err
    assert "its linear layers are named c_attn, c_proj, c_fc" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()
    assert train("gpt2", "block", "--target-modules", "c_attn,mlp") == 2
    assert "mlp in this gpt2 model are blocks of layers, not layers LoRA can wrap" in capsys.readouterr().err

    assert train("gpt2", "named", "--target-modules", " c_attn, c_fc ") == 0
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc"] and config["fan_in_fan_out"] is True
    card = json.loads((tmp_path / "named" / "hub_peft_card.json").read_text())
    assert card["training_args"]["target_modules"] == "c_attn,c_fc"
    base = AutoModelForCausalLM.from_pretrained(bases["gpt2"]).eval()
    before = _logits(base)
    wrapped = PeftModel.from_pretrained(base, tmp_path / "named")
    adapted = {n.split(".lora_A.")[0] for n, _ in wrapped.named_parameters() if ".lora_A." in n}
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"c_attn", "c_fc"} and len(adapted) == 4
    assert (_logits(wrapped) - before).abs().max() > 1e-2

    assert train("gpt_neox", "default", "--target-modules", "peft-default") == 0
    config = json.loads((tmp_path / "default" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query_key_value"]  # PEFT's table for gpt_neox
    card = json.loads((tmp_path / "default" / "hub_peft_card.json").read_text())
    assert card["training_args"]["target_modules"] == "peft-default"


def test_target_module_settings_are_checked():
    assert TrainSettings(method="lora").resolved(2).target_modules == "all-linear"
    assert TrainSettings(method="lora", target_modules="PEFT-Default").target_modules == "peft-default"
    assert TrainSettings(method="lora", target_modules="a, b,,a").target_modules == ["a", "b"]
    assert TrainSettings().resolved(2).target_modules is None  # ReFT has none
    with pytest.raises(InvalidInputError, match="target_modules is a LoRA setting"):
        TrainSettings(method="reft", target_modules="all-linear")
    with pytest.raises(InvalidInputError, match="target_modules is empty"):
        TrainSettings(method="lora", target_modules=" , ")
    with pytest.raises(InvalidInputError, match="cannot be combined with module names"):
        TrainSettings(method="lora", target_modules="all-linear,c_attn")


def _llama(folder, hidden: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=hidden)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_validate_base_reports_absent_modules_and_shape_mismatches(bases, tmp_path, capsys):
    """A LoRA made on a 64-wide tiny Llama fits its own base, not a 32-wide Llama (shapes) nor GPT-2 (no
    q_proj/v_proj). Only the base's config.json is read: a folder holding just that is enough."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    own = _llama(tmp_path / "llama64", 64)
    narrow = tmp_path / "llama32-config"
    AutoConfig.from_pretrained(_llama(tmp_path / "llama32", 32)).save_pretrained(narrow)
    assert sorted(p.name for p in narrow.iterdir()) == ["config.json"]
    adapter = tmp_path / "adapter"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(own), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    model.save_pretrained(adapter)  # plain PEFT
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj", "c_attn"]  # a name with no weights: harmless, PEFT loads it
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    assert main(["validate", str(adapter), "--base", str(own)]) == 0
    assert f"fits {own}" in capsys.readouterr().out

    assert main(["validate", str(adapter), "--base", str(narrow)]) == 1
    out = capsys.readouterr().out
    # q_proj's lora_A is [r, hidden]: 64 columns here, the 32-wide base needs 32
    assert "lora_A.weight has shape [4, 64], but" in out and f"{narrow} needs 32 there" in out, out
    assert f"made for {own}" in out and "FAIL:" in out

    assert main(["validate", str(adapter), "--base", str(bases["gpt2"])]) == 1
    out = capsys.readouterr().out
    assert (
        f"target module(s) q_proj, v_proj are not in {bases['gpt2']} (its linear layers: c_attn, c_proj, c_fc)" in out
    )
    assert "4 adapted module(s) such as model.layers.0.self_attn.q_proj have nothing to load into" in out, out

    assert main(["validate", str(adapter), "--base", str(tmp_path / "missing")]) == 2
    assert "Could not read the config of base model" in capsys.readouterr().err


def test_the_studio_trains_lora_on_the_target_modules_typed_in_advanced(bases, tmp_path):
    """The Studio's "LoRA target modules" box (default all-linear) is an input of the Train button and reaches
    the adapter it trains; ReFT ignores it."""
    import importlib.util
    from pathlib import Path

    import pandas as pd

    path = Path(__file__).resolve().parents[1] / "spaces" / "adapter_studio" / "app.py"
    spec = importlib.util.spec_from_file_location("adapter_studio_targets", path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    demo = app.build()
    box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "target-modules")
    assert box.value == "all-linear"
    train = next(f for f in demo.fns.values() if f.fn is app.train)
    assert train.inputs[-1] is box

    request = type("Request", (), {"session_hash": "targets-test", "username": None})()
    rows = pd.DataFrame(ROWS)
    args = (rows, [], "LoRA", str(bases["gpt2"]), False, 4, "", "l1", 0.05, 1, {}, " c_fc ")
    *_, last = app.train(*args, request=request, progress=lambda *a, **k: None)
    assert last[0].startswith("Done:"), last[0]
    config = json.loads((Path(last[2]["adapter"]) / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_fc"]
    assert app._settings("ReFT", None, False, None, "", "l1", None, None, "c_fc").target_modules is None
    with pytest.raises(app.gr.Error, match="q_proj not found in this gpt2 model"):
        for _ in app.train(*args[:-1], "q_proj", request=request, progress=lambda *a, **k: None):
            pass
