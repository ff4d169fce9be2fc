"""Every error hub_peft raises on purpose.

Each message says what is wrong *and* what to do about it. Catch :class:`HubPeftError` to handle
all of them at once.
"""

from __future__ import annotations


class HubPeftError(Exception):
    """Base class of every error raised by hub_peft."""


class InvalidInputError(HubPeftError, ValueError):
    """An argument, file or payload is malformed (bad repo id, unsafe path, corrupt file...)."""


class NotFoundError(HubPeftError, LookupError):
    """A repo, revision, file, adapter or base model does not exist (or is not visible to you)."""


class UnsafeFileError(HubPeftError):
    """A file would need unpickling (``.bin``/``.pt``) or otherwise executing untrusted code."""


class IncompatibleAdapterError(HubPeftError):
    """An adapter does not fit the base model or the requested operation."""


class HubAuthError(HubPeftError, PermissionError):
    """A Hub operation needs a (different) token: missing, invalid, or not allowed to write there."""


# --- serving ------------------------------------------------------------------------------------------


class QueueFullError(HubPeftError):
    """The server has as many waiting requests as it accepts; retry later (the API answers 429)."""


class PromptTooLongError(InvalidInputError):
    """A prompt has more tokens than the server accepts; shorten it (the API answers 413)."""


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
    "ConcurrentUseError",
    "GenerationError",
    "HubAuthError",
    "HubPeftError",
    "IncompatibleAdapterError",
    "InvalidInputError",
    "NotFoundError",
    "PromptTooLongError",
    "QueueFullError",
    "UnsafeFileError",
]
