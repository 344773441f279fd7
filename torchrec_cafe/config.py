"""CAFE settings and the exact memory budget of one compressed table."""

import bisect
import math
from dataclasses import dataclass
from typing import Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_cafe.sketch.hot_sketch import HotSketch

# Official CAFE artifact (ArtifactEvaluation/tasks/criteo.json): per compression ratio, the sketch
# threshold and the fraction of the budget given to shared (hashed) rows. A ratio between two
# entries takes the entry of the largest listed ratio below it.
PAPER_SCHEDULE = (
    # (compression ratio, threshold, hash_fraction)
    (2, 10.0, 0.7),
    (5, 10.0, 0.5),
    (10, 20.0, 0.5),
    (20, 30.0, 0.5),
    (50, 50.0, 0.3),
    (100, 100.0, 0.3),
    (200, 200.0, 0.2),
    (500, 500.0, 0.2),
    (1000, 500.0, 0.2),
    (2000, 500.0, 0.1),
    (5000, 500.0, 0.1),
    (10000, 500.0, 0.1),
)

IMPORTANCE_MODES = ("grad_norm", "frequency")


def paper_schedule(compression_ratio: float) -> "tuple[float, float]":
    """(threshold, hash_fraction) of the official artifact for a compression ratio."""
    ratios = [r for r, _, _ in PAPER_SCHEDULE]
    i = max(bisect.bisect_right(ratios, compression_ratio) - 1, 0)
    return PAPER_SCHEDULE[i][1], PAPER_SCHEDULE[i][2]


@dataclass
class CafeConfig:
    """CAFE settings of one logical table.

    Args:
        compression_ratio: logical table bytes / budget bytes (>= 1).
        hash_fraction: share of the budget spent on shared (hashed) rows, in (0, 1); the rest pays
            for hot rows and the sketch. ``None``: the paper's schedule by compression ratio.
        threshold: importance score at which an ID gets a hot row (>= 0). ``None``: the paper's
            schedule by compression ratio.
        decay: factor applied to all scores at each decay event, in (0, 1] (paper: 0.99).
        slots_per_bucket: sketch slots per bucket (paper: 4).
        importance: ``"grad_norm"`` (paper: per-occurrence L2 norm of the row gradient, rescaled
            to mean 1 per feature and batch) or ``"frequency"`` (every occurrence scores 1).
        multi_level: medium IDs (tracked, score >= ``medium_threshold``, not hot) use the sum of
            two shared rows chosen by independent hashes (paper section 4).
        medium_threshold: defaults to ``threshold / 4``; must be below ``threshold``.
        quarantine: sketch updates a freed hot row waits before reuse; must be at least the
            pipeline depth when batches are remapped ahead of the previous update.
        sync: how ranks keep sketch replicas identical: ``"aggregated"`` all-gathers each rank's
            exact pre-aggregation (fewer bytes, an extra local sort) or ``"occurrences"`` every
            occurrence (20 B each, no extra sort). Both give bit-identical replicas.
        optimizer_state: on promotion, the hot row's optimizer state is ``"copy"``-ed from the ID's
            shared row (it keeps the step size it trained with) or ``"reset"`` to zero (a fresh
            row: with Adagrad-like optimizers, large first steps).
        displace_ratio: a table whose hot rows are all taken demotes its weakest hot ID when a
            waiting candidate scores more than this multiple of it (its row goes to the strongest
            candidate at a later update); 0 disables (paper: the hot set then changes only by
            decay, so on stationary data it keeps the first IDs to cross the threshold).
        update_interval: training steps whose scores are gathered into one sketch update (paper:
            1). An update is a function of the multiset of its scores, so k steps in one update
            see the same scores as k updates, only merged; it divides the sketch's cost by ~k.
    """

    compression_ratio: float
    hash_fraction: Optional[float] = None
    threshold: Optional[float] = None
    decay: float = 0.99
    slots_per_bucket: int = 4
    importance: str = "grad_norm"
    multi_level: bool = False
    medium_threshold: Optional[float] = None
    quarantine: int = 0
    update_interval: int = 1
    optimizer_state: str = "copy"
    sync: str = "aggregated"
    displace_ratio: float = 4.0

    def __post_init__(self) -> None:
        if not (self.compression_ratio >= 1 and math.isfinite(self.compression_ratio)):
            raise ValueError(f"compression_ratio must be a finite number >= 1, got {self.compression_ratio}")
        threshold, hash_fraction = paper_schedule(self.compression_ratio)
        if self.threshold is None:
            self.threshold = threshold
        if self.hash_fraction is None:
            self.hash_fraction = hash_fraction
        if not 0 < self.hash_fraction < 1:
            raise ValueError(f"hash_fraction must be in (0, 1), got {self.hash_fraction}")
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.slots_per_bucket < 1:
            raise ValueError(f"slots_per_bucket must be >= 1, got {self.slots_per_bucket}")
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(f"importance must be one of {IMPORTANCE_MODES}, got {self.importance!r}")
        if self.medium_threshold is None:
            self.medium_threshold = self.threshold / 4
        if not 0 <= self.medium_threshold < max(self.threshold, 1e-12):
            raise ValueError(
                f"medium_threshold must be in [0, threshold={self.threshold}), got {self.medium_threshold}"
            )
        if self.quarantine < 0:
            raise ValueError(f"quarantine must be >= 0, got {self.quarantine}")
        if self.optimizer_state not in ("copy", "reset"):
            raise ValueError(f"optimizer_state must be 'copy' or 'reset', got {self.optimizer_state!r}")
        if self.sync not in ("aggregated", "occurrences"):
            raise ValueError(f"sync must be 'aggregated' or 'occurrences', got {self.sync!r}")
        if not (self.displace_ratio >= 0 and math.isfinite(self.displace_ratio)):
            raise ValueError(f"displace_ratio must be a finite number >= 0, got {self.displace_ratio}")
        if self.update_interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {self.update_interval}")


