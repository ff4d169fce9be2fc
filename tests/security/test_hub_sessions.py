"""The local Hub's sessions, tokens and error headers under attack, against real server processes.

Each test reproduces one finding of the security review: forged form posts (CSRF) to ``/login`` and
``/logout``, sessions that never expired, unlimited log-in guessing, downloads of a private repo that
ignored its owner's session, a tokens file whose errors printed a token (or that two users shared, or
that anyone could read), and a file name that could not go in the ``X-Error-Message`` header.

NOTE(tests): these tests start their own hubs, so that the log-in limit they trip never locks out the
session-wide ``local_hub`` of the other tests; and each test talks from its own loopback address
(127.0.0.N, all on ``lo``), so that one test's failed log-ins never count against another's.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from hub_peft.errors import InvalidInputError
from hub_peft.hub import LocalHubProcess, start_local_hub
from hub_peft.hub.process import free_port

TOKENS = {name: f"hf_{name}_{secrets.token_hex(16)}" for name in ("alice", "bob")}
_ADDRESSES = itertools.count(2)


# -- helpers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[LocalHubProcess]:
    """A hub of this module's own, with the default session and log-in limits."""
    with start_local_hub(tmp_path_factory.mktemp("sessions_hub"), tokens=TOKENS) as running:
        yield running


@pytest.fixture
def address() -> str:
    """A loopback address of this test's own, so that log-in failures never spill over between tests."""
    return f"127.0.0.{next(_ADDRESSES)}"


def client(hub: LocalHubProcess, address: str) -> httpx.Client:
    """A browser-like client: keeps cookies, does not follow redirects, talks from ``address``."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=hub.endpoint, transport=transport, follow_redirects=False, timeout=30)


def login(c: httpx.Client, token: str, *, headers: dict | None = None, **form: str) -> httpx.Response:
    """POST the log-in form as a browser on the hub's own page sends it (same Origin) unless ``headers`` says."""
    sent = {"origin": str(c.base_url).rstrip("/")} if headers is None else headers
    return c.post("/login", data={"token": token, "next": "/", **form}, headers=sent)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "the page has no CSRF token in its form"
    return match.group(1)


def logged_in_as(c: httpx.Client) -> str | None:
    """Who the hub's index page says is logged in (None: the page offers a log-in link)."""
    html = c.get("/").text
    match = re.search(r'<span class="who">([^<·]+) ·', html)
    return match.group(1).strip() if match else None


def hub_serve_command(root: Path, tokens_file: Path, port: int) -> list[str]:
    """``hub-peft hub serve`` as an operator types it."""
    serve = [sys.executable, "-m", "hub_peft.cli", "hub", "serve"]
    return [*serve, "--root", str(root), "--port", str(port), "--tokens-file", str(tokens_file)]


def run_serve(root: Path, tokens_file: Path) -> subprocess.CompletedProcess:
    """``hub-peft hub serve`` with ``tokens_file``, as an operator runs it (exits at once when refused)."""
    return subprocess.run(hub_serve_command(root, tokens_file, free_port()), capture_output=True, text=True, timeout=60)


def write_tokens(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# -- CSRF --------------------------------------------------------------------------------------------------
def test_a_login_posted_from_another_site_is_refused(hub, address):
    """Login CSRF: a page elsewhere posts the attacker's token so that the victim works in the attacker's
    account. Any Origin but the hub's own is refused, another port of the same host included."""
    own = hub.endpoint
    with client(hub, address) as c:
        for headers in (
            {"origin": "http://evil.example"},
            {"origin": "null"},  # a sandboxed frame or a data: URL
            {"origin": f"http://127.0.0.1:{free_port()}"},  # the same *site* (SameSite lets the cookie go along)
            {"referer": "http://evil.example/page"},  # no Origin, a foreign Referer
            {"origin": own.replace("http:", "https:")},
        ):
            r = login(c, TOKENS["alice"], headers=headers)
            assert r.status_code == 403, (headers, r.status_code)
            assert "another site" in r.text and "set-cookie" not in r.headers
        assert logged_in_as(c) is None

        r = login(c, TOKENS["alice"], headers={"referer": f"{own}/login?next=/"})  # no Origin, our Referer
        assert r.status_code == 303
        r = login(c, TOKENS["alice"], headers={"origin": own, "referer": f"{own}/login"}, csrf=csrf_of(c.get("/").text))
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "max-age", "path", "samesite"} <= attributes and "secure" not in attributes  # http here
        assert "samesite=strict" in cookie.lower() and "max-age=43200" in cookie.lower()
        assert TOKENS["alice"] not in cookie and logged_in_as(c) == "alice"

    with client(hub, address) as script:  # no Origin, no Referer and no session: a script, not a forged form
        assert login(script, TOKENS["bob"], headers={}).status_code == 303


