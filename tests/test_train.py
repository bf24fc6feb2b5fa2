"""Head training, tree fitting and the evaluation set (medusa_rt.train)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medusa_rt import Engine
from medusa_rt.errors import InvalidArgumentError
from medusa_rt.train import data, prompts, tree_fit
from medusa_rt.train.evaluate import evaluate_heads, load_eval_prompts

torch = pytest.importorskip("torch")

from _tiny_models import build_hf_model, save_and_export  # noqa: E402


def test_training_prompts_deterministic_and_varied():
    a = prompts.training_prompts(300, seed=3)
    assert a == prompts.training_prompts(300, seed=3)
    assert a != prompts.training_prompts(300, seed=4)
    assert len({p for _, p in a}) == 300
    cats = {c for c, _ in a}
    assert {"explain", "howto", "list", "story", "code", "rewrite", "qa"} <= cats


def test_everyday_prompts_deterministic_and_balanced(tmp_path):
    a = prompts.everyday_prompts(170)
    assert a == prompts.everyday_prompts(170) and a != prompts.everyday_prompts(170, seed=1)
    count = {c: sum(1 for x, _ in a if x == c) for c in {c for c, _ in a}}
    assert count == {"advice": 170, "reasoning": 170, "rewrite": 170, "everyday": 120}
    assert len({p for _, p in a}) == len(a) == 630
    assert prompts.everyday_prompts(0) == [] and len(prompts.everyday_prompts(5)) == 20
    with pytest.raises(ValueError):
        prompts.everyday_prompts(-1)
    from medusa_rt.train.pipeline import train_heads

    with pytest.raises(InvalidArgumentError, match="everyday_prompts"):  # refused before any engine or answer
        train_heads("no-such-model", tmp_path / "work", tmp_path / "heads.safetensors", num_prompts=4,
                    everyday_prompts=-1, progress=False)


def test_eval_set_is_held_out():
    ev = load_eval_prompts()
    assert len(ev) >= 50 and len({c for c, _ in ev}) >= 5
    train = {p.lower() for _, p in prompts.training_prompts(prompts.available()) + prompts.everyday_prompts(1000)}
    for _, p in ev:
        assert p.lower() not in train
    # No training subject appears in an evaluation prompt either.
    subjects = [s.lower() for block in (prompts.SCIENCE, prompts.TECH, prompts.SOCIETY, prompts.HOWTO, prompts.STORY)
                for s in prompts._split(block) if len(s) > 12]
    for _, p in ev:
        assert not [s for s in subjects if s in p.lower()], p
    # The development prompts (settings, shipped accuracy table) are not evaluation prompts either,
    # nor is the second held-out set (written without access to the repository).
    import medusa_rt
    from pathlib import Path
    dev = load_eval_prompts(Path(medusa_rt.__file__).parent / "data" / "dev_prompts.json")
    assert dev == load_eval_prompts("dev") and ev == load_eval_prompts("eval")
    assert len(dev) == 96 and len({p for _, p in dev}) == 96 and len({c for c, _ in dev}) == 10
    assert not {p for _, p in dev} & {p for _, p in ev} and not {p.lower() for _, p in dev} & train
    probe = load_eval_prompts("probe")
    assert len(probe) == 78 and len({p for _, p in probe}) == 78 and {c for c, _ in probe} == {c for c, _ in ev}
    assert not {p.lower() for _, p in probe} & train  # (3 common questions are also dev or eval prompts)
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        load_eval_prompts("no-such-set")


def test_fit_tree_empirical_known_ranks():
    import numpy as np

    from medusa_rt.train.heads_np import table_from_ranks

    # Rank of the true token per head (given the true path); 10: not in the top 10, -1: no label.
    ranks = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 10, 3], [-1, -1, -1]])
    paths, freq = tree_fit.fit_tree_empirical(ranks, 4, max_children=10)
    # Prefix counts: [0] 4, [0, 0] 2, then [1] (1 row, shallowest first among ties).
    assert paths == [[0], [0, 0], [1]] and freq == pytest.approx([4 / 6, 2 / 6, 1 / 6])
    # The sum of the frequencies is the mean accepted length: rows accept 2, 2, 1, 1, 1 and 0 tokens.
    assert 1 + sum(freq) == pytest.approx(1 + 7 / 6)
    full, _ = tree_fit.fit_tree_empirical(ranks, 100, max_children=10)
    assert len(full) == 9  # every path some row accepts, no other
    for n in range(1, 11):  # every prefix of the list is a tree: each path's parent comes before it
        sub, _ = tree_fit.fit_tree_empirical(ranks, n, max_children=10)
        assert sub == full[:n - 1]
        assert all(p[:-1] in sub[:i] for i, p in enumerate(sub) if len(p) > 1)
    assert tree_fit.fit_tree_empirical(ranks, 100, max_children=10, max_depth=1)[0] == [[0], [1]]
    assert tree_fit.fit_tree_empirical(ranks, 100, max_children=1)[0] == [[0], [0, 0], [0, 0, 0]]
    assert np.allclose(table_from_ranks(ranks, 4), [[4 / 5, 1 / 5, 0, 0], [3 / 5, 1 / 5, 0, 0], [3 / 5, 1 / 5, 0, 1 / 5]])
    with pytest.raises(InvalidArgumentError):
        tree_fit.fit_tree_empirical(np.zeros((0, 3), dtype=int), 4)
    with pytest.raises(InvalidArgumentError):
        tree_fit.fit_tree_empirical(ranks, 4, max_depth=5)


def test_fit_tree_known_table():
    table = [[0.6, 0.2, 0.1], [0.4, 0.1, 0.05]]
    tree = tree_fit.fit_tree(table, 5)
    # [0]: .6; then [0,0]: .24 beats [1]: .2; then [1]: .2; then [2]: .1 beats [1,0]: .08.
    assert tree == [[0], [0, 0], [1], [2]]
    assert tree_fit.expected_tokens_per_step(table, tree) == pytest.approx(1 + .6 + .24 + .2 + .1)
    assert tree_fit.fit_tree(table, 1) == []
    assert tree_fit.fit_tree(table, 3, max_depth=1) == [[0], [1]]
    assert len(tree_fit.fit_tree(table, 100)) == 3 + 9  # every path the table allows
    with pytest.raises(InvalidArgumentError):
        tree_fit.fit_tree([[1.5]], 4)
    with pytest.raises(InvalidArgumentError):
        tree_fit.fit_tree(table, 0)


def test_shipped_heads_tree_is_the_fit_of_their_report():
    """The shipped SmolLM2 heads' default tree is what fit-tree grows from their training report's
    held-out table at the report's size (what scripts/train_default_heads.sh reproduces), and the
    file's expected tokens/step is that tree's under the file's own (dev) table."""
    from pathlib import Path

    from safetensors import safe_open

    import medusa_rt

    d = Path(medusa_rt.__file__).parent / "data" / "smollm2-135m"
    report = json.loads((d / "training_report.json").read_text())
    with safe_open(str(d / "medusa_heads.safetensors"), "np") as f:
        meta = f.metadata()
    tree = json.loads(meta["default_tree"])
    assert report["tree_nodes"] == len(tree) + 1 == 128 and report["tree"] == tree
    assert tree_fit.fit_tree(report["accuracy_table"], report["tree_nodes"]) == tree
    # The 64-node tree, the published trees' size, is the start of the same greedy growth.
    assert all(p in tree for p in tree_fit.fit_tree(report["accuracy_table"], 64))
    table = json.loads(meta["accuracy_table"])
    assert float(meta["expected_tokens_per_step"]) == pytest.approx(tree_fit.expected_tokens_per_step(table, tree),
                                                                    abs=1e-4)


