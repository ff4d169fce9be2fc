"""What an operator sets on the OpenAI-compatible server: its names, limits and admin surfaces (the standard
library only, so ``hub-peft serve``'s parser takes its defaults from here without loading torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# NOTE(security): a per-request merge runs on a load thread beside the step loop; these cost about what loading the
# adapters costs (1.8 s for TIES over SmolLM2's 210 layers, benchmarks/README.md#bridges), the SVD methods an SVD of
# every adapted layer's full update, so they are the operator's to allow.
MERGE_METHODS = ("cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass(frozen=True)
class ServerSettings:
    """The server's options; every limit is on by default and every admin surface off. The class attributes
    are the defaults (``ServerSettings.max_waiting``).

    - ``base_name``: the ``model`` name of the bare base (``/v1/models`` lists it).
    - ``allow_hub_pattern``: an fnmatch pattern (``"me/*"``) of Hub repos a request's ``model`` may name, loaded
      on demand and through the admin routes; None: requests name only the adapters loaded at start.
    - ``adapter_dirs``: folders whose adapters the admin route may load (none: never a local path).
    - ``admin_token``: opens the admin routes (load/unload); None keeps them closed.
    - ``max_running``: sequences decoding at once (the engine's cache slots; None keeps the engine's);
      ``max_waiting``: the queue behind them, beyond which a request gets 429.
    - ``merge_methods``: the methods a request's ``merge`` may use; by default the task-arithmetic ones, not the
      SVD ones, whose cost grows with the layers' size (seconds on a 135M base, minutes on 8B): an operator adds
      them (``--merge-methods``); an empty tuple turns per-request merges off.
    - ``max_prompt_tokens`` (413 beyond), ``default_max_tokens`` (a request that gives none),
      ``max_body_bytes`` (413 beyond), ``request_timeout`` and ``adapter_load_timeout`` in seconds (504 beyond).
    """

    base_name: str
    allow_hub_pattern: str | None = None
    adapter_dirs: Sequence[str | Path] = ()
    admin_token: str | None = None
    max_running: int | None = None
    max_waiting: int = 256
    max_prompt_tokens: int = 1024
    default_max_tokens: int = 256
    max_body_bytes: int = 4 * 2**20
    request_timeout: float = 600.0
    adapter_load_timeout: float = 120.0
    merge_methods: Sequence[str] = MERGE_METHODS
