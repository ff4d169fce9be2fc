"""hub_peft: one Hub format for every adapter type, generated cards, native ReFT, multi-adapter serving."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes
from ._version import __version__ as __version__
from .errors import HubPeftError, IncompatibleAdapterError, InvalidInputError, NotFoundError, UnsafeFileError

_LAZY = {
    "load_base_model": "base_model",
    "DEFAULT_BASE": "base_model",
    "generate_reply": "chat",
    "start_local_hub": "hub",
    "save_adapter": "adapters",
    "push_adapter": "adapters",
    "load_adapter": "adapters",
    "validate_adapter": "validate",
    "ReftConfig": "reft",
    "ReftModel": "reft",
    "get_reft_model": "reft",
    "train_reft": "training",
    "TrainSettings": "training",
    "train_adapter": "training",
}

if TYPE_CHECKING:
    from .adapters import load_adapter, push_adapter, save_adapter
    from .base_model import DEFAULT_BASE, load_base_model
    from .chat import generate_reply
    from .hub import start_local_hub
    from .reft import ReftConfig, ReftModel, get_reft_model
    from .training import TrainSettings, train_adapter, train_reft
    from .validate import validate_adapter


# Heavy modules (torch, transformers) load on first use so `hub-peft hub serve` starts fast.
__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "DEFAULT_BASE",
    "HubPeftError",
    "IncompatibleAdapterError",
    "InvalidInputError",
    "NotFoundError",
    "ReftConfig",
    "ReftModel",
    "TrainSettings",
    "UnsafeFileError",
    "generate_reply",
    "get_reft_model",
    "load_adapter",
    "load_base_model",
    "push_adapter",
    "save_adapter",
    "start_local_hub",
    "train_adapter",
    "train_reft",
    "validate_adapter",
]
