"""Checks of an adapter's ``adapter_config.json`` against itself and its weights: types and bounds of the fields
PEFT acts on, weights that belong to no target module, LoRA ranks that differ from the weights'."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..limits import MAX_CONFIG_BYTES, MAX_RANK
from ..target_regex import BoundedMatcher, list_matches, pattern_lookup
from ..targets import ALL_LINEAR, config_problems
from .header import is_int, parse_json, shown
from .report import Report

# a LoRA weight as PEFT saves it: (module path, which matrix)
LORA_TENSOR = re.compile(r"^base_model\.model\.(.+?)\.(?:(lora_A|lora_B)\.weight|(lora_embedding_A|lora_embedding_B))$")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_config(report: Report, path: Path) -> bool:
    """Read adapter_config.json into ``report.config``: strict JSON, a JSON object, at most MAX_CONFIG_BYTES;
    False (with a problem) when it is not."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        report.add(
            f"adapter_config.json takes {size} bytes, over hub_peft's limit of {MAX_CONFIG_BYTES}",
            "an adapter config takes a few KB: re-save the adapter",
        )
        return False
    try:
        config = parse_json(path.read_bytes(), "adapter_config.json")
    except (OSError, ValueError) as e:
        report.add(str(e), "re-save the adapter")
        return False
    if not isinstance(config, dict):
        report.add(
            f"adapter_config.json is a JSON {type(config).__name__}, not an object of settings", "re-save the adapter"
        )
        return False
    report.config = config
    return True


def check_peft_config(report: Report, peft_type: str) -> None:
    """Types and bounds of the fields PEFT acts on without checking them (it fails later, with a TypeError, or
    allocates whatever ``r`` says), and of the fields it reads as regexes or pastes into regexes."""

    c = report.config
    for point, fix in config_problems(c):
        report.add(f"adapter_config.json: {point}", fix)
    lora = peft_type in ("LORA", "ADALORA")
    for name in ("r", "init_r", "target_r") if peft_type == "ADALORA" else ("r",):
        value, low = c.get(name), 1 if lora else 0  # OFT, for one, takes r=0
        if name in c and (value is not None or lora) and not (is_int(value) and low <= value <= MAX_RANK):
            report.add(
                f"adapter_config.json: {name} is {shown(value)}, not an integer from {low} to {MAX_RANK}",
                f"set {name} to the rank the adapter was trained with",
            )
    patterns = c.get("rank_pattern")
    if peft_type == "LORA" and isinstance(patterns, dict):
        wrong = next(((k, v) for k, v in patterns.items() if not (is_int(v) and 1 <= v <= MAX_RANK)), None)
        if wrong:
            report.add(
                f"adapter_config.json: rank_pattern gives {shown(wrong[0], 200)} the rank "
                f"{shown(wrong[1])}, not an integer from 1 to {MAX_RANK}",
                "set each rank_pattern entry to that module's rank",
            )
    elif (
        peft_type == "ADALORA"
        and isinstance(patterns, dict)
        and not all(
            isinstance(v, list) and len(v) <= MAX_RANK and all(isinstance(b, bool) for b in v)
            for v in patterns.values()
        )
    ):  # AdaLoRA's: the ranks it kept, as lists of booleans
        report.add(
            "adapter_config.json: AdaLoRA's rank_pattern values are not lists of booleans",
            "re-save the adapter with PEFT",
        )
    if lora:
        alpha = c.get("lora_alpha", 8)
        if not _is_number(alpha):
            report.add(
                f"adapter_config.json: lora_alpha is {shown(alpha)}, not a finite number",
                "set lora_alpha to the value the adapter was trained with (the scale is lora_alpha / r)",
            )
        alphas = c.get("alpha_pattern")
        if isinstance(alphas, dict) and (wrong := next(((k, v) for k, v in alphas.items() if not _is_number(v)), None)):
            report.add(
                f"adapter_config.json: alpha_pattern gives {shown(wrong[0], 200)} the alpha "
                f"{shown(wrong[1])}, not a finite number",
                "set each alpha_pattern entry to a number",
            )
    layers = c.get("layers_to_transform")
    if layers is not None and not (
        (is_int(layers) and layers >= 0) or (isinstance(layers, list) and all(is_int(i) and i >= 0 for i in layers))
    ):
        report.add(
            f"adapter_config.json: layers_to_transform is {shown(layers)}, not a layer index or a list of them",
            "write layers_to_transform as a list of layer indices, e.g. [0, 1]",
        )


