"""The repo format, generated cards, validate/info, and bad input, through the local Hub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from test_peft_methods import load_tiny, tiny_base_repo, tiny_llama_config  # noqa: F401 - shared session fixture

from hub_peft import load_adapter, push_adapter, save_adapter
from hub_peft.errors import (
    HubAuthError,
    IncompatibleAdapterError,
    InvalidInputError,
    NotFoundError,
    UnsafeFileError,
)
from hub_peft.validate import validate_adapter


def make_lora(**kwargs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs)
    return get_peft_model(load_tiny(), config)


@pytest.fixture
def saved_lora(tiny_base_repo, tmp_path):  # noqa: F811
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    history = [{"step": i, "loss": 3.0 / i} for i in range(1, 6)]
    folder = save_adapter(
        make_lora(),
        tmp_path / "lora",
        training_rows=rows,
        history=history,
        evaluation={"accuracy": 0.75},
        dataset_name="toy-qa.jsonl",
        datasets=["toy/qa"],
    )
    return folder


def test_saved_folder_is_peft_layout_plus_card(saved_lora):
    files = {p.name for p in saved_lora.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss_curve.png"} <= files
    assert not any(name.endswith(".bin") for name in files)
    card = ModelCard.load(saved_lora / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "alice/tiny-llama" and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft" and {"lora", "hub_peft", "peft"} <= set(data["tags"])
    assert data["datasets"] == ["toy/qa"]
    text = card.text
    assert text.count("@misc{peft,") == 1 and text.count("@inproceedings{hu2022lora") == 1
    for needle in (
        "from `toy-qa.jsonl`",
        "## Usage",
        "lora_alpha",
        "Trainable (this adapter)",
        "fingerprint `sha256:",
        "loss_curve.png",
        "| accuracy | 0.75 |",
        "Limitations",
        "vLLM-compatible",
    ):
        assert needle in text, needle


def run_card_snippet(repo_id: str, cwd: Path) -> str:
    """Run the card's plain-PEFT snippet in a fresh process without hub_peft; what it printed."""
    snippet = re.search(r"```python\n(.*?)```", ModelCard.load(repo_id).text, re.S).group(1)
    assert f'PeftModel.from_pretrained(base, "{repo_id}")' in snippet
    check = "\nimport sys\nassert 'hub_peft' not in sys.modules\n"
    out = subprocess.run(
        [sys.executable, "-c", snippet + check],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize("template", ["w1 {prompt} w2", None])
def test_the_card_snippet_prints_what_the_adapter_answers(template, tiny_base_repo, alice, repo_name, tmp_path):  # noqa: F811
    """The plain-PEFT snippet formats the prompt as in training (the recorded template, else the chat template),
    so it prints exactly what hub_peft's own chat gives for that adapter."""
    from test_peft_methods import tiny_tokenizer

    from hub_peft.chat import generate_reply

    model = make_lora()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    folder = save_adapter(model, tmp_path / "lora", prompt_template=template, example_prompt="a b c d")
    repo_id = f"alice/{repo_name}"
    push_adapter(folder, repo_id, token=alice)
    printed = run_card_snippet(repo_id, tmp_path)
    ours = load_adapter(load_tiny(), repo_id)
    assert printed == generate_reply(ours, tiny_tokenizer(), "a b c d", max_new_tokens=32)
    if template:  # the bare prompt gives another answer, so the test tells the formats apart
        assert printed != generate_reply(ours, tiny_tokenizer(), "a b c d", max_new_tokens=32, template="{prompt}")


def test_pushed_card_metadata(saved_lora, alice, repo_name):
    repo_id = f"alice/{repo_name}"
    push_adapter(saved_lora, repo_id, token=alice)
    card = ModelCard.load(repo_id)
    assert card.data.base_model == "alice/tiny-llama" and card.data.datasets == ["toy/qa"]
    assert card.data.eval_results[0].metric_type == "accuracy" and card.data.eval_results[0].metric_value == 0.75


def test_local_data_never_becomes_a_hub_dataset_id(tiny_base_repo, tmp_path):  # noqa: F811
    folder = save_adapter(
        make_lora(), tmp_path / "a", training_rows=[{"prompt": "q", "response": "a"}], dataset_name="my examples.jsonl"
    )
    card = ModelCard.load(folder / "README.md")
    assert "datasets" not in card.data.to_dict() and "from `my examples.jsonl`" in card.text
    with pytest.raises(InvalidInputError, match=r"Invalid Hub dataset id '\./data\.jsonl'"):
        save_adapter(make_lora(), tmp_path / "b", datasets=["./data.jsonl"])


def test_plain_peft_process_gets_identical_logits(saved_lora, alice, repo_name, tmp_path):
    repo_id = f"alice/{repo_name}"
    push_adapter(saved_lora, repo_id, token=alice)
    script = f"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("alice/tiny-llama"), "{repo_id}")
torch.save(model(input_ids=torch.arange(1, 9)[None]).logits.detach(), "{tmp_path}/logits.pt")
assert "hub_peft" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    ours = load_adapter(load_tiny(), repo_id)
    expected = ours(input_ids=torch.arange(1, 9)[None]).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected, rtol=0, atol=1e-6)


