"""The local Hub, exercised only through the unmodified huggingface_hub client (and its HTTP session
for the payloads the client itself refuses to build)."""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, hf_raise_for_status
from test_peft_methods import tiny_llama_config


def _make_folder(tmp_path: Path) -> dict[str, bytes]:
    files = {
        "adapter_config.json": json.dumps({"r": 8}).encode(),
        "weights/part-1.bin": os.urandom(300_000),
        "weights/part-2.bin": os.urandom(12_345),
        "empty.txt": b"",
        "notes/ünïcode name.txt": "héllo".encode(),
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    return files


def test_round_trip_is_byte_exact(api, alice, repo_name, tmp_path):
    repo_id = f"alice/{repo_name}"
    url = api.create_repo(repo_id, token=alice)
    assert url.repo_id == repo_id
    files = _make_folder(tmp_path / "src")
    info = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "src", token=alice)
    assert len(info.oid) == 40

    assert sorted(api.list_repo_files(repo_id)) == sorted([".gitattributes", *files])
    for rel, data in files.items():
        assert Path(hf_hub_download(repo_id, rel, token=False)).read_bytes() == data
    snapshot = Path(snapshot_download(repo_id, cache_dir=tmp_path / "cache2"))
    for rel, data in files.items():
        assert (snapshot / rel).read_bytes() == data

    tree = {e.path: e for e in api.list_repo_tree(repo_id)}
    assert {"weights", "notes", "adapter_config.json"} <= set(tree)
    assert tree["adapter_config.json"].size == len(files["adapter_config.json"])
    refs = api.list_repo_refs(repo_id)
    assert refs.branches[0].name == "main" and refs.branches[0].target_commit == info.oid
    paths = api.get_paths_info(repo_id, ["weights/part-2.bin", "weights", "missing"])
    assert {p.path for p in paths} == {"weights/part-2.bin", "weights"}


def test_snapshot_of_old_revision_after_later_commit(api, alice, repo_name, tmp_path):
    repo_id = f"alice/{repo_name}"
    api.create_repo(repo_id, token=alice)
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=repo_id, token=alice)
    api.upload_file(path_or_fileobj=b"keep", path_in_repo="b.txt", repo_id=repo_id, token=alice)
    api.create_commit(
        repo_id,
        operations=[CommitOperationAdd("a.txt", b"v2"), CommitOperationDelete("b.txt")],
        commit_message="change a, drop b",
        token=alice,
    )
    old = Path(snapshot_download(repo_id, revision=first.oid, cache_dir=tmp_path / "c"))
    assert (old / "a.txt").read_bytes() == b"v1" and not (old / "b.txt").exists()
    new = Path(snapshot_download(repo_id, cache_dir=tmp_path / "c"))
    assert (new / "a.txt").read_bytes() == b"v2" and not (new / "b.txt").exists()
    assert api.model_info(repo_id, revision=first.oid).sha == first.oid
    titles = [c.title for c in api.list_repo_commits(repo_id)]
    assert titles[0] == "change a, drop b" and titles[-1] == "initial commit" and len(titles) == 4


def test_range_requests_and_head(api, alice, repo_name, local_hub):
    repo_id = f"alice/{repo_name}"
    api.create_repo(repo_id, token=alice)
    data = os.urandom(10_000)
    commit = api.upload_file(path_or_fileobj=data, path_in_repo="blob.bin", repo_id=repo_id, token=alice)
    url = f"{local_hub.endpoint}/{repo_id}/resolve/main/blob.bin"
    head = get_session().head(url)
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == commit.oid and int(head.headers["Content-Length"]) == len(data)
    part = get_session().get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = get_session().get(url, headers={"Range": "bytes=-10"})
    assert tail.content == data[-10:]
    assert get_session().get(url, headers={"Range": "bytes=20000-"}).status_code == 416


def test_card_metadata_is_parsed_and_models_listed(api, alice, repo_name):
    repo_id = f"alice/{repo_name}"
    api.create_repo(repo_id, token=alice)
    card = "---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft\ntags:\n- lora\n---\n# Hi\n"
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id, token=alice)
    info = api.model_info(repo_id)
    assert info.card_data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info.library_name == "peft" and "lora" in info.tags
    assert repo_id in {m.id for m in api.list_models(author="alice")}
    assert repo_id not in {m.id for m in api.list_models(author="bob")}