def test_logout_and_a_login_in_a_session_need_the_origin_and_the_form_token(hub, address):
    """CSRF on the session's own forms: with the session cookie attached (same site), a forged post must
    neither end the session nor switch it to another user."""
    own = hub.endpoint
    with client(hub, address) as c:
        assert login(c, TOKENS["alice"]).status_code == 303
        first_session = c.cookies["hub_session"]
        token = csrf_of(c.get("/").text)  # the log-out form of every page carries it
        forged = [
            ("/logout", {"origin": "http://evil.example"}, {"csrf": token}),
            ("/logout", {}, {"csrf": token}),  # neither Origin nor Referer, with a session
            ("/logout", {"origin": own}, {}),  # same origin but no form token
            ("/logout", {"origin": own}, {"csrf": secrets.token_urlsafe(32)}),  # a wrong token
            ("/login", {"origin": own}, {"token": TOKENS["bob"]}),  # a session switched to bob, no form token
        ]
        for path, headers, form in forged:
            r = c.post(path, data=form, headers=headers)
            assert r.status_code == 403, (path, headers, form.keys(), r.status_code)
            assert "set-cookie" not in r.headers
        assert logged_in_as(c) == "alice"

        # The real log-in form of a logged-in viewer carries the token; a log-in starts a new session id.
        r = login(c, TOKENS["bob"], csrf=csrf_of(c.get("/login").text))
        assert r.status_code == 303 and c.cookies["hub_session"] != first_session
        assert logged_in_as(c) == "bob"
        with client(hub, address) as old:
            old.cookies.set("hub_session", first_session)
            assert logged_in_as(old) is None, "the session before the log-in must end"

        second_session = c.cookies["hub_session"]
        r = c.post("/logout", data={"csrf": csrf_of(c.get("/").text)}, headers={"origin": own})
        assert r.status_code == 303 and 'hub_session=""' in r.headers["set-cookie"]
        with client(hub, address) as replay:  # the cookie kept by an attacker is dead on the server too
            replay.cookies.set("hub_session", second_session)
            assert logged_in_as(replay) is None


def test_pages_cannot_be_framed_and_the_cookie_gives_no_write_rights(hub, address, repo_name):
    """Click-jacking of the forms, and CSRF on the API: the session cookie must not authorise any write."""
    with client(hub, address) as c:
        assert login(c, TOKENS["alice"]).status_code == 303
        for path in ("/", "/login"):
            r = c.get(path)
            assert (
                r.headers["x-frame-options"] == "DENY"
                and "frame-ancestors 'none'" in r.headers["content-security-policy"]
            )
        r = c.post("/api/repos/create", json={"name": repo_name, "type": "model"}, headers={"origin": hub.endpoint})
        assert r.status_code == 401
        assert c.get(f"/api/models/alice/{repo_name}").status_code == 404


# -- session expiry ----------------------------------------------------------------------------------------
def test_sessions_expire_when_idle_and_after_a_maximum_age(tmp_path, address):
    """A stolen or forgotten session cookie must not work forever: idle 3 s and 7 s in all here."""
    with (
        start_local_hub(tmp_path / "hub", tokens=TOKENS, session_idle_s=3, session_max_s=7) as short,
        client(short, address) as c,
    ):
        assert login(c, TOKENS["alice"]).status_code == 303
        assert logged_in_as(c) == "alice"
        time.sleep(3.5)
        assert logged_in_as(c) is None, "a session idle past session_idle_s must end"

        r = login(c, TOKENS["alice"])
        assert "max-age=7" in r.headers["set-cookie"].lower()
        started = time.monotonic()
        while time.monotonic() - started < 5.5:  # used every second: never idle, still younger than 7 s
            assert logged_in_as(c) == "alice"
            time.sleep(1)
        while time.monotonic() - started < 7.5:
            time.sleep(0.5)
            logged_in_as(c)
        assert logged_in_as(c) is None, "a session older than session_max_s must end, however busy"


