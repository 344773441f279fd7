"""CAFE settings and the exact memory budget of one compressed table."""

import bisect
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_cafe.sketch.hot_sketch import HotSketch

# Official CAFE artifact (ArtifactEvaluation/tasks/criteo.json): per compression ratio, the sketch
# threshold (and the hash fraction, which the pooled layout no longer needs). A ratio between two
# entries takes the entry of the largest listed ratio below it.
PAPER_SCHEDULE = (
    # (compression ratio, threshold)
    (2, 10.0),
    (5, 10.0),
    (10, 20.0),
    (20, 30.0),
    (50, 50.0),
    (100, 100.0),
    (200, 200.0),
    (500, 500.0),
)

IMPORTANCE_MODES = ("grad_norm", "frequency")
COLD_ROWS = ("composed", "hashed")
# A table whose budget holds fewer rows than this gets no sketch: its cold rows alone (composed or
# hashed) fill the budget. Even small tables gain from a sketch: their Zipf head is concentrated, so
# a few private rows carry much of the traffic (on validation data, sketching tables down to 4
# rows instead of 64 lifted synthetic CR 100 by 0.005 AUC, Frappe CR 20 and Ciao by 0.001-0.002).
MIN_SKETCHED_ROWS = 4


# The automatic max_promotions: a table's pool fills over at least AUTO_FILL_UPDATES updates, and
# an update may promote AUTO_MIN_PROMOTIONS IDs of any table (small pools fill in a few updates).
AUTO_FILL_UPDATES = 64
AUTO_MIN_PROMOTIONS = 32


def paper_threshold(compression_ratio: float) -> float:
    """The official artifact's promotion threshold for a compression ratio."""
    ratios = [r for r, _ in PAPER_SCHEDULE]
    return PAPER_SCHEDULE[max(bisect.bisect_right(ratios, compression_ratio) - 1, 0)][1]


