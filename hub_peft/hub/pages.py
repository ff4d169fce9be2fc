"""The local Hub's pages for people: server-side HTML, no JavaScript, every value escaped.

``/`` lists the repos the viewer may see (``?search=`` by name, ``?author=``); ``/{repo}`` shows the
rendered model card with its metadata as badges, the files with sizes and download links, the latest
commit and the loss curve when the repo has one; ``/{repo}/tree/{rev}/{path}``, ``/{repo}/commits/{rev}``
and ``/{repo}/commit/{sha}`` browse revisions (datasets and Spaces under ``/datasets/`` and ``/spaces/``).

A browser logs in at ``/login`` with a token: the server keeps ``session id → user`` in memory and the
browser only an HttpOnly, SameSite=Strict cookie holding the random session id (never the token, never in
a URL). Sessions expire (idle and absolute limits, see :class:`Sessions`); failed log-ins are limited per
client address (:class:`LoginLimiter`); every form POST must come from this server's own origin and, in
a session, carry the session's CSRF token (see ``LocalHub._forged`` in server.py). Private repos are 404
to everyone else, exactly as the API answers. Jinja2 autoescapes every value and Markdown is rendered
with raw HTML disabled, so a card's ``<script>`` is shown as text.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import quote, urlsplit

from jinja2 import DictLoader, Environment, select_autoescape
from markdown_it import MarkdownIt

from ..errors import InvalidInputError, StorageError
from .storage import REPO_TYPES, Commit, Repo, Storage

if TYPE_CHECKING:
    from starlette.requests import Request

SESSION_COOKIE = "hub_session"
DEFAULT_SESSION_IDLE_S = 2 * 3600.0  # a session unused this long ends
DEFAULT_SESSION_MAX_S = 12 * 3600.0  # and any session ends this long after its log-in
DEFAULT_LOGIN_MAX_FAILURES = 5  # failed log-ins per client address...
DEFAULT_LOGIN_WINDOW_S = 60.0  # ...in any window this long, then 429 until the oldest one ages out
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
_BADGE_FIELDS = ("base_model", "library_name", "pipeline_tag", "license", "tags", "datasets", "language")

_TEMPLATES = {
    "base.html": """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{{ title }} · local Hub</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#1f2328;background:#fafafa}
