"""The local Hub's tokens: ``USER=TOKEN`` specs from the command line, the environment or a tokens file."""

from __future__ import annotations

import os

from ..errors import BadRequest, InvalidInputError
from .storage import check_name


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