def test_auth_rules(api, alice, bob, repo_name):
    public, private = f"alice/{repo_name}-pub", f"alice/{repo_name}-priv"
    api.create_repo(public, token=alice)
    api.create_repo(private, token=alice, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=private, token=alice)

    assert api.whoami(token=alice)["name"] == "alice"
    with pytest.raises(HfHubHTTPError) as e:
        api.whoami(token="hf_not_a_real_token")
    assert e.value.response.status_code == 401

    # Anonymous may read public repos.
    assert api.model_info(public, token=False).id == public
    assert Path(hf_hub_download(public, ".gitattributes", token=False)).exists()
    # Private repos are invisible (404) to anyone but the owner.
    for token in (False, bob):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(private, token=token)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(private, "s.txt", token=token, cache_dir="/tmp/never-used-cache")
    assert private not in {m.id for m in api.list_models(author="alice", token=bob)}
    assert private in {m.id for m in api.list_models(author="alice", token=alice)}
    assert api.model_info(private, token=alice).private is True

    # Writing needs the namespace owner's token.
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=public, token=bob)
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo(f"alice/{repo_name}-by-bob", token=bob)
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        api.delete_repo(public, token=bob)
    assert e.value.response.status_code == 403
    assert api.list_repo_files(public) == [".gitattributes"]


def _raw_commit(endpoint: str, repo_id: str, token: str, lines: list[dict] | bytes):
    body = lines if isinstance(lines, bytes) else b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    return get_session().post(
        f"{endpoint}/api/models/{repo_id}/commit/main",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"},
    )


@pytest.mark.parametrize(
    "bad_path", ["../escape.txt", "a/../../b", "/etc/passwd", "a//b", "./a", "C:/x", "a\\..\\b", ".git/config"]
)
def test_path_traversal_is_refused(api, alice, repo_name, local_hub, bad_path):
    repo_id = f"alice/{repo_name}"
    api.create_repo(repo_id, token=alice)
    before = api.model_info(repo_id).sha
    good = {
        "key": "file",
        "value": {"path": "ok.txt", "content": base64.b64encode(b"ok").decode(), "encoding": "base64"},
    }
    bad = {"key": "file", "value": {"path": bad_path, "content": base64.b64encode(b"x").decode(), "encoding": "base64"}}
    response = _raw_commit(
        local_hub.endpoint, repo_id, alice, [{"key": "header", "value": {"summary": "s"}}, good, bad]
    )
    with pytest.raises(BadRequestError, match="Invalid path"):
        hf_raise_for_status(response)
    # Rejected as a whole: the valid file of the same commit is not there, the revision is unchanged.
    assert api.model_info(repo_id).sha == before
    assert api.list_repo_files(repo_id) == [".gitattributes"]


@pytest.mark.parametrize(
    "payload",
    [
        b"this is not json\n",
        b'{"key": "file", "value": {"path": "a.txt", "content": "aGk=", "encoding": "base64"}}\n',  # no header
        b'{"key": "header", "value": {"summary": "s"}}\n{"key": "file", "value": {"path": "a", "content": "@@@"}}\n',
        b'{"key": "header", "value": {"summary": "s"}}\n{"key": "mystery", "value": {}}\n',
        b'{"key": "header", "value": {"summary": "s"}}\n[1, 2, 3]\n',
    ],
)
def test_malformed_commit_payloads_are_refused(api, alice, repo_name, local_hub, payload):
    repo_id = f"alice/{repo_name}"
    api.create_repo(repo_id, token=alice)
    before = api.model_info(repo_id).sha
    with pytest.raises(BadRequestError):
        hf_raise_for_status(_raw_commit(local_hub.endpoint, repo_id, alice, payload))
    assert api.model_info(repo_id).sha == before


