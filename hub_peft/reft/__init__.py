"""Native ReFT (representation fine-tuning): interventions on hidden states via forward hooks.

A reader can follow it in four files: ``config.py`` (what and where), ``interventions.py`` (the
formulas), ``model.py`` (hooks, positions, generate, files) and ``trainer.py`` (fast training).
"""

from ..modeling import find_decoder_layers
from ..optimize import Example, TrainResult, encode_examples
from .config import INTERVENTIONS, ReftConfig
from .interventions import Intervention
from .model import ReftModel, prompt_positions
from .trainer import train_reft


def get_reft_model(base, config: ReftConfig) -> ReftModel:
    """Wrap ``base`` (a transformers model, 4-bit or not, or a PeftModel) with fresh trainable interventions."""
    model = ReftModel(base, config)
    model.interventions.requires_grad_(True)
    return model


__all__ = [
    "INTERVENTIONS",
    "Example",
    "Intervention",
    "ReftConfig",
    "ReftModel",
    "TrainResult",
    "encode_examples",
    "find_decoder_layers",
    "get_reft_model",
    "prompt_positions",
    "train_reft",
]