def test_head_labels():
    lab = data.head_labels([10, 11, 12, 13], 2)
    assert lab.tolist() == [[11, 12], [12, 13], [13, -1], [-1, -1]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    model = build_hf_model("llama-mha-tied", seed=3)
    return tmp, save_and_export(model, tmp, "base")


def test_train_heads_end_to_end(tiny, capsys):
    from medusa_rt.train.pipeline import train_heads
    from medusa_rt.train.trainer import TrainConfig

    tmp, base = tiny
    out = tmp / "heads.safetensors"
    cfg = TrainConfig(epochs=6, batch_size=64, lr=3e-3, checkpoint_every=5, root_input=True)  # the CLI's default
    report = train_heads(base, tmp / "work", out, num_prompts=24, max_new_tokens=48, dtype="fp32", batch=4,
                         tree_nodes=12, config=cfg, progress=False)
    assert report["prompts"] == 24 and report["rows"]["held_out"] > 0
    assert report["everyday_prompts"] == {"per_kind": 0, "count": 0}
    assert 0 < report["draft_vocab_size"] < 384  # the heads rank the answers' frequent tokens only
    from medusa_rt.export.safetensors_io import SafetensorsFile
    with SafetensorsFile(out) as f:  # ... and count them (for the engine's medusa_draft_vocab)
        counts = np.array(f.get("medusa.draft_vocab_count"))
        assert counts.shape == (report["draft_vocab_size"],) and counts.min() >= 1
    hist = json.loads((tmp / "work" / "report.json").read_text())
    assert hist["tree_nodes"] == 12 and len(hist["accuracy_table"]) == 4
    # Training lowered the loss (checkpoint history: first vs last running loss).
    ck = torch.load(tmp / "work" / "checkpoint.pt", weights_only=False)
    assert ck["history"][-1]["loss"] < ck["history"][0]["loss"]
    # The heads round-trip through the engine: lossless and accepting on the training prompts.
    eng = Engine(base, dtype="fp32", medusa_heads=out, medusa_max_batch=1, tree="default")  # the fitted tree
    assert eng.info.medusa_heads == 4 and eng.info.tree_nodes == 12
    # The heads carry their accuracy table: by default the engine sizes the tree to the machine.
    auto = Engine(base, dtype="fp32", medusa_heads=out, auto_tree_max_nodes=12)
    cal = auto.info.calibration
    assert auto.info.tree.startswith("auto-") and cal and cal[0].nodes == 2 and auto.info.plain_step_seconds > 0
    # The choice: the cheapest step among the trees predicted within 3% of the best rate.
    chosen = cal[auto.info.calibration_choice]
    best_rate = max(c.tokens_per_second for c in cal)
    assert chosen.tokens_per_second * 1.03 >= best_rate
    assert all(c.step_seconds >= chosen.step_seconds for c in cal if c.tokens_per_second * 1.03 >= best_rate)
    assert auto.info.tree_nodes == chosen.nodes
    assert auto.info.tree in (f"auto-{chosen.nodes}", f"auto-{chosen.nodes}-d{chosen.depth}")
    # Each size comes as the unlimited fit and as fits limited to each smaller depth; a limit
    # never adds expected tokens.
    sizes = sorted({c.nodes for c in cal})
    by_size = {n: [c for c in cal if c.nodes == n] for n in sizes}
    assert all(0 < c.depth <= 4 for c in cal) and any(len(v) > 1 for v in by_size.values())
    for v in by_size.values():
        assert [c.depth for c in v] == sorted({c.depth for c in v}, reverse=True)
        assert all(c.expected_tokens_per_step <= v[0].expected_tokens_per_step for c in v)
    unlimited = [by_size[n][0].expected_tokens_per_step for n in sizes]
    assert unlimited == sorted(unlimited)
    assert all(0 < c.heads_seconds < c.step_seconds for c in cal)
    # A size's forward is the median of interleaved rounds, never lower for a larger tree (timing
    # noise); the heads are timed per tree.
    forward = [by_size[n][0].step_seconds - by_size[n][0].heads_seconds for n in sizes]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(forward, forward[1:]))
    for v in by_size.values():
        assert all(abs((c.step_seconds - c.heads_seconds) - (v[0].step_seconds - v[0].heads_seconds)) < 1e-9 for c in v)
    # `medusa-rt info` prints those facts, the calibration included, as JSON.
    import shutil

    from medusa_rt import cli

    own = tmp / "base_with_heads"
    shutil.copytree(base, own)
    shutil.copy(out, own / "medusa_heads.safetensors")
    capsys.readouterr()
    assert cli.main(["--quiet", "info", "--model", str(own), "--dtype", "fp32"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["tree"].startswith("auto-") and facts["medusa_heads"] == 4
    assert facts["calibration"][0]["nodes"] == 2 and facts["calibration"][0]["step_seconds"] > 0
    assert facts["calibration_choice"] >= 0 and facts["medusa_draft_vocab"] == report["draft_vocab_size"]
    # `medusa-rt calibrate` prints the trees and marks the choice; without heads it says so.
    assert cli.main(["--quiet", "calibrate", "--model", str(own), "--dtype", "fp32", "--max-nodes", "8",
                     "--measure", "0"]) == 0
    assert "<- chosen (auto-" in capsys.readouterr().out
    assert cli.main(["--quiet", "calibrate", "--model", str(base), "--dtype", "fp32", "--measure", "0"]) == 2
    assert "no Medusa heads" in capsys.readouterr().err
    recs = data.read_answers(tmp / "work" / data.ANSWERS)[:6]
    tps = []
    for r in recs:
        m = eng.generate(r["prompt_ids"], max_new_tokens=32)
        p = eng.generate(r["prompt_ids"], max_new_tokens=32, medusa=False)
        assert m.tokens == p.tokens
        tps.append(m.stats.tokens_per_step)
    assert np.mean(tps) > 1.3
    # A second run resumes: nothing left to train, same heads out.
    with pytest.raises(InvalidArgumentError):
        train_heads(base, tmp / "work", out, num_prompts=24, max_new_tokens=48, dtype="fp32", config=cfg,
                    progress=False)
    again = train_heads(base, tmp / "work", out, num_prompts=24, max_new_tokens=48, dtype="fp32", batch=4,
                        tree_nodes=12, config=cfg, overwrite=True, progress=False)
    assert again["seconds"]["training"] < report["seconds"]["training"]
    assert again["accuracy_table"] == report["accuracy_table"]
    # Other settings in the same work dir are refused, not mixed.
    with pytest.raises(InvalidArgumentError, match="different settings"):
        train_heads(base, tmp / "work", out, num_prompts=24, max_new_tokens=48, dtype="fp32", batch=4,
                    config=TrainConfig(epochs=6, batch_size=32), overwrite=True, progress=False)
    # Evaluation on a prompt file.
    items = [("a", r["prompt"]) for r in recs[:3]]
    ev = evaluate_heads(eng, items, max_new_tokens=16, check=True, progress=False)
    assert ev["mismatches"] == 0 and ev["overall"]["prompts"] == 3
    # fit-tree measures the (root-input) heads' table on the held-out answers in NumPy: the table
    # training measured on the same rows in torch.
    from medusa_rt import cli
    assert cli.main(["--quiet", "fit-tree", "--model", str(base), "--dtype", "fp32", "--medusa-heads", str(out),
                     "--answers", str(tmp / "work" / "held_out.jsonl"), "--nodes", "12"]) == 0
    fitted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.allclose(fitted["accuracy_table"], report["accuracy_table"], atol=0.02)
    # --joint fits the paths most rows accept: on those rows it accepts at least as much as the
    # tree fitted to the table with the heads taken as independent.
    assert cli.main(["--quiet", "fit-tree", "--model", str(base), "--dtype", "fp32", "--medusa-heads", str(out),
                     "--answers", str(tmp / "work" / "held_out.jsonl"), "--nodes", "12", "--joint"]) == 0
    joint = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert joint["fit"] == "joint" and fitted["fit"] == "independent" and joint["rows"] == fitted["rows"] > 0
    assert joint["accuracy_table"] == fitted["accuracy_table"] and 1 <= joint["nodes"] <= 12
    assert joint["measured_tokens_per_step"] >= fitted["measured_tokens_per_step"] >= 1
    assert cli.main(["--quiet", "fit-tree", "--table", str(tmp / "work" / "report.json"), "--joint"]) == 2
    assert "--joint fits the tree to measured ranks" in capsys.readouterr().err


def test_train_own_projection_layout(tiny):
    from medusa_rt.train.heads_np import accuracy_table, load_lm_head
    from medusa_rt.train.trainer import TrainConfig, Trainer

    tmp, base = tiny
    eng = Engine(base, dtype="fp32", medusa_max_batch=0)
    lm = load_lm_head(base)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, eng.info.vocab_size, 40).tolist() for _ in range(6)]
    recs = [{"prompt_ids": s[:8], "answer_ids": s[8:]} for s in seqs]
    feats = data.extract_hidden_states(eng, recs, 3, tmp / "own_feats.npz", progress=False)
    cfg = TrainConfig(num_heads=3, shared_lm_head=False, epochs=30, batch_size=64, lr=3e-3)
    tr = Trainer(cfg, lm, tmp / "own_work", progress=False)
    out = tmp / "own_heads.safetensors"
    after, heads = _train_and_export(tr, feats, eng, out)
    assert heads.projections is not None
    # NumPy heads reproduce torch's accuracy table; the engine loads and uses them losslessly.
    table = accuracy_table(heads, feats.hidden, feats.labels, lm, 10)
    assert np.allclose(table, after["table"], atol=0.02)
    e2 = Engine(base, dtype="fp32", medusa_heads=out, medusa_max_batch=1, tree=TRAINED_TREE)
    assert e2.info.tree_nodes == 4
    r = e2.generate(seqs[0][:8], max_new_tokens=24)
    assert r.tokens == e2.generate(seqs[0][:8], max_new_tokens=24, medusa=False).tokens



