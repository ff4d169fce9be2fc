"""Check an adapter folder: files, safetensors header, config, tensor names and shapes, vLLM contract."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .limits import MAX_CONFIG_BYTES, MAX_HEADER_BYTES, MAX_RANK, MAX_SANE_BYTES, MAX_TENSORS

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# bits per element of every dtype safetensors 0.8 reads (F4 and F6 pack several elements per byte)
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
# a LoRA weight as PEFT saves it: (module path, which matrix)
LORA_TENSOR = re.compile(r"^base_model\.model\.(.+?)\.(?:(lora_A|lora_B)\.weight|(lora_embedding_A|lora_embedding_B))$")
VLLM_MAX_RANK = 512
# vLLM 0.32: the linear layers of its decoder models (packed and unpacked names) and their embedding_modules
VLLM_TARGETS = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
    "embed_tokens",
    "lm_head",
}
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # inits that leave the base as it is
VLLM_TENSOR = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(?:(?:lora_A|lora_B)\.weight|lora_embedding_[AB])$")


@dataclass
class Problem:
    point: str
    fix: str
    incompatible_base: bool = False  # the adapter is fine, but made for another base model

    def __str__(self) -> str:
        return f"{self.point} -> fix: {self.fix}"


@dataclass
class Report:
    folder: Path
    problems: list[Problem] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # name -> (dtype, shape)
    warnings: list[str] = field(default_factory=list)  # worth saying, but the adapter still loads

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, point: str, fix: str, *, incompatible_base: bool = False) -> None:
        """Record a problem; ``incompatible_base``: the adapter is fine, but made for another base."""
        self.problems.append(Problem(point, fix, incompatible_base))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any, limit: int = 40) -> str:
    """``value`` for a message, cut short (it comes from an untrusted file)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the JSON names {key!r} twice")
        out[key] = value
    return out


def _not_json(constant: str) -> Any:
    raise ValueError(f"the JSON holds {constant}, which JSON does not allow")


