"""Load adapters onto a base model, after checking them as the untrusted data they are."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..cards import CardInfo
from ..errors import IncompatibleAdapterError, InvalidInputError, NotFoundError, UnsafeFileError
from ..target_regex import list_matches, pattern_lookup
from ..targets import ALL_LINEAR, expand_target_modules, linear_layers
from ..validate import (
    DTYPE_BITS,
    FLOAT_DTYPES,
    LORA_TENSOR,
    MAX_SANE_BYTES,
    PICKLE_SUFFIXES,
    read_safetensors_header,
    validate_adapter,
)
from .resolve import resolve_adapter
from .specs import WEIGHTS_NAME, parse_adapter_spec


def fetch_adapter(
    repo_id_or_dir: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    check: bool = True,
    subfolder: str | None = None,
) -> Path:
    """A local folder holding the adapter: the folder itself (or its ``subfolder``), or a Hub snapshot of the
    repo (of its ``subfolder`` only).

    With ``check`` (the default) the folder must hold a loadable adapter (see :func:`check_adapter_folder`).
    """
    folder = resolve_adapter(repo_id_or_dir, revision=revision, token=token, subfolder=subfolder).folder
    if check:
        check_adapter_folder(folder)
    return folder


def check_adapter_folder(
    folder: Path,
    *,
    base_config: Any = None,
    base_name: str = "the given base model",
    max_bytes: int = MAX_SANE_BYTES,
    parse_with_peft: bool = True,
) -> dict:
    """Raise a clear error unless ``folder`` holds a loadable, safetensors-only adapter (fitting ``base_config``, its
    weights file at most ``max_bytes``): every problem :func:`validate_adapter` finds in the untrusted files is an
    InvalidInputError, IncompatibleAdapterError, NotFoundError or UnsafeFileError (HTTP 422 or 404 when served)."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not (folder / WEIGHTS_NAME).is_file():
        raise UnsafeFileError(
            f"{folder} only has pickled weights ({', '.join(pickles)}), which hub_peft never unpickles. If they "
            "are your own trusted files, convert them locally with `hub-peft convert-bin DIR`."
        )
    report = validate_adapter(
        folder, base_config=base_config, base_name=base_name, max_bytes=max_bytes, parse_with_peft=parse_with_peft
    )
    if not report.ok:
        first = report.problems[0]
        if first.incompatible_base:
            raise IncompatibleAdapterError(str(first))
        if "missing" in first.point and "adapter_config" in first.point:
            raise NotFoundError(f"{folder} is not an adapter folder: {first}")
        if str(report.config.get("peft_type")) not in _known_types() and "peft_type" in report.config:
            raise IncompatibleAdapterError(
                f"Unknown adapter type {report.config.get('peft_type')!r} in {folder}: hub_peft loads every "
                f"peft.PeftType ({len(_known_types())} types). Upgrade peft/hub_peft if it is newer."
            )
        raise InvalidInputError(f"Invalid adapter in {folder}: {first}")
    return report.config


def _known_types() -> set[str]:
    import peft

    return {t.value for t in peft.PeftType} | {"REFT"}


