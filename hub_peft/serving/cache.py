"""The adapter cache of the multi-adapter engine: names, resolved copies, and an LRU bound in bytes.

A name (what requests route to) points at one resident copy of an adapter's weights. A Hub repo is
resolved to one commit at :meth:`AdapterCache.add` and its copy is keyed ``hub:{repo}@{commit}``, a
folder's by the sha256 of its files (never shown as a commit), so names that resolve to the same files
share one copy and a new revision is a new copy, never a stale one. Copies beyond ``memory_budget`` are
dropped least recently used first (pinned names and those in use stay) and reload from the local
download cache on next use. The weights are kept in the form the engine's per-row maths needs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import IncompatibleAdapterError, InvalidInputError, NotFoundError
from ..reft.config import ReftConfig
from ..reft.interventions import Intervention
from ..targets import expand_target_modules
from ..tasks import require_causal_adapter

MAX_MERGES = 16  # adapters merged per request kept loaded (and on disk); the oldest beyond it are removed
DOWNLOAD_SLACK = 64 * 2**20  # a repo's files beyond the weights: card, tokenizer (SmolLM2's tokenizer.json: 2 MB)


@dataclass
class LoraPayload:
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (Aᵀ [in, r], (g·scale·B)ᵀ [r, out])
    # DoRA: module name -> g − 1, where g = magnitude / ‖W + scale·B A‖ per output (g is folded into B above);
    # the layer adds (g − 1) ⊙ (W x) beside the LoRA product (see row_deltas.RowDeltas)
    dora: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Ia3Payload:
    scales: dict[str, tuple[torch.Tensor, bool]]  # module name -> (l − 1, scales the input (feed-forward))


@dataclass
class ReftPayload:
    config: ReftConfig
    sites: dict[tuple[int, str], list[tuple[str, Intervention]]]  # (layer, component) -> [(group, intervention)]


@dataclass
class SoloPayload:
    model: Any  # the PeftModel on a shadow of the base (see .solo), attached once
    nbytes: int  # its own tensors: the adapter's weights and whatever PEFT copied


Payload = LoraPayload | Ia3Payload | ReftPayload | SoloPayload


@dataclass
class CachedCopy:
    """One resident copy of an adapter's weights, shared by every name that resolves to the same files."""

    key: str  # hub:{repo}@{commit}[:{subfolder}] for a Hub repo, sha256:{digest of its files} for a folder
    kind: str  # lora | ia3 | reft | solo (runs in sub-batches of its own through PEFT)
    folder: Path
    nbytes: int = 0
    last_used: float = 0.0
    payload: Payload | None = None
    peft_config: Any = None  # a solo adapter's PeftConfig, its target_modules resolved to explicit names
    users: int = 0  # queued or running requests that reserved it (never evicted meanwhile, see reserve)


@dataclass
class Entry:
    """A name requests route to."""

    name: str
    source: str
    revision: str | None
    commit: str | None  # the resolved Hub commit; None for a local folder
    cached: CachedCopy
    template: str | None
    pinned: bool = False
    solo_reason: str | None = None
    peft_type: str = ""
    subfolder: str | None = None  # where the adapter is inside the repo or folder

    @property
    def kind(self) -> str:
        return self.cached.kind

    @property
    def folder(self) -> Path:
        return self.cached.folder

    @property
    def payload(self) -> Payload | None:
        return self.cached.payload


