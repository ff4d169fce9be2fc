"""What every hub_peft trainer shares: tokenized examples, the optimisation loop, its result."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..chat import encode_prompt
from ..errors import InvalidInputError
from .settings import Callbacks, HyperParams


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def encode_examples(
    tokenizer: Any, rows: list[dict[str, str]], template: str, *, max_length: int | None = None
) -> list[Example]:
    """Tokenize ``{"prompt", "response"}`` rows: the prompt in ``template``, the response followed by EOS."""
    if not rows:
        raise InvalidInputError("No training examples: give at least one {'prompt': ..., 'response': ...} row.")
    if tokenizer.eos_token_id is None:
        raise InvalidInputError("The tokenizer has no EOS token; responses need one to learn where to stop.")
    examples = []
    for i, row in enumerate(rows):
        prompt, response = str(row.get("prompt") or ""), str(row.get("response") or "")
        if not prompt.strip() or not response.strip():
            raise InvalidInputError(f"Example {i + 1} has an empty prompt or response.")
        ex = Example(
            encode_prompt(tokenizer, prompt, template),
            tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        )
        if max_length and len(ex) > max_length:
            raise InvalidInputError(f"Example {i + 1} is {len(ex)} tokens long; the limit is {max_length}.")
        examples.append(ex)
    return examples


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # [{"step", "epoch", "loss", "seconds"}]
    seconds: float = 0.0
    steps: int = 0
    stopped: str = "completed"  # completed | target_loss | cancelled | early_stop
    args: dict[str, Any] = field(default_factory=dict)
    planned_steps: int = 0

    def final_validation_loss(self) -> float | None:
        """The validation loss of the weights training ended with: the last epoch's, or the best epoch's
        when early stopping put that epoch's weights back (``args["restored_epoch"]``)."""
        validated = [h for h in self.history if "val_loss" in h]
        if not validated:
            return None
        restored = self.args.get("restored_epoch")
        return next((h["val_loss"] for h in validated if h.get("epoch") == restored), validated[-1]["val_loss"])


def pad_batch(batch: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)`` of prompt + response; labels are the
    response tokens at their own positions (-100 elsewhere), as transformers' ``labels=`` expects."""
    width = max(len(ex) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, ex in enumerate(batch):
        seq = ex.prompt_ids + ex.response_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(ex.prompt_ids) : len(seq)] = torch.tensor(ex.response_ids)
        mask[i, : len(seq)] = 1
    return ids, mask, labels


def prompt_lengths(batch: list[Example]) -> torch.Tensor:
    """Where each row's prompt ends in :func:`pad_batch`'s layout (a ReftModel's intervened positions)."""
    return torch.tensor([len(ex.prompt_ids) for ex in batch])


def response_loss_sum(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed cross-entropy, token count)`` over the response tokens of a :func:`pad_batch` batch.

    Position t predicts token t+1 (the last column, a final EOS at most, predicts nothing), and logits are
    computed only where a response token is predicted (``logits_to_keep``). ``lengths`` (see
    :func:`prompt_lengths`) goes to a ReftModel, which intervenes on the prompt positions."""
    ids, mask, targets = ids[:, :-1], mask[:, :-1], labels[:, 1:]
    keep = targets != -100
    extra = {"prompt_lengths": lengths} if lengths is not None else {}
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, **extra).logits
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets[keep], reduction="sum"
    )
    return total, keep.sum()


def fit(
    params: list[torch.nn.Parameter],
    loss_of: Callable[[list[int]], torch.Tensor],
    n_examples: int,
    hparams: HyperParams,
    callbacks: Callbacks | None = None,
    *,
    frozen_decay: Sequence[torch.nn.Parameter] = (),
    started: float | None = None,
) -> TrainResult:
    """AdamW over shuffled mini-batches of example indices; ``loss_of(indices)`` returns a batch's loss.

    ``hparams`` (see :class:`~hub_peft.training.settings.HyperParams`) sets the optimisation and when it ends;
    ``callbacks.should_stop()`` is checked before each step, ``on_step`` gets each history entry and
    ``on_epoch_end`` the epoch's last one (it may add to it, e.g. a validation loss). ``frozen_decay`` are
    trained without weight decay. Times count from ``started`` (a ``time.perf_counter()`` value, e.g. taken
    before the caller's own preparation) or from this call.
    """
    hparams.check()
    if n_examples < 1:
        raise InvalidInputError("No training examples.")
    callbacks = callbacks or Callbacks()
    started = time.perf_counter() if started is None else started
    groups = [
        {"params": list(params), "weight_decay": hparams.weight_decay},
        {"params": list(frozen_decay), "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hparams.lr)
    batches_per_epoch = math.ceil(n_examples / hparams.batch_size)
    total_steps = hparams.epochs * batches_per_epoch
    linear = hparams.schedule == "linear"
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 1.0 - step / total_steps) if linear else (lambda step: 1.0)
    )
    rng = random.Random(hparams.seed)
    result = TrainResult(args=hparams.record(), planned_steps=total_steps)
    try:
        for epoch in range(hparams.epochs):
            order = list(range(n_examples))
            rng.shuffle(order)
            for b in range(batches_per_epoch):
                if callbacks.stopping():
                    result.stopped = "cancelled"
                    return result
                loss = loss_of(order[b * hparams.batch_size : (b + 1) * hparams.batch_size])
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                entry = {
                    "step": result.steps,
                    "epoch": epoch + 1,
                    "loss": float(loss.detach()),
                    "seconds": round(time.perf_counter() - started, 3),
                }
                result.history.append(entry)
                callbacks.step(entry)
                if hparams.target_loss is not None and entry["loss"] <= hparams.target_loss:
                    result.stopped = "target_loss"
                    return result
            callbacks.epoch_end(result.history[-1])
        return result
    finally:
        result.seconds = time.perf_counter() - started
