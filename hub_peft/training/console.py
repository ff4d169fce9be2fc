"""``hub-peft train`` on a console: its arguments, what it prints, and the run itself (:func:`train_from_args`).

NOTE: ``hub-peft`` builds its parser on every call, so this module imports only the standard library at load;
the training code loads when a training runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._args import from_args
from ..errors import InvalidInputError
from .run import Reporter
from .settings import TrainSettings


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hub-peft train``."""
    parser.add_argument("--examples", required=True, help="Rows with prompt/response (JSONL: one object per line).")
    parser.add_argument("--method", choices=["reft", "lora"], default="reft")
    parser.add_argument("--base", default=None, help="Hub id or path (default: embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--4bit", dest="load_in_4bit", action="store_true", help="Load the base in NF4 4-bit.")
    parser.add_argument("--out", required=True, help="Folder to write the adapter and its card to.")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--push", metavar="REPO_ID", default=None, help="Also push it to the Hub.")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--layers", default=None, help="ReFT layers, e.g. 8,16 (default: by depth).")
    parser.add_argument("--positions", default="l1", help="ReFT prompt positions (default: l1).")
    parser.add_argument(
        "--target-modules",
        default=None,
        metavar="MODULES",
        help="LoRA: all-linear (default: every linear layer but the output head), peft-default "
        "(PEFT's per-architecture list), or module names such as c_attn,c_proj.",
    )
    parser.add_argument("--target-loss", type=float, default=None, help="Stop once a step's loss is this low.")
    parser.add_argument(
        "--validation",
        metavar="FILE",
        default=None,
        help="Validation rows (default: 10%% of the rows held out when there are 20 or more).",
    )
    parser.add_argument("--no-validation", action="store_true", help="Train on every row, no validation split.")
    parser.add_argument(
        "--early-stop",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="Stop after EPOCHS epochs without a lower validation loss; keep the best epoch's weights.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the training order and the validation split.")
    parser.add_argument("--batch-size", type=int, default=10, help="Global batch (split over accelerate's processes).")
    parser.add_argument(
        "--trainer",
        choices=["auto", "transformers"],
        default="auto",
        help="auto: hub_peft's cached trainer for ReFT in one process, transformers' Trainer "
        "otherwise; transformers: always Trainer.",
    )
    parser.add_argument("--prompt-column", default=None)
    parser.add_argument("--response-column", default=None)


class ConsoleReport(Reporter):
    """Problems on stderr, a progress bar, then the outcome; under ``accelerate launch`` only the main process
    (rank 0) prints."""

    def __init__(self, main: bool, method: str, validation_file: str | None) -> None:
        self.main, self.method, self.validation_file = main, method, validation_file
        self._bar: Any = None  # the tqdm bar while training

    def checked(self, preview) -> None:
        for problem in preview.problems if self.main else ():
            print(f"{'error' if problem.blocking else 'note'}: {problem.message}", file=sys.stderr)
        if self.main:
            print(preview.summary())
        if not preview.ok:
            raise InvalidInputError("Fix the rows above (or remove them) and run again.")

    def left_out(self, count: int) -> None:
        if self.main:
            print(f"note: {count} training row(s) also in {self.validation_file} were left out")

    def split(self, rows: list[dict[str, str]], held_out: list[dict[str, str]]) -> None:
        if self.main and held_out:
            print(f"validation: {len(held_out)} rows held out, {len(rows)} to train on")

    @contextlib.contextmanager
    def training(self, total_steps: int) -> Iterator[None]:
        from tqdm.auto import tqdm

        with tqdm(total=total_steps, desc=f"training {self.method}", unit="step", disable=not self.main) as bar:
            self._bar = bar
            yield

    def step(self, entry: dict[str, float]) -> None:
        self._bar.set_postfix(loss=f"{entry['loss']:.3f}")
        self._bar.update(1)

    def trained(self, trained: Any) -> None:
        if not self.main:
            return
        result = trained.result
        first, last = result.history[0]["loss"], result.history[-1]["loss"]
        print(f"trained {result.steps} steps in {result.seconds:.1f} s, loss {first:.3f} -> {last:.3f}")
        if result.stopped == "early_stop":
            print(
                f"early stop: no lower validation loss for {trained.settings.early_stop} epoch(s); "
                f"kept epoch {result.args['restored_epoch']}'s weights"
            )
        validated = [h["val_loss"] for h in result.history if "val_loss" in h]
        if validated:
            print(f"validation loss by epoch: {' '.join(f'{v:.3f}' for v in validated)}")

    def evaluated(self, evaluation: Any) -> None:
        if evaluation:
            metrics = ", ".join(f"{k} {v}" for k, v in sorted(evaluation.metrics.items()))
            print(f"evaluation on {len(evaluation.comparisons)} of {evaluation.rows} held-out rows (greedy): {metrics}")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    return from_args(TrainSettings, args, layers=layers)


def read_rows(path: Path, args: argparse.Namespace) -> list[dict[str, str]]:
    """A CSV/JSONL/JSON file's prompt/response rows (``--prompt-column``/``--response-column`` map them)."""
    from ..examples import read_table

    if not path.is_file():
        raise InvalidInputError(f"{path} does not exist.")
    return read_table(path.read_bytes(), path.name).rows(args.prompt_column, args.response_column)


def train_from_args(args: argparse.Namespace, say_quantization: Callable[[Any], None] = lambda model: None) -> int:
    """``hub-peft train``: read the rows, load the base, :func:`~hub_peft.training.run.run_training`, push.
    ``say_quantization(model)`` reports a 4-bit load."""
    from ..adapters import check_repo_id, push_adapter
    from ..base_model import load_base_model
    from ..examples import check_rows
    from .peft_loop import is_main_process, single_cpu_launch_warning
    from .run import run_training

    if args.push:
        check_repo_id(args.push)
    path = Path(args.examples)
    rows = read_rows(path, args)
    settings = settings_from_args(args)
    main = is_main_process()  # under accelerate launch only rank 0 prints, writes and pushes
    if warning := single_cpu_launch_warning():
        print(f"warning: {warning}", file=sys.stderr)
    model, tokenizer = load_base_model(args.base, load_in_4bit=args.load_in_4bit)
    if main:
        say_quantization(model)
    validation = check_rows(read_rows(Path(args.validation), args)).rows if args.validation else None
    reporter = ConsoleReport(main, settings.method, args.validation)
    done = run_training(
        rows,
        settings,
        base=(model, tokenizer),
        out_dir=args.out if main else None,  # the other processes only train
        validation_rows=validation,
        split=not args.no_validation,
        reporter=reporter,
        overwrite=args.overwrite,
        dataset_name=path.name,
    )
    if not main:
        return 0
    print(f"saved {done.out}")
    if args.push:
        print(push_adapter(done.out, args.push, private=args.private))
    return 0
