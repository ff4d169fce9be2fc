"""On-disk storage of the local Hub: content-addressed blobs, immutable commits, atomic refs.

Layout under ``root``::

    blobs/ab/cdef...            file contents, named by their sha256
    commits/0123...json         one immutable commit (tree + metadata), named by its id
    repos/<type>s/<ns>/<name>/  repo.json (visibility, owner, uid) and refs/<branch>

A commit is made in three steps: blobs are written, then the commit object, then the branch ref
is swapped with ``os.replace``. A crash at any point leaves the branch at its previous commit;
readers only ever follow refs, so a half-made commit is never visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from .._atomic import write_bytes, write_text
from ..errors import BadRequest, Conflict, EntryNotFound, PreconditionFailed, RepoNotFound, RevisionNotFound

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"
COMMIT_ID = re.compile(r"[0-9a-f]{40}")
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_PATH_LENGTH = 1000

INITIAL_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.gguf filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""


def check_name(part: object, what: str) -> str:
    """``part`` (from a request: any JSON value) when it is a valid repo or namespace name; else BadRequest."""
    if not isinstance(part, str) or not _NAME.fullmatch(part) or ".." in part or "--" in part:
        raise BadRequest(
            f"Invalid {what} {part!r}: use letters, digits, '-', '_' or '.', at most 96 characters, "
            "not starting or ending with '-' or '.', and no '--' or '..'."
        )
    return part


def check_repo_type(repo_type: str) -> str:
    if repo_type not in REPO_TYPES:
        raise BadRequest(f"Invalid repo type {repo_type!r}; expected one of {', '.join(REPO_TYPES)}.")
    return repo_type


def check_path(path: object) -> str:
    """``path`` (from a request: any JSON value) when it is a plain relative file path that cannot escape the
    repo; else BadRequest."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH_LENGTH:
        raise BadRequest(f"Invalid path in repo: {path!r} (empty or longer than {MAX_PATH_LENGTH}).")
    if path.startswith("/") or "\\" in path or "\x00" in path or re.match(r"^[A-Za-z]:", path):
        raise BadRequest(f"Invalid path in repo: {path!r} (absolute paths and backslashes are not allowed).")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BadRequest(f"Invalid path in repo: {path!r} (no '.', '..' or empty components).")
    if parts[0] == ".git":
        raise BadRequest(f"Invalid path in repo: {path!r} ('.git' is reserved).")
    return path


# C0/C1 control characters (line breaks included), Unicode line/paragraph separators, and the bidirectional-text
# controls that make a name display in another order than it is stored (U+061C, U+200E/F, U+202A-E, U+2066-9).
_UNSAFE_NAME_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def check_new_path(path: object) -> str:
    """:func:`check_path`, and refuse a name that would display as something else or break a line-based listing
    (control characters, line breaks, bidi overrides): for files a commit adds, so old ones can still be deleted."""
    path = check_path(path)
    bad = _UNSAFE_NAME_CHARS.search(path)
    if bad:
        raise BadRequest(
            f"Invalid path in repo: {path!r} holds the character {bad.group()!r} (control characters, line breaks "
            "and bidirectional-text controls are not allowed in file names): rename the file and commit again."
        )
    return path


def file_folder_conflict(tree: Mapping[str, object], added: Iterable[str]) -> tuple[str, str] | None:
    """``(file, path inside it)`` when a path of ``added`` is both a file and a folder in ``tree`` (the tree the
    commit would make), else None. Only the added paths are checked, so a repo that already holds such a pair
    (committed before this check) can still take other commits."""
    folders: dict[str, str] = {}  # folder -> one file inside it
    for p in tree:
        for i, ch in enumerate(p):
            if ch == "/":
                folders.setdefault(p[:i], p)
    for p in added:
        if p in folders:
            return p, folders[p]
        for i, ch in enumerate(p):
            if ch == "/" and p[:i] in tree:
                return p[:i], p
    return None


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as a regular file's ``oid``/ETag."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    oid: str
    size: int


@dataclass(frozen=True)
class Commit:
    id: str
    repo_uid: str
    parents: tuple[str, ...]
    tree: dict[str, FileEntry]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_type: str
    namespace: str
    name: str
    owner: str
    private: bool
    uid: str
    created_at: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class StagedBlob:
    """A file's bytes already written to the storage's ``tmp`` folder, with their hashes (a streamed upload)."""

    path: Path
    sha256: str
    oid: str
    size: int


