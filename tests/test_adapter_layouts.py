"""Where an adapter is inside a repo or folder: sub-folders (``REPO@REV:SUBFOLDER``), PEFT's multi-adapter saves,
adapters trained after adding tokens (a resized vocabulary), and what a saved folder's card and mode say."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401 - shared session fixture

from hub_peft import load_adapter, save_adapter
from hub_peft.adapters import parse_adapter_spec, resolve_adapter
from hub_peft.errors import IncompatibleAdapterError, InvalidInputError, NotFoundError
from hub_peft.serving import MultiAdapterModel

IDS = torch.tensor([[1, 5, 9, 30, 31, 7, 2, 40]])


def boosted(model):
    """LoRA deltas large enough to change greedy tokens of the tiny model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    return model


def lora(seed: int, targets: list[str], r: int = 4, **kwargs):
    from peft import LoraConfig

    torch.manual_seed(seed)
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **kwargs)


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_logits(repo_or_folder, ids=IDS, base=None, **kwargs) -> torch.Tensor:
    """Plain PEFT, the independent reference."""
    from peft import PeftModel

    return logits(
        PeftModel.from_pretrained(base if base is not None else load_tiny(), str(repo_or_folder), **kwargs), ids
    )


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hub_peft.cli", *args], capture_output=True, text=True, timeout=300)


def test_one_adapter_spec_syntax(tmp_path, monkeypatch):
    assert parse_adapter_spec("me/runs") == ("me/runs", None, None)
    assert parse_adapter_spec("me/runs@v2") == ("me/runs", "v2", None)
    assert parse_adapter_spec("me/runs:checkpoint-final") == ("me/runs", None, "checkpoint-final")
    assert parse_adapter_spec("me/runs@refs/pr/1:runs/best/") == ("me/runs", "refs/pr/1", "runs/best")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my@dir:x" / "sub").mkdir(parents=True)
    assert parse_adapter_spec("my@dir:x") == ("my@dir:x", None, None)  # an existing path is taken as is
    assert parse_adapter_spec("my@dir:x:sub") == ("my@dir:x", None, "sub")  # FOLDER:SUBFOLDER
    assert parse_adapter_spec(f"{tmp_path}/my@dir:x:sub") == (f"{tmp_path}/my@dir:x", None, "sub")
    assert parse_adapter_spec("./missing:sub") == ("./missing:sub", None, None)  # a path, never a repo
    with pytest.raises(InvalidInputError, match="revision comes before the sub-folder"):
        parse_adapter_spec("me/runs:final@v2")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InvalidInputError, match="names a revision of a Hub repo only"):
        parse_adapter_spec("folder@v2")
    for bad in ("me/runs@", "me/runs:", "@v2", ""):
        with pytest.raises(InvalidInputError):
            parse_adapter_spec(bad)
    for unsafe in ("../up", "/etc", "a/../../b", "a\\b"):
        with pytest.raises(InvalidInputError, match="Invalid sub-folder"):
            parse_adapter_spec(f"me/runs:{unsafe}")
        with pytest.raises(InvalidInputError, match="Invalid sub-folder"):
            load_adapter(object(), tmp_path, subfolder=unsafe)  # refused before anything is read


# -- PEFT's multi-adapter saves ------------------------------------------------------------------------


@pytest.fixture
def multi_adapter_repo(tiny_base_repo, alice, repo_name, tmp_path):  # noqa: F811
    """What plain PEFT writes for a model with two adapters: "default" at the root, "other" in other/."""
    from peft import get_peft_model

    model = get_peft_model(load_tiny(), lora(3, ["q_proj", "v_proj"]))
    model.add_adapter("other", lora(4, ["k_proj", "o_proj"], r=2))
    folder = tmp_path / "multi"
    model.save_pretrained(folder)
    assert (folder / "adapter_config.json").is_file() and (folder / "other" / "adapter_config.json").is_file()
    repo_id = f"alice/{repo_name}"
    api = HfApi(token=alice)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    return repo_id, folder


