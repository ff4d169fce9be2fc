"""Check an adapter folder: files, safetensors header, config, tensor names and shapes, vLLM contract."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_SANE_BYTES = 4 * 2**30
VLLM_MAX_RANK = 512
# vLLM 0.32: the linear layers of its decoder models (packed and unpacked names) and their embedding_modules
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
                "embed_tokens", "lm_head"}  # fmt: skip
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


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Parse only the JSON header (no tensor data is read); raises ValueError if it is not safetensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("file is shorter than a safetensors header")
        n = int.from_bytes(raw, "little")
        size = path.stat().st_size
        if n <= 0 or n > min(size - 8, 100 * 2**20):
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = json.loads(f.read(n))
    out = {}
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        if not 0 <= start <= end <= data_len:
            raise ValueError(f"tensor {name!r} points past the end of the file (truncated?)")
        out[name] = (meta["dtype"], list(meta["shape"]))
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
    found = [names[id(m)] for m in (model.get_input_embeddings(), model.get_output_embeddings())
             if m is not None and id(m) in names]  # fmt: skip
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
        elif rest[-1] == "weight" and rest[0] in ("weight", "lora_B", "modules_to_save", "base_layer",
                                                  "original_module"):  # fmt: skip
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
    tokenizer = ("the tokenizer saved with the adapter (AutoTokenizer.from_pretrained on the adapter)" if saved
                 else "the tokenizer it was trained with, which holds the added tokens")  # fmt: skip
    made_for = report.config.get("base_model_name_or_path") or "its base model"
    report.add(
        f"{tensor} has {rows} token rows, but {base_name} has a vocabulary of {vocab}: this adapter was trained on "
        f"{made_for} with its embeddings resized to {rows} tokens (tokens were added to the tokenizer)",
        f"resize the base's embeddings to {rows} before loading it (base.resize_token_embeddings({rows})), and use "
        f"{tokenizer}", incompatible_base=True,
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
            f"load it on {expected_base} with transformers.{task.auto_class}", incompatible_base=True,
        )
        return
    pattern = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
    for tensor, (_, shape) in report.tensors.items():
        m = pattern.match(tensor)
        if not m or m.group(1) not in shapes:
            continue
        fan_in, fan_out = shapes[m.group(1)]
        got, want = (shape[1], fan_in) if m.group(2) == "lora_A" else (shape[0], fan_out)
        if got != want:
            report.add(
                f"{tensor} has shape {shape}, but {base_name} needs {want} there: this adapter was made for "
                f"{expected_base}, not {base_name}",
                f"load it on {expected_base}, or retrain it for {base_name}", incompatible_base=True,
            )
            return


def validate_adapter(folder: str | Path, *, for_engine: str | None = None, base_config: Any = None,
                     base_name: str = "the given base model") -> Report:  # fmt: skip
    """Validate an adapter folder; ``for_engine="vllm"`` also checks vLLM's LoRA contract."""
    folder = Path(folder)
    report = Report(folder)
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    pickles = sorted(p.name for p in (folder.iterdir() if folder.is_dir() else []) if p.suffix in PICKLE_SUFFIXES)
    if pickles and weights.is_file():
        report.warnings.append(f"{', '.join(pickles)} ignored: pickle files are never opened; "
                               f"{weights.name} is what loads")  # fmt: skip
    elif pickles:
        report.add(f"only pickled weights ({', '.join(pickles)}), which hub_peft never unpickles",
                   "if they are your own trusted files, convert them with `hub-peft convert-bin DIR`")  # fmt: skip
    if not config_path.is_file():
        report.add("adapter_config.json is missing", "save the adapter with hub_peft.save_adapter or PEFT")
        return report
    try:
        report.config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        report.add(f"adapter_config.json is not valid JSON ({e})", "re-save the adapter")
        return report
    peft_type = str(report.config.get("peft_type", ""))
    reft_config = None
    if peft_type == "REFT":
        from .errors import InvalidInputError
        from .reft.config import ReftConfig

        try:
            reft_config = ReftConfig.from_dict(report.config)
        except (InvalidInputError, TypeError) as e:
            report.add(f"adapter_config.json is not a valid ReFT config ({e})", "re-save the adapter with hub_peft")
    else:
        try:
            from peft.config import PeftConfig

            PeftConfig.from_peft_type(**{k: v for k, v in report.config.items()})
        except Exception as e:  # peft raises KeyError/TypeError/ValueError for bad configs
            report.add(f"adapter_config.json does not parse as a {peft_type or 'PEFT'} config ({e!r})",
                       "check peft_type and the fields; known types: peft.PeftType and REFT")  # fmt: skip
    if not weights.is_file():
        report.add("adapter_model.safetensors is missing", "save the weights with safe_serialization (the default)")
        return report
    try:
        report.tensors = read_safetensors_header(weights)
    except (ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
        report.add(f"adapter_model.safetensors is corrupt or truncated ({e})", "re-save or re-download the adapter")
        return report
    size = weights.stat().st_size
    if not report.tensors or size > MAX_SANE_BYTES:
        report.add(f"adapter_model.safetensors holds {len(report.tensors)} tensors in {size} bytes",
                   "an adapter should hold at least one tensor and be well under 4 GiB")  # fmt: skip
    bad = sorted({dt for dt, _ in report.tensors.values() if dt not in FLOAT_DTYPES})
    if bad and peft_type in ("LORA", "ADALORA", "IA3"):  # other methods also store index tensors
        report.add(f"unexpected tensor dtypes {bad}", "adapters store float32/float16/bfloat16 weights")
    targets = report.config.get("target_modules")
    # target_parameters (LoRA on fused MoE expert weights) puts tensors under the modules holding those
    # parameters, which only the model can name: PEFT checks those when it loads
    if isinstance(targets, list) and targets and peft_type in ("LORA", "ADALORA", "IA3") \
            and not report.config.get("target_parameters"):  # fmt: skip
        extra = set(report.config.get("modules_to_save") or [])
        wanted = [f".{t}." for t in [*targets, *extra]]  # names may be short ("q_proj") or dotted paths
        stray = [t for t in report.tensors if not any(w in f".{t}" for w in wanted)]
        if stray:
            report.add(f"{len(stray)} tensors match no target module, e.g. {stray[0]}",
                       "the config's target_modules must name the modules the weights belong to")  # fmt: skip
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


def check_targets_in_base(report: Report, base_config: Any, base_name: str) -> None:
    """Add a problem when adapter weights belong to modules the base does not have (``hub-peft validate --base``):
    each weight's module is the longest path before it that ``target_modules`` names (PEFT's rule). Names in
    ``target_modules`` that match nothing but hold no weights are left alone, as PEFT loads those adapters.
    The base is built from its config on the meta device, by the Auto class of the adapter's task type."""
    from .targets import adapted_modules, base_module_names
    from .tasks import task_of

    targets = report.config.get("target_modules")
    if str(report.config.get("peft_type")) == "REFT" or not targets or not isinstance(targets, (str, list)):
        return
    built = base_module_names(base_config, task_of(report.config).auto_class)
    if built is None:
        return  # _check_shapes says the base cannot be built for this task type
    names, linear = built
    absent = {path: target for path, target in adapted_modules(report.tensors, targets).items() if path not in names}
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
        report.add(f"the ReFT weights do not match the config (missing {missing[:3]}, unexpected {extra[:3]})",
                   "re-save the adapter with hub_peft; config and weights must come from the same model")  # fmt: skip
        return
    wrong = [n for n in expected if expected[n] != found[n]]
    if wrong:
        report.add(f"{wrong[0]} has shape {found[wrong[0]]}, the config says {expected[wrong[0]]}",
                   "re-save the adapter with hub_peft")  # fmt: skip
    if base_config is None:
        return
    text = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    hidden, n_layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    made_for = config.base_model_name_or_path or "unknown"
    if hidden is not None and hidden != config.hidden_size:
        report.add(f"this ReFT adapter edits {config.hidden_size}-dim hidden states, but {base_name} has "
                   f"hidden size {hidden}: it was made for {made_for}", f"load it on {made_for}",
                   incompatible_base=True)  # fmt: skip
    elif n_layers is not None and config.layers[-1] >= n_layers:
        report.add(f"this ReFT adapter intervenes on layer {config.layers[-1]}, but {base_name} has {n_layers} "
                   f"layers: it was made for {made_for}", f"load it on {made_for}", incompatible_base=True)  # fmt: skip


def lora_ranks(config: dict) -> list:
    """A LoRA config's ranks: ``r`` and every ``rank_pattern`` override."""
    return [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]


def _check_vllm(report: Report) -> None:
    """vLLM's LoRA contract, rule for rule as vLLM 0.32 decides it: ``PEFTHelper.validate_legal`` (config
    features) and ``LoRAModel.from_local_checkpoint`` (every tensor name must parse as a LoRA weight of a
    module vLLM can wrap). Decided by the tensors present, not by ``target_modules`` (vLLM's "source of
    truth"). ``tests/test_vllm.py`` checks these verdicts against vLLM itself."""
    c = report.config
    if c.get("peft_type") != "LORA":
        report.add(f"peft_type is {c.get('peft_type')}; vLLM serves only LoRA adapters",
                   "serve it with `hub-peft serve`, which runs every adapter type")  # fmt: skip
        return
    retrain = "serve it with `hub-peft serve`, or retrain it as a plain LoRA"
    unsupported_features = {
        "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA bias (lora_bias)", "use_qalora": "QALoRA (use_qalora)",
        "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
        "layer_replication": "layer_replication", "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    }  # fmt: skip
    for key, what in unsupported_features.items():
        if c.get(key):
            report.add(f"vLLM does not support {what}", retrain)
    init = c.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        report.add(f"init_lora_weights is {init!r}: PEFT changes the base weights when it loads this adapter, "
                   "vLLM does not", "convert it to a plain LoRA with PEFT's "
                   "path_initial_model_for_weight_conversion, or serve it with `hub-peft serve`")  # fmt: skip
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
        report.add("the adapter trains token embeddings (trainable_token_indices), which vLLM cannot load",
                   "serve it with `hub-peft serve`")  # fmt: skip
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
