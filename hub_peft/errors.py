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


__all__ = [
    "HubAuthError",
    "HubPeftError",
    "IncompatibleAdapterError",
    "InvalidInputError",
    "NotFoundError",
    "UnsafeFileError",
]