@dataclass
class CafeConfig:
    """CAFE settings of one logical table.

    A compressed table is a pool of hashed rows (plus, with ``cold_rows="composed"``, a table of
    ID-range *block* rows) and a HotSketch. Every ID reads a pool row: a hot ID one it owns, a cold
    ID its first of four hashed choices that no hot ID owns. The sketch decides which IDs are hot.

    Args:
        compression_ratio: logical table bytes / budget bytes (>= 1).
        threshold: ``None`` (default): adaptive promotion, an ID gets a private row once its score
            reaches ``promote_load`` x the average score mass of a pool row and loses it below
            ``demote_load`` x that (so the share of rows that are private follows the observed
            skew); a number: the paper's fixed promotion/demotion score (``paper_threshold(cr)``
            gives the official schedule).
        promote_load / demote_load: the adaptive bars, ``0 <= demote_load <= promote_load``.
        displace_ratio: a promotion candidate whose every choice is owned demotes the weakest owner
            once its guaranteed score exceeds this many times the owner's (0: never; the paper has
            no displacement), so a full pool keeps moving to the strongest IDs and follows drift.
            The same for all tables of a module.
        max_promotions: IDs of this table that one sketch update may promote (its strongest
            candidates; the others wait for a later update); ``None`` (default):
            ``max(32, ceil(pool rows / 64))``, so the pool fills over at least ~64 updates;
            0: no cap (the paper). Early gradients are noisy: an uncapped first update hands most
            of the pool to whichever IDs scored first, and the churn that follows demotes rows
            that had started to train (Ciao validation, CR 10: 2,764 demotions uncapped against
            219-674 with caps of 32-64, +0.005 AUC). With a cap on every table, an update's row
            migration is a fixed buffer of ``sum max_promotions`` pairs on accelerators (without,
            one per distinct ID of the update's batches, rows and optimizer state staged for each).
        cold_rows: ``"composed"`` (default): every ID also reads the block row of its ID range
            (``(id mod N) // ceil(N / B)``), so a cold ID is a distinct (pool row, block row) pair,
            QR-style, and IDs numbered by first appearance or catalogue order share what they have
            in common; ``"hashed"``: the paper's single hashed row.
        block_fraction: share of the rows that are block rows (``"composed"`` only), in (0, 1).
        sketch_slots_per_row: sketch slots (9 bytes each, ``slots_per_bucket`` per bucket) per
            physical row; the sketch tracks that many candidates for private rows.
        decay: factor applied to all scores at each decay event, in (0, 1] (paper: 0.99).
        slots_per_bucket: sketch slots per bucket (paper: 4).
        importance: ``"grad_norm"`` (paper: per-occurrence L2 norm of the row gradient, rescaled
            to mean 1 per feature and batch) or ``"frequency"`` (every occurrence scores 1).
        quarantine: sketch updates a freed pool row waits before a hot ID may claim it again;
            at most 127. Pipelined training needs none (migrations land in the compute stage).
        pipeline_depth: training steps a step's scores are held back before they reach the
            sketch: the update at step j applies the scores of steps <= j - 1 - pipeline_depth.
            Set it to the train pipeline's depth (1 for TorchRec's ``TrainPipelineSparseDist``,
            which remaps batch j + 1 before batch j's backward): the pipelined run then equals the
            unpipelined run of the same config bit for bit. 0 (default): every update applies
            all scores so far. The same for all tables of a module.
        sync: how ranks keep sketch replicas identical: ``"aggregated"`` all-gathers each rank's
            exact pre-aggregation (fewer bytes, an extra local sort) or ``"occurrences"`` every
            occurrence. Both give bit-identical replicas.
        optimizer_state: when a promoted ID moves to another pool row, that row's optimizer
            state is ``"copy"``-ed from the row it read (it keeps the step size it trained with)
            or ``"reset"`` to zero.
        update_interval: training steps whose scores are gathered into one sketch update (paper:
            1). An update is a function of the multiset of its scores, so k steps in one update
            see the same scores as k updates, only merged; it divides the sketch's cost by ~k.
    """

    compression_ratio: float
    threshold: Optional[float] = None
    promote_load: float = 0.1
    demote_load: float = 0.05
    displace_ratio: float = 0.0
    max_promotions: Optional[int] = None
    cold_rows: str = "composed"
    block_fraction: float = 0.5
    sketch_slots_per_row: float = 1.0
    decay: float = 0.99
    slots_per_bucket: int = 4
    importance: str = "grad_norm"
    quarantine: int = 0
    pipeline_depth: int = 0
    update_interval: int = 1
    optimizer_state: str = "copy"
    sync: str = "aggregated"

    def __post_init__(self) -> None:
        if not (self.compression_ratio >= 1 and math.isfinite(self.compression_ratio)):
            raise ValueError(f"compression_ratio must be a finite number >= 1, got {self.compression_ratio}")
        if self.threshold is not None and not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ValueError(f"threshold must be None or a finite number >= 0, got {self.threshold}")
        if not (0 <= self.demote_load <= self.promote_load and math.isfinite(self.promote_load)):
            raise ValueError(f"need 0 <= demote_load <= promote_load (finite), got {self.demote_load} and {self.promote_load}")
        if not (self.displace_ratio == 0 or (self.displace_ratio >= 1 and math.isfinite(self.displace_ratio))):
            raise ValueError(f"displace_ratio must be 0 (off) or a finite number >= 1, got {self.displace_ratio}")
        if self.max_promotions is not None and self.max_promotions < 0:
            raise ValueError(f"max_promotions must be None (automatic), 0 (no cap) or > 0, got {self.max_promotions}")
        if self.cold_rows not in COLD_ROWS:
            raise ValueError(f"cold_rows must be one of {COLD_ROWS}, got {self.cold_rows!r}")
        if not 0 < self.block_fraction < 1:
            raise ValueError(f"block_fraction must be in (0, 1), got {self.block_fraction}")
        if not (self.sketch_slots_per_row > 0 and math.isfinite(self.sketch_slots_per_row)):
            raise ValueError(f"sketch_slots_per_row must be a finite number > 0, got {self.sketch_slots_per_row}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.slots_per_bucket < 1:
            raise ValueError(f"slots_per_bucket must be >= 1, got {self.slots_per_bucket}")
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(f"importance must be one of {IMPORTANCE_MODES}, got {self.importance!r}")
        if not 0 <= self.quarantine <= 127:
            raise ValueError(f"quarantine must be in [0, 127], got {self.quarantine}")
        if not 0 <= self.pipeline_depth <= 16:
            raise ValueError(f"pipeline_depth must be in [0, 16], got {self.pipeline_depth}")
        if self.optimizer_state not in ("copy", "reset"):
            raise ValueError(f"optimizer_state must be 'copy' or 'reset', got {self.optimizer_state!r}")
        if self.sync not in ("aggregated", "occurrences"):
            raise ValueError(f"sync must be 'aggregated' or 'occurrences', got {self.sync!r}")
        if self.update_interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {self.update_interval}")

    @classmethod
    def paper(cls, compression_ratio: float, **overrides: Any) -> "CafeConfig":
        """The paper's settings: the official threshold schedule, one hashed row per cold ID, no
        displacement, no cap on promotions."""
        settings: Dict[str, Any] = {
            "threshold": paper_threshold(compression_ratio), "cold_rows": "hashed", "displace_ratio": 0.0, "max_promotions": 0,
            **overrides,
        }  # fmt: skip
        return cls(compression_ratio=compression_ratio, **settings)

    def promotions_per_update(self, pool_rows: int) -> int:
        """``max_promotions`` resolved for a table of ``pool_rows`` pool rows (0: no cap)."""
        if self.max_promotions is not None:
            return self.max_promotions
        return max(AUTO_MIN_PROMOTIONS, math.ceil(pool_rows / AUTO_FILL_UPDATES))

    @property
    def composed(self) -> bool:
        return self.cold_rows == "composed"


def table_budget_bytes(table: EmbeddingBagConfig, compression_ratio: float, dtype_bytes: int = 4) -> int:
    """The bytes every method may spend on ``table``: ``floor(N * dim * dtype_bytes / CR)``."""
    return int(table.num_embeddings * table.embedding_dim * dtype_bytes // compression_ratio)


def hashed_rows(budget_bytes: int, row_bytes: int) -> int:
    """Rows of a table hashed into its budget: as many as fit, at least one."""
    return max(1, budget_bytes // row_bytes)


@dataclass(frozen=True)
class TableBudget:
    """Physical form of one logical table under a CafeConfig (sizes exact, in bytes).

    Three kinds: *plain* (``compressed`` False: the budget holds the whole table, ``pool_rows`` =
    N, no block rows, no sketch); *sketched* (``num_buckets`` > 0: pool + block rows + sketch);
    *static* (compressed, ``num_buckets`` == 0: the budget holds fewer than ``MIN_SKETCHED_ROWS``
    rows, which are the cold rows alone, at least one).
    """

    logical_bytes: int
    budget_bytes: int
    pool_rows: int
    block_rows: int
    num_buckets: int
    row_bytes: int
    sketch_bytes: int
    compressed: bool

    @property
    def rows(self) -> int:
        return self.pool_rows + self.block_rows

    @property
    def sketched(self) -> bool:
        return self.num_buckets > 0

    @property
    def total_bytes(self) -> int:
        return self.rows * self.row_bytes + self.sketch_bytes


def _split(rows: int, cafe: CafeConfig) -> "tuple[int, int]":
    """(pool rows, block rows) of ``rows`` physical rows (both >= 1 when composed and rows >= 2)."""
    if not cafe.composed or rows < 2:
        return rows, 0
    block = min(max(1, int(cafe.block_fraction * rows)), rows - 1)
    return rows - block, block


def table_budget(table: EmbeddingBagConfig, cafe: CafeConfig, dtype_bytes: int = 4) -> TableBudget:
    """Splits ``logical_bytes / compression_ratio`` into rows and the sketch, exactly.

    R rows (P pool + B block) and a sketch of ``K = ceil(sketch_slots_per_row * R / c)`` buckets:
    R is the largest count with ``R * row_bytes + sketch_bytes(K, P) + shared bytes <= budget``,
    so ``total_bytes <= budget_bytes``; the sketch's shared sentinel bytes are reserved in every
    table's budget (a module charges them to one table).
    """
    n, row = table.num_embeddings, table.embedding_dim * dtype_bytes
    logical = n * row
    budget = table_budget_bytes(table, cafe.compression_ratio, dtype_bytes)
    if budget >= logical:
        return TableBudget(logical, budget, n, 0, 0, row, 0, False)
    c = cafe.slots_per_bucket

    def buckets(rows: int) -> int:
        return max(1, math.ceil(cafe.sketch_slots_per_row * rows / c))

    def sketch(rows: int) -> int:
        return HotSketch.table_state_bytes(buckets(rows), _split(rows, cafe)[0], c)

    shared = HotSketch.shared_state_bytes(c)
    def fits(rows: int) -> bool:
        return rows * row + sketch(rows) + shared <= budget

    # Bisection for the largest fitting count (the bytes grow with the rows); a row costs at
    # least row + 9 * sketch_slots_per_row bytes, so lo..hi brackets it.
    lo, hi = 0, int(budget // (row + 9 * cafe.sketch_slots_per_row)) + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    rows = lo
    if rows < MIN_SKETCHED_ROWS:
        pool, block = _split(hashed_rows(budget, row), cafe)
        return TableBudget(logical, budget, pool, block, 0, row, 0, True)
    pool, block = _split(rows, cafe)
    return TableBudget(logical, budget, pool, block, buckets(rows), row, sketch(rows), True)