def test_checkpoint_resumes_only_on_its_own_rows(tiny):
    """A checkpoint made on some rows is not continued on others (more answers, another split):
    that would silently mix two runs; the same rows resume."""
    from medusa_rt.train.heads_np import load_lm_head
    from medusa_rt.train.trainer import TrainConfig, Trainer

    tmp, base = tiny
    lm = load_lm_head(base)
    rng = np.random.default_rng(2)
    hidden = rng.standard_normal((40, lm.shape[1])).astype(np.float32)
    labels = rng.integers(0, lm.shape[0], (40, 2))
    cfg = TrainConfig(num_heads=2, epochs=4, batch_size=16, root_input=False, path_input=False)
    work = tmp / "rows_work"
    Trainer(cfg, lm, work, progress=False).fit(hidden[:32], labels[:32])
    tr = Trainer(cfg, lm, work, progress=False)
    assert tr.try_resume() and tr.step > 0
    with pytest.raises(InvalidArgumentError, match="other rows"):
        tr.fit(hidden, labels)
    with pytest.raises(InvalidArgumentError, match="other rows"):
        tr.fit(hidden[:32], labels[8:40])
    step = tr.step
    tr.fit(hidden[:32], labels[:32])  # its own rows: nothing left to train
    assert tr.step == step

