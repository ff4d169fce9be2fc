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
from urllib.parse import quote, unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import InvalidInputError
from .card import HEAD_BYTES, CardError, load_card_data, read_card_data, split_card
from .commit_stream import CommitStream
from .pages import (
    DEFAULT_LOGIN_MAX_FAILURES,
    DEFAULT_LOGIN_WINDOW_S,
    DEFAULT_SESSION_IDLE_S,
    DEFAULT_SESSION_MAX_S,
    SESSION_COOKIE,
    LoginLimiter,
    Page,
    Pages,
    Sessions,
    client_key,
    cookie_session,
    cross_site_problem,
    safe_next,
)
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
    check_new_path,
    check_path,
    check_repo_type,
)

log = logging.getLogger("hub_peft.hub")

CHUNK = 1 << 20
_FEED_BYTES = 4 << 20  # body bytes handed to the commit parser per thread hop
DEFAULT_MAX_COMMIT_BYTES = 2 << 30
MAX_JSON_BODY_BYTES = 16 << 20  # any body but a commit's: read whole (preupload of 25,000 files is ~5 MiB)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def header_value(text: str, limit: int = 500) -> str:
    """``text`` as an HTTP header value that always encodes: control characters (CR, LF...) as spaces,
    non-ASCII as ``\\uXXXX`` escapes, at most ``limit`` characters.

    NOTE(security): header values come out as latin-1, so a file name such as ``名前.txt`` made the response
    fail (500, which the client retries for 23 s); a CR or LF must never reach a header either."""
    return _CONTROL_CHARS.sub(" ", text).encode("ascii", "backslashreplace").decode("ascii")[:limit]


def _error_response(status: int, message: str, code: str | None = None, headers: dict | None = None) -> Response:
    """The Hub's error shape: the full message in the JSON body, an ASCII-safe copy in ``X-Error-Message``."""
    hdrs = {"X-Error-Message": header_value(message)}
    if code:
        hdrs["X-Error-Code"] = code
    hdrs.update(headers or {})
    return JSONResponse({"error": message}, status_code=status, headers=hdrs)


def parse_tokens(specs: list[str], sources: list[str] | None = None) -> dict[str, str]:
    """``["alice=hf_abc", ...]`` → ``{token: user}``; ``sources[i]`` says where ``specs[i]`` comes from, for
    the errors (``InvalidInputError``, a ``ValueError``).

    A user may have several tokens, but two users may not share one. NOTE(security): no error quotes any part
    of a spec, not even the part before ``=``: a line holding only a token, or a token typed where the user
    name goes, would otherwise be printed to the terminal and the logs.
    """
    tokens: dict[str, str] = {}
    seen_at: dict[str, str] = {}
    for i, spec in enumerate(specs):
        where = sources[i] if sources and i < len(sources) else f"token entry {i + 1}"
        user, sep, token = spec.partition("=")
        user, token = user.strip(), token.strip()
        if not sep or not user or not token:
            raise InvalidInputError(
                f"{where} is not USER=TOKEN (its text is not shown: it may hold a token); "
                "write one user name, '=', and that user's token, such as alice=hf_..."
            )
        try:
            check_name(user, "user name")
        except BadRequest:
            raise InvalidInputError(
                f"{where}: the user name before '=' is not valid (it is not shown: it may hold a token); use "
                "letters, digits, '-', '_' or '.', at most 96 characters, not starting or ending with '-' or '.'."
            ) from None
        owner = tokens.get(token)
        if owner is not None and owner != user:
            raise InvalidInputError(
                f"Users {owner!r} ({seen_at[token]}) and {user!r} ({where}) have the same token, so the server "
                "could not tell them apart; give each user a token of their own."
            )
        tokens[token], seen_at[token] = user, where
    return tokens