header{background:#fff;border-bottom:1px solid #ddd;padding:.6rem 1.5rem;display:flex;gap:1rem;align-items:center}
header a.home{font-weight:700;text-decoration:none;color:#1f2328}header .who{margin-left:auto}
main{max-width:980px;margin:1.5rem auto;padding:0 1.5rem}a{color:#0b5cad}
.badge{display:inline-block;background:#eef3fb;border:1px solid #cddcf0;border-radius:1rem;padding:.1rem .6rem;
margin:.1rem;font-size:.85rem}.badge b{font-weight:600}.private{background:#fff3cd;border-color:#f0d98c}
table{border-collapse:collapse;width:100%;background:#fff}td,th{border-bottom:1px solid #eee;padding:.35rem .5rem;
text-align:left}td.size{text-align:right;white-space:nowrap;color:#555}.card{background:#fff;border:1px solid #ddd;
border-radius:.5rem;padding:0 1.2rem;margin:1rem 0;overflow-x:auto}.card img{max-width:100%}
pre{background:#f4f4f4;padding:.6rem;overflow-x:auto}.muted{color:#666;font-size:.9rem}
form.inline{display:inline}input[type=text],input[type=password]{padding:.3rem;min-width:18rem}
</style></head><body><header><a class="home" href="/">🤗 local Hub</a>
<form class="inline" action="/" method="get"><input type="text" name="search" placeholder="Search repos"
value="{{ search or '' }}"></form>
<span class="who">{% if user %}{{ user }} · <form class="inline" action="/logout" method="post">
<input type="hidden" name="csrf" value="{{ csrf or '' }}"><button>Log out</button></form>
{%- else %}<a href="/login?next={{ here | urlencode }}">Log in</a>{% endif %}</span>
</header><main>{% block main %}{% endblock %}</main></body></html>""",
    "index.html": """{% extends "base.html" %}{% block main %}
<h1>Repositories</h1>
<p class="muted">{{ repos | length }} shown{% if search %} matching “{{ search }}”{% endif %}{% if author %}
by {{ author }} (<a href="/">all</a>){% endif %}</p>
<table><tr><th>Repo</th><th>Type</th><th>Author</th><th>Updated</th></tr>
{% for r in repos %}<tr><td><a href="{{ r.url }}">{{ r.repo.repo_id }}</a>{% if r.repo.private %}
<span class="badge private">private</span>{% endif %}</td><td>{{ r.repo.repo_type }}</td>
<td><a href="/?author={{ r.repo.namespace | urlencode }}">{{ r.repo.namespace }}</a></td>
<td class="muted">{{ r.updated }}</td></tr>{% else %}<tr><td colspan="4">No repos.</td></tr>{% endfor %}
</table>{% endblock %}""",
    "repo.html": """{% extends "base.html" %}{% block main %}
<h1>{{ repo.repo_id }}{% if repo.private %} <span class="badge private">private</span>{% endif %}</h1>
<p>{% for key, value in badges %}<span class="badge"><b>{{ key }}</b>: {{ value }}</span>{% endfor %}</p>
<p class="muted">Latest commit <a href="{{ base }}/commit/{{ commit.id }}">{{ commit.id[:7] }}</a>
“{{ commit.title }}” by {{ commit.author }}, {{ commit.date }} ·
<a href="{{ base }}/commits/main">history</a> · <a href="{{ base }}/tree/main">files</a></p>
{% if loss_curve %}<h2>Loss curve</h2><p><img src="{{ loss_curve }}" alt="loss curve" style="max-width:640px"></p>
{% endif %}<h2>Files</h2>{% include "files.html" %}
<h2>Model card</h2><div class="card" id="card">{{ card_html | safe }}</div>{% endblock %}""",
    "files.html": """<table id="files"><tr><th>File</th><th class="size">Size</th><th></th></tr>
{% for f in files %}<tr><td>{% if f.folder %}📁 <a href="{{ f.url }}">{{ f.name }}/</a>
{%- else %}{{ f.name }}{% endif %}</td>
<td class="size">{{ f.size }}</td><td>{% if not f.folder %}<a href="{{ f.url }}" download>download</a>{% endif %}</td>
</tr>{% else %}<tr><td colspan="3">No files.</td></tr>{% endfor %}</table>""",
    "tree.html": """{% extends "base.html" %}{% block main %}
<h1><a href="{{ base }}">{{ repo.repo_id }}</a> / {{ path or "" }}</h1>
<p class="muted">At {{ revision }} (<a href="{{ base }}/commit/{{ commit.id }}">{{ commit.id[:7] }}</a>)</p>
{% include "files.html" %}{% endblock %}""",
    "commits.html": """{% extends "base.html" %}{% block main %}
<h1><a href="{{ base }}">{{ repo.repo_id }}</a>: history of {{ revision }}</h1>
<table><tr><th>Commit</th><th>Title</th><th>Author</th><th>Date</th></tr>
{% for c in commits %}<tr><td><a href="{{ base }}/commit/{{ c.id }}">{{ c.id[:7] }}</a></td><td>{{ c.title }}</td>
<td>{{ c.author }}</td><td class="muted">{{ c.date }}</td></tr>{% endfor %}</table>{% endblock %}""",
    "commit.html": """{% extends "base.html" %}{% block main %}
<h1><a href="{{ base }}">{{ repo.repo_id }}</a>: {{ commit.title }}</h1>
<p class="muted">{{ commit.id }} by {{ commit.author }}, {{ commit.date }}{% if parent %} · parent
<a href="{{ base }}/commit/{{ parent }}">{{ parent[:7] }}</a>{% endif %} ·
<a href="{{ base }}/tree/{{ commit.id }}">browse files at this commit</a></p>
{% if commit.message %}<pre>{{ commit.message }}</pre>{% endif %}
<h2>Changed files</h2><table id="changes"><tr><th>Change</th><th>File</th><th class="size">Size</th></tr>
{% for change, path, size in changes %}<tr><td>{{ change }}</td><td>{{ path }}</td><td class="size">{{ size }}</td></tr>
{% else %}<tr><td colspan="3">No file changed.</td></tr>{% endfor %}</table>{% endblock %}""",
    "login.html": """{% extends "base.html" %}{% block main %}
<h1>Log in</h1>{% if error %}<p style="color:#b00">{{ error }}</p>{% endif %}
<form action="/login" method="post"><input type="hidden" name="next" value="{{ next }}">
{% if csrf %}<input type="hidden" name="csrf" value="{{ csrf }}">{% endif %}
<p><label>Access token <input type="password" name="token" autocomplete="off" required></label></p>
<p><button>Log in</button></p></form>
<p class="muted">The token is checked once; the browser keeps only a random session cookie (HttpOnly).</p>
{% endblock %}""",
    "error.html": """{% extends "base.html" %}{% block main %}<h1>{{ status }}</h1><p>{{ message }}</p>
{% endblock %}""",
}
_ENV = Environment(loader=DictLoader(_TEMPLATES), autoescape=select_autoescape(default=True, default_for_string=True))
_ENV.filters["urlencode"] = lambda value: quote(str(value), safe="")


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def repo_url(repo: Repo) -> str:
    prefix = "" if repo.repo_type == "model" else f"/{repo.repo_type}s"
    return f"{prefix}/{repo.repo_id}"


@dataclass
class Page:
    status: int
    html: str


@dataclass
class _Session:
    user: str
    csrf: str  # the token every form POST of this session must carry
    started: float
    seen: float


class Sessions:
    """Browser sessions: random id -> user name and CSRF token, in memory (a restart logs everyone out).

    A session ends ``idle_s`` seconds after its last request or ``max_s`` seconds after its log-in,
    whichever comes first: an expired session is dropped when it is next presented, and all expired ones
    are swept at each log-in. At most ``max_sessions`` live at once (the oldest are dropped first), so
    a token holder logging in in a loop cannot grow the server's memory.
    """

    def __init__(
        self,
        idle_s: float = DEFAULT_SESSION_IDLE_S,
        max_s: float = DEFAULT_SESSION_MAX_S,
        *,
        max_sessions: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (idle_s > 0 and max_s > 0 and max_sessions > 0):
            raise InvalidInputError("Session limits must be positive: pass idle_s > 0, max_s > 0 and max_sessions > 0.")
        self.idle_s, self.max_s, self.max_sessions, self._clock = idle_s, max_s, max_sessions, clock
        self._sessions: dict[str, _Session] = {}  # in log-in order: the first is the oldest
        self._lock = threading.Lock()

    def start(self, user: str) -> str:
        """A new session for ``user``; its random id goes in the cookie."""
        session, now = secrets.token_urlsafe(32), self._clock()
        with self._lock:
            for sid in [sid for sid, s in self._sessions.items() if self._expired(s, now)]:
                del self._sessions[sid]
            while len(self._sessions) >= self.max_sessions:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[session] = _Session(user, secrets.token_urlsafe(32), now, now)
        return session

    def user(self, session: str | None) -> str | None:
        """The session's user (and the session counts as used now), or None when unknown or expired."""
        live = self._live(session, touch=True)
        return live.user if live else None

    def csrf(self, session: str | None) -> str | None:
        """The CSRF token the session's forms carry, or None when there is no live session."""
        live = self._live(session, touch=False)
        return live.csrf if live else None

    def check_csrf(self, session: str | None, token: str) -> bool:
        """Whether ``token`` is the live session's CSRF token (compared in constant time)."""
        expected = self.csrf(session)
        return expected is not None and hmac.compare_digest(expected.encode(), token.encode())

    def end(self, session: str | None) -> None:
        with self._lock:
            self._sessions.pop(session or "", None)

    def _live(self, session: str | None, *, touch: bool) -> _Session | None:
        if not session:
            return None
        now = self._clock()
        with self._lock:
            live = self._sessions.get(session)
            if live is None:
                return None
            if self._expired(live, now):
                del self._sessions[session]
                return None
            if touch:
                live.seen = now
            return live

    def _expired(self, session: _Session, now: float) -> bool:
        return now - session.seen >= self.idle_s or now - session.started >= self.max_s


class LoginLimiter:
    """At most ``max_failures`` failed log-ins per ``window_s`` seconds (sliding) from one client address.

    NOTE(security): an attempt is counted *before* its token is checked and forgiven when it succeeds, so
    concurrent requests cannot slip extra guesses past the limit; and once a client is over the limit every
    attempt of it, a correct one included, gets 429 (letting a correct token through would tell the guesser
    it is correct). Other addresses are never affected. There is no per-user limit: the form carries only a
    token, so a failure names no user, and a per-user lock-out would let anyone lock its owner out.
    """

    def __init__(
        self,
        max_failures: int = DEFAULT_LOGIN_MAX_FAILURES,
        window_s: float = DEFAULT_LOGIN_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (max_failures > 0 and window_s > 0):
            raise InvalidInputError("Log-in limits must be positive: pass max_failures > 0 and window_s > 0.")
        self.max_failures, self.window_s, self._clock = max_failures, window_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    def begin(self, client: str) -> tuple[float | None, int | None]:
        """Count an attempt from ``client``: ``(stamp, None)`` to go on (pass ``stamp`` to :meth:`forgive`
        when the token is right), or ``(None, retry_after_seconds)`` when the client is over the limit."""
        now = self._clock()
        with self._lock:
            if now - self._swept > self.window_s:  # drop the clients that have not failed lately
                self._failures = {c: q for c, q in self._failures.items() if q and now - q[-1] < self.window_s}
                self._swept = now
            failures = self._failures.setdefault(client, deque())
            while failures and now - failures[0] >= self.window_s:
                failures.popleft()
            if len(failures) >= self.max_failures:
                return None, max(1, math.ceil(failures[0] + self.window_s - now))
            failures.append(now)
            return now, None

    def forgive(self, client: str, stamp: float) -> None:
        """The attempt counted at ``stamp`` was a correct log-in: it is no failure."""
        with self._lock:
            failures = self._failures.get(client)
            if failures and stamp in failures:
                failures.remove(stamp)


class _IndexRow(TypedDict):
    repo: Repo
    url: str
    updated: str


class Pages:
    """Renders the HTML routes for :class:`hub_peft.hub.server.LocalHub` (which checks tokens and visibility)."""

    def __init__(
        self,
        storage: Storage,
        visible: Callable[[str | None, str, str], Repo],
        card_text: Callable[[Commit], str],
        sessions: Sessions | None = None,
    ) -> None:
        self.storage, self.visible, self.card_text = storage, visible, card_text
        self.sessions = sessions or Sessions()

    def render(self, template: str, code: int = 200, **context) -> Page:
        return Page(code, _ENV.get_template(template).render(**context))

    def render_repo(self, template: str, repo: Repo, viewer: dict[str, Any], **context) -> Page:
        """A page of ``repo``: its links start at ``base``; ``viewer`` is :func:`_viewer`'s."""
        return self.render(template, repo=repo, base=repo_url(repo), **viewer, **context)

    def error(self, status: int, message: str, **context) -> Page:
        return self.render("error.html", status, title=str(status), status=status, message=message, **context)

    # --- routes ----------------------------------------------------------------------------------
    def index(self, user: str | None, search: str, author: str, here: str, *, csrf: str = "") -> Page:
        rows: list[_IndexRow] = []
        for repo_type in REPO_TYPES:
            for repo in self.storage.list_repos(repo_type):
                if repo.private and repo.owner != user:
                    continue
                if search and search.lower() not in repo.repo_id.lower():
                    continue
                if author and repo.namespace != author:
                    continue
                try:
                    updated = self.storage.resolve(repo, None).date
                except StorageError:  # no commit on main yet
                    updated = repo.created_at
                rows.append({"repo": repo, "url": repo_url(repo), "updated": updated})
        rows.sort(key=lambda r: r["updated"], reverse=True)
        return self.render(
            "index.html",
            title="Repositories",
            repos=rows,
            search=search,
            author=author,
            **_viewer(user, here, csrf),
        )

    def repo(self, user: str | None, repo_type: str, repo_id: str, here: str, *, csrf: str = "") -> Page:
        repo = self.visible(user, repo_type, repo_id)
        commit = self.storage.resolve(repo, None)
        base = repo_url(repo)
        card = self.card_text(commit)
        meta, body = split_front_matter(card)
        badges = []
        for key in _BADGE_FIELDS:
            value = meta.get(key)
            if isinstance(value, list):
                badges += [(key, str(v)) for v in value]
            elif value:
                badges.append((key, str(value)))
        loss = "loss_curve.png" in commit.tree
        return self.render_repo(
            "repo.html",
            repo,
            _viewer(user, here, csrf),
            title=repo.repo_id,
            commit=commit,
            badges=badges,
            files=_listing(repo, commit, "main", ""),
            loss_curve=f"{base}/resolve/{commit.id}/loss_curve.png" if loss else None,
            card_html=render_card(body, f"{base}/resolve/{commit.id}/") if body.strip() else "<p><em>No card.</em></p>",
        )

    def tree(
        self, user: str | None, repo_type: str, repo_id: str, revision: str, path: str, here: str, *, csrf: str = ""
    ) -> Page:
        repo = self.visible(user, repo_type, repo_id)
        commit = self.storage.resolve(repo, revision)
        files = _listing(repo, commit, revision, path)
        if path and not files:
            return self.error(404, f"No folder {path!r} at {revision}.", **_viewer(user, here, csrf))
        return self.render_repo(
            "tree.html",
            repo,
            _viewer(user, here, csrf),
            title=f"{repo.repo_id}/{path}",
            commit=commit,
            files=files,
            path=path,
            revision=revision,
        )

    def commits(
        self, user: str | None, repo_type: str, repo_id: str, revision: str, here: str, *, csrf: str = ""
    ) -> Page:
        repo = self.visible(user, repo_type, repo_id)
        history = list(self.storage.history(self.storage.resolve(repo, revision)))
        viewer, title = _viewer(user, here, csrf), f"{repo.repo_id} history"
        return self.render_repo("commits.html", repo, viewer, title=title, commits=history, revision=revision)

    def commit(self, user: str | None, repo_type: str, repo_id: str, sha: str, here: str, *, csrf: str = "") -> Page:
        repo = self.visible(user, repo_type, repo_id)
        commit = self.storage.resolve(repo, sha)
        parent = commit.parents[0] if commit.parents else None
        before = self.storage.read_commit(parent).tree if parent else {}
        changes = []
        for path in sorted(set(before) | set(commit.tree)):
            old, new = before.get(path), commit.tree.get(path)
            if new is None:
                changes.append(("deleted", path, ""))
            elif old is None:
                changes.append(("added", path, human_size(new.size)))
            elif old.oid != new.oid:
                changes.append(("modified", path, human_size(new.size)))
        viewer, title = _viewer(user, here, csrf), commit.title
        return self.render_repo("commit.html", repo, viewer, title=title, commit=commit, parent=parent, changes=changes)

    def login_form(
        self, user: str | None, next_url: str, error: str | None = None, status: int = 200, *, csrf: str = ""
    ) -> Page:
        return self.render(
            "login.html", status, title="Log in", next=safe_next(next_url), error=error, user=user, here="/", csrf=csrf
        )


def render_card(markdown: str, files_url: str) -> str:
    """A card's Markdown as HTML (raw HTML escaped); links and images relative to the repo, such as
    ``![Training loss](loss_curve.png)``, point at the repo's files at this commit, as on the Hub."""
    tokens = _MARKDOWN.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            attr = "src" if child.type == "image" else "href" if child.type == "link_open" else None
            if attr is None:
                continue
            target = child.attrGet(attr)
            if target and not re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", str(target), re.I):
                child.attrSet(attr, files_url + str(target).removeprefix("./"))
    return _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})


def safe_next(url: str | None) -> str:
    """A redirect target on this server only (no scheme, no host, no ``//``)."""
    url = url or "/"
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"


def cookie_session(request: Request) -> str | None:
    return request.cookies.get(SESSION_COOKIE)


def client_key(request: Request) -> str:
    """Who a failed log-in is counted against: the peer address (an IPv6 client by its /64, which one
    machine usually holds whole). NOTE(security): the socket's peer, never ``X-Forwarded-For``, which any
    client can write: ``serve`` runs uvicorn with ``proxy_headers=False`` for this."""
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def cross_site_problem(request: Request, *, cookie_auth: bool) -> str | None:
    """Why a form POST may come from another site, or None: its ``Origin`` (else its ``Referer``) must be
    this server's own origin; with neither, only a post that no cookie authenticates is accepted."""
    own = f"{request.url.scheme}://{request.url.netloc}".lower()
    origin = request.headers.get("origin")
    if origin is not None:  # "null" (a sandboxed frame, a data: URL) is refused too
        return None if origin.strip().lower() == own else f"it was sent from another site ({origin.strip()[:100]})"
    referer = request.headers.get("referer")
    if referer:
        parts = urlsplit(referer.strip())
        sent_from = f"{parts.scheme}://{parts.netloc}".lower()
        return None if sent_from == own else f"it was sent from another site ({sent_from[:100]})"
    # NOTE(security): browsers send Origin with every POST, so a post with neither header is a script or an
    # old browser; a log-in without a session is let through for those, a session's post is not.
    return "it carries neither an Origin nor a Referer header" if cookie_auth else None


def split_front_matter(text: str) -> tuple[dict, str]:
    """A card's ``(YAML metadata, Markdown body)``; ``{}`` when there is no front matter or it is refused (an
    alias, too large...: the checks of :mod:`.card`, which the commit path applies too)."""
    from ..errors import CardError
    from .card import load_card_data, split_card

    try:
        front, body = split_card(text)
    except CardError:  # a front matter over the size cap: not shown
        return {}, ""
    try:
        return (load_card_data(front) if front is not None else None) or {}, body
    except CardError:  # refused metadata is not shown, the Markdown is
        return {}, body


def _viewer(user: str | None, here: str, csrf: str) -> dict[str, Any]:
    """What every page shows of who looks at it: the user, the page's own address, the CSRF token of its forms."""
    return {"user": user, "here": here, "csrf": csrf}


def _listing(repo: Repo, commit: Commit, revision: str, path: str) -> list[dict]:
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    base = repo_url(repo)
    folders, files = {}, []
    for name, entry in sorted(commit.tree.items()):
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if "/" in rest:
            folder = rest.split("/", 1)[0]
            folders[folder] = {
                "name": folder,
                "folder": True,
                "size": "",
                "url": f"{base}/tree/{quote(revision, safe='')}/{quote(prefix + folder)}",
            }
        else:
            files.append(
                {
                    "name": rest,
                    "folder": False,
                    "size": human_size(entry.size),
                    "url": f"{base}/resolve/{commit.id}/{quote(name)}",
                }
            )
    return [*folders.values(), *files]
