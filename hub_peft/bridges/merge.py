"""Merge adapters into one new adapter: LoRA through PEFT's own ``add_weighted_adapter``, IA3 by task arithmetic.

:func:`merge_weights` is the whole computation (used by ``hub-peft merge`` and by the server's per-request merges,
so both give the same tensors); :func:`merge_adapters` resolves the parents, writes the merged folder atomically
and records its lineage for the card.

NOTE(design): PEFT's ``add_weighted_adapter`` needs a ``PeftModel``, but no LoRA merge reads a base weight: the
parents are loaded onto a *skeleton* of the base (built from its config on the meta device, every parameter a
zero-stride view of one zero, so a 70B skeleton takes bytes). Only base tensors a parent stores itself (PEFT's saved
embedding layers) are materialized, and they come back from the parents' files. The tensors equal those of
``add_weighted_adapter`` on the real base (``tests/test_bridges.py``).

NOTE(design): PEFT's merged LoRA config keeps the first parent's ``use_rslora``, although the merged weights already
carry every parent's scaling and ``r = lora_alpha``: PEFT would then scale them by √r. The merged config here sets
``use_rslora=False``, so the merged adapter computes Σ wᵢ·ΔWᵢ (``cat``) as intended.

NOTE(design): for IA3, PEFT's ``add_weighted_adapter`` sums ``wᵢ·lᵢ`` over the parents that target a module, so a
module only one parent targets ends scaled by ``w·l`` (0.6× its output for ``w = 0.6``). Here IA3 merges combine the
task vectors ``lᵢ − 1`` (a missing module is ``0``) and add 1 back: equal to PEFT's where every parent targets the
same modules and the weights sum to 1, right elsewhere; the TIES/DARE/magnitude methods apply to those task
vectors with PEFT's own ``merge_utils``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence, Set
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleAdapterError, InvalidInputError

LORA_METHODS = (
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
IA3_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = tuple(m for m in LORA_METHODS if m.startswith(("ties", "dare", "magnitude")))
MAX_MERGE_PARENTS = 8
MAX_MERGE_WEIGHT = 100.0
MAX_SVD_RANK = 1024
if TYPE_CHECKING:
    import torch

_EXACT = "cat (exact: rank = the sum of the parents' ranks)"


@dataclass(frozen=True)
class MergeSpec:
    """How to merge: PEFT's ``combination_type`` (``method``), its ``density`` (TIES/DARE/magnitude pruning: the
    share of each task vector kept), ``svd_rank`` (the ``_svd`` methods; default the parents' largest rank),
    ``majority_sign_method`` (TIES) and the ``seed`` of DARE's random drops (so a merge is reproducible)."""

    method: str = "cat"
    density: float | None = None
    svd_rank: int | None = None
    majority_sign_method: str = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in LORA_METHODS:
            raise InvalidInputError(f"Unknown merge method {self.method!r}; use one of {', '.join(LORA_METHODS)}.")
        if self.method in DENSITY_METHODS:
            if self.density is None or not (0 < self.density <= 1):
                raise InvalidInputError(
                    f"The {self.method} merge needs a density in (0, 1] (the share of each task vector kept), "
                    f"got {self.density!r}; 0.5 is a common choice."
                )
        elif self.density is not None:
            raise InvalidInputError(f"density applies to {', '.join(DENSITY_METHODS)}, not to {self.method}.")
        if self.svd_rank is not None:
            if not self.method.endswith("svd"):
                raise InvalidInputError(f"svd_rank applies to the _svd methods (and svd), not to {self.method}.")
            if not (1 <= self.svd_rank <= MAX_SVD_RANK):
                raise InvalidInputError(f"svd_rank must be in [1, {MAX_SVD_RANK}], got {self.svd_rank}.")
        if self.majority_sign_method not in ("total", "frequency"):
            raise InvalidInputError("majority_sign_method must be 'total' or 'frequency'.")

    def record(self) -> dict[str, Any]:
        """What the card and a merge's cache key record: the fields that change the result."""
        out = asdict(self)
        if self.method not in DENSITY_METHODS:
            out.pop("density")
        if "dare" not in self.method:
            out.pop("seed")
        if "ties" not in self.method:
            out.pop("majority_sign_method")
        if not self.method.endswith("svd"):
            out.pop("svd_rank")
        return out


def merge_weights(
    folders: Sequence[Path], weights: Sequence[float], spec: MergeSpec, *, base_config: Any = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The merged adapter's ``adapter_config.json`` (a dict) and tensors, from the parents' folders (already
    checked adapters of one base) and their weights. ``base_config``: the base's transformers config (read from
    the parents' ``base_model_name_or_path`` when not given; LoRA merges need it for the skeleton)."""
    configs = [json.loads((Path(f) / "adapter_config.json").read_text()) for f in folders]
    _check_parents(configs, weights)
    peft_type = configs[0].get("peft_type")
    if peft_type == "IA3":
        return _merge_ia3(folders, configs, weights, spec)
    if peft_type == "REFT":
        return _merge_reft(folders, configs, weights, spec)
    if base_config is None:
        from ..base_model import load_base_config

        base_config = load_base_config(configs[0]["base_model_name_or_path"])
    return _merge_lora(folders, configs, weights, spec, base_config)


def _check_parents(configs: list[dict], weights: Sequence[float]) -> None:
    if not 1 <= len(configs) <= MAX_MERGE_PARENTS:
        raise InvalidInputError(f"A merge takes 1 to {MAX_MERGE_PARENTS} adapters, got {len(configs)}.")
    if len(weights) != len(configs):
        raise InvalidInputError(f"{len(configs)} adapters but {len(weights)} weights: give one weight per adapter.")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and abs(w) <= MAX_MERGE_WEIGHT for w in weights):
        raise InvalidInputError(f"Merge weights must be finite numbers in [-{MAX_MERGE_WEIGHT}, {MAX_MERGE_WEIGHT}].")
    types = {str(c.get("peft_type")) for c in configs}
    if len(types) > 1:
        raise IncompatibleAdapterError(
            f"Cannot merge adapters of different types ({', '.join(sorted(types))}): a merge makes one adapter of "
            'one type. Serve them together as a weighted mix instead ({"model": {"a": 0.5, "b": 0.5}}), or '
            "convert the others to LoRA first (`hub-peft convert ADAPTER --to lora`)."
        )
    peft_type = types.pop()
    if peft_type not in ("LORA", "IA3", "REFT"):
        raise IncompatibleAdapterError(
            f"Cannot merge {peft_type} adapters: PEFT merges LoRA and IA3 adapters only (hub_peft also ReFT). "
            "Serve them as a weighted mix per request instead, or convert them to LoRA first "
            "(`hub-peft convert ADAPTER --to lora`)."
        )
    bases = {c.get("base_model_name_or_path") for c in configs}
    if len(bases) > 1:
        raise IncompatibleAdapterError(
            f"The adapters were made for different base models ({', '.join(sorted(map(str, bases)))}); merge only "
            "adapters of one base."
        )
    for i, c in enumerate(configs):
        if problem := _unmergeable(c):
            raise IncompatibleAdapterError(f"Adapter {i + 1} cannot be merged: {problem}.")


def _unmergeable(config: dict) -> str | None:
    """Why one parent has no weighted form, or None."""
    from ..validate.vllm import base_changing_init

    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        return "it trains whole modules or token rows (modules_to_save / trainable_token_indices), which do not add"
    if config.get("peft_type") != "LORA":
        return None
    if config.get("use_dora"):
        return (
            "DoRA rescales each output row of W + BA by a magnitude it learned, so two DoRA updates do not add; "
            "convert it to LoRA first (`hub-peft convert ADAPTER --to lora`, which prints the error)"
        )
    if config.get("target_parameters"):
        return "it adapts parameters of fused layers (target_parameters), which PEFT's add_weighted_adapter refuses"
    for key in ("lora_bias", "use_qalora", "alora_invocation_tokens", "use_bdlora", "layer_replication"):
        if config.get(key):
            return f"{key} changes what the adapter computes beyond B·A, which a merge cannot carry"
    if init := base_changing_init(config):
        return f"init_lora_weights={init!r} changes the base weights when it loads, so its B·A is not its update"
    return None


# --- LoRA: PEFT's add_weighted_adapter on a skeleton of the base ------------------------------------------------


def _merge_lora(
    folders: Sequence[Path], configs: list[dict], weights: Sequence[float], spec: MergeSpec, base_config: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    import torch
    from peft import get_peft_model_state_dict

    from ..adapters import load_adapter
    from ..tasks import task_of

    stored = {  # base tensors PEFT saved with a parent (embedding layers): real, loaded from the files
        k.removeprefix("base_model.model.").replace(".base_layer", "")
        for folder in folders
        for k in _tensor_names(Path(folder))
        if ".base_layer." in k
    }
    all_store = bool(stored) and all(any(".base_layer." in k for k in _tensor_names(Path(f))) for f in folders)
    model = skeleton(base_config, task_of(configs[0]).auto_class, materialize=stored)
    names = [f"p{i}" for i in range(len(folders))]
    # NOTE(security): hub_peft's loader, not PEFT's: shapes checked against the base, and a regex target_modules
    # resolved with a bounded matcher before PEFT sees it (the parents are a stranger's files, per request too)
    peft_model = model
    for name, folder in zip(names, folders, strict=True):
        peft_model = load_adapter(peft_model, Path(folder), adapter_name=name)
    kwargs: dict[str, Any] = {"combination_type": spec.method}
    if spec.method in DENSITY_METHODS:
        kwargs.update(density=spec.density, majority_sign_method=spec.majority_sign_method)
    if spec.svd_rank is not None:
        kwargs["svd_rank"] = spec.svd_rank
    with torch.random.fork_rng(devices=[]):  # DARE draws its drops from torch's global generator
        torch.manual_seed(spec.seed)
        try:
            peft_model.add_weighted_adapter(names, [float(w) for w in weights], "merged", **kwargs)
        except ValueError as e:
            hint = f"; use {_EXACT} or an _svd method for adapters of different ranks" if "same r" in str(e) else ""
            raise IncompatibleAdapterError(f"PEFT cannot merge these adapters with {spec.method}: {e}{hint}.") from e
    tensors = get_peft_model_state_dict(peft_model, adapter_name="merged", save_embedding_layers=all_store)
    config = peft_model.peft_config["merged"]
    config.use_rslora = False  # the merged B·A carries the parents' scalings; r = lora_alpha (see the NOTE above)
    config.inference_mode = True
    out = config.to_dict()
    out["base_model_name_or_path"] = configs[0]["base_model_name_or_path"]
    out["revision"] = configs[0].get("revision")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(out.get(key), set):
            out[key] = sorted(out[key])
    return out, {k: v.detach().clone().contiguous() for k, v in tensors.items()}


def _tensor_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())  # safe_open is not iterable


def skeleton(base_config: Any, auto_class: str = "AutoModelForCausalLM", materialize: Set[str] = frozenset()) -> Any:
    """A model of ``base_config``'s architecture whose parameters take no memory: each is a zero-stride view of
    a single zero (the names in ``materialize`` are real zero tensors, for weights loaded later). For PEFT
    operations that never read a base weight (merging LoRA factors)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(base_config)
    for prefix, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            full = f"{prefix}.{name}" if prefix else name
            data = torch.zeros(p.shape, dtype=p.dtype) if full in materialize else _nothing(p)
            setattr(module, name, torch.nn.Parameter(data, requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, _nothing(b), persistent=name not in module._non_persistent_buffers_set)
    return model


def _nothing(t: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.zeros((), dtype=t.dtype).expand(t.shape)


# --- IA3: task arithmetic on lᵢ − 1 ------------------------------------------------------------------------------


def _merge_ia3(
    folders: Sequence[Path], configs: list[dict], weights: Sequence[float], spec: MergeSpec
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    import torch
    from peft.utils import merge_utils
    from safetensors.torch import load_file

    if spec.method not in IA3_METHODS:
        raise IncompatibleAdapterError(
            f"IA3 vectors merge with {', '.join(IA3_METHODS)} (task arithmetic on l − 1); {spec.method} needs "
            "low-rank factors. Convert the adapters to LoRA first for it."
        )
    parents = [load_file(str(Path(f) / "adapter_model.safetensors")) for f in folders]
    keys = sorted(set().union(*parents))
    merged = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        for key in keys:
            shapes = {tuple(p[key].shape) for p in parents if key in p}
            if len(shapes) > 1:
                raise IncompatibleAdapterError(f"The adapters' {key} have different shapes {sorted(shapes)}.")
            like = next(p[key] for p in parents if key in p)
            vectors = [(p[key].float() - 1) if key in p else torch.zeros(like.shape) for p in parents]
            w = torch.tensor([float(x) for x in weights])
            if spec.method == "linear":
                task = merge_utils.task_arithmetic(vectors, w)
            elif spec.method == "magnitude_prune":
                task = merge_utils.magnitude_prune(vectors, w, spec.density)
            elif spec.method == "dare_linear":
                task = merge_utils.dare_linear(vectors, w, spec.density)
            else:
                fn = merge_utils.ties if spec.method == "ties" else merge_utils.dare_ties
                task = fn(vectors, w, spec.density, spec.majority_sign_method)
            merged[key] = (task + 1).to(like.dtype).contiguous()
    config = dict(configs[0])
    for field in ("target_modules", "feedforward_modules"):
        values = [c.get(field) for c in configs]
        if all(isinstance(v, list) for v in values):
            config[field] = sorted({name for v in values for name in v or []})
        elif all(isinstance(v, str) for v in values):
            config[field] = "|".join(f"({v})" for v in values)
        else:
            raise IncompatibleAdapterError(f"The adapters give {field} in different forms (names and a regex).")
    config["inference_mode"] = True
    return config, merged


# --- ReFT: concatenated interventions ----------------------------------------------------------------------------


def _merge_reft(
    folders: Sequence[Path], configs: list[dict], weights: Sequence[float], spec: MergeSpec
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``cat`` for ReFT: at every site, one intervention whose edit is Σ wᵢ·editᵢ exactly.

    NOTE(design): with ``t(h) = W h + b`` (linear activation), each parent's weighted edit takes NoReFT's form
    ``Rᵢᵀ(W'ᵢh + b'ᵢ − Rᵢh)``: LoReFT/NoReFT ``W' = wW + (1−w)R, b' = w(b − c)`` (``c`` NoReFT's projection
    bias), DiReFT/NoDiReFT ``W' = wW + R, b' = wb``, ConsReFT ``W' = (1−w)R, b' = wb``, LoBiReFT ``W' = R, b' =
    wb``; stacking the rows (``R = [R₁; R₂]``...) sums the edits, since ``Rᵀv = Σ Rᵢᵀvᵢ``. A parent without an
    intervention at a site adds zero rows there. With a non-linear activation only DiReFT/NoDiReFT parents of that
    activation merge (``w`` scales their ``R`` rows: ``(wR)ᵀ act(Wh + b)``). The merged intervention is NoReFT (or
    NoDiReFT): its stacked R is no longer orthonormal, and its rank is the sum of the ranks."""
    import torch
    from safetensors.torch import load_file

    from ..reft.config import ReftConfig
    from ..reft.interventions import KINDS

    if spec.method != "cat":
        raise IncompatibleAdapterError(
            f"ReFT adapters merge with cat only (exact: the interventions are stacked); {spec.method} needs weight "
            "tensors of one shape in one basis, which interventions of different R do not share."
        )
    parsed = [ReftConfig.from_dict(c) for c in configs]
    for field in ("positions", "share_weights", "prompt_template", "hidden_size", "dtype"):
        values = {json.dumps(getattr(c, field)) for c in parsed}
        if len(values) > 1:
            raise IncompatibleAdapterError(
                f"The ReFT adapters differ in {field} ({', '.join(sorted(values))}); a merged intervention edits one "
                "set of positions under one prompt format. Serve them as a weighted mix instead."
            )
    linear = all(c.activation in (None, "linear") for c in parsed)
    direct = all(not KINDS[c.intervention].subtract_projection and KINDS[c.intervention].learned_source for c in parsed)
    if not linear and not (direct and len({c.activation for c in parsed}) == 1):
        raise IncompatibleAdapterError(
            "These ReFT adapters have no exact merge: a non-linear activation merges only across DiReFT/NoDiReFT "
            "adapters of that same activation. Serve them as a weighted mix instead."
        )
    first = parsed[0]
    layers = sorted({n for c in parsed for n in c.layers})
    components = [comp for comp in dict.fromkeys(x for c in parsed for x in c.components)]
    template = ReftConfig(
        layers=layers, components=components, positions=first.positions, share_weights=first.share_weights
    )
    rank = sum(c.rank for c in parsed)
    if rank > (first.hidden_size or 0):
        raise IncompatibleAdapterError(f"The merged rank {rank} would exceed the hidden size {first.hidden_size}.")
    parents = [load_file(str(Path(f) / "adapter_model.safetensors")) for f in folders]
    merged: dict[str, torch.Tensor] = {}
    d = first.hidden_size or 0
    for layer, component, group in template.sites():
        key = ReftConfig.key_name(layer, component, group)
        blocks = []
        for c, tensors, w in zip(parsed, parents, weights, strict=True):
            if layer not in c.layers or component not in c.components:
                blocks.append((torch.zeros(c.rank, d), torch.zeros(c.rank, d), torch.zeros(c.rank)))
                continue
            blocks.append(
                _weighted_block(
                    c.intervention,
                    {n.rsplit(".", 1)[1]: t.float() for n, t in tensors.items() if n.startswith(f"reft.{key}.")},
                    float(w),
                    linear,
                )
            )
        dtype = getattr(torch, first.dtype)
        merged[f"reft.{key}.R"] = torch.cat([R for R, _, _ in blocks]).to(dtype).contiguous()
        merged[f"reft.{key}.W"] = torch.cat([W for _, W, _ in blocks]).to(dtype).contiguous()
        merged[f"reft.{key}.b"] = torch.cat([b for _, _, b in blocks]).to(dtype).contiguous()
    config = first.to_dict() | {
        "layers": layers,
        "components": components,
        "rank": rank,
        "intervention": "noreft" if linear else "nodireft",
        "activation": None if linear else first.activation,
        "proj_bias": False,
        "dropout": 0.0,
    }
    ReftConfig.from_dict(config)  # the merged config is valid as any other
    return config, merged


def _weighted_block(kind: str, t: dict[str, torch.Tensor], w: float, linear: bool) -> tuple:
    """One parent's ``(R, W', b')`` rows at a site, its edit weighted by ``w`` (see :func:`_merge_reft`)."""
    import torch

    R, b = t["R"], t["b"] - t.get("R_bias", torch.zeros_like(t["b"]))
    W = t.get("W", torch.zeros_like(R))  # ConsReFT and LoBiReFT have none (their W' below does not use it)
    if not linear:  # DiReFT/NoDiReFT under one non-linear activation: w scales R's rows
        return w * R, W, t["b"]
    if kind in ("loreft", "noreft"):
        return R, w * W + (1 - w) * R, w * b
    if kind in ("direft", "nodireft"):
        return R, w * W + R, w * b
    if kind == "consreft":
        return R, (1 - w) * R, w * b
    return R, R.clone(), w * b  # lobireft


def merge_adapters(
    sources: Sequence[str | Path],
    weights: Sequence[float],
    out_dir: str | Path,
    spec: MergeSpec = MergeSpec(),
    *,
    overwrite: bool = False,
    description: str | None = None,
) -> Path:
    """Merge adapters (folders or Hub specs ``REPO[@REVISION][:SUBFOLDER]``) with ``weights`` into a new adapter
    folder ``out_dir``, written atomically with its card. The card records each parent (its repo and resolved
    commit, or a folder's name and sha256), its weight and the merge's settings; its metadata names the base model
    with ``base_model_relation: adapter`` (the merge is still an adapter of that base)."""
    from ..adapters import check_adapter_folder, resolve_adapter
    from ..cards import CardInfo
    from .folders import write_adapter_folder

    resolved = [resolve_adapter(str(s)) for s in sources]
    for r in resolved:
        check_adapter_folder(r.folder)
    config, tensors = merge_weights([r.folder for r in resolved], weights, spec)
    first = CardInfo.load(resolved[0].folder)
    lineage = {
        "operation": "merge",
        **spec.record(),
        "parents": [{**_parent_record(r), "weight": float(w)} for r, w in zip(resolved, weights, strict=True)],
    }
    info = CardInfo(
        description=description,
        base=first.base,
        license=first.license,
        prompt_template=first.prompt_template,
        example_prompt=first.example_prompt,
        lineage=lineage,
    )
    # the card's llama.cpp verdict finds the base's config on this machine (merge_weights fetched it, for a LoRA)
    return write_adapter_folder(out_dir, config, tensors, info, overwrite=overwrite)


def _parent_record(resolved: Any) -> dict[str, Any]:
    """A parent as the card names it: ``repo@commit[:subfolder]``, or a local folder's name and content digest
    (never its full path, which says nothing to a reader and something about this machine)."""
    if resolved.repo_id is not None:
        return {"repo": resolved.repo_id, "commit": resolved.commit, "subfolder": resolved.subfolder}
    return {"folder": Path(resolved.folder).name, "sha256": resolved.cache_key.removeprefix("sha256:")}
