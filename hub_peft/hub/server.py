"""A local Hugging Face Hub: the part of the Hub HTTP API that the ``huggingface_hub`` client uses.

Point any unmodified client at it with ``HF_ENDPOINT=http://127.0.0.1:PORT``: ``HfApi``,
``create_repo``, ``upload_folder``/``create_commit``, ``hf_hub_download``, ``snapshot_download``,
``model_info``, ``list_models``, ``list_repo_files``/``list_repo_tree``, ``list_repo_commits``,
``delete_repo``, ``whoami`` — and so ``transformers``/``peft`` ``from_pretrained`` — work as on the Hub.

Routing is done on the raw (still percent-encoded) path, because the client encodes a revision such
as ``refs/pr/1`` as one path segment and a decoded path could not tell it apart from a file path.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from .commit_stream import CommitStream
from .pages import FRONT_MATTER, SESSION_COOKIE, Pages, cookie_session, safe_next, split_front_matter
from .storage import (
    REPO_TYPES,
    AddFile,
    BadRequest,
    Commit,
    Conflict,
    EntryNotFound,
    Repo,
    RepoNotFound,
    Storage,
    StorageError,
    check_name,
    check_path,
    check_repo_type,
)

log = logging.getLogger("hub_peft.hub")

CHUNK = 1 << 20
_FEED_BYTES = 4 << 20  # body bytes handed to the commit parser per thread hop
DEFAULT_MAX_COMMIT_BYTES = 2 << 30


class HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _error_response(status: int, message: str, code: str | None = None, headers: dict | None = None) -> Response:
    hdrs = {"X-Error-Message": message.replace("\n", " ")[:500]}
    if code:
        hdrs["X-Error-Code"] = code
    hdrs.update(headers or {})
    return JSONResponse({"error": message}, status_code=status, headers=hdrs)


def parse_tokens(specs: list[str]) -> dict[str, str]:
    """``["alice=hf_abc", ...]`` → ``{token: user}``."""
    tokens: dict[str, str] = {}
    for spec in specs:
        user, sep, token = spec.partition("=")
        user, token = user.strip(), token.strip()
        if not sep or not token:
            raise ValueError(f"Token spec must look like USER=TOKEN, got {spec.split('=')[0]!r}=<hidden>")
        check_name(user, "user name")
        tokens[token] = user
    return tokens


def read_tokens_file(path: str | os.PathLike) -> list[str]:
    """One ``USER=TOKEN`` per line; blank lines and ``#`` comments are ignored."""
    lines = Path(path).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


