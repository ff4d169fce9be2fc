"""The local Hub's pages for people: server-side HTML, no JavaScript, every value escaped.

``/`` lists the repos the viewer may see (``?search=`` by name, ``?author=``); ``/{repo}`` shows the
rendered model card with its metadata as badges, the files with sizes and download links, the latest
commit and the loss curve when the repo has one; ``/{repo}/tree/{rev}/{path}``, ``/{repo}/commits/{rev}``
and ``/{repo}/commit/{sha}`` browse revisions (datasets and Spaces under ``/datasets/`` and ``/spaces/``).

A browser logs in at ``/login`` with a token: the server keeps ``session id → user`` in memory and the
browser only an HttpOnly, SameSite=Strict cookie holding the random session id (never the token, never in
a URL). Private repos are 404 to everyone else, exactly as the API answers. Jinja2 autoescapes every value
and Markdown is rendered with raw HTML disabled, so a card's ``<script>`` is shown as text.
"""

from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from jinja2 import DictLoader, Environment, select_autoescape
from markdown_it import MarkdownIt

from .storage import REPO_TYPES, Commit, Repo, Storage, StorageError

if TYPE_CHECKING:
    from starlette.requests import Request

SESSION_COOKIE = "hub_session"
FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)  # a card's YAML header
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
<button>Log out</button></form>{% else %}<a href="/login?next={{ here | urlencode }}">Log in</a>{% endif %}</span>
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


class Sessions:
    """Browser sessions: random id -> user name, in memory (a restart logs everyone out)."""

    def __init__(self) -> None:
        self._users: dict[str, str] = {}
        self._lock = threading.Lock()

    def start(self, user: str) -> str:
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._users[session] = user
        return session

    def user(self, session: str | None) -> str | None:
        with self._lock:
            return self._users.get(session) if session else None

    def end(self, session: str | None) -> None:
        with self._lock:
            self._users.pop(session or "", None)


class Pages:
    """Renders the HTML routes for :class:`hub_peft.hub.server.LocalHub` (which checks tokens and visibility)."""

    def __init__(self, storage: Storage, visible, card_text) -> None:
        self.storage, self.visible, self.card_text = storage, visible, card_text
        self.sessions = Sessions()

    def render(self, template: str, code: int = 200, **context) -> Page:
        return Page(code, _ENV.get_template(template).render(**context))

    def error(self, status: int, message: str, **context) -> Page:
        return self.render("error.html", status, title=str(status), status=status, message=message, **context)

    # --- routes ----------------------------------------------------------------------------------
    def index(self, user: str | None, search: str, author: str, here: str) -> Page:
        rows = []
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
        return self.render("index.html", title="Repositories", repos=rows, search=search, author=author, user=user,
                           here=here)  # fmt: skip

    def repo(self, user: str | None, repo_type: str, repo_id: str, here: str) -> Page:
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
        return self.render(
            "repo.html", title=repo.repo_id, repo=repo, commit=commit, base=base, badges=badges,
            files=_listing(repo, commit, "main", ""), user=user, here=here,
            loss_curve=f"{base}/resolve/{commit.id}/loss_curve.png" if loss else None,
            card_html=render_card(body, f"{base}/resolve/{commit.id}/") if body.strip() else "<p><em>No card.</em></p>",
        )  # fmt: skip

    def tree(self, user: str | None, repo_type: str, repo_id: str, revision: str, path: str, here: str) -> Page:
        repo = self.visible(user, repo_type, repo_id)
        commit = self.storage.resolve(repo, revision)
        files = _listing(repo, commit, revision, path)
        if path and not files:
            return self.error(404, f"No folder {path!r} at {revision}.", user=user, here=here)
        return self.render("tree.html", title=f"{repo.repo_id}/{path}", repo=repo, commit=commit, base=repo_url(repo),
                           files=files, path=path, revision=revision, user=user, here=here)  # fmt: skip

    def commits(self, user: str | None, repo_type: str, repo_id: str, revision: str, here: str) -> Page:
        repo = self.visible(user, repo_type, repo_id)
        history = list(self.storage.history(self.storage.resolve(repo, revision)))
        return self.render("commits.html", title=f"{repo.repo_id} history", repo=repo, commits=history,
                           base=repo_url(repo), revision=revision, user=user, here=here)  # fmt: skip

    def commit(self, user: str | None, repo_type: str, repo_id: str, sha: str, here: str) -> Page:
        repo = self.visible(user, repo_type, repo_id)
        commit = self.storage.resolve(repo, sha)
        parent = commit.parents[0] if commit.parents else None
        before = self.storage.read_commit(parent).tree if parent else {}
        changes = []
        for path in sorted(set(before) | set(commit.tree)):
            old, new = before.get(path), commit.tree.get(path)
            if old is None:
                changes.append(("added", path, human_size(new.size)))
            elif new is None:
                changes.append(("deleted", path, ""))
            elif old.oid != new.oid:
                changes.append(("modified", path, human_size(new.size)))
        return self.render("commit.html", title=commit.title, repo=repo, commit=commit, parent=parent, changes=changes,
                           base=repo_url(repo), user=user, here=here)  # fmt: skip

    def login_form(self, user: str | None, next_url: str, error: str | None = None, status: int = 200) -> Page:
        return self.render("login.html", status, title="Log in", next=safe_next(next_url), error=error, user=user,
                           here="/")  # fmt: skip


def render_card(markdown: str, files_url: str) -> str:
    """A card's Markdown as HTML (raw HTML escaped); links and images relative to the repo, such as
    ``![Training loss](loss_curve.png)``, point at the repo's files at this commit, as on the Hub."""
    tokens = _MARKDOWN.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            attr = "src" if child.type == "image" else "href" if child.type == "link_open" else None
            target = child.attrGet(attr) if attr else None
            if target and not re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", str(target), re.I):
                child.attrSet(attr, files_url + str(target).removeprefix("./"))
    return _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})


def safe_next(url: str | None) -> str:
    """A redirect target on this server only (no scheme, no host, no ``//``)."""
    url = url or "/"
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"


def cookie_session(request: Request) -> str | None:
    return request.cookies.get(SESSION_COOKIE)


def split_front_matter(text: str) -> tuple[dict, str]:
    """A card's ``(YAML metadata, Markdown body)``; ``{}`` when there is no front matter or it does not parse."""
    import yaml

    match = FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        meta = None
    return (meta if isinstance(meta, dict) else {}), text[match.end() :]


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
            folders[folder] = {"name": folder, "folder": True, "size": "",
                               "url": f"{base}/tree/{quote(revision, safe='')}/{quote(prefix + folder)}"}  # fmt: skip
        else:
            files.append({"name": rest, "folder": False, "size": human_size(entry.size),
                          "url": f"{base}/resolve/{commit.id}/{quote(name)}"})  # fmt: skip
    return [*folders.values(), *files]
