"""TreeSpec against the reference algorithm's test vectors (shared/reference/medusa-algorithm.md §2)."""

from __future__ import annotations

from collections import Counter

import pytest

from medusa_rt import _core
from medusa_rt.errors import InvalidArgumentError

TreeSpec = _core.TreeSpec

TOY = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def _mask(tree):
    n = tree.num_nodes
    m = [[0] * n for _ in range(n)]
    for i, anc in enumerate(tree.ancestors):
        for a in anc:
            m[i][a] = 1
    return m


def test_toy_tree_vectors():
    t = TreeSpec(TOY)
    assert t.num_nodes == 7 and t.max_depth == 3 and t.max_rank == 1
    assert [tuple(p) for p in t.paths] == [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    assert t.tree_indices(10) == [0, 1, 2, 11, 12, 11, 21]
    assert t.depths == [0, 1, 1, 2, 2, 2, 3]
    assert [sorted(a) for a in t.ancestors] == [[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 1, 3, 6]]
    assert t.retrieve_indices() == [[0, 1, 3, 6], [0, 2, 5, -1], [0, 1, 4, -1]]
    mask = _mask(t)
    for i in range(7):
        for j in range(7):
            assert mask[i][j] == (1 if j in t.ancestors[i] else 0)
            if j > i:
                assert mask[i][j] == 0  # the tree mask lies inside the causal triangle


def test_mc_sim_7b_63_vectors():
    t = TreeSpec.named("mc_sim_7b_63")
    assert t.num_nodes == 64
    d1 = [(i,) for i in range(10)]
    d2 = ([(0, i) for i in range(10)] + [(1, i) for i in range(7)] + [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1)]
          + [(i, 0) for i in range(4, 10)])
    d3 = ([(0, 0, i) for i in range(10)] + [(0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1)]
          + [(0, i, 0) for i in range(3, 8)] + [(1, 0, 0), (1, 0, 1), (2, 0, 0)])
    d4 = [(0, 0, 0, 0), (0, 0, 0, 1)]
    assert [tuple(p) for p in t.paths] == d1 + d2 + d3 + d4
    assert t.tree_indices(10) == (
        [0] + list(range(1, 11)) + list(range(11, 21)) + list(range(11, 18)) + [11, 12, 13, 11, 12] + [11] * 6
        + list(range(21, 31)) + [21, 22, 23, 21, 22] + [21] * 5 + [21, 22, 21, 31, 32]
    )
    assert t.depths == [0] + [1] * 10 + [2] * 28 + [3] * 23 + [4] * 2
    assert t.parents == ([-1] + [0] * 10 + [1] * 10 + [2] * 7 + [3] * 3 + [4] * 2 + [5, 6, 7, 8, 9, 10]
                         + [11] * 10 + [12] * 3 + [13] * 2 + [14, 15, 16, 17, 18, 21, 21, 28, 39, 39])
    rows = (
        [[0, 1, 11, 39, 63], [0, 1, 11, 39, 62], [0, 3, 28, 61, -1], [0, 2, 21, 60, -1], [0, 2, 21, 59, -1]]
        + [[0, 1, 18 - i, 58 - i, -1] for i in range(5)]
        + [[0, 1, 13, 53, -1], [0, 1, 13, 52, -1], [0, 1, 12, 51, -1], [0, 1, 12, 50, -1], [0, 1, 12, 49, -1]]
        + [[0, 1, 11, 48 - i, -1] for i in range(9)]
        + [[0, 10 - i, 38 - i, -1, -1] for i in range(7)]
        + [[0, 4, 31, -1, -1], [0, 3, 30, -1, -1], [0, 3, 29, -1, -1]]
        + [[0, 2, 27 - i, -1, -1] for i in range(6)]
        + [[0, 1, 20, -1, -1], [0, 1, 19, -1, -1]]
    )
    # rows 5..9 of the reference: [0,1,18,58] [0,1,17,57] [0,1,16,56] [0,1,15,55] [0,1,14,54]
    assert len(rows) == 42
    assert t.retrieve_indices() == rows


# nodes per depth, from the reference table of the published trees
PUBLISHED = {
    "mc_sim_7b_63": [10, 28, 23, 2],
    "vicuna_7b_stage2": [10, 23, 23, 7],
    "vicuna_7b_stage1": [10, 32, 20, 1],
    "vicuna_7b_stage1_ablation": [10, 21, 25, 7],
    "vicuna_13b_stage2": [10, 19, 25, 9],
    "vicuna_13b_stage1": [10, 29, 23, 1],
    "vicuna_33b_stage2": [10, 24, 24, 5],
    "vicuna_33b_stage1": [10, 34, 19],
    "zephyr_stage2": [10, 27, 23, 3],
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_trees(name):
    t = TreeSpec.named(name)
    assert t.num_nodes == 64
    counts = Counter(t.depths[1:])
    assert [counts[d] for d in sorted(counts)] == PUBLISHED[name]
    assert len(t.retrieve_indices()) == sum(
        1 for i in range(1, 64) if i not in t.parents  # leaves
    )
    t.check_fits(len(PUBLISHED[name]), 10)


def test_builtin_names_and_chain():
    assert sorted(TreeSpec.builtin_names()) == sorted(PUBLISHED)
    c = TreeSpec.named("chain-3")
    assert [list(p) for p in c.paths] == [[0], [0, 0], [0, 0, 0]] and c.num_nodes == 4
    assert TreeSpec.named("chain-0").num_nodes == 1
    with pytest.raises(InvalidArgumentError, match="unknown tree 'nope'"):
        TreeSpec.named("nope")
    with pytest.raises(InvalidArgumentError, match="chain-N"):
        TreeSpec.named("chain-x")


def test_truncated_is_a_prefix_tree():
    t = TreeSpec.named("mc_sim_7b_63").truncated(20)
    assert t.num_nodes == 20
    assert all(p < i for i, p in enumerate(t.parents) if i)


@pytest.mark.parametrize(
    "choices, message",
    [
        ([[0], []], "empty"),
        ([[0], [-1]], "negative rank"),
        ([[0], [1], [0]], r"\[0\] appears twice"),
        ([[0], [1, 0, 0]], r"\[1, 0, 0\] has no parent: its prefix \[1\] is missing"),
        ([[0]] + [[0] * d for d in range(2, 66)], "deeper than 64"),
    ],
)
def test_invalid_trees(choices, message):
    with pytest.raises(InvalidArgumentError, match=message):
        TreeSpec(choices)


def test_tree_must_fit_heads_and_top_k():
    t = TreeSpec.named("mc_sim_7b_63")
    with pytest.raises(InvalidArgumentError, match="4 deep but the model has 3 Medusa heads"):
        t.check_fits(3, 10)
    with pytest.raises(InvalidArgumentError, match=r"path \[5\] uses rank 5 but only the top 5"):
        t.check_fits(5, 5)
