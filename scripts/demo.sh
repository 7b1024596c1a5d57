#!/usr/bin/env bash
# The main job: the demo recipe end to end on CPU. Sets up .venv, synthesizes the shapes data,
# trains stage align (projector) and stage sft (projector + LoRA), prints held-out accuracy.
# Extra arguments go to `vlm-peft train`, e.g. --overwrite or --set stages.sft.args.max_steps=600.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
python -m data_tools.synth runs/demo/data
vlm-peft train recipes/demo.yaml "$@"
echo "demo wall time (after install): $(( $(date +%s) - start )) s"
