"""Medusa heads fitted to a tiny random model's own greedy continuations (self-distillation in
miniature), written in each of the three published checkpoint layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from _tiny_models import hf_greedy


def training_prompts(vocab: int, n: int = 12, seed: int = 11) -> List[List[int]]:
    rs = np.random.RandomState(seed)
    return [[int(x) for x in rs.randint(3, vocab, rs.randint(4, 12))] for _ in range(n)]


def fit_heads(model, prompts: List[List[int]], num_heads: int = 4, num_layers: int = 1, shared: bool = False,
              new_tokens: int = 48, steps: int = 250, seed: int = 0) -> Dict[str, "object"]:
    """Trains heads (base frozen) so that head k at position t predicts the model's own greedy
    token at t + 2 + k. Returns a state dict in the Medusa layout: {h}.{l}.linear.weight/bias and,
    unless shared, {h}.{L}.weight."""
    import torch

    torch.manual_seed(seed)
    hs, targets = [], []
    with torch.no_grad():
        for p in prompts:
            seq = p + hf_greedy(model, p, new_tokens)
            h = model.model(torch.tensor([seq])).last_hidden_state[0]
            hs.append(h)
            targets.append(torch.tensor(seq))
    d = model.config.hidden_size
    lm_head = model.lm_head.weight.detach()
    blocks = [[torch.nn.Linear(d, d) for _ in range(num_layers)] for _ in range(num_heads)]
    for hb in blocks:
        for lin in hb:
            torch.nn.init.zeros_(lin.weight)
    projs = [None if shared else torch.nn.Parameter(lm_head.clone()) for _ in range(num_heads)]
    params = [p for hb in blocks for lin in hb for p in lin.parameters()] + [p for p in projs if p is not None]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        loss = 0.0
        for h, seq in zip(hs, targets):
            for k in range(num_heads):
                n = len(seq) - 2 - k
                if n <= 0:
                    continue
                x = h[:n]
                for lin in blocks[k]:
                    x = x + torch.nn.functional.silu(lin(x))
                logits = x @ (lm_head if shared else projs[k]).T
                loss = loss + 0.8**k * torch.nn.functional.cross_entropy(logits, seq[2 + k : 2 + k + n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {}
    for k in range(num_heads):
        for l, lin in enumerate(blocks[k]):
            state[f"{k}.{l}.linear.weight"] = lin.weight.detach().clone()
            state[f"{k}.{l}.linear.bias"] = lin.bias.detach().clone()
        if not shared:
            state[f"{k}.{num_layers}.weight"] = projs[k].detach().clone()
    return state


def random_heads(hidden: int, vocab: int, num_heads: int = 4, seed: int = 0, shared: bool = False) -> Dict:
    """Random heads in the published layout (one residual block each; own lm_head unless shared)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    st = {}
    for h in range(num_heads):
        st[f"{h}.0.linear.weight"] = torch.randn(hidden, hidden, generator=g) * 0.05
        st[f"{h}.0.linear.bias"] = torch.randn(hidden, generator=g) * 0.05
        if not shared:
            st[f"{h}.1.weight"] = torch.randn(vocab, hidden, generator=g) * 0.1
    return st


def write_heads_only(state, out_dir: Path, *, pt: bool = False, version2: bool = False) -> Path:
    """Layout 1 (medusa_lm_head.safetensors / .pt + a Medusa config) or, with version2,
    the shared-lm_head layout (config "version": "2")."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    heads = 1 + max(int(k.split(".")[0]) for k in state)
    # The published v0.1 configs understate the head count; the exporter must not trust it.
    cfg = {"medusa_num_heads": 2 if not version2 else heads, "medusa_num_layers": 1}
    if version2:
        cfg["version"] = "2"
    (out_dir / "config.json").write_text(json.dumps(cfg))
    if pt:
        torch.save({k: v for k, v in state.items()}, out_dir / "medusa_lm_head.pt")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "medusa_lm_head.safetensors"))
    return out_dir


def write_full_checkpoint(model, state, out_dir: Path) -> Path:
    """Layout 2: an HF checkpoint whose tensors include medusa_head.* (Medusa-2 style)."""
    from safetensors.torch import load_file, save_file

    from _tiny_models import write_tiny_tokenizer

    model.save_pretrained(out_dir)
    write_tiny_tokenizer(out_dir, model.config.vocab_size)
    tensors = load_file(str(out_dir / "model.safetensors"))
    tensors.update({f"medusa_head.{k}": v.contiguous() for k, v in state.items()})
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["medusa_num_heads"] = 1 + max(int(k.split(".")[0]) for k in state)
    cfg["medusa_num_layers"] = 1
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir
