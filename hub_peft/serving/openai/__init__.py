"""The OpenAI-compatible server over the engine (vLLM's ``entrypoints/openai`` layout): :mod:`.protocol` (the
request models), :mod:`.server` (the state, the work and thin routes), :mod:`.responses` (answers and the one
error mapping), :mod:`.metrics` (Prometheus)."""

from typing import TYPE_CHECKING

from ..._lazy import lazy_attributes

_LAZY = {"ServerSettings": "settings", "create_app": "server"}
__all__ = ["ServerSettings", "create_app"]
__getattr__ = lazy_attributes(__name__, _LAZY)

if TYPE_CHECKING:
    from .server import create_app
    from .settings import ServerSettings