def test_distillation_targets_are_the_base_models_next_tokens(tiny):
    """distill > 0: the teacher of head k at position t is the base model's distribution at
    t + 1 + k, whose argmax on greedy answers is the head's label; training on it lowers the loss."""
    from medusa_rt.train.heads_np import load_lm_head
    from medusa_rt.train.trainer import TrainConfig, Trainer

    tmp, base = tiny
    eng = Engine(base, dtype="fp32", medusa_max_batch=0)
    rng = np.random.default_rng(1)
    recs = []
    for _ in range(6):
        p = rng.integers(3, eng.info.vocab_size, 8).tolist()
        recs.append({"prompt_ids": p, "answer_ids": list(eng.generate(p, max_new_tokens=40, ignore_eos=True).tokens)})
    feats = data.extract_hidden_states(eng, recs, 3, tmp / "kd_feats.npz", progress=False)
    cfg = TrainConfig(num_heads=3, epochs=20, batch_size=64, lr=3e-3, distill=1.0)
    tr = Trainer(cfg, load_lm_head(base), tmp / "kd_work", progress=False)
    idx = np.arange(feats.hidden.shape[0])
    teacher, valid = tr._teacher(feats.hidden, idx, feats.labels)
    assert valid.numpy().tolist() == (feats.labels >= 0).tolist()
    agree = (teacher.argmax(-1).numpy().T == feats.labels)[feats.labels >= 0]
    assert agree.mean() > 0.95  # float16 feature storage may flip near-ties
    before = tr.evaluate(feats.hidden, feats.labels)
    tr.fit(feats.hidden, feats.labels)
    after = tr.evaluate(feats.hidden, feats.labels)
    assert np.mean(after["loss"]) < np.mean(before["loss"])
    with pytest.raises(InvalidArgumentError, match="distill"):
        TrainConfig(distill=1.5).validate()
    with pytest.raises(InvalidArgumentError, match="weight_decay"):
        TrainConfig(weight_decay=-0.1).validate()


