"""Native ReFT (representation fine-tuning): interventions on hidden states via forward hooks.

A reader can follow it in three files: ``config.py`` (what and where), ``interventions.py`` (the
formulas) and ``model.py`` (hooks, positions, generate, files). Training lives with the other loops:
:func:`hub_peft.training.train_reft` (``training/reft_loop.py``, ``training/reft_cache.py``).
"""

from ..modeling import find_decoder_layers
from .config import INTERVENTIONS, ReftConfig
from .interventions import Intervention
from .model import ReftModel, prompt_positions


def get_reft_model(base, config: ReftConfig) -> ReftModel:
    """Wrap ``base`` (a transformers model, 4-bit or not, or a PeftModel) with fresh trainable interventions."""
    model = ReftModel(base, config)
    model.interventions.requires_grad_(True)
    return model


__all__ = [
    "INTERVENTIONS",
    "Intervention",
    "ReftConfig",
    "ReftModel",
    "find_decoder_layers",
    "get_reft_model",
    "prompt_positions",
]
