"""The NDJSON commit body, parsed as it arrives, in bounded memory.

``huggingface_hub`` sends a commit as one JSON object per line: the header, then one line per file with its
bytes base64-encoded inline (``{"key": "file", "value": {"content": "<base64>", "path": ..., "encoding":
"base64"}}``), then deletions. A line holding a large file is as large as the file, so it is never held:
once a line grows past :data:`INLINE_LIMIT`, the ``content`` string is decoded in pieces as bytes arrive
into a file staged in the storage's temporary folder, hashed on the way (sha256; the git blob id reads
the staged file back once, from the page cache); the rest of the line is parsed as small JSON, and may be
no longer than :data:`MAX_AFTER_CONTENT`. A smaller line is parsed whole, and its file staged the same way: no
file's bytes stay in memory, so memory stays at a few MiB whatever the number and sizes of the files (up to
:data:`MAX_COMMIT_OPERATIONS` of them); the caller enforces the body's size limit while reading.

Each line must hold only the fields ``huggingface_hub`` sends; anything else is refused, not skipped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadRequest
from .storage import COMMIT_ID, AddFile, DeletePath, StagedBlob, check_new_path, check_path

INLINE_LIMIT = 1 << 20  # a line up to this size is parsed whole; past it, its content streams to a file
MAX_AFTER_CONTENT = 16 << 10  # what may follow a streamed content string: '"path"' (at most 1000 characters)...
MAX_COMMIT_OPERATIONS = 25_000  # files added or deleted by one commit (each holds its path in memory)
_FIELDS = {  # what each kind of line may hold, as huggingface_hub writes it
    "header": {"summary", "description", "parentCommit"},
    "file": {"content", "path", "encoding"},
    "deletedFile": {"path"},
    "deletedFolder": {"path"},
}
_CONTENT_PREFIX = re.compile(rb'^\s*\{\s*"key"\s*:\s*"file"\s*,\s*"value"\s*:\s*\{\s*"content"\s*:\s*"')
_GIT_CHUNK = 1 << 22


@dataclass
class CommitStream:
    """Feed the body with :meth:`feed`, then :meth:`finish` returns ``(header, ops)``; :meth:`discard` removes
    staged files when the commit does not happen."""

    staging: Path
    header: dict | None = None
    ops: list[AddFile | DeletePath] = field(default_factory=list)
    _line: bytearray = field(default_factory=bytearray)
    _number: int = 0
    _blob: _Staging | None = None  # the file whose content is streaming, when in a large line
    _prefix: bytes = b""
    _after: bytearray | None = None  # the rest of a large line once its content string ended

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._blob is not None and self._after is None:
                end = _find(data, view, b'"')
                piece = view if end < 0 else view[:end]
                self._blob.write(piece)
                if end < 0:
                    return
                self._after, view = bytearray(), view[end + 1 :]
                continue
            newline = _find(data, view, b"\n")
            piece = view if newline < 0 else view[:newline]
            if self._after is not None and len(self._after) + len(piece) > MAX_AFTER_CONTENT:
                raise BadRequest(
                    f"Malformed commit payload at line {self._number + 1}: more than {MAX_AFTER_CONTENT} "
                    "bytes follow a file's content; after it, a file line holds only its 'path' and "
                    "'encoding'."
                )
            target = self._after if self._after is not None else self._line
            target += piece
            if newline < 0:
                if self._after is None and len(self._line) > INLINE_LIMIT:
                    self._start_streaming()
                return
            view = view[newline + 1 :]
            self._end_line()

    def finish(self) -> tuple[dict, list[AddFile | DeletePath]]:
        if self._line.strip() or self._after is not None or self._blob is not None:
            self._end_line()
        if self.header is None:
            raise BadRequest("Malformed commit payload: the first line must be the 'header'.")
        if not self.ops:
            raise BadRequest("Empty commit: no file to add or delete.")
        # A folder's deletion may share its name with a file the commit adds there (a file replacing a folder).
        paths = [(op.path, isinstance(op, DeletePath) and op.folder) for op in self.ops]
        if len(set(paths)) != len(paths):
            raise BadRequest("The same path appears twice in one commit.")
        return self.header, self.ops

    def discard(self) -> None:
        if self._blob is not None:
            self._blob.discard()
        for op in self.ops:
            if isinstance(op, AddFile) and isinstance(op.content, StagedBlob):
                op.content.path.unlink(missing_ok=True)

    # --- lines -----------------------------------------------------------------------------------
    def _start_streaming(self) -> None:
        match = _CONTENT_PREFIX.match(self._line)
        if not match:
            raise BadRequest(
                f"Malformed commit payload at line {self._number + 1}: a line over "
                f"{INLINE_LIMIT} bytes must be a file whose 'content' comes first."
            )
        if self.header is None:
            raise BadRequest("Malformed commit payload: the first line must be the 'header'.")
        self._prefix = bytes(self._line[: match.end() - 1])  # up to the opening quote of the content string
        self._blob = _Staging(self.staging)
        rest = bytes(self._line[match.end() :])
        self._line = bytearray()
        self.feed(rest)

    def _end_line(self) -> None:
        self._number += 1
        if self._blob is not None:  # a large file line: its content went to a staged file
            if self._after is None:
                raise BadRequest(f"Malformed commit payload at line {self._number}: the content string never ends.")
            line, staged = self._prefix + b'""' + bytes(self._after), self._blob
            self._blob, self._after, self._prefix = None, None, b""
            try:
                _, value = self._item(line)  # the key is "file": the prefix matched _CONTENT_PREFIX
                path = self._file_path(value)
                self._add(AddFile(path, staged.close(path)))
            except BaseException:
                staged.discard()
                raise
            return
        line, self._line = bytes(self._line), bytearray()
        if not line.strip():
            return
        key, value = self._item(line)
        if self.header is None or key == "header":
            if self.header is not None or key != "header":
                raise BadRequest("Malformed commit payload: the first line, and only it, must be the 'header'.")
            self.header = self._header(value)
        elif key == "file":
            path = self._file_path(value)
            if not isinstance(value.get("content"), str):
                raise BadRequest(f"File {path!r}: content must be a base64 string.")
            # NOTE(commit-memory): a small file is staged to disk like a large one, not kept decoded until the
            # commit, so the server's memory does not grow with the number and size of a commit's files.
            staged = _Staging(self.staging)
            try:
                staged.add_base64(value["content"], path)
                self._add(AddFile(path, staged.close(path)))
            except BaseException:
                staged.discard()
                raise
        elif key in ("deletedFile", "deletedFolder"):
            self._check_fields(key, value)
            path = check_path(str(value.get("path", "")).rstrip("/"))
            self._add(DeletePath(path, folder=key == "deletedFolder"))
        elif key == "lfsFile":
            raise BadRequest("LFS pointers are not supported by the local hub: upload files as 'regular'.")
        else:
            raise BadRequest(f"Malformed commit payload at line {self._number}: unknown key {_shown(key)}.")

    def _item(self, line: bytes) -> tuple[str, dict]:
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if not isinstance(value, dict):
                raise TypeError("'value' must be an object")
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise BadRequest(f"Malformed commit payload at line {self._number}: {_shown(str(e))}") from None
        if len(item) != 2:
            extra = ", ".join(_shown(k) for k in list(item)[:5] if k not in ("key", "value"))
            raise BadRequest(
                f"Malformed commit payload at line {self._number}: unknown field(s) {extra}; a line "
                "holds only 'key' and 'value'."
            )
        return key, value

    def _check_fields(self, key: str, value: dict) -> None:
        """Refuse a field ``huggingface_hub`` never sends (NOTE(commit-memory): rather than carry it along)."""
        allowed = _FIELDS[key]
        if not allowed.issuperset(value):
            extra = ", ".join(_shown(k) for k in list(value)[:50] if k not in allowed)
            raise BadRequest(
                f"Malformed commit payload at line {self._number}: unknown field(s) {extra} in a {key!r} line, "
                f"which holds only {', '.join(map(repr, sorted(allowed)))}."
            )

    def _header(self, value: dict) -> dict:
        self._check_fields("header", value)
        for name in ("summary", "description"):
            if value.get(name) is not None and not isinstance(value[name], str):
                raise BadRequest(f"Malformed commit payload: the header's {name!r} must be a string.")
        parent = value.get("parentCommit")
        if parent is not None and not (isinstance(parent, str) and COMMIT_ID.fullmatch(parent)):
            raise BadRequest(
                "Malformed commit payload: the header's 'parentCommit' must be a commit id (40 "
                "lowercase hexadecimal characters), or be left out."
            )
        return value

    def _file_path(self, value: dict) -> str:
        self._check_fields("file", value)
        path = check_new_path(value.get("path"))
        if value.get("encoding", "base64") != "base64":
            raise BadRequest(f"File {path!r}: content must be a base64 string.")
        return path

    def _add(self, op: AddFile | DeletePath) -> None:
        if len(self.ops) >= MAX_COMMIT_OPERATIONS:
            if isinstance(op, AddFile) and isinstance(op.content, StagedBlob):
                op.content.path.unlink(missing_ok=True)
            raise BadRequest(
                f"A commit may add or delete at most {MAX_COMMIT_OPERATIONS} files: split it into "
                "several commits (huggingface_hub's upload_large_folder does)."
            )
        self.ops.append(op)


class _Staging:
    """A base64 string decoded in pieces into a temporary file, hashed as it is written."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix="upload-", suffix=".part")
        self.path, self.file = Path(name), os.fdopen(fd, "wb")
        self.sha256, self.size, self.carry = hashlib.sha256(), 0, b""

    def write(self, piece: memoryview) -> None:
        data = self.carry + piece if self.carry else bytes(piece)
        held = data.endswith(b"\\")  # maybe the first half of an escaped '\/' split across two pieces
        if held:
            data = data[:-1]
        if b"\\" in data:  # JSON may escape '/' as '\/' (a scan is cheap, a replace copies)
            data = data.replace(b"\\/", b"/")
        keep = len(data) - len(data) % 4
        self.carry = data[keep:] + (b"\\" if held else b"")
        if not keep:
            return
        try:
            decoded = base64.b64decode(data[:keep], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("A file's content is not valid base64.") from None
        self._write(decoded)

    def add_base64(self, content: str, path: str) -> None:
        """A whole (small) base64 string, already unescaped by the JSON parser."""
        try:
            decoded = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"File {path!r}: content is not valid base64.") from None
        self._write(decoded)

    def _write(self, decoded: bytes) -> None:
        self.sha256.update(decoded)
        self.file.write(decoded)
        self.size += len(decoded)

    def close(self, path: str) -> StagedBlob:
        if self.carry:
            raise BadRequest(f"File {path!r}: content is not valid base64 (its length is not a multiple of 4).")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        git = hashlib.sha1(f"blob {self.size}\0".encode())
        with open(self.path, "rb") as f:
            while chunk := f.read(_GIT_CHUNK):
                git.update(chunk)
        return StagedBlob(self.path, self.sha256.hexdigest(), git.hexdigest(), self.size)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.path.unlink(missing_ok=True)


def _shown(value: object) -> str:
    """A short repr of something a client sent, for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _find(data: bytes, view: memoryview, byte: bytes) -> int:
    """Index of ``byte`` in ``view`` (-1 if absent), searched in place in ``data``, of which ``view`` is a suffix."""
    start = len(data) - len(view)
    at = data.find(byte, start)
    return at - start if at >= 0 else -1
