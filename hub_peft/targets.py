"""Which modules a LoRA adapter wraps: ``all-linear``, PEFT's per-architecture default, or module names, checked
against the model before training (``hub-peft train --target-modules``) and against a base model's config
(``hub-peft validate --base``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .errors import InvalidInputError
from .target_regex import (
    MAX_PATTERN_KEYS,
    MAX_REGEX_KEYS,
    NOT_REGEX_TYPES,
    PASTED_LIST_FIELDS,
    REGEX_BUDGET_S,
    REGEX_FIELDS,
    BoundedMatcher,
    is_plain_name,
    list_matches,
    pasted_problem,
    short_pattern,
)

ALL_LINEAR = "all-linear"  # PEFT's own value: every Linear/Conv1D layer but the output head
PEFT_DEFAULT = "peft-default"  # PEFT's table by model_type (what PEFT uses when target_modules is None)
KEYWORDS = (ALL_LINEAR, PEFT_DEFAULT)
USAGE = (
    f"give {ALL_LINEAR!r} (every linear layer but the output head), {PEFT_DEFAULT!r} (PEFT's default for the "
    "architecture) or module names, comma-separated, such as q_proj,v_proj"
)


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
    if isinstance(targets, str):  # bounded: a regex may come from an adapter (see expand_target_modules)
        match = BoundedMatcher().matcher(targets, "target_modules", len(names))
        return [] if any(match(n) for n in names) else [targets]
    return [t for t in targets if not any(matches(n, t) for n in names)]


def adapted_modules(tensors: Iterable[str], targets: str | list[str]) -> dict[str, str]:
    """Module path -> the ``targets`` entry that names it, for the modules PEFT adapter ``tensors`` (saved as
    ``base_model.model.<path>.<adapter weight>``) belong to: the longest dotted prefix ``targets`` matches. A
    regex ``targets`` is matched with a bound (InvalidInputError when too costly)."""
    out: dict[str, str] = {}
    match: Callable[[str], bool] | None = None
    # bounded: the regex comes from an untrusted adapter (InvalidInputError when it is too costly)
    if isinstance(targets, str):
        fullmatch, known = BoundedMatcher().matcher(targets, "target_modules"), {}

        def match_once(path: str) -> bool:  # each path once: tensors share their modules' paths
            if path not in known:
                known[path] = fullmatch(path)
            return known[path]

        match = match_once
    for tensor in tensors:
        if not tensor.startswith("base_model.model."):
            continue
        parts = tensor.removeprefix("base_model.model.").split(".")
        for end in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:end])
            if match is not None:
                target = path if match(path) else None
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
    targets: str | list[str]
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


def _string_list(config: dict, field: str) -> str | list[str] | None:
    """The value of a target_modules-like ``field``: None, a string, or a list of strings; else InvalidInputError."""
    value = config.get(field)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        if len(value) > MAX_PATTERN_KEYS:
            raise InvalidInputError(
                f"{field} has {len(value)} entries (at most {MAX_PATTERN_KEYS}). Fix: name fewer "
                'modules, e.g. by their last names such as "q_proj".'
            )
        return list(value)
    raise InvalidInputError(
        f"{field} must be a module name regex (a string) or a list of module names (strings), got "
        f"{str(value)[:80]!r} ({type(value).__name__}). Fix: write it as a list of names, e.g. "
        '["q_proj", "v_proj"].'
    )


def config_problems(config: dict) -> list[tuple[str, str]]:
    """``(problem, fix)`` for each field of a PEFT config that PEFT reads as a regex, or pastes into one, and that
    is of the wrong type or unsafe to hand to Python's ``re``. The fields PEFT full-matches whole
    (``REGEX_FIELDS``) are only type-checked here: :func:`expand_target_modules` resolves them with a bound."""
    problems: list[tuple[str, str]] = []
    for field in REGEX_FIELDS:
        try:
            _string_list(config, field)
        except InvalidInputError as e:
            message, fix = str(e).split(" Fix: ")
            problems.append((message.rstrip("."), fix.rstrip(".")))
    pasted: list[tuple[str, Any]] = []
    for field in PASTED_LIST_FIELDS:
        value = config.get(field)
        if isinstance(value, list):
            pasted += [(field, v) for v in value]
        elif value is not None and not (field == "layers_pattern" and isinstance(value, str)):
            problems.append(
                (
                    f"{field} is a {type(value).__name__}, not a list of module names",
                    f'write {field} as a list of module names, e.g. ["lm_head"]',
                )
            )
        elif value is not None:
            pasted.append((field, value))
    for field, value in config.items():
        if not field.endswith("_pattern") or field == "layers_pattern" or value is None:
            continue
        if isinstance(value, dict):
            pasted += [(field, key) for key in value]
        else:
            problems.append(
                (
                    f"{field} is a {type(value).__name__}, not a map of module names to values",
                    f'write {field} as {{"module name": value}}',
                )
            )
    counts: dict[str, int] = {}
    for field, _ in pasted:
        counts[field] = counts.get(field, 0) + 1
    problems += [
        (f"{field} has {n} entries (at most {MAX_PATTERN_KEYS})", "keep one entry per distinct value")
        for field, n in counts.items()
        if n > MAX_PATTERN_KEYS
    ]
    if any(n > MAX_PATTERN_KEYS for n in counts.values()):
        return problems
    regexes = [field for field, value in pasted if not is_plain_name(value)]
    if len(regexes) > MAX_REGEX_KEYS:
        problems.append(
            (
                f"{len(regexes)} entries of {', '.join(sorted(set(regexes)))} are regexes (at most {MAX_REGEX_KEYS})",
                "use module names for most of them",
            )
        )
        return problems
    for field, value in pasted:
        reason = pasted_problem(value, field)
        if reason is not None:
            problems.append(
                (
                    f"{field} entry {reason}, which PEFT would run with Python's re, without a time limit",
                    'use module names ("q_proj", "model.layers.0.self_attn.q_proj"), or a regex with at most one '
                    'quantifier, on a single character, e.g. "layers\\\\.\\\\d+\\\\.self_attn\\\\.q_proj"',
                )
            )
    return problems


def _all_linear(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == ALL_LINEAR  # PEFT compares it lower-cased


def _check_exact(field: str, chosen: list[str], names: list[str]) -> None:
    """PEFT matches a list entry by equality or as a dotted suffix: the full names ``chosen`` must not also pick,
    as a suffix, a module the regex left out (``a.b`` chosen, ``x.a.b`` not); InvalidInputError when they do."""
    entries = set(chosen)
    extra = next((n for n in names if n not in entries and list_matches(n, entries)), None)
    if extra is not None:
        raise InvalidInputError(
            f"The {field} regex cannot be handed to PEFT as module names on this base model: {extra}, which it does "
            f"not match, ends with the name of a module it matches. Fix: list the module names in {field}."
        )


def expand_target_modules(config: dict, module_names: Iterable[str], *, budget_s: float = REGEX_BUDGET_S) -> dict:
    """A copy of a PEFT adapter ``config`` (the adapter_config.json dict) where each field PEFT would
    ``re.fullmatch`` as a regex (``target_modules`` other than ``"all-linear"``, ``exclude_modules``, IA3's
    ``feedforward_modules``, when a string) is the explicit list of the ``module_names`` it full-matches, so PEFT
    compares names by equality and never runs an adapter's regex. ``module_names`` are the names of
    ``base.named_modules()``, what PEFT matches (the root's ``""`` is skipped, as PEFT does).

    Bounded: regexes of at most ``MAX_REGEX_CHARS`` characters, matched with the ``regex`` module within
    ``budget_s`` seconds for the whole config. Raises InvalidInputError for a regex that is too costly (too long,
    too big once unrolled, over the budget) or invalid, a field of the wrong type, or an entry PEFT pastes into a
    regex of its own (rank_pattern keys, modules_to_save...) that is unsafe (:func:`pasted_problem`);
    IncompatibleAdapterError when a ``target_modules`` regex matches no module. A config without such a string
    comes back as an equal copy, as does an adaption prompt's (its target_modules names an attribute, not a regex).
    For IA3, a ``feedforward_modules`` left a list becomes full names too (PEFT wants it a subset of
    ``target_modules``)."""
    from .errors import IncompatibleAdapterError

    if not isinstance(config, dict):
        raise InvalidInputError(f"An adapter config is a JSON object, not a {type(config).__name__}.")
    if problems := config_problems(config):
        raise InvalidInputError(f"Invalid adapter config: {problems[0][0]}. Fix: {problems[0][1]}.")
    out = dict(config)
    values = {field: _string_list(config, field) for field in REGEX_FIELDS}
    # field -> its regex, for the fields that are one
    regexes = {f: v for f, v in values.items() if isinstance(v, str) and not (f == "target_modules" and _all_linear(v))}
    if not regexes or str(config.get("peft_type", "")).upper() in NOT_REGEX_TYPES:
        return out
    if "target_modules" in regexes and (
        config.get("layers_to_transform") is not None or config.get("layers_pattern") is not None
    ):
        raise InvalidInputError(
            "target_modules is a regex while layers_to_transform or layers_pattern is set, which "
            "PEFT refuses. Fix: drop those two, or list the modules in target_modules."
        )
    names = list(dict.fromkeys(n for n in module_names if n))
    matcher = BoundedMatcher(budget_s)
    targets = values["target_modules"]
    if "target_modules" in regexes:
        targets = out["target_modules"] = matcher.fullmatches(regexes["target_modules"], names, "target_modules")
        if not targets and not config.get("target_parameters"):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise IncompatibleAdapterError(
                f"target_modules {short_pattern(regexes['target_modules'])} matches no module of the base model "
                f"(its modules: {shown}): this adapter was made for another base. Fix: load it on "
                f"{config.get('base_model_name_or_path') or 'the base it was trained on'}."
            )
        _check_exact("target_modules", targets, names)
    if "exclude_modules" in regexes:
        out["exclude_modules"] = matcher.fullmatches(regexes["exclude_modules"], names, "exclude_modules")
        _check_exact("exclude_modules", out["exclude_modules"], names)
    feedforward = values["feedforward_modules"]
    ia3 = str(config.get("peft_type", "")).upper() == "IA3"
    if (
        ia3
        and feedforward is not None
        and isinstance(targets, list)
        and ("target_modules" in regexes or "feedforward_modules" in regexes)
    ):
        # NOTE: PEFT checks that feedforward_modules is a subset of target_modules once both are lists, so both
        # become full names. PEFT's rule for a feedforward list is key.endswith(entry), without a dot.
        if "target_modules" not in regexes:
            targets = out["target_modules"] = [n for n in names if list_matches(n, set(targets))]
        if isinstance(feedforward, str):
            match = matcher.matcher(feedforward, "feedforward_modules", len(targets))
            out["feedforward_modules"] = [n for n in targets if match(n)]
        else:
            out["feedforward_modules"] = [n for n in targets if any(n.endswith(f) for f in feedforward)]
    elif "feedforward_modules" in regexes:
        out["feedforward_modules"] = matcher.fullmatches(regexes["feedforward_modules"], names, "feedforward_modules")
    return out
