#!/usr/bin/env python3
"""Decode speed of the engine (fp32, bf16 weights) and of HF transformers (fp32), measured
side by side in one run on the same machine. Prints JSON to stdout, progress to stderr.

    python bench/bench_decode.py                    # SmolLM2-135M, 128 new tokens
    python bench/bench_decode.py --no-hf --repeats 5

Decode tokens/s excludes the prompt's prefill: (new_tokens - 1) / (time after the first
token). Every run generates exactly --new-tokens tokens (EOS ignored), greedily.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import medusa_rt

PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "List five tips for writing clean Python code.",
]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def bench_engine(model: str, dtype: str, prompts: List[List[int]], new_tokens: int, repeats: int) -> Dict:
    engine = medusa_rt.Engine(model, dtype=dtype, max_seq_len=1024)
    decode, total = [], []
    with engine.session() as s:
        s.generate(prompts[0], max_new_tokens=8, ignore_eos=True)  # warm-up
        for r in range(repeats):
            for i, p in enumerate(prompts):
                res = s.generate(p, max_new_tokens=new_tokens, ignore_eos=True)
                assert res.stats.new_tokens == new_tokens
                decode.append(res.stats.decode_tokens_per_second)
                total.append(res.stats.tokens_per_second)
                log(f"engine {dtype} repeat {r + 1}/{repeats} prompt {i + 1}/{len(prompts)}: "
                    f"{res.stats.decode_tokens_per_second:.1f} decode tok/s")
    return {
        "decode_tokens_per_second": statistics.median(decode),
        "tokens_per_second_incl_prefill": statistics.median(total),
        "samples": len(decode),
        "isa": engine.info.isa,
        "threads": engine.info.num_threads,
        "weight_bytes": engine.info.weight_bytes,
    }


def bench_hf(model_dir: Path, prompts: List[List[int]], new_tokens: int, repeats: int) -> Dict:
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    hf_cfg = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
        max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg["rope"]["theta"], tie_word_embeddings=cfg["tie_word_embeddings"],
    )
    model = LlamaForCausalLM(hf_cfg).eval()
    state = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    model.load_state_dict(state, strict=False)
    if cfg["tie_word_embeddings"]:
        model.tie_weights()

    def run(ids: List[int], n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == len(ids) + n
        return time.perf_counter() - t

    run(prompts[0], 4)  # warm-up
    decode, total = [], []
    for r in range(repeats):
        for i, p in enumerate(prompts):
            t_first = run(p, 1)
            t_all = run(p, new_tokens)
            decode.append((new_tokens - 1) / max(t_all - t_first, 1e-9))
            total.append(new_tokens / t_all)
            log(f"hf fp32 repeat {r + 1}/{repeats} prompt {i + 1}/{len(prompts)}: {decode[-1]:.1f} decode tok/s")
    return {
        "decode_tokens_per_second": statistics.median(decode),
        "tokens_per_second_incl_prefill": statistics.median(total),
        "samples": len(decode),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    args = ap.parse_args()

    engine = medusa_rt.Engine(args.model, dtype="fp32", max_seq_len=64)  # resolves / pulls once
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(p), add_special_tokens=False) for p in PROMPTS]
    model_dir = engine.model_dir
    del engine

    results: Dict[str, Dict] = {}
    for dtype in ("fp32", "bf16"):
        log(f"engine {dtype} ...")
        results[f"engine_{dtype}"] = bench_engine(args.model, dtype, prompts, args.new_tokens, args.repeats)
    if not args.no_hf:
        log("hf transformers fp32 ...")
        results["hf_fp32"] = bench_hf(Path(model_dir), prompts, args.new_tokens, args.repeats)

    ratios = {}
    if "hf_fp32" in results:
        hf = results["hf_fp32"]["decode_tokens_per_second"]
        for dtype in ("fp32", "bf16"):
            ratios[f"engine_{dtype}_vs_hf_fp32"] = results[f"engine_{dtype}"]["decode_tokens_per_second"] / hf
    ratios["engine_bf16_vs_engine_fp32"] = (
        results["engine_bf16"]["decode_tokens_per_second"] / results["engine_fp32"]["decode_tokens_per_second"]
    )
    report = {
        "benchmark": "decode",
        "model": args.model,
        "new_tokens": args.new_tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "results": results,
        "ratios": ratios,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