@dataclass(frozen=True)
class TableBudget:
    """Physical sizes of one logical table under a CafeConfig (all sizes exact, in bytes).

    ``compressed`` is False when the budget holds the whole table (compression ratio 1) or cannot
    hold one hot and one shared row: the table then stays a plain full table (``num_shared`` = N).
    """

    logical_bytes: int
    budget_bytes: int
    num_hot: int
    num_shared: int
    num_buckets: int
    row_bytes: int
    sketch_bytes: int
    compressed: bool

    @property
    def rows(self) -> int:
        return self.num_hot + self.num_shared

    @property
    def total_bytes(self) -> int:
        return self.rows * self.row_bytes + self.sketch_bytes


def table_budget(table: EmbeddingBagConfig, cafe: CafeConfig, dtype_bytes: int = 4) -> TableBudget:
    """Splits ``logical_bytes / compression_ratio`` into shared rows, hot rows and the sketch.

    S = floor(hash_fraction * M / row_bytes); H is the largest count whose rows and sketch (with
    K = H buckets, as in the paper) fit in the rest, so ``total_bytes <= budget_bytes``. The rest
    also reserves the sketch's shared sentinel bytes, which a module charges to one table.
    """
    n, row = table.num_embeddings, table.embedding_dim * dtype_bytes
    logical = n * row
    budget = int(logical // cafe.compression_ratio)
    shared = int(cafe.hash_fraction * budget // row)
    rest = budget - shared * row
    c = cafe.slots_per_bucket
    per_hot = row + HotSketch.table_state_bytes(1, 1, c) - HotSketch.table_state_bytes(0, 0, c)
    fixed = HotSketch.table_state_bytes(0, 0, c) + HotSketch.shared_state_bytes(c)
    hot = max((rest - fixed) // per_hot, 0)
    compressed = budget < logical and hot >= 1 and shared >= 1
    if not compressed:
        return TableBudget(logical, budget, 0, n, 0, row, 0, False)
    return TableBudget(
        logical, budget, hot, shared, hot, row, HotSketch.table_state_bytes(hot, hot, c), True
    )
