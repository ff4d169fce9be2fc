"""Adapter folder tools for the CLI: a summary of an adapter, and converting one's own trusted ``.bin`` weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cards import CardInfo
from ..errors import NotFoundError, UnsafeFileError
from ..validate import validate_adapter
from .specs import WEIGHTS_NAME


def adapter_info(folder: Path) -> dict[str, Any]:
    """Type, base model, trainable parameters, size and files of an adapter folder."""
    report = validate_adapter(folder)
    info = CardInfo.load(folder)
    n_params = 0
    for _, shape in report.tensors.values():
        count = 1
        for d in shape:
            count *= d
        n_params += count
    return {
        "type": report.config.get("peft_type"),
        "base_model": info.base.get("hub_id") or report.config.get("base_model_name_or_path"),
        "trainable_parameters": info.params.get("trainable") or n_params,
        "stored_parameters": n_params,
        "size_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
        "valid": report.ok,
        "problems": [str(p) for p in report.problems],
        "warnings": report.warnings,
    }


def convert_bin(folder: str | Path) -> Path:
    """Convert one's own *trusted* ``adapter_model.bin`` to safetensors (weights_only unpickling)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    src = folder / "adapter_model.bin"
    if not src.is_file():
        raise NotFoundError(f"{src} does not exist.")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnsafeFileError(f"{src} holds more than plain tensors; refusing to unpickle it ({e}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeFileError(f"{src} is not a flat dict of tensors.")
    out = folder / WEIGHTS_NAME
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out)
    return out
