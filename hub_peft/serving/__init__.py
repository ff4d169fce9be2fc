"""Serving many adapters off one base model: the multi-adapter engine (continuous batching on its own KV
cache), its scheduler, and an OpenAI-compatible server.

- :mod:`.request`: the value types (requests, specs, generations, completions);
- :mod:`.engine`: the model step (:mod:`.row_deltas`: the per-row adapter maths; :mod:`.static` and :mod:`.solo`:
  adapters that cannot share a forward); :mod:`.kv_cache`: slots and ragged attention; :mod:`.cache`: adapters;
- :mod:`.sampling`: sampling parameters and the batch-invariant sampler; :mod:`.structured`: answers held to a
  JSON schema, regex or grammar; :mod:`.tools`: tools in the chat template, calls out of the answer;
  :mod:`.scheduler`: admission, steps,
  stop strings, cancellation; :mod:`.offline`: ``MultiAdapterModel``, the engine with offline helpers over the
  scheduler; :mod:`.openai`: the OpenAI-compatible server.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes

# NOTE: torch loads with the first name that needs it, so ``hub-peft serve``'s parser (which reads
# ServerSettings' defaults) stays fast.
_LAZY = {
    "MultiAdapterModel": "offline",
    **dict.fromkeys(["AdapterSpec", "Completion", "Prompt"], "request"),
    "SamplingParams": "sampling",
    "Constraint": "structured",
    **dict.fromkeys(["ServerSettings", "create_app"], "openai"),
}
__all__ = [
    "AdapterSpec",
    "Completion",
    "Constraint",
    "MultiAdapterModel",
    "Prompt",
    "SamplingParams",
    "ServerSettings",
    "create_app",
]
__getattr__ = lazy_attributes(__name__, _LAZY)

if TYPE_CHECKING:
    from .offline import MultiAdapterModel
    from .openai import ServerSettings, create_app
    from .request import AdapterSpec, Completion, Prompt
    from .sampling import SamplingParams
    from .structured import Constraint