def test_auto_tree_needs_an_accuracy_table(tmp_path):
    from medusa_rt.errors import InvalidArgumentError as IAE
    from _medusa_heads import fit_heads, training_prompts, write_heads_only
    from medusa_rt.export import export_medusa_heads

    model = build_hf_model("llama-gqa-untied", seed=5)
    base = save_and_export(model, tmp_path, "base")
    state = fit_heads(model, training_prompts(384, n=4), num_heads=2)
    export_medusa_heads(write_heads_only(state, tmp_path / "h"), base, progress=False)
    with pytest.raises(IAE, match="accuracy table"):
        Engine(base, tree="auto")
    with pytest.raises(IAE, match="auto_tree_max_nodes"):
        Engine(base, auto_tree_max_nodes=1)


def test_draft_vocabulary(tiny, tmp_path):
    from medusa_rt.errors import ModelFormatError
    from medusa_rt.export.medusa_heads import write_heads_file
    from medusa_rt.train.heads_np import RuntimeHeads, load_lm_head

    _, base = tiny
    recs = [{"answer_ids": [5, 5, 5, 7, 7, 9]}, {"answer_ids": [5, 7, 11]}]
    assert data.draft_vocabulary(recs, 0.4, minimum=1).tolist() == [5]  # 4 of 9 tokens
    assert data.draft_vocabulary(recs, 0.5, minimum=1).tolist() == [5, 7]
    assert data.draft_vocabulary(recs, 0.99, minimum=1).tolist() == [5, 7, 9, 11]
    assert data.draft_vocabulary(recs, 1.0) is None
    rng = np.random.default_rng(1)
    H = 96
    tensors = {}
    for k in range(2):
        tensors[f"{k}.0.linear.weight"] = (rng.standard_normal((H, H)) * 0.02).astype(np.float32)
        tensors[f"{k}.0.linear.bias"] = np.zeros(H, np.float32)
    vocab = np.arange(3, 384, 3)
    out = tmp_path / "draft.safetensors"
    write_heads_file(tensors, out, hidden=H, vocab=384, dtype="float32", draft_vocab=vocab, progress=False)
    heads = RuntimeHeads.load(out)
    assert heads.draft_vocab.tolist() == vocab.tolist()
    top = heads.top_k(rng.standard_normal((5, H)).astype(np.float32), load_lm_head(base), 10)
    assert np.isin(top, vocab).all()
    eng = Engine(base, dtype="fp32", medusa_heads=out, tree="chain-2", medusa_max_batch=1)
    p = [3, 17, 42, 99]
    assert eng.generate(p, max_new_tokens=24).tokens == eng.generate(p, max_new_tokens=24, medusa=False).tokens
    # A draft vocabulary that is not increasing ids is refused with the tensor named.
    bad = tmp_path / "bad.safetensors"
    write_heads_file(tensors, bad, hidden=H, vocab=384, dtype="float32", draft_vocab=vocab, progress=False)
    from medusa_rt.export.safetensors_io import SafetensorsFile, TensorToWrite, write_safetensors
    with SafetensorsFile(bad) as f:
        meta = dict(f.metadata)
        items = [TensorToWrite(n, f.dtype(n), tuple(f.shape(n)), lambda a=np.array(f.get(n)): a) for n in f.keys()
                 if n != "medusa.draft_vocab"]
    rev = vocab[::-1].astype("<i4").copy()
    items.append(TensorToWrite("medusa.draft_vocab", "I32", rev.shape, lambda: rev))
    write_safetensors(bad, items, metadata=meta)
    with pytest.raises(ModelFormatError, match="draft_vocab"):
        Engine(base, dtype="fp32", medusa_heads=bad)


