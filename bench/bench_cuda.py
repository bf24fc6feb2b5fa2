"""CUDA benchmark: a Llama-7B-shaped model with random fp16 weights on one GPU, everything measured
in one run and printed as JSON (and written to --json):

- decode-step latency (forward of one token at batch 1) against the memory roofline: weight bytes
  divided by the device copy bandwidth measured in the same run (bytes read + written per second,
  through PyTorch);
- verify-step latency (forward of a tree with logits of every node, plus the Medusa heads) for
  trees of 1 to 64 nodes, and the ratio to the decode step;
- greedy generation tokens/s and time per step with and without Medusa (the fused step: tree
  rows, forward, acceptance, KV compaction and heads on the device, replayed from a CUDA graph;
  random heads accept ~nothing, so this measures a verify step's cost, not a speed-up);
- CUDA-graph replay against eager launches (MEDUSA_RT_CUDA_GRAPHS=0) on a SmolLM2-135M-shaped
  model at batch 1, plain and Medusa steps (the shipped SmolLM2 heads' 128-node default tree), and
  that model's verify steps of 1 to 128 nodes (whether 128-node trees are as cheap there as the
  shipped tree's size assumes);
- PyTorch eager decoding of the same shapes with the same fp16 weights on the same GPU (the peer):
  one token per step with a static KV cache, F.scaled_dot_product_attention.

`--shape tiny --small-shape tiny --device cpu` runs the whole script on a small model on the CPU (a smoke
test of the script itself; the numbers then mean nothing).

    python bench/bench_cuda.py --json out.json [--shape 7b] [--device cuda|cpu] [--context 128]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    # Llama-2-7B / Vicuna-7B: hidden 4096, 32 layers, FFN 11008, 32 heads, vocab 32000.
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    # SmolLM2-135M: the small model for graph replay vs eager launches.
    "small": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}
TREE_SIZES = [1, 2, 4, 8, 16, 32, 64]
SMALL_TREE_SIZES = TREE_SIZES + [128]


def say(msg: str) -> None:
    print(f"[bench_cuda] {msg}", file=sys.stderr, flush=True)


def tensor_shapes(c: dict) -> dict:
    H, F, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    hd = H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
            p + "mlp.gate_proj.weight": (F, H), p + "mlp.up_proj.weight": (F, H), p + "mlp.down_proj.weight": (H, F),
        })
    return shapes


def random_fp16(shape, pool: np.ndarray, offset: int) -> np.ndarray:
    """Weights ~ N(0, 0.02) (norms: 1) cut from a pool of random values at a per-tensor offset:
    fast for 6.7B weights, and every matrix still differs."""
    n = int(np.prod(shape))
    if len(shape) == 1:
        return np.ones(n, np.float16)
    start = offset % (pool.size - 1)
    reps = (start + n) // pool.size + 1
    return np.tile(pool, reps)[start:start + n].reshape(shape) if reps > 1 else pool[start:start + n].reshape(shape)


def write_safetensors(path: Path, tensors: dict, make, metadata=None) -> None:
    """Streams tensors (name -> shape; make(name, shape) gives the fp16 array) into one file."""
    header, off = {}, 0
    for name, shape in tensors.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, shape in tensors.items():
            f.write(np.ascontiguousarray(make(name, shape), dtype=np.float16).tobytes())


def build_model(out: Path, c: dict, num_heads: int = 4) -> None:
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24) * 0.02).astype(np.float16)
    cfg = {"format": "medusa_rt", "format_version": 1, "architecture": "llama", **c,
           "head_dim": c["hidden_size"] // c["num_attention_heads"], "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope": {"theta": 10000.0, "type": "default"}, "tie_word_embeddings": False,
           "attention_bias": False, "sliding_window": None, "bos_token_id": 1, "eos_token_ids": [2],
           "pad_token_id": None, "weight_dtype": "float16", "tokenizer": None, "medusa": None,
           "source": {"kind": "random", "name": "bench_cuda"}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    shapes = tensor_shapes(c)
    offsets = {n: i * 7919 * 131 for i, n in enumerate(shapes)}
    write_safetensors(out / "model.safetensors", shapes, lambda n, s: random_fp16(s, pool, offsets[n]))
    H = c["hidden_size"]
    heads = {}
    for k in range(num_heads):
        heads[f"medusa.{k}.0.weight"] = (H, H)
        heads[f"medusa.{k}.0.bias"] = (H,)
    meta = {"format": "medusa_rt_heads", "format_version": "1", "num_heads": str(num_heads), "num_layers": "1",
            "shared_lm_head": "true", "hidden_size": str(H), "vocab_size": str(c["vocab_size"]),
            "default_tree": "mc_sim_7b_63", "source": "bench_cuda random heads"}
    write_safetensors(out / "medusa_heads.safetensors", heads,
                      lambda n, s: random_fp16(s, pool, 977 * len(n)) if len(s) == 2 else np.zeros(s, np.float16), meta)


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy (best of 5)."""
    import torch

    n = (1 << 31) // 4 if device == "cuda" else (1 << 27) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    best = 1e30
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * 4 * n / best


