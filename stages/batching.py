"""Length-budget batching: cut items into batches whose padded size stays within a sample budget.

A batch of variable-length audio is padded to its longest item, so it costs
``count x longest`` samples. :func:`plan_subbatches` walks the items in a given order
(longest first by default) and cuts a new batch whenever the next item would push that
cost past ``max_samples``; an item longer than the budget runs alone. Sorting by length
first keeps the padding low (``bench/teacher.py`` measures it). The teacher stage uses it
inside each Ray batch, the evaluation's feature extraction over a whole corpus.

Example::

    >>> import numpy as np
    >>> from spear.stages.batching import plan_subbatches
    >>> lengths = np.array([100, 900, 500, 1000, 120, 480])
    >>> [lengths[b].tolist() for b in plan_subbatches(lengths, max_samples=2000)]
    [[1000, 900], [500, 480, 120, 100]]
    >>> [b.tolist() for b in plan_subbatches(lengths, 2000, order=np.argsort(lengths, kind="stable"))]
    [[0, 4, 5, 2], [1, 3]]
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def plan_subbatches(lengths: Sequence[int] | np.ndarray, max_samples: int,
                    order: Optional[Sequence[int] | np.ndarray] = None) -> list[np.ndarray]:
    """Indices of ``lengths`` as consecutive runs of ``order`` (default: longest first, stable),
    each run with count x longest <= ``max_samples`` (a longer item runs alone; a length of 0
    counts as 1)."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable") if order is None else np.asarray(order, dtype=np.int64)
    batches: list[np.ndarray] = []
    start, longest = 0, 0
    for k, i in enumerate(order):
        n = max(int(lengths[i]), 1)
        if k > start and max(longest, n) * (k - start + 1) > max_samples:
            batches.append(order[start:k])
            start, longest = k, 0
        longest = max(longest, n)
    if start < len(order):
        batches.append(order[start:])
    return batches
