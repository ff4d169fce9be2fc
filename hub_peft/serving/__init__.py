"""Serving many adapters off one base model: the multi-adapter engine (continuous batching on its own KV
cache), its scheduler, and an OpenAI-compatible server.

- :mod:`.request`: the value types (requests, specs, generations, completions);
- :mod:`.engine`: the model step (:mod:`.row_deltas`: the per-row adapter maths; :mod:`.static` and :mod:`.solo`:
  adapters that cannot share a forward); :mod:`.kv_cache`: slots and ragged attention; :mod:`.cache`: adapters;
- :mod:`.sampling`: sampling parameters and the batch-invariant sampler; :mod:`.scheduler`: admission, steps,
  stop strings, cancellation; :mod:`.offline`: ``MultiAdapterModel``, the engine with offline helpers over the
  scheduler; :mod:`.openai`: the OpenAI-compatible server.
"""

from .offline import MultiAdapterModel
from .request import AdapterSpec, Completion, Prompt
from .sampling import SamplingParams

__all__ = ["AdapterSpec", "Completion", "MultiAdapterModel", "Prompt", "SamplingParams", "create_app"]


def create_app(*args, **kwargs):
    """The OpenAI-compatible FastAPI app over a :class:`MultiAdapterModel` (see :mod:`.openai.server`)."""
    from .openai import create_app as _create_app

    return _create_app(*args, **kwargs)
