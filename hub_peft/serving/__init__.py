"""Serving many adapters off one base model: the multi-adapter engine and an OpenAI-compatible server."""

from .engine import AdapterSpec, Completion, MultiAdapterModel, Prompt

__all__ = ["AdapterSpec", "Completion", "MultiAdapterModel", "Prompt", "create_app"]


def create_app(*args, **kwargs):
    """The OpenAI-compatible Starlette app over a :class:`MultiAdapterModel` (see :mod:`.server`)."""
    from .server import create_app as _create_app

    return _create_app(*args, **kwargs)