def test_features_reused_for_a_grown_reordered_answer_set(tiny):
    """A second extraction over more answers, in another order, computes only the new ones and
    gives the same rows as a fresh extraction; a file without fingerprints is recomputed."""
    tmp, base = tiny
    eng = Engine(base, dtype="fp32", medusa_max_batch=0)
    rng = np.random.default_rng(2)
    recs = [{"prompt_ids": rng.integers(3, eng.info.vocab_size, 6).tolist(),
             "answer_ids": rng.integers(3, eng.info.vocab_size, n).tolist()} for n in (9, 0, 14, 5, 11)]
    path = tmp / "grow_feats.npz"
    data.extract_hidden_states(eng, recs[:3], 2, path, progress=False)
    grown = [recs[4], recs[2], recs[3], recs[0], recs[1]]

    class Counting:  # counts the positions the engine actually runs
        def __init__(self, engine):
            self.info, self.engine, self.positions = engine.info, engine, 0

        def session(self):
            outer = self

            class S:
                def __enter__(s):
                    s.inner = outer.engine.session().__enter__()
                    return s

                def __exit__(s, *a):
                    return s.inner.__exit__(*a)

                def reset(s):
                    s.inner.reset()

                def hidden_states(s, ids):
                    outer.positions += len(ids)
                    return s.inner.hidden_states(ids)
            return S()

    counting = Counting(eng)
    f = data.extract_hidden_states(counting, grown, 2, path, progress=False)
    assert counting.positions == (6 + 11 - 1) + (6 + 5 - 1)  # only records 4 and 3 ran
    fresh = data.extract_hidden_states(eng, grown, 2, tmp / "fresh_feats.npz", progress=False)
    assert np.array_equal(f.hidden, fresh.hidden) and np.array_equal(f.labels, fresh.labels)
    assert np.array_equal(f.record, fresh.record) and f.hidden.shape[0] == 11 + 14 + 5 + 9
    # A legacy file (no fingerprints) is not trusted: everything runs again.
    legacy = data.Features.load(path)
    data.Features(legacy.hidden, legacy.labels, legacy.record).save(path)
    counting.positions = 0
    data.extract_hidden_states(counting, grown, 2, path, progress=False)
    assert counting.positions == sum(6 + len(r["answer_ids"]) - 1 for r in grown if r["answer_ids"])


def _random_answers(tiny, seed: int, num_heads: int, name: str, layers=()):
    """Six random 40-token sequences (8 prompt + 32 answer tokens) of the tiny model and their
    feature rows (with ``layers``, also those layers' taps): (engine, lm_head, embedding,
    sequences, records, features)."""
    from medusa_rt.train.heads_np import load_embedding, load_lm_head

    tmp, base = tiny
    eng = Engine(base, dtype="fp32", medusa_max_batch=0)
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, eng.info.vocab_size, 40).tolist() for _ in range(6)]
    recs = [{"prompt_ids": s[:8], "answer_ids": s[8:]} for s in seqs]
    feats = data.extract_hidden_states(eng, recs, num_heads, tmp / name, layers=layers, progress=False)
    return eng, load_lm_head(base), load_embedding(base), seqs, recs, feats


def test_train_heads_with_a_root_input(tiny):
    """Root-input heads (the token the base model emits at the row, through its embedding) learn,
    and the heads file they export gives the same accuracy table in NumPy as in torch."""
    from medusa_rt.train.heads_np import accuracy_table
    from medusa_rt.train.trainer import TrainConfig, Trainer

    tmp, base = tiny
    eng, lm, emb, seqs, recs, feats = _random_answers(tiny, seed=5, num_heads=2, name="root_feats.npz")
    assert feats.roots.tolist() == [t for r in recs for t in r["answer_ids"]]
    assert data.Features.load(tmp / "root_feats.npz").roots.tolist() == feats.roots.tolist()
    cfg = TrainConfig(num_heads=2, epochs=30, batch_size=64, lr=3e-3, root_input=True)
    with pytest.raises(InvalidArgumentError, match="embedding"):
        Trainer(cfg, lm, tmp / "root_work", progress=False)
    tr = Trainer(cfg, lm, tmp / "root_work", progress=False, embedding=emb)
    with pytest.raises(InvalidArgumentError, match="root tokens"):
        tr.fit(feats.hidden, feats.labels)
    out = tmp / "root_heads.safetensors"
    after, heads = _train_and_export(tr, feats, eng, out, feats.roots)
    assert heads.metadata["format_version"] == "2" and heads.roots is not None
    table = accuracy_table(heads, feats.hidden, feats.labels, lm, 10, roots=feats.roots, embedding=emb)
    assert np.allclose(table, after["table"], atol=0.02)
    e2 = Engine(base, dtype="fp32", medusa_heads=out, medusa_max_batch=1, tree=TRAINED_TREE)
    r = e2.generate(seqs[0][:8], max_new_tokens=24)
    assert r.tokens == e2.generate(seqs[0][:8], max_new_tokens=24, medusa=False).tokens


