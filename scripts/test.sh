#!/usr/bin/env bash
# README command 2: set up (Python packages, and Chromium for the browser test), lint, then run the whole test
# suite (pytest's "no tests" exit code 5 fails too).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/browser_deps.sh
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
.venv/bin/ruff check hub_peft tests benchmarks spaces scripts
.venv/bin/ruff format --check hub_peft tests benchmarks spaces scripts
.venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
.venv/bin/mypy
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
