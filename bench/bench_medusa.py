#!/usr/bin/env python3
"""Medusa on SmolLM2-135M, measured side by side in one run; JSON on stdout, progress on stderr.

1. Verify-step latency against tree size (1, 4, 8, 16, 32, 64 nodes: the first nodes of
   mc_sim_7b_63) next to a plain decode step: milliseconds per step in model + head forwards.
2. Medusa vs plain decoding tokens/s and tokens per step, with the heads the model has. No
   trained heads ship yet, so the benchmark uses random heads (they accept about nothing: ~1
   token per step, so Medusa is slower than plain decoding here) and, as an upper bound, the test
   oracle that feeds the true continuation as candidates (perfect heads; not a real model).

    python bench/bench_medusa.py [--dtype bf16] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np

import medusa_rt
from medusa_rt import _core
from medusa_rt.export import export_medusa_heads
from medusa_rt.export.safetensors_io import TensorToWrite, write_safetensors
from medusa_rt.export.writer import COMPLETE_MARKER

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "List five tips for writing clean Python code.",
]
TREE_SIZES = [1, 4, 8, 16, 32, 64]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def model_with_random_heads(model_dir: Path, work: Path, num_heads: int = 4, seed: int = 0) -> Path:
    """A model directory of symlinks to model_dir plus random shared-lm_head heads."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d = work / "model"
    d.mkdir()
    for f in model_dir.iterdir():
        if f.name == COMPLETE_MARKER:
            shutil.copy(f, d / f.name)
        elif f.name != "medusa_heads.safetensors":
            (d / f.name).symlink_to(f.resolve())
    rs = np.random.RandomState(seed)
    h = cfg["hidden_size"]
    src = work / "heads"
    src.mkdir()
    items = []
    for k in range(num_heads):
        w = (rs.randn(h, h) * 0.02).astype(np.float32)
        b = (rs.randn(h) * 0.02).astype(np.float32)
        items.append(TensorToWrite(f"{k}.0.linear.weight", "F32", w.shape, lambda w=w: w))
        items.append(TensorToWrite(f"{k}.0.linear.bias", "F32", b.shape, lambda b=b: b))
    write_safetensors(src / "medusa_lm_head.safetensors", items)
    export_medusa_heads(src, d, progress=False)
    return d


def steps_ms(engine: "medusa_rt.Engine", prompts: List[List[int]], new_tokens: int, **kw) -> Dict:
    per_step, tps, tok_s = [], [], []
    with engine.session() as s:
        s.generate(prompts[0], max_new_tokens=4, ignore_eos=True, **kw)  # warm-up
        for p in prompts:
            r = s.generate(p, max_new_tokens=new_tokens, ignore_eos=True, **kw)
            st = r.stats
            # forward time of the decode steps: total forward minus the prefill's share
            per_step.append(1000 * (st.forward_seconds - st.prefill_seconds) / max(st.steps, 1))
            tps.append(st.tokens_per_step)
            tok_s.append(st.decode_tokens_per_second)
    return {"step_ms": statistics.median(per_step), "tokens_per_step": statistics.median(tps),
            "decode_tokens_per_second": statistics.median(tok_s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()

    base = medusa_rt.Engine(args.model, dtype=args.dtype, max_seq_len=64)
    tok = base.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(p), add_special_tokens=False) for p in PROMPTS]
    model_dir = base.model_dir
    has_heads = base.info.medusa_heads > 0
    del base

    report: Dict = {"benchmark": "medusa", "model": args.model, "dtype": args.dtype, "new_tokens": args.new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        d = model_dir if has_heads else model_with_random_heads(model_dir, Path(tmp))
        report["heads"] = "model's own" if has_heads else "random (4 heads, shared lm_head)"
        full = _core.TreeSpec.named("mc_sim_7b_63")

        log("plain decode step ...")
        plain_engine = medusa_rt.Engine(d, dtype=args.dtype, max_seq_len=1024)
        plain = steps_ms(plain_engine, prompts, args.new_tokens, medusa=False)
        report["plain"] = plain

        sizes = []
        for n in TREE_SIZES:
            log(f"verify step, tree of {n} nodes ...")
            tree = [list(p) for p in full.truncated(n).paths] if n > 1 else "chain-0"
            e = medusa_rt.Engine(d, dtype=args.dtype, max_seq_len=1024, tree=tree)
            r = steps_ms(e, prompts, args.new_tokens)
            r["nodes"] = n
            r["step_vs_plain"] = r["step_ms"] / plain["step_ms"]
            sizes.append(r)
            del e
        report["verify_step_vs_tree_size"] = sizes

        log("Medusa with the default tree vs plain ...")
        e = medusa_rt.Engine(d, dtype=args.dtype, max_seq_len=1024)
        med = steps_ms(e, prompts, args.new_tokens)
        # Oracle: the true continuation as candidates (upper bound for perfect heads).
        oracle_tps, oracle_rate = [], []
        with e.session() as s:
            for p in prompts:
                want = s.generate(p, max_new_tokens=args.new_tokens, ignore_eos=True, medusa=False).tokens
                _core._testing.set_oracle(s._core(), p + want, vary_rank=False)
                r = s.generate(p, max_new_tokens=args.new_tokens, ignore_eos=True)
                assert r.tokens == want
                _core._testing.set_oracle(s._core(), [])
                oracle_tps.append(r.stats.tokens_per_step)
                oracle_rate.append(r.stats.decode_tokens_per_second)
        report["medusa_default_tree"] = {
            "tree": e.info.tree, "nodes": e.info.tree_nodes, **med,
            "speedup_vs_plain": med["decode_tokens_per_second"] / plain["decode_tokens_per_second"],
        }
        report["oracle_upper_bound"] = {
            "tokens_per_step": statistics.median(oracle_tps),
            "decode_tokens_per_second": statistics.median(oracle_rate),
            "speedup_vs_plain": statistics.median(oracle_rate) / plain["decode_tokens_per_second"],
        }
        report["threads"] = e.info.num_threads
        del e, plain_engine
    print(json.dumps(report, indent=2))
    rows = [f"{'nodes':>5} {'ms/step':>8} {'x plain':>8}"] + [
        f"{r['nodes']:>5} {r['step_ms']:>8.2f} {r['step_vs_plain']:>8.2f}" for r in report["verify_step_vs_tree_size"]]
    print("\n".join(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
