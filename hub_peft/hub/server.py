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
import logging
import os
import time
from pathlib import Path
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import HTTPError, LocalHubError, RepoNotFound
from .card import card_metadata_errors
from .commit_routes import DEFAULT_MAX_COMMIT_BYTES, CommitRoutes
from .download_routes import DownloadRoutes
from .page_routes import PageRoutes
from .pages import (
    DEFAULT_LOGIN_MAX_FAILURES,
    DEFAULT_LOGIN_WINDOW_S,
    DEFAULT_SESSION_IDLE_S,
    DEFAULT_SESSION_MAX_S,
    LoginLimiter,
    Pages,
    Sessions,
    cookie_session,
)
from .repo_routes import RepoRoutes
from .route_helpers import check_revision, error_response, is_api_repo_type, is_commit, json_body
from .storage import Repo, Storage

log = logging.getLogger("hub_peft.hub")

MAX_JSON_BODY_BYTES = 16 << 20  # any body but a commit's: read whole (a preupload of 25,000 files takes ~5 MiB)


class LocalHub(RepoRoutes, CommitRoutes, DownloadRoutes, PageRoutes):
    """The ASGI application. ``tokens`` maps token → user name.

    This class holds the state (storage, tokens, sessions), authenticates requests and dispatches them; the routes
    live by area in the mixins: repo_routes.py, commit_routes.py, download_routes.py and page_routes.py.
    """

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

    async def _dispatch(self, request: Request) -> Response:
        started = time.perf_counter()
        raw = request.scope.get("raw_path") or request.url.path.encode()
        raw_path = raw.decode("latin-1").split("?", 1)[0]
        segments = [unquote(s) for s in raw_path.strip("/").split("/")] if raw_path.strip("/") else []
        try:
            check_revision(segments)
            user = self._user(request)
            if is_commit(request.method, segments):
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
        except LocalHubError as e:  # HTTPError and the storage errors: the answer the real Hub gives
            response = error_response(e.status, str(e), e.code)
        except Exception:  # pragma: no cover - a bug; keep serving the other requests
            log.exception("internal error on %s %s", request.method, raw_path)
            response = error_response(500, "Internal server error.")
        log.info(
            "%s %s %d %.1fms", request.method, raw_path, response.status_code, 1000 * (time.perf_counter() - started)
        )
        return response

    def _route(self, request: Request, seg: list[str], user: str | None, body: bytes) -> Response:
        method = request.method
        base = str(request.base_url).rstrip("/")
        if seg == ["api", "health"]:
            return JSONResponse({"status": "ok"})
        if seg == ["api", "whoami-v2"] and method == "GET":
            return self._whoami(user)
        if seg == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(base, user, json_body(body))
        if seg == ["api", "validate-yaml"] and method == "POST":
            payload = json_body(body)
            errors = card_metadata_errors(str(payload.get("content") or ""))
            return JSONResponse(
                {"errors": [{"message": m} for m in errors], "warnings": []}, status_code=400 if errors else 200
            )
        if seg == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo(user, json_body(body))
        if len(seg) == 2 and seg[0] == "api" and is_api_repo_type(seg[1]) and method == "GET":
            return self._list_repos(seg[1][:-1], user, request.query_params)
        if len(seg) >= 4 and seg[0] == "api" and is_api_repo_type(seg[1]):
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
