#!/usr/bin/env bash
# Creates .venv and installs vlm-peft with its test extras. Sourced by the other scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin the CPU build first: an unpinned torch requirement would pull a multi-GB CUDA build.
# On a GPU machine, install the torch build you want before running this script.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# lmms-eval (the `lmms-eval` extra) for tests/test_lmms_eval.py: its own requirements would replace torch
# with a CUDA build (through torchvision), so it comes without them, plus what its imports and its CLI need.
python -m pip install -q --no-deps "lmms-eval==0.7.3"
python -m pip install -q pytz loguru sacrebleu evaluate pytablewriter
# The web page's browser test drives Debian's chromium through Selenium (no browser download). Best effort:
# without apt-get (or without root) the test skips and says why.
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
    >/dev/null 2>&1 || echo "setup: could not install chromium (the web page test will skip)" >&2
fi