def torch_eager_decode(model_dir: Path, c: dict, device: str, context: int, steps: int) -> dict:
    """A plain Llama decode loop in PyTorch eager mode, fp16 weights read from the same file."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    w = {k: v.to(device) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    H, L = c["hidden_size"], c["num_hidden_layers"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = H // nh
    dt = torch.float16
    maxlen = context + steps + 1
    kc = torch.zeros(L, 1, nkv, maxlen, hd, dtype=dt, device=device)
    vc = torch.zeros_like(kc)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    ang = torch.arange(maxlen, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)

    def rms(x, g):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dt) * g

    def rope(x, pos):
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        cc, ss = cos[pos], sin[pos]
        return torch.cat([a * cc - b * ss, b * cc + a * ss], -1)

    @torch.no_grad()
    def step(tok: int, pos: int) -> int:
        x = w["model.embed_tokens.weight"][tok][None, :]
        for i in range(L):
            p = f"model.layers.{i}."
            h = rms(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(1, nh, 1, hd)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(1, nkv, 1, hd)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(1, nkv, 1, hd)
            q, k = rope(q, pos), rope(k, pos)
            kc[i, :, :, pos:pos + 1] = k
            vc[i, :, :, pos:pos + 1] = v
            a = F.scaled_dot_product_attention(q, kc[i, :, :, : pos + 1], vc[i, :, :, : pos + 1],
                                               enable_gqa=nkv != nh)
            x = x + a.reshape(1, H) @ w[p + "self_attn.o_proj.weight"].T
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            x = x + (F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ \
                w[p + "mlp.down_proj.weight"].T
        logits = rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T
        return int(logits.argmax())

    tok = 1
    for pos in range(context):  # fill the cache one token at a time (not timed)
        tok = step(tok, pos)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for pos in range(context, context + steps):
        tok = step(tok, pos)  # int(argmax) synchronises every step, as a real decode loop must
    dt_s = (time.perf_counter() - t0) / steps
    del w
    return {"step_ms": 1e3 * dt_s, "tokens_per_s": 1.0 / dt_s}


def generation(e, c: dict, context: int, steps: int) -> dict:
    """Plain and Medusa greedy generation of `steps` tokens after a random `context` prompt
    (after one warm-up generation, which also records the step's CUDA graph)."""
    from medusa_rt import _core

    prompt = [int(t) for t in np.random.default_rng(1).integers(3, c["vocab_size"], context)]
    s = e.session(0.0)
    out = {}
    for medusa in (False, True):
        cfg = _core.GenerationConfig()
        cfg.max_new_tokens = steps
        cfg.ignore_eos = True
        cfg.medusa = medusa
        s.reset()
        s.generate(prompt, cfg, None)
        s.reset()
        r = s.generate(prompt, cfg, None).stats
        tps = r.decode_tokens_per_second
        out["medusa" if medusa else "plain"] = {
            "decode_tokens_per_s": round(tps, 2), "tokens_per_step": round(r.tokens_per_step, 3),
            "step_ms": round(1e3 * r.tokens_per_step / tps, 3) if tps else None}
    del s
    return out


def engine_for(model_dir: Path, device: str, max_seq_len: int, graphs: bool = True, tree_paths=None):
    """An fp16 engine with the random heads, Medusa at batch 1, and the 64-node tree
    (or the given paths)."""
    from medusa_rt import _core

    os.environ["MEDUSA_RT_CUDA_GRAPHS"] = "1" if graphs else "0"  # read when the backend is created
    opts = _core.EngineOptions()
    opts.device = device
    opts.dtype = "fp16"
    opts.max_seq_len = max_seq_len
    opts.medusa_max_batch = 1
    if tree_paths:
        opts.tree_paths = tree_paths
    else:
        opts.tree = "mc_sim_7b_63"
    return _core.Engine(str(model_dir), opts)


def shipped_tree() -> list:
    """The default tree of the heads shipped for SmolLM2-135M (128 nodes)."""
    import medusa_rt
    from medusa_rt.export.safetensors_io import SafetensorsFile

    with SafetensorsFile(Path(medusa_rt.__file__).parent / "data" / "smollm2-135m" / "medusa_heads.safetensors") as f:
        return json.loads(f.metadata["default_tree"])


def verify_steps(e, sizes) -> dict:
    """Forward (+ heads) time of trees of each size, from the engine's own hook: the engine's tree
    cut to that size, written at the start of an empty cache (its rows attend over the tree's keys
    only), host-built rows, eager launches; and each as a multiple of the 1-node step."""
    from medusa_rt import _core

    steps = {}
    for n in sizes:
        fwd, heads = _core._testing.time_tree_step(e, n, 10)
        steps[n] = {"forward_ms": round(1e3 * fwd, 4), "heads_ms": round(1e3 * heads, 4),
                    "step_ms": round(1e3 * (fwd + heads), 4)}
    for n in sizes:
        steps[n]["x_decode"] = round(steps[n]["step_ms"] / steps[sizes[0]]["forward_ms"], 3)
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--small-shape", choices=sorted(SHAPES), default="small", help="model of the graph comparison")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke test of the script)")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens before the timed generation")
    ap.add_argument("--steps", type=int, default=32, help="tokens generated per timed generation")
    ap.add_argument("--work", default="", help="where to write the random models (default: a temporary dir)")
    ap.add_argument("--json", default="", help="also write the JSON here")
    ap.add_argument("--no-peer", action="store_true", help="skip the PyTorch eager peer")
    args = ap.parse_args(argv)

    c = SHAPES[args.shape]
    result = {"shape": args.shape, "config": c, "context": args.context, "steps": args.steps}
    need = 2.3 * sum(int(np.prod(v)) for v in tensor_shapes(c).values())  # fp16 model + the small one
    shm = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > need
    tmp = None if args.work else tempfile.TemporaryDirectory(dir="/dev/shm" if shm else None)
    root = Path(args.work or tmp.name)
    work = root / f"llama-{args.shape}-random"
    t0 = time.time()
    if not (work / "model.safetensors").exists():
        say(f"writing a random {args.shape} model to {work}")
        build_model(work, c)
    result["model_write_s"] = round(time.time() - t0, 1)

    say("loading the engine")
    t0 = time.time()
    e = engine_for(work, args.device, args.context + 256)
    info = e.info
    result["engine_load_s"] = round(time.time() - t0, 1)
    result["device"] = info.device
    result["weight_bytes"] = info.weight_bytes
    say(f"{info.device}: {info.weight_bytes / 1e9:.2f} GB of weights (heads included)")

    result["verify_steps"] = steps = verify_steps(e, TREE_SIZES)
    decode_ms = steps[1]["forward_ms"]
    say("verify steps: " + ", ".join(f"{n}: {v['step_ms']:.2f} ms" for n, v in steps.items()))

    bw = copy_bandwidth(args.device) if args.device == "cuda" else None
    roofline_ms = 1e3 * info.weight_bytes / bw if bw else None
    result["copy_bandwidth_GBps"] = round(bw / 1e9, 1) if bw else None
    result["decode"] = {"step_ms": decode_ms, "roofline_ms": round(roofline_ms, 3) if roofline_ms else None,
                        "x_roofline": round(decode_ms / roofline_ms, 3) if roofline_ms else None}

    # Generation: the fused step, from CUDA graphs.
    result["generation"] = gen = generation(e, c, args.context, args.steps)
    say(f"generation: {gen}")
    del info, e  # frees the GPU memory (info keeps the engine alive)

    # CUDA graphs against eager launches, small model, batch 1.
    small = root / f"llama-{args.small_shape}-random"
    if not (small / "model.safetensors").exists():
        build_model(small, SHAPES[args.small_shape])
    tree = shipped_tree()
    graphs = {"shape": args.small_shape, "tree_nodes": len(tree) + 1}
    for on in (True, False):
        es = engine_for(small, args.device, args.context + 256, graphs=on, tree_paths=tree)
        graphs["graphs" if on else "eager"] = generation(es, SHAPES[args.small_shape], args.context, args.steps)
        if on:
            result["small_verify_steps"] = verify_steps(es, SMALL_TREE_SIZES)
            say("small model's verify steps: " + ", ".join(
                f"{n}: {v['step_ms']:.3f} ms" for n, v in result["small_verify_steps"].items()))
        del es
    os.environ.pop("MEDUSA_RT_CUDA_GRAPHS", None)
    for kind in ("plain", "medusa"):
        g, ea = graphs["graphs"][kind]["step_ms"], graphs["eager"][kind]["step_ms"]
        graphs[f"{kind}_eager_over_graphs"] = round(ea / g, 3) if g and ea else None
    result["cuda_graphs"] = graphs
    say(f"graphs vs eager: {graphs}")

    if not args.no_peer:
        try:
            say("PyTorch eager peer")
            peer = torch_eager_decode(work, c, args.device, args.context, args.steps)
            result["torch_eager"] = peer
            result["torch_eager_over_engine"] = round(peer["step_ms"] / gen["plain"]["step_ms"], 3)
        except Exception as ex:  # the peer is optional; say why it is missing
            result["torch_eager"] = f"failed: {type(ex).__name__}: {ex}"
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