class LocalHub:
    """The ASGI application. ``tokens`` maps token → user name."""

    def __init__(
        self, root: str | os.PathLike, tokens: dict[str, str], *, max_commit_bytes: int = DEFAULT_MAX_COMMIT_BYTES
    ):
        self.storage = Storage(root)
        self.tokens = tokens
        self.max_commit_bytes = max_commit_bytes
        self.pages = Pages(self.storage, self._visible_repo, self._card_text)
        self.app = Starlette(
            routes=[Route("/{rest:path}", self._dispatch, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])]
        )

    # -- plumbing ----------------------------------------------------------------------------------
    def _user(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self._token_user(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _token_user(self, token: str) -> str | None:
        """The user a token belongs to (compared in constant time), or None."""
        if not token:
            return None
        return next((u for known, u in self.tokens.items() if hmac.compare_digest(known.encode(), token.encode())),
                    None)  # fmt: skip

    def _viewer(self, request: Request, user: str | None) -> str | None:
        """Who reads a page: the Authorization header's user, else the browser session's."""
        return user or self.pages.sessions.user(cookie_session(request))

    async def _body_chunks(self, request: Request):
        """The request body as it arrives, refused past ``max_commit_bytes`` while it is read."""
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_commit_bytes:
                raise HTTPError(413, f"Payload too large (limit {self.max_commit_bytes} bytes).")
            yield chunk

    async def _dispatch(self, request: Request) -> Response:
        started = time.perf_counter()
        raw = request.scope.get("raw_path") or request.url.path.encode()
        raw_path = raw.decode("latin-1").split("?", 1)[0]
        segments = [unquote(s) for s in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
        try:
            user = self._user(request)
            if _is_commit(request.method, segments):
                response = await self._streamed_commit(request, segments, user)
            else:
                body = b"".join([c async for c in self._body_chunks(request)]) \
                    if request.method in ("POST", "PUT", "DELETE") else b""  # fmt: skip
                response = await run_in_threadpool(self._route, request, segments, user, body)
        except HTTPError as e:
            response = _error_response(e.status, e.message, e.code)
        except StorageError as e:
            response = _error_response(e.status, str(e), e.code)
        except Exception:  # pragma: no cover - a bug; keep serving the other requests
            log.exception("internal error on %s %s", request.method, raw_path)
            response = _error_response(500, "Internal server error.")
        log.info(
            "%s %s %d %.1fms", request.method, raw_path, response.status_code, 1000 * (time.perf_counter() - started)
        )
        return response


    async def _streamed_commit(self, request: Request, seg: list[str], user: str | None) -> Response:
        """POST /api/{type}s/{ns}/{name}/commit/{rev}: rights checked before a byte of the body is read, then
        the body parsed as it arrives (see commit_stream.py), the size limit enforced while reading."""
        repo_type, repo_id, revision = seg[1][:-1], f"{seg[2]}/{seg[3]}", seg[5]
        repo = await run_in_threadpool(self._writable_repo, user, repo_type, repo_id)
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

    def _route(self, request: Request, seg: list[str], user: str | None, body: bytes) -> Response:
        method = request.method
        base = str(request.base_url).rstrip("/")
        if seg == ["api", "health"]:
            return JSONResponse({"status": "ok"})
        if seg == ["api", "whoami-v2"] and method == "GET":
            return self._whoami(user)
        if seg == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(base, user, _json(body))
        if seg == ["api", "validate-yaml"] and method == "POST":
            payload = _json(body)
            errors = card_metadata_errors(str(payload.get("content") or ""))
            return JSONResponse(
                {"errors": [{"message": m} for m in errors], "warnings": []}, status_code=400 if errors else 200
            )
        if seg == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo(user, _json(body))
        if len(seg) == 2 and seg[0] == "api" and seg[1].endswith("s") and seg[1][:-1] in REPO_TYPES and method == "GET":
            return self._list_repos(seg[1][:-1], user, request.query_params)
        if len(seg) >= 4 and seg[0] == "api" and seg[1][:-1] in REPO_TYPES and seg[1].endswith("s"):
            repo_type, repo_id, rest = seg[1][:-1], f"{seg[2]}/{seg[3]}", seg[4:]
            return self._repo_api(request, base, user, body, repo_type, repo_id, rest)
        if seg and seg[0] in ("login", "logout") and len(seg) == 1:
            return self._login(request, user, body) if seg[0] == "login" else self._logout(request)
        # File downloads: /{ns}/{name}/resolve/{rev}/{path} (models), /{type}s/{ns}/{name}/resolve/...
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = seg[0][:-1], seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(request, user, repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        if method == "GET":
            page = self._page(request, user, repo_type, seg)
            if page is not None:
                return page
        raise HTTPError(404, f"Route not found: {method} /{'/'.join(seg)}")

    # -- pages for people (see pages.py) -----------------------------------------------------------
    def _page(self, request: Request, user: str | None, repo_type: str, seg: list[str]) -> Response | None:
        user = self._viewer(request, user)
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        query = request.query_params
        try:
            if not seg and repo_type == "model":
                page = self.pages.index(user, query.get("search", "").strip(), query.get("author", "").strip(), here)
            elif len(seg) == 2:
                page = self.pages.repo(user, repo_type, f"{seg[0]}/{seg[1]}", here)
            elif len(seg) >= 3 and seg[2] == "tree":
                revision = seg[3] if len(seg) > 3 else "main"
                page = self.pages.tree(user, repo_type, f"{seg[0]}/{seg[1]}", revision, "/".join(seg[4:]), here)
            elif len(seg) in (3, 4) and seg[2] == "commits":
                page = self.pages.commits(user, repo_type, f"{seg[0]}/{seg[1]}", seg[3] if len(seg) > 3 else "main",
                                          here)  # fmt: skip
            elif len(seg) == 4 and seg[2] == "commit":
                page = self.pages.commit(user, repo_type, f"{seg[0]}/{seg[1]}", seg[3], here)
            else:
                return None
        except StorageError as e:  # not found, or private and not the viewer's: the same 404 as the API
            page = self.pages.error(e.status, str(e), user=user, here=here)
        return HTMLResponse(page.html, status_code=page.status)

    def _login(self, request: Request, user: str | None, body: bytes) -> Response:
        from urllib.parse import parse_qs

        viewer = self._viewer(request, user)
        if request.method == "GET":
            page = self.pages.login_form(viewer, request.query_params.get("next", "/"))
            return HTMLResponse(page.html, status_code=page.status)
        if request.method != "POST":
            raise HTTPError(405, "Use GET or POST /login.")
        form = parse_qs(body.decode("utf-8", errors="replace"))
        known = self._token_user((form.get("token") or [""])[0].strip())
        target = safe_next((form.get("next") or ["/"])[0])
        if known is None:
            page = self.pages.login_form(viewer, target, "That token is not valid here.", status=401)
            return HTMLResponse(page.html, status_code=page.status)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, self.pages.sessions.start(known), httponly=True, samesite="strict",
                            path="/")  # fmt: skip
        return response

    def _logout(self, request: Request) -> Response:
        if request.method != "POST":
            raise HTTPError(405, "Log out with POST /logout.")
        self.pages.sessions.end(cookie_session(request))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    def _visible_repo(self, user: str | None, repo_type: str, repo_id: str) -> Repo:
        repo = self.storage.get_repo(repo_type, repo_id)
        if repo.private and user != repo.owner:
            raise RepoNotFound(f"Repository {repo_id!r} not found.")
        return repo

    def _writable_repo(self, user: str | None, repo_type: str, repo_id: str) -> Repo:
        repo = self._visible_repo(user, repo_type, repo_id)
        if user is None:
            raise HTTPError(401, "You must be authenticated with a write token to change this repo.")
        if user != repo.namespace:
            raise HTTPError(403, f"You don't have the rights to write to {repo_id} (you are {user!r}).")
        return repo

    # -- account and repo management ---------------------------------------------------------------
    def _whoami(self, user: str | None) -> Response:
        if user is None:
            raise HTTPError(401, "Invalid credentials in Authorization header")
        return JSONResponse(
            {
                "type": "user",
                "id": user,
                "name": user,
                "fullname": user,
                "email": None,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}},
            }
        )

    def _create_repo(self, base: str, user: str | None, payload: dict) -> Response:
        repo_type = check_repo_type(payload.get("type") or "model")
        name = check_name(payload.get("name") or "", "repo name")
        namespace = payload.get("organization") or user
        if user is None:
            raise HTTPError(401, "You must be authenticated with a write token to create a repo.")
        check_name(namespace, "namespace")
        if namespace != user:
            raise HTTPError(403, f"You don't have the rights to create a repo under the namespace {namespace!r}.")
        visibility = payload.get("visibility")
        private = bool(payload.get("private")) or visibility == "private"
        try:
            repo = self.storage.create_repo(repo_type, f"{namespace}/{name}", owner=user, private=private)
        except Conflict as e:  # the client reads "url" from the 409 when exist_ok=True
            existing = self.storage.get_repo(repo_type, f"{namespace}/{name}")
            return JSONResponse(
                {"error": str(e), "url": _repo_url(base, existing)},
                status_code=409,
                headers={"X-Error-Message": str(e)},
            )
        return JSONResponse({"url": _repo_url(base, repo), "name": repo.repo_id, "id": repo.uid})

    def _delete_repo(self, user: str | None, payload: dict) -> Response:
        repo_type = check_repo_type(payload.get("type") or "model")
        namespace = payload.get("organization") or user
        if namespace is None:
            raise HTTPError(401, "You must be authenticated with a write token to delete a repo.")
        repo_id = f"{check_name(namespace, 'namespace')}/{check_name(payload.get('name') or '', 'repo name')}"
        self._writable_repo(user, repo_type, repo_id)
        self.storage.delete_repo(repo_type, repo_id)
        return JSONResponse({})

    def _list_repos(self, repo_type: str, user: str | None, params) -> Response:
        author, search = params.get("author"), (params.get("search") or "").lower()
        full = params.get("full") in ("1", "true", "True")
        try:
            limit = int(params.get("limit") or 0)
        except ValueError:
            raise HTTPError(400, "Query parameter 'limit' must be an integer.") from None
        out = []
        for repo in self.storage.list_repos(repo_type):
            if (repo.private and repo.owner != user) or (author and repo.namespace != author):
                continue
            if search and search not in repo.repo_id.lower():
                continue
            out.append(self._repo_json(repo, self.storage.resolve(repo, None), siblings=full))
            if limit and len(out) >= limit:
                break
        return JSONResponse(out)

    # -- per-repo API ------------------------------------------------------------------------------
    def _repo_api(self, request, base, user, body, repo_type, repo_id, rest) -> Response:
        method = request.method
        if not rest and method == "GET":
            repo = self._visible_repo(user, repo_type, repo_id)
            return JSONResponse(self._repo_json(repo, self.storage.resolve(repo, None), siblings=True))
        if len(rest) == 2 and rest[0] == "revision" and method == "GET":
            repo = self._visible_repo(user, repo_type, repo_id)
            return JSONResponse(self._repo_json(repo, self.storage.resolve(repo, rest[1]), siblings=True))
        if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
            repo = self._writable_repo(user, repo_type, repo_id)
            return self._preupload(repo, rest[1], _json(body))
        if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
            repo = self._visible_repo(user, repo_type, repo_id)
            recursive = request.query_params.get("recursive") in ("1", "true", "True")
            return self._tree(repo, rest[1], "/".join(rest[2:]), recursive)
        if len(rest) == 2 and rest[0] == "commits" and method == "GET":
            repo = self._visible_repo(user, repo_type, repo_id)
            return self._commits(repo, rest[1])
        if rest == ["refs"] and method == "GET":
            repo = self._visible_repo(user, repo_type, repo_id)
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in self.storage.branches(repo).items()
            ]
            return JSONResponse({"branches": branches, "tags": [], "converts": [], "pullRequests": []})
        if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
            repo = self._visible_repo(user, repo_type, repo_id)
            return self._paths_info(repo, rest[1], request, body)
        raise HTTPError(404, f"Route not found: {method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    def _repo_json(self, repo: Repo, commit: Commit, *, siblings: bool) -> dict[str, Any]:
        card_data = self._card_data(commit)
        tags = list(card_data.get("tags") or []) if isinstance(card_data.get("tags"), list) else []
        library = card_data.get("library_name")
        if library and library not in tags:
            tags.insert(0, library)
        info: dict[str, Any] = {
            "_id": repo.uid,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "library_name": library,
            "pipeline_tag": card_data.get("pipeline_tag"),
            "cardData": card_data or None,
            "usedStorage": sum(e.size for e in commit.tree.values()),
        }
        if siblings:
            info["siblings"] = [
                {"rfilename": p, "size": e.size, "blobId": e.oid} for p, e in sorted(commit.tree.items())
            ]
        return info

    def _card_text(self, commit: Commit) -> str:
        entry = commit.tree.get("README.md")
        if entry is None or entry.size > 1 << 20:
            return ""
        with self.storage.open_blob(entry) as f:
            return f.read().decode("utf-8", errors="replace")

    def _card_data(self, commit: Commit) -> dict:
        return split_front_matter(self._card_text(commit))[0]

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> Response:
        files = payload.get("files")
        if not isinstance(files, list):
            raise BadRequest("Body must be a JSON object with a 'files' list.")
        head = self.storage.resolve(repo, revision)
        out = []
        for item in files:
            if not isinstance(item, dict):
                raise BadRequest("Each entry of 'files' must be an object with 'path', 'size' and 'sample'.")
            path = check_path(item.get("path"))
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
                errors = card_metadata_errors(op.head(1 << 20).decode("utf-8", errors="replace"))
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
                "commitUrl": f"{_repo_url(base, repo)}/commit/{commit.id}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> Response:
        commit = self.storage.resolve(repo, revision)
        prefix = f"{check_path(path)}/" if path else ""
        if path and path in commit.tree:
            raise EntryNotFound(f"{path} is a file, not a folder.")
        entries: dict[str, dict] = {}
        for p, e in sorted(commit.tree.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :].split("/")
            if recursive:
                for i in range(1, len(rel)):
                    folder = prefix + "/".join(rel[:i])
                    entries.setdefault(
                        folder, {"type": "directory", "oid": _folder_oid(folder), "size": 0, "path": folder}
                    )
                entries[p] = {"type": "file", "oid": e.oid, "size": e.size, "path": p}
            elif len(rel) == 1:
                entries[p] = {"type": "file", "oid": e.oid, "size": e.size, "path": p}
            else:
                folder = prefix + rel[0]
                entries.setdefault(folder, {"type": "directory", "oid": _folder_oid(folder), "size": 0, "path": folder})
        if path and not entries:
            raise EntryNotFound(f"Folder {path!r} not found at revision {commit.id}.")
        return JSONResponse(list(entries.values()))

    def _commits(self, repo: Repo, revision: str) -> Response:
        head = self.storage.resolve(repo, revision)
        return JSONResponse(
            [
                {"id": c.id, "title": c.title, "message": c.message, "authors": [{"user": c.author}], "date": c.date}
                for c in self.storage.history(head)
            ]
        )

    def _paths_info(self, repo: Repo, revision: str, request: Request, body: bytes) -> Response:
        from urllib.parse import parse_qs

        commit = self.storage.resolve(repo, revision)
        form = parse_qs(body.decode("utf-8", errors="replace"))
        out = []
        for path in form.get("paths", []):
            check_path(path)
            if path in commit.tree:
                e = commit.tree[path]
                out.append({"type": "file", "oid": e.oid, "size": e.size, "path": path})
            elif any(p.startswith(path + "/") for p in commit.tree):
                out.append({"type": "directory", "oid": _folder_oid(path), "size": 0, "path": path})
        return JSONResponse(out)

    # -- downloads ---------------------------------------------------------------------------------
    def _resolve(self, request: Request, user, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        repo = self._visible_repo(user, repo_type, repo_id)
        commit = self.storage.resolve(repo, revision)
        check_path(path)
        entry = commit.tree.get(path)
        if entry is None:
            return _error_response(
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
            parsed = _parse_range(range_header, entry.size)
            if parsed is None:
                return _error_response(
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

    def _read_range(self, entry, start: int, length: int) -> Iterator[bytes]:
        with self.storage.open_blob(entry) as f:
            f.seek(start)
            while length > 0:
                chunk = f.read(min(CHUNK, length))
                if not chunk:
                    return
                length -= len(chunk)
                yield chunk


_STRING_LIST_FIELDS = ("tags", "datasets", "language", "metrics", "base_model")


def card_metadata_errors(text: str) -> list[str]:
    """What the Hub would refuse in a model card's YAML front matter (empty list when valid)."""
    match = FRONT_MATTER.match(text)
    if not match:
        return []
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        return [f"YAML front matter does not parse: {e}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["YAML front matter must be a mapping of keys to values."]
    errors = []
    for key in _STRING_LIST_FIELDS:
        value = data.get(key)
        if (
            value is not None
            and not isinstance(value, str)
            and not (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            errors.append(f"'{key}' must be a string or a list of strings.")
    for key in ("license", "library_name", "pipeline_tag", "base_model_relation"):
        if data.get(key) is not None and not isinstance(data[key], str):
            errors.append(f"'{key}' must be a string.")
    if data.get("model-index") is not None and not isinstance(data["model-index"], list):
        errors.append("'model-index' must be a list.")
    return errors


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"Malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("JSON body must be an object.")
    return data


def _is_commit(method: str, seg: list[str]) -> bool:
    return (method == "POST" and len(seg) == 6 and seg[0] == "api" and seg[1].endswith("s")
            and seg[1][:-1] in REPO_TYPES and seg[4] == "commit")  # fmt: skip


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
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


def _folder_oid(path: str) -> str:
    import hashlib

    return hashlib.sha1(f"tree {path}".encode()).hexdigest()


def _repo_url(base: str, repo: Repo) -> str:
    prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
    return f"{base}/{prefix}{repo.repo_id}"


def serve(
    root: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 7861,
    tokens: dict[str, str] | None = None,
    log_level: str = "info",
) -> None:
    """Run the local Hub in the foreground until interrupted (one server per ``root``)."""
    import uvicorn

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = open(root / ".serve.lock", "w")  # noqa: SIM115 - held for the life of the server
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"Another local hub already serves {root}; stop it or choose another --root.") from None
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(name)s %(message)s"
    )
    hub = LocalHub(root, tokens or {})
    log.info("local hub serving %s on http://%s:%d (%d token(s))", root, host, port, len(hub.tokens))
    uvicorn.run(hub.app, host=host, port=port, log_level="warning", access_log=False)