class AdapterCache:
    """Names → resolved copies of adapters, with an LRU bound of ``memory_budget`` bytes of weights.

    ``targets`` are the module names of the linear layers the engine wraps (LoRA/IA3 must name those);
    ``base_config``/``base_name`` describe the base an adapter must fit; ``module_names`` are the names PEFT
    sees on the base (a ``target_modules`` regex is resolved against them once, with a bounded matcher).
    ``max_adapter_bytes`` bounds one adapter's weights in memory (default: ``memory_budget``, at least 64 MiB),
    its download that plus :data:`DOWNLOAD_SLACK` for the card and tokenizer files. ``attach(folder, config)``
    builds a solo adapter's model (see :mod:`.solo`): once per load, on the thread that loads it.
    """

    def __init__(
        self,
        *,
        memory_budget: int,
        targets: set[str],
        base_config: Any,
        base_name: str,
        prepare: Callable[[dict], None] | None = None,
        module_names: Sequence[str] = (),
        max_adapter_bytes: int | None = None,
        attach: Callable[[Path, Any], Any] | None = None,
        base_weight: Callable[[str], torch.Tensor] | None = None,
    ) -> None:
        self.memory_budget, self.targets, self.attach = memory_budget, targets, attach
        self.base_weight = base_weight  # a target layer's W [out, in], float32: DoRA's norms are computed at load
        self.module_names = list(module_names)
        self.max_adapter_bytes = max(memory_budget, 64 * 2**20) if max_adapter_bytes is None else max_adapter_bytes
        self.prepare = prepare  # called with an adapter's config before it is added; raises to refuse it
        self.base_config, self.base_name = base_config, base_name
        self.entries: dict[str, Entry] = {}
        self.copies: dict[str, CachedCopy] = {}  # cache key -> the one copy all names of those files share
        self.stats = {"hits": 0, "misses": 0, "evictions": 0, "loads": 0}
        self._lock = threading.RLock()
        self.merges: dict[str, Path] = {}  # per-request merges by name, oldest first (see merge)

    def add(
        self,
        name: str,
        source: str | Path,
        revision: str | None = None,
        *,
        subfolder: str | None = None,
        pin: bool = False,
        hub_only: bool = False,
    ) -> dict:
        """Load an adapter (folder or repo id, the adapter in its ``subfolder`` if given) under ``name`` without
        touching the base or the others. ``hub_only``: ``source`` is a Hub repo id even where a folder of
        that name exists (a name from a request).

        A Hub repo is resolved to one commit first; the weights are cached under that commit and sub-folder
        (a folder: under the sha256 of its files), so names that resolve to the same files share one copy,
        and a new revision is a new entry, never a stale one.
        """
        from ..adapters import check_adapter_folder, peft_config_of, resolve_adapter
        from ..cards import CardInfo

        if not name or not isinstance(name, str):
            raise InvalidInputError("An adapter needs a non-empty name.")
        resolved = resolve_adapter(
            source,
            revision=revision,
            subfolder=subfolder,
            local=not hub_only,
            max_bytes=self.max_adapter_bytes + DOWNLOAD_SLACK,
        )
        folder = resolved.folder
        require_causal_adapter(folder, source, "the multi-adapter engine (hub-peft serve)")
        config = check_adapter_folder(folder, base_config=self.base_config, base_name=self.base_name)
        self._check_size(folder, source)
        # NOTE(security): PEFT full-matches a string target_modules against every module name with Python's
        # re, backtracking with the GIL held; it is resolved here, once, with a bounded matcher, into the
        # explicit names PEFT (and _kind_of) then compare by equality.
        if self.module_names:
            config = expand_target_modules(config, self.module_names)
        kind, solo_reason = _kind_of(config, source)
        if kind in ("lora", "ia3") and (outside := _modules_outside(folder, self.targets)):
            kind, solo_reason = (
                "solo",
                (
                    f"{source} cannot share a batch with other adapters (it adapts {outside}, "
                    "which is not a linear layer of the decoder blocks)"
                ),
            )
        if self.prepare is not None:
            self.prepare(config)
        template = config.get("prompt_template") if kind == "reft" else CardInfo.load(folder).prompt_template
        key = resolved.cache_key
        peft_config = peft_config_of(config) if kind == "solo" else None
        with self._lock:
            cached = self.copies.get(key) or CachedCopy(key, kind, folder, peft_config=peft_config)
        self._materialize(cached)  # before the name exists: a failed attach leaves nothing behind
        with self._lock:
            cached = self.copies.setdefault(key, cached)  # a copy another thread added meanwhile wins
            peft_type = str(config.get("peft_type", "")).lower()
            self.entries[name] = Entry(
                name,
                str(source),
                revision,
                resolved.commit,
                cached,
                template,
                pinned=pin,
                solo_reason=solo_reason,
                peft_type=peft_type,
                subfolder=resolved.subfolder,
            )
            self.forget_unused()
            self._evict(keep=set())
        return self.info(name)

    def merge_name(self, mix: dict[str, float], spec: Any) -> str:
        """The name of the merge of ``mix`` with ``spec``: a digest of its parents' resolved copies (a Hub commit, a
        folder's sha256), weights and settings, so the same merge is one adapter and a new revision a new one."""
        parents = [(self.get(name).cached.key, float(w)) for name, w in mix.items()]
        record = json.dumps({"parents": parents, "spec": spec.record()}, sort_keys=True)
        return "merge-" + hashlib.sha256(record.encode()).hexdigest()[:16]

    def merge(self, mix: dict[str, float], spec: Any, root: Path) -> tuple[str, list[str]]:
        """Merge ``mix``'s adapters with ``spec`` as ``hub-peft merge`` does (same function, same tensors), write
        it under ``root`` and load it: its name, and the older merges to remove beyond :data:`MAX_MERGES`."""
        from ..bridges.folders import write_adapter_folder
        from ..bridges.merge import merge_weights
        from ..cards import CardInfo

        name = self.merge_name(mix, spec)
        if name in self.entries:
            return name, []
        folders = [self.get(parent).folder for parent in mix]
        config, tensors = merge_weights(folders, list(mix.values()), spec, base_config=self.base_config)
        lineage = {"operation": "merge", **spec.record(), "parents": [{"name": n, "weight": w} for n, w in mix.items()]}
        folder = write_adapter_folder(
            root / name, config, tensors, CardInfo(lineage=lineage), overwrite=True, card=False
        )
        self.add(name, folder)
        with self._lock:
            self.merges[name] = folder
            dropped = list(self.merges)[:-MAX_MERGES] if len(self.merges) > MAX_MERGES else []
            for old in dropped:
                shutil.rmtree(self.merges.pop(old), ignore_errors=True)
        return name, dropped

    def _check_size(self, folder: Path, source: Any) -> None:
        """Refuse an adapter whose weights (as float32, the form the engine keeps) exceed ``max_adapter_bytes``,
        from the safetensors header, before any tensor is read."""
        from ..validate import read_safetensors_header

        header = read_safetensors_header(folder / "adapter_model.safetensors")
        nbytes = 4 * sum(math.prod(shape) for _, shape in header.values())
        if nbytes > self.max_adapter_bytes:
            raise InvalidInputError(
                f"{source} needs {nbytes / 2**20:.1f} MiB of weights in memory, over this server's limit of "
                f"{self.max_adapter_bytes / 2**20:.1f} MiB for one adapter; use a smaller rank or fewer target "
                "modules, or ask the operator to raise --memory-budget-mb."
            )

    def remove(self, name: str) -> None:
        with self._lock:
            self.get(name)
            del self.entries[name]
            self.forget_unused()

    def pin(self, name: str, pinned: bool = True) -> None:
        with self._lock:
            self.get(name).pinned = pinned

    def info(self, name: str) -> dict:
        e = self.get(name)
        return {
            "name": e.name,
            "type": e.peft_type,
            "source": e.source,
            "revision": e.revision,
            "commit": e.commit,
            "subfolder": e.subfolder,
            "key": e.cached.key,
            "bytes": e.cached.nbytes,
            "resident": e.payload is not None,
            "pinned": e.pinned,
            "mixable": e.solo_reason is None,
        }

    def loaded(self) -> list[dict]:
        return [self.info(n) for n in self.entries]

    def resident_bytes(self) -> int:
        return sum(c.nbytes for c in self.copies.values() if c.payload is not None)

    def get(self, name: str) -> Entry:
        if name not in self.entries:
            raise NotFoundError(f"No adapter named {name!r}; loaded: {sorted(self.entries) or 'none'}.")
        return self.entries[name]

    def forget_unused(self) -> None:
        used = {id(e.cached) for e in self.entries.values()}
        for key in [k for k, c in self.copies.items() if id(c) not in used]:
            del self.copies[key]

    def hold(self, spec: tuple[tuple[str, float], ...]) -> tuple[tuple[Any, float], ...]:
        """The resident weights of ``spec``'s adapters (loaded if evicted), for a sequence to keep while it runs;
        then the cache is trimmed to its budget around them."""
        parts = tuple((self._materialize(self.get(name).cached), weight) for name, weight in spec)
        self.evict(keep={name for name, _ in spec})
        return parts

    def reserve(self, spec: tuple[tuple[str, float], ...]) -> tuple[CachedCopy, ...]:
        """Load ``spec``'s adapters if evicted and keep them resident until :meth:`unreserve` is given what this
        returns (for a request that waits in a queue: the step that runs it then finds its adapters built,
        and never loads or attaches one)."""
        with self._lock:
            copies = tuple(self.get(name).cached for name, _ in spec)
            for cached in copies:
                cached.users += 1
        try:
            self.hold(spec)
        except BaseException:
            self.unreserve(copies)
            raise
        return copies

    def unreserve(self, copies: tuple[CachedCopy, ...]) -> None:
        with self._lock:
            for cached in copies:
                cached.users -= 1
            self._evict(keep=set())

    def materialize(self, entry: Entry) -> Payload:
        return self._materialize(entry.cached)

    def _materialize(self, cached: CachedCopy) -> Payload:
        """``cached``'s payload, loaded first if it is not resident. The load runs outside the cache's lock
        (an attach may take seconds): nothing else waits for it, a thread that needs the same copy meanwhile
        loads its own and one of the two stays."""
        with self._lock:
            cached.last_used = time.monotonic()
            if cached.payload is not None:
                self.stats["hits"] += 1
                return cached.payload
            self.stats["misses"] += 1
            self.stats["loads"] += 1
        if cached.kind == "solo":
            if self.attach is None:
                raise IncompatibleAdapterError(f"{cached.key}: this cache has no base to attach a solo adapter to.")
            payload: Payload = SoloPayload(*self.attach(cached.folder, cached.peft_config))
        elif cached.kind == "reft":
            payload = _load_reft(cached.folder)
        else:
            payload = (
                _load_lora(cached.folder, self.targets, self.base_weight)
                if cached.kind == "lora"
                else _load_ia3(cached.folder, self.targets)
            )
        with self._lock:
            if cached.payload is None:
                cached.payload, cached.nbytes = payload, _payload_bytes(payload)
            return cached.payload

    def evict(self, keep: Set[str] = frozenset()) -> None:
        """Drop least recently used copies until the resident ones fit the budget (pinned and ``keep`` names stay);
        a running sequence keeps its own reference, so it is never affected."""
        with self._lock:
            self._evict(keep)

    def _evict(self, keep: Set[str]) -> None:
        held = {id(e.cached) for e in self.entries.values() if e.pinned or e.name in keep}
        while self.resident_bytes() > self.memory_budget:
            victims = [c for c in self.copies.values() if c.payload is not None and id(c) not in held and not c.users]
            if not victims:
                return
            victim = min(victims, key=lambda c: c.last_used)
            victim.payload = None
            self.stats["evictions"] += 1


