"""metrics.csv: one row per training step, kept in every checkpoint and copied to ``OUTPUT/metrics/``.

Columns the training loop always writes: ``step``, ``world_size``, ``lr``, ``audio_seconds_per_s``,
``updated`` (1, or 0 for a step whose batches had no target of the student's teachers on any
rank: no optimiser step), ``batch_digest`` (rank 0's rows), ``loss`` (nan where rank 0's batch had
no target, not a perfect 0), ``frames``; then per teacher ``<role>/ce``, ``<role>/acc_masked``,
``<role>/acc_unmasked``, and ScaledAdam's ``clip_scale``. Readers take any extra column as it comes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

METRICS_FILE = "metrics.csv"


def learned_losses(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """The losses of the steps that had targets, in step order (rows as ``csv.DictReader`` reads them).

    >>> learned_losses([{"loss": "5.1"}, {"loss": "nan"}, {"loss": ""}, {"loss": "4.9"}])
    [5.1, 4.9]
    """
    values = (float(r["loss"]) for r in rows if r.get("loss") not in (None, ""))
    return [x for x in values if not math.isnan(x)]


def steps_without_update(rows: Sequence[Mapping[str, Any]]) -> int:
    """How many steps took no optimiser step (``updated`` 0: no rank had a target of the student's teachers).

    >>> steps_without_update([{"updated": "1"}, {"updated": "0"}, {}])
    1
    """
    return sum(str(r.get("updated")) == "0" for r in rows)
