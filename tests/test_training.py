"""The training entry point shared by the Space and ``hub-peft train``, the CLI twin, and the Space's
handlers for bad input, on the tiny model served by the local Hub."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
import torch
import yaml
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401 - shared session fixture

from hub_peft import load_adapter
from hub_peft.chat import generate_reply, trained_prompt_template
from hub_peft.errors import InvalidInputError
from hub_peft.training import DEFAULTS, TrainSettings, save_trained, train_adapter

ROWS = [{"prompt": f"{a} {b}", "response": f"{b} {a} {b}"} for a, b in zip("abcdefgh", "ijklmnop", strict=True)]
APP = Path(__file__).resolve().parents[1] / "spaces" / "adapter_studio" / "app.py"


def logits(model, ids=((5, 9, 17, 33),)):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


@pytest.mark.parametrize("method", ["reft", "lora"])
def test_train_adapter_saves_a_card_and_leaves_the_base_untouched(method, tiny_base_repo, tmp_path):  # noqa: F811
    base, tokenizer = load_tiny(), tiny_tokenizer()
    before = logits(base)
    trained = train_adapter(ROWS, TrainSettings(method=method, epochs=6, lr=5e-2, batch_size=4), base=(base, tokenizer))
    history = trained.result.history
    assert len(history) == 12 and history[-1]["loss"] < history[0]["loss"]
    assert not torch.allclose(logits(trained.model), before, atol=1e-4)
    folder = save_trained(trained, tmp_path / "adapter", dataset_name="letters")
    assert trained.release() is base
    torch.testing.assert_close(logits(base), before, rtol=0, atol=0)

    card_info = json.loads((folder / "hub_peft_card.json").read_text())
    assert card_info["prompt_template"] == trained.template == "{prompt}"  # the tiny tokenizer has no chat template
    assert card_info["training_args"]["method"] == method and card_info["data"]["count"] == len(ROWS)
    assert (folder / "loss_curve.png").is_file() and "letters" in (folder / "README.md").read_text()
    restored = load_adapter(load_tiny(), folder)
    assert trained_prompt_template(restored) == "{prompt}"


def test_the_default_settings_are_the_emoji_ones():
    settings = TrainSettings().resolved(30)
    assert (settings.method, settings.layers, settings.rank, settings.lr, settings.epochs) == (
        "reft",
        [8, 16],
        4,
        1e-2,
        30,
    )
    assert TrainSettings().resolved(2).layers == [1]
    lora = TrainSettings(method="lora").resolved(30)
    assert (lora.rank, lora.lr, lora.epochs) == (DEFAULTS["lora"]["rank"], 1e-2, 15)
    with pytest.raises(InvalidInputError, match="method must be one of"):
        TrainSettings(method="dora")
    with pytest.raises(InvalidInputError, match="do not exist in a 2-layer model"):
        TrainSettings(layers=[5]).resolved(2)


def test_chat_uses_the_prompt_format_the_adapter_recorded(tiny_base_repo, tmp_path):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    from hub_peft import save_adapter

    torch.manual_seed(0)
    model = get_peft_model(load_tiny(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    save_adapter(model, tmp_path / "lora", prompt_template="w1 w2 {prompt} w3")
    restored = load_adapter(load_tiny(), tmp_path / "lora")
    tok = tiny_tokenizer()
    auto = generate_reply(restored, tok, "a b", max_new_tokens=4)
    assert auto == generate_reply(restored, tok, "a b", max_new_tokens=4, template="w1 w2 {prompt} w3")


def test_hub_peft_train_cli_trains_saves_and_pushes(tiny_base_repo, alice, repo_name, tmp_path):  # noqa: F811
    from huggingface_hub import HfApi

    examples = tmp_path / "examples.jsonl"
    examples.write_text("\n".join(json.dumps(r) for r in [*ROWS, {"prompt": "", "response": "x"}]) + "\n")
    repo_id = f"alice/{repo_name}"
    env = {**os.environ, "HF_TOKEN": alice}
    cmd = [sys.executable, "-m", "hub_peft.cli", "train", "--examples", str(examples), "--method", "reft"]
    cmd += ["--base", "alice/tiny-llama", "--out", str(tmp_path / "out"), "--epochs", "3", "--push", repo_id]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "row 9: empty prompt (skipped)" in out.stderr and "8 examples to train on" in out.stdout
    assert "training reft" in out.stderr  # the progress bar
    assert "trained 3 steps" in out.stdout
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "REFT" and config["layers"] == [1]
    assert "adapter_model.safetensors" in HfApi().list_repo_files(repo_id)
    bad = subprocess.run([*cmd[:-2], "--push", "not a repo"], capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and "Invalid repo id 'not a repo'" in bad.stderr


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("adapter_studio_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_space_reports_bad_uploads_clearly(app, tmp_path):
    def upload(name: str, data: bytes):
        path = tmp_path / name
        path.write_bytes(data)
        return app.on_upload(str(path))

    cases = {
        "empty.jsonl": (b"", "is empty"),
        "photo.png": (b"\x89PNG", "unsupported file type .png"),
        "latin1.csv": (b"prompt,response\nq,caf\xe9\n", "not UTF-8"),
        "big.jsonl": (b"x" * (50 * 2**20), "50.0 MB; the limit is 5 MB"),
        "many.jsonl": (b'{"prompt": "q", "response": "a"}\n' * 10_000, "10,000 examples; the limit is 2,000"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(gr.Error, match=message):
            upload(name, data)
    table, prompt_col, _, pending, note = upload("odd.json", json.dumps([{"q": "hi", "r": "yo"}]).encode())
    assert prompt_col["visible"] and prompt_col["choices"] == ["q", "r"] and "pick the prompt" in note
    mapped, _ = app.on_mapping("q", "r", pending)
    assert mapped.to_dict("records") == [{"prompt": "hi", "response": "yo"}]
    table, *_ = upload("ok.csv", b"prompt,response\nhi,yo\n")
    assert table.to_dict("records") == [{"prompt": "hi", "response": "yo"}]


def test_the_space_preview_flags_long_prompts(app, tiny_base_repo):  # noqa: F811
    import pandas as pd

    rows = pd.DataFrame([{"prompt": "a " * 300, "response": "b"}, {"prompt": "a", "response": "b"}] * 2)
    text = app.preview(rows, "alice/tiny-llama", False)
    assert "2 examples to train on" in text and "2 row(s) skipped" in text
    assert "⛔ row 1: 302 tokens, the limit is 256; shorten it" in text


def test_the_space_holds_out_validation_rows_and_shows_both_curves_and_the_before_after_table(
    app,
    tiny_base_repo,  # noqa: F811
    tmp_path,
):
    """The Studio's training handler: 24 rows, so 10% are held out; the last update has the train and the
    validation curve in one plot and the before/after table with the held-out rows' references. A
    second upload replaces the split (and its rows are never trained on)."""
    import pandas as pd

    rows = pd.DataFrame([{"prompt": f"w{i} w{i + 1}", "response": f"w{i + 2} w{i}"} for i in range(24)])
    request = type("Request", (), {"session_hash": "validation-test", "username": None})()
    args = (rows, [], "LoRA", "alice/tiny-llama", False, 4, "", "l1", 0.05, 2, {})
    *_, last = app.train(*args, request=request, progress=lambda *a, **k: None)
    status, curve, _, card, _, table = last
    assert status.startswith("Done:") and "validation_loss" in status and "exact_match" in status
    assert set(curve["series"]) == {"train", "validation"} and (curve["series"] == "validation").sum() == 2
    assert len(table) == 2 and set(table["prompt"]) <= set(rows["prompt"])
    assert list(table["reference"]) == [rows.set_index("prompt").loc[p, "response"] for p in table["prompt"]]
    assert "### Before / after" in card and "Validation loss" in card
    assert "| vLLM | yes | vLLM-compatible LoRA:" in card  # the preview validates

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows.to_dict("records")[:5]))
    validation, note = app.on_validation_upload(str(held))
    assert len(validation) == 5 and "5 rows from held.jsonl, never trained on" in note
    *_, last = app.train(rows, validation, *args[2:], request=request, progress=lambda *a, **k: None)
    info = json.loads((Path(last[2]["adapter"]) / "hub_peft_card.json").read_text())
    assert info["data"]["count"] == 19 and info["evaluation_details"]["rows"] == 5
    assert not {r["prompt"] for r in info["data"]["samples"]} & {r["prompt"] for r in validation}


def test_the_space_refuses_bad_pushes_without_leaving_a_repo(app, tiny_base_repo, tmp_path, alice, bob, repo_name):  # noqa: F811
    from huggingface_hub import HfApi

    trained = train_adapter(ROWS, TrainSettings(epochs=1), base=(load_tiny(), tiny_tokenizer()))
    state = {"adapter": str(save_trained(trained, tmp_path / "adapter"))}
    with pytest.raises(gr.Error, match="Train an adapter first"):
        app.push("alice/x", False, alice, {})
    with pytest.raises(gr.Error, match="Invalid repo id 'alice/bad name'"):
        app.push("alice/bad name", False, alice, state)
    with pytest.raises(gr.Error, match="refused the token"):
        app.push(f"alice/{repo_name}", False, bob, state)
    with pytest.raises(gr.Error, match="refused the token"):
        app.push(f"alice/{repo_name}", False, "hf_not_a_real_token", state)
    assert not HfApi(token=alice).repo_exists(f"alice/{repo_name}")
    assert "Pushed" in app.push(f"alice/{repo_name}", True, alice, state)
    assert HfApi(token=alice).model_info(f"alice/{repo_name}").private
    with pytest.raises(gr.Error, match="Type a prompt first"):
        app.chat(" ", {})


def test_the_space_chat_runs_on_the_engine_and_answers_as_peft_does(app, tiny_base_repo, tmp_path):  # noqa: F811
    """The Studio's chat: the base's and the adapter's answers from the serving engine in one batch, equal to
    ``generate_reply`` on the base and on PEFT's model; a session that trains again (same folder) is answered
    by its new adapter, not the one loaded before."""
    from hub_peft import load_base_model

    folder = tmp_path / "adapter"
    state = {"base": "alice/tiny-llama", "four_bit": False, "adapter": str(folder)}
    prompt = "a b c d"

    def ordinary(adapter: bool) -> str:
        model, tokenizer = load_base_model("alice/tiny-llama")
        model = load_adapter(model, folder) if adapter else model
        return generate_reply(model, tokenizer, prompt, max_new_tokens=app.MAX_NEW_TOKENS)

    for seed, epochs in ((0, 3), (1, 6)):
        torch.manual_seed(seed)
        trained = train_adapter(ROWS, TrainSettings(epochs=epochs, lr=0.05), base=load_base_model("alice/tiny-llama"))
        save_trained(trained, folder, overwrite=True)  # as the Studio's training job does
        plain, tuned = app.chat(prompt, state)
        assert (plain, tuned) == (ordinary(False), ordinary(True))
    assert plain != tuned, "the adapter should change the answer"
    engine = app.MODELS.engine("alice/tiny-llama", False)
    assert engine.lean_steps > 0  # the chat decoded on the engine's fast path
    assert sum(name.startswith("session-") for name in engine.cache.entries) == 1  # the first one was removed


def test_the_space_is_laid_out_like_a_hub_space():
    import yaml

    folder = APP.parent
    header = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert header["sdk"] == "gradio" and header["sdk_version"] == gr.__version__ and header["app_file"] == "app.py"
    assert {"title", "emoji", "colorFrom", "colorTo", "license"} <= set(header) and header["hf_oauth"] is True
    assert header["models"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    requirements = (folder / "requirements.txt").read_text()
    assert f"gradio=={gr.__version__}" in requirements and "hub-peft" in requirements
    pyproject = (APP.parents[2] / "pyproject.toml").read_text()
    assert f'"gradio=={gr.__version__}"' in pyproject


def test_on_a_space_push_uses_the_oauth_login(app, alice, repo_name, tmp_path, monkeypatch, tiny_base_repo):  # noqa: F811
    """On a Space the "Sign in with Hugging Face" button hands the push handler a gr.OAuthToken; with neither
    a login nor a typed token (nor HF_TOKEN) the push fails with a message saying what to do."""
    from huggingface_hub import HfApi
    from peft import LoraConfig, get_peft_model

    from hub_peft import save_adapter

    model = get_peft_model(load_tiny(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    state = {"adapter": str(save_adapter(model, tmp_path / "lora"))}
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login either
    login = gr.OAuthToken(token=alice, scope="openid profile write-repos", expires_at=2**31)
    message = app.push(f"alice/{repo_name}", False, "", state, oauth_token=login)
    assert message.startswith(f"Pushed: [alice/{repo_name}]") and alice not in message
    assert "adapter_model.safetensors" in HfApi().list_repo_files(f"alice/{repo_name}")
    with pytest.raises(gr.Error) as refused:
        app.push(f"alice/{repo_name}-2", False, "", state, oauth_token=None)
    assert "Paste a write token (or set HF_TOKEN) to push." in str(refused.value), str(refused.value)


@pytest.mark.parametrize("method", ["reft", "lora"])
def test_train_holds_out_a_validation_split_and_reports_its_loss(method, tiny_base_repo, tmp_path, alice, repo_name):  # noqa: F811
    """20+ rows: 10% held out (never also trained on), a validation loss per epoch in the history, the card's
    evaluation (metrics, before/after table, model-index, .eval_results/) and the loss curve; pushed, the
    repo has all of it and passed the Hub's YAML check; --validation FILE instead; below 20 rows, none."""
    rows = [{"prompt": f"w{i} w{i + 1}", "response": f"w{i + 2} w{i} w{i + 3}"} for i in range(30)]
    examples = tmp_path / "rows.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--method", method, "--base", "alice/tiny-llama", "--epochs", "3", "--batch-size", "4", "--lr", "0.05"]
    if method == "reft":
        base += ["--layers", "1"]

    def train(out: str, *extra: str):
        cmd = [sys.executable, "-m", "hub_peft.cli", "train", "--examples", str(examples), "--out", str(tmp_path / out)]
        cmd += [*base, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((tmp_path / out / "hub_peft_card.json").read_text()), done.stdout

    card, stdout = train("split")
    assert "validation: 3 rows held out, 27 to train on" in stdout
    assert card["data"]["count"] == 27 and card["training_args"]["validation_rows"] == 3
    validated = [h for h in card["history"] if "val_loss" in h]
    assert [h["epoch"] for h in validated] == [1, 2, 3] and all(h["val_loss"] > 0 for h in validated)
    assert card["evaluation"]["validation_loss"] == round(validated[-1]["val_loss"], 4)
    assert set(card["evaluation"]) == {"validation_loss", "exact_match", "base_exact_match"}
    assert card["evaluation_details"]["rows"] == card["evaluation_details"]["evaluated"] == 3
    table = card["comparisons"]
    assert len(table) == 3 and all(
        c["reference"] == next(r["response"] for r in rows if r["prompt"] == c["prompt"]) for c in table
    )
    answers = [c["adapter"].strip() == c["reference"] for c in table]
    assert card["evaluation"]["exact_match"] == round(sum(answers) / 3, 4)
    printed = " ".join(f"{h['val_loss']:.3f}" for h in validated)
    assert f"validation loss by epoch: {printed}" in stdout
    assert "evaluation on 3 of 3 held-out rows (greedy): base_exact_match" in stdout
    readme = (tmp_path / "split" / "README.md").read_text()
    assert "### Before / after" in readme and "| Prompt | Reference | Base model | With the adapter |" in readme
    assert f"| {table[0]['prompt']} | {table[0]['reference']} |" in readme
    assert "3 rows held out of training, the first 3 answered by both models" in readme
    assert not (tmp_path / "split" / ".eval_results").exists()  # a local folder has no Hub id to name

    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    env = {**os.environ, "HF_TOKEN": alice}
    done = subprocess.run(
        [sys.executable, "-m", "hub_peft.cli", "push", str(tmp_path / "split"), f"alice/{repo_name}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = HfApi(token=alice).list_repo_files(f"alice/{repo_name}")
    assert ".eval_results/hub_peft.yaml" in files
    pushed_card = ModelCard.load(f"alice/{repo_name}", token=alice)
    pushed_card.validate()  # the Hub's validate-yaml route, as push did before committing
    index = pushed_card.data.to_dict()["model-index"][0]["results"][0]
    assert index["dataset"]["split"] == "validation"
    assert {m["type"]: m["value"] for m in index["metrics"]} == card["evaluation"]
    entries = yaml.safe_load(
        Path(hf_hub_download(f"alice/{repo_name}", ".eval_results/hub_peft.yaml", token=alice)).read_text()
    )
    assert {e["dataset"]["task_id"]: e["value"] for e in entries} == card["evaluation"]
    from huggingface_hub import parse_eval_result_entries

    parsed = parse_eval_result_entries(entries)  # huggingface_hub's own reader of the format
    assert {(e.task_id, e.value, e.source_url) for e in parsed} == {
        (k, v, f"{HfApi().endpoint}/alice/{repo_name}") for k, v in card["evaluation"].items()
    }
    assert all(
        e["dataset"]["id"] == f"alice/{repo_name}"
        and e["date"] == card["evaluation_details"]["date"]
        and "3-row validation split of rows.jsonl, never trained on" in e["notes"]
        for e in entries
    )

    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    card, stdout = train("file", "--validation", str(held))
    assert "5 training row(s) also in" in stdout and card["data"]["count"] == 25
    assert card["training_args"]["validation_rows"] == 5

    examples.write_text("".join(json.dumps(r) + "\n" for r in rows[:12]))
    card, stdout = train("small")
    assert "validation:" not in stdout and card["data"]["count"] == 12 and not card["evaluation"]
    assert not any("val_loss" in h for h in card["history"]) and not card["comparisons"]
    assert "No evaluation metric was computed for this adapter." in (tmp_path / "small" / "README.md").read_text()


def test_the_evaluation_compares_the_base_and_the_adapter_on_held_out_rows(tiny_base_repo):  # noqa: F811
    """Before / after: the base column is the base model's own greedy answer (the adapter switched off
    only while it answers), the adapter column the adapter's; exact match counts the answers equal to the
    references: here half the references are the adapter's own answers, so its exact match is 0.5."""
    from hub_peft.chat import generate_replies
    from hub_peft.evaluation import evaluate_trained

    base = load_tiny()
    prompts = [f"w{i} w{i + 1}" for i in range(4)]
    for method in ("reft", "lora"):
        settings = TrainSettings(method=method, epochs=2, lr=0.05, layers=[1] if method == "reft" else None)
        trained = train_adapter(ROWS, settings, base=(base, tiny_tokenizer()))
        tokenizer, template = trained.tokenizer, trained.template
        own = generate_replies(trained.model, tokenizer, prompts, template=template, max_new_tokens=48)
        trained.validation_rows = [
            {"prompt": p, "response": own[i] if i % 2 else "not this"} for i, p in enumerate(prompts)
        ]
        evaluation = evaluate_trained(trained)
        prompts_only = evaluate_trained(dataclasses.replace(trained, validation_rows=[]), prompts=prompts)
        trained.release()
        plain = generate_replies(base, tokenizer, prompts, template=template, max_new_tokens=48)
        table = evaluation.comparisons
        assert [c.prompt for c in table] == prompts and evaluation.rows == 4 and evaluation.source == "validation"
        # answers stop one token after the longest reference: a prefix of the 48-token ones, whole for the odd rows
        assert [c.adapter for c in table][1::2] == own[1::2] and own != plain, method
        assert all(o.startswith(c.adapter) and p.startswith(c.base) for o, p, c in zip(own, plain, table, strict=True))
        assert evaluation.metrics["exact_match"] == 0.5
        assert (
            evaluation.metrics["base_exact_match"]
            == sum(c.base == r["response"] for c, r in zip(table, trained.validation_rows, strict=True)) / 4
        )
        assert "validation_loss" not in evaluation.metrics  # this run had no validation epochs
        assert prompts_only.source == "held-out prompts" and not prompts_only.metrics
        assert [(c.base, c.adapter) for c in prompts_only.comparisons] == list(zip(plain, own, strict=True))
    trained.validation_rows = []
    assert evaluate_trained(trained) is None


def test_early_stop_ends_training_and_keeps_the_best_epochs_weights(monkeypatch, tiny_base_repo):  # noqa: F811
    """Validation losses 3.0, 2.0, 2.5, 2.7 with patience 2: training stops after epoch 4 (of 10) and the
    adapter gets back exactly the weights it had after epoch 2; its validation loss is epoch 2's."""
    from hub_peft.training import adapter as training

    for method in ("reft", "lora"):
        losses, seen = iter([3.0, 2.0, 2.5, 2.7, 1.0]), []

        def scripted(model, examples, seen=seen, losses=losses, **_):
            seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            return next(losses)

        monkeypatch.setattr(training, "validation_loss", scripted)
        settings = TrainSettings(
            method=method, epochs=10, lr=0.05, batch_size=8, early_stop=2, layers=[1] if method == "reft" else None
        )
        trained = train_adapter(ROWS, settings, base=(load_tiny(), tiny_tokenizer()), validation_rows=ROWS[:2])
        result = trained.result
        assert result.stopped == "early_stop" and len(seen) == 4 and result.steps == 4, method
        assert result.args["restored_epoch"] == 2 and result.final_validation_loss() == 2.0
        params = dict(trained.model.named_parameters())
        for name, weight in seen[1].items():
            torch.testing.assert_close(params[name].detach(), weight, rtol=0, atol=0)
        assert any(not torch.equal(params[n].detach(), w) for n, w in seen[3].items())  # not the last epoch's
        trained.release()
    with pytest.raises(InvalidInputError, match="early_stop needs validation rows"):
        train_adapter(ROWS, TrainSettings(early_stop=2, epochs=1), base=(load_tiny(), tiny_tokenizer()))
