"""Check an adapter folder: files, safetensors header, config, tensor names and shapes, vLLM contract.

:func:`validate_adapter` runs the checks, which live by subject: header.py (the safetensors header), config.py
(adapter_config.json against itself and the weights), base.py (against a base model's config), vllm.py (vLLM's
LoRA contract); each adds its problems to a :class:`Report` (report.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, NotFoundError
from ..limits import MAX_SANE_BYTES
from .base import (
    check_reft,
    check_shapes,
    check_targets_in_base,
    check_vocabulary,
    embedding_modules,
    vocabulary_rows,
)
from .config import LORA_TENSOR, check_lora_ranks, check_peft_config, check_stray_tensors, read_config
from .header import DTYPE_BITS, FLOAT_DTYPES, parse_json, read_safetensors_header
from .llamacpp import NEEDS_BASE, check_llamacpp, llamacpp_layout, read_base_config
from .report import Problem, Report
from .vllm import VLLM_INITS, VLLM_MAX_RANK, VLLM_TARGETS, VLLM_TENSOR, check_vllm, lora_ranks

ENGINES = ("vllm", "llama.cpp")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def validate_adapter(
    folder: str | Path,
    *,
    for_engine: str | None = None,
    base_config: Any = None,
    base_name: str = "the given base model",
    max_bytes: int = MAX_SANE_BYTES,
    parse_with_peft: bool = True,
) -> Report:
    """Validate an adapter folder; ``for_engine="vllm"`` (``"llama.cpp"``) also checks vLLM's (llama.cpp's) LoRA
    contract; llama.cpp's needs the base's config (``base_config``, else read from ``base_model_name_or_path``).
    The folder is untrusted data: however malformed its files, each problem is a Problem of the report (with its
    fix), never an exception. ``max_bytes``: the largest adapter_model.safetensors taken. ``parse_with_peft=False``
    skips PEFT's own parse of the config (and its import, seconds), for tools that read the fields they use."""
    folder = Path(folder)
    report = Report(folder)
    config_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    _check_pickles(report, weights)
    if not config_path.is_file():
        report.add("adapter_config.json is missing", "save the adapter with hub_peft.save_adapter or PEFT")
        return report
    if not read_config(report, config_path):
        return report
    peft_type = str(report.config.get("peft_type", ""))
    reft_config = _reft_config(report) if peft_type == "REFT" else None
    if peft_type != "REFT":
        _check_peft_config_parses(report, peft_type, parse_with_peft)
    if not _read_weights(report, weights, max_bytes):
        return report
    bad = sorted({dt for dt, _ in report.tensors.values() if dt not in FLOAT_DTYPES})
    if bad and peft_type in ("LORA", "ADALORA", "IA3"):  # other methods also store index tensors
        report.add(f"unexpected tensor dtypes {bad}", "adapters store float32/float16/bfloat16 weights")
    check_stray_tensors(report, peft_type)
    if peft_type == "LORA":
        check_lora_ranks(report)
    resized = base_config is not None and reft_config is None and check_vocabulary(report, base_config, base_name)
    if base_config is not None and peft_type in ("LORA", "ADALORA") and not resized:
        check_shapes(report, base_config, base_name)
    if reft_config is not None:
        check_reft(report, reft_config, base_config, base_name)
    if for_engine == "vllm":
        check_vllm(report)
    elif for_engine == "llama.cpp":
        check_llamacpp(report, base_config if base_config is not None else _named_base_config(report.config))
    elif for_engine is not None:
        report.add(f"unknown engine {for_engine!r}", f"use --for {' or --for '.join(ENGINES)}")
    return report


def _check_pickles(report: Report, weights: Path) -> None:
    """Pickle files are never opened: a warning beside a safetensors file, a problem when they are all there is."""
    folder = report.folder
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


def _reft_config(report: Report) -> Any:
    """The ReftConfig of ``report.config``, or None (with a problem) when it is not a valid one."""
    from ..reft.config import ReftConfig

    try:
        return ReftConfig.from_dict(report.config)
    except (InvalidInputError, TypeError, ValueError) as e:
        report.add(f"adapter_config.json is not a valid ReFT config ({e})", "re-save the adapter with hub_peft")
        return None