def check_stray_tensors(report: Report, peft_type: str) -> None:
    """Weights that belong to no module ``target_modules`` names (LoRA, AdaLoRA, IA3): a module's path, or a
    dotted part of it, must be an entry of the list (or of ``modules_to_save``), or the full path must
    full-match the regex; that regex is matched with a bound (an untrusted adapter holds it)."""

    c = report.config
    targets, extra = c.get("target_modules"), c.get("modules_to_save") or []
    # target_parameters (LoRA on fused MoE expert weights) puts tensors under the modules holding those
    # parameters, which only the model can name: PEFT checks those when it loads
    if peft_type not in ("LORA", "ADALORA", "IA3") or not targets or c.get("target_parameters"):
        return
    if not isinstance(extra, list) or not all(isinstance(m, str) for m in extra):
        return  # reported by config_problems
    entries, saved = set(), set(extra)
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        entries = set(targets) | saved  # names may be short ("q_proj") or dotted paths
        match = None
    elif isinstance(targets, str) and targets.lower() != ALL_LINEAR:
        try:
            match = BoundedMatcher().matcher(targets, "target_modules", len(report.tensors))
        except InvalidInputError as e:
            point, _, fix = str(e).partition(" Fix: ")
            report.add(point, fix or "list the module names in target_modules")
            return
    else:
        return
    known: dict[str, bool] = {}

    def targeted(path: str) -> bool:
        if path not in known:
            known[path] = list_matches(path, entries) if match is None else (match(path) or list_matches(path, saved))
        return known[path]

    stray = []
    try:
        for tensor in report.tensors:
            parts = tensor.removeprefix("base_model.model.").split(".")
            if not any(targeted(".".join(parts[:end])) for end in range(len(parts) - 1, 0, -1)):
                stray.append(tensor)
    except InvalidInputError as e:
        point, _, fix = str(e).partition(" Fix: ")
        report.add(point, fix or "list the module names in target_modules")
        return
    if stray:
        report.add(
            f"{len(stray)} tensors match no target module, e.g. {stray[0][:200]}",
            "the config's target_modules must name the modules the weights belong to",
        )


def check_lora_ranks(report: Report) -> None:
    """Each LoRA weight's rank (lora_A's rows, lora_B's columns) must be the rank the config gives its module: ``r``
    or its ``rank_pattern`` entry, found as PEFT finds it. PEFT builds the config's rank before it loads the
    weights: ``r: 3000000`` over rank-4 weights would take 768 MB per matrix of a 64-wide model before failing,
    and the engine, which reads the weights, would serve it as a silent no-op."""

    c = report.config
    r, patterns = c.get("r", 8), c.get("rank_pattern") or {}
    if not is_int(r) or not isinstance(patterns, dict) or not all(is_int(v) and v > 0 for v in patterns.values()):
        return  # reported by check_peft_config
    fused = bool(c.get("target_parameters"))  # LoRA on MoE expert weights: r rows per expert
    ranks: dict[str, tuple[int, str]] = {}
    try:
        lookup = pattern_lookup(list(patterns), "rank_pattern")
        for tensor, (_, shape) in report.tensors.items():
            m = LORA_TENSOR.match(tensor)
            if not m:
                continue
            path, which = m.group(1), m.group(2) or m.group(3)
            if len(shape) < 2:
                report.add(f"{tensor[:200]} has shape {shape}; LoRA weights are matrices", "re-save the adapter")
                return
            if path not in ranks:
                key = lookup(path)
                ranks[path] = (patterns[key], f"rank_pattern[{key!r}]") if key is not None else (r, "r")
            rank, source = ranks[path]
            got = shape[0] if which.endswith("A") else shape[1]
            # lora_B of a grouped convolution or a block-diagonal LoRA holds rank / groups columns
            if got == rank or (fused and got % rank == 0) or (which.endswith("B") and got and rank % got == 0):
                continue
            report.add(
                f"{tensor[:200]} has rank {got} (shape {shape[:4]}), but adapter_config.json gives its module "
                f"rank {rank} ({source}): PEFT would build rank-{rank} matrices for it",
                f"set {source} to {got}, the rank the weights were trained with, or re-save the adapter",
            )
            return
    except InvalidInputError as e:
        point, _, fix = str(e).partition(" Fix: ")
        report.add(point, fix or "use module names in rank_pattern")
