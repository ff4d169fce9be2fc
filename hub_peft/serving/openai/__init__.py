"""The OpenAI-compatible server over the engine (vLLM's ``entrypoints/openai`` layout): :mod:`.protocol` (the
request models), :mod:`.server` (the state, the work and thin routes), :mod:`.responses` (answers and the one
error mapping), :mod:`.metrics` (Prometheus)."""

from .server import create_app

__all__ = ["create_app"]