@dataclass(frozen=True)
class AddFile:
    path: str
    content: bytes | StagedBlob  # the bytes, or a file already staged: moved into the blob store, never read back

    @property
    def size(self) -> int:
        return self.content.size if isinstance(self.content, StagedBlob) else len(self.content)

    def head(self, limit: int) -> bytes:
        """The file's first ``limit`` bytes (for checks such as the card's metadata)."""
        if not isinstance(self.content, StagedBlob):
            return self.content[:limit]
        with open(self.content.path, "rb") as f:
            return f.read(limit)


@dataclass(frozen=True)
class DeletePath:
    path: str
    folder: bool = False


class Storage:
    """Repos, branches and commits in a folder. Thread-safe within one process."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        for sub in ("blobs", "commits", "repos", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- paths and locks -------------------------------------------------------------------------
    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        namespace, _, name = repo_id.partition("/")
        check_repo_type(repo_type)
        return (
            self.root / "repos" / f"{repo_type}s" / check_name(namespace, "namespace") / check_name(name, "repo name")
        )

    def _lock(self, repo_type: str, repo_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((repo_type, repo_id), threading.Lock())

    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256[2:]

    def clean_staging(self) -> int:
        """Remove what commits that never finished left in ``tmp/`` (uploads staged by a server that was killed,
        repos half deleted); only this storage's ``tmp/``, and only the names it makes there. Call it while no
        commit is under way, i.e. when the one server of this root starts. Returns how many entries went."""
        removed = 0
        for entry in (self.root / "tmp").iterdir():
            if entry.name.startswith("upload-") and entry.name.endswith(".part") and not entry.is_dir():
                entry.unlink(missing_ok=True)  # a symlink is removed itself, never followed
            elif entry.name.startswith("deleted-") and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                continue
            removed += 1
        return removed

    # -- repos -----------------------------------------------------------------------------------
    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        meta = self._repo_dir(repo_type, repo_id) / "repo.json"
        try:
            data = json.loads(meta.read_text())
        except FileNotFoundError:
            raise RepoNotFound(f"Repository {repo_id!r} not found.") from None
        return Repo(repo_type=repo_type, **data)

    def create_repo(self, repo_type: str, repo_id: str, *, owner: str, private: bool) -> Repo:
        repo_dir = self._repo_dir(repo_type, repo_id)
        namespace, _, name = repo_id.partition("/")
        with self._lock(repo_type, repo_id):
            if (repo_dir / "repo.json").exists():
                raise Conflict(f"You already created this {repo_type} repo: {repo_id}")
            repo = Repo(repo_type, namespace, name, owner, private, secrets.token_hex(8), _now())
            initial = self._write_commit(
                repo.uid,
                parents=(),
                tree={},
                ops=[AddFile(".gitattributes", INITIAL_GITATTRIBUTES)],
                title="initial commit",
                message="",
                author=owner,
            )
            (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
            write_text(repo_dir / "refs" / DEFAULT_BRANCH, initial.id)
            fields = {k: v for k, v in repo.__dict__.items() if k != "repo_type"}
            write_text(repo_dir / "repo.json", json.dumps(fields))  # written last: the repo exists from here
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        repo_dir = self._repo_dir(repo_type, repo_id)
        with self._lock(repo_type, repo_id):
            if not (repo_dir / "repo.json").exists():
                raise RepoNotFound(f"Repository {repo_id!r} not found.")
            trash = self.root / "tmp" / f"deleted-{secrets.token_hex(8)}"
            os.replace(repo_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def list_repos(self, repo_type: str) -> Iterator[Repo]:
        base = self.root / "repos" / f"{check_repo_type(repo_type)}s"
        for meta in sorted(base.glob("*/*/repo.json")):
            try:
                yield Repo(repo_type=repo_type, **json.loads(meta.read_text()))
            except (OSError, ValueError):
                continue

    # -- revisions -------------------------------------------------------------------------------
    def branches(self, repo: Repo) -> dict[str, str]:
        refs = self._repo_dir(repo.repo_type, repo.repo_id) / "refs"
        return {p.name: p.read_text().strip() for p in sorted(refs.iterdir()) if not p.name.startswith(".")}

    def resolve(self, repo: Repo, revision: str | None) -> Commit:
        """A branch name or a commit id of this repo → its commit."""
        revision = revision or DEFAULT_BRANCH
        if _BRANCH.fullmatch(revision):
            ref = self._repo_dir(repo.repo_type, repo.repo_id) / "refs" / revision
            if ref.is_file():
                return self.read_commit(ref.read_text().strip())
        if COMMIT_ID.fullmatch(revision):
            try:
                commit = self.read_commit(revision)
            except FileNotFoundError:
                commit = None
            if commit is not None and commit.repo_uid == repo.uid:
                return commit
        raise RevisionNotFound(f"Invalid rev id: {revision}")

    def read_commit(self, commit_id: str) -> Commit:
        data = json.loads((self.root / "commits" / f"{commit_id}.json").read_text())
        tree = {p: FileEntry(path=p, **e) for p, e in data.pop("tree").items()}
        data.pop("nonce", None)
        return Commit(id=commit_id, tree=tree, parents=tuple(data.pop("parents")), **data)

    def history(self, commit: Commit) -> Iterator[Commit]:
        while True:
            yield commit
            if not commit.parents:
                return
            commit = self.read_commit(commit.parents[0])

    def open_blob(self, entry: FileEntry) -> BinaryIO:
        return open(self.blob_path(entry.sha256), "rb")

    # -- writing ---------------------------------------------------------------------------------
    def _store_blob(self, data: bytes) -> tuple[str, str]:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not path.exists():
            write_bytes(path, data)
        return sha256, git_blob_oid(data)

    def _write_commit(
        self,
        repo_uid: str,
        *,
        parents: tuple[str, ...],
        tree: dict[str, FileEntry],
        ops: Iterable[AddFile | DeletePath],
        title: str,
        message: str,
        author: str,
    ) -> Commit:
        # NOTE(commit-order): the new tree is worked out and checked before any blob moves into the store, so a
        # refused commit leaves no orphan blob (its staged files are removed by the caller).
        ops = list(ops)
        new_tree = dict(tree)
        for op in ops:
            if isinstance(op, AddFile):
                if isinstance(op.content, StagedBlob):
                    staged = op.content
                    new_tree[op.path] = FileEntry(op.path, staged.sha256, staged.oid, staged.size)
                else:
                    sha256 = hashlib.sha256(op.content).hexdigest()
                    new_tree[op.path] = FileEntry(op.path, sha256, git_blob_oid(op.content), len(op.content))
            elif op.folder:
                prefix = op.path.rstrip("/") + "/"
                doomed = [p for p in new_tree if p.startswith(prefix)]
                if not doomed:
                    raise EntryNotFound(f"Folder {op.path!r} does not exist in the parent revision.")
                for p in doomed:
                    del new_tree[p]
            else:
                if new_tree.pop(op.path, None) is None:
                    raise EntryNotFound(f"File {op.path!r} does not exist in the parent revision.")
        added = [op.path for op in ops if isinstance(op, AddFile)]
        conflict = file_folder_conflict(new_tree, (p for p in added if p in new_tree))
        if conflict is not None:
            file, inner = conflict
            raise BadRequest(
                f"Path {file!r} would be both a file and a folder (it holds {inner!r}): a repo path is one or the "
                "other. Rename one of them, or delete the file (or the folder) in the same commit."
            )
        for op in ops:
            if not isinstance(op, AddFile):
                continue
            if isinstance(op.content, StagedBlob):
                target = self.blob_path(op.content.sha256)
                if target.exists():
                    op.content.path.unlink(missing_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(op.content.path, target)  # same file system: one atomic rename
            else:
                self._store_blob(op.content)
        body = {
            "repo_uid": repo_uid,
            "parents": list(parents),
            "tree": {p: {"sha256": e.sha256, "oid": e.oid, "size": e.size} for p, e in sorted(new_tree.items())},
            "title": title,
            "message": message,
            "author": author,
            "date": _now(),
            "nonce": secrets.token_hex(4),
        }
        encoded = json.dumps(body, sort_keys=True).encode()
        commit_id = hashlib.sha1(encoded).hexdigest()
        write_bytes(self.root / "commits" / f"{commit_id}.json", encoded)
        return self.read_commit(commit_id)

    def commit(
        self,
        repo: Repo,
        branch: str,
        ops: list[AddFile | DeletePath],
        *,
        title: str,
        message: str,
        author: str,
        parent_commit: str | None = None,
    ) -> Commit:
        """Apply ``ops`` on top of ``branch`` as one atomic commit; returns the new commit."""
        if not _BRANCH.fullmatch(branch):
            raise RevisionNotFound(f"Invalid rev id: {branch} (commits go to a branch).")
        for op in ops:
            if isinstance(op, AddFile):
                check_new_path(op.path)
            else:
                check_path(op.path)
        with self._lock(repo.repo_type, repo.repo_id):
            ref = self._repo_dir(repo.repo_type, repo.repo_id) / "refs" / branch
            if not ref.is_file():
                raise RevisionNotFound(f"Invalid rev id: {branch}")
            head = self.read_commit(ref.read_text().strip())
            if parent_commit is not None and parent_commit != head.id:
                raise PreconditionFailed(f"A commit has happened since {parent_commit}. Please refresh and try again.")
            new = self._write_commit(
                repo.uid, parents=(head.id,), tree=head.tree, ops=ops, title=title, message=message, author=author
            )
            write_text(ref, new.id)  # the one atomic step that publishes the commit
            return new