_NOT_SERVABLE = {  # broken upstream: plain PEFT cannot run it for inference either
    "XLORA": "X-LoRA is broken in peft 0.21.2 (its forward raises KeyError on its expert names inside "
    "disable_adapter_layers), so plain PEFT cannot run it either",
}


def _kind_of(config: dict, source: Any) -> tuple[str, str | None]:
    """The engine's kind of an adapter and, for those that cannot share a batch, why."""
    peft_type = config.get("peft_type")
    if peft_type == "REFT":
        return "reft", None
    if peft_type in _NOT_SERVABLE:
        raise IncompatibleAdapterError(
            f"{source} ({peft_type}) cannot be served: {_NOT_SERVABLE[peft_type]}. Upgrade peft once it is fixed "
            "upstream, or serve the LoRA experts it mixes as separate adapters (or as a weighted mix)."
        )
    blockers = []
    if peft_type == "IA3":
        if config.get("modules_to_save"):
            blockers.append("it trains whole modules")
    elif peft_type != "LORA":
        blockers.append(f"its type is {peft_type}")
    else:
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            blockers.append("it has per-module rank/alpha patterns")
        if config.get("target_parameters"):
            blockers.append("it adapts parameters of fused layers (target_parameters, e.g. MoE experts)")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            blockers.append("it trains biases or whole modules")
        if _adapts_outside_blocks(config.get("target_modules")) or config.get("trainable_token_indices"):
            blockers.append("it adapts the embeddings or the output head, outside the decoder blocks")
    if blockers:
        return "solo", f"{source} cannot share a batch with other adapters ({'; '.join(blockers)})"
    return str(peft_type).lower(), None