def read_tokens_file(path: str | os.PathLike) -> list[str]:
    """One ``USER=TOKEN`` per line; blank lines and ``#`` comments are ignored.

    The file must be readable by its owner only (mode 600 or stricter); its lines are checked here (see
    :func:`parse_tokens`) so that an error names the line, never its text.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise InvalidInputError(f"Cannot open the tokens file {path}: {e.strerror}; check the path.") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode & 0o777  # of the file opened, not of whatever the path names later
        if mode & 0o077:
            raise InvalidInputError(
                f"The tokens file {path} is open to other users (mode {mode:03o}), who could read the tokens; "
                f"run `chmod 600 {path}` and start again."
            )
        try:
            text = f.read().decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"The tokens file {path} is not UTF-8 text; save it as UTF-8.") from None
    numbered = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
    numbered = [(n, ln) for n, ln in numbered if ln and not ln.startswith("#")]
    specs = [ln for _, ln in numbered]
    parse_tokens(specs, [f"Line {n} of the tokens file {path}" for n, _ in numbered])
    return specs


class LocalHub:
    """The ASGI application. ``tokens`` maps token → user name."""

    def __init__(
        self,
        root: str | os.PathLike,
        tokens: dict[str, str],
        *,
        max_commit_bytes: int = DEFAULT_MAX_COMMIT_BYTES,
        session_idle_s: float = DEFAULT_SESSION_IDLE_S,
        session_max_s: float = DEFAULT_SESSION_MAX_S,
        login_max_failures: int = DEFAULT_LOGIN_MAX_FAILURES,
        login_window_s: float = DEFAULT_LOGIN_WINDOW_S,
    ):
        """``session_idle_s``/``session_max_s``: a browser session ends that long after its last request /
        its log-in; ``login_max_failures`` failed log-ins per ``login_window_s`` from one address, then 429."""
        self.storage = Storage(root)
        self.tokens = tokens
        self.max_commit_bytes = max_commit_bytes
        self.pages = Pages(self.storage, self._visible_repo, self._card_text, Sessions(session_idle_s, session_max_s))
        self.login_limiter = LoginLimiter(login_max_failures, login_window_s)
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
        return next(
            (u for known, u in self.tokens.items() if hmac.compare_digest(known.encode(), token.encode())), None
        )

    def _viewer(self, request: Request, user: str | None) -> str | None:
        """Who reads a page: the Authorization header's user, else the browser session's."""
        return user or self.pages.sessions.user(cookie_session(request))

    async def _body_chunks(self, request: Request, limit: int | None = None):
        """The request body as it arrives, refused past ``limit`` (default ``max_commit_bytes``) while it is read."""
        size, limit = 0, self.max_commit_bytes if limit is None else limit
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"Payload too large (limit {limit} bytes).")
            yield chunk

    async def _dispatch(self, request: Request) -> Response:
        started = time.perf_counter()
        raw = request.scope.get("raw_path") or request.url.path.encode()
        raw_path = raw.decode("latin-1").split("?", 1)[0]
        segments = [unquote(s) for s in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
        try:
            _check_revision(segments)
            user = self._user(request)
            if _is_commit(request.method, segments):
                response = await self._streamed_commit(request, segments, user)
            else:
                # NOTE(security): every other body (JSON: repo creation, preupload, paths-info, validate-yaml, the
                # login form) is read whole, so it gets a small cap of its own, never the commit's 2 GiB
                body = (
                    b"".join([c async for c in self._body_chunks(request, MAX_JSON_BODY_BYTES)])
                    if request.method in ("POST", "PUT", "DELETE")
                    else b""
                )
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
            return self._login(request, user, body) if seg[0] == "login" else self._logout(request, body)
        # File downloads: /{ns}/{name}/resolve/{rev}/{path} (models), /{type}s/{ns}/{name}/resolve/...
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = seg[0][:-1], seg[1:]
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            # NOTE(security): a download reads with the browser session too (a private repo's page links here);
            # the cookie gives read rights only, on GET/HEAD: every write still needs a token in the header.
            viewer = self._viewer(request, user)
            return self._resolve(request, viewer, repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        if method == "GET":
            page = self._page(request, user, repo_type, seg)
            if page is not None:
                return page
        raise HTTPError(404, f"Route not found: {method} /{'/'.join(seg)}")

    # -- pages for people (see pages.py) -----------------------------------------------------------
    def _page(self, request: Request, user: str | None, repo_type: str, seg: list[str]) -> Response | None:
        user = self._viewer(request, user)
        csrf = self.pages.sessions.csrf(cookie_session(request)) or ""  # for the log-out form
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        query = request.query_params
        try:
            if not seg and repo_type == "model":
                page = self.pages.index(
                    user, query.get("search", "").strip(), query.get("author", "").strip(), here, csrf=csrf
                )
            elif len(seg) == 2:
                page = self.pages.repo(user, repo_type, f"{seg[0]}/{seg[1]}", here, csrf=csrf)
            elif len(seg) >= 3 and seg[2] == "tree":
                revision = seg[3] if len(seg) > 3 else "main"
                page = self.pages.tree(
                    user, repo_type, f"{seg[0]}/{seg[1]}", revision, "/".join(seg[4:]), here, csrf=csrf
                )
            elif len(seg) in (3, 4) and seg[2] == "commits":
                page = self.pages.commits(
                    user, repo_type, f"{seg[0]}/{seg[1]}", seg[3] if len(seg) > 3 else "main", here, csrf=csrf
                )
            elif len(seg) == 4 and seg[2] == "commit":
                page = self.pages.commit(user, repo_type, f"{seg[0]}/{seg[1]}", seg[3], here, csrf=csrf)
            else:
                return None
        except StorageError as e:  # not found, or private and not the viewer's: the same 404 as the API
            page = self.pages.error(e.status, str(e), user=user, here=here, csrf=csrf)
        return _html(page)

    def _login(self, request: Request, user: str | None, body: bytes) -> Response:
        from urllib.parse import parse_qs

        session = cookie_session(request)
        viewer = self._viewer(request, user)
        csrf = self.pages.sessions.csrf(session) or ""
        if request.method == "GET":
            return _html(self.pages.login_form(viewer, request.query_params.get("next", "/"), csrf=csrf))
        if request.method != "POST":
            raise HTTPError(405, "Use GET or POST /login.")
        form = parse_qs(body.decode("utf-8", errors="replace"))
        target = safe_next((form.get("next") or ["/"])[0])
        forged = self._forged(request, form, session, viewer, f"/login?next={quote(target, safe='')}")
        if forged is not None:
            return forged
        client = client_key(request)
        stamp, wait = self.login_limiter.begin(client)
        if stamp is None:
            message = f"Too many failed log-ins from your address: wait {wait} s, then try again with a valid token."
            response = _html(self.pages.login_form(viewer, target, message, status=429, csrf=csrf))
            response.headers["Retry-After"] = str(wait)
            return response
        known = self._token_user((form.get("token") or [""])[0].strip())
        if known is None:
            log.warning("failed log-in from %s", client)  # never the token
            return _html(self.pages.login_form(viewer, target, "That token is not valid here.", status=401, csrf=csrf))
        self.login_limiter.forgive(client, stamp)
        self.pages.sessions.end(session)  # NOTE(security): a new session id at each log-in (no session fixation)
        sessions = self.pages.sessions
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            sessions.start(known),
            max_age=int(sessions.max_s),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    def _logout(self, request: Request, body: bytes) -> Response:
        from urllib.parse import parse_qs

        if request.method != "POST":
            raise HTTPError(405, "Log out with POST /logout.")
        session = cookie_session(request)
        form = parse_qs(body.decode("utf-8", errors="replace"))
        forged = self._forged(request, form, session, self._viewer(request, None), "/")
        if forged is not None:
            return forged
        self.pages.sessions.end(session)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        return response

    def _forged(
        self, request: Request, form: dict, session: str | None, viewer: str | None, retry: str
    ) -> Response | None:
        """A 403 page when a form POST may have been sent by another site, else None: it must come from this
        server's origin (:func:`cross_site_problem`) and, in a live session, carry the session's CSRF token.

        NOTE(security): the SameSite=Strict cookie alone is not enough: other ports of the same host are the
        same *site*, so a page on ``127.0.0.1:8000`` could post to this server with the cookie attached.
        """
        live = self.pages.sessions.csrf(session) is not None
        problem = cross_site_problem(request, cookie_auth=live)
        if problem is None and live and not self.pages.sessions.check_csrf(session, (form.get("csrf") or [""])[0]):
            problem = "it does not carry this session's form token"
        if problem is None:
            return None
        own = f"{request.url.scheme}://{request.url.netloc}"
        message = (
            f"This form was refused because {problem}: another site may have sent it in your name. "
            f"Open {own}{retry} and send the form from there."
        )
        return _html(self.pages.error(403, message, user=viewer, here="/", csrf=self.pages.sessions.csrf(session)))

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
        """README.md at ``commit`` for the HTML pages (which read its metadata with the checks of card.py);
        "" when there is none or it is over 1 MiB."""
        entry = commit.tree.get("README.md")
        if entry is None or entry.size > _MAX_CARD_BYTES:
            return ""
        with self.storage.open_blob(entry) as f:
            return f.read().decode("utf-8", errors="replace")

    def _card_data(self, commit: Commit) -> dict:
        """The card's metadata (``cardData``), read from the README's first bytes only, ``{}`` when it has none
        or it cannot be accepted: a card stored before the commit checks may hold aliases, which are never
        expanded (see card.py)."""
        entry = commit.tree.get("README.md")
        if entry is None or entry.size > _MAX_CARD_BYTES:
            return {}
        with self.storage.open_blob(entry) as f:
            head = f.read(HEAD_BYTES)
        return read_card_data(head.decode("utf-8", errors="replace"), complete=entry.size <= len(head))

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
_MAX_CARD_BYTES = 1 << 20  # a larger README.md is served as a file but not read as a card


def card_metadata_errors(text: str, *, complete: bool = True) -> list[str]:
    """What the Hub would refuse in a model card's YAML front matter (empty list when valid); ``complete=False``
    when ``text`` is only the README's first :data:`~hub_peft.hub.card.HEAD_BYTES` bytes.

    NOTE(security): parsed without anchors or aliases and within size limits (see card.py), so that a card that
    would expand on every model_info/list_models never gets in."""
    if len(text) > HEAD_BYTES:  # (validate-yaml's whole text) only the head can hold an acceptable front matter
        text, complete = text[:HEAD_BYTES], False
    try:
        front, _ = split_card(text, complete=complete)
        data = load_card_data(front) if front is not None else None
    except CardError as e:
        return [str(e)]
    if data is None:
        return []
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


def _html(page: Page) -> HTMLResponse:
    """A page for people, never framed by another site (no click-jacking of the log-in and log-out forms) nor
    stored by caches (a private repo's page, a session's form token)."""
    return HTMLResponse(
        page.html,
        status_code=page.status,
        headers={
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "frame-ancestors 'none'",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _json(body: bytes) -> dict:
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"Malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("JSON body must be an object.")
    return data


# Where a route takes a revision: /api/{type}s/{ns}/{name}/X/{rev}, and /[{type}s/]{ns}/{name}/Y/{rev}.
_REVISION_ROUTES = ("revision", "preupload", "tree", "commits", "paths-info", "commit")
_PAGE_REVISION_ROUTES = ("resolve", "tree", "commits", "commit")
_REVISION_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _check_revision(seg: list[str]) -> None:
    """Refuse (400) a revision segment holding a control character (a NUL dropped the connection), wherever a
    route takes a revision: such a name is never a branch, and it must not reach a log or a header."""
    if len(seg) >= 6 and seg[0] == "api" and seg[4] in _REVISION_ROUTES:
        revision = seg[5]
    else:
        page = seg[1:] if seg and seg[0] in ("datasets", "spaces") else seg
        revision = page[3] if len(page) >= 4 and page[2] in _PAGE_REVISION_ROUTES else ""
    if _REVISION_CONTROL_CHARS.search(revision):
        raise HTTPError(
            400,
            f"Invalid revision {revision!r}: a branch name or commit id has no control characters; "
            "use a branch name such as 'main' or a 40-character commit id.",
        )


def _is_commit(method: str, seg: list[str]) -> bool:
    return (
        method == "POST"
        and len(seg) == 6
        and seg[0] == "api"
        and seg[1].endswith("s")
        and seg[1][:-1] in REPO_TYPES
        and seg[4] == "commit"
    )


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
    session_idle_s: float = DEFAULT_SESSION_IDLE_S,
    session_max_s: float = DEFAULT_SESSION_MAX_S,
) -> None:
    """Run the local Hub in the foreground until interrupted (one server per ``root``); browser sessions end
    ``session_idle_s`` seconds after their last request or ``session_max_s`` seconds after their log-in."""
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
    hub = LocalHub(root, tokens or {}, session_idle_s=session_idle_s, session_max_s=session_max_s)
    # NOTE(security): only here, holding the root's lock: no other server can be mid-commit in this tmp/.
    if stale := hub.storage.clean_staging():
        log.info("removed %d staging file(s) left by commits that never finished", stale)
    log.info("local hub serving %s on http://%s:%d (%d token(s))", root, host, port, len(hub.tokens))
    # NOTE(security): proxy_headers=False: uvicorn would otherwise take the client address from the
    # X-Forwarded-For header of any loopback client, and the log-in limit counts failures per address.
    uvicorn.run(hub.app, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False)