def test_a_multi_adapter_repo_gives_the_adapter_of_that_name(multi_adapter_repo):
    repo_id, folder = multi_adapter_repo
    expected_other = peft_logits(repo_id, subfolder="other")
    expected_root = peft_logits(repo_id)
    assert not torch.allclose(expected_other, expected_root, atol=1e-3), "the two adapters must differ"

    torch.testing.assert_close(
        logits(load_adapter(load_tiny(), repo_id, adapter_name="other")), expected_other, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(logits(load_adapter(load_tiny(), repo_id)), expected_root, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        logits(load_adapter(load_tiny(), folder, adapter_name="other")), expected_other, rtol=0, atol=1e-6
    )

    # PEFT's own way: the root adapter, then load_adapter(folder/"other", "other") on the same model
    from peft import PeftModel

    reference = PeftModel.from_pretrained(load_tiny(), str(folder))
    reference.load_adapter(str(folder / "other"), adapter_name="other")
    reference.set_adapter("other")
    ours = load_adapter(load_adapter(load_tiny(), repo_id), repo_id, adapter_name="other")
    assert set(ours.peft_config) == {"default", "other"} and ours.active_adapter == "other"
    torch.testing.assert_close(logits(ours), logits(reference), rtol=0, atol=1e-6)

    for source in (repo_id, folder):
        with pytest.raises(NotFoundError, match=r"default \(the root\), 'other'\) and none named 'nope'"):
            load_adapter(load_tiny(), source, adapter_name="nope")
    renamed = load_adapter(load_tiny(), repo_id, adapter_name="nope", subfolder="")  # the root's, named at will
    assert set(renamed.peft_config) == {"nope"}
    torch.testing.assert_close(logits(renamed), expected_root, rtol=0, atol=1e-6)


# -- sub-folders -----------------------------------------------------------------------------------------


@pytest.fixture
def checkpoints_repo(tiny_base_repo, alice, repo_name, tmp_path):  # noqa: F811
    """A training run's repo: two checkpoints in sub-folders (one with an optimizer pickle), none at the root."""
    from peft import get_peft_model

    run = tmp_path / "run"
    save_adapter(boosted(get_peft_model(load_tiny(), lora(5, ["q_proj", "v_proj"]))), run / "checkpoint-100")
    final = save_adapter(
        boosted(get_peft_model(load_tiny(), lora(6, ["q_proj", "v_proj", "down_proj"]))), run / "checkpoint-final"
    )
    torch.save({"step": 1}, run / "checkpoint-final" / "optimizer.pt")
    (run / "notes.txt").write_text("training notes")
    repo_id = f"alice/{repo_name}"
    api = HfApi(token=alice)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=run)
    return repo_id, final


