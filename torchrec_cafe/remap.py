"""Remap: a KJT of raw IDs -> a KJT of physical rows, plus what the importance hook needs.

Physical layout of a compressed table: rows ``[0, H)`` are hot rows (hot index h -> row h), rows
``[H, H + S)`` are shared rows. An ID that is hot reads its hot row; every other ID reads shared
row ``H + hash1(id) % S``; with multi-level hashing a medium ID also reads ``H + hash2(id) % S``
(one extra entry in its bag). Plain tables reduce IDs modulo ``num_embeddings``, so any int64 ID
is valid everywhere.

All features are remapped together by per-feature constant tensors: the cost is a fixed number of
tensor ops whatever the number of tables. Only multi-level hashing adds a variable number of
entries (boolean selection: one host sync on CUDA).
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cafe.config import CafeConfig, TableBudget
from torchrec_cafe.sketch.hashing import mix64
from torchrec_cafe.sketch.hot_sketch import HotSketch
from torchrec_cafe.sketch.ops import take

SHARED_SEED = 0x51A7ED
SECOND_SEED = 0x2ECD


@dataclass(frozen=True)
class TableLayout:
    """A logical table and its physical form. ``cafe`` is None for plain tables."""

    config: EmbeddingBagConfig
    cafe: Optional[CafeConfig]
    budget: TableBudget
    weighted: bool = False

    @property
    def compressed(self) -> bool:
        return self.cafe is not None and self.budget.compressed

    @property
    def multi_level(self) -> bool:
        return self.compressed and self.cafe.multi_level

    @property
    def mean_as_weights(self) -> bool:
        """MEAN is computed as SUM with weights w/len when bags gain entries (multi-level) or carry
        weights (torch's EmbeddingBag has no weighted MEAN)."""
        return self.config.pooling == PoolingType.MEAN and (self.weighted or self.multi_level)

    def physical_config(self) -> EmbeddingBagConfig:
        c = self.config
        return EmbeddingBagConfig(
            num_embeddings=self.budget.rows,
            embedding_dim=c.embedding_dim,
            name=c.name,
            data_type=c.data_type,
            feature_names=list(c.feature_names),
            weight_init_max=c.weight_init_max,
            weight_init_min=c.weight_init_min,
            init_fn=c.init_fn,
            pooling=PoolingType.SUM if self.mean_as_weights else c.pooling,
        )


def _shared(ids: torch.Tensor, num_hot: "torch.Tensor | int", num_shared: "torch.Tensor | int", seed: int) -> torch.Tensor:
    """Shared row of each id: ``H + hash_seed(id) % S`` (sizes per element or per table)."""
    return num_hot + torch.remainder(mix64(ids, seed), num_shared)


def shared_rows(ids: torch.Tensor, budget: TableBudget, seed: int = SHARED_SEED) -> torch.Tensor:
    """Shared row of each id in one compressed table (``seed``: first or second hash)."""
    return _shared(ids, budget.num_hot, budget.num_shared, seed)


@dataclass
class RemapContext:
    """What one forward saw of its compressed occurrences, [n_c] each (n_c = compressed values)."""

    ids: torch.Tensor  # raw ids
    tables: torch.Tensor  # compressed-table index (sketch table) of each occurrence
    bag: torch.Tensor  # bag index in key-major KJT order: feature * B + sample
    feature: torch.Tensor  # feature index (module feature order)
    factor: torch.Tensor  # |weight| (/ bag length for MEAN): d pooled / d row, up to the gradient
    medium: Optional[torch.Tensor]  # read two shared rows (multi-level)
    hot_hits: torch.Tensor  # [T] fraction of each compressed table's occurrences that hit a hot row


class KJTRemapper(nn.Module):
    """Maps KJTs in module feature order (the layouts' tables, then their features) to physical
    rows, using a ``HotSketch`` whose table t is the t-th compressed layout."""

    def __init__(self, layouts: List[TableLayout], device: Optional[torch.device] = None) -> None:
        super().__init__()
        compressed = [l for l in layouts if l.compressed]
        sketch_table = {l.config.name: t for t, l in enumerate(compressed)}
        per_feature: List[Tuple[TableLayout, int]] = [
            (l, sketch_table.get(l.config.name, -1)) for l in layouts for _ in l.config.feature_names
        ]
        self.num_features = len(per_feature)
        self.compressed_features = [i for i, (_, t) in enumerate(per_feature) if t >= 0]
        self.weighted_out = any(l.weighted or l.mean_as_weights for l in layouts)
        self.any_multi_level = any(l.multi_level for l in layouts)
        self.frequency_tables = [t for t, l in enumerate(compressed) if l.cafe.importance == "frequency"]
        constants = {
            "cafe_table": ([t for _, t in per_feature], torch.int64),
            "num_rows": ([l.config.num_embeddings for l, _ in per_feature], torch.int64),
            "num_hot": ([l.budget.num_hot for l, _ in per_feature], torch.int64),
            "num_shared": ([max(l.budget.num_shared, 1) for l, _ in per_feature], torch.int64),
            "mean": ([l.config.pooling == PoolingType.MEAN for l, _ in per_feature], torch.bool),
            "mean_as_weights": ([l.mean_as_weights for l, _ in per_feature], torch.bool),
            "multi_level": ([l.multi_level for l, _ in per_feature], torch.bool),
            # per compressed (sketch) table
            "medium_level": ([l.cafe.medium_threshold for l in compressed] or [0.0], torch.float64),
            "frequency": ([l.cafe.importance == "frequency" for l in compressed] or [False], torch.bool),
            "table_hot": ([l.budget.num_hot for l in compressed] or [0], torch.int64),
            "table_shared": ([l.budget.num_shared for l in compressed] or [1], torch.int64),
            "table_multi_level": ([l.multi_level for l in compressed] or [False], torch.bool),
            "table_reset_state": ([l.cafe.optimizer_state == "reset" for l in compressed] or [False], torch.bool),
        }
        for name, (values, dtype) in constants.items():
            self.register_buffer(name, torch.tensor(values, dtype=dtype, device=device), persistent=False)

    def forward(
        self, kjt: KeyedJaggedTensor, sketch: Optional[HotSketch]
    ) -> Tuple[KeyedJaggedTensor, Optional[RemapContext]]:
        ids = kjt.values().to(torch.int64)
        lengths = kjt.lengths()
        n, device = ids.numel(), ids.device
        per_key = kjt.length_per_key()
        feature = torch.repeat_interleave(
            torch.arange(self.num_features, device=device), torch.tensor(per_key, device=device), output_size=n
        )
        bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=n)
        plain_rows = torch.remainder(ids, take(self.num_rows, feature))
        if sketch is None:
            return self._physical(kjt, plain_rows, lengths, bag, feature), None
        # Only the compressed features' values are probed; they are runs known from host offsets.
        sel = self._compressed_positions(kjt)
        ids_c, feature_c = take(ids, sel), take(feature, sel)
        table_c = take(self.cafe_table, feature_c)
        hot, medium_c = sketch.lookup(ids_c, table_c, self.medium_level)
        shared = _shared(ids_c, take(self.num_hot, feature_c), take(self.num_shared, feature_c), SHARED_SEED)
        rows = plain_rows.index_copy(0, sel, torch.where(hot >= 0, hot, shared))
        medium = None
        if self.any_multi_level:
            medium_c = medium_c & (hot < 0) & take(self.multi_level, feature_c)
            medium = torch.zeros_like(ids, dtype=torch.bool).index_copy(0, sel, medium_c)
        physical = self._physical(kjt, rows, lengths, bag, feature, medium)
        context = self._context(kjt, sel, ids_c, table_c, take(bag, sel), feature_c, hot, medium_c)
        return physical, context

    def _physical(
        self,
        kjt: KeyedJaggedTensor,
        rows: torch.Tensor,
        lengths: torch.Tensor,
        bag: torch.Tensor,
        feature: torch.Tensor,
        medium: Optional[torch.Tensor] = None,
    ) -> KeyedJaggedTensor:
        weights: Optional[torch.Tensor] = None
        if self.weighted_out:
            w = kjt.weights_or_none()
            base = w if w is not None else torch.ones_like(rows, dtype=torch.float32)
            inv_len = 1.0 / take(lengths.clamp(min=1).to(base.dtype), bag)
            weights = torch.where(take(self.mean_as_weights, feature), base * inv_len, base)
        if medium is not None:
            # A medium ID's embedding is the sum of two shared rows: its bag gets a second entry.
            ids = kjt.values().to(torch.int64)
            second = _shared(ids, take(self.num_hot, feature), take(self.num_shared, feature), SECOND_SEED)
            keep = torch.stack([torch.ones_like(medium), medium], dim=1)
            lengths = torch.zeros_like(lengths).index_add_(0, bag, keep.sum(dim=1).to(lengths.dtype))
            rows = torch.stack([rows, second], dim=1)[keep]
            if weights is not None:
                weights = weights.unsqueeze(1).expand(-1, 2)[keep]
        return KeyedJaggedTensor(
            keys=kjt.keys(), values=rows, lengths=lengths, weights=weights, stride=kjt.stride()
        )

    def _context(
        self,
        kjt: KeyedJaggedTensor,
        sel: torch.Tensor,
        ids: torch.Tensor,
        tables: torch.Tensor,
        bag: torch.Tensor,
        feature: torch.Tensor,
        hot: torch.Tensor,
        medium: torch.Tensor,
    ) -> RemapContext:
        """Hook data of the compressed occurrences (all arguments but ``kjt``/``sel``: [n_c])."""
        w = kjt.weights_or_none()
        factor = take(w, sel).abs().float() if w is not None else torch.ones(sel.numel(), device=ids.device)
        inv_len = 1.0 / take(kjt.lengths().clamp(min=1).to(factor.dtype), bag)
        factor = torch.where(take(self.mean, feature), factor * inv_len, factor)
        num_tables = self.medium_level.numel()
        hits = torch.zeros(num_tables, device=ids.device).index_add_(0, tables, (hot >= 0).float())
        seen = torch.zeros(num_tables, device=ids.device).index_add_(0, tables, torch.ones_like(factor))
        return RemapContext(
            ids=ids,
            tables=tables,
            bag=bag,
            feature=feature,
            factor=factor,
            medium=medium if self.any_multi_level else None,
            hot_hits=hits / seen.clamp(min=1),
        )

    def migration_sources(
        self, ids: torch.Tensor, tables: torch.Tensor, prior_scores: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        """Rows a promoted ID trained so far: (first shared row, second shared row, whether the
        second one was read, i.e. the ID was medium, whether its optimizer state is reset) [N]
        each; the second and third are None without multi-level hashing."""
        hot, shared = take(self.table_hot, tables), take(self.table_shared, tables)
        src = _shared(ids, hot, shared, SHARED_SEED)
        reset = take(self.table_reset_state, tables)
        if not self.any_multi_level:
            return src, None, None, reset
        medium = take(self.table_multi_level, tables) & (prior_scores >= take(self.medium_level, tables))
        return src, _shared(ids, hot, shared, SECOND_SEED), medium, reset

    def _compressed_positions(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Positions of the compressed features' values: contiguous runs known from host offsets."""
        offsets, device = kjt.offset_per_key(), kjt.values().device
        starts = [offsets[f] for f in self.compressed_features]
        counts = [offsets[f + 1] - offsets[f] for f in self.compressed_features]
        total = sum(counts)
        if not counts:
            return torch.zeros(0, dtype=torch.int64, device=device)
        counts_t = torch.tensor(counts, device=device)
        run_start = torch.tensor(starts, device=device) - (torch.cumsum(counts_t, 0) - counts_t)
        return torch.arange(total, device=device) + torch.repeat_interleave(run_start, counts_t, output_size=total)
