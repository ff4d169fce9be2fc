"""The local Hub's commit path against hostile uploads, through a real server process.

Each test reproduces one finding of the security review and checks the new behaviour: a model card whose YAML
expands (billion laughs) on every ``model_info``/``list_models``; commits whose memory grew with the number of
small files, or with a field sent after a streamed file's content; staging files a killed commit left behind;
file names with control or bidi characters; a path both a file and a folder; a NUL in a revision.

NOTE(tests): the memory tests measure the peak resident memory (VmHWM) of a hub of this module's own, reset
before each measure where Linux allows it (``/proc/PID/clear_refs``), so that no earlier test's peak hides one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from hub_peft.hub import LocalHubProcess, start_local_hub
from hub_peft.hub.card import MAX_FRONT_MATTER_BYTES
from hub_peft.hub.commit_stream import MAX_AFTER_CONTENT, MAX_COMMIT_OPERATIONS
from hub_peft.hub.storage import AddFile, Storage

TOKENS = {name: f"hf_{name}_{secrets.token_hex(16)}" for name in ("alice", "bob")}
MiB = 1 << 20

# The review's 401-byte card: nine levels of nine aliases, 9**9 "lol"s once expanded.
BILLION_LAUGHS = (
    "---\n"
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
    "tags: *i\n---\n# A card\n"
)


# -- helpers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[LocalHubProcess]:
    """A hub of this module's own, so that its memory peak is this module's."""
    with start_local_hub(tmp_path_factory.mktemp("commits_hub"), tokens=TOKENS) as running:
        yield running


@pytest.fixture
def repo(hub: LocalHubProcess, repo_name: str) -> str:
    """A fresh repo of alice's, holding only its initial commit."""
    repo_id = f"alice/{repo_name}"
    with _client(hub) as c:
        assert c.post("/api/repos/create", json={"name": repo_name, "type": "model"}).status_code == 200
    return repo_id


def _client(hub: LocalHubProcess, token: str | None = TOKENS["alice"]) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=hub.endpoint, headers=headers, timeout=120)


def _line(key: str, value: dict) -> bytes:
    return json.dumps({"key": key, "value": value}).encode() + b"\n"


def _file(path: str, data: bytes) -> bytes:
    return _line("file", {"content": base64.b64encode(data).decode(), "path": path, "encoding": "base64"})


def _header(summary: str = "s") -> bytes:
    return _line("header", {"summary": summary, "description": ""})


def _commit(
    hub: LocalHubProcess, repo_id: str, body: bytes | Iterable[bytes], revision: str = "main"
) -> httpx.Response:
    with _client(hub) as c:
        return c.post(
            f"/api/models/{repo_id}/commit/{revision}", content=body, headers={"content-type": "application/x-ndjson"}
        )


def _head(hub: LocalHubProcess, repo_id: str) -> str:
    with _client(hub) as c:
        return c.get(f"/api/models/{repo_id}").json()["sha"]


def _files(hub: LocalHubProcess, repo_id: str) -> dict[str, int]:
    with _client(hub) as c:
        return {s["rfilename"]: s["size"] for s in c.get(f"/api/models/{repo_id}").json()["siblings"]}


def _staged(hub: LocalHubProcess) -> list[Path]:
    return list((hub.root / "tmp").glob("upload-*"))


