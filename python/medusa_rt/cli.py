"""The ``medusa-rt`` command line: pull, export, generate, info."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .errors import InvalidArgumentError, MedusaError


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


def _cmd_generate(args: argparse.Namespace) -> int:
    from .engine import Engine

    engine = Engine(
        args.model,
        dtype=args.dtype,
        max_seq_len=args.max_seq_len,
        num_threads=args.threads,
        medusa_heads=args.medusa_heads,
        tree=_tree_arg(args.tree),
        progress=not args.quiet,
    )
    chat = args.chat if args.chat is not None else engine.tokenizer.chat_template is not None
    with engine.session() as session:
        for piece in session.stream(
            args.prompt, max_new_tokens=args.max_new_tokens, stop=args.stop or None, chat=chat,
            medusa=False if args.no_medusa else None, acceptance=args.acceptance,
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        result = session.last_result
    assert result is not None
    s = result.stats
    info = engine.info
    mode = (f"Medusa {info.medusa_heads} heads, tree {info.tree} ({info.tree_nodes} nodes), "
            f"{s.tokens_per_step:.2f} tokens/step" if s.medusa else "plain decoding")
    sys.stdout.write("\n")
    print(
        f"[{s.new_tokens} tokens in {s.seconds:.2f} s: {s.tokens_per_second:.1f} tokens/s "
        f"(decode {s.decode_tokens_per_second:.1f} tokens/s, prefill of {s.prompt_tokens} tokens "
        f"{s.prefill_seconds * 1000:.0f} ms); {mode}; finish: {result.finish_reason}; "
        f"{info.dtype} weights, {info.isa}, {info.num_threads} threads]",
        file=sys.stderr,
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .engine import Engine

    info = Engine(args.model, dtype=args.dtype, max_seq_len=args.max_seq_len, progress=not args.quiet).info
    fields = [name for name in dir(info) if not name.startswith("_")]
    print(json.dumps({name: getattr(info, name) for name in fields}, indent=2))
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
        sp.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
        sp.add_argument("--max-seq-len", type=int, default=0)

    sp = sub.add_parser("generate", help="generate text (streams it, then prints tokens/s)")
    sp.add_argument("prompt")
    engine_args(sp)
    sp.add_argument("--max-new-tokens", "-n", type=int, default=128)
    sp.add_argument("--threads", type=int, default=0)
    sp.add_argument("--stop", action="append", help="stop string (repeatable)")
    sp.add_argument("--medusa-heads", help="Medusa heads file to use instead of the model's own")
    sp.add_argument("--tree", help="Medusa tree: a built-in name or a JSON list of paths")
    sp.add_argument("--no-medusa", action="store_true", help="plain decoding even when the model has heads")
    sp.add_argument("--acceptance", default="greedy", choices=["greedy", "typical"])
    chat = sp.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the chat template (default when the model has one)")
    chat.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as plain text")
    sp.set_defaults(fn=_cmd_generate)

    sp = sub.add_parser("info", help="load a model and print the engine's facts as JSON")
    engine_args(sp)
    sp.set_defaults(fn=_cmd_info)
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
