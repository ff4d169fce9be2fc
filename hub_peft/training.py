"""Train a small LoRA or ReFT adapter from prompt → response rows: the one entry point behind the
Space and ``hub-peft train``, with the defaults that make the emoji preset work in about a minute on a CPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._bnb import keep_4bit_trainable
from .errors import InvalidInputError
from .evaluation import Evaluation
from .examples import MAX_TOKENS
from .hf_trainer import train_with_trainer, world_size
from .optimize import Example, TrainResult, encode_examples, pad_batch, prompt_lengths, response_loss_sum
from .targets import ALL_LINEAR, describe, parse_target_modules, resolve_lora_targets

METHODS = ("reft", "lora")
DEFAULTS = {
    "reft": {"rank": 4, "lr": 1e-2, "epochs": 30},  # 15: the same emoji for every prompt; 60: words again
    "lora": {"rank": 8, "lr": 1e-2, "epochs": 15, "target_modules": ALL_LINEAR},
}


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


@dataclass
class Trained:
    model: Any  # a ReftModel or a peft PeftModel over the base
    tokenizer: Any
    result: TrainResult
    settings: TrainSettings
    template: str
    rows: list[dict[str, str]] = field(default_factory=list)
    validation_rows: list[dict[str, str]] = field(default_factory=list)

    def release(self) -> Any:
        """Detach the adapter and return the untouched base model (so it can be shared again)."""
        return detach_adapter(self.model)


def detach_adapter(model: Any) -> Any:
    """Remove a ReFT or PEFT adapter from the base it was loaded onto and return that base."""
    return model.remove_hooks() if hasattr(model, "remove_hooks") else model.unload()


def token_counter(tokenizer: Any, template: str):
    """``row -> tokens`` as training sees the row: the prompt in its template, the response, EOS."""
    from .chat import encode_prompt

    def count(row: dict[str, str]) -> int:
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        return len(encode_prompt(tokenizer, row["prompt"], template)) + len(response) + 1

    return count


def planned_steps(n_rows: int, settings: TrainSettings) -> int:
    """Steps a training of ``n_rows`` rows plans (the method's default epochs where ``settings`` has none)."""
    return (settings.epochs or DEFAULTS[settings.method]["epochs"]) * -(-n_rows // settings.batch_size)


def train_adapter(
    rows: list[dict[str, str]],
    settings: TrainSettings | None = None,
    *,
    base: tuple[Any, Any] | None = None,
    on_step=None,
    should_stop=None,
    validation_rows: list[dict[str, str]] | None = None,
) -> Trained:
    """Train an adapter on ``rows``; ``base=(model, tokenizer)`` reuses a loaded base model. With
    ``validation_rows``, each epoch's last history entry also gets ``val_loss``: the mean cross-entropy over
    those rows' response tokens, computed without gradients."""
    from .base_model import load_base_model
    from .chat import prompt_template
    from .modeling import find_decoder_layers

    settings = settings or TrainSettings()
    model, tokenizer = base or load_base_model(settings.base, load_in_4bit=settings.load_in_4bit)
    settings = settings.resolved(len(find_decoder_layers(model)))
    template = prompt_template(tokenizer)
    examples = encode_examples(tokenizer, rows, template, max_length=settings.max_tokens)
    held_out = (
        encode_examples(tokenizer, validation_rows, template, max_length=settings.max_tokens) if validation_rows else []
    )
    if settings.early_stop and not held_out:
        raise InvalidInputError("early_stop needs validation rows: pass a validation file, or 20+ rows to split.")
    adapter = None
    early = EarlyStop(settings.early_stop) if settings.early_stop else None

    def on_epoch_end(entry: dict) -> None:
        entry["val_loss"] = validation_loss(adapter, held_out, reft=settings.method == "reft")
        if early is not None:
            early.update(adapter, entry)

    def stop() -> bool:
        return (should_stop is not None and should_stop()) or (early is not None and early.stop)

    common = {
        "epochs": settings.epochs,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "target_loss": settings.target_loss,
        "seed": settings.seed,
        "on_step": on_step,
        "should_stop": stop,
        "on_epoch_end": on_epoch_end if held_out else None,
    }
    torch.manual_seed(settings.seed)
    if settings.method == "reft":
        from .reft import ReftConfig, get_reft_model

        config = ReftConfig(
            layers=settings.layers, rank=settings.rank, positions=settings.positions, prompt_template=template
        )
        adapter = get_reft_model(model, config)
        try:
            result = _train_reft(adapter, examples, trainer=settings.trainer, **common)
        except BaseException:
            adapter.remove_hooks()
            raise
    else:
        from peft import LoraConfig, get_peft_model

        targets, fan_in_fan_out = resolve_lora_targets(model, settings.target_modules)  # a clear error, before 4-bit
        keep_4bit_trainable(model)
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=2 * settings.rank,
            target_modules=targets,
            fan_in_fan_out=fan_in_fan_out,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        adapter = get_peft_model(model, config)
        adapter.hub_peft_prompt_template = template
        try:
            result = train_lora(adapter, examples, **common)
        except BaseException:
            adapter.unload()
            raise
    if early is not None:
        early.finish(adapter, result, cancelled=should_stop is not None and should_stop())
    return Trained(adapter, tokenizer, result, settings, template, list(rows), list(validation_rows or []))


class EarlyStop:
    """Stop once the validation loss has not improved for ``patience`` epochs, then put back the
    adapter's weights from its best epoch (as transformers' ``load_best_model_at_end`` does)."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.best_epoch, self.waited = patience, float("inf"), None, 0
        self.weights: dict[str, torch.Tensor] = {}
        self.stop = False

    def update(self, model: nn.Module, entry: dict) -> None:
        if entry["val_loss"] < self.best:
            self.best, self.best_epoch, self.waited = entry["val_loss"], entry.get("epoch"), 0
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            self.waited += 1
            self.stop = self.waited >= self.patience

    def finish(self, model: nn.Module, result: TrainResult, *, cancelled: bool) -> None:
        """Record the outcome; the best epoch's weights are put back whenever a later epoch was worse."""
        result.args["early_stop"] = self.patience
        if self.stop and not cancelled:
            result.stopped = "early_stop"
        if self.weights and self.waited:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, weight in self.weights.items():
                    params[name].copy_(weight)
            result.args["restored_epoch"] = self.best_epoch


def validation_loss(model: nn.Module, examples: list[Example], *, reft: bool = False, batch_size: int = 16) -> float:
    """Mean cross-entropy over the response tokens of ``examples`` (no gradients; every module's train/eval
    mode is put back as it was)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = examples[start : start + batch_size]
                loss, tokens = response_loss_sum(model, *pad_batch(batch), prompt_lengths(batch) if reft else None)
                total, count = total + float(loss), count + int(tokens)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return total / max(count, 1)


def train_lora(model: nn.Module, examples: list[Example], **kwargs: Any) -> TrainResult:
    """Train a PEFT model's trainable parameters on response tokens with transformers' ``Trainer``
    (one process, or data-parallel under ``accelerate launch``; see :mod:`hub_peft.hf_trainer`)."""
    return train_with_trainer(model, examples, **kwargs)


def _train_reft(model: Any, examples: list[Example], *, trainer: str = "auto", **kwargs: Any) -> TrainResult:
    """One process: hub_peft's cached ReFT trainer (exact, several times faster than a plain loop). Several
    processes (``accelerate launch``) or ``trainer="transformers"``: ``Trainer`` over the ReftModel, the
    gradients averaged over processes by DDP."""
    from .reft import train_reft

    if world_size() == 1 and trainer == "auto":
        result = train_reft(model, examples, **kwargs)
        result.args.update(trainer=f"hub_peft.reft.train_reft(method={result.args['method']!r})", processes=1)
        return result
    keep_4bit_trainable(model.base_model)
    params = list(model.interventions.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        result = train_with_trainer(model, examples, reft=True, **kwargs)
    finally:
        for p in params:
            p.requires_grad_(False)
    result.args["method"] = "trainer"
    return result


def save_trained(
    trained: Trained,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    dataset_name: str | None = None,
    description: str | None = None,
    evaluation: Evaluation | None = None,
) -> Path:
    """Write the adapter folder with its card (data summary, loss curve, settings, and ``evaluation``:
    see :func:`hub_peft.evaluation.evaluate_trained`)."""
    from .adapters import save_adapter

    args = {
        **trained.result.args,
        "method": trained.settings.method,
        "rank": trained.settings.rank,
        "stopped": trained.result.stopped,
        "steps": trained.result.steps,
    }
    if trained.settings.method == "reft":
        args.update(layers=trained.settings.layers, positions=trained.settings.positions)
    else:
        args.update(target_modules=describe(trained.settings.target_modules or ALL_LINEAR))
    metrics = dict(evaluation.metrics) if evaluation else {}
    if (loss := trained.result.final_validation_loss()) is not None:
        args["validation_rows"] = len(trained.validation_rows)
        metrics.setdefault("validation_loss", round(loss, 4))
    details = (evaluation or Evaluation("validation", [], rows=len(trained.validation_rows))).details()
    return save_adapter(
        trained.model,
        out_dir,
        overwrite=overwrite,
        description=description,
        training_rows=trained.rows,
        dataset_name=dataset_name,
        history=trained.result.history,
        training_args=args,
        training_seconds=trained.result.seconds,
        evaluation=metrics or None,
        evaluation_details=details if metrics or evaluation else None,
        comparisons=evaluation.table() if evaluation else None,
        example_prompt=trained.rows[0]["prompt"] if trained.rows else None,
        prompt_template=trained.template,
        tokenizer=trained.tokenizer,
    )
