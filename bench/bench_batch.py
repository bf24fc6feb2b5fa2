#!/usr/bin/env python3
"""Batched decoding on SmolLM2-135M: total tokens/s and per-request latency for batch sizes
1, 2, 4, 8, 16, Medusa on and off, measured in one run. JSON on stdout, progress on stderr.

No trained heads ship yet: the Medusa rows use random heads (about 1 token per step), so they
show the cost of speculation, not its benefit. medusa_max_batch is set to the batch size so every
step of a Medusa row verifies trees (the engine's policy would otherwise turn them off).

    python bench/bench_batch.py [--dtype bf16] [--new-tokens 64] [--sizes 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import medusa_rt

from bench_medusa import PROMPTS, log, model_with_random_heads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--tree", default="chain-3", help="tree for the Medusa rows")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]

    base = medusa_rt.Engine(args.model, dtype=args.dtype, max_seq_len=64)
    tok = base.tokenizer
    texts = [tok.apply_chat_template(p) for p in PROMPTS]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    model_dir = base.model_dir
    del base

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = model_with_random_heads(model_dir, Path(tmp))
        for medusa in (False, True):
            for b in sizes:
                engine = medusa_rt.Engine(d, dtype=args.dtype, max_seq_len=512, max_batch_size=b,
                                          medusa_max_batch=b, tree=args.tree)
                batch = [prompts[i % len(prompts)] for i in range(b)]
                engine.generate_batch(batch[:1], max_new_tokens=4, ignore_eos=True, medusa=medusa)  # warm-up
                log(f"medusa={medusa} batch {b} ...")
                t = time.perf_counter()
                # Every request prefills its whole prompt (the warm-up left the first one cached).
                res = engine.generate_batch(batch, max_new_tokens=args.new_tokens, ignore_eos=True, medusa=medusa,
                                            reuse_context=False)
                wall = time.perf_counter() - t
                total = sum(r.stats.new_tokens for r in res)
                rows.append({
                    "medusa": medusa,
                    "batch": b,
                    "total_tokens_per_second": total / wall,
                    "request_latency_seconds": statistics.median(r.stats.seconds for r in res),
                    "tokens_per_step": statistics.median(r.stats.tokens_per_step for r in res),
                    "tree_steps": statistics.median(r.stats.tree_steps for r in res),
                })
                del engine
    plain = {r["batch"]: r["total_tokens_per_second"] for r in rows if not r["medusa"]}
    for r in rows:
        r["vs_plain_same_batch"] = r["total_tokens_per_second"] / plain[r["batch"]]
    print(json.dumps({"benchmark": "batch", "model": args.model, "dtype": args.dtype, "tree": args.tree,
                      "heads": "random (4 heads, shared lm_head)", "new_tokens": args.new_tokens, "rows": rows},
                     indent=2))
    print(f"{'medusa':>6} {'batch':>5} {'tok/s':>8} {'latency s':>9} {'tok/step':>8}", file=sys.stderr)
    for r in rows:
        print(f"{str(r['medusa']):>6} {r['batch']:>5} {r['total_tokens_per_second']:>8.1f} "
              f"{r['request_latency_seconds']:>9.2f} {r['tokens_per_step']:>8.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