def parse_json(data: bytes, what: str) -> Any:
    """Strict JSON of an untrusted file: UTF-8, no duplicate keys, no NaN/Infinity; ValueError naming ``what``."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON ({str(e)[:200]})") from None


def _check_tensor_entry(name: str, meta: Any, data_len: int) -> tuple[str, list[int], int, int]:
    """``(dtype, shape, start, end)`` of one header entry; ValueError naming what is wrong with it."""
    shown = _shown(name, 200)
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise ValueError(f"tensor {shown} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise ValueError(f"tensor {shown} has the unknown dtype {_shown(dtype)} (known: {', '.join(DTYPE_BITS)})")
    # NOTE(security): at most 16 dimensions below 2**64 (safetensors' own bound), so their product stays cheap
    if not isinstance(shape, list) or len(shape) > 16 or not all(_is_int(d) and 0 <= d < 2**64 for d in shape):
        raise ValueError(
            f"tensor {shown} has the shape {_shown(shape, 80)}, not a list of at most 16 non-negative integers"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise ValueError(f"tensor {shown} has data_offsets {_shown(offsets, 80)}, not two integers")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise ValueError(f"tensor {shown} points past the end of the file or before its data (truncated?)")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - start:
        raise ValueError(
            f"tensor {shown} of shape {shape} and dtype {dtype} needs {bits // 8} bytes, but its "
            f"data_offsets hold {end - start}"
        )
    return dtype, shape, start, end


def read_safetensors_header(path: Path, *, max_tensors: int = MAX_TENSORS) -> dict[str, tuple[str, list[int]]]:
    """Name -> (dtype, shape) from the JSON header only (no tensor data is read), checked as safetensors checks
    it and more: ValueError naming the problem unless the header is at most ``MAX_HEADER_BYTES`` of strict JSON;
    holds at most ``max_tensors`` entries, each a known dtype, a shape of non-negative integers and two data
    offsets whose span is exactly the bytes that shape and dtype need; the spans tile the data with no gap,
    overlap or byte left over; and ``__metadata__`` maps strings to strings."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file is shorter than a safetensors header")
        n = int.from_bytes(raw, "little")
        size = os.fstat(f.fileno()).st_size
        if n <= 0 or n > size - 8:
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"its header takes {n} bytes, over hub_peft's limit of {MAX_HEADER_BYTES}")
        header = parse_json(f.read(n), "its header")
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("its __metadata__ is not a map of strings to strings")
    if len(header) > max_tensors:
        raise ValueError(f"it holds {len(header)} tensors, over hub_peft's limit of {max_tensors}")
    data_len = size - 8 - n
    out, spans = {}, []
    for name, meta in header.items():
        dtype, shape, start, end = _check_tensor_entry(name, meta, data_len)
        out[name] = (dtype, list(shape))
        spans.append((start, end, name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            raise ValueError(
                f"tensor {_shown(name, 200)} "
                + (
                    "overlaps the tensor before it"
                    if start < at
                    else f"starts {start - at} bytes after the end of the one before it"
                )
            )
        at = end
    if at != data_len:
        raise ValueError(f"{data_len - at} bytes after the last tensor belong to no tensor")
    return out


def _module_shapes(base_config: Any, auto_class: str = "AutoModelForCausalLM") -> dict[str, tuple[int, int]]:
    """(in, out) features of every Linear in a model built by ``auto_class`` from ``base_config`` on the
    meta device; raises ValueError when that Auto class cannot build this config."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(base_config)
    return {
        name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def embedding_modules(base_config: Any) -> tuple[tuple[str, ...], int] | None:
    """The names of the input and output embedding modules of a causal LM built from ``base_config`` (on the
    meta device) and its vocabulary size (rows of the input embeddings); None for a model it cannot build."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base_config)
    except Exception:  # not a causal LM transformers can build: nothing to compare
        return None
    names = {id(m): name for name, m in model.named_modules()}
    found = [
        names[id(m)]
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None and id(m) in names
    ]
    embeddings = model.get_input_embeddings()
    if not found or not hasattr(embeddings, "num_embeddings"):
        return None
    return tuple(found), int(embeddings.num_embeddings)


def vocabulary_rows(tensors: dict[str, tuple[str, list[int]]], modules: tuple[str, ...]) -> dict[str, int]:
    """Tensor name -> vocabulary size it was made for, for the adapter tensors of the embedding ``modules``
    that hold one row (or column) per token: whole layers (``modules_to_save``, PEFT's saved base layers),
    LoRA's ``lora_embedding_A`` on the input embeddings and ``lora_B`` on the output head."""
    out = {}
    for name, (_, shape) in tensors.items():
        stem = name.removeprefix("base_model.model.")
        module = next((m for m in modules if stem.startswith(f"{m}.")), None)
        if module is None or len(shape) != 2:
            continue
        rest = stem[len(module) + 1 :].split(".")
        if rest[0] == "lora_embedding_A":
            out[name] = shape[1]  # [r, vocab]
        elif rest[-1] == "weight" and rest[0] in (
            "weight",
            "lora_B",
            "modules_to_save",
            "base_layer",
            "original_module",
        ):
            out[name] = shape[0]  # [vocab, hidden] and lora_B [vocab, r]
    return out


def _check_vocabulary(report: Report, base_config: Any, base_name: str) -> bool:
    """An adapter trained after tokens were added (and the embeddings resized) needs a base of that size;
    True when it does not fit (a problem was added)."""
    layout = embedding_modules(base_config)
    if layout is None:
        return False
    modules, vocab = layout
    wrong = {name: rows for name, rows in vocabulary_rows(report.tensors, modules).items() if rows != vocab}
    if not wrong:
        return False
    tensor, rows = next(iter(sorted(wrong.items())))
    saved = (report.folder / "tokenizer_config.json").is_file()
    tokenizer = (
        "the tokenizer saved with the adapter (AutoTokenizer.from_pretrained on the adapter)"
        if saved
        else "the tokenizer it was trained with, which holds the added tokens"
    )
    made_for = report.config.get("base_model_name_or_path") or "its base model"
    report.add(
        f"{tensor} has {rows} token rows, but {base_name} has a vocabulary of {vocab}: this adapter was trained on "
        f"{made_for} with its embeddings resized to {rows} tokens (tokens were added to the tokenizer)",
        f"resize the base's embeddings to {rows} before loading it (base.resize_token_embeddings({rows})), and use "
        f"{tokenizer}",
        incompatible_base=True,
    )
    return True


def _check_shapes(report: Report, base_config: Any, base_name: str) -> None:
    from .tasks import task_of

    expected_base = report.config.get("base_model_name_or_path") or "unknown"
    task = task_of(report.config)
    try:  # the model the adapter wraps: the Auto class of its task type
        shapes = _module_shapes(base_config, task.auto_class)
    except ValueError:  # transformers: "Unrecognized configuration class ... for this kind of AutoModel"
        model_type = getattr(base_config, "model_type", None) or type(base_config).__name__
        report.add(
            f"this is a {task.task_type} adapter (a {task.what}, built with {task.auto_class}), but {base_name} is a "
            f"{model_type} model, which {task.auto_class} cannot build: it was made for {expected_base}",
            f"load it on {expected_base} with transformers.{task.auto_class}",
            incompatible_base=True,
        )
        return
    pattern = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
    for tensor, (_, shape) in report.tensors.items():
        m = pattern.match(tensor)
        if not m or m.group(1) not in shapes or len(shape) < 2:
            continue
        fan_in, fan_out = shapes[m.group(1)]
        got, want = (shape[1], fan_in) if m.group(2) == "lora_A" else (shape[0], fan_out)
        if got != want:
            report.add(
                f"{tensor} has shape {shape}, but {base_name} needs {want} there: this adapter was made for "
                f"{expected_base}, not {base_name}",
                f"load it on {expected_base}, or retrain it for {base_name}",
                incompatible_base=True,
            )
            return


def validate_adapter(
    folder: str | Path,
    *,
    for_engine: str | None = None,
    base_config: Any = None,
    base_name: str = "the given base model",
    max_bytes: int = MAX_SANE_BYTES,
) -> Report:
    """Validate an adapter folder; ``for_engine="vllm"`` also checks vLLM's LoRA contract. The folder is
    untrusted data: however malformed its files, each problem is a Problem of the report (with its fix), never
    an exception. ``max_bytes``: the largest adapter_model.safetensors taken."""
    folder = Path(folder)
    report = Report(folder)
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    pickles = sorted(p.name for p in (folder.iterdir() if folder.is_dir() else []) if p.suffix in PICKLE_SUFFIXES)
    if pickles and weights.is_file():
        report.warnings.append(
            f"{', '.join(pickles)} ignored: pickle files are never opened; {weights.name} is what loads"
        )
    elif pickles:
        report.add(
            f"only pickled weights ({', '.join(pickles)}), which hub_peft never unpickles",
            "if they are your own trusted files, convert them with `hub-peft convert-bin DIR`",
        )
    if not config_path.is_file():
        report.add("adapter_config.json is missing", "save the adapter with hub_peft.save_adapter or PEFT")
        return report
    if not _read_config(report, config_path):
        return report
    peft_type = str(report.config.get("peft_type", ""))
    reft_config = None
    if peft_type == "REFT":
        from .errors import InvalidInputError
        from .reft.config import ReftConfig

        try:
            reft_config = ReftConfig.from_dict(report.config)
        except (InvalidInputError, TypeError, ValueError) as e:
            report.add(f"adapter_config.json is not a valid ReFT config ({e})", "re-save the adapter with hub_peft")
    else:
        _check_peft_config(report, peft_type)
        try:
            from peft.config import PeftConfig

            PeftConfig.from_peft_type(**{k: v for k, v in report.config.items()})
        except Exception as e:  # peft raises KeyError/TypeError/ValueError for bad configs
            report.add(
                f"adapter_config.json does not parse as a {peft_type or 'PEFT'} config ({e!r})"[:2000],
                "check peft_type and the fields; known types: peft.PeftType and REFT",
            )
    if not weights.is_file():
        report.add("adapter_model.safetensors is missing", "save the weights with safe_serialization (the default)")
        return report
    size = weights.stat().st_size
    if size > max_bytes:
        report.add(
            f"adapter_model.safetensors takes {size / 2**20:.1f} MiB, over the limit of "
            f"{max_bytes / 2**20:.1f} MiB for one adapter",
            "use a smaller rank or fewer target modules, or raise the limit (max_bytes=) for an adapter you trust",
        )
        return report
    try:
        report.tensors = read_safetensors_header(weights)
    except (OSError, ValueError) as e:
        report.add(f"adapter_model.safetensors is corrupt or truncated ({e})", "re-save or re-download the adapter")
        return report
    if not report.tensors:
        report.add("adapter_model.safetensors holds no tensor", "an adapter holds at least one tensor: re-save it")
    bad = sorted({dt for dt, _ in report.tensors.values() if dt not in FLOAT_DTYPES})
    if bad and peft_type in ("LORA", "ADALORA", "IA3"):  # other methods also store index tensors
        report.add(f"unexpected tensor dtypes {bad}", "adapters store float32/float16/bfloat16 weights")
    _check_stray_tensors(report, peft_type)
    if peft_type == "LORA":
        _check_lora_ranks(report)
    resized = base_config is not None and reft_config is None and _check_vocabulary(report, base_config, base_name)
    if base_config is not None and peft_type in ("LORA", "ADALORA") and not resized:
        _check_shapes(report, base_config, base_name)
    if reft_config is not None:
        _check_reft(report, reft_config, base_config, base_name)
    if for_engine == "vllm":
        _check_vllm(report)
    elif for_engine not in (None, "vllm"):
        report.add(f"unknown engine {for_engine!r}", "use --for vllm")
    return report


def _read_config(report: Report, path: Path) -> bool:
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


def _check_peft_config(report: Report, peft_type: str) -> None:
    """Types and bounds of the fields PEFT acts on without checking them (it fails later, with a TypeError, or
    allocates whatever ``r`` says), and of the fields it reads as regexes or pastes into regexes."""
    from .targets import config_problems

    c = report.config
    for point, fix in config_problems(c):
        report.add(f"adapter_config.json: {point}", fix)
    lora = peft_type in ("LORA", "ADALORA")
    for name in ("r", "init_r", "target_r") if peft_type == "ADALORA" else ("r",):
        value, low = c.get(name), 1 if lora else 0  # OFT, for one, takes r=0
        if name in c and (value is not None or lora) and not (_is_int(value) and low <= value <= MAX_RANK):
            report.add(
                f"adapter_config.json: {name} is {_shown(value)}, not an integer from {low} to {MAX_RANK}",
                f"set {name} to the rank the adapter was trained with",
            )
    patterns = c.get("rank_pattern")
    if peft_type == "LORA" and isinstance(patterns, dict):
        wrong = next(((k, v) for k, v in patterns.items() if not (_is_int(v) and 1 <= v <= MAX_RANK)), None)
        if wrong:
            report.add(
                f"adapter_config.json: rank_pattern gives {_shown(wrong[0], 200)} the rank "
                f"{_shown(wrong[1])}, not an integer from 1 to {MAX_RANK}",
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
                f"adapter_config.json: lora_alpha is {_shown(alpha)}, not a finite number",
                "set lora_alpha to the value the adapter was trained with (the scale is lora_alpha / r)",
            )
        alphas = c.get("alpha_pattern")
        if isinstance(alphas, dict) and (wrong := next(((k, v) for k, v in alphas.items() if not _is_number(v)), None)):
            report.add(
                f"adapter_config.json: alpha_pattern gives {_shown(wrong[0], 200)} the alpha "
                f"{_shown(wrong[1])}, not a finite number",
                "set each alpha_pattern entry to a number",
            )
    layers = c.get("layers_to_transform")
    if layers is not None and not (
        (_is_int(layers) and layers >= 0) or (isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers))
    ):
        report.add(
            f"adapter_config.json: layers_to_transform is {_shown(layers)}, not a layer index or a list of them",
            "write layers_to_transform as a list of layer indices, e.g. [0, 1]",
        )


def _check_stray_tensors(report: Report, peft_type: str) -> None:
    """Weights that belong to no module ``target_modules`` names (LoRA, AdaLoRA, IA3): a module's path, or a
    dotted part of it, must be an entry of the list (or of ``modules_to_save``), or the full path must
    full-match the regex; that regex is matched with a bound (an untrusted adapter holds it)."""
    from .errors import InvalidInputError
    from .targets import ALL_LINEAR, BoundedMatcher, list_matches

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


def _check_lora_ranks(report: Report) -> None:
    """Each LoRA weight's rank (lora_A's rows, lora_B's columns) must be the rank the config gives its module: ``r``
    or its ``rank_pattern`` entry, found as PEFT finds it. PEFT builds the config's rank before it loads the
    weights: ``r: 3000000`` over rank-4 weights would take 768 MB per matrix of a 64-wide model before failing,
    and the engine, which reads the weights, would serve it as a silent no-op."""
    from .errors import InvalidInputError
    from .targets import pattern_lookup

    c = report.config
    r, patterns = c.get("r", 8), c.get("rank_pattern") or {}
    if not _is_int(r) or not isinstance(patterns, dict) or not all(_is_int(v) and v > 0 for v in patterns.values()):
        return  # reported by _check_peft_config
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


def check_targets_in_base(report: Report, base_config: Any, base_name: str) -> None:
    """Add a problem when adapter weights belong to modules the base does not have (``hub-peft validate --base``):
    each weight's module is the longest path before it that ``target_modules`` names (PEFT's rule). Names in
    ``target_modules`` that match nothing but hold no weights are left alone, as PEFT loads those adapters.
    The base is built from its config on the meta device, by the Auto class of the adapter's task type."""
    from .errors import InvalidInputError
    from .targets import adapted_modules, base_module_names
    from .tasks import task_of

    targets = report.config.get("target_modules")
    if (
        str(report.config.get("peft_type")) == "REFT"
        or not targets
        or not isinstance(targets, (str, list))
        or (isinstance(targets, list) and not all(isinstance(t, str) for t in targets))
    ):
        return
    built = base_module_names(base_config, task_of(report.config).auto_class)
    if built is None:
        return  # _check_shapes says the base cannot be built for this task type
    names, linear = built
    try:  # a regex target_modules is matched with a bound
        adapted = adapted_modules(report.tensors, targets)
    except InvalidInputError as e:
        if not any(p.point == str(e).partition(" Fix: ")[0] for p in report.problems):  # said once
            report.add(str(e).partition(" Fix: ")[0], "list the module names in target_modules")
        return
    absent = {path: target for path, target in adapted.items() if path not in names}
    if absent:
        made_for = report.config.get("base_model_name_or_path") or "unknown"
        report.add(
            f"target module(s) {', '.join(dict.fromkeys(absent.values()))} are not in {base_name} (its linear "
            f"layers: {linear}): {len(absent)} adapted module(s) such as {next(iter(absent))} have nothing to "
            f"load into; this adapter was made for {made_for}",
            f"load it on {made_for}, or retrain it for {base_name} (hub-peft train --target-modules all-linear)",
            incompatible_base=True,
        )


def _check_reft(report: Report, config: Any, base_config: Any, base_name: str) -> None:
    expected = config.tensor_shapes()
    found = {name: shape for name, (_, shape) in report.tensors.items()}
    if set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        report.add(
            f"the ReFT weights do not match the config (missing {missing[:3]}, unexpected {extra[:3]})",
            "re-save the adapter with hub_peft; config and weights must come from the same model",
        )
        return
    wrong = [n for n in expected if expected[n] != found[n]]
    if wrong:
        report.add(
            f"{wrong[0]} has shape {found[wrong[0]]}, the config says {expected[wrong[0]]}",
            "re-save the adapter with hub_peft",
        )
    if base_config is None:
        return
    text = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    hidden, n_layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    made_for = config.base_model_name_or_path or "unknown"
    if hidden is not None and hidden != config.hidden_size:
        report.add(
            f"this ReFT adapter edits {config.hidden_size}-dim hidden states, but {base_name} has "
            f"hidden size {hidden}: it was made for {made_for}",
            f"load it on {made_for}",
            incompatible_base=True,
        )
    elif n_layers is not None and config.layers[-1] >= n_layers:
        report.add(
            f"this ReFT adapter intervenes on layer {config.layers[-1]}, but {base_name} has {n_layers} "
            f"layers: it was made for {made_for}",
            f"load it on {made_for}",
            incompatible_base=True,
        )


def lora_ranks(config: dict) -> list:
    """A LoRA config's ranks: ``r`` and every ``rank_pattern`` override."""
    patterns = config.get("rank_pattern")
    return [config.get("r", 0), *(patterns.values() if isinstance(patterns, dict) else [])]


def _check_vllm(report: Report) -> None:
    """vLLM's LoRA contract, rule for rule as vLLM 0.32 decides it: ``PEFTHelper.validate_legal`` (config
    features) and ``LoRAModel.from_local_checkpoint`` (every tensor name must parse as a LoRA weight of a
    module vLLM can wrap). Decided by the tensors present, not by ``target_modules`` (vLLM's "source of
    truth"). ``tests/test_vllm.py`` checks these verdicts against vLLM itself."""
    c = report.config
    if c.get("peft_type") != "LORA":
        report.add(
            f"peft_type is {c.get('peft_type')}; vLLM serves only LoRA adapters",
            "serve it with `hub-peft serve`, which runs every adapter type",
        )
        return
    retrain = "serve it with `hub-peft serve`, or retrain it as a plain LoRA"
    unsupported_features = {
        "use_dora": "DoRA (use_dora)",
        "lora_bias": "LoRA bias (lora_bias)",
        "use_qalora": "QALoRA (use_qalora)",
        "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
        "layer_replication": "layer_replication",
        "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    }
    for key, what in unsupported_features.items():
        if c.get(key):
            report.add(f"vLLM does not support {what}", retrain)
    init = c.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        report.add(
            f"init_lora_weights is {init!r}: PEFT changes the base weights when it loads this adapter, vLLM does not",
            "convert it to a plain LoRA with PEFT's "
            "path_initial_model_for_weight_conversion, or serve it with `hub-peft serve`",
        )
    extra = [m for m in c.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if extra:
        report.add(f"modules_to_save is {extra}; vLLM takes only classifier/score heads there", retrain)
    if c.get("bias", "none") != "none":
        report.add(f"bias is {c.get('bias')!r}; vLLM needs 'none'", "retrain with bias='none'")
    ranks = lora_ranks(c)
    if any(not isinstance(r, int) or r <= 0 for r in ranks):
        report.add(f"ranks {ranks} include one that is not a positive integer", "fix r / rank_pattern")
    elif max(ranks) > VLLM_MAX_RANK:
        report.add(f"rank {max(ranks)} exceeds vLLM's maximum {VLLM_MAX_RANK}", f"retrain with r <= {VLLM_MAX_RANK}")
    if c.get("trainable_token_indices") or any("trainable_tokens" in t for t in report.tensors):
        report.add(
            "the adapter trains token embeddings (trainable_token_indices), which vLLM cannot load",
            "serve it with `hub-peft serve`",
        )
    modules, odd = set(), []
    for name in report.tensors:
        if "base_layer" in name or "trainable_tokens" in name:  # saved base embeddings: vLLM skips them
            continue  # (trainable tokens are reported above)
        m = VLLM_TENSOR.match(name)
        if m:
            modules.add(m.group(1).rsplit(".", 1)[-1])
        else:
            odd.append(name)
    if odd:
        report.add(f"tensors {odd[:3]} are not LoRA weights vLLM can parse", "keep only lora_A/lora_B weights")
    unsupported = sorted(modules - VLLM_TARGETS)
    if unsupported:
        report.add(f"LoRA on {unsupported}: not modules vLLM's LoRA wraps", f"target only {sorted(VLLM_TARGETS)}")
    if (report.folder / "added_tokens.json").is_file():
        report.warnings.append("vLLM ignores added_tokens.json: serve it with a base tokenizer that has those tokens")