def test_invalid_repo_ids_and_unknown_things(api, alice, repo_name, local_hub):
    for name in ("../etc", "a--b", "-start", "x" * 97):
        r = get_session().post(
            f"{local_hub.endpoint}/api/repos/create",
            json={"name": name, "type": "model"},
            headers={"Authorization": f"Bearer {alice}"},
        )
        with pytest.raises(BadRequestError):
            hf_raise_for_status(r)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"alice/{repo_name}-missing")
    repo_id = f"alice/{repo_name}"
    api.create_repo(repo_id, token=alice)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo(repo_id, token=alice)
    assert e.value.response.status_code == 409
    api.create_repo(repo_id, token=alice, exist_ok=True)
    api.delete_repo(repo_id, token=alice)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)


def test_stale_parent_commit_is_refused(api, alice, repo_name):
    repo_id = f"alice/{repo_name}"
    api.create_repo(repo_id, token=alice)
    base = api.model_info(repo_id).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id=repo_id, token=alice)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit(
            repo_id,
            operations=[CommitOperationAdd("two.txt", b"2")],
            commit_message="m",
            parent_commit=base,
            token=alice,
        )
    assert e.value.response.status_code == 412
    assert "two.txt" not in api.list_repo_files(repo_id)


def test_concurrent_uploads_keep_every_commit(api, alice, repo_name):
    repo_id = f"alice/{repo_name}"
    api.create_repo(repo_id, token=alice)
    errors: list[BaseException] = []

    def push(i: int) -> None:
        try:
            for j in range(3):
                api.create_commit(
                    repo_id,
                    operations=[
                        CommitOperationAdd(f"t{i}/f{j}.txt", f"{i}-{j}".encode()),
                        CommitOperationAdd("shared.txt", f"{i}-{j}".encode()),
                    ],
                    commit_message=f"thread {i} step {j}",
                    token=alice,
                )
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    commits = api.list_repo_commits(repo_id)
    assert len(commits) == 1 + 8 * 3
    assert len({c.commit_id for c in commits}) == len(commits)
    files = set(api.list_repo_files(repo_id))
    assert {f"t{i}/f{j}.txt" for i in range(8) for j in range(3)} <= files
    # shared.txt holds the content of whichever commit came last, and each thread's own steps are in order.
    last_title = commits[0].title
    i, j = int(last_title.split()[1]), int(last_title.split()[3])
    assert Path(hf_hub_download(repo_id, "shared.txt")).read_text() == f"{i}-{j}"
    for i in range(8):
        order = [int(c.title.split()[3]) for c in reversed(commits) if c.title.startswith(f"thread {i} ")]
        assert order == [0, 1, 2]


def test_transformers_loads_a_model_from_the_local_hub(api, alice, repo_name, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=64, hidden_size=32)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "m")
    repo_id = f"alice/{repo_name}"
    api.create_repo(repo_id, token=alice)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "m", token=alice)
    loaded = AutoModelForCausalLM.from_pretrained(repo_id)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_tokens_never_reach_the_server_log(local_hub, api, alice, bob, repo_name):
    api.create_repo(f"alice/{repo_name}", token=alice)
    with pytest.raises(HfHubHTTPError):
        api.create_repo(f"alice/{repo_name}-x", token=bob)
    log = local_hub.log_path.read_text()
    assert "POST /api/repos/create" in log
    assert alice not in log and bob not in log