def load_adapter(
    base_model: Any,
    repo_id_or_dir: str | Path,
    *,
    adapter_name: str = "default",
    revision: str | None = None,
    token: str | None = None,
    is_trainable: bool = False,
    subfolder: str | None = None,
    max_bytes: int = MAX_SANE_BYTES,
) -> Any:
    """Load an adapter onto ``base_model`` and make it active; call again to add more adapters.

    PEFT types give a ``PeftModel``; ReFT gives a :class:`hub_peft.reft.ReftModel` (over the base or
    over a ``PeftModel``, so LoRA and ReFT combine; one ReFT adapter per model here, many in the engine).
    ``subfolder`` is where the adapter is inside the repo or folder (PEFT's ``subfolder=``; only its files
    are downloaded; ``""``: the root). Without one, a folder saved by PEFT with several adapters (the default
    one at the root, each other one in a sub-folder named after it) gives the one named ``adapter_name``; a
    name it does not hold fails with :class:`NotFoundError` listing the adapters there.

    The adapter is untrusted data: it is validated first (:func:`check_adapter_folder`), refused when its weights
    need more than ``max_bytes`` of memory (from the safetensors header, before any tensor is read: the weights as
    float32, plus the LoRA matrices PEFT builds for targeted modules without saved weights), and a regex
    ``target_modules`` is resolved into module names with a bound (:func:`hub_peft.targets.expand_target_modules`)
    before PEFT sees the config.
    """
    folder = resolve_adapter(
        repo_id_or_dir, revision=revision, token=token, subfolder=subfolder, adapter_name=adapter_name
    ).folder
    return _load_folder(
        base_model,
        folder,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
        label=str(repo_id_or_dir),
        max_bytes=max_bytes,
    )


def _load_folder(
    base_model: Any, folder: Path, *, adapter_name: str, is_trainable: bool, label: str, max_bytes: int = MAX_SANE_BYTES
) -> Any:
    """:func:`load_adapter` once the adapter's folder is known: ``folder`` holds the adapter itself."""
    from peft import PeftModel

    from ..modeling import innermost_model
    from ..reft.model import ReftModel

    inner = innermost_model(base_model)
    config = check_adapter_folder(folder, base_config=inner.config, base_name=_name_of(inner), max_bytes=max_bytes)
    tensors = read_safetensors_header(folder / WEIGHTS_NAME)
    if config.get("peft_type") == "REFT":
        _check_memory(label, _memory_bytes(tensors), max_bytes)
        if isinstance(base_model, ReftModel):
            raise InvalidInputError(
                "This model already has a ReFT adapter; load one ReFT adapter per model (the multi-adapter engine "
                "serves several side by side)."
            )
        return ReftModel.from_pretrained(base_model, folder, is_trainable=is_trainable)
    if isinstance(base_model, ReftModel):  # LoRA goes under the interventions, which keep their hooks
        base_model.base_model = _load_folder(
            base_model.base_model,
            folder,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            label=label,
            max_bytes=max_bytes,
        )
        return base_model
    if isinstance(base_model, PeftModel) and adapter_name in base_model.peft_config:
        raise InvalidInputError(f"An adapter named {adapter_name!r} is already loaded; pick another name.")
    target = base_model.get_base_model() if isinstance(base_model, PeftModel) else base_model
    modules = _peft_modules(target)
    # NOTE(security): PEFT full-matches a string target_modules against every module name with Python's re, which
    # can backtrack for ever holding the GIL ("(.|.)*!"); it gets the config with the explicit names instead
    config = expand_target_modules(config, modules)
    _check_memory(label, _memory_bytes(tensors) + _unsaved_lora_bytes(target, modules, config, tensors), max_bytes)
    peft_config = peft_config_of(config)
    try:
        if isinstance(base_model, PeftModel):
            # what PeftModel.load_adapter does with the config it reads from the folder, with ours: it then loads
            # only the weights, as the adapter exists
            base_model._check_new_adapter_config(peft_config, is_trainable=is_trainable)
            peft_config.inference_mode = not is_trainable
            base_model.add_adapter(adapter_name, peft_config)
            if is_trainable:
                base_model.set_requires_grad(adapter_name)
            base_model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
            base_model.set_adapter(adapter_name)
            return base_model
        model = PeftModel.from_pretrained(
            base_model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, config=peft_config
        )
        model.hub_peft_prompt_template = CardInfo.load(folder).prompt_template
        return model
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        made_for, name = config.get("base_model_name_or_path"), _name_of(inner)
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        hint = (
            f"It was made for {made_for}: load it on that base."
            if made_for and made_for != name
            else "Load it on the base it was trained on, with the same vocabulary and layer sizes."
        )
        raise IncompatibleAdapterError(f"{label} does not fit {name}'s shapes ({detail}). {hint}") from None


