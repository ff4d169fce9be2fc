"""Which modules a LoRA adapter wraps: ``all-linear``, PEFT's per-architecture default, or module names, checked
against the model before training (``hub-peft train --target-modules``) and against a base model's config
(``hub-peft validate --base``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from .errors import InvalidInputError

ALL_LINEAR = "all-linear"  # PEFT's own value: every Linear/Conv1D layer but the output head
PEFT_DEFAULT = "peft-default"  # PEFT's table by model_type (what PEFT uses when target_modules is None)
KEYWORDS = (ALL_LINEAR, PEFT_DEFAULT)
USAGE = (f"give {ALL_LINEAR!r} (every linear layer but the output head), {PEFT_DEFAULT!r} (PEFT's default for the "
         "architecture) or module names, comma-separated, such as q_proj,v_proj")  # fmt: skip


def parse_target_modules(value: Any) -> str | list[str]:
    """``"all-linear"``, ``"peft-default"``, or a list of module names (from a list or one comma-separated string)."""
    if isinstance(value, str):
        if value.strip().lower() in KEYWORDS:
            return value.strip().lower()
        names = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(n, str) for n in value):
        names = list(value)
    else:
        raise InvalidInputError(f"target_modules must be a string or a list of module names, got {value!r}: {USAGE}.")
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise InvalidInputError(f"target_modules is empty: {USAGE}.")
    if mixed := [n for n in names if n.lower() in KEYWORDS]:
        raise InvalidInputError(f"{mixed[0]!r} cannot be combined with module names in target_modules: {USAGE}.")
    return names


def describe(value: str | list[str]) -> str:
    """The setting as the command line takes it (``all-linear``, ``q_proj,v_proj``)."""
    return value if isinstance(value, str) else ",".join(value)


def matches(path: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the full module path, or its last dotted parts."""
    return path == target or path.endswith(f".{target}")


def missing_targets(module_names: Iterable[str], targets: str | list[str]) -> list[str]:
    """The entries of ``targets`` (a list, or a regex as PEFT reads a string) that name no module."""
    names = list(module_names)
    if isinstance(targets, str):
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    return [t for t in targets if not any(matches(n, t) for n in names)]


def adapted_modules(tensors: Iterable[str], targets: str | list[str]) -> dict[str, str]:
    """Module path -> the ``targets`` entry that names it, for the modules PEFT adapter ``tensors`` (saved as
    ``base_model.model.<path>.<adapter weight>``) belong to: the longest dotted prefix ``targets`` matches."""
    out: dict[str, str] = {}
    for tensor in tensors:
        if not tensor.startswith("base_model.model."):
            continue
        parts = tensor.removeprefix("base_model.model.").split(".")
        for end in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:end])
            if isinstance(targets, str):
                target = path if re.fullmatch(targets, path) else None
            else:
                target = next((t for t in targets if matches(path, t)), None)
            if target is not None:
                out.setdefault(path, target)
                break
    return out


def _layer_classes() -> tuple[type, ...]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return nn.Linear, Conv1D  # bitsandbytes' Linear4bit and FalconLinear are nn.Linear subclasses


def _wrappable(model: Any) -> dict[str, Any]:
    """Path -> module of the layers LoRA can wrap (linear, Conv1D, embeddings, convolutions), the head included."""
    from torch import nn

    classes = (*_layer_classes(), nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
    return {n: m for n, m in model.named_modules() if isinstance(m, classes)}


def linear_layers(model: Any) -> dict[str, Any]:
    """Path -> module of every linear layer (``nn.Linear`` and subclasses, transformers' ``Conv1D``) except the
    output head: the layers ``all-linear`` wraps."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    classes = _layer_classes()
    return {n: m for n, m in model.named_modules() if isinstance(m, classes) and m is not head}


def linear_names(model: Any, limit: int = 8) -> str:
    """The distinct last names of the model's linear layers, in model order, for messages."""
    names = list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in linear_layers(model)))
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def resolve_lora_targets(model: Any, setting: str | list[str]) -> tuple[str | list[str], bool]:
    """``(target_modules, fan_in_fan_out)`` for a ``LoraConfig`` on ``model``: ``all-linear`` as is (PEFT expands
    it), ``peft-default`` PEFT's list for the model's ``model_type``, names checked to exist. ``fan_in_fan_out``
    is True when every wrapped layer is a ``Conv1D`` (GPT-2), which stores its weight transposed."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from transformers.pytorch_utils import Conv1D

    setting = parse_target_modules(setting)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = linear_layers(model)
    if setting == ALL_LINEAR:
        targets, wrapped = setting, list(layers.values())
    else:
        if setting == PEFT_DEFAULT:
            targets = list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or [])
            if not targets:
                raise InvalidInputError(
                    f"PEFT has no default LoRA target modules for model type {model_type!r}: use {ALL_LINEAR!r}, or "
                    f"name the modules (this model's linear layers: {linear_names(model)})."
                )
        else:
            targets = setting
        what = f"this {model_type or type(model).__name__} model"
        modules, wrappable = dict(model.named_modules()), _wrappable(model)
        if missing := missing_targets(modules, targets):
            raise InvalidInputError(
                f"target module(s) {', '.join(missing)} not found in {what}; its linear layers are named "
                f"{linear_names(model)}. Pass some of those (comma-separated), or {ALL_LINEAR!r}."
            )
        if blocks := missing_targets(wrappable, targets):
            raise InvalidInputError(
                f"target module(s) {', '.join(blocks)} in {what} are blocks of layers, not layers LoRA can wrap; "
                f"name its linear layers instead ({linear_names(model)}), or {ALL_LINEAR!r}."
            )
        wrapped = [m for path, m in wrappable.items() if any(matches(path, t) for t in targets)]
    fan_in_fan_out = bool(wrapped) and all(isinstance(m, Conv1D) for m in wrapped)
    return targets, fan_in_fan_out


def base_module_names(base_config: Any, auto_class: str = "AutoModelForCausalLM") -> tuple[list[str], str] | None:
    """The module paths of the model ``auto_class`` builds from ``base_config`` on the meta device (no weights),
    and the names of its linear layers for messages; None when that Auto class cannot build this config."""
    import torch
    import transformers

    try:
        with torch.device("meta"):
            model = getattr(transformers, auto_class).from_config(base_config)
    except Exception:  # a config this Auto class cannot build: nothing to compare (validate says so elsewhere)
        return None
    return [n for n, _ in model.named_modules() if n], linear_names(model)
