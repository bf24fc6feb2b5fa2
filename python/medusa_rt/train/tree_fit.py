"""Trees fitted to measured head accuracies (the construction of the Medusa reference, §2.2).

``table[k][r]`` is the probability that head k's rank-r candidate is the token the base model
produces k + 2 positions ahead. Treating the heads as independent, a tree path (r_1, ..., r_d) is
accepted with probability prod_i table[i-1][r_i], and the expected tokens per step of a tree is
1 (the bonus token) + the sum of its paths' probabilities. The tree is grown greedily from [0]: the
frontier holds each chosen path's next sibling (last rank + 1) and first child (rank 0 one level
deeper); the most probable frontier path joins until the tree has the requested number of nodes
(root included). The engine implements it (``medusa_rt::fit_tree_paths``, also used by the
calibrated tree); these are its Python entry points.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from .. import _core


def _table(table: Sequence[Sequence[float]]) -> List[List[float]]:
    return [[float(x) for x in row] for row in table]


def fit_tree(table: Sequence[Sequence[float]], num_nodes: int, *, max_depth: Optional[int] = None,
             max_children: Optional[int] = None) -> List[List[int]]:
    """The greedy tree of ``num_nodes`` nodes (root included, so up to num_nodes - 1 paths), paths
    in the order they joined (most probable first). ``max_depth`` defaults to the number of heads
    in the table, ``max_children`` to its number of ranks. Raises InvalidArgumentError for a table
    that is not [heads][ranks] of probabilities or limits outside it."""
    return [list(p) for p in _core.fit_tree_paths(_table(table), int(num_nodes), int(max_depth or 0),
                                                  int(max_children or 0))]


def expected_tokens_per_step(table: Sequence[Sequence[float]], paths: Sequence[Sequence[int]]) -> float:
    """1 + the sum of the paths' acceptance probabilities (greedy acceptance, independent heads)."""
    return float(_core.expected_tokens_per_step(_table(table), [[int(r) for r in p] for p in paths]))