def _modules_outside(folder: Path, targets: set[str]) -> str | None:
    """The first module a LoRA/IA3 adapter's weights adapt that is not one of ``targets`` (the linear layers
    the engine wraps), from the safetensors header; None when all are."""
    from ..validate import read_safetensors_header

    for key in sorted(read_safetensors_header(folder / "adapter_model.safetensors")):
        stem = key.rpartition(".lora_")[0] if ".lora_" in key else key.removesuffix(".ia3_l")
        module = stem.removeprefix("base_model.model.")
        if module not in targets:
            return module
    return None


def _adapts_outside_blocks(targets: Any) -> bool:
    """Whether LoRA ``target_modules`` (a list or PEFT's full-match regex) name the embeddings or the head."""
    outside = ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings")
    if isinstance(targets, str):
        return any(re.fullmatch(targets, name) or re.fullmatch(targets, f"model.{name}") for name in outside)
    return any(str(t).rsplit(".", 1)[-1] in outside for t in targets or [])


def _load_lora(
    folder: Path, targets: set[str], base_weight: Callable[[str], torch.Tensor] | None = None
) -> LoraPayload:
    """A LoRA's per-layer ``(Aᵀ, (scale·B)ᵀ)``; for DoRA also ``g − 1`` per layer, ``g`` from the base's weight
    (``base_weight(module)``: ``W`` [out, in] in float32, dequantized) as PEFT computes it."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    scale = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.rpartition(".lora_")
        part = part.removesuffix(".weight")
        if part not in ("A", "B", "magnitude_vector"):
            raise IncompatibleAdapterError(f"{folder}: unexpected tensor {key} in a LoRA adapter.")
        module = stem.removeprefix("base_model.model.")
        pairs.setdefault(module, {})[part] = tensor.float()
    dora = bool(config.get("use_dora"))
    weights, scales = {}, {}
    for module, ab in pairs.items():
        if module not in targets or set(ab) != ({"A", "B", "magnitude_vector"} if dora else {"A", "B"}):
            raise IncompatibleAdapterError(
                f"{folder}: {module} is not a linear layer of this base model's decoder blocks (per-row batches "
                "apply LoRA there only)" + (", or lacks its DoRA magnitude vector." if dora else ".")
            )
        A, B = ab["A"], ab["B"] * scale
        if dora:
            if base_weight is None:
                raise IncompatibleAdapterError(f"{folder}: a DoRA adapter needs the base's weights to load.")
            W = base_weight(module)
            if W.shape != (B.shape[0], A.shape[1]) or ab["magnitude_vector"].shape != (B.shape[0],):
                raise IncompatibleAdapterError(f"{folder}: the DoRA tensors of {module} do not match its shape.")
            g = ab["magnitude_vector"] / torch.linalg.norm(W + B @ A, dim=1)
            scales[module], B = g - 1, B * g[:, None]
        weights[module] = (A.T.contiguous(), B.T.contiguous())
    return LoraPayload(weights, scales)


def _load_ia3(folder: Path, targets: set[str]) -> Ia3Payload:
    from safetensors.torch import load_file

    scales = {}
    for key, tensor in load_file(str(folder / "adapter_model.safetensors")).items():
        module = key.removeprefix("base_model.model.").removesuffix(".ia3_l")
        if not key.endswith(".ia3_l") or module not in targets:
            raise IncompatibleAdapterError(f"{folder}: {key} does not name an IA3 vector of this base model's layers.")
        feed_forward = tensor.shape[0] == 1 and tensor.shape[1] != 1  # PEFT stores [1, in] vs [out, 1]
        scales[module] = (tensor.float().reshape(-1) - 1, feed_forward)
    return Ia3Payload(scales)


def _load_reft(folder: Path) -> ReftPayload:
    from safetensors.torch import load_file

    config = ReftConfig.from_dict(json.loads((folder / "adapter_config.json").read_text()))
    if config.hidden_size is None:
        raise IncompatibleAdapterError(f"{folder}: the ReFT config does not say its hidden_size; save it again.")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    sites: dict[tuple[int, str], list[tuple[str, Intervention]]] = {}
    for layer, component, group in config.sites():
        key = ReftConfig.key_name(layer, component, group)
        module = Intervention(
            config.intervention,
            config.hidden_size,
            config.rank,
            activation=config.activation,
            proj_bias=config.proj_bias,
            dtype=getattr(torch, config.dtype),
        )
        module.load({n.rsplit(".", 1)[1]: t for n, t in tensors.items() if n.startswith(f"reft.{key}.")}, name=key)
        sites.setdefault((layer, component), []).append((group, module.freeze()))
    return ReftPayload(config, sites)


def _payload_bytes(payload: Payload) -> int:
    if isinstance(payload, SoloPayload):
        return payload.nbytes
    if isinstance(payload, LoraPayload):
        return sum(a.nbytes + b.nbytes for a, b in payload.weights.values()) + sum(
            g.nbytes for g in payload.dora.values()
        )
    if isinstance(payload, Ia3Payload):
        return sum(s.nbytes for s, _ in payload.scales.values())
    return sum(p.nbytes for site in payload.sites.values() for _, m in site for p in m.parameters())
