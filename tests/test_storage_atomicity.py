"""Crash-safety of the local Hub's storage and of the embedded model's conversion cache."""

from __future__ import annotations

import pytest

from hub_peft.hub import storage as storage_mod
from hub_peft.hub.storage import AddFile, Storage


def test_crash_before_ref_update_leaves_previous_revision(tmp_path, monkeypatch):
    store = Storage(tmp_path)
    repo = store.create_repo("model", "alice/r", owner="alice", private=False)
    first = store.commit(repo, "main", [AddFile("a.txt", b"v1")], title="t", message="", author="alice")

    real_write_text = storage_mod.write_text

    def crash_on_ref(path, text, **kw):
        if path.parent.name == "refs":
            raise OSError("simulated crash while publishing the commit")
        return real_write_text(path, text, **kw)

    monkeypatch.setattr(storage_mod, "write_text", crash_on_ref)
    with pytest.raises(OSError, match="simulated crash"):
        store.commit(repo, "main", [AddFile("a.txt", b"v2")], title="t2", message="", author="alice")
    monkeypatch.undo()

    reopened = Storage(tmp_path)  # as after a restart
    head = reopened.resolve(reopened.get_repo("model", "alice/r"), "main")
    assert head.id == first.id
    with reopened.open_blob(head.tree["a.txt"]) as f:
        assert f.read() == b"v1"
    assert not list((tmp_path / "repos").rglob("*.tmp"))


def test_failed_embedded_conversion_leaves_no_cache(tmp_path, monkeypatch):
    from hub_peft import base_model

    monkeypatch.setenv("HUB_PEFT_CACHE", str(tmp_path))

    def half_then_crash(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("simulated crash mid-conversion")

    monkeypatch.setattr(base_model, "_convert_gguf", half_then_crash)
    with pytest.raises(RuntimeError, match="mid-conversion"):
        base_model.embedded_model_dir()
    folder = tmp_path / "base_models"
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []
