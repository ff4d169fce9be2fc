"""What a training run is judged by, after it: the base model and the adapter answer the same held-out
prompts (greedy, so the answers are reproducible), side by side ("before / after"), and where the
held-out rows carry reference responses, the share each model gets exactly right.

The prompts are the validation rows' (the split :mod:`hub_peft.examples` held out; never trained on),
else prompts the caller knows are not in the training data (a preset's held-out prompts). With
neither there is no evaluation, and the card says so; no number is ever made up.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .chat import generate_replies
from .errors import InvalidInputError

EVAL_ROWS = 16  # held-out rows both models answer: enough for a table and a first exact-match figure, in seconds
MAX_NEW_TOKENS = 48


@dataclass
class Comparison:
    """One held-out prompt answered by the base model and by the adapter (and its reference, if known)."""

    prompt: str
    base: str
    adapter: str
    reference: str | None = None


@dataclass
class Evaluation:
    """The evaluation of one run, as the card, the Studio and ``.eval_results/`` show it."""

    source: str  # "validation" (rows with references) or "held-out prompts" (no references)
    comparisons: list[Comparison]
    metrics: dict[str, float] = field(default_factory=dict)  # validation_loss, exact_match, base_exact_match
    rows: int = 0  # the validation split's size (0: prompts only)
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))

    def details(self) -> dict[str, Any]:
        """What the card records besides the metrics and the table (JSON-ready)."""
        return {"source": self.source, "rows": self.rows, "evaluated": len(self.comparisons), "date": self.date}

    def table(self) -> list[dict[str, str | None]]:
        return [asdict(c) for c in self.comparisons]


def exact_match(answers: list[str], references: list[str]) -> float:
    """The share of ``answers`` equal to their reference, surrounding whitespace ignored."""
    if not references:
        raise InvalidInputError("exact_match needs at least one reference.")
    return sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True)) / len(references)


@contextlib.contextmanager
def without_adapter(model: Any) -> Iterator[Any]:
    """The plain base model under ``model``'s adapter, for as long as the block runs (the adapter is
    back afterwards). A ReFT model's hooks edit nothing outside its own calls: its base is the plain
    model. A PEFT model disables its adapter layers."""
    if hasattr(model, "reft_config"):
        yield model.base_model
    else:
        with model.disable_adapter():
            yield model


def compare_with_base(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    template: str,
    references: list[str] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[Comparison]:
    """Greedy answers of ``model`` (an adapter on its base) and of the base alone to ``prompts``, both
    in ``template`` (the format the adapter was trained with)."""
    torch.manual_seed(0)  # greedy decoding draws nothing; fixed anyway in case a model samples internally
    with without_adapter(model) as base:
        before = generate_replies(base, tokenizer, prompts, template=template, max_new_tokens=max_new_tokens)
    after = generate_replies(model, tokenizer, prompts, template=template, max_new_tokens=max_new_tokens)
    refs: Sequence[str | None] = references or [None] * len(prompts)
    return [Comparison(p, b, a, r) for p, b, a, r in zip(prompts, before, after, refs, strict=True)]


def evaluate_trained(trained: Any, *, prompts: list[str] | None = None, limit: int = EVAL_ROWS) -> Evaluation | None:
    """Evaluate a :class:`hub_peft.training.Trained` run: the first ``limit`` validation rows (exact
    match against their responses, and the last epoch's validation loss), else ``prompts`` (the table
    only); None when there is neither."""
    rows = trained.validation_rows
    if not rows and not prompts:
        return None
    tokenizer = trained.tokenizer
    if rows:
        chosen = rows[:limit]
        references = [r["response"] for r in chosen]
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
        comparisons = compare_with_base(
            trained.model,
            tokenizer,
            [r["prompt"] for r in chosen],
            template=trained.template,
            references=references,
            max_new_tokens=min(MAX_NEW_TOKENS, longest + 1),  # room for the EOS
        )
        metrics = {
            "exact_match": round(exact_match([c.adapter for c in comparisons], references), 4),
            "base_exact_match": round(exact_match([c.base for c in comparisons], references), 4),
        }
        if (loss := trained.result.final_validation_loss()) is not None:
            metrics["validation_loss"] = round(loss, 4)
        return Evaluation("validation", comparisons, metrics, rows=len(rows))
    comparisons = compare_with_base(trained.model, tokenizer, list(prompts or [])[:limit], template=trained.template)
    return Evaluation("held-out prompts", comparisons)