def _reset_peak(pid: int) -> None:
    """Start the process's VmHWM afresh from its current RSS (Linux 4.0+; a no-op where refused)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def _refused(response: httpx.Response, *fragments: str) -> str:
    """Assert a clean 400 whose message holds ``fragments``; returns the message."""
    assert response.status_code == 400, (response.status_code, response.text[:500])
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    header = response.headers["x-error-message"]
    assert header.isascii() and header.isprintable(), header
    return message


def _legacy_repo(hub: LocalHubProcess, repo_name: str, files: dict[str, bytes]) -> str:
    """A public repo holding ``files``, written straight into the hub's storage as a hub before the commit
    checks would have stored it (the server reads repos from disk on every request)."""
    storage = Storage(hub.root)
    repo = storage.create_repo("model", f"alice/{repo_name}", owner="alice", private=False)
    storage.commit(repo, "main", [AddFile(p, d) for p, d in files.items()], title="old", message="", author="alice")
    return repo.repo_id


# -- (3) YAML aliases in a model card ------------------------------------------------------------------------
def test_a_card_with_yaml_aliases_is_refused_at_commit(hub, repo):
    """The 401-byte billion-laughs card was stored, and then every model_info and anonymous list_models
    returned 131 MB; now the commit is refused and says what to do."""
    from huggingface_hub import HfApi

    before = _head(hub, repo)
    api = HfApi(endpoint=hub.endpoint, token=TOKENS["alice"])
    with pytest.raises(ValueError, match="anchor or an alias"):  # the client asks the hub's validate-yaml first
        api.upload_file(path_or_fileobj=BILLION_LAUGHS.encode(), path_in_repo="README.md", repo_id=repo)
    r = _commit(hub, repo, _header() + _file("README.md", BILLION_LAUGHS.encode()))  # and the commit path itself
    _refused(r, "Invalid metadata in README.md", "anchor or an alias", "write each value out in full")
    assert len(BILLION_LAUGHS) < 500 and _head(hub, repo) == before and not _staged(hub)
    # An anchor alone is refused too (it has no other use than an alias), and so is validate-yaml's answer.
    r = _commit(hub, repo, _header() + _file("README.md", b"---\nlicense: &l mit\n---\n"))
    _refused(r, "Invalid metadata in README.md", "anchor or an alias")
    with _client(hub) as c:
        r = c.post("/api/validate-yaml", json={"content": BILLION_LAUGHS, "repoType": "model"})
    assert r.status_code == 400 and "anchor or an alias" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize(
    ("card", "fragment"),
    [
        ("---\ndescription: " + "x" * (MAX_FRONT_MATTER_BYTES + 10) + "\n---\n", "over the 64 KiB limit"),
        ("---\ntags: [" + "a, " * (MAX_FRONT_MATTER_BYTES // 3 + 2000) + "b]\n", "does not close within"),
        ("---\nscore: .nan\n---\n", "NaN or an infinity"),
        ("---\nblob: !!binary aGk=\n---\n", "of type 'bytes'"),
        ("---\n" + "x: " + "[" * 70 + "]" * 70 + "\n---\n", "more than 64 levels"),
    ],
    ids=["too-large", "unclosed", "nan", "binary", "too-deep"],
)
def test_card_metadata_must_be_small_json_like_data(hub, repo, card, fragment):
    before = _head(hub, repo)
    _refused(_commit(hub, repo, _header() + _file("README.md", card.encode())), "README.md", fragment)
    assert _head(hub, repo) == before


def test_a_card_with_a_date_is_accepted_and_reads_back_as_a_string(hub, repo):
    """A timestamp used to come back as a datetime, which JSON cannot carry: model_info answered 500."""
    card = "---\nlicense: mit\ndate: 2024-05-01\ntags: [lora]\n---\n# Hi\n"
    assert _commit(hub, repo, _header() + _file("README.md", card.encode())).status_code == 200
    with _client(hub, None) as c:
        info = c.get(f"/api/models/{repo}").json()
    assert info["cardData"] == {"license": "mit", "date": "2024-05-01", "tags": ["lora"]}
    assert "lora" in info["tags"]


def test_a_stored_alias_card_reads_as_no_metadata_in_bounded_memory(hub, repo_name):
    """A repo committed before this change may still hold a billion-laughs card: model_info, the anonymous
    list_models and the repo's HTML page must neither expand it nor grow the server (7 levels here, ~30 MB once
    expanded: enough to fail loudly before the fix without exhausting a shared machine)."""
    card = "\n".join(BILLION_LAUGHS.splitlines()[:8]) + "\ntags: *g\nlicense: mit\n---\n# Old card\n"
    repo_id = _legacy_repo(hub, repo_name, {"README.md": card.encode()})
    _reset_peak(hub.process.pid)
    before = _peak_rss(hub.process.pid)
    with _client(hub, None) as c:
        info = c.get(f"/api/models/{repo_id}")
        listed = c.get("/api/models", params={"author": "alice", "full": "true"})
        page = c.get(f"/{repo_id}")
    growth = _peak_rss(hub.process.pid) - before
    assert info.status_code == listed.status_code == page.status_code == 200
    assert len(info.content) < 64 << 10 and len(listed.content) < 1 * MiB and len(page.content) < 256 << 10
    assert info.json()["cardData"] is None and info.json()["tags"] == []
    assert "lol" not in page.text and "Old card" in page.text
    assert growth < 20 * MiB, f"reading an alias card grew the server by {growth / MiB:.0f} MiB"


def test_a_card_of_blank_lines_reads_in_linear_time(hub, repo_name):
    """``---`` then 300,000 blank lines: the front-matter regular expression backtracked quadratically on it
    (minutes of CPU per model_info or page view). Now it is read in milliseconds; the commit is refused."""
    text = ("---" + "\n" * 300_000 + "text\n").encode()
    repo_id = _legacy_repo(hub, repo_name, {"README.md": text})
    started = time.monotonic()
    with _client(hub, None) as c:
        c.timeout = httpx.Timeout(20)
        assert c.get(f"/api/models/{repo_id}").json()["cardData"] is None
        assert c.get(f"/{repo_id}").status_code == 200
    assert time.monotonic() - started < 10
    r = _commit(hub, repo_id, _header() + _file("README.md", text))
    _refused(r, "does not close within the first 64 KiB")


# -- (4) commit memory ---------------------------------------------------------------------------------------
def test_many_small_files_are_staged_to_disk_not_held_in_memory(hub, repo):
    """240 files just under the 1 MiB inline line limit (187 MB decoded) were kept decoded until the commit
    (+147 MiB); now each is staged to disk as it is parsed."""
    size, count = 780_000, 240  # a line of ~1,040,100 bytes: parsed whole, not streamed
    block = os.urandom(size)

    def body() -> Iterator[bytes]:
        yield _header("many small files")
        for i in range(count):
            yield _file(f"shards/{i:03d}.bin", i.to_bytes(4, "big") + block[4:])

    _reset_peak(hub.process.pid)
    before = _peak_rss(hub.process.pid)
    r = _commit(hub, repo, body())
    growth = _peak_rss(hub.process.pid) - before
    assert r.status_code == 200, r.text
    print(f"{count} files of {size} bytes: the server's peak memory grew by {growth / MiB:.0f} MiB")
    assert growth < 40 * MiB, f"the server's peak memory grew by {growth / MiB:.0f} MiB"
    files = _files(hub, repo)
    assert sum(1 for p in files if p.startswith("shards/")) == count
    assert all(files[f"shards/{i:03d}.bin"] == size for i in range(count))
    with _client(hub, None) as c:
        assert c.get(f"/{repo}/resolve/main/shards/123.bin").content == (123).to_bytes(4, "big") + block[4:]
    assert not _staged(hub)


def test_bytes_after_a_streamed_content_are_capped(hub, repo):
    """A streamed file line followed by a large unknown field: the field was buffered and parsed whole
    (200 MB: +700 MiB). Now the commit is refused once MAX_AFTER_CONTENT bytes follow the content string."""
    extra = 64 * MiB

    def body() -> Iterator[bytes]:
        yield _header() + b'{"key": "file", "value": {"content": "'
        yield base64.b64encode(os.urandom(2 * MiB))
        yield b'", "path": "big.bin", "encoding": "base64", "junk": "'
        chunk = b"A" * MiB
        for _ in range(extra // MiB):
            yield chunk
        yield b'"}}\n'

    before_sha = _head(hub, repo)
    _reset_peak(hub.process.pid)
    before = _peak_rss(hub.process.pid)
    try:
        r = _commit(hub, repo, body())
    except httpx.TransportError:  # the hub answered and closed while the client was still sending: refused
        r = None
    growth = _peak_rss(hub.process.pid) - before
    if r is not None:
        _refused(r, f"more than {MAX_AFTER_CONTENT} bytes follow a file's content")
    assert growth < 40 * MiB, f"the server's peak memory grew by {growth / MiB:.0f} MiB"
    assert _head(hub, repo) == before_sha and not _staged(hub)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (_line("file", {"content": "aGk=", "path": "a.txt", "encoding": "base64", "x": "y" * 1000}), "'x'"),
        (_line("header", {"summary": "s", "padding": 1}), "'padding'"),
        (_line("deletedFile", {"path": "a.txt", "recursive": True}), "'recursive'"),
        (json.dumps({"key": "file", "value": {"content": "aGk=", "path": "a"}, "more": 1}).encode() + b"\n", "'more'"),
    ],
    ids=["file", "header", "deletedFile", "top-level"],
)
def test_unknown_fields_in_a_commit_line_are_refused(hub, repo, line, fragment):
    before = _head(hub, repo)
    body = line if b'"header"' in line else _header() + line
    _refused(_commit(hub, repo, body), "unknown field", fragment)
    assert _head(hub, repo) == before and not _staged(hub)


def test_header_fields_must_have_their_types(hub, repo):
    """A parentCommit holding control characters went into a 412 message; a non-string summary was str()-ed."""
    for header in ({"summary": "s", "parentCommit": "abc\x00"}, {"summary": ["x"]}):
        r = _commit(hub, repo, _line("header", header) + _file("a.txt", b"a"))
        _refused(r, "header")


def test_a_commit_has_a_bounded_number_of_operations(hub, repo):
    body = _header() + b"".join(_line("deletedFile", {"path": f"f{i}"}) for i in range(MAX_COMMIT_OPERATIONS + 1))
    _refused(_commit(hub, repo, body), f"at most {MAX_COMMIT_OPERATIONS} files", "split it")


# -- (7) staging files, names and paths, revisions -----------------------------------------------------------
def test_a_killed_commit_leaves_no_staging_file_after_a_restart(tmp_path):
    """A hub killed in the middle of a commit left its staged upload in tmp/ forever; the next start of a hub
    on that root removes it, and only the names a hub makes in its own tmp/."""
    root = tmp_path / "hub"
    sending, release = threading.Event(), threading.Event()

    def body() -> Iterator[bytes]:
        yield _header() + b'{"key": "file", "value": {"content": "'
        yield base64.b64encode(os.urandom(3 * MiB))  # over the inline limit: streamed to tmp/upload-*.part
        sending.set()
        release.wait(30)
        yield b'", "path": "big.bin"}}\n'

    with start_local_hub(root, tokens=TOKENS) as first:
        with _client(first) as c:
            assert c.post("/api/repos/create", json={"name": "r", "type": "model"}).status_code == 200
        errors: list[BaseException] = []

        def send() -> None:
            try:
                _commit(first, "alice/r", body())
            except httpx.TransportError as e:  # the server is killed under it
                errors.append(e)

        sender = threading.Thread(target=send)
        sender.start()
        assert sending.wait(30)
        deadline = time.monotonic() + 20
        while not [p for p in _staged(first) if p.stat().st_size >= 2 * MiB] and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _staged(first)
        assert left, "the upload was never staged"
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        release.set()
        sender.join(30)
    assert all(p.exists() for p in left), "the killed hub removed its staged file after all"
    unrelated = [root / "tmp" / "notes.txt", root / "elsewhere" / "upload-1.part"]
    for path in unrelated:
        path.parent.mkdir(exist_ok=True)
        path.write_text("not the hub's staging")
    (root / "tmp" / "deleted-0123abcd" / "x").mkdir(parents=True)  # a repo deletion cut short

    with start_local_hub(root, tokens=TOKENS) as second:
        assert not _staged(second) and not (root / "tmp" / "deleted-0123abcd").exists()
        assert all(p.read_text() == "not the hub's staging" for p in unrelated)
        assert "removed 2 staging file(s)" in second.log_path.read_text()
        assert set(_files(second, "alice/r")) == {".gitattributes"}  # the killed commit never happened


@pytest.mark.parametrize(
    "name",
    [
        "evil\nname.txt",
        "a\rb.txt",
        "bell\x07.txt",
        "esc\x1b[31m.txt",
        "del\x7f.txt",
        "c1\x85.txt",
        "gnp.\u202eexe",
        "a\u2066b\u2069.txt",
        "mark\u200f.txt",
        "sep\u2028.txt",
    ],
    ids=["LF", "CR", "BEL", "ESC", "DEL", "NEL", "RLO", "LRI-PDI", "RLM", "LS"],
)
def test_file_names_with_control_or_bidi_characters_are_refused(hub, repo, name):
    """Such a name was stored, and then shown as another name (``gnp.\\u202eexe`` reads ``exe.png``) or broke a
    line-based listing; the 400 names the path as a repr and says what to do."""
    before = _head(hub, repo)
    message = _refused(_commit(hub, repo, _header() + _file(f"dir/{name}", b"x")), "rename the file")
    assert repr(f"dir/{name}") in message
    from huggingface_hub import HfApi
    from huggingface_hub.errors import BadRequestError

    with pytest.raises(BadRequestError, match="rename the file"):  # the client's preupload is refused already
        HfApi(endpoint=hub.endpoint, token=TOKENS["alice"]).upload_file(
            path_or_fileobj=b"x", path_in_repo=name, repo_id=repo
        )
    assert _head(hub, repo) == before and not _staged(hub)


@pytest.mark.parametrize(
    ("existing", "added", "file", "inner"),
    [
        ([], ["x", "x/y"], "x", "x/y"),
        ([], ["a/b/c", "a/b"], "a/b", "a/b/c"),
        (["x"], ["x/y/z"], "x", "x/y/z"),
        (["d/e.txt"], ["d"], "d", "d/e.txt"),
    ],
    ids=["in-commit", "in-commit-reversed", "file-in-repo", "folder-in-repo"],
)
def test_a_path_cannot_be_both_a_file_and_a_folder(hub, repo, existing, added, file, inner):
    if existing:
        assert _commit(hub, repo, _header() + b"".join(_file(p, b"old") for p in existing)).status_code == 200
    before = _head(hub, repo)
    message = _refused(
        _commit(hub, repo, _header() + b"".join(_file(p, p.encode()) for p in added)),
        "both a file and a folder",
        "Rename one of them",
    )
    assert repr(file) in message and repr(inner) in message
    assert _head(hub, repo) == before and not _staged(hub)


def test_a_file_may_replace_a_folder_deleted_in_the_same_commit(hub, repo):
    assert _commit(hub, repo, _header() + _file("x/y", b"1")).status_code == 200
    body = _header() + _line("deletedFolder", {"path": "x/"}) + _file("x", b"2")
    assert _commit(hub, repo, body).status_code == 200, "deleting the folder first makes the name free"
    assert "x" in _files(hub, repo) and "x/y" not in _files(hub, repo)


@pytest.mark.parametrize("revision", ["ma%00in", "main%1B", "%0D"], ids=["NUL", "ESC", "CR"])
def test_a_revision_with_control_characters_gets_a_clean_400(hub, repo, revision):
    """A NUL in a revision went into the X-Error-Message header, and the server dropped the connection."""
    shown = repr(revision.replace("%00", "\x00").replace("%1B", "\x1b").replace("%0D", "\r"))
    with _client(hub) as c:
        for method, url in (
            ("GET", f"/api/models/{repo}/revision/{revision}"),
            ("GET", f"/api/models/{repo}/tree/{revision}"),
            ("GET", f"/{repo}/resolve/{revision}/.gitattributes"),
            ("GET", f"/{repo}/tree/{revision}"),
            ("POST", f"/api/models/{repo}/preupload/{revision}"),
        ):
            _refused(c.request(method, url, json={"files": []}), "Invalid revision", shown)
    _refused(_commit(hub, repo, _header() + _file("a.txt", b"a"), revision=revision), "Invalid revision", shown)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import BadRequestError

    with pytest.raises(BadRequestError, match="Invalid revision"):
        HfApi(endpoint=hub.endpoint).model_info(repo, revision="ma\x00in")


def test_bodies_other_than_a_commit_are_capped_small(hub: LocalHubProcess) -> None:
    """Every non-commit body is read whole: an anonymous 20 MiB validate-yaml post gets a 413, not 20 MiB of RAM."""
    from hub_peft.hub.server import MAX_JSON_BODY_BYTES

    def body() -> Iterator[bytes]:  # streamed: no Content-Length to refuse up front
        for _ in range(MAX_JSON_BODY_BYTES // (1 << 20) + 4):
            yield b" " * (1 << 20)

    with _client(hub, token=None) as c:
        answer = c.post("/api/validate-yaml", content=body(), headers={"content-type": "application/json"})
    assert answer.status_code == 413, answer.text
