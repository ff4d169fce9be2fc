"""Training on transformers' ``Trainer``: the LoRA path always, the ReFT path when several processes run.

Under ``accelerate launch`` (DDP over gloo on CPUs, NCCL on GPUs; FSDP or DeepSpeed configs as accelerate
passes them to ``Trainer``) every process trains on its share of each global batch and the gradients are
averaged by the framework, not by hub_peft. The loss is the mean cross-entropy over the response tokens of
the whole global batch: each process sums its tokens' losses and divides by the global token count
(``num_items_in_batch``, gathered across processes by ``Trainer``), so one process with batch ``B`` and
``P`` processes with ``B / P`` each compute the same loss and the same gradient, up to float rounding.
Logits are computed only where a response token is predicted (``logits_to_keep``).

The optimizer and schedule match :func:`hub_peft.training.optimize.fit`: AdamW without weight decay, the
learning rate decaying linearly to 0 over the planned steps, no gradient clipping.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InvalidInputError
from .optimize import Example, TrainResult, pad_batch, prompt_lengths, response_loss_sum
from .settings import Callbacks, HyperParams


def world_size() -> int:
    """How many training processes run together (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the one process that writes files and prints (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def single_cpu_launch_warning() -> str | None:
    """accelerate (1.16) runs ``launch --cpu --num_processes N`` as ONE process unless an MPI hostfile is given
    (it only sets ``MASTER_ADDR``); say so instead of silently training alone."""
    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in os.environ
    if asked and "WORLD_SIZE" not in os.environ:
        return (
            "accelerate launch --cpu started a single process. For several processes on this machine use "
            "`accelerate launch --multi_gpu --num_processes N ...` (torchrun underneath; gloo on CPUs)."
        )
    return None


class _Rows(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def _collate(with_prompt_lengths: bool) -> Callable[[list[Example]], dict[str, torch.Tensor]]:
    def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
        ids, mask, labels = pad_batch(batch)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if with_prompt_lengths:  # ReFT: where each row's prompt ends (its intervened positions)
            out["prompt_lengths"] = prompt_lengths(batch)
        return out

    return collate


def _trainer_class():
    from transformers import Trainer

    class ResponseLossTrainer(Trainer):
        """Mean cross-entropy over the global batch's response tokens (see the module docstring)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            total, count = response_loss_sum(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], inputs.get("prompt_lengths")
            )
            self.step_loss = (total.detach(), count if num_items_in_batch is None else num_items_in_batch)
            if num_items_in_batch is None:
                return total / count
            # Trainer averages gradients over processes: scale back up so the sum of all tokens is divided once
            return total / num_items_in_batch * self.accelerator.num_processes

    return ResponseLossTrainer


def _callback(result: TrainResult, started: float, target_loss: float | None, callbacks: Callbacks):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """History, progress, cancellation and ``target_loss``. Each step's loss is the exact global mean
        (the processes' token-loss sums added up, over the global token count), not Trainer's rounded log."""

        trainer = None

        def _stop_if_asked(self, control) -> None:
            # NOTE: Trainer looks at should_training_stop after a step and after an epoch, never before a step.
            if callbacks.stopping():
                result.stopped = "cancelled"
                control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            total, count = self.trainer.step_loss
            total = self.trainer.accelerator.reduce(total, reduction="sum")  # every process runs this step
            entry = {
                "step": state.global_step,
                "epoch": max(1, math.ceil(state.epoch or 0)),
                "loss": float(total / count),
                "seconds": round(time.perf_counter() - started, 3),
            }
            result.history.append(entry)
            result.steps = state.global_step
            callbacks.step(entry)
            if target_loss is not None and entry["loss"] <= target_loss:
                result.stopped = "target_loss"
                control.should_training_stop = True
            self._stop_if_asked(control)

        def on_epoch_end(self, args, state, control, **kwargs):
            if result.history and result.stopped == "completed":  # not cancelled
                callbacks.epoch_end(result.history[-1])
            self._stop_if_asked(control)

    return Progress()


def _check(model: nn.Module, examples: list[Example], hparams: HyperParams) -> int:
    """The number of processes, once the examples, the batch and the model are fit for ``Trainer``."""
    if not examples:
        raise InvalidInputError("No training examples.")
    if hparams.weight_decay or hparams.schedule != "linear":
        raise InvalidInputError("transformers' Trainer here trains without weight decay, on a linear schedule.")
    processes = world_size()
    if hparams.batch_size % processes:
        raise InvalidInputError(
            f"batch_size {hparams.batch_size} does not split over {processes} processes: give a "
            f"multiple of {processes} (--batch-size)."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidInputError("The model has no trainable parameters.")
    return processes


def _training_arguments(output: str, hparams: HyperParams, processes: int, on_cpu: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output,
        num_train_epochs=hparams.epochs,
        learning_rate=hparams.lr,
        per_device_train_batch_size=hparams.batch_size // processes,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        optim="adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=hparams.seed,
        data_seed=hparams.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=on_cpu,
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
    )


def train_with_trainer(
    model: nn.Module,
    examples: list[Example],
    hparams: HyperParams,
    callbacks: Callbacks | None = None,
    *,
    reft: bool = False,
) -> TrainResult:
    """Train ``model``'s trainable parameters (a PEFT model, or a ReftModel with ``reft=True``) with
    ``Trainer``; ``hparams.batch_size`` is the global batch, split evenly over the processes."""
    from transformers import PrinterCallback

    processes = _check(model, examples, hparams)
    started = time.perf_counter()
    result = TrainResult(
        args={**hparams.record(), "trainer": "transformers.Trainer", "processes": processes},
        planned_steps=hparams.epochs * math.ceil(len(examples) / hparams.batch_size),
    )
    output = tempfile.mkdtemp(prefix="hub_peft_trainer_")  # Trainer wants a folder; nothing is saved there
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    progress = _callback(result, started, hparams.target_loss, callbacks or Callbacks())
    trainer = _trainer_class()(
        model=model,
        args=_training_arguments(output, hparams, processes, on_cpu),
        train_dataset=_Rows(examples),
        data_collator=_collate(reft),
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # progress is the caller's (tqdm in the CLI, gr.Progress in the Space)
    trainer.model_accepts_loss_kwargs = True  # count the global batch's tokens and pass them to compute_loss
    progress.trainer = trainer
    model.train()
    try:
        trainer.train()
    finally:
        model.eval()
        result.seconds = time.perf_counter() - started
        shutil.rmtree(output, ignore_errors=True)
    return result
