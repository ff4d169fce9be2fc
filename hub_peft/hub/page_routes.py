"""The local Hub's routes for people: the HTML pages (rendered by pages.py), log-in and log-out."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..errors import HTTPError, StorageError
from .pages import SESSION_COOKIE, LoginLimiter, Pages, client_key, cookie_session, cross_site_problem, safe_next
from .route_helpers import html_response

log = logging.getLogger("hub_peft.hub")


class PageRoutes:
    """The HTML pages, ``/login`` and ``/logout``, as a part of :class:`LocalHub`."""

    pages: Pages  # LocalHub's
    login_limiter: LoginLimiter

    if TYPE_CHECKING:  # what this mixin calls on LocalHub (server.py)

        def _viewer(self, request: Request, user: str | None) -> str | None: ...

        def _token_user(self, token: str) -> str | None: ...

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
        return html_response(page)

    def _login(self, request: Request, user: str | None, body: bytes) -> Response:
        session = cookie_session(request)
        viewer = self._viewer(request, user)
        csrf = self.pages.sessions.csrf(session) or ""
        if request.method == "GET":
            return html_response(self.pages.login_form(viewer, request.query_params.get("next", "/"), csrf=csrf))
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
            response: Response = html_response(self.pages.login_form(viewer, target, message, status=429, csrf=csrf))
            response.headers["Retry-After"] = str(wait)
            return response
        known = self._token_user((form.get("token") or [""])[0].strip())
        if known is None:
            log.warning("failed log-in from %s", client)  # never the token
            return html_response(
                self.pages.login_form(viewer, target, "That token is not valid here.", status=401, csrf=csrf)
            )
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
        return html_response(
            self.pages.error(403, message, user=viewer, here="/", csrf=self.pages.sessions.csrf(session))
        )
