"""Training: a small LoRA or ReFT adapter from prompt → response rows, the one path behind ``hub-peft train`` and
the Adapter Studio, with the defaults that make the emoji preset work in about a minute on a CPU.

- ``settings``: :class:`TrainSettings` (what to train), resolved once for a base model into the
  :class:`HyperParams` and :class:`Callbacks` every loop takes whole.
- ``run``: :func:`run_training`, check → split → train → evaluate → save.
- ``adapter``: :func:`train_adapter` (one adapter on a base) and :func:`save_trained` (the folder and its card).
- the loops: ``optimize`` (:func:`fit`, and the tokenized examples every loop shares), ``peft_loop``
  (transformers' ``Trainer``: LoRA, and ReFT over several processes), ``reft_loop`` with ``reft_cache``
  (hub_peft's exact cached ReFT trainer).
- ``queue``: the Studio's fair training queue and its split of the CPU cores.
- ``console``: ``hub-peft train``'s options and output.

NOTE: torch loads with the first name that needs it (see :data:`_LAZY`), so the CLI's parser stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes
from .run import Reporter, TrainingPlan, TrainingRun, plan_training, run_training
from .settings import DEFAULTS, METHODS, Callbacks, HyperParams, TrainSettings, planned_steps

_LAZY = {
    **dict.fromkeys(["EarlyStop", "Trained", "detach_adapter", "save_trained", "token_counter"], "adapter"),
    **dict.fromkeys(["train_adapter", "train_lora", "train_resolved", "validation_loss"], "adapter"),
    **dict.fromkeys(["Example", "TrainResult", "encode_examples", "fit"], "optimize"),
    **dict.fromkeys(["is_main_process", "train_with_trainer", "world_size"], "peft_loop"),
    "train_reft": "reft_loop",
    **dict.fromkeys(["Cores", "Job", "TrainingQueue"], "queue"),
}

if TYPE_CHECKING:
    from .adapter import (
        EarlyStop,
        Trained,
        detach_adapter,
        save_trained,
        token_counter,
        train_adapter,
        train_lora,
        train_resolved,
        validation_loss,
    )
    from .optimize import Example, TrainResult, encode_examples, fit
    from .peft_loop import is_main_process, train_with_trainer, world_size
    from .queue import Cores, Job, TrainingQueue
    from .reft_loop import train_reft


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "DEFAULTS",
    "METHODS",
    "Callbacks",
    "Cores",
    "EarlyStop",
    "Example",
    "HyperParams",
    "Job",
    "Reporter",
    "TrainResult",
    "TrainSettings",
    "Trained",
    "TrainingPlan",
    "TrainingQueue",
    "TrainingRun",
    "detach_adapter",
    "encode_examples",
    "fit",
    "is_main_process",
    "plan_training",
    "planned_steps",
    "run_training",
    "save_trained",
    "token_counter",
    "train_adapter",
    "train_lora",
    "train_reft",
    "train_resolved",
    "train_with_trainer",
    "validation_loss",
    "world_size",
]
