"""``medusa-rt train-heads``: self-distillation data -> features -> training -> heads + fitted tree.

Every stage keeps its result in the work directory (answers.jsonl, features.npz, checkpoint.pt),
so a run that is interrupted resumes where it stopped and a finished stage is not redone.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidArgumentError
from . import data, prompts, tree_fit
from .evaluate import PROMPT_SETS, load_eval_prompts
from .heads_np import load_embedding, load_lm_head
from .self_prompts import generate_self_prompts, stored_settings

DTYPE_STORAGE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[medusa_rt] {msg}", file=sys.stderr)


def train_heads(
    model: Union[str, Path],
    work_dir: Union[str, Path],
    out: Union[str, Path],
    *,
    num_prompts: int = 1400,
    everyday_prompts: int = 0,
    self_prompts: int = 0,
    max_new_tokens: int = 256,
    dtype: str = "bf16",
    batch: int = 16,
    held_out: float = 0.05,
    tree_nodes: int = 64,
    top_k: int = 10,
    config: Optional["object"] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Dict[str, object]:
    """Trains Medusa heads for ``model`` by self-distillation and writes them (runtime format, with
    the fitted default tree and the measured accuracy table) to ``out``. With a shared lm_head and
    ``config.draft_coverage`` < 1 the heads are trained to rank, and rank at inference, only the
    most frequent answer tokens covering that fraction of the training answers (a draft
    vocabulary: cheaper training and heads, same output). ``num_prompts`` template prompts
    (:func:`.prompts.training_prompts`) are answered, then up to ``everyday_prompts`` of each
    everyday kind (:func:`.prompts.everyday_prompts`), then the prompts the model itself writes
    among ``self_prompts`` sampled candidates (:mod:`.self_prompts`: user requests sampled from
    the model's chat template, those that end their turn and pass the checks). Returns the report
    (also written to ``work_dir/report.json``)."""
    from ..engine import Engine
    from .trainer import DraftShape, TrainConfig, Trainer

    cfg = config if config is not None else TrainConfig()
    cfg.validate()
    out = Path(out)
    work = Path(work_dir)
    if out.exists() and not overwrite:
        raise InvalidArgumentError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if num_prompts < 2:
        raise InvalidArgumentError("train-heads needs at least 2 prompts (one is held out)")
    if num_prompts > prompts.available():
        raise InvalidArgumentError(f"the prompt generator has {prompts.available()} prompts; asked for {num_prompts}")
    if everyday_prompts < 0:
        raise InvalidArgumentError(f"everyday_prompts must be >= 0, got {everyday_prompts}")
    if self_prompts < 0:
        raise InvalidArgumentError(f"self_prompts must be >= 0, got {self_prompts}")
    t_start = time.time()
    engine = Engine(model, dtype=dtype, max_batch_size=batch, medusa_max_batch=0, progress=progress)
    if max_new_tokens < 4 or max_new_tokens + 32 > engine.info.max_seq_len:
        raise InvalidArgumentError(f"max_new_tokens must be in 4..{engine.info.max_seq_len - 32} (the engine's "
                                   f"max_seq_len {engine.info.max_seq_len} less room for a prompt)")
    if any(L >= engine.info.num_layers for L in cfg.feature_layers):  # before any answer is generated
        raise InvalidArgumentError(f"feature_layers {list(cfg.feature_layers)}: the model has decoder layers "
                                   f"1..{engine.info.num_layers - 1} to read")
    # 1. The model answers the prompts.
    t0 = time.time()
    ps = prompts.training_prompts(num_prompts, seed=cfg.seed)
    if everyday_prompts:
        ps += prompts.everyday_prompts(everyday_prompts, seed=cfg.seed)
    n_fixed = len(ps)
    if self_prompts:
        held = [p for name in PROMPT_SETS for _, p in load_eval_prompts(name)]  # never trained on
        ps += generate_self_prompts(engine, self_prompts, work, seed=cfg.seed, exclude=held + [p for _, p in ps],
                                    progress=progress)  # the SAMPLING settings
    data.generate_answers(engine, ps, work, max_new_tokens=max_new_tokens, progress=progress)
    wanted = {p for _, p in ps}
    records = [r for r in data.read_answers(work / data.ANSWERS) if r["prompt"] in wanted and r["answer_ids"]]
    t_answers = time.time() - t0
    # 2. Hidden states.
    t0 = time.time()
    feats = data.extract_hidden_states(engine, records, cfg.num_heads, work / data.FEATURES,
                                       layers=cfg.feature_layers, progress=progress)
    t_features = time.time() - t0
    train_rec, val_rec = data.split_records(len(records), held_out, seed=cfg.seed)
    is_val = np.isin(feats.record, val_rec)
    with open(work / "held_out.jsonl", "w") as f:  # for `medusa-rt fit-tree --answers`
        for i in val_rec:
            f.write(json.dumps(records[i]) + "\n")
    _say(progress, f"{len(records)} answers, {feats.hidden.shape[0]} rows "
                   f"({int((~is_val).sum())} training, {int(is_val.sum())} held out)")
    # 3. Training.
    t0 = time.time()
    lm_head = load_lm_head(engine.model_dir, dtype)
    train_records = [records[i] for i in train_rec]
    draft = data.draft_vocabulary(train_records, cfg.draft_coverage) if cfg.shared_lm_head else None
    embedding = load_embedding(engine.model_dir, dtype) if cfg.root_input else None
    base_cfg = json.loads((Path(engine.model_dir) / "config.json").read_text())
    shape = DraftShape.from_config(base_cfg) if cfg.draft_layer else None
    trainer = Trainer(cfg, lm_head, work, progress=progress, draft_vocab=draft, embedding=embedding,
                      draft_shape=shape, norm_eps=float(base_cfg["rms_norm_eps"]))
    if trainer.try_resume():
        _say(progress, f"resuming from {trainer.checkpoint_path} at step {trainer.step}")
    tr_taps, val_taps = (None, None) if feats.taps is None else (feats.taps[~is_val], feats.taps[is_val])
    trainer.fit(feats.hidden[~is_val], feats.labels[~is_val], feats.roots[~is_val], feats.record[~is_val], tr_taps)
    t_train = time.time() - t0
    # 4. Held-out accuracy, tree, heads file.
    metrics = trainer.evaluate(feats.hidden[is_val], feats.labels[is_val], top_k, roots=feats.roots[is_val],
                               record=feats.record[is_val], taps=val_taps)
    table = metrics["table"]
    tree = tree_fit.fit_tree(table, tree_nodes)
    expected = tree_fit.expected_tokens_per_step(table, tree)
    report: Dict[str, object] = {
        "model": str(model),
        "dtype": dtype,
        "prompts": len(records),
        "everyday_prompts": {"per_kind": everyday_prompts, "count": n_fixed - num_prompts},
        "self_prompts": {"candidates": self_prompts, "count": len(ps) - n_fixed,
                         **((stored_settings(work) or {}) if self_prompts else {})},
        "answer_tokens": int(sum(len(r["answer_ids"]) for r in records)),
        "rows": {"train": int((~is_val).sum()), "held_out": int(is_val.sum())},
        "config": asdict(cfg),
        "held_out": {k: v for k, v in metrics.items() if k != "table"},
        "accuracy_table": table,
        "tree": tree,
        "tree_nodes": len(tree) + 1,
        "draft_vocab_size": 0 if draft is None else int(draft.size),
        "expected_tokens_per_step": expected,
        "seconds": {"answers": t_answers, "features": t_features, "training": t_train,
                    "total": time.time() - t_start},
    }
    counts = None
    if draft is not None:  # so that an engine can keep only the most frequent (medusa_draft_vocab)
        seen = data.answer_token_counts(train_records)
        counts = np.array([seen.get(int(t), 0) for t in draft], dtype=np.int64)
    write_trained_heads(trainer.model.layout_tensors(), out, engine, dtype, report, draft, cfg.feature_layers,
                        draft_counts=counts)
    (work / "report.json").write_text(json.dumps(report, indent=1))
    if progress:
        print_report(report)
    return report


def write_trained_heads(tensors, out: Path, engine, dtype: str, report: Dict[str, object],
                        draft_vocab: Optional[np.ndarray] = None, feature_layers: Sequence[int] = (),
                        draft_counts: Optional[np.ndarray] = None) -> None:
    from ..export.medusa_heads import write_heads_file

    extra = {
        "expected_tokens_per_step": f"{report['expected_tokens_per_step']:.4f}",
        "accuracy_table": json.dumps([[round(x, 5) for x in row] for row in report["accuracy_table"]]),
        "training": json.dumps({k: report[k] for k in ("prompts", "everyday_prompts", "self_prompts", "answer_tokens",
                                                       "rows", "config", "held_out") if k in report}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_heads_file(tensors, out, hidden=engine.info.hidden_size, vocab=engine.info.vocab_size,
                     dtype=DTYPE_STORAGE[dtype], default_tree=report["tree"], extra_metadata=extra,
                     draft_vocab=draft_vocab, draft_counts=draft_counts, feature_layers=feature_layers,
                     source="medusa-rt train-heads",
                     progress=False)


def print_report(report: Dict[str, object]) -> None:
    h = report["held_out"]
    print("head  top-1   top-5   (held-out rows)")
    for k, (a1, a5, n) in enumerate(zip(h["top1"], h["top5"], h["rows"])):
        print(f"{k:>4}  {a1:.3f}   {a5:.3f}   ({n})")
    print(f"tree: {report['tree_nodes']} nodes, expected {report['expected_tokens_per_step']:.2f} tokens/step; "
          f"draft vocabulary: {report['draft_vocab_size'] or 'all'} tokens")
