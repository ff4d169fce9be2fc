"""One training run, as ``hub-peft train`` and the Adapter Studio do it: check the rows, split off validation
rows, train, evaluate, save.

:func:`run_training` does it all at once. The Studio checks and splits when a training is queued (so bad rows
are refused at once, and the queue knows the planned steps) and trains later in the queue's worker: that is
:func:`plan_training` and then :meth:`TrainingPlan.run`, the same two halves. A :class:`Reporter` is how each
caller shows what happens (a console, a Space's progress) and cancels.

NOTE: this module imports torch and transformers only when a plan runs, so ``hub-peft`` starts fast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInputError
from ..examples import Preview, check_rows, split_validation, without
from .settings import Callbacks, TrainSettings, planned_steps

if TYPE_CHECKING:
    from ..evaluation import Evaluation
    from .adapter import Trained


class Reporter:
    """What a run tells its caller, and asks it. Every method here does nothing; a caller overrides those it
    needs. A method may raise to stop the run (:meth:`checked` with its own message for refused rows, say)."""

    def checked(self, preview: Preview) -> None:
        """The rows were checked (before a refusal, if ``preview.ok`` is false)."""

    def left_out(self, count: int) -> None:
        """``count`` training rows were also validation rows and are not trained on."""

    def split(self, rows: list[dict[str, str]], held_out: list[dict[str, str]]) -> None:
        """The rows to train on and the validation rows are known."""

    def training(self, total_steps: int) -> contextlib.AbstractContextManager[None]:
        """Held open while the adapter trains, for ``total_steps`` planned steps."""
        return contextlib.nullcontext()

    def step(self, entry: dict[str, float]) -> None:
        """One step's history entry (``step``, ``epoch``, ``loss``, ``seconds``)."""

    def should_stop(self) -> bool:
        """True to cancel: training stops after its current step, and the run does not evaluate."""
        return False

    def trained(self, trained: Trained) -> None:
        """Training ended (completed, stopped early, or cancelled)."""

    def evaluated(self, evaluation: Evaluation | None) -> None:
        """The adapter was compared with the base (None: nothing to evaluate on, or cancelled)."""


@dataclass
class TrainingRun:
    trained: Trained
    evaluation: Evaluation | None = None
    out: Path | None = None  # the saved adapter folder (None when the run did not save)


@dataclass
class TrainingPlan:
    """Checked rows, split into those to train on and the validation rows: ready to :meth:`run`."""

    settings: TrainSettings
    rows: list[dict[str, str]]
    held_out: list[dict[str, str]]
    preview: Preview

    @property
    def planned_steps(self) -> int:
        return planned_steps(len(self.rows), self.settings)

    def run(
        self,
        base: tuple[Any, Any],
        out_dir: str | Path | None,
        *,
        reporter: Reporter | None = None,
        prompts: list[str] | None = None,
        overwrite: bool = False,
        dataset_name: str | None = None,
        release: bool = False,
    ) -> TrainingRun:
        """Train on ``base=(model, tokenizer)``, then, with an ``out_dir``, evaluate (on the validation rows,
        else on ``prompts``) and save the adapter with its card there. ``release`` detaches the adapter from
        ``base`` once saved (a shared base model), whatever happens."""
        from ..evaluation import evaluate_trained
        from ..modeling import find_decoder_layers
        from .adapter import save_trained, train_resolved

        reporter = reporter or Reporter()
        model, _ = base
        settings = self.settings.resolved(len(find_decoder_layers(model)))  # once: the loops get them whole
        callbacks = Callbacks(on_step=reporter.step, should_stop=reporter.should_stop)
        with reporter.training(planned_steps(len(self.rows), settings)):
            trained = train_resolved(self.rows, settings, base, callbacks, validation_rows=self.held_out)
        try:
            reporter.trained(trained)
            if out_dir is None:
                return TrainingRun(trained)
            evaluation = None if reporter.should_stop() else evaluate_trained(trained, prompts=prompts)
            reporter.evaluated(evaluation)
            out = save_trained(trained, out_dir, overwrite=overwrite, dataset_name=dataset_name, evaluation=evaluation)
        finally:
            if release:
                trained.release()
        return TrainingRun(trained, evaluation, out)


def plan_training(
    rows: list[dict[str, str]],
    settings: TrainSettings,
    *,
    count_tokens=None,
    validation_rows: list[dict[str, str]] | None = None,
    split: bool = True,
    reporter: Reporter | None = None,
) -> TrainingPlan:
    """Check ``rows`` (dropping empty and duplicate ones, refusing those over ``settings.max_tokens`` as
    ``count_tokens(row)`` counts them), then hold out ``validation_rows`` (the rows to train on lose any that
    are also validation rows) or, with none and ``split``, a seeded share of the rows (see
    :func:`hub_peft.examples.split_validation`)."""
    reporter = reporter or Reporter()
    preview = check_rows(rows, count_tokens=count_tokens, max_tokens=settings.max_tokens)
    reporter.checked(preview)
    if not preview.ok:
        blocking = "; ".join(p.message for p in preview.problems if p.blocking)
        raise InvalidInputError(f"{preview.summary()} {blocking}")
    rows, held_out = preview.rows, []
    if validation_rows is not None:
        rows, held_out = without(preview.rows, validation_rows), list(validation_rows)
        if len(rows) < len(preview.rows):
            reporter.left_out(len(preview.rows) - len(rows))
    elif split:
        rows, held_out = split_validation(rows, seed=settings.seed)
    if not rows:
        raise InvalidInputError("Every example is also in the validation file: nothing is left to train on.")
    reporter.split(rows, held_out)
    return TrainingPlan(settings, rows, held_out, preview)


def run_training(
    rows: list[dict[str, str]],
    settings: TrainSettings,
    *,
    base: tuple[Any, Any],
    out_dir: str | Path | None,
    validation_rows: list[dict[str, str]] | None = None,
    split: bool = True,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    dataset_name: str | None = None,
) -> TrainingRun:
    """Check → split → train → evaluate → save (see :func:`plan_training` and :meth:`TrainingPlan.run`); the
    rows' tokens are counted with ``base``'s tokenizer, in its prompt template."""
    from ..chat import prompt_template
    from .adapter import token_counter

    tokenizer = base[1]
    count = token_counter(tokenizer, prompt_template(tokenizer))
    plan = plan_training(
        rows, settings, count_tokens=count, validation_rows=validation_rows, split=split, reporter=reporter
    )
    return plan.run(base, out_dir, reporter=reporter, overwrite=overwrite, dataset_name=dataset_name)
