"""The ``medusa-rt`` command line: pull, export, generate, chat, serve, info, train-heads, fit-tree, eval-heads."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, List, Optional

from .errors import InvalidArgumentError, MedusaError

if TYPE_CHECKING:
    import numpy

    from .engine import Engine, GenerationResult


def _cmd_pull(args: argparse.Namespace) -> int:
    from .registry import pull

    path = pull(args.name, force=args.force, progress=not args.quiet)
    print(path)
    return 0


def _tree_arg(value: Optional[str]) -> object:
    """A tree name, or a JSON list of paths."""
    if value is None or not value.lstrip().startswith("["):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InvalidArgumentError(f"--tree: not a tree name nor a JSON list of paths: {exc}") from None


def _int_list(value: str) -> List[int]:
    """A comma-separated list of integers (argparse type)."""
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {value!r}") from None


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model

    out = export_model(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet,
                       medusa_heads=args.medusa_heads, tree=_tree_arg(args.tree))
    print(out)
    return 0


def _cmd_export_heads(args: argparse.Namespace) -> int:
    from .export import export_medusa_heads

    out = export_medusa_heads(args.src, args.model_dir, dtype=args.dtype, default_tree=_tree_arg(args.tree),
                              overwrite=args.overwrite, progress=not args.quiet)
    print(out)
    return 0


def _decoding_engine(args: argparse.Namespace, **extra: object) -> "Engine":
    """The engine of `generate`, `chat` and `serve` (their shared options)."""
    from .engine import Engine

    return Engine(
        args.model,
        dtype=args.dtype,
        kv_dtype=args.kv_dtype,
        matmul_inputs=args.matmul_inputs,
        max_seq_len=args.max_seq_len,
        num_threads=args.threads,
        medusa_heads=args.medusa_heads,
        tree=_tree_arg(args.tree),
        prompt_lookup=args.prompt_lookup,
        progress=not args.quiet,
        **extra,  # type: ignore[arg-type]
    )


def _decoding_options(args: argparse.Namespace) -> dict:
    """Session.generate / stream keyword arguments of `generate` and `chat`."""
    return dict(max_new_tokens=args.max_new_tokens, stop=args.stop or None, medusa=False if args.no_medusa else None,
                acceptance=args.acceptance, do_sample=args.temperature > 0 and args.acceptance == "greedy",
                temperature=args.temperature if args.temperature > 0 else 1.0, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed)


def _stats_line(engine: "Engine", result: "GenerationResult") -> str:
    s = result.stats
    info = engine.info
    mode = (f"Medusa {info.medusa_heads} heads, tree {info.tree} ({info.tree_nodes} nodes), "
            f"{s.tokens_per_step:.2f} tokens/step" if s.medusa else "plain decoding")
    if info.prompt_lookup:
        mode += f"; prompt lookup: {s.lookup_tokens} tokens in {s.lookup_steps} steps"
    cached = f" after {s.cached_prompt_tokens} cached," if s.cached_prompt_tokens else ""
    return (f"[{s.new_tokens} tokens in {s.seconds:.2f} s: {s.tokens_per_second:.1f} tokens/s "
            f"(decode {s.decode_tokens_per_second:.1f} tokens/s, prefill of "
            f"{s.prompt_tokens - s.cached_prompt_tokens} tokens{cached} {s.prefill_seconds * 1000:.0f} ms); {mode}; "
            f"finish: {result.finish_reason}; {info.dtype} weights, {info.isa}, {info.num_threads} threads]")


def _cmd_generate(args: argparse.Namespace) -> int:
    engine = _decoding_engine(args)
    chat = args.chat if args.chat is not None else engine.tokenizer.chat_template is not None
    with engine.session() as session:
        for piece in session.stream(args.prompt, chat=chat, **_decoding_options(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        result = session.last_result
    assert result is not None
    sys.stdout.write("\n")
    print(_stats_line(engine, result), file=sys.stderr)
    return 0


def _fit_conversation(engine: "Engine", messages: List[dict], room: int) -> List[dict]:
    """The conversation's latest turns whose prompt leaves ``room`` tokens in the engine's cache
    (a system message stays first); raises CapacityError when the last user turn alone does not."""
    from .errors import CapacityError

    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(system):]
    limit = engine.info.max_seq_len - room
    while len(engine.tokenizer.encode_chat(system + turns)) > limit:
        if len(turns) <= 1:
            raise CapacityError(f"the message needs more than the {limit} prompt tokens max_seq_len "
                                f"{engine.info.max_seq_len} leaves beside --max-new-tokens {room}")
        turns = turns[2:]  # the oldest user turn and its answer
    return system + turns


def _cmd_chat(args: argparse.Namespace) -> int:
    """A conversation on stdin: each line is a user turn; the answer streams to stdout. The
    session keeps the conversation's cache, so each turn prefills only itself."""
    engine = _decoding_engine(args)
    if engine.tokenizer.chat_template is None:
        raise InvalidArgumentError(f"the model at {engine.model_dir} has no chat template")
    options = _decoding_options(args)
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    if interactive:
        print("[one message per line; /reset starts a new conversation, an empty line or Ctrl-D ends]",
              file=sys.stderr)
    with engine.session() as session:
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line or (interactive and not line.strip()):
                return 0
            text = line.rstrip("\n")
            if text.strip() == "/reset":
                messages = list(base)
                continue
            if not text.strip():
                continue
            try:
                messages = _fit_conversation(engine, messages + [{"role": "user", "content": text}],
                                             args.max_new_tokens)
            except MedusaError as exc:
                print(f"medusa-rt: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            for piece in session.stream(messages, **options):
                sys.stdout.write(piece)
                sys.stdout.flush()
            result = session.last_result
            assert result is not None
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": result.text})
            if not args.quiet:
                print(_stats_line(engine, result), file=sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    if args.max_batch_size < 1:
        raise InvalidArgumentError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    engine = _decoding_engine(args, max_batch_size=args.max_batch_size)
    serve(engine, args.host, args.port, model_name=args.model, slot_wait=args.slot_wait, verbose=not args.quiet)
    return 0


def _plain(value: Any) -> Any:
    """A JSON-ready copy of an engine fact: lists and the engine's records (such as the auto
    tree's TreeCalibration entries) become lists and dicts of their public fields; anything else
    becomes its text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if not type(value).__module__.startswith("medusa_rt"):
        return str(value)
    fields = (n for n in dir(value) if not n.startswith("_") and not callable(getattr(value, n)))
    return {n: _plain(getattr(value, n)) for n in fields}


def _cmd_info(args: argparse.Namespace) -> int:
    from .engine import Engine

    info = Engine(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, progress=not args.quiet).info
    print(json.dumps(_plain(info), indent=2))
    return 0


def _cmd_train_heads(args: argparse.Namespace) -> int:
    from .train.pipeline import train_heads
    from .train.trainer import TrainConfig

    cfg = TrainConfig(num_heads=args.heads, num_layers=args.layers, shared_lm_head=args.layout == "shared",
                      epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      weight_decay=args.weight_decay, seed=args.seed,
                      threads=args.threads, draft_coverage=args.draft_coverage, distill=args.distill,
                      root_input=args.root_input, path_input=args.path_input and args.root_input,
                      draft_layer=args.draft_layer, draft_intermediate=args.draft_intermediate,
                      feature_layers=tuple(args.feature_layers))
    report = train_heads(args.model, args.work_dir, args.out, num_prompts=args.prompts,
                         everyday_prompts=args.everyday_prompts, self_prompts=args.self_prompts,
                         max_new_tokens=args.max_new_tokens, dtype=args.dtype, batch=args.batch,
                         tree_nodes=args.tree_nodes, config=cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(json.dumps({k: report[k] for k in ("prompts", "answer_tokens", "rows", "held_out", "tree_nodes",
                                             "expected_tokens_per_step", "draft_vocab_size", "seconds")}, indent=1))
    return 0


def _cmd_fit_tree(args: argparse.Namespace) -> int:
    import numpy as np

    from .train import tree_fit
    from .train.heads_np import table_from_ranks

    ranks = None
    if args.table:
        if args.joint:
            raise InvalidArgumentError("--joint fits the tree to measured ranks: give --answers, not --table")
        try:
            table = json.loads(open(args.table).read())
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"--table {args.table}: {exc}") from None
        if isinstance(table, dict):
            table = table.get("accuracy_table", table.get("table"))
    else:
        ranks = _measure_ranks(args)
        table = np.round(table_from_ranks(ranks, args.top_k), 5).tolist()
    if args.joint:
        tree, _ = tree_fit.fit_tree_empirical(ranks, args.nodes, max_depth=args.max_depth,
                                              max_children=args.max_children or args.top_k)
    else:
        tree = tree_fit.fit_tree(table, args.nodes, max_depth=args.max_depth, max_children=args.max_children)
    expected = tree_fit.expected_tokens_per_step(table, tree)
    result = {"tree": tree, "nodes": len(tree) + 1, "fit": "joint" if args.joint else "independent",
              "expected_tokens_per_step": expected, "accuracy_table": table}
    if ranks is not None:
        result["measured_tokens_per_step"] = tree_fit.measured_tokens_per_step(ranks, tree)
        result["rows"] = int(ranks.shape[0])
    print(json.dumps(result))
    if args.write:
        from .export.medusa_heads import update_heads_metadata

        update_heads_metadata(args.write, {"default_tree": json.dumps(tree),
                                           "expected_tokens_per_step": f"{expected:.4f}",
                                           "accuracy_table": json.dumps(table)})
        print(f"[medusa_rt] default tree of {args.write} set ({len(tree) + 1} nodes)", file=sys.stderr)
    return 0


def _measure_ranks(args: argparse.Namespace) -> "numpy.ndarray":
    """Rank of the true token per head and row (:func:`.train.heads_np.rank_matrix`) of the
    model's heads on held-out answers (an answers.jsonl of train-heads)."""
    from pathlib import Path

    from .engine import Engine
    from .train import data
    from .train.heads_np import RuntimeHeads, load_embedding, load_lm_head, rank_matrix

    if not args.answers:
        raise InvalidArgumentError("fit-tree needs --table (an accuracy table) or --answers (held-out answers)")
    records = [r for r in data.read_answers(Path(args.answers)) if r.get("answer_ids")]
    if not records:
        raise InvalidArgumentError(f"{args.answers} holds no answers")
    engine = Engine(args.model, dtype=args.dtype, medusa_heads=args.medusa_heads, medusa_max_batch=0,
                    progress=not args.quiet)
    heads_path = Path(args.medusa_heads) if args.medusa_heads else engine.model_dir / "medusa_heads.safetensors"
    heads = RuntimeHeads.load(heads_path, engine.info.medusa_heads_dtype or args.dtype,
                              config=json.loads((engine.model_dir / "config.json").read_text()))
    feats = data.extract_hidden_states(engine, records, heads.num_heads, Path(args.answers).with_suffix(".features.npz"),
                                       layers=heads.feature_layers, progress=not args.quiet)
    lm_head = load_lm_head(engine.model_dir, args.dtype)
    embedding = load_embedding(engine.model_dir, args.dtype) if heads.roots is not None else None
    return rank_matrix(heads, feats.hidden, feats.labels, lm_head, args.top_k, roots=feats.roots,
                       embedding=embedding, record=feats.record, taps=feats.taps)


def _cmd_eval_heads(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .train.evaluate import evaluate_heads, load_eval_prompts, print_evaluation

    items = load_eval_prompts(args.prompts)
    if args.limit:
        items = items[:args.limit]
    engine = Engine(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, medusa_heads=args.medusa_heads,
                    tree=_tree_arg(args.tree) or "default", medusa_max_batch=1, prompt_lookup=args.prompt_lookup,
                    medusa_draft_vocab=args.draft_vocab, progress=not args.quiet)
    ev = evaluate_heads(engine, items, max_new_tokens=args.max_new_tokens, check=args.check, progress=not args.quiet)
    print_evaluation(ev)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ev, f, indent=1)
    return 1 if ev.get("mismatches") else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import print_table, run_suite

    report = run_suite(args.model, new_tokens=args.new_tokens, repeats=args.repeats, medusa_prompts=args.prompts,
                       hf=not args.no_hf, llama_cpp=not args.no_llama_cpp, tree=_tree_arg(args.tree) if args.tree else None)
    print_table(report)
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .train.evaluate import load_eval_prompts

    # Without prompt lookup: the measurement checks the calibration's prediction (the heads alone).
    engine = Engine(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, tree="auto",
                    auto_tree_max_nodes=args.max_nodes, prompt_lookup=0, progress=not args.quiet)
    info = engine.info
    print(f"plain decode step: {1e3 * info.plain_step_seconds:.1f} ms -> {1 / info.plain_step_seconds:.1f} tok/s")
    cal = list(info.calibration)  # never empty: tree="auto" refuses heads without an accuracy table
    best = cal[info.calibration_choice]  # the engine's choice
    print(f"{'nodes':>5} {'depth':>5} {'exp. tok/step':>13} {'step ms':>8} {'heads ms':>8} {'predicted tok/s':>15}")
    for c in cal:
        mark = f"  <- chosen ({info.tree})" if c is best else ""
        print(f"{c.nodes:>5} {c.depth:>5} {c.expected_tokens_per_step:>13.2f} {1e3 * c.step_seconds:>8.1f} "
              f"{1e3 * c.heads_seconds:>8.1f} {c.tokens_per_second:>15.1f}{mark}")
    if info.medusa_max_batch == 0:
        print("plain decoding is predicted faster than every tree here: Medusa stays off by default")
    if args.measure:
        prompts = [p for _, p in load_eval_prompts()][: args.measure]
        tot = {True: [0, 0.0, 0], False: [0, 0.0, 0]}
        with engine.session() as s:
            for p in prompts:
                for medusa in (True, False):
                    st = s.generate(p, chat=True, max_new_tokens=128, medusa=medusa).stats
                    tot[medusa][0] += st.new_tokens - 1
                    tot[medusa][1] += st.decode_seconds
                    tot[medusa][2] += st.steps
        m, p = tot[True], tot[False]
        print(f"measured on {len(prompts)} held-out prompts: Medusa {m[0] / m[1]:.1f} tok/s "
              f"({m[0] / max(m[2], 1):.2f} tokens/step) vs plain {p[0] / p[1]:.1f} tok/s; predicted "
              f"{best.tokens_per_second:.1f} vs {1 / info.plain_step_seconds:.1f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medusa-rt", description="Medusa speculative decoding runtime")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("pull", help="download and convert a known model into the cache")
    sp.add_argument("name", help="model name, e.g. smollm2-135m")
    sp.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    sp.set_defaults(fn=_cmd_pull)

    sp = sub.add_parser("export", help="convert an HF checkpoint directory or a GGUF file to the runtime format")
    sp.add_argument("src", help="HF checkpoint directory or .gguf file")
    sp.add_argument("out", help="output directory (must not exist or be empty)")
    sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    sp.add_argument("--overwrite", action="store_true", help="replace an existing medusa_rt export at OUT")
    sp.add_argument("--medusa-heads", help="Medusa head checkpoint (file or directory) to export with the model")
    sp.add_argument("--tree", help="default tree for the heads: a built-in name or a JSON list of paths")
    sp.set_defaults(fn=_cmd_export)

    sp = sub.add_parser("export-heads", help="add Medusa heads (any published layout) to a runtime model directory")
    sp.add_argument("src", help="medusa_lm_head.{safetensors,pt}, a directory holding one, or a full checkpoint")
    sp.add_argument("model_dir", help="runtime model directory (from `medusa-rt export`)")
    sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    sp.add_argument("--tree", help="default tree for the heads: a built-in name or a JSON list of paths")
    sp.add_argument("--overwrite", action="store_true", help="replace existing heads")
    sp.set_defaults(fn=_cmd_export_heads)

    def engine_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", "-m", default="smollm2-135m", help="registry name or model directory")
        sp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16", "int8"],
                        help="weight precision (int8: weight-only, quantized at load; CPU only)")
        sp.add_argument("--max-seq-len", type=int, default=0)

    def decoding_engine_args(sp: argparse.ArgumentParser) -> None:
        engine_args(sp)
        sp.add_argument("--threads", type=int, default=0)
        sp.add_argument("--kv-dtype", default="fp32", choices=["fp32", "bf16"],
                        help="KV cache precision (bf16: half the cache memory, CPU only)")
        sp.add_argument("--matmul-inputs", default="auto", choices=["auto", "fp32", "bf16"],
                        help="fp32: exact; bf16: round the matrix products' inputs to bf16 and use AVX512-BF16 (bf16 "
                             "weights; about 2x prefill, faster decoding; outputs change slightly); auto: bf16 where "
                             "the CPU has it")
        sp.add_argument("--medusa-heads", help="Medusa heads file to use instead of the model's own")
        sp.add_argument("--tree", help="Medusa tree: a built-in name or a JSON list of paths")
        sp.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                        help="also verify up to N tokens looked up in the context (0: off; default: the "
                             "device's, 4 on the CPU)")

    def decoding_args(sp: argparse.ArgumentParser) -> None:
        decoding_engine_args(sp)
        sp.add_argument("--max-new-tokens", "-n", type=int, default=128)
        sp.add_argument("--stop", action="append", help="stop string (repeatable)")
        sp.add_argument("--no-medusa", action="store_true", help="plain decoding even when the model has heads")
        sp.add_argument("--acceptance", default="greedy", choices=["greedy", "typical"])
        sp.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature (0: greedy); with --acceptance typical, the "
                             "temperature of its probabilities (default 1)")
        sp.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
        sp.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens reaching P")
        sp.add_argument("--seed", type=int, default=-1, help="seed of the draws (-1: random)")

    sp = sub.add_parser("generate", help="generate text (streams it, then prints tokens/s)")
    sp.add_argument("prompt")
    decoding_args(sp)
    chat = sp.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the chat template (default when the model has one)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as plain text")
    sp.set_defaults(fn=_cmd_generate)

    sp = sub.add_parser("chat", help="a conversation: one user message per line of stdin, answers streamed "
                                     "(each turn prefills only itself)")
    decoding_args(sp)
    sp.add_argument("--system", help="system message opening the conversation")
    sp.set_defaults(fn=_cmd_chat)

    sp = sub.add_parser("serve", help="an HTTP server with the OpenAI chat and completions API "
                                      "(POST /v1/chat/completions, /v1/completions)")
    decoding_engine_args(sp)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--max-batch-size", type=int, default=4,
                    help="sequence slots: requests served at once, sharing decode steps")
    sp.add_argument("--slot-wait", type=float, default=30.0,
                    help="seconds a request waits for a free slot before a 503")
    sp.set_defaults(fn=_cmd_serve)

    sp = sub.add_parser("info", help="load a model and print the engine's facts as JSON")
    engine_args(sp)
    sp.set_defaults(fn=_cmd_info)

    sp = sub.add_parser("train-heads", help="train Medusa heads by self-distillation (needs torch: medusa_rt[train])")
    sp.add_argument("out", help="heads file to write (runtime format; use with --medusa-heads or export-heads)")
    engine_args(sp)
    sp.add_argument("--work-dir", required=True, help="keeps answers, features and checkpoints (resumable)")
    sp.add_argument("--prompts", type=int, default=1400, help="training prompts the model answers")
    sp.add_argument("--everyday-prompts", type=int, default=0,
                    help="also answer up to this many prompts of each everyday kind (advice, word problems, "
                         "rewriting everyday sentences, everyday questions; 630 at 170)")
    sp.add_argument("--self-prompts", type=int, default=0, metavar="N",
                    help="also answer the requests the model itself writes when sampled from its chat template "
                         "(Magpie-style): N candidates, of which those that end their turn and pass simple checks "
                         "are kept (87%% for SmolLM2-135M)")
    sp.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit")
    sp.add_argument("--batch", type=int, default=16,
                    help="answers generated at once (SmolLM2-135M bf16, 2 cores: 8 -> 269, 16 -> 297, 32 -> 327 tokens/s)")
    sp.add_argument("--heads", type=int, default=4)
    sp.add_argument("--layers", type=int, default=1, help="residual blocks per head")
    sp.add_argument("--layout", choices=["shared", "own"], default="shared",
                    help="shared: heads use the base lm_head (small file); own: a projection per head")
    sp.add_argument("--epochs", type=float, default=2.0)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--batch-size", type=int, default=256, help="training rows per step")
    sp.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sp.add_argument("--tree-nodes", type=int, default=64, help="nodes of the fitted default tree")
    sp.add_argument("--draft-coverage", type=float, default=0.995,
                    help="shared lm_head: heads learn and rank only the most frequent answer tokens covering "
                         "this fraction (1: the whole vocabulary)")
    sp.add_argument("--distill", type=float, default=0.0,
                    help="weight of the base model's own distribution as the heads' soft target "
                         "(self-distillation; 0: the answers' tokens only)")
    sp.add_argument("--root-input", action=argparse.BooleanOptionalAction, default=True,
                    help="heads also read the embedding of the token the base model emits at the position "
                         "(heads format_version 2; --no-root-input: format 1, readable by older engines)")
    sp.add_argument("--path-input", action=argparse.BooleanOptionalAction, default=True,
                    help="heads also read the tokens of the tree path they extend (Hydra-style, on top of the "
                         "root input; heads format_version 3: every tree node with children gets its own "
                         "candidates; --no-path-input: format 2; --no-root-input turns both off)")
    sp.add_argument("--draft-layer", action="store_true",
                    help="a context-attending draft layer before the heads (one causal attention + MLP layer over "
                         "the answer so far; heads format_version 4, needs the root input; training takes whole "
                         "answers per step, --batch-size rows on average)")
    sp.add_argument("--draft-intermediate", type=int, default=1536, help="the draft layer's MLP width")
    sp.add_argument("--feature-layers", type=_int_list, default=[], metavar="L1,L2,...",
                    help="base-model decoder layers whose output the heads also read (EAGLE-3-style "
                         "multi-layer features, e.g. 8,16,24; heads format_version 5, needs the root input, "
                         "not with --draft-layer; the hidden-state stage stores those layers too)")
    sp.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    sp.set_defaults(fn=_cmd_train_heads)

    sp = sub.add_parser("fit-tree", help="grow the tree that maximises expected accepted length for measured heads")
    engine_args(sp)
    sp.add_argument("--nodes", type=int, default=64, help="tree nodes, root included")
    sp.add_argument("--table", help="JSON accuracy table [head][rank] (or a train-heads report.json)")
    sp.add_argument("--answers", help="held-out answers.jsonl to measure the heads' accuracy on")
    sp.add_argument("--medusa-heads", help="heads file to measure (default: the model's own)")
    sp.add_argument("--top-k", type=int, default=10, help="ranks measured per head")
    sp.add_argument("--max-depth", type=int, default=None)
    sp.add_argument("--max-children", type=int, default=None)
    sp.add_argument("--joint", action="store_true",
                    help="with --answers: fit the tree to the rows' joint ranks (the paths most rows accept) "
                         "instead of the per-head table taken as independent")
    sp.add_argument("--write", help="heads file whose default tree (and accuracy table) to set")
    sp.set_defaults(fn=_cmd_fit_tree)

    sp = sub.add_parser("eval-heads", help="tokens per step per category on held-out prompts")
    engine_args(sp)
    sp.add_argument("--prompts", default="eval",
                    help="a shipped set: 'eval' (the held-out evaluation set, default), 'probe' (a second "
                         "held-out set) or 'dev' (the development prompts); or a JSON file of prompts")
    sp.add_argument("--medusa-heads", help="heads file to use instead of the model's own")
    sp.add_argument("--tree", help="tree: a built-in name, 'auto' or a JSON list of paths (default: the heads' own)")
    sp.add_argument("--max-new-tokens", "-n", type=int, default=128)
    sp.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    sp.add_argument("--check", action="store_true", help="also decode plainly and require identical answers")
    sp.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                    help="also verify up to N tokens looked up in the context (0: off: the heads alone)")
    sp.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                    help="rank only the heads' N most frequent draft tokens (the engine's medusa_draft_vocab; "
                         "0: all of them, as trained)")
    sp.add_argument("--json", help="write the full results (per prompt) to this file")
    sp.set_defaults(fn=_cmd_eval_heads)

    sp = sub.add_parser("calibrate", help="size the Medusa tree to this machine: step costs vs expected tokens")
    engine_args(sp)
    sp.add_argument("--max-nodes", type=int, default=128, help="largest tree considered")
    sp.add_argument("--measure", type=int, default=4, metavar="N",
                    help="then generate N held-out prompts with and without Medusa (0: skip)")
    sp.set_defaults(fn=_cmd_calibrate)

    sp = sub.add_parser("bench", help="benchmark suite: decode, Medusa, verify steps, prefill, peers (JSON)")
    sp.add_argument("--model", "-m", default="smollm2-135m", help="registry name or model directory")
    sp.add_argument("--new-tokens", type=int, default=128)
    sp.add_argument("--repeats", type=int, default=1, help="passes over the decode prompts")
    sp.add_argument("--prompts", type=int, default=12, help="held-out prompts for the Medusa comparison")
    sp.add_argument("--tree", help="Medusa tree (default: the engine's own, auto-sized when possible)")
    sp.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    sp.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp peer (when llama-cpp-python is installed)")
    sp.add_argument("--json", help="write the JSON here instead of stdout")
    sp.set_defaults(fn=_cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MedusaError as exc:
        print(f"medusa-rt: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
