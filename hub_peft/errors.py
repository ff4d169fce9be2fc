"""Every error hub_peft raises on purpose, in one module.

Each message says what is wrong *and* what to do about it. Catch :class:`HubPeftError` to handle all of them at
once. The classes are grouped as in ``huggingface_hub.errors``: the base class, the errors a user of the library
or the CLI sees (bad input, something not found, unsafe or incompatible adapters, Hub authentication), then the
local Hub server's own errors, which the server turns into the HTTP answers the real Hub gives, and the serving
layer's (the engine, its queue, and the OpenAI server's HTTP errors).
"""

from __future__ import annotations

# BASE ERROR


class HubPeftError(Exception):
    """Base class of every error raised by hub_peft: catch it to handle them all."""


# INPUT ERRORS


class InvalidInputError(HubPeftError, ValueError):
    """An argument, file or payload is malformed (bad repo id, unsafe path, corrupt file...).

    The message names the value and the form it should take: fix the value and call again. It is a
    ``ValueError``, so code written against the standard library's errors still catches it.
    """


class NotFoundError(HubPeftError, LookupError):
    """A repo, revision, file, adapter or base model does not exist (or is not visible to you).

    Check the name (and the revision or sub-folder); for a private repo, pass a token that can read it.
    """


# ADAPTER ERRORS


class UnsafeFileError(HubPeftError):
    """A file would need unpickling (``.bin``/``.pt``) or otherwise executing untrusted code.

    hub_peft never does it: if the files are your own and trusted, convert them to safetensors
    (``hub-peft convert-bin DIR``) and use the converted folder.
    """


class IncompatibleAdapterError(HubPeftError):
    """An adapter does not fit the base model or the requested operation.

    Load it on the base model it was made for (the message names it), or retrain it for this one.
    """


# HUB ERRORS


class HubAuthError(HubPeftError, PermissionError):
    """A Hub operation needs a (different) token: missing, invalid, or not allowed to write there.

    Pass a write token (``token=...`` or ``HF_TOKEN``) of a user who owns the repo's namespace.
    """


# LOCAL HUB SERVER ERRORS
#
# NOTE(local-hub): raised inside the server (hub_peft/hub/) and answered as the real Hub answers them: the status
# code, the message in the JSON body and in X-Error-Message, and X-Error-Code where the Hub sets one (the
# huggingface_hub client picks its exception class from the code). A client sees them as huggingface_hub errors.


class LocalHubError(HubPeftError):
    """Base of the local Hub server's errors: each has the HTTP ``status`` it is answered with and, where the real
    Hub sends one, the ``code`` of its ``X-Error-Code`` header."""

    status = 500
    code: str | None = None


class HTTPError(LocalHubError):
    """A request the server refuses as such (no or wrong token, no rights, body too large, unknown route), with
    its status given where it is raised. The message says what the client should send instead."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class StorageError(LocalHubError):
    """Base of the local Hub storage's errors; the server maps each to the HTTP error the real Hub gives."""

    status = 400


class BadRequest(StorageError):
    """A repo name, path, revision or commit payload the Hub would refuse (HTTP 400): the message says which form
    it must take; fix it and send the request again."""

    status = 400


class RepoNotFound(StorageError):
    """The repo does not exist, or is private and not yours (HTTP 404, ``RepoNotFound``): check its id and type,
    or authenticate as its owner."""

    status = 404
    code = "RepoNotFound"


class RevisionNotFound(StorageError):
    """The branch or commit is not in this repo (HTTP 404, ``RevisionNotFound``): use an existing branch name
    such as ``main`` or one of the repo's commit ids."""

    status = 404
    code = "RevisionNotFound"


class EntryNotFound(StorageError):
    """The file or folder is not in the revision (HTTP 404, ``EntryNotFound``): list the repo's files to find the
    right path."""

    status = 404
    code = "EntryNotFound"


class Conflict(StorageError):
    """The repo already exists (HTTP 409): pick another name, or pass ``exist_ok=True`` to reuse it."""

    status = 409


class PreconditionFailed(StorageError):
    """The branch moved since the commit's ``parentCommit`` (HTTP 412): fetch the new head and commit again."""

    status = 412


class CardError(InvalidInputError):
    """A model card's YAML front matter cannot be accepted (too large, aliases, values that are not JSON): the
    message says why and what to write instead. A commit carrying such a README.md is refused with a 400."""


# SERVING ERRORS
#
# NOTE(serving): the OpenAI server answers these with one mapping (serving/openai/responses.py: STATUS).


class QueueFullError(HubPeftError):
    """The server has as many waiting requests as it accepts; retry later (the API answers 429)."""


class PromptTooLongError(InvalidInputError):
    """A prompt has more tokens than the server accepts; shorten it (the API answers 413)."""


class ConstraintError(InvalidInputError):
    """A structured-output schema, regex or grammar (or a forced tool call's) is malformed or over a limit; the
    message says which part (the API answers 400 naming the field that gave it)."""


class GenerationError(HubPeftError, RuntimeError):
    """A request failed inside the engine, a server-side failure of that request alone: send it again."""


class ConcurrentUseError(HubPeftError, RuntimeError):
    """An object that runs one call at a time was called again before its call ended: use one per thread."""


class ApiError(HubPeftError):
    """An HTTP error of the OpenAI server, in OpenAI's shape: ``status``, ``message`` (what to do), the
    request field at fault (``param``), a machine-readable ``code``, extra ``headers`` (``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


__all__ = [
    "ApiError",
    "BadRequest",
    "CardError",
    "ConcurrentUseError",
    "Conflict",
    "EntryNotFound",
    "GenerationError",
    "HTTPError",
    "HubAuthError",
    "HubPeftError",
    "IncompatibleAdapterError",
    "InvalidInputError",
    "LocalHubError",
    "NotFoundError",
    "PreconditionFailed",
    "PromptTooLongError",
    "QueueFullError",
    "RepoNotFound",
    "RevisionNotFound",
    "StorageError",
    "UnsafeFileError",
]
