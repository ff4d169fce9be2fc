"""Write a computed adapter (a merge, a conversion) as a hub_peft folder: config, weights, card, atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._atomic import atomic_dir
from ..cards import CardInfo, write_card

if TYPE_CHECKING:
    import torch


def write_adapter_folder(
    out_dir: str | Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    info: CardInfo,
    *,
    overwrite: bool = False,
    card: bool = True,
    base_config: Any = None,
) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``hub_peft_card.json`` and the ``README.md``
    card) in ``out_dir``, all or nothing. ``info.params`` is filled with the adapter's parameter count;
    ``base_config`` (the base's transformers config) lets the card give llama.cpp's verdict."""
    from safetensors.torch import save_file

    from ..validate import card_facts

    out_dir = Path(out_dir)
    if not info.params:
        info.params = {"trainable": sum(t.numel() for k, t in tensors.items() if ".base_layer." not in k)}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        info.save(tmp)
        if card:
            write_card(tmp, name=str(out_dir), **card_facts(tmp, base_config))
    return out_dir
