#!/usr/bin/env bash
# Reproduces the Medusa heads shipped for SmolLM2-135M-Instruct
# (python/medusa_rt/data/smollm2-135m/medusa_heads.safetensors). See docs/TRAINING.md.
#   bash scripts/train_default_heads.sh [WORK_DIR]
# Needs torch (pip install torch==2.13.0, then pip install '.[train]'). Resumable: rerun with the
# same WORK_DIR after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$HOME/.cache/medusa_rt/train-smollm2-135m}
OUT=$WORK/medusa_heads.safetensors
medusa-rt train-heads "$OUT" --model smollm2-135m --dtype bf16 --work-dir "$WORK" \
  --prompts 1152 --max-new-tokens 256 --batch 8 --heads 4 --layers 2 --layout shared \
  --epochs 2 --lr 1e-3 --batch-size 256 --seed 0 --tree-nodes 64 --overwrite
# Mark the file as the shipped heads (the registry installs them into the model's cache
# directory and replaces only heads it installed itself), then copy it into the package.
python - "$OUT" <<'PY'
import sys
from medusa_rt.export.medusa_heads import update_heads_metadata
from medusa_rt.registry import SHIPPED_SOURCE
update_heads_metadata(sys.argv[1], {"source": SHIPPED_SOURCE})
PY
mkdir -p python/medusa_rt/data/smollm2-135m
cp "$OUT" python/medusa_rt/data/smollm2-135m/medusa_heads.safetensors
cp "$WORK/report.json" python/medusa_rt/data/smollm2-135m/training_report.json
echo "shipped heads updated; evaluate with: medusa-rt eval-heads"
