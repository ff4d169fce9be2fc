"""Shared helpers of the local Hub's routes: request routing checks, the Hub's error and page responses, URLs.

Routing is done on the raw (still percent-encoded) path, because the client encodes a revision such as
``refs/pr/1`` as one path segment and a decoded path could not tell it apart from a file path: every route
receives that path as a list of decoded segments (``seg``).
"""

from __future__ import annotations

import hashlib
import json
import re

from starlette.responses import HTMLResponse, JSONResponse, Response

from ..errors import BadRequest, HTTPError
from .pages import Page
from .storage import REPO_TYPES, Repo

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# Where a route takes a revision: /api/{type}s/{ns}/{name}/X/{rev}, and /[{type}s/]{ns}/{name}/Y/{rev}.
_REVISION_ROUTES = ("revision", "preupload", "tree", "commits", "paths-info", "commit")
_PAGE_REVISION_ROUTES = ("resolve", "tree", "commits", "commit")
_REVISION_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def header_value(text: str, limit: int = 500) -> str:
    """``text`` as an HTTP header value that always encodes: control characters (CR, LF...) as spaces,
    non-ASCII as ``\\uXXXX`` escapes, at most ``limit`` characters.

    NOTE(security): header values come out as latin-1, so a file name such as ``名前.txt`` would make the
    response fail (a 500, which the client retries); a CR or LF must never reach a header either."""
    return _CONTROL_CHARS.sub(" ", text).encode("ascii", "backslashreplace").decode("ascii")[:limit]


def error_response(status: int, message: str, code: str | None = None, headers: dict | None = None) -> Response:
    """The Hub's error shape: the full message in the JSON body, an ASCII-safe copy in ``X-Error-Message``."""
    hdrs = {"X-Error-Message": header_value(message)}
    if code:
        hdrs["X-Error-Code"] = code
    hdrs.update(headers or {})
    return JSONResponse({"error": message}, status_code=status, headers=hdrs)


def html_response(page: Page) -> HTMLResponse:
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


def json_body(body: bytes) -> dict:
    """A request's JSON object body; BadRequest (400) when it is not one."""
    try:
        data = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"Malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("JSON body must be an object.")
    return data


def check_revision(seg: list[str]) -> None:
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


def is_api_repo_type(segment: str) -> bool:
    """Whether an ``/api/`` path segment names a repo type (``models``, ``datasets``, ``spaces``)."""
    return segment.endswith("s") and segment[:-1] in REPO_TYPES


def is_commit(method: str, seg: list[str]) -> bool:
    """POST /api/{type}s/{ns}/{name}/commit/{rev}: the one route whose body is streamed."""
    return method == "POST" and len(seg) == 6 and seg[0] == "api" and is_api_repo_type(seg[1]) and seg[4] == "commit"


def folder_oid(path: str) -> str:
    return hashlib.sha1(f"tree {path}".encode()).hexdigest()


def repo_url(base: str, repo: Repo) -> str:
    prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
    return f"{base}/{prefix}{repo.repo_id}"