def test_load_adapter_twice_adds_a_second_adapter_and_revisions(saved_lora, alice, repo_name, tmp_path):
    repo_id = f"alice/{repo_name}"
    first_url = push_adapter(saved_lora, repo_id, token=alice)
    other = save_adapter(make_lora(use_rslora=True), tmp_path / "other")
    push_adapter(other, repo_id, token=alice)
    first_sha = first_url.rsplit("/", 1)[1]
    model = load_adapter(load_tiny(), repo_id, adapter_name="new")
    model = load_adapter(model, repo_id, adapter_name="old", revision=first_sha)
    assert set(model.peft_config) == {"new", "old"} and model.active_adapter == "old"
    assert model.peft_config["new"].use_rslora and not model.peft_config["old"].use_rslora


def test_secrets_never_reach_pushed_files(saved_lora, alice, repo_name, tmp_path):
    repo_id = f"alice/{repo_name}"
    push_adapter(saved_lora, repo_id, token=alice, private=True)
    folder = Path(snapshot_download(repo_id, token=alice, cache_dir=tmp_path / "c"))
    for path in folder.rglob("*"):
        if path.is_file():
            assert alice.encode() not in path.read_bytes(), path.name


def test_validate_and_info_cli(saved_lora, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hub_peft.cli", *args], capture_output=True, text=True)

    ok = cli("validate", str(saved_lora), "--for", "vllm")
    assert ok.returncode == 0 and "vllm-compatible" in ok.stdout
    info = cli("info", str(saved_lora))
    assert info.returncode == 0 and "LORA" in info.stdout and "alice/tiny-llama" in info.stdout
    assert "adapter_model.safetensors" in info.stdout

    dora = save_adapter(make_lora(use_dora=True), tmp_path / "dora")
    bad = cli("validate", str(dora), "--for", "vllm")
    assert bad.returncode == 1 and "DoRA" in bad.stdout and "fix:" in bad.stdout
    assert "Not vLLM-compatible" in (dora / "README.md").read_text()


def test_pull_cli_and_card_refresh(saved_lora, alice, repo_name, tmp_path):
    repo_id = f"alice/{repo_name}"
    push_adapter(saved_lora, repo_id, token=alice)
    out = subprocess.run(
        [sys.executable, "-m", "hub_peft.cli", "pull", repo_id, "--to", str(tmp_path / "pulled")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == (
        saved_lora / "adapter_model.safetensors"
    ).read_bytes()
    (tmp_path / "pulled" / "README.md").unlink()
    subprocess.run(
        [sys.executable, "-m", "hub_peft.cli", "card", str(tmp_path / "pulled"), "--repo-id", repo_id],
        check=True,
        capture_output=True,
    )
    assert repo_id in (tmp_path / "pulled" / "README.md").read_text()


# -- bad input -------------------------------------------------------------------------------------


def test_corrupt_and_truncated_safetensors(saved_lora):
    weights = saved_lora / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="corrupt or truncated"):
        load_adapter(load_tiny(), saved_lora)
    weights.write_bytes(b"\x00" * 100)
    assert not validate_adapter(saved_lora).ok


def test_missing_config_and_unknown_type(saved_lora):
    config = json.loads((saved_lora / "adapter_config.json").read_text())
    config["peft_type"] = "MYSTERY"
    (saved_lora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleAdapterError, match="Unknown adapter type 'MYSTERY'"):
        load_adapter(load_tiny(), saved_lora)
    (saved_lora / "adapter_config.json").unlink()
    with pytest.raises(NotFoundError, match=r"adapter_config\.json"):
        load_adapter(load_tiny(), saved_lora)


def test_adapter_for_another_base_names_both(saved_lora):
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=32, max_position_embeddings=2048))
    other.config._name_or_path = "someone/other-base"
    with pytest.raises(IncompatibleAdapterError, match=r"made for alice/tiny-llama.*someone/other-base"):
        load_adapter(other, saved_lora)