def test_train_heads_with_a_path_input(tiny):
    """Path-input heads (Hydra-style: head k also reads the path's tokens, the true ones in
    training) learn, export as heads format 3, give the same accuracy table (given the true path)
    in NumPy as in torch, and decode losslessly through the engine with a branching tree."""
    from medusa_rt.train.heads_np import accuracy_table
    from medusa_rt.train.trainer import TrainConfig, Trainer

    tmp, base = tiny
    eng, lm, emb, seqs, recs, feats = _random_answers(tiny, seed=6, num_heads=3, name="path_feats.npz")
    with pytest.raises(InvalidArgumentError, match="path_input needs root_input"):
        TrainConfig(path_input=True).validate()
    cfg = TrainConfig(num_heads=3, epochs=30, batch_size=64, lr=3e-3, root_input=True, path_input=True)
    tr = Trainer(cfg, lm, tmp / "path_work", progress=False, embedding=emb)
    out = tmp / "path_heads.safetensors"
    after, heads = _train_and_export(tr, feats, eng, out, feats.roots)
    assert heads.metadata["format_version"] == "3" and heads.paths is not None
    assert [len(p) for p in heads.paths] == [0, 1, 2]
    assert any(np.abs(p).max() > 0 for p in heads.paths[2])  # the path matrices were trained
    table = accuracy_table(heads, feats.hidden, feats.labels, lm, 10, roots=feats.roots, embedding=emb)
    assert np.allclose(table, after["table"], atol=0.02)
    tree = [[0], [1], [0, 0], [1, 0], [0, 0, 0], [1, 0, 0]]
    e2 = Engine(base, dtype="fp32", medusa_heads=out, medusa_max_batch=1, tree=tree)
    for s in seqs[:2]:
        r = e2.generate(s[:8], max_new_tokens=24)
        assert r.tokens == e2.generate(s[:8], max_new_tokens=24, medusa=False).tokens


def test_train_heads_with_feature_layers(tiny):
    """Heads with feature layers (EAGLE-3-style: they also read the base model's residual stream
    after some decoder layers): the features carry those layers' taps (reused only for the same
    layers), the heads learn and use them, export as heads format 5, give the same accuracy table
    in NumPy as in torch, and decode losslessly through the engine."""
    from medusa_rt.train.trainer import TrainConfig, Trainer

    tmp, base = tiny
    eng, lm, emb, seqs, recs, feats = _random_answers(tiny, seed=8, num_heads=3, name="fl_feats.npz", layers=[1])
    assert feats.taps.shape == (feats.hidden.shape[0], 1, feats.hidden.shape[1]) and feats.layers == (1,)
    with eng.session() as s:  # row j of an answer: the position of its token j - 1
        direct = s.hidden_states(seqs[0][:-1], [1])[7:]
    np.testing.assert_allclose(feats.taps[:32].astype(np.float32), direct[:, 1:], rtol=2e-3, atol=2e-3)
    assert data.Features.load(tmp / "fl_feats.npz").layers == (1,)
    plain = data.extract_hidden_states(eng, recs, 3, tmp / "fl_feats.npz", progress=False)  # other layers: recomputed
    assert plain.taps is None and np.array_equal(plain.hidden, feats.hidden)
    data.Features.save(feats, tmp / "fl_feats.npz")
    for bad in (dict(feature_layers=(1,)), dict(root_input=True, draft_layer=True, feature_layers=(1,)),
                dict(root_input=True, feature_layers=(1, 1)), dict(root_input=True, feature_layers=(0,))):
        with pytest.raises(InvalidArgumentError, match="feature_layers"):
            TrainConfig(**bad).validate()
    from medusa_rt.train.pipeline import train_heads

    with pytest.raises(InvalidArgumentError, match=r"decoder layers 1\.\.1"):  # refused before any answer
        train_heads(base, tmp / "fl_bad", tmp / "fl_bad.safetensors", num_prompts=4, max_new_tokens=8, dtype="fp32",
                    config=TrainConfig(root_input=True, feature_layers=(2,)), progress=False)
    assert not (tmp / "fl_bad" / "answers.jsonl").exists()
    cfg = TrainConfig(num_heads=3, epochs=30, batch_size=64, lr=3e-3, root_input=True, path_input=True,
                      feature_layers=(1,))
    tr = Trainer(cfg, lm, tmp / "fl_work", progress=False, embedding=emb)
    with pytest.raises(InvalidArgumentError, match="taps"):
        tr.fit(feats.hidden, feats.labels, feats.roots, feats.record)
    out = tmp / "fl_heads.safetensors"
    after, heads = _train_and_export(tr, feats, eng, out, feats.roots, taps=feats.taps, feature_layers=(1,))
    assert heads.metadata["format_version"] == "5" and heads.feature_layers == (1,)
    assert np.abs(heads.fuse[0]).max() > 0  # the fusion weights were trained
    _numpy_table_and_lossless(heads, feats, lm, emb, after, base, out, seqs, taps=feats.taps)