# -- log-in rate limit -------------------------------------------------------------------------------------
def test_failed_logins_are_limited_per_client_and_never_slow_another_one(hub, address):
    """Guessing tokens at the form: 5 failures a minute from one address, then 429 with Retry-After for every
    attempt from it (the right token too: no oracle), even with a forged X-Forwarded-For; any other
    address logs in at once."""
    with client(hub, address) as attacker:
        for _ in range(5):
            assert login(attacker, f"hf_guess_{secrets.token_hex(8)}").status_code == 401
        r = login(attacker, "hf_guess_6")
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert "Too many failed log-ins" in r.text
        assert login(attacker, TOKENS["alice"]).status_code == 429
        spoofed = login(attacker, TOKENS["alice"], headers={"origin": hub.endpoint, "x-forwarded-for": "10.1.2.3"})
        assert spoofed.status_code == 429 and "set-cookie" not in spoofed.headers

    other = f"127.0.1.{next(_ADDRESSES) % 250 + 2}"
    with client(hub, other) as user:
        started = time.monotonic()
        r = login(user, TOKENS["alice"])
        assert r.status_code == 303 and time.monotonic() - started < 5
        assert login(user, "hf_a_typo", csrf=csrf_of(user.get("/").text)).status_code == 401  # its own budget


def test_concurrent_guesses_do_not_slip_past_the_limit(hub, address):
    """Twelve guesses at once from one address: exactly five are checked, the rest get 429."""

    def guess(i: int) -> int:
        with client(hub, address) as c:
            return login(c, f"hf_parallel_{i}").status_code

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(guess, range(12)))
    assert sorted(codes) == [401] * 5 + [429] * 7, codes


# -- downloads with the session ----------------------------------------------------------------------------
def test_a_private_repo_downloads_with_its_owner_session(hub, address, repo_name):
    """The private repo's page shows download links: they must work for its logged-in owner (GET and HEAD),
    and stay 404 to anonymous clients and to other users' sessions; tokens keep working."""
    from huggingface_hub import HfApi

    repo_id, data = f"alice/{repo_name}", os.urandom(3000)
    api = HfApi(endpoint=hub.endpoint, token=TOKENS["alice"])
    api.create_repo(repo_id, private=True)
    api.upload_file(path_or_fileobj=data, path_in_repo="weights/part.bin", repo_id=repo_id)
    url = f"/{repo_id}/resolve/main/weights/part.bin"

    with client(hub, address) as anonymous:
        assert anonymous.get(url).status_code == 404 and anonymous.head(url).status_code == 404
        anonymous.cookies.set("hub_session", "forged-" + secrets.token_urlsafe(32))
        assert anonymous.get(url).status_code == 404
    with client(hub, address) as bob:
        assert login(bob, TOKENS["bob"]).status_code == 303
        assert bob.get(url).status_code == 404 and bob.get(f"/{repo_id}").status_code == 404
    with client(hub, address) as alice:
        assert login(alice, TOKENS["alice"]).status_code == 303
        page = alice.get(f"/{repo_id}/tree/main/weights")
        links = re.findall(r'<a href="([^"]+)" download>', page.text)
        assert links and all(alice.get(link).status_code == 200 for link in links)
        r = alice.get(url)
        assert r.status_code == 200 and r.content == data
        head = alice.head(url)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
        assert alice.get(url, headers={"range": "bytes=0-9"}).content == data[:10]
    with client(hub, address) as token_holder:
        r = token_holder.get(url, headers={"authorization": f"Bearer {TOKENS['alice']}"})
        assert r.status_code == 200 and r.content == data
        assert token_holder.get(url, headers={"authorization": "Bearer hf_wrong"}).status_code == 401