def test_a_started_hub_leaves_its_tokens_nowhere_on_disk_or_in_ps(tmp_path, monkeypatch):
    """The tokens file lives in a private folder of its own for as long as the child takes to read it."""
    import secrets
    import stat
    import tempfile

    from hub_peft.hub import start_local_hub
    from hub_peft.hub.process import runtime_dir

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert runtime_dir() == runtime
    root, token = tmp_path / "hub", secrets.token_urlsafe(24)
    root.mkdir()
    (root / ".tokens").write_text("me=an-old-token\n")  # what an older version left in a shared folder
    seen: list[tuple[Path, int]] = []
    real_mkdtemp = tempfile.mkdtemp

    def watched_mkdtemp(*args, **kwargs):
        path = real_mkdtemp(*args, **kwargs)
        seen.append((Path(path), stat.S_IMODE(os.stat(path).st_mode)))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", watched_mkdtemp)
    with start_local_hub(root, tokens={"me": token}) as hub:
        assert token not in Path(f"/proc/{hub.process.pid}/cmdline").read_text()
        assert [(p.parent, mode) for p, mode in seen] == [(runtime, 0o700)] and not seen[0][0].exists()
        for path in [*root.rglob("*"), *runtime.rglob("*")]:
            assert not path.is_file() or token.encode() not in path.read_bytes(), path
        assert not (root / ".tokens").exists()
        from huggingface_hub import HfApi

        assert HfApi(endpoint=hub.endpoint, token=token).whoami()["name"] == "me"  # the child did read it


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def test_a_one_gib_commit_streams_through_the_server_in_bounded_memory(local_hub, alice, repo_name):
    """The commit body (1.33 GiB of NDJSON) is parsed as it arrives: the server's peak memory grows by far
    less than the body, and the stored file has the hashes of the bytes that were sent."""
    import hashlib

    import httpx

    repo_id = f"alice/{repo_name}"
    from huggingface_hub import HfApi

    HfApi(endpoint=local_hub.endpoint, token=alice).create_repo(repo_id)
    size, piece = 1 << 30, 3 << 20  # 1 GiB, sent 3 MiB (4 MiB of base64) at a time
    sha256, git = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())

    def body():
        header = {"key": "header", "value": {"summary": "one GiB", "description": ""}}
        yield json.dumps(header).encode() + b"\n" + b'{"key": "file", "value": {"content": "'
        block = bytes(range(256)) * (piece // 256)
        for i in range(size // piece + 1):
            data = (block if i % 2 else block[::-1])[: min(piece, size - i * piece)]
            if not data:
                break
            sha256.update(data)
            git.update(data)
            yield base64.b64encode(data)
        yield b'", "path": "big.bin", "encoding": "base64"}}\n'

    before = _peak_rss(local_hub.process.pid)
    response = httpx.post(
        f"{local_hub.endpoint}/api/models/{repo_id}/commit/main",
        content=body(),
        timeout=600,
        headers={"authorization": f"Bearer {alice}", "content-type": "application/x-ndjson"},
    )
    assert response.status_code == 200, response.text
    growth = _peak_rss(local_hub.process.pid) - before
    print(f"1 GiB commit: the server's peak memory grew by {growth / 2**20:.0f} MiB")
    assert growth < 200 * 2**20, f"the server's peak memory grew by {growth / 2**20:.0f} MiB for a 1 GiB file"
    head = httpx.head(f"{local_hub.endpoint}/{repo_id}/resolve/main/big.bin")
    assert int(head.headers["content-length"]) == size and head.headers["etag"] == f'"{git.hexdigest()}"'
    blob = local_hub.root / "blobs" / sha256.hexdigest()[:2] / sha256.hexdigest()[2:]
    assert blob.stat().st_size == size
    assert not list((local_hub.root / "tmp").glob("upload-*")), "a staged upload was left behind"


def test_commit_bodies_are_limited_while_read_and_bad_ones_leave_nothing(tmp_path):
    from starlette.testclient import TestClient

    from hub_peft.hub.server import LocalHub

    hub = LocalHub(tmp_path / "hub", {"tok": "alice"}, max_commit_bytes=3 << 20)
    client = TestClient(hub.app)
    auth = {"authorization": "Bearer tok"}
    assert client.post("/api/repos/create", json={"name": "r", "type": "model"}, headers=auth).status_code == 200

    def commit(content: bytes):
        line = b'{"key": "header", "value": {"summary": "s"}}\n{"key": "file", "value": {"content": "' + content
        return client.post("/api/models/alice/r/commit/main", content=line + b'", "path": "f.bin"}}\n', headers=auth)

    too_big = commit(base64.b64encode(os.urandom(3 << 20)))  # 4 MiB of base64 against a 3 MiB limit
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    not_base64 = commit(b"A" * (2 << 20) + b"!!!!")  # a large (streamed) line with a bad character
    assert not_base64.status_code == 400 and "base64" in not_base64.json()["error"]
    good = commit(base64.b64encode(b"x" * (2 << 20)))
    assert good.status_code == 200, good.text
    assert client.get("/alice/r/resolve/main/f.bin").content == b"x" * (2 << 20)
    assert not list((tmp_path / "hub" / "tmp").glob("upload-*"))
    assert client.post("/api/models/alice/r/commit/main", content=b"x", headers={}).status_code == 401