def test_bin_only_repo_is_refused(alice, repo_name, tmp_path, tiny_base_repo):  # noqa: F811
    repo_id = f"alice/{repo_name}"
    api = HfApi(token=alice)
    api.create_repo(repo_id)
    api.upload_file(
        path_or_fileobj=json.dumps({"peft_type": "LORA"}).encode(), path_in_repo="adapter_config.json", repo_id=repo_id
    )
    api.upload_file(path_or_fileobj=b"\x80\x04not really a pickle", path_in_repo="adapter_model.bin", repo_id=repo_id)
    with pytest.raises(UnsafeFileError, match=r"only has pickled weights \(adapter_model\.bin\).*convert-bin"):
        load_adapter(load_tiny(), repo_id)


def test_a_repo_with_safetensors_and_old_pickles_loads_the_safetensors(saved_lora, alice, repo_name, tmp_path):
    """Many Hub repos carry an old adapter_model.bin beside the safetensors: load the safetensors, never fetch the
    pickle (here one that would run code if it were ever unpickled), and say so."""
    import pickle

    from test_peft_methods import tiny_tokenizer

    from hub_peft.serving import MultiAdapterModel

    class Payload:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").write_text, ("unpickled",))

    repo_id = f"alice/{repo_name}"
    push_adapter(saved_lora, repo_id, token=alice)
    HfApi(token=alice).upload_file(
        path_or_fileobj=pickle.dumps({"w": Payload()}), path_in_repo="adapter_model.bin", repo_id=repo_id
    )
    assert "adapter_model.bin" in HfApi().list_repo_files(repo_id)
    with pytest.warns(UserWarning, match=r"also holds pickle files \(adapter_model\.bin\).*never downloads"):
        model = load_adapter(load_tiny(), repo_id)
    ids = torch.arange(1, 9)[None]
    torch.testing.assert_close(model(input_ids=ids).logits, load_adapter(load_tiny(), saved_lora)(input_ids=ids).logits)
    with pytest.warns(UserWarning, match="also holds pickle files"):
        engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
        assert engine.add("old-repo", repo_id)["type"] == "lora"
    cli = subprocess.run([sys.executable, "-m", "hub_peft.cli", "validate", repo_id], capture_output=True, text=True)
    assert cli.returncode == 0 and "OK:" in cli.stdout, cli.stdout + cli.stderr
    cache = Path(os.environ["HF_HOME"])
    assert not [p for p in cache.rglob("*.bin") if repo_name in str(p)], "the pickle was downloaded"
    assert not (tmp_path / "pwned").exists()
    local = snapshot_download(repo_id, cache_dir=tmp_path / "full")  # the whole repo, pickle included
    report = validate_adapter(local)
    assert report.ok and report.warnings == [
        "adapter_model.bin ignored: pickle files are never opened; adapter_model.safetensors is what loads"
    ]
    load_adapter(load_tiny(), local)
    assert not (tmp_path / "pwned").exists()


