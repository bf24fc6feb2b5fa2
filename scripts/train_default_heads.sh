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
# The self-written prompts' candidates as they were sampled for the shipped heads (NumPy draws
# over this engine's bf16 logits on an AVX-512 EPYC; another machine's kernels can draw others):
# stored candidates are reused, not sampled again.
mkdir -p "$WORK"
if [ ! -e "$WORK/self_prompts.jsonl" ]; then
  gunzip -c scripts/data/smollm2-135m/self_prompts.jsonl.gz > "$WORK/self_prompts.jsonl"
  cp scripts/data/smollm2-135m/self_prompts.json "$WORK/self_prompts.json"
fi
medusa-rt train-heads "$OUT" --model smollm2-135m --dtype bf16 --work-dir "$WORK" \
  --prompts 1728 --everyday-prompts 170 --self-prompts 4000 --max-new-tokens 256 --batch 32 --heads 4 --layers 2 \
  --layout shared --path-input --epochs 2 --lr 1e-3 --batch-size 256 --seed 0 --tree-nodes 128 \
  --feature-layers 8,16,24 --distill 0.5 --overwrite
# The accuracy table `tree="auto"` predicts from: measured on the development prompts (unlike the
# training templates; the template held-out table overstates acceptance). The default tree stays
# the one fitted at training. Then mark the file as the shipped heads (the registry installs them
# into the model's cache directory and replaces only heads it installed itself).
python - "$OUT" "$WORK" <<'PY'
import json, subprocess, sys
from pathlib import Path
import medusa_rt
from medusa_rt.export.medusa_heads import update_heads_metadata
from medusa_rt.registry import SHIPPED_SOURCE
from medusa_rt.train import data, tree_fit
from medusa_rt.train.evaluate import load_eval_prompts
from medusa_rt.train.heads_np import RuntimeHeads
out, work = sys.argv[1], Path(sys.argv[2])
dev = Path(medusa_rt.__file__).parent / "data" / "dev_prompts.json"
engine = medusa_rt.Engine("smollm2-135m", dtype="bf16", max_batch_size=8, max_seq_len=1024, medusa_max_batch=0)
data.generate_answers(engine, load_eval_prompts(dev), work / "dev", max_new_tokens=128)
fit = json.loads(subprocess.check_output(["medusa-rt", "-q", "fit-tree", "--medusa-heads", out,
                                          "--answers", str(work / "dev" / "answers.jsonl")]))
table = fit["accuracy_table"]
tree = json.loads(RuntimeHeads.load(out, config=json.loads((engine.model_dir / "config.json").read_text()))
                 .metadata["default_tree"])
update_heads_metadata(out, {"accuracy_table": json.dumps(table),
                            "expected_tokens_per_step": f"{tree_fit.expected_tokens_per_step(table, tree):.4f}",
                            "accuracy_table_source": "the development prompts (python/medusa_rt/data/dev_prompts.json)",
                            "source": SHIPPED_SOURCE})
PY
mkdir -p python/medusa_rt/data/smollm2-135m
cp "$OUT" python/medusa_rt/data/smollm2-135m/medusa_heads.safetensors
cp "$WORK/report.json" python/medusa_rt/data/smollm2-135m/training_report.json
echo "shipped heads updated; evaluate with: medusa-rt eval-heads"