# -- error headers -----------------------------------------------------------------------------------------
def test_names_that_latin1_cannot_encode_give_a_clean_404(hub, repo_name):
    """A missing ``名前-✓.txt`` was a 500 (its name could not go in ``X-Error-Message``), which the client retried
    for 23 s and blamed on the network; now a 404 with an ASCII header and the full name in the JSON body."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id = f"alice/{repo_name}"
    HfApi(endpoint=hub.endpoint, token=TOKENS["alice"]).create_repo(repo_id)
    name = "名前-✓.txt"
    with httpx.Client(base_url=hub.endpoint, timeout=30) as c:
        # NOTE(tests): a path with CR or LF never reaches the hub (Starlette's router answers a plain 404), so the
        # control characters here are a tab and DEL, in a route-not-found message.
        for method, path in (("GET", f"/{repo_id}/resolve/main/{name}"), ("DELETE", f"/{name}%09%7F-x")):
            r = c.request(method, path)
            assert r.status_code == 404, r.text
            header = r.headers["x-error-message"]
            assert header.isascii() and header.isprintable(), header
            assert name in r.json()["error"]
        assert "\\u540d\\u524d" in c.get(f"/{repo_id}/resolve/main/{name}").headers["x-error-message"]
        r = c.post("/login", data={"token": TOKENS["alice"], "next": "/名前\r\nSet-Cookie: x=1"})
        assert r.status_code == 303 and r.headers["location"].isascii() and "x=1" not in r.headers["set-cookie"]

    started = time.monotonic()
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, name, endpoint=hub.endpoint)
    assert time.monotonic() - started < 10, "the client retried: the server's answer was not a clean 404"


# -- the tokens file ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line",
    [
        "{token}",  # the token alone, without its user
        "alice:{token}",  # the wrong separator
        "alice {token}",
        "{token} alice=x",  # a token where the user name goes
        "=  {token}",
    ],
)
def test_a_bad_tokens_file_line_never_prints_its_token(tmp_path, line):
    """The error named the line's text, so a token-only line was printed to the terminal and the logs."""
    secret = f"hf_{secrets.token_hex(16)}"
    tokens_file = write_tokens(
        tmp_path / "tokens", f"# users\nalice=hf_{secrets.token_hex(8)}\n\n{line.format(token=secret)}\n"
    )
    result = run_serve(tmp_path / "root", tokens_file)
    assert result.returncode == 2, result.stderr
    assert f"Line 4 of the tokens file {tokens_file}" in result.stderr
    assert secret not in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_two_users_sharing_a_token_are_refused(tmp_path):
    """A shared token made the second user silently win: every push of the first was made as the second."""
    shared = f"hf_{secrets.token_hex(16)}"
    tokens_file = write_tokens(tmp_path / "tokens", f"alice={shared}\nbob={shared}\n")
    result = run_serve(tmp_path / "root", tokens_file)
    assert result.returncode == 2 and "'alice'" in result.stderr and "'bob'" in result.stderr
    assert "same token" in result.stderr and shared not in result.stdout + result.stderr
    with pytest.raises(InvalidInputError, match="same token") as e:
        start_local_hub(tmp_path / "hub", tokens={"alice": shared, "bob": shared})
    assert shared not in str(e.value)
    with pytest.raises(InvalidInputError) as e:  # the mapping reversed by mistake: token -> user
        start_local_hub(tmp_path / "hub", tokens={f"hf {shared}": "alice"})
    assert shared not in str(e.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_tokens_file_other_users_can_read_is_refused(tmp_path, mode):
    secret = f"hf_{secrets.token_hex(16)}"
    tokens_file = write_tokens(tmp_path / "tokens", f"alice={secret}\n", mode)
    result = run_serve(tmp_path / "root", tokens_file)
    assert result.returncode == 2 and f"chmod 600 {tokens_file}" in result.stderr
    assert secret not in result.stdout + result.stderr


def test_a_tokens_file_of_mode_600_or_stricter_is_accepted(tmp_path):
    secret = f"hf_{secrets.token_hex(16)}"
    tokens_file = write_tokens(tmp_path / "tokens", f"alice={secret}\n", 0o400)
    port = free_port()
    cmd = hub_serve_command(tmp_path / "root", tokens_file, port)
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, whoami = time.monotonic() + 30, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                whoami = httpx.get(
                    f"http://127.0.0.1:{port}/api/whoami-v2", headers={"authorization": f"Bearer {secret}"}
                )
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert whoami is not None and whoami.json()["name"] == "alice"
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0].decode()
    assert secret not in output
