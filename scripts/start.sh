#!/usr/bin/env bash
# README command 1: set up, then start the local Hub and the Adapter Studio Space on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/hub-peft studio "$@"