def _numpy_table_and_lossless(heads, feats, lm, emb, after, base, out, seqs, **inputs):
    """The heads file's NumPy accuracy table equals torch's (``after``); the engine decodes
    losslessly with it and a branching tree."""
    from medusa_rt.train.heads_np import accuracy_table

    table = accuracy_table(heads, feats.hidden, feats.labels, lm, 10, roots=feats.roots, embedding=emb, **inputs)
    assert np.allclose(table, after["table"], atol=0.02)
    tree = [[0], [1], [0, 0], [1, 0], [0, 0, 0]]
    e2 = Engine(base, dtype="fp32", medusa_heads=out, medusa_max_batch=1, tree=tree)
    for s in seqs[:2]:
        r = e2.generate(s[:8], max_new_tokens=24)
        assert r.tokens == e2.generate(s[:8], max_new_tokens=24, medusa=False).tokens


TRAINED_TREE = [[0], [0, 0], [1]]  # the tree _train_and_export records in its heads files


def _train_and_export(tr, feats, eng, out, roots=None, record=None, taps=None, feature_layers=()):
    """Trains on all rows, checks the loss fell, writes the heads file; returns (metrics after
    training, the file's NumPy heads)."""
    from medusa_rt.train.heads_np import RuntimeHeads
    from medusa_rt.train.pipeline import write_trained_heads

    before = tr.evaluate(feats.hidden, feats.labels, roots=roots, record=record, taps=taps)
    tr.fit(feats.hidden, feats.labels, roots, record, taps)
    after = tr.evaluate(feats.hidden, feats.labels, roots=roots, record=record, taps=taps)
    assert np.mean(after["loss"]) < np.mean(before["loss"])
    report = {"expected_tokens_per_step": 1.5, "accuracy_table": after["table"], "tree": TRAINED_TREE,
              "prompts": 6, "answer_tokens": 0, "rows": {}, "config": {}, "held_out": {}}
    write_trained_heads(tr.model.layout_tensors(), out, eng, "fp32", report, feature_layers=feature_layers)
    return after, RuntimeHeads.load(out, config=json.loads((eng.model_dir / "config.json").read_text()))


def test_train_heads_with_a_draft_layer(tiny):
    """Heads with a draft layer (a causal attention + MLP layer over the answer so far) train on
    whole answers, export as heads format 4, give the same accuracy table in NumPy (whole answers
    through the draft layer) as in torch, and decode losslessly through the engine."""
    from medusa_rt.train.heads_np import accuracy_table
    from medusa_rt.train.trainer import DraftShape, TrainConfig, Trainer

    tmp, base = tiny
    eng, lm, emb, seqs, recs, feats = _random_answers(tiny, seed=7, num_heads=3, name="draft_feats.npz")
    with pytest.raises(InvalidArgumentError, match="draft_layer needs root_input"):
        TrainConfig(draft_layer=True).validate()
    cfg = TrainConfig(num_heads=3, epochs=30, batch_size=64, lr=3e-3, root_input=True, path_input=True,
                      draft_layer=True, draft_intermediate=48)
    with pytest.raises(InvalidArgumentError, match="attention shape"):
        Trainer(cfg, lm, tmp / "draft_work", progress=False, embedding=emb)
    shape = DraftShape.from_config(json.loads((base / "config.json").read_text()))
    tr = Trainer(cfg, lm, tmp / "draft_work", progress=False, embedding=emb, draft_shape=shape)
    with pytest.raises(InvalidArgumentError, match="answer id"):
        tr.fit(feats.hidden, feats.labels, feats.roots)
    out = tmp / "draft_heads.safetensors"
    after, heads = _train_and_export(tr, feats, eng, out, feats.roots, feats.record)
    assert heads.metadata["format_version"] == "4" and heads.draft is not None and heads.paths is not None
    assert np.abs(heads.draft.o).max() > 0 and heads.draft.gate_up.shape == (96, 96)  # trained, 2 x 48 rows
    with pytest.raises(InvalidArgumentError, match="record"):
        accuracy_table(heads, feats.hidden, feats.labels, lm, 10, roots=feats.roots, embedding=emb)
    _numpy_table_and_lossless(heads, feats, lm, emb, after, base, out, seqs, record=feats.record)


def test_head_loss_without_labels_still_backpropagates():
    """A batch with no label for some or all heads (whole answers shorter than the heads reach,
    as draft-layer training takes them) gives a zero loss that backpropagates (zero gradients)."""
    from medusa_rt.train.trainer import head_loss

    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss, per = head_loss(logits, torch.full((3, 2), -1), 0.8)
    loss.backward()
    assert float(loss) == 0 and per == [0.0, 0.0] and not logits.grad.any()
    logits.grad = None
    loss, per = head_loss(logits, torch.tensor([[1, -1], [2, -1], [-1, -1]]), 0.8)
    loss.backward()
    assert per[0] > 0 and per[1] == 0 and logits.grad[0].any() and not logits.grad[1].any()
