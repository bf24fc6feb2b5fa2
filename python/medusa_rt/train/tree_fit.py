"""Trees fitted to measured head accuracies (the construction of the Medusa reference, §2.2).

``table[k][r]`` is the probability that head k's rank-r candidate is the token the base model
produces k + 2 positions ahead. Treating the heads as independent, a tree path (r_1, ..., r_d) is
accepted with probability prod_i table[i-1][r_i], and the expected tokens per step of a tree is
1 (the bonus token) + the sum of its paths' probabilities. The tree is grown greedily from [0]: the
frontier holds each chosen path's next sibling (last rank + 1) and first child (rank 0 one level
deeper); the most probable frontier path joins until the tree has the requested number of nodes
(root included). The engine implements it (``medusa_rt::fit_tree_paths``, also used by the
calibrated tree); these are its Python entry points.

Heads are not independent (a row one head gets wrong is likely hard for the next, and path-input
heads read the path). :func:`fit_tree_empirical` fits the joint distribution instead: from each
held-out row's rank vector (the rank of the true token for each head, given the true path), a path
(r_1, ..., r_d) is accepted at exactly the rows whose rank vector starts with it, so the expected
tokens per step of a tree is 1 + the sum of its paths' row frequencies, and the paths of highest
frequency form the best tree of any size (a path is never more frequent than its parent).
"""

from __future__ import annotations

from collections import Counter
from typing import List, Optional, Sequence, Tuple

import numpy as np

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


def fit_tree_empirical(ranks: np.ndarray, num_nodes: int, *, max_depth: Optional[int] = None,
                       max_children: Optional[int] = None) -> Tuple[List[List[int]], List[float]]:
    """The tree of at most ``num_nodes`` nodes (root included) with the most accepted tokens on the
    rows of ``ranks`` (``[rows, heads]``, as :func:`.heads_np.rank_matrix` returns them: ranks >=
    ``max_children`` and -1 end a row's path). Returns the paths, most frequent first (so every
    prefix of the list is itself the best tree of its size), and each path's frequency (the fraction
    of rows that accept it): the expected tokens per step of the first n paths is 1 + the sum of
    their frequencies. Paths no row accepts are left out (a tree can come out smaller). Raises
    InvalidArgumentError for an empty rank matrix or limits out of range."""
    from ..errors import InvalidArgumentError

    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] == 0 or ranks.shape[1] == 0:
        raise InvalidArgumentError("fit_tree_empirical needs a [rows, heads] rank matrix with rows")
    if num_nodes < 1:
        raise InvalidArgumentError("a tree has at least 1 node (the root)")
    depth = ranks.shape[1] if max_depth is None else int(max_depth)
    children = int(ranks.max()) + 1 if max_children is None else int(max_children)
    if not 1 <= depth <= ranks.shape[1] or children < 1:
        raise InvalidArgumentError(f"max_depth must be in 1..{ranks.shape[1]} and max_children >= 1")
    counts = _prefix_counts(ranks[:, :depth], children)
    # Most frequent first; a parent is at least as frequent as its child and sorts before it on a tie.
    best = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))[:num_nodes - 1]
    n = ranks.shape[0]
    return [list(p) for p, _ in best], [c / n for _, c in best]


def _prefix_counts(ranks: np.ndarray, children: int) -> Counter:
    """For every path of ranks: the number of rows whose rank vector starts with it (a rank < 0 or
    >= children ends a row's path)."""
    counts: Counter = Counter()
    for row in ranks.tolist():
        path: Tuple[int, ...] = ()
        for r in row:
            if r < 0 or r >= children:
                break
            path += (r,)
            counts[path] += 1
    return counts


def measured_tokens_per_step(ranks: np.ndarray, paths: Sequence[Sequence[int]]) -> float:
    """1 + the mean accepted length of the tree ``paths`` over the rows of ``ranks`` (as
    :func:`.heads_np.rank_matrix` returns them): each row accepts the longest prefix of its rank
    vector that is a path of the tree, i.e. as many tokens as the tree has paths its rank vector
    starts with. The joint counterpart of :func:`expected_tokens_per_step` (an estimate per
    position: decoding starts steps more often at positions the heads find hard, so the tokens per
    step of real decoding come out lower)."""
    ranks = np.asarray(ranks)
    counts = _prefix_counts(ranks, int(ranks.max()) + 1 if ranks.size else 0)
    tree = {tuple(int(r) for r in p) for p in paths}
    return 1.0 + sum(counts[p] for p in tree) / max(ranks.shape[0], 1)
