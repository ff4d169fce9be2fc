"""Serving many adapters off one base model: the multi-adapter engine (continuous batching on its own KV
cache), its scheduler, and an OpenAI-compatible server.

- :mod:`.engine`: the model step and the per-row adapter maths; :mod:`.kv_cache`: slots and ragged attention;
- :mod:`.sampling`: sampling parameters and the batch-invariant sampler; :mod:`.scheduler`: admission, steps,
  stop strings, cancellation; :mod:`.protocol`: the API's request models; :mod:`.api_server`: the routes;
  :mod:`.metrics`: Prometheus metrics.
"""

from .engine import AdapterSpec, Completion, MultiAdapterModel, Prompt
from .sampling import SamplingParams

__all__ = ["AdapterSpec", "Completion", "MultiAdapterModel", "Prompt", "SamplingParams", "create_app"]


def create_app(*args, **kwargs):
    """The OpenAI-compatible FastAPI app over a :class:`MultiAdapterModel` (see :mod:`.api_server`)."""
    from .api_server import create_app as _create_app

    return _create_app(*args, **kwargs)
