"""Save, push, fetch and load adapters in hub_peft's one repo format.

A folder is exactly what PEFT writes (``adapter_config.json`` + ``adapter_model.safetensors``) plus
a generated ``README.md`` card, ``hub_peft_card.json`` (the card's inputs) and an optional
``loss_curve.png``, so plain ``PeftModel.from_pretrained(base, repo_id)`` loads it unchanged.

The package, by step: specs.py (names and the adapter spec syntax), save.py, push.py, resolve.py (find and download),
load.py (check and load onto a base), tools.py (CLI helpers). Import the public names from here.
"""

from __future__ import annotations

from .load import check_adapter_folder, fetch_adapter, load_adapter, load_adapters, peft_config_of
from .push import push_adapter
from .resolve import PICKLE_GLOBS, ResolvedAdapter, content_digest, resolve_adapter
from .save import data_summary, save_adapter
from .specs import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_dataset_id,
    check_repo_id,
    check_subfolder,
    parse_adapter_spec,
    parse_hub_spec,
)
from .tools import adapter_info, convert_bin

__all__ = [
    "CONFIG_NAME",
    "PICKLE_GLOBS",
    "WEIGHTS_NAME",
    "ResolvedAdapter",
    "adapter_info",
    "check_adapter_folder",
    "check_dataset_id",
    "check_repo_id",
    "check_subfolder",
    "content_digest",
    "convert_bin",
    "data_summary",
    "fetch_adapter",
    "load_adapter",
    "load_adapters",
    "parse_adapter_spec",
    "parse_hub_spec",
    "peft_config_of",
    "push_adapter",
    "resolve_adapter",
    "save_adapter",
]
