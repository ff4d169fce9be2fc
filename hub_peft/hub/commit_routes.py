"""The local Hub's commit routes: preupload, and the streamed commit itself (see commit_stream.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import BadRequest, HTTPError
from .card import HEAD_BYTES, card_metadata_errors
from .commit_stream import CommitStream
from .route_helpers import repo_url
from .storage import AddFile, Repo, Storage, check_new_path

_FEED_BYTES = 4 << 20  # body bytes handed to the commit parser per thread hop
DEFAULT_MAX_COMMIT_BYTES = 2 << 30


class CommitRoutes:
    """POST /api/{type}s/{ns}/{name}/preupload/{rev} and /commit/{rev}, as a part of :class:`LocalHub`."""

    storage: Storage  # LocalHub's
    max_commit_bytes: int

    if TYPE_CHECKING:  # what this mixin calls on LocalHub (server.py)

        def _writable_repo(self, user: str | None, repo_type: str, repo_id: str) -> Repo: ...

    async def _body_chunks(self, request: Request, limit: int | None = None) -> AsyncIterator[bytes]:
        """The request body as it arrives, refused past ``limit`` (default ``max_commit_bytes``) while it is read."""
        size, limit = 0, self.max_commit_bytes if limit is None else limit
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"Payload too large (limit {limit} bytes).")
            yield chunk

    async def _streamed_commit(self, request: Request, seg: list[str], user: str | None) -> Response:
        """POST /api/{type}s/{ns}/{name}/commit/{rev}: rights checked before a byte of the body is read, then
        the body parsed as it arrives (see commit_stream.py), the size limit enforced while reading."""
        repo_type, repo_id, revision = seg[1][:-1], f"{seg[2]}/{seg[3]}", seg[5]
        repo = await run_in_threadpool(self._writable_repo, user, repo_type, repo_id)
        assert user is not None  # _writable_repo refuses an anonymous request (401)
        if request.query_params.get("create_pr") in ("1", "true"):
            raise HTTPError(400, "Pull requests are not supported by the local hub; commit to a branch.")
        stream = CommitStream(self.storage.root / "tmp")
        try:
            pending, pending_size = [], 0
            async for chunk in self._body_chunks(request):
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= _FEED_BYTES:  # decode and hash off the event loop, a few MiB at a time
                    await run_in_threadpool(stream.feed, b"".join(pending))
                    pending, pending_size = [], 0
            if pending:
                await run_in_threadpool(stream.feed, b"".join(pending))
            base = str(request.base_url).rstrip("/")
            return await run_in_threadpool(self._commit, base, repo, revision, user, stream)
        except BaseException:
            await run_in_threadpool(stream.discard)  # no staged file outlives a commit that did not happen
            raise

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> Response:
        files = payload.get("files")
        if not isinstance(files, list):
            raise BadRequest("Body must be a JSON object with a 'files' list.")
        head = self.storage.resolve(repo, revision)
        out = []
        for item in files:
            if not isinstance(item, dict):
                raise BadRequest("Each entry of 'files' must be an object with 'path', 'size' and 'sample'.")
            path = check_new_path(item.get("path"))  # refused here already, before the client sends the bytes
            existing = head.tree.get(path)
            # Every file goes inline ("regular"): no LFS/Xet storage backend is needed on loopback.
            out.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": existing.oid if existing else None,
                }
            )
        return JSONResponse({"files": out, "commitOid": head.id})

    def _commit(self, base: str, repo: Repo, revision: str, user: str, stream: CommitStream) -> Response:
        header, ops = stream.finish()
        for op in ops:
            if isinstance(op, AddFile) and op.path == "README.md":
                head = op.head(HEAD_BYTES)  # the front matter must end within it (see card.py)
                errors = card_metadata_errors(head.decode("utf-8", errors="replace"), complete=op.size <= len(head))
                if errors:
                    raise BadRequest("Invalid metadata in README.md: " + "; ".join(errors))
        commit = self.storage.commit(
            repo,
            revision,
            ops,
            title=str(header.get("summary") or "Update files"),
            message=str(header.get("description") or ""),
            author=user,
            parent_commit=header.get("parentCommit"),
        )
        return JSONResponse(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{repo_url(base, repo)}/commit/{commit.id}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )
