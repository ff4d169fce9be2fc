"""Start a local Hub server as a child process on loopback and wait until it answers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HubPeftError, InvalidInputError, StorageError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when the thread that started the hub exits or its process dies, even by
    SIGKILL, so a killed Studio or test run leaves no Hub behind (start it from a long-lived thread)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalHubProcess:
    """A running ``hub-peft hub serve``; use as a context manager or call :meth:`stop`."""

    root: Path
    host: str
    port: int
    process: subprocess.Popen
    log_path: Path
    tokens: dict[str, str] = field(default_factory=dict)  # user -> token

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LocalHubProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_hub(
    root: str | os.PathLike,
    *,
    tokens: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    timeout: float = 30.0,
    session_idle_s: float | None = None,
    session_max_s: float | None = None,
) -> LocalHubProcess:
    """Start ``hub-peft hub serve`` in a child process; ``tokens`` maps user → token (one token per user,
    none shared); ``session_idle_s``/``session_max_s`` override the browser sessions' lifetimes.

    Tokens never touch the command line (``ps`` shows it to every user) nor a shared path: they are
    written to a file created exclusively (mode 600) in a fresh private directory (mode 700) under the
    user's runtime directory, and that directory is removed as soon as the child has read it (it
    answers only after reading), or when it fails to start.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    tokens = dict(tokens or {})
    _check_tokens(tokens)
    stale = root / ".tokens"  # where versions before 0.2 left the tokens, in a shared folder: remove ours
    if stale.is_file() and stale.stat().st_uid == os.getuid():
        stale.unlink()
    secrets_dir = Path(tempfile.mkdtemp(prefix="hub_peft-", dir=runtime_dir()))  # mode 700, only ours
    try:
        tokens_file = secrets_dir / "tokens"
        fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{user}={token}\n" for user, token in tokens.items())
        log_path = root / "server.log"
        cmd = [sys.executable, "-m", "hub_peft.cli", "hub", "serve", "--root", str(root), "--host", host]
        cmd += ["--port", str(port), "--tokens-file", str(tokens_file)]
        if session_idle_s is not None:
            cmd += ["--session-idle-seconds", str(session_idle_s)]
        if session_max_s is not None:
            cmd += ["--session-max-seconds", str(session_max_s)]
        log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        log_file.close()
        hub = LocalHubProcess(root=root, host=host, port=port, process=process, log_path=log_path, tokens=tokens)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise HubPeftError(f"The local hub exited at start (code {process.returncode}); see {log_path}.")
            try:
                with urllib.request.urlopen(f"{hub.endpoint}/api/health", timeout=1) as r:
                    if r.status == 200:
                        return hub
            except OSError:
                time.sleep(0.1)
        hub.stop()
        raise HubPeftError(f"The local hub did not answer within {timeout:.0f}s; see {log_path}.")
    finally:
        shutil.rmtree(secrets_dir, ignore_errors=True)


def _check_tokens(tokens: dict[str, str]) -> None:
    """Refuse, before anything starts, what the server would refuse or misread in its tokens file: a user
    name it does not accept, an empty token, a line break in one (a second line), two users with one token.
    NOTE(security): the errors name users, never a token."""
    from .storage import check_name

    owners: dict[str, str] = {}
    for user, token in tokens.items():
        try:
            check_name(user, "user name")
        except StorageError:  # not shown: with the mapping reversed (token → user) it would be a token
            raise InvalidInputError(
                "Cannot start the local hub: a user name in tokens is not valid (it is not shown: it may be a "
                "token); pass tokens={user: token} with names of letters, digits, '-', '_' or '.'."
            ) from None
        if not isinstance(token, str) or not token or token != token.strip() or "\n" in token or "\r" in token:
            raise InvalidInputError(
                f"Cannot start the local hub: the token of {user!r} is empty or has surrounding spaces or a line "
                "break; pass one token per user, such as secrets.token_urlsafe(24)."
            )
        if token in owners:
            raise InvalidInputError(
                f"Cannot start the local hub: users {owners[token]!r} and {user!r} have the same token; give each "
                "user a token of their own."
            )
        owners[token] = user


def runtime_dir() -> Path:
    """Where per-run secrets go: ``$XDG_RUNTIME_DIR`` when it is ours and private, else the temp directory
    (``mkdtemp`` makes each run's own mode-700 folder there either way)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        path = Path(xdg)
        try:
            info = path.stat()
            if path.is_dir() and info.st_uid == os.getuid() and not info.st_mode & 0o077:
                return path
        except OSError:
            pass
    return Path(tempfile.gettempdir())
