"""Train one LoRA or ReFT adapter from prompt → response rows (:func:`train_adapter`), and save it with its
card (:func:`save_trained`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._bnb import keep_4bit_trainable
from ..errors import InvalidInputError
from ..evaluation import Evaluation
from ..targets import ALL_LINEAR, describe, resolve_lora_targets
from .optimize import Example, TrainResult, encode_examples, pad_batch, prompt_lengths, response_loss_sum
from .peft_loop import train_with_trainer, world_size
from .reft_loop import train_reft
from .settings import Callbacks, HyperParams, TrainSettings


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
    from ..chat import encode_prompt

    def count(row: dict[str, str]) -> int:
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        return len(encode_prompt(tokenizer, row["prompt"], template)) + len(response) + 1

    return count


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
    from ..base_model import load_base_model
    from ..modeling import find_decoder_layers

    settings = settings or TrainSettings()
    model, tokenizer = base or load_base_model(settings.base, load_in_4bit=settings.load_in_4bit)
    resolved = settings.resolved(len(find_decoder_layers(model)))
    callbacks = Callbacks(on_step=on_step, should_stop=should_stop)
    return train_resolved(rows, resolved, (model, tokenizer), callbacks, validation_rows=validation_rows)


def train_resolved(
    rows: list[dict[str, str]],
    settings: TrainSettings,
    base: tuple[Any, Any],
    callbacks: Callbacks,
    *,
    validation_rows: list[dict[str, str]] | None = None,
) -> Trained:
    """:func:`train_adapter` with ``settings`` already :meth:`~TrainSettings.resolved` for ``base`` (so that a
    caller which needs them first, for the planned steps say, resolves them once). ``callbacks.on_epoch_end``
    is this function's: it computes the validation loss and drives early stopping."""
    from ..chat import prompt_template

    model, tokenizer = base
    template = prompt_template(tokenizer)
    examples = encode_examples(tokenizer, rows, template, max_length=settings.max_tokens)
    held_out = (
        encode_examples(tokenizer, validation_rows, template, max_length=settings.max_tokens) if validation_rows else []
    )
    if settings.early_stop and not held_out:
        raise InvalidInputError("early_stop needs validation rows: pass a validation file, or 20+ rows to split.")
    torch.manual_seed(settings.seed)
    adapter = _attach(model, settings, template)
    early = EarlyStop(settings.early_stop) if settings.early_stop else None

    def on_epoch_end(entry: dict) -> None:
        entry["val_loss"] = validation_loss(adapter, held_out, reft=settings.method == "reft")
        if early is not None:
            early.update(adapter, entry)

    def stop() -> bool:
        return callbacks.stopping() or (early is not None and early.stop)

    hooks = Callbacks(on_step=callbacks.on_step, should_stop=stop, on_epoch_end=on_epoch_end if held_out else None)
    try:
        if settings.method == "reft":
            result = _train_reft(adapter, examples, settings.hyper_params(), hooks, trainer=settings.trainer)
        else:
            result = train_lora(adapter, examples, settings.hyper_params(), hooks)
    except BaseException:
        detach_adapter(adapter)
        raise
    if early is not None:
        early.finish(adapter, result, cancelled=callbacks.stopping())
    return Trained(adapter, tokenizer, result, settings, template, list(rows), list(validation_rows or []))


def _attach(model: Any, settings: TrainSettings, template: str) -> Any:
    """A fresh, trainable ReFT or LoRA adapter of ``settings`` (resolved: every default filled in) over ``model``."""
    rank, layers = settings.rank, settings.layers
    if rank is None or (layers is None and settings.method == "reft"):
        raise InvalidInputError("_attach needs resolved settings: call TrainSettings.resolved(n_layers) first.")
    if settings.method == "reft":
        from ..reft import ReftConfig, get_reft_model

        config = ReftConfig(layers=layers or [], rank=rank, positions=settings.positions, prompt_template=template)
        return get_reft_model(model, config)
    from peft import LoraConfig, get_peft_model

    targets, fan_in_fan_out = resolve_lora_targets(
        model, settings.target_modules or ALL_LINEAR
    )  # a clear error, before 4-bit
    keep_4bit_trainable(model)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    adapter = get_peft_model(model, config)
    adapter.hub_peft_prompt_template = template
    return adapter


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


def train_lora(
    model: nn.Module, examples: list[Example], hparams: HyperParams, callbacks: Callbacks | None = None
) -> TrainResult:
    """Train a PEFT model's trainable parameters on response tokens with transformers' ``Trainer``
    (one process, or data-parallel under ``accelerate launch``; see :mod:`hub_peft.training.peft_loop`)."""
    return train_with_trainer(model, examples, hparams, callbacks)


def _train_reft(
    model: Any, examples: list[Example], hparams: HyperParams, callbacks: Callbacks, *, trainer: str = "auto"
) -> TrainResult:
    """One process: hub_peft's cached ReFT trainer (exact, several times faster than a plain loop). Several
    processes (``accelerate launch``) or ``trainer="transformers"``: ``Trainer`` over the ReftModel, the
    gradients averaged over processes by DDP."""
    if world_size() == 1 and trainer == "auto":
        result = train_reft(model, examples, hparams, callbacks)
        # NOTE: the name cards have recorded since ReFT training lived in hub_peft.reft; kept so they compare.
        result.args.update(trainer=f"hub_peft.reft.train_reft(method={result.args['method']!r})", processes=1)
        return result
    keep_4bit_trainable(model.base_model)
    params = list(model.interventions.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        result = train_with_trainer(model, examples, hparams, callbacks, reft=True)
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
    from ..adapters import save_adapter

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