def test_bad_repo_ids_and_missing_things(saved_lora, alice, repo_name):
    with pytest.raises(InvalidInputError, match="Invalid repo id"):
        push_adapter(saved_lora, "not a repo id", token=alice)
    with pytest.raises(NotFoundError):
        load_adapter(load_tiny(), f"alice/{repo_name}-nope")
    repo_id = f"alice/{repo_name}"
    push_adapter(saved_lora, repo_id, token=alice)
    with pytest.raises(NotFoundError, match="Revision"):
        load_adapter(load_tiny(), repo_id, revision="no-such-branch")


def test_push_without_token_or_to_foreign_namespace(saved_lora, bob, repo_name):
    with pytest.raises(HubAuthError, match="write token"):
        push_adapter(saved_lora, f"alice/{repo_name}", token=None)
    with pytest.raises(HubAuthError):
        push_adapter(saved_lora, f"alice/{repo_name}", token=bob)


def test_failed_save_leaves_no_folder(tmp_path, tiny_base_repo, monkeypatch):  # noqa: F811
    model = make_lora()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", explode)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_failed_push_keeps_previous_revision(saved_lora, alice, repo_name, tmp_path):
    repo_id = f"alice/{repo_name}"
    push_adapter(saved_lora, repo_id, token=alice)
    before = HfApi().model_info(repo_id).sha
    weights = saved_lora / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(InvalidInputError):
        push_adapter(saved_lora, repo_id, token=alice)
    assert HfApi().model_info(repo_id).sha == before


def test_convert_bin_only_takes_plain_tensors(tmp_path):
    from hub_peft.adapters import convert_bin

    torch.save({"w": torch.ones(2)}, tmp_path / "adapter_model.bin")
    out = convert_bin(tmp_path)
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["w"], torch.ones(2))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, tmp_path / "adapter_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(UnsafeFileError):
        convert_bin(tmp_path)


def test_cli_chat_with_an_adapter_from_the_hub(saved_lora, alice, repo_name, local_hub):
    repo_id = f"alice/{repo_name}"
    push_adapter(saved_lora, repo_id, token=alice)

    def chat(*extra):
        cmd = [
            sys.executable,
            "-m",
            "hub_peft.cli",
            "chat",
            "a b c d",
            "--raw",
            "--base",
            "alice/tiny-llama",
            "--max-new-tokens",
            "8",
            *extra,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    with_adapter = chat("--adapter", repo_id)
    model = load_adapter(load_tiny(), repo_id)
    from test_peft_methods import tiny_tokenizer

    ids = tiny_tokenizer()("a b c d", return_tensors="pt").input_ids
    expected = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=2)
    decoded = tiny_tokenizer().decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert with_adapter.strip() == decoded
    assert chat().strip() != with_adapter.strip()


def test_a_card_the_hub_refuses_is_never_pushed(saved_lora, alice, repo_name, tmp_path):
    """push_adapter asks the Hub's own validate-yaml route first: refused metadata is a clear error, no repo."""
    import json
    import shutil

    from huggingface_hub import HfApi

    folder = tmp_path / "bad"
    shutil.copytree(saved_lora, folder)
    info = json.loads((folder / "hub_peft_card.json").read_text())
    info["license"] = ["apache-2.0", "mit"]  # the Hub wants one string there
    (folder / "hub_peft_card.json").write_text(json.dumps(info))
    repo_id = f"alice/{repo_name}"
    with pytest.raises(InvalidInputError, match=r"refused the model card's metadata \('license' must be a string"):
        push_adapter(folder, repo_id, token=alice)
    assert not HfApi().repo_exists(repo_id, token=alice)
    assert push_adapter(saved_lora, repo_id, token=alice)  # the same push with valid metadata goes through