def test_an_adapter_in_a_sub_folder_of_a_repo(checkpoints_repo, tmp_path):
    repo_id, final = checkpoints_repo
    resolved = resolve_adapter(repo_id, subfolder="checkpoint-final")
    snapshot = resolved.folder.parent
    assert resolved.folder.name == "checkpoint-final" and resolved.subfolder == "checkpoint-final"
    assert resolved.cache_key == f"hub:{repo_id}@{HfApi().model_info(repo_id).sha}:checkpoint-final"
    assert sorted(p.name for p in snapshot.iterdir()) == ["checkpoint-final"], "only the sub-folder is downloaded"
    assert not (resolved.folder / "optimizer.pt").exists(), "pickles are never downloaded"

    ours = load_adapter(load_tiny(), repo_id, subfolder="checkpoint-final")
    expected = peft_logits(repo_id, subfolder="checkpoint-final")
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(
        logits(load_adapter(load_tiny(), repo_id, subfolder="checkpoint-100")), expected, atol=1e-3
    )
    torch.testing.assert_close(
        logits(load_adapter(load_tiny(), final.parent, subfolder="checkpoint-final")), expected, rtol=0, atol=1e-6
    )

    with pytest.raises(
        NotFoundError,
        match=r"no adapter at its root, only in sub-folders: 'checkpoint-100', "
        r"'checkpoint-final'.*:checkpoint-100",
    ):
        load_adapter(load_tiny(), repo_id)
    with pytest.raises(NotFoundError, match=r"no adapter in its sub-folder 'nope'.*'checkpoint-100', 'checkpoint"):
        load_adapter(load_tiny(), repo_id, subfolder="nope")

    pulled = cli("pull", f"{repo_id}@main:checkpoint-final", "--to", str(tmp_path / "pulled"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == (
        final / "adapter_model.safetensors"
    ).read_bytes()
    assert not (tmp_path / "pulled" / "optimizer.pt").exists()
    ok = cli("validate", f"{repo_id}:checkpoint-final")
    assert ok.returncode == 0 and f"OK: {repo_id}:checkpoint-final is a valid LORA adapter" in ok.stdout, ok.stderr
    missing = cli("validate", f"{repo_id}:nope")
    assert missing.returncode == 2 and "'checkpoint-100', 'checkpoint-final'" in missing.stderr
    unsafe = cli("pull", f"{repo_id}:../x", "--to", str(tmp_path / "x"))
    assert unsafe.returncode == 2 and "Invalid sub-folder '../x'" in unsafe.stderr


def test_the_engine_serves_an_adapter_from_a_sub_folder(checkpoints_repo):
    from test_server import serving

    from hub_peft.chat import encode_prompt, prompt_template

    repo_id, final = checkpoints_repo
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    info = engine.add("final", repo_id, subfolder="checkpoint-final")
    early = engine.add("early", repo_id, subfolder="checkpoint-100")
    sha = HfApi().model_info(repo_id).sha
    assert info["key"] == f"hub:{repo_id}@{sha}:checkpoint-final" and info["subfolder"] == "checkpoint-final"
    assert early["key"] == f"hub:{repo_id}@{sha}:checkpoint-100"

    tokenizer, prompt = tiny_tokenizer(), "a b c d"
    ids = torch.tensor([encode_prompt(tokenizer, prompt, prompt_template(tokenizer))])
    got = engine.next_token_logits([prompt, prompt], ["final", "early"])
    torch.testing.assert_close(
        got[0], peft_logits(repo_id, ids, subfolder="checkpoint-final")[0, -1], rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(
        got[1], peft_logits(repo_id, ids, subfolder="checkpoint-100")[0, -1], rtol=1e-4, atol=1e-4
    )
    engine.add("local", final)  # the same files from a folder, for the server's answers below

    with serving(engine, allow_hub_pattern="alice/*", admin_token="admin") as client:

        def answer(model: str) -> str:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 5,
                "temperature": 0,
            }
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        assert answer(f"{repo_id}:checkpoint-final") == answer("local") != answer("early")
        auth = {"authorization": "Bearer admin"}
        loaded = client.post(
            "/admin/adapters",
            headers=auth,
            json={"name": "admin-final", "source": repo_id, "subfolder": "checkpoint-final"},
        )
        assert loaded.status_code == 200 and loaded.json()["key"] == info["key"]
        assert answer("admin-final") == answer("local")
        twice = client.post(
            "/admin/adapters",
            headers=auth,
            json={"name": "x", "subfolder": "checkpoint-100", "source": f"{repo_id}:checkpoint-final"},
        )
        assert twice.status_code == 400 and "subfolder is given twice" in twice.text
        bad = client.post("/admin/adapters", headers=auth, json={"name": "y", "source": f"{repo_id}:../x"})
        assert bad.status_code == 400 and "Invalid sub-folder" in bad.text


# -- added tokens ----------------------------------------------------------------------------------------


def resized_base(n: int):
    torch.manual_seed(11)  # the new rows are drawn at random: the same ones for every resized base here
    base = load_tiny()
    base.resize_token_embeddings(n)
    return base


@pytest.mark.parametrize("layers", ["modules_to_save", "lora"])
def test_an_adapter_trained_after_adding_tokens(layers, tiny_base_repo, tmp_path):  # noqa: F811
    from peft import get_peft_model
    from transformers import AutoTokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<tool>", "</tool>"])
    n = len(tokenizer)
    assert n == 130
    if layers == "modules_to_save":
        config = lora(7, ["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    else:
        config = lora(7, ["q_proj", "v_proj", "embed_tokens", "lm_head"])
    model = get_peft_model(resized_base(n), config)
    with torch.no_grad():  # trained rows, not copies of the base's
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    folder = save_adapter(model, tmp_path / "tools", tokenizer=tokenizer)
    assert (folder / "tokenizer_config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert len(AutoTokenizer.from_pretrained(folder)) == n

    refusal = rf"resize the base's embeddings to {n} before loading it \(base\.resize_token_embeddings\({n}\)\)"
    with pytest.raises(IncompatibleAdapterError, match=refusal) as refused:
        load_adapter(load_tiny(), folder)
    assert "a vocabulary of 128" in str(refused.value) and "tokenizer saved with the adapter" in str(refused.value)
    with pytest.raises(IncompatibleAdapterError, match=refusal):
        MultiAdapterModel((load_tiny(), tiny_tokenizer())).add("tools", folder)

    ids = torch.tensor([[1, 5, 128, 9, 129, 2]])  # with the added tokens
    ours = load_adapter(resized_base(n), folder)
    torch.testing.assert_close(logits(ours, ids), peft_logits(folder, ids, base=resized_base(n)), rtol=0, atol=1e-6)
    engine = MultiAdapterModel((resized_base(n), tokenizer))
    assert engine.add("tools", folder)["type"] == "lora"

    plain = save_adapter(get_peft_model(load_tiny(), lora(8, ["q_proj"])), tmp_path / "plain", tokenizer=tokenizer)
    assert not (plain / "tokenizer_config.json").exists(), "no vocabulary rows, no tokenizer"


# -- the saved folder ------------------------------------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("kind", ["lora", "reft"])
def test_a_saved_card_names_the_final_folder_with_the_users_permissions(kind, tiny_base_repo, tmp_path):  # noqa: F811
    from peft import get_peft_model

    from hub_peft.reft import ReftConfig, get_reft_model

    model = (
        get_peft_model(load_tiny(), lora(9, ["q_proj"]))
        if kind == "lora"
        else get_reft_model(load_tiny(), ReftConfig(layers=[1]))
    )
    out = tmp_path / "out" / f"{kind}_a"
    previous = os.umask(0o027)
    try:
        folder = save_adapter(model, out)
    finally:
        os.umask(previous)
    card = (folder / "README.md").read_text()
    call = "PeftModel.from_pretrained(base" if kind == "lora" else "load_adapter(base"
    assert f'{call}, "{out}")' in card and f"--adapter {out}" in card
    assert ".partial" not in card
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~0o027 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
    assert modes and set(modes.values()) == {0o666 & ~0o027}, modes
    assert [p.name for p in folder.parent.iterdir()] == [f"{kind}_a"], "no staging folder is left behind"
    folder = save_adapter(model, tmp_path / "again", overwrite=True)
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~current_umask()
