"""Train ReFT interventions on prompt → response pairs, fast on a CPU without changing the math.

``method="cached"`` (default) runs each step on what changes only (see :mod:`.reft_cache`);
``method="full"`` is the plain reference loop (whole forward, same loss). Both give the same losses up to
float rounding, on :func:`hub_peft.training.optimize.fit`'s loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .._bnb import keep_4bit_trainable
from ..errors import InvalidInputError
from ..reft.model import ReftModel
from .optimize import Example, TrainResult, fit, pad_batch, prompt_lengths, response_loss_sum
from .reft_cache import _CachedSteps, _NotCacheable
from .settings import Callbacks, HyperParams, with_overrides

log = logging.getLogger(__name__)

REFT_HYPER_PARAMS = HyperParams(epochs=100, lr=4e-3)  # train_reft's defaults, without TrainSettings


def train_reft(
    model: ReftModel,
    examples: list[Example],
    hparams: HyperParams | None = None,
    callbacks: Callbacks | None = None,
    *,
    method: str = "cached",
    **overrides: Any,
) -> TrainResult:
    """Train ``model``'s interventions (see :func:`hub_peft.training.optimize.fit` for the loop and stopping
    rules). ``hparams`` defaults to :data:`REFT_HYPER_PARAMS`; ``overrides`` replace fields of ``hparams``
    or ``callbacks`` by name (``train_reft(model, examples, epochs=30, lr=1e-2, on_step=print)``).

    ``method="cached"`` (default) is the fast path; ``"full"`` the plain loop. The cached path first
    checks itself against the plain model on one example; where it cannot reproduce it (a model whose
    attention it cannot run per example, examples longer than a sliding window, ...), or when its prefix
    cache would take more than half the free memory, training uses the plain loop instead, with a logged
    warning saying why. ``result.args["method"]`` records which one ran.
    """
    hparams, callbacks = with_overrides(hparams or REFT_HYPER_PARAMS, callbacks, overrides)
    if method not in ("cached", "full"):
        raise InvalidInputError(f"method must be 'cached' or 'full', got {method!r}.")
    if not examples:
        raise InvalidInputError("No training examples.")
    started = time.perf_counter()  # the result's time includes the cached trainer's precompute
    keep_4bit_trainable(model.base_model)
    named = list(model.interventions.named_parameters())
    for _, p in named:
        p.requires_grad_(True)
    model.base_model.eval()
    model.interventions.train()
    try:
        steps: _CachedSteps | _FullSteps = _FullSteps(model, examples)
        if method == "cached":
            try:
                steps = _CachedSteps(model, examples, hparams.batch_size)
            except _NotCacheable as why:
                log.warning("Training with the plain loop: the cached trainer cannot reproduce it here (%s).", why)
                method = "full"
        result = fit(
            # No weight decay on R's orthogonal parametrization: decaying its (gradient-free) diagonal would break R.
            [p for n, p in named if "parametrizations" not in n],
            steps.loss,
            len(examples),
            hparams,
            callbacks,
            frozen_decay=[p for n, p in named if "parametrizations" in n],
            started=started,
        )
        result.args["method"] = method
        return result
    finally:
        model.interventions.eval()
        for _, p in named:
            p.requires_grad_(False)


class _FullSteps:
    """Reference: a right-padded forward of whole examples, logits only where a response token is predicted
    (``logits_to_keep``, as the LoRA loop does), mean cross-entropy there."""

    def __init__(self, model: ReftModel, examples: list[Example]) -> None:
        self.model, self.examples = model, examples

    def loss(self, rows: list[int]) -> torch.Tensor:
        batch = [self.examples[i] for i in rows]
        total, count = response_loss_sum(self.model, *pad_batch(batch), prompt_lengths(batch))
        return total / count
