"""The local Hub's account and repo routes: whoami, repo creation, deletion and listing, and the per-repo API
(model_info, tree, commits, refs, paths-info)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import Conflict, EntryNotFound, HTTPError
from .card import HEAD_BYTES, MAX_CARD_BYTES, read_card_data
from .route_helpers import folder_oid, json_body, repo_url
from .storage import Commit, Repo, Storage, check_name, check_path, check_repo_type

if TYPE_CHECKING:
    from starlette.datastructures import QueryParams


class RepoRoutes:
    """The ``/api/`` routes of accounts and repos, as a part of :class:`LocalHub`."""

    storage: Storage  # LocalHub's

    if TYPE_CHECKING:  # what this mixin calls on the other parts of LocalHub (server.py, commit_routes.py)

        def _visible_repo(self, user: str | None, repo_type: str, repo_id: str) -> Repo: ...

        def _writable_repo(self, user: str | None, repo_type: str, repo_id: str) -> Repo: ...

        def _preupload(self, repo: Repo, revision: str, payload: dict) -> Response: ...

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
                {"error": str(e), "url": repo_url(base, existing)},
                status_code=409,
                headers={"X-Error-Message": str(e)},
            )
        return JSONResponse({"url": repo_url(base, repo), "name": repo.repo_id, "id": repo.uid})

    def _delete_repo(self, user: str | None, payload: dict) -> Response:
        repo_type = check_repo_type(payload.get("type") or "model")
        namespace = payload.get("organization") or user
        if namespace is None:
            raise HTTPError(401, "You must be authenticated with a write token to delete a repo.")
        repo_id = f"{check_name(namespace, 'namespace')}/{check_name(payload.get('name') or '', 'repo name')}"
        self._writable_repo(user, repo_type, repo_id)
        self.storage.delete_repo(repo_type, repo_id)
        return JSONResponse({})

    def _list_repos(self, repo_type: str, user: str | None, params: QueryParams) -> Response:
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

    def _repo_api(
        self,
        request: Request,
        base: str,
        user: str | None,
        body: bytes,
        repo_type: str,
        repo_id: str,
        rest: list[str],
    ) -> Response:
        method = request.method
        if not rest and method == "GET":
            repo = self._visible_repo(user, repo_type, repo_id)
            return JSONResponse(self._repo_json(repo, self.storage.resolve(repo, None), siblings=True))
        if len(rest) == 2 and rest[0] == "revision" and method == "GET":
            repo = self._visible_repo(user, repo_type, repo_id)
            return JSONResponse(self._repo_json(repo, self.storage.resolve(repo, rest[1]), siblings=True))
        if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
            repo = self._writable_repo(user, repo_type, repo_id)
            return self._preupload(repo, rest[1], json_body(body))
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
        """README.md at ``commit`` for the HTML pages (which read its metadata with the checks of card.py);
        "" when there is none or it is over 1 MiB."""
        entry = commit.tree.get("README.md")
        if entry is None or entry.size > MAX_CARD_BYTES:
            return ""
        with self.storage.open_blob(entry) as f:
            return f.read().decode("utf-8", errors="replace")

    def _card_data(self, commit: Commit) -> dict:
        """The card's metadata (``cardData``), read from the README's first bytes only, ``{}`` when it has none
        or it cannot be accepted: a card stored before the commit checks may hold aliases, which are never
        expanded (see card.py)."""
        entry = commit.tree.get("README.md")
        if entry is None or entry.size > MAX_CARD_BYTES:
            return {}
        with self.storage.open_blob(entry) as f:
            head = f.read(HEAD_BYTES)
        return read_card_data(head.decode("utf-8", errors="replace"), complete=entry.size <= len(head))

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
                        folder, {"type": "directory", "oid": folder_oid(folder), "size": 0, "path": folder}
                    )
                entries[p] = {"type": "file", "oid": e.oid, "size": e.size, "path": p}
            elif len(rel) == 1:
                entries[p] = {"type": "file", "oid": e.oid, "size": e.size, "path": p}
            else:
                folder = prefix + rel[0]
                entries.setdefault(folder, {"type": "directory", "oid": folder_oid(folder), "size": 0, "path": folder})
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
        commit = self.storage.resolve(repo, revision)
        form = parse_qs(body.decode("utf-8", errors="replace"))
        out = []
        for path in form.get("paths", []):
            check_path(path)
            if path in commit.tree:
                e = commit.tree[path]
                out.append({"type": "file", "oid": e.oid, "size": e.size, "path": path})
            elif any(p.startswith(path + "/") for p in commit.tree):
                out.append({"type": "directory", "oid": folder_oid(path), "size": 0, "path": path})
        return JSONResponse(out)
