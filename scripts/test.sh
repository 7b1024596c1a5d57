#!/usr/bin/env bash
# The test command: sets up .venv, lints, runs the whole suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check vlm_peft data_tools tests bench
export VLM_PEFT_REQUIRE_OPTIONAL=1  # lmms-eval, openai, fastapi are installed above: their tests must run
python -m pytest -q "$@"
# Every benchmark at toy size, so the scripts cannot rot (timings are never asserted).
python -m bench --quick
