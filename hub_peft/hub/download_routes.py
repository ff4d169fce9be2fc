"""The local Hub's file downloads: ``/{ns}/{name}/resolve/{rev}/{path}``, with HEAD and byte ranges."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .route_helpers import error_response
from .storage import FileEntry, Repo, Storage, check_path

CHUNK = 1 << 20


class DownloadRoutes:
    """GET/HEAD ``resolve``, as a part of :class:`LocalHub`."""

    storage: Storage  # LocalHub's

    if TYPE_CHECKING:  # what this mixin calls on LocalHub (server.py)

        def _visible_repo(self, user: str | None, repo_type: str, repo_id: str) -> Repo: ...

    def _resolve(
        self, request: Request, user: str | None, repo_type: str, repo_id: str, revision: str, path: str
    ) -> Response:
        repo = self._visible_repo(user, repo_type, repo_id)
        commit = self.storage.resolve(repo, revision)
        check_path(path)
        entry = commit.tree.get(path)
        if entry is None:
            return error_response(
                404, f"Entry not found: {path} at {commit.id}", "EntryNotFound", {"X-Repo-Commit": commit.id}
            )
        headers = {
            "ETag": f'"{entry.oid}"',
            "X-Repo-Commit": commit.id,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start, end = 0, entry.size - 1
        status = 200
        range_header = request.headers.get("range")
        if range_header:
            parsed = parse_range(range_header, entry.size)
            if parsed is None:
                return error_response(
                    416, "Requested range not satisfiable.", headers={"Content-Range": f"bytes */{entry.size}"}
                )
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(0, end - start + 1)
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        return StreamingResponse(self._read_range(entry, start, length), status_code=status, headers=headers)

    def _read_range(self, entry: FileEntry, start: int, length: int) -> Iterator[bytes]:
        with self.storage.open_blob(entry) as f:
            f.seek(start)
            while length > 0:
                chunk = f.read(min(CHUNK, length))
                if not chunk:
                    return
                length -= len(chunk)
                yield chunk


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        if suffix == 0:
            return None
        return max(0, size - suffix), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return None
    return start, end