def _peft_modules(model: Any) -> dict[str, Any]:
    """Name -> module of what PEFT matches ``target_modules`` against when it adds an adapter to ``model`` (a plain
    model, or a PeftModel's base model): every module but the root and the insides of layers an adapter wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, Any] = {}
    wrapped: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if not name or name.startswith(wrapped):
            continue
        out[name] = module
        if isinstance(module, BaseTunerLayer):
            wrapped = (*wrapped, name + ".")
    return out


def peft_config_of(config: dict) -> Any:
    """The PeftConfig PEFT's ``from_pretrained`` would build from ``config`` (an adapter_config.json dict, its
    ``target_modules`` already resolved by :func:`hub_peft.targets.expand_target_modules`)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]]
    kwargs = config_class.check_kwargs(**{k: v for k, v in config.items() if k != "runtime_config"})
    return config_class.from_peft_type(**kwargs)


def _memory_bytes(tensors: dict[str, tuple[str, list[int]]]) -> int:
    """Bytes the weights of a safetensors header take in memory: float16/bfloat16 ones as float32 (PEFT upcasts
    them by default), the others as stored."""
    return sum(
        math.prod(shape) * max(DTYPE_BITS[dtype] // 8, 4 if dtype in FLOAT_DTYPES else 1)
        for dtype, shape in tensors.values()
    )


def _unsaved_lora_bytes(
    model: Any, modules: dict[str, Any], config: dict, tensors: dict[str, tuple[str, list[int]]]
) -> int:
    """Float32 bytes of the LoRA matrices PEFT builds, before loading the weights, for the modules ``config``
    targets that have no saved weights (rank from ``r``/``rank_pattern``): a config can target every module at
    rank 65536 while the file holds one small matrix."""
    targets = config.get("target_modules")
    if config.get("peft_type") != "LORA" or not targets:
        return 0
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:  # PEFT turns it into the linear layers' names
        entries = {name.rsplit(".", 1)[-1] for name in linear_layers(model) if name in modules}
    else:
        entries = set(targets)
    saved = {m.group(1) for name in tensors if (m := LORA_TENSOR.match(name))}
    r, patterns = config.get("r", 8), config.get("rank_pattern") or {}
    lookup = pattern_lookup(list(patterns), "rank_pattern")
    total = 0
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if weight is None or name in saved or getattr(weight, "ndim", 0) < 2 or not list_matches(name, entries):
            continue
        key = lookup(name)
        rank = patterns[key] if key is not None else r
        total += 4 * rank * (weight.shape[0] + math.prod(weight.shape[1:]))
    return total


def _check_memory(label: str, needed: int, max_bytes: int) -> None:
    if needed > max_bytes:
        raise InvalidInputError(
            f"{label} needs about {needed / 2**20:.1f} MiB of memory for its weights (as float32), over the limit of "
            f"{max_bytes / 2**20:.1f} MiB for one adapter. Use a smaller rank or fewer target modules, or pass a "
            "larger max_bytes= for an adapter you trust."
        )


def _name_of(model: Any) -> str:
    source = getattr(model, "hub_peft_source", None)
    return getattr(source, "hub_id", None) or getattr(model.config, "_name_or_path", None) or "the given base model"


def load_adapters(model: Any, sources: list[str]) -> Any:
    """Load several adapters onto ``model``; the last one is active. Each is a folder or
    ``namespace/name[@revision][:subfolder]`` (see :func:`parse_adapter_spec`)."""
    for i, spec in enumerate(sources):
        source, revision, subfolder = parse_adapter_spec(str(spec))
        folder = resolve_adapter(source, revision=revision, subfolder=subfolder).folder  # the root or SUBFOLDER
        model = _load_folder(model, folder, adapter_name=f"adapter_{i}", is_trainable=False, label=str(spec))
    return model
