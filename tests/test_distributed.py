"""``hub-peft train`` data-parallel under ``accelerate launch``: two CPU processes (gloo) train the same adapter
as one process with the same global batch, and only the main process writes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_peft_methods import load_tiny, tiny_base_repo  # noqa: F401 - shared session fixture

from hub_peft import load_adapter
from hub_peft.hub.process import free_port

ROWS = [{"prompt": f"w{i} w{i + 1}", "response": f"w{i + 2} w{i + 3} w{i}"} for i in range(20)]


def train(
    tmp_path, name: str, method: str, *extra: str, processes: int = 1, launcher: tuple[str, ...] = ("--multi_gpu",)
) -> tuple[dict, subprocess.CompletedProcess]:
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    command = ["-m", "hub_peft.cli", "train", "--examples", str(examples), "--method", method]
    command += ["--base", "alice/tiny-llama", "--out", str(tmp_path / name), "--epochs", "3", "--batch-size", "4"]
    command += ["--lr", "0.02", "--no-validation", *extra]
    if method == "reft":
        command += ["--layers", "1"]
    if processes > 1:  # accelerate's own launcher (torchrun underneath); on a CPU-only machine it uses gloo
        command = [
            "-m",
            "accelerate.commands.launch",
            *launcher,
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(free_port()),
            *command,
        ]
    out = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, env=os.environ)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / name / "hub_peft_card.json").read_text()), out


@pytest.mark.parametrize("method", ["lora", "reft"])
def test_two_processes_train_what_one_process_trains(method, tiny_base_repo, tmp_path):  # noqa: F811
    one, _ = train(tmp_path, "one", method, "--trainer", "transformers")
    two, out = train(tmp_path, "two", method, processes=2)
    assert one["training_args"]["processes"] == 1 and two["training_args"]["processes"] == 2
    assert two["training_args"]["trainer"] == one["training_args"]["trainer"] == "transformers.Trainer"
    losses = [[h["loss"] for h in card["history"]] for card in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 15  # 3 epochs of 5 global batches of 4
    # the same global batches and the same global token mean: equal up to float rounding through 15 AdamW steps
    gap = max(abs(a - b) for a, b in zip(*losses, strict=True))
    print(f"{method}: 15 step losses, one process vs two: largest difference {gap:.1e}")
    assert gap < 1e-3, losses
    assert losses[1][-1] < losses[1][0]
    assert out.stdout.count("saved ") == 1 and out.stdout.count("trained 15 steps") == 1  # the main process only
    model = load_adapter(load_tiny(), tmp_path / "two")
    assert model is not None
    if method == "reft":  # one process and the default trainer: hub_peft's cached ReFT trainer
        auto, _ = train(tmp_path, "auto", method)
        assert auto["training_args"]["trainer"] == "hub_peft.reft.train_reft(method='cached')"
    else:  # accelerate's --cpu runs one process whatever --num_processes says: the user is told, not misled
        alone, out = train(tmp_path, "cpu", method, processes=2, launcher=("--cpu",))
        assert alone["training_args"]["processes"] == 1 and "started a single process" in out.stderr
