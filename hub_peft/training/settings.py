"""What to train (:class:`TrainSettings`), and the one set of hyper-parameters and callbacks every training loop
shares (:class:`HyperParams`, :class:`Callbacks`): the settings are resolved once for a base model and the
loops get those two objects whole."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InvalidInputError
from ..examples import MAX_TOKENS
from ..targets import ALL_LINEAR, parse_target_modules

METHODS = ("reft", "lora")
# NOTE(defaults): ReFT's epochs are where the emoji preset is learned per prompt: far fewer give every prompt the
# same emoji, far more drift back to words
DEFAULTS: dict[str, dict[str, Any]] = {
    "reft": {"rank": 4, "lr": 1e-2, "epochs": 30},
    "lora": {"rank": 8, "lr": 1e-2, "epochs": 15, "target_modules": ALL_LINEAR},
}


@dataclass(frozen=True)
class HyperParams:
    """How a loop optimizes: AdamW over shuffled mini-batches, ``lr`` decaying linearly to 0 over the planned
    steps (``schedule="linear"``, as transformers' Trainer) or constant; stops after ``epochs`` or once a
    step's loss is at most ``target_loss``."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 10
    weight_decay: float = 0.0
    schedule: str = "linear"
    target_loss: float | None = None
    seed: int = 0

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InvalidInputError(
                f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1 and lr ({self.lr}) > 0."
            )
        if self.schedule not in ("linear", "constant"):
            raise InvalidInputError(f"schedule must be 'linear' or 'constant', got {self.schedule!r}.")

    def record(self) -> dict[str, Any]:
        """The training arguments a result (and so the model card) records."""
        return {**asdict(self), "optimizer": "AdamW"}


@dataclass(frozen=True)
class Callbacks:
    """What a loop reports and asks while it runs. ``on_step`` gets each history entry ``{"step", "epoch",
    "loss", "seconds"}``; ``should_stop()`` cancels; ``on_epoch_end`` gets the epoch's last entry and may add
    to it (a validation loss)."""

    on_step: Callable[[dict[str, float]], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_epoch_end: Callable[[dict[str, float]], None] | None = None

    def step(self, entry: dict[str, float]) -> None:
        if self.on_step is not None:
            self.on_step(entry)

    def stopping(self) -> bool:
        return self.should_stop is not None and bool(self.should_stop())

    def epoch_end(self, entry: dict[str, float]) -> None:
        if self.on_epoch_end is not None:
            self.on_epoch_end(entry)


def with_overrides(
    hparams: HyperParams, callbacks: Callbacks | None, overrides: dict[str, Any]
) -> tuple[HyperParams, Callbacks]:
    """``hparams`` and ``callbacks`` with the fields named in ``overrides`` replaced (the keyword form of a
    public trainer, e.g. ``train_reft(model, examples, epochs=5, on_step=print)``)."""
    names = {f.name for f in dataclasses.fields(Callbacks)}
    hooks = {k: v for k, v in overrides.items() if k in names}
    hparams = dataclasses.replace(hparams, **{k: v for k, v in overrides.items() if k not in names})
    return hparams, dataclasses.replace(callbacks or Callbacks(), **hooks)


@dataclass
class TrainSettings:
    """What to train. ``None`` fields take the method's default (see :data:`DEFAULTS`)."""

    method: str = "reft"
    base: str | None = None  # Hub id or path; None = the embedded SmolLM2-135M-Instruct
    load_in_4bit: bool = False
    rank: int | None = None
    lr: float | None = None
    epochs: int | None = None
    layers: list[int] | None = None  # ReFT: None = about 27% and 53% of the depth (8 and 16 of 30)
    positions: str = "l1"  # ReFT
    batch_size: int = 10
    target_loss: float | None = None
    seed: int = 0
    max_tokens: int = MAX_TOKENS
    trainer: str = "auto"  # auto: the cached ReFT trainer in one process, transformers' Trainer otherwise
    early_stop: int | None = None  # with validation rows: stop after this many epochs without a better val loss
    # LoRA: "all-linear" (default), "peft-default" (PEFT's per-architecture list) or module names ("c_attn,c_proj")
    target_modules: str | list[str] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(f"method must be one of {list(METHODS)}, got {self.method!r}.")
        for name in ("rank", "epochs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}.")
        if self.early_stop is not None and (not isinstance(self.early_stop, int) or self.early_stop < 1):
            raise InvalidInputError(f"early_stop must be a positive number of epochs, got {self.early_stop!r}.")
        if self.trainer not in ("auto", "transformers"):
            raise InvalidInputError(f"trainer must be 'auto' or 'transformers', got {self.trainer!r}.")
        if self.lr is not None and not 0 < self.lr < 1:
            raise InvalidInputError(f"lr must be between 0 and 1, got {self.lr}.")
        if self.target_modules is not None:
            if self.method != "lora":
                raise InvalidInputError("target_modules is a LoRA setting; ReFT intervenes on whole layers (layers).")
            self.target_modules = parse_target_modules(self.target_modules)

    def resolved(self, n_layers: int) -> TrainSettings:
        """A copy with every default filled in for a base model with ``n_layers`` decoder layers."""
        values = {**asdict(self), **{k: v for k, v in DEFAULTS[self.method].items() if getattr(self, k) is None}}
        if self.method == "reft" and self.layers is None:
            values["layers"] = sorted({min(n_layers - 1, round(n_layers * f)) for f in (8 / 30, 16 / 30)})
        if self.method == "reft" and max(values["layers"]) >= n_layers:
            raise InvalidInputError(f"layers {values['layers']} do not exist in a {n_layers}-layer model.")
        return TrainSettings(**values)

    def hyper_params(self) -> HyperParams:
        """The loops' hyper-parameters (of :meth:`resolved` settings: every default filled in)."""
        if self.epochs is None or self.lr is None:
            raise InvalidInputError("hyper_params() needs resolved settings: call resolved(n_layers) first.")
        return HyperParams(
            epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, target_loss=self.target_loss, seed=self.seed
        )


def planned_steps(n_rows: int, settings: TrainSettings) -> int:
    """Steps a training of ``n_rows`` rows plans (the method's default epochs where ``settings`` has none)."""
    return (settings.epochs or DEFAULTS[settings.method]["epochs"]) * -(-n_rows // settings.batch_size)