def _check_peft_config_parses(report: Report, peft_type: str, parse_with_peft: bool = True) -> None:
    """The fields' types and bounds (see config.py), then PEFT's own parse of the config."""
    check_peft_config(report, peft_type)
    if not parse_with_peft:
        return
    try:
        from peft.config import PeftConfig

        PeftConfig.from_peft_type(**{k: v for k, v in report.config.items()})
    except Exception as e:  # peft raises KeyError/TypeError/ValueError for bad configs
        report.add(
            f"adapter_config.json does not parse as a {peft_type or 'PEFT'} config ({e!r})"[:2000],
            "check peft_type and the fields; known types: peft.PeftType and REFT",
        )


def _read_weights(report: Report, weights: Path, max_bytes: int) -> bool:
    """Read the weights' safetensors header into ``report.tensors``; False (with a problem) when the file is
    missing, over ``max_bytes`` or its header is not valid, so that the checks of the tensors cannot run."""
    if not weights.is_file():
        report.add("adapter_model.safetensors is missing", "save the weights with safe_serialization (the default)")
        return False
    size = weights.stat().st_size
    if size > max_bytes:
        report.add(
            f"adapter_model.safetensors takes {size / 2**20:.1f} MiB, over the limit of "
            f"{max_bytes / 2**20:.1f} MiB for one adapter",
            "use a smaller rank or fewer target modules, or raise the limit (max_bytes=) for an adapter you trust",
        )
        return False
    try:
        report.tensors = read_safetensors_header(weights)
    except (OSError, ValueError) as e:
        report.add(f"adapter_model.safetensors is corrupt or truncated ({e})", "re-save or re-download the adapter")
        return False
    if not report.tensors:
        report.add("adapter_model.safetensors holds no tensor", "an adapter holds at least one tensor: re-save it")
    return True


def card_facts(folder: str | Path, base_config: Any = None) -> dict[str, Any]:
    """What a model card states that takes validating the adapter, as :func:`hub_peft.cards.write_card`'s keyword
    arguments: ``verdicts`` (engine -> the problems that keep it
    from serving the adapter, ``[]`` when it does, None when it could not be checked) and ``tensors`` (the
    weights' header, ``{}`` when it cannot be read). llama.cpp's verdict needs the base's config: ``base_config``,
    else one found without the network (a local folder, the embedded base, the Hub cache). The card renders
    these facts; it never validates."""
    report = validate_adapter(folder, for_engine="vllm")
    tensors = report.tensors
    if not tensors:  # the checks stopped before the header (an over-large file, say): the card reads it anyway
        try:
            tensors = read_safetensors_header(Path(folder) / "adapter_model.safetensors")
        except (OSError, ValueError, KeyError):
            tensors = {}
    verdicts: dict[str, list[str] | None] = {"vllm": [p.point for p in report.problems]}
    if base_config is None:
        base_config = _named_base_config(report.config, local_only=True)
    layout = llamacpp_layout(report.config, list(tensors), base_config) if report.config and tensors else None
    problems = None if layout is None else [point for point, _ in layout.problems]
    verdicts["llama.cpp"] = None if problems and problems[-1] == NEEDS_BASE else problems  # None: not decided
    return {"verdicts": verdicts, "tensors": tensors}


def _named_base_config(config: dict, *, local_only: bool = False) -> Any:
    """The config of the base an adapter names (as llama.cpp's check reads it), or None when it cannot be read:
    the check then says it needs one."""
    name = config.get("base_model_name_or_path")
    try:
        return read_base_config(name, local_only=local_only) if isinstance(name, str) and name else None
    except (InvalidInputError, NotFoundError):
        return None


__all__ = [
    "DTYPE_BITS",
    "ENGINES",
    "FLOAT_DTYPES",
    "LORA_TENSOR",
    "MAX_SANE_BYTES",
    "PICKLE_SUFFIXES",
    "VLLM_INITS",
    "VLLM_MAX_RANK",
    "VLLM_TARGETS",
    "VLLM_TENSOR",
    "Problem",
    "Report",
    "card_facts",
    "check_targets_in_base",
    "embedding_modules",
    "lora_ranks",
    "parse_json",
    "read_safetensors_header",
    "validate_adapter",
    "vocabulary_rows",
]
