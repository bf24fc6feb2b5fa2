"""``medusa-rt bench``: the CPU benchmark suite, every number measured in one run on one machine.

Sections (SmolLM2-135M by default, greedy, 128 new tokens):

- machine: CPU, cores, the engine's kernel set (``avx512``, ``avx2`` or ``generic``: runtime
  dispatch, capped by ``MEDUSA_RT_ISA``), streaming read bandwidth and fp32 FMA peak (all cores,
  measured here), and whether the backend's memory is on transparent huge pages;
- decode: engine autoregressive decode tokens/s with fp32, bf16, fp16 and int8 weights (int8:
  weight-only, quantized at load, a byte per weight and an fp32 scale per 32), next to the
  memory-bandwidth bound (weight bytes per token / streaming bandwidth measured on a buffer of
  that size);
- medusa (bf16, fp32, int8): engine with the model's Medusa heads and its tree (``auto`` = sized to this machine)
  against plain decoding of the same prompts (held-out evaluation prompts; greedy, so both produce
  the same tokens): tokens/s, tokens per step, speedup; and the same sampling (``SAMPLED``:
  temperature 0.7, top-p 0.9, one seed per prompt; lossless, so again the same tokens);
- verify: one verify step's latency against tree size (first nodes of mc_sim_7b_63) next to a
  plain decode step, both after 256 cached tokens (median ratios over interleaved rounds), and
  each size's compute floor (its matrix products' flops at the FMA peak measured just before);
- prefill: prompt tokens/s (512-token prompt, or shorter within the model's context);
- bf16_inputs: bf16 weights with exact inputs against ``matmul_inputs="bf16"`` (the AVX512-BF16
  dot product), side by side in one process: plain decode tokens/s (interleaved per prompt),
  prefill tokens/s and a batch of 8 sequences' tokens/s (skipped where the CPU lacks it);
- prompt_cache: a 5-turn chat sent whole every turn, bf16: time to the first token of turns 2-5
  with the cached start reused (``reuse_context``) and with a full prefill, side by side per turn;
  and a batch of 4 requests with one long system prompt: time to the first token of requests 2-4,
  which copy the system prompt's KV entries from the first one's slot, against full prefills;
- peers: HF transformers fp32 decode (needs torch + transformers), llama.cpp through
  ``llama-cpp-python`` when it is installed (else reported as skipped) on F32 and BF16 GGUFs of
  the same weights and a Q8_0 GGUF of them against int8 (written once into the cache), same prompt token ids, same thread count,
  interleaved prompt by prompt with the engine's plain and Medusa decoding (the ratios to
  llama.cpp come from those pairs).

JSON goes to stdout (or ``--json FILE``), a readable table and progress to stderr.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from . import _core
from .engine import Engine

DECODE_PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short story about a robot who learns to paint.",
    "List five tips for writing clean Python code.",
]
TREE_SIZES = [1, 2, 4, 8, 16, 32, 64]
VERIFY_CONTEXT = 256  # cached tokens before a timed verify step (a typical chat turn)
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1 + 4 / 32}  # per weight (int8: with its scale)
SAMPLED = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}  # the sampled Medusa runs' settings
CHAT_TURNS = ["Explain how a CPU cache works.", "And what is a cache miss?", "How do programmers avoid them?",
              "Give a short example in C.", "Summarise this conversation in two sentences."]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def huge_pages() -> str:
    """How the CPU backend's memory is paged here: the system's transparent-huge-page mode
    (the backend advises its slabs as huge pages, MADV_HUGEPAGE, unless MEDUSA_RT_HUGEPAGES=0)."""
    if os.environ.get("MEDUSA_RT_HUGEPAGES") == "0":
        return "off (MEDUSA_RT_HUGEPAGES=0)"
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown (no transparent huge pages)"
    chosen = mode[mode.find("[") + 1:mode.find("]")] if "[" in mode else mode.strip()
    return "on" if chosen in ("always", "madvise") else f"off (transparent_hugepage: {chosen})"


def _chat_ids(engine: Engine, texts: Sequence[str]) -> List[List[int]]:
    tok = engine.tokenizer
    return [tok.encode(tok.apply_chat_template(t), add_special_tokens=False) for t in texts]


def bench_decode(model: str, dtype: str, new_tokens: int, repeats: int, bandwidth: float, seq: int = 1024) -> Dict:
    engine = Engine(model, dtype=dtype, max_seq_len=seq, medusa_max_batch=0, progress=False)
    prompts = _chat_ids(engine, DECODE_PROMPTS)
    # Bytes read per token: the model's weights without the heads and without the embedding
    # table (one row is gathered), plus the lm_head (tied: the same table, read in full).
    info = engine.info
    elem = WEIGHT_BYTES[dtype]
    cfg = json.loads((engine.model_dir / "config.json").read_text())
    embed = int(info.vocab_size * info.hidden_size * elem)
    body = _model_weight_bytes(cfg, elem)
    per_token = body - embed + (embed if cfg.get("tie_word_embeddings") else 0)
    # The bound streams the same number of bytes: a buffer the size of the weights read over and
    # over meets the same caches as decoding does (on a VM with a large shared L3, part of a
    # small model may stay cached; a larger probe buffer would understate the bound). It is
    # probed before every prompt's decoding and the median taken, like the decode speed: a single
    # probe at another moment than the decoding is at the mercy of the VM's neighbours.
    decode, probes = [], []
    with engine.session() as s:
        s.generate(prompts[0], max_new_tokens=8, ignore_eos=True, medusa=False)  # warm-up
        for _ in range(repeats):
            for p in prompts:
                probes.append(_core._testing.stream_bandwidth(per_token, info.num_threads, 5))
                r = s.generate(p, max_new_tokens=new_tokens, ignore_eos=True, medusa=False)
                decode.append(r.stats.decode_tokens_per_second)
    sized_bw = statistics.median(probes)
    bound = sized_bw / per_token
    tps = statistics.median(decode)
    log(f"decode {dtype}: {tps:.1f} tok/s (bound {bound:.1f}, {100 * tps / bound:.0f}%; "
        f"{bandwidth / per_token:.1f} at the 512 MiB probe)")
    return {"tokens_per_second": tps, "samples": len(decode), "bytes_per_token": per_token,
            "stream_read_weights_sized_GBps": sized_bw / 1e9, "bandwidth_samples": len(probes),
            "bandwidth_bound_tokens_per_second": bound,
            "fraction_of_bound": tps / bound, "bound_at_512MiB_probe_tokens_per_second": bandwidth / per_token}


def _matmul_weights(cfg: Dict) -> int:
    """Weights of the matrix products one token goes through (every layer's, and the lm_head)."""
    h, f, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return L * (h * (q + 2 * kv) + q * h + 3 * h * f) + v * h


def _model_weight_bytes(cfg: Dict, elem: float) -> int:
    """Bytes of every weight matrix of the model (embedding included, lm_head if untied)."""
    untied_embedding = 0 if cfg.get("tie_word_embeddings") else cfg["vocab_size"] * cfg["hidden_size"]
    return int(elem * (_matmul_weights(cfg) + untied_embedding))


def bench_medusa(model: str, dtype: str, prompts: Sequence[str], new_tokens: int, tree: Optional[str],
                 seq: int = 1024) -> Dict:
    # Trees at batch 1 even where the calibration predicts plain decoding to be faster: this
    # section measures what they give.
    engine = Engine(model, dtype=dtype, max_seq_len=seq, tree=tree, medusa_max_batch=1, progress=False)
    info = engine.info
    ids = _chat_ids(engine, prompts)
    out: Dict[str, object] = {"tree": info.tree, "tree_nodes": info.tree_nodes, "medusa_max_batch": info.medusa_max_batch,
                              "calibration": [{"nodes": c.nodes, "depth": c.depth,
                                               "expected_tokens_per_step": c.expected_tokens_per_step,
                                               "step_ms": 1e3 * c.step_seconds,
                                               "heads_ms": 1e3 * c.heads_seconds,
                                               "predicted_tokens_per_second": c.tokens_per_second}
                                              for c in info.calibration],
                              "calibration_choice": info.calibration_choice,
                              "medusa_draft_vocab": info.medusa_draft_vocab,
                              "plain_step_ms": 1e3 * info.plain_step_seconds, "prompt_lookup": info.prompt_lookup}
    # "medusa": the engine's default decoding (heads, and prompt lookup where the engine has it
    # on); "heads_only": the heads alone; "plain": no speculation; "sampled" and "sampled_plain":
    # the engine's default decoding and plain decoding, sampling (SAMPLED, one seed per prompt).
    # Interleaved per prompt.
    runs = {"medusa": dict(medusa=True), "plain": dict(medusa=False)}
    if info.prompt_lookup:
        runs["heads_only"] = dict(medusa=True, prompt_lookup=False)
    runs["sampled"] = dict(medusa=True, **SAMPLED)
    runs["sampled_plain"] = dict(medusa=False, **SAMPLED)
    tot = {key: [0, 0.0, 0, 0] for key in runs}  # decode tokens, decode seconds, steps, looked-up tokens
    same = 0
    with engine.session() as s:
        s.generate(ids[0], max_new_tokens=4, medusa=True)  # warm-up
        for i, p in enumerate(ids):
            res = {key: s.generate(p, max_new_tokens=new_tokens, seed=i, **kw) for key, kw in runs.items()}
            ref = {key: res["sampled_plain" if key.startswith("sampled") else "plain"].tokens for key in res}
            same += int(all(r.tokens == ref[key] for key, r in res.items()))
            for key, r in res.items():
                st = r.stats
                tot[key][0] += st.new_tokens - 1
                tot[key][1] += st.decode_seconds
                tot[key][2] += st.steps
                tot[key][3] += st.lookup_tokens
    for key, (n, secs, steps, looked) in tot.items():
        out[key] = {"tokens_per_second": n / max(secs, 1e-9), "tokens_per_step": n / max(steps, 1),
                    "lookup_tokens": looked}
    out["speedup"] = out["medusa"]["tokens_per_second"] / out["plain"]["tokens_per_second"]  # type: ignore[index]
    out["sampled_speedup"] = out["sampled"]["tokens_per_second"] / out["sampled_plain"]["tokens_per_second"]  # type: ignore[index]
    if "heads_only" in out:
        out["heads_only_speedup"] = out["heads_only"]["tokens_per_second"] / out["plain"]["tokens_per_second"]  # type: ignore[index]
    out["identical_outputs"] = f"{same}/{len(ids)}"
    log(f"medusa {dtype}: {out['medusa']['tokens_per_second']:.1f} tok/s vs plain "  # type: ignore[index]
        f"{out['plain']['tokens_per_second']:.1f} ({out['speedup']:.2f}x), "  # type: ignore[index]
        f"{out['medusa']['tokens_per_step']:.2f} tokens/step, tree {info.tree}, prompt lookup {info.prompt_lookup}"
        + (f"; heads only {out['heads_only']['tokens_per_second']:.1f} tok/s ({out['heads_only_speedup']:.2f}x, "  # type: ignore[index]
           f"{out['heads_only']['tokens_per_step']:.2f} tokens/step)" if "heads_only" in out else "")  # type: ignore[index]
        + f"; sampling {out['sampled_speedup']:.2f}x ({out['sampled']['tokens_per_step']:.2f} tokens/step)")  # type: ignore[index]
    return out


def bench_verify(model: str, dtype: str, seq: int = 1024, rounds: int = 5, context: int = VERIFY_CONTEXT,
                 fma_peak: Optional[float] = None) -> Dict:
    """Verify-step cost against tree size, after ``context`` cached tokens.

    Each round times every size once; a size's cost is the median over rounds of its ratio to
    the same round's decode step (timings on a shared machine drift and jump between runs, which
    a best-of per size taken at different moments turns into noise in the ratios). With
    ``fma_peak`` (flop/s of all threads), each size also gets its compute floor: the matrix
    products' arithmetic (2 flops per weight per tree token) at that peak, as a multiple of the
    measured decode step; no kernel can take a step below max(1, floor).
    """
    engine = Engine(model, dtype=dtype, max_seq_len=seq, tree="mc_sim_7b_63", medusa_max_batch=0, progress=False)
    context = min(context, seq - TREE_SIZES[-1])
    samples: Dict[int, List[tuple]] = {n: [] for n in TREE_SIZES}
    for _ in range(rounds):
        for n in TREE_SIZES:
            samples[n].append(_core._testing.time_tree_step(engine._engine, n, 1, context))
    plain = [f for f, _ in samples[1]]
    flops_per_token = 2 * _matmul_weights(json.loads((Path(engine.model_dir) / "config.json").read_text()))
    rows = []
    for n in TREE_SIZES:
        fwd = statistics.median(f for f, _ in samples[n])
        heads = statistics.median(h for _, h in samples[n])
        ratio = statistics.median((f + h) / p for (f, h), p in zip(samples[n], plain))
        row = {"nodes": n, "forward_ms": 1e3 * fwd, "heads_ms": 1e3 * heads, "step_ms": 1e3 * (fwd + heads),
               "x_decode_step": ratio}
        if fma_peak:
            row["compute_floor_x_decode_step"] = n * flops_per_token / fma_peak / statistics.median(plain)
        rows.append(row)
    log("verify: " + ", ".join(f"{r['nodes']}: {r['x_decode_step']:.2f}x" for r in rows))
    out = {"tree": "mc_sim_7b_63 (first nodes)", "context": context, "rounds": rounds, "rows": rows}
    if fma_peak:
        out["fma_peak_GFLOPs"] = fma_peak / 1e9
    return out


def bench_prefill(model: str, dtype: str, tokens: int = 512) -> Dict:
    engine = Engine(model, dtype=dtype, max_seq_len=tokens + 16, medusa_max_batch=0, progress=False)
    text = " ".join(DECODE_PROMPTS * 40)
    ids = engine.tokenizer.encode(text)[:tokens]
    best = 1e30
    with engine.session() as s:
        for _ in range(2):
            r = s.generate(ids, max_new_tokens=1, medusa=False, reuse_context=False)  # all of it, each time
            best = min(best, r.stats.prefill_seconds)
    log(f"prefill {dtype}: {len(ids) / best:.0f} tok/s")
    return {"prompt_tokens": len(ids), "tokens_per_second": len(ids) / best}


def bench_prompt_cache(model: str, dtype: str, new_tokens: int, seq: int) -> Dict:
    """Time to the first token of each turn of a conversation sent whole every turn (as chat
    clients do), with the cached start reused and with a full prefill, side by side per turn
    (two engines, since one engine's sessions share their prompts' starts; the same answers);
    then the shared-prefix batch (bench_shared_prefix) on the same two engines."""
    engines = [Engine(model, dtype=dtype, max_seq_len=seq, max_batch_size=4, medusa_max_batch=0, progress=False)
               for _ in range(2)]
    msgs: List[Dict[str, str]] = []
    turns = []
    same = done = 0
    with engines[0].session() as cached, engines[1].session() as full:
        for i, text in enumerate(CHAT_TURNS):
            msgs.append({"role": "user", "content": text})
            if len(engines[0].tokenizer.encode_chat(msgs)) + new_tokens > seq:
                break  # the conversation no longer fits the engine's max_seq_len
            done += 1
            order = [(cached, True), (full, False)] if i % 2 == 0 else [(full, False), (cached, True)]
            res = {reuse: s.generate(msgs, max_new_tokens=new_tokens, reuse_context=reuse) for s, reuse in order}
            same += int(res[True].tokens == res[False].tokens)
            msgs.append({"role": "assistant", "content": res[True].text})
            if i:  # the first turn has nothing cached
                turns.append({"prompt_tokens": res[True].stats.prompt_tokens,
                              "cached_prompt_tokens": res[True].stats.cached_prompt_tokens,
                              "ttft_seconds": res[True].stats.prefill_seconds,
                              "full_prefill_ttft_seconds": res[False].stats.prefill_seconds})
    if not turns:
        return {"skipped": f"two turns of the chat do not fit in max_seq_len {seq}"}
    speedup = sum(t["full_prefill_ttft_seconds"] for t in turns) / max(sum(t["ttft_seconds"] for t in turns), 1e-9)
    log(f"prompt cache {dtype}: turns 2-{done} first token {speedup:.1f}x sooner "
        f"(last turn {turns[-1]['prompt_tokens']} prompt tokens, {turns[-1]['cached_prompt_tokens']} cached)")
    return {"dtype": dtype, "new_tokens": new_tokens, "turns": turns, "ttft_speedup": speedup,
            "identical_outputs": f"{same}/{done}", "shared_prefix": bench_shared_prefix(engines, new_tokens, seq)}


def bench_shared_prefix(engines: Sequence[Engine], new_tokens: int, seq: int, rounds: int = 2) -> Dict:
    """A batch of requests with one long system prompt and different questions (max_batch_size of
    them at once): the first prefills the system prompt, the others copy its KV entries from that
    slot (reuse_context) against every prompt prefilled whole, side by side (engines[0] reuses,
    engines[1] does not). Each round's system prompt is new to both engines."""
    shared, full = engines
    n = shared.info.max_batch_size
    questions = [DECODE_PROMPTS[i % len(DECODE_PROMPTS)] + f" (request {i + 1})" for i in range(n)]
    ttft: Dict[bool, List[float]] = {True: [], False: []}
    same = total = 0
    prompt_tokens = 0
    for rnd in range(rounds):
        for reps in range(6, -1, -1):  # the longest system prompt that fits the engine's max_seq_len
            system = f"Session {rnd + 1}. You are a helpful assistant. Notes: " + " ".join(DECODE_PROMPTS * reps)
            prompts = [shared.tokenizer.encode_chat([{"role": "system", "content": system},
                                                     {"role": "user", "content": q}]) for q in questions]
            if max(len(p) for p in prompts) + new_tokens <= seq:
                break
        else:
            return {"skipped": f"the requests with a system prompt do not fit in max_seq_len {seq}"}
        prompt_tokens = len(prompts[0])
        order = [True, False] if rnd % 2 == 0 else [False, True]
        res = {reuse: (shared if reuse else full).generate_batch(prompts, max_new_tokens=new_tokens, reuse_context=reuse)
               for reuse in order}
        for reuse in (True, False):  # the first request has nothing to share
            ttft[reuse] += [r.stats.prefill_seconds for r in res[reuse][1:]]
        same += sum(a.tokens == b.tokens for a, b in zip(res[True], res[False]))
        total += len(prompts)
    speedup = sum(ttft[False]) / max(sum(ttft[True]), 1e-9)
    log(f"shared prefix: requests 2-{n} of a batch ({prompt_tokens} prompt tokens) first token {speedup:.1f}x sooner")
    return {"requests": n, "prompt_tokens": prompt_tokens, "rounds": rounds,
            "ttft_seconds": statistics.mean(ttft[True]), "full_prefill_ttft_seconds": statistics.mean(ttft[False]),
            "ttft_speedup": speedup, "identical_outputs": f"{same}/{total}"}


def bench_bf16_inputs(model: str, prompts: List[List[int]], new_tokens: int, seq: int) -> Dict:
    """bf16 weights with exact and with bf16-rounded matmul inputs, side by side."""
    from .errors import InvalidArgumentError

    try:
        fast = Engine(model, dtype="bf16", matmul_inputs="bf16", max_seq_len=seq, max_batch_size=8,
                      medusa_max_batch=0, progress=False)
    except InvalidArgumentError as e:
        log(f"bf16 inputs: skipped ({e})")
        return {"skipped": str(e)}
    exact = Engine(model, dtype="bf16", matmul_inputs="fp32", max_seq_len=seq, max_batch_size=8, medusa_max_batch=0,
                   progress=False)
    engines = {"exact": exact, "bf16_inputs": fast}
    decode: Dict[str, List[float]] = {k: [] for k in engines}
    for i, p in enumerate(prompts):  # interleaved, alternating which goes first
        for k in (list(engines) if i % 2 == 0 else list(engines)[::-1]):
            r = engines[k].generate(p, max_new_tokens=new_tokens, ignore_eos=True, medusa=False)
            decode[k].append(r.stats.decode_tokens_per_second)
    long_ids = (prompts * (1 + 512 // max(1, sum(len(p) for p in prompts))))
    ids = [t for p in long_ids for t in p][:min(512, seq - 16)]
    out: Dict[str, object] = {"prompt_tokens": len(ids), "batch": 8}
    for k, e in engines.items():
        with e.session() as s:
            pre = min(s.generate(ids, max_new_tokens=1, medusa=False, reuse_context=False).stats.prefill_seconds
                      for _ in range(2))
        t0 = time.perf_counter()
        rs = e.generate_batch([prompts[j % len(prompts)] for j in range(8)], max_new_tokens=new_tokens,
                              ignore_eos=True, medusa=False, reuse_context=False)
        batch = sum(len(r.tokens) for r in rs) / (time.perf_counter() - t0)
        out[k] = {"decode_tokens_per_second": statistics.median(decode[k]), "prefill_tokens_per_second": len(ids) / pre,
                  "batch_tokens_per_second": batch}
    x, f = out["exact"], out["bf16_inputs"]
    for key in ("decode", "prefill", "batch"):
        out[f"{key}_speedup"] = f[f"{key}_tokens_per_second"] / x[f"{key}_tokens_per_second"]  # type: ignore[index]
    log(f"bf16 inputs vs exact (bf16 weights): decode {out['decode_speedup']:.2f}x, prefill {out['prefill_speedup']:.2f}x, "
        f"batch of 8 {out['batch_speedup']:.2f}x")
    return out


def bench_hf(model_dir: Path, new_tokens: int, repeats: int) -> Dict:
    try:
        import torch
        from safetensors.torch import load_file
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        return {"skipped": f"needs torch and transformers ({exc})"}
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
    eng = Engine(model_dir, dtype="fp32", max_seq_len=64, medusa_max_batch=0, progress=False)
    prompts = _chat_ids(eng, DECODE_PROMPTS)
    del eng

    def run(ids: List[int], n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == len(ids) + n
        return time.perf_counter() - t

    run(prompts[0], 4)  # warm-up
    decode = []
    for _ in range(repeats):
        for p in prompts:
            t_first = run(p, 1)
            t_all = run(p, new_tokens)
            decode.append((new_tokens - 1) / max(t_all - t_first, 1e-9))
    tps = statistics.median(decode)
    log(f"hf transformers fp32: {tps:.1f} tok/s")
    return {"tokens_per_second": tps, "samples": len(decode), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def _peer_gguf(model: str, dtype: str) -> Path:
    """The known model's weights as an F32/BF16/F16 GGUF for llama.cpp: the values the engine runs
    (the pinned source file dequantized, rounded to ``dtype``). Written once into the cache."""
    import tempfile

    from . import registry
    from .export.gguf_retype import retype_gguf

    name = registry.canonical_name(model)
    if name is None:
        raise ValueError(f"{model} is not a known model: its source GGUF is unknown")
    out = registry.cache_dir() / "peers" / f"{name}-{dtype}.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".peer-", dir=out.parent) as tmp:
            src = registry.source_file(name, tmp, progress=False)
            log(f"llama.cpp peer: writing {out.name} from {src.name}")
            retype_gguf(src, out, dtype)
    return out


def _llama_greedy(llm: object, prompt: List[int], new_tokens: int) -> tuple:
    """llama.cpp greedy decoding of ``new_tokens`` tokens: (tokens, decode tokens/s after the first)."""
    got: List[int] = []
    t_first = time.perf_counter()
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,  # type: ignore[attr-defined]
                            reset=True):
        got.append(int(tok))
        if len(got) == 1:
            t_first = time.perf_counter()
        if len(got) == new_tokens:
            break
    return got, (len(got) - 1) / max(time.perf_counter() - t_first, 1e-9)


def bench_llama_cpp(model: str, prompts: List[List[int]], new_tokens: int, repeats: int, threads: int,
                    tree: Optional[str], dtypes: Sequence[str] = ("fp32", "bf16", "int8"), seq: int = 1024) -> Dict:
    """llama.cpp (through llama-cpp-python) decoding the same weights at the same precision from the
    same prompt token ids, greedy, on as many threads as the engine. Side by side: for every
    prompt the engine decodes plainly, then with Medusa (its heads and tree at batch 1), then
    llama.cpp decodes, so the three see the same machine conditions; ratios are medians of the
    per-prompt ratios."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install '.[peers]' builds llama.cpp from "
                           "source); not measured"}
    out: Dict[str, object] = {"llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "threads": threads}
    for dtype in dtypes:
        try:
            path = _peer_gguf(model, dtype)
        except ValueError as exc:
            return {"skipped": str(exc)}
        engine = Engine(model, dtype=dtype, max_seq_len=seq, tree=tree, medusa_max_batch=1, progress=False)
        medusa = bool(engine.info.medusa_heads)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=seq, n_batch=512, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        rows: List[Dict[str, float]] = []
        agree = []
        with engine.session() as s:
            for rep in range(repeats + 1):  # the first pass warms up
                for p in prompts:
                    plain = s.generate(p, max_new_tokens=new_tokens, ignore_eos=True, medusa=False)
                    row = {"engine": plain.stats.decode_tokens_per_second}
                    if medusa:
                        m = s.generate(p, max_new_tokens=new_tokens, ignore_eos=True, medusa=True)
                        row["engine_medusa"] = m.stats.decode_tokens_per_second
                    got, row["llama_cpp"] = _llama_greedy(llm, p, new_tokens)
                    if rep == 0:
                        continue
                    rows.append(row)
                    # greedy tokens equal to the engine's before the first difference (numerics differ)
                    ref = list(plain.tokens)
                    agree.append(next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref))))
        del llm, engine
        res: Dict[str, object] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        res["engine_vs_llama_cpp"] = statistics.median(r["engine"] / r["llama_cpp"] for r in rows)
        if medusa:
            res["engine_medusa_vs_llama_cpp"] = statistics.median(r["engine_medusa"] / r["llama_cpp"] for r in rows)
        res.update({"tokens_per_second": res["llama_cpp"], "samples": len(rows), "gguf": str(path),
                    "tokens_equal_to_engine_before_first_difference": agree})
        log(f"llama.cpp {dtype}: {res['llama_cpp']:.1f} tok/s; engine side by side {res['engine']:.1f} "
            f"({res['engine_vs_llama_cpp']:.2f}x)" + (f", Medusa {res['engine_medusa']:.1f} "
                                                     f"({res['engine_medusa_vs_llama_cpp']:.2f}x)" if medusa else ""))
        out[dtype] = res
    return out


def run_suite(model: str = "smollm2-135m", *, new_tokens: int = 128, repeats: int = 1, medusa_prompts: int = 12,
              hf: bool = True, llama_cpp: bool = True, dtypes: Sequence[str] = ("fp32", "bf16", "fp16", "int8"),
              tree: Optional[str] = None) -> Dict:
    from .train.evaluate import load_eval_prompts

    t0 = time.time()
    first = Engine(model, dtype="bf16", max_seq_len=64, medusa_max_batch=0)  # resolves / pulls the model once
    model_dir = first.model_dir
    threads = first.info.num_threads
    isa = first.info.isa
    decode_prompts = _chat_ids(first, DECODE_PROMPTS)
    heads = first.info.medusa_heads > 0
    del first
    # Sequences of up to 1024 tokens (fewer where the model's context is shorter).
    seq = min(1024, int(json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]))
    bw = _core._testing.stream_bandwidth(1 << 29, threads, 3)
    log(f"streaming read bandwidth: {bw / 1e9:.1f} GB/s ({threads} threads)")
    peak = _core._testing.fma_peak(threads, 5)
    log(f"fp32 FMA peak: {peak / 1e9:.0f} GFLOP/s ({threads} threads)")
    report: Dict[str, object] = {
        "benchmark": "medusa-rt bench",
        "model": model,
        "new_tokens": new_tokens,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads, "isa": isa,
                    "stream_read_GBps": bw / 1e9, "fma_peak_GFLOPs": peak / 1e9,
                    "huge_pages": huge_pages()},
    }
    report["decode"] = {d: bench_decode(model, d, new_tokens, repeats, bw, seq) for d in dtypes}
    prompts = [p for _, p in load_eval_prompts()][:: max(1, 64 // max(1, medusa_prompts))][:medusa_prompts]
    no_heads = {"skipped": f"{model} has no Medusa heads"}
    report["medusa"] = {d: bench_medusa(model, d, prompts, new_tokens, tree, seq) if heads else no_heads
                        for d in ["bf16", "fp32"] + (["int8"] if "int8" in dtypes else [])}
    report["verify_bf16"] = bench_verify(model, "bf16", seq, fma_peak=_core._testing.fma_peak(threads, 5)) if heads \
        else no_heads
    report["prefill"] = {d: bench_prefill(model, d, min(512, seq - 16)) for d in ("bf16", "fp32")}
    report["bf16_inputs"] = bench_bf16_inputs(model, decode_prompts, new_tokens, seq)
    report["prompt_cache"] = bench_prompt_cache(model, "bf16", min(new_tokens, 96), seq)
    report["peers"] = {"hf_transformers_fp32": bench_hf(Path(model_dir), new_tokens, repeats) if hf
                       else {"skipped": "--no-hf"},
                       "llama_cpp": bench_llama_cpp(model, decode_prompts, new_tokens, repeats, threads, tree,
                                                    dtypes=[d for d in ("fp32", "bf16", "int8") if d in dtypes], seq=seq)
                       if llama_cpp else {"skipped": "--no-llama-cpp"}}
    ratios: Dict[str, float] = {}
    dec = report["decode"]
    med = report["medusa"]
    for d in med:
        if "speedup" in med[d]:  # type: ignore[index]
            ratios[f"medusa_vs_plain_{d}"] = med[d]["speedup"]  # type: ignore[index]
        if "heads_only_speedup" in med[d]:  # type: ignore[operator]
            ratios[f"medusa_heads_only_vs_plain_{d}"] = med[d]["heads_only_speedup"]  # type: ignore[index]
        if "sampled_speedup" in med[d]:  # type: ignore[operator]
            ratios[f"medusa_sampled_vs_plain_sampled_{d}"] = med[d]["sampled_speedup"]  # type: ignore[index]
    hf_res = report["peers"]["hf_transformers_fp32"]  # type: ignore[index]
    if "tokens_per_second" in hf_res:
        for d in dtypes:
            ratios[f"decode_{d}_vs_hf_fp32"] = dec[d]["tokens_per_second"] / hf_res["tokens_per_second"]  # type: ignore[index]
        for d in med:  # the same precision, the engine's default and int8 against HF's
            if "medusa" in med[d]:  # type: ignore[index]
                ratios[f"medusa_{d}_vs_hf_fp32"] = med[d]["medusa"]["tokens_per_second"] / hf_res["tokens_per_second"]  # type: ignore[index]
    lc = report["peers"]["llama_cpp"]  # type: ignore[index]
    for d in dtypes:
        if d in lc:  # side by side with llama.cpp, per prompt
            ratios[f"decode_{d}_vs_llama_cpp_{d}"] = lc[d]["engine_vs_llama_cpp"]  # type: ignore[index]
            if "engine_medusa_vs_llama_cpp" in lc[d]:  # type: ignore[operator]
                ratios[f"medusa_{d}_vs_llama_cpp_{d}"] = lc[d]["engine_medusa_vs_llama_cpp"]  # type: ignore[index]
    for d in dtypes:
        ratios[f"decode_{d}_fraction_of_bandwidth_bound"] = dec[d]["fraction_of_bound"]  # type: ignore[index]
    bi = report["bf16_inputs"]
    if "decode_speedup" in bi:  # type: ignore[operator]
        for key in ("decode", "prefill", "batch"):
            ratios[f"bf16_inputs_vs_exact_{key}"] = bi[f"{key}_speedup"]  # type: ignore[index]
    if "ttft_speedup" in report["prompt_cache"]:  # type: ignore[operator]
        ratios["prompt_cache_ttft_speedup"] = report["prompt_cache"]["ttft_speedup"]  # type: ignore[index]
        sp = report["prompt_cache"]["shared_prefix"]  # type: ignore[index]
        if "ttft_speedup" in sp:
            ratios["shared_prefix_ttft_speedup"] = sp["ttft_speedup"]
    report["ratios"] = ratios
    report["seconds"] = time.time() - t0
    return report


def _measured(section: Dict, label: str, file) -> bool:
    """Whether a report section was measured; if not, prints why it was skipped."""
    if "skipped" in section:
        print(f"{label}: skipped ({section['skipped']})", file=file)
        return False
    return True


def print_table(r: Dict, file=sys.stderr) -> None:
    m = r["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores ({m['threads']} threads, {m.get('isa', '?')} kernels), stream read {m['stream_read_GBps']:.1f} GB/s, "
          f"fp32 FMA peak {m.get('fma_peak_GFLOPs', 0):.0f} GFLOP/s, huge pages {m.get('huge_pages', 'unknown')}",
          file=file)
    print(f"{'decode':<10} {'tok/s':>8} {'bound':>8} {'of bound':>9}", file=file)
    for d, x in r["decode"].items():
        print(f"{d:<10} {x['tokens_per_second']:>8.1f} {x['bandwidth_bound_tokens_per_second']:>8.1f} "
              f"{100 * x['fraction_of_bound']:>8.0f}%", file=file)
    print(f"{'medusa':<10} {'tree':>10} {'tok/s':>8} {'plain':>8} {'speedup':>8} {'tok/step':>9}", file=file)
    for d, x in r["medusa"].items():
        if "speedup" in x:
            print(f"{d:<10} {x['tree']:>10} {x['medusa']['tokens_per_second']:>8.1f} {x['plain']['tokens_per_second']:>8.1f} "
                  f"{x['speedup']:>7.2f}x {x['medusa']['tokens_per_step']:>9.2f}"
                  + (f"   (prompt lookup {x['prompt_lookup']}; heads only {x['heads_only']['tokens_per_second']:.1f} tok/s, "
                     f"{x['heads_only_speedup']:.2f}x, {x['heads_only']['tokens_per_step']:.2f} tok/step)"
                     if "heads_only" in x else ""), file=file)
            print(f"{d + ' T=' + str(SAMPLED['temperature']):<10} {x['tree']:>10} {x['sampled']['tokens_per_second']:>8.1f} "
                  f"{x['sampled_plain']['tokens_per_second']:>8.1f} {x['sampled_speedup']:>7.2f}x "
                  f"{x['sampled']['tokens_per_step']:>9.2f}   (sampling, top_p {SAMPLED['top_p']})", file=file)
        else:
            print(f"{d:<10} {x.get('skipped')}", file=file)
    v = r["verify_bf16"]
    if "rows" in v:
        print(f"verify step (bf16, after {v['context']} cached tokens), x decode step: " + "  ".join(f"{row['nodes']}: {row['x_decode_step']:.2f}"
                                                            for row in v["rows"]), file=file)
        if "fma_peak_GFLOPs" in v:
            print(f"  compute floor at {v['fma_peak_GFLOPs']:.0f} GFLOP/s (fp32 FMA peak measured before it), x decode step: "
                  + "  ".join(f"{row['nodes']}: {row['compute_floor_x_decode_step']:.2f}" for row in v["rows"]), file=file)
    print("prefill tok/s: " + ", ".join(f"{d} {x['tokens_per_second']:.0f}" for d, x in r["prefill"].items()), file=file)
    bi = r.get("bf16_inputs", {"skipped": "not measured"})
    if _measured(bi, "bf16 inputs (AVX512-BF16)", file):
        print(f"bf16 inputs (AVX512-BF16) vs exact, bf16 weights: decode {bi['decode_speedup']:.2f}x, "
              f"prefill {bi['prefill_speedup']:.2f}x ({bi['bf16_inputs']['prefill_tokens_per_second']:.0f} tok/s), "
              f"batch of {bi['batch']} {bi['batch_speedup']:.2f}x", file=file)
    pc = r.get("prompt_cache", {"skipped": "not measured"})
    if _measured(pc, "prompt cache", file):
        print(f"prompt cache ({pc['dtype']}, a {len(pc['turns']) + 1}-turn chat, {pc['new_tokens']} tokens per answer): "
              "first token of turns 2+, reused vs full prefill: "
              + ", ".join(f"{1e3 * t['ttft_seconds']:.0f} vs {1e3 * t['full_prefill_ttft_seconds']:.0f} ms "
                          f"({t['prompt_tokens']} tokens)" for t in pc["turns"])
              + f"; {pc['ttft_speedup']:.1f}x, identical outputs {pc['identical_outputs']}", file=file)
        sp = pc.get("shared_prefix", {"skipped": "not measured"})
        if _measured(sp, "shared prefix", file):
            print(f"shared prefix (a batch of {sp['requests']} requests, one system prompt, {sp['prompt_tokens']} "
                  f"prompt tokens): first token of requests 2+, copied vs full prefill: "
                  f"{1e3 * sp['ttft_seconds']:.0f} vs {1e3 * sp['full_prefill_ttft_seconds']:.0f} ms, "
                  f"{sp['ttft_speedup']:.1f}x, identical outputs {sp['identical_outputs']}", file=file)
    for name, x in r["peers"].items():
        if "skipped" in x:
            text = x["skipped"]
        elif "tokens_per_second" in x:
            text = f"{x['tokens_per_second']:.1f} tok/s"
        else:
            text = "; ".join(f"{d} {v['llama_cpp']:.1f} tok/s (engine side by side {v['engine_vs_llama_cpp']:.2f}x"
                             + (f", Medusa {v['engine_medusa_vs_llama_cpp']:.2f}x" if "engine_medusa_vs_llama_cpp" in v
                                else "") + ")" for d, v in x.items() if isinstance(v, dict))
        print(f"peer {name}: {text}", file=file)
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()), file=file)
