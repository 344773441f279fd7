"""Remap: a KJT of raw IDs -> a KJT of physical rows, plus what the importance hook needs.

Physical layout of a compressed table: rows ``[0, H)`` are hot rows (hot index h -> row h), rows
``[H, H + S)`` are shared rows. An ID that is hot reads its hot row; every other ID reads shared
row ``H + hash1(id) % S``; with multi-level hashing a medium ID also reads ``H + hash2(id) % S``
(one extra entry in its bag). Plain tables reduce IDs modulo ``num_embeddings``, so any int64 ID
is valid everywhere.

Everything here is fixed-shape tensor work on the IDs' device, except that multi-level hashing
adds a variable number of entries (one host sync for the new length).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cafe.config import CafeConfig, TableBudget
from torchrec_cafe.sketch.hashing import hash_mod
from torchrec_cafe.sketch.hot_sketch import HotSketch

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


@dataclass
class TableRemap:
    """Per compressed table, what one forward saw: [n] tensors over the table's occurrences."""

    ids: torch.Tensor  # raw ids
    bag: torch.Tensor  # bag index within the table's [num_features * B] bags
    factor: Optional[torch.Tensor]  # |weight| / bag length (MEAN) per occurrence, None if 1
    medium: Optional[torch.Tensor]  # read two shared rows (multi-level)
    hot_hits: torch.Tensor  # 0-dim: fraction of occurrences that read a hot row


def shared_rows(ids: torch.Tensor, budget: TableBudget, seed: int = SHARED_SEED) -> torch.Tensor:
    return budget.num_hot + hash_mod(ids, seed, budget.num_shared)


def _bag_index(lengths: torch.Tensor, total: int) -> torch.Tensor:
    bags = torch.arange(lengths.numel(), device=lengths.device)
    return torch.repeat_interleave(bags, lengths, output_size=total)


def remap_kjt(
    kjt: KeyedJaggedTensor,
    layouts: List[TableLayout],
    sketches: Dict[str, HotSketch],
    weighted_out: bool,
) -> "tuple[KeyedJaggedTensor, Dict[str, TableRemap]]":
    """Maps ``kjt`` (keys in table order, as the layouts list them) to physical rows.

    Returns the physical KJT (weights present iff ``weighted_out``) and, per compressed table, the
    occurrence data the importance hook needs.
    """
    values, lengths = kjt.values().to(torch.int64), kjt.lengths()
    weights = kjt.weights_or_none()
    stride = kjt.stride()
    offsets = kjt.offset_per_key()
    out_values: List[torch.Tensor] = []
    out_lengths: List[torch.Tensor] = []
    out_weights: List[torch.Tensor] = []
    seen: Dict[str, TableRemap] = {}
    key = 0
    for layout in layouts:
        nf = len(layout.config.feature_names)
        lo, hi = offsets[key], offsets[key + nf]
        ids = values[lo:hi]
        lens = lengths[key * stride : (key + nf) * stride]
        w = weights[lo:hi] if weights is not None else None
        key += nf
        if layout.compressed:
            remap, rows, lens_out, w_out = _remap_table(ids, lens, w, layout, sketches[layout.config.name])
            seen[layout.config.name] = remap
        else:
            rows, lens_out = torch.remainder(ids, layout.config.num_embeddings), lens
            w_out = _pooling_weights(w, lens, _bag_index(lens, ids.numel()), layout)
        out_values.append(rows)
        out_lengths.append(lens_out)
        if weighted_out:
            out_weights.append(w_out if w_out is not None else torch.ones_like(rows, dtype=torch.float32))
    out = KeyedJaggedTensor(
        keys=kjt.keys(),
        values=torch.cat(out_values) if out_values else values,
        lengths=torch.cat(out_lengths) if out_lengths else lengths,
        weights=torch.cat(out_weights) if weighted_out and out_weights else None,
        stride=stride,
    )
    return out, seen


def _remap_table(
    ids: torch.Tensor,
    lens: torch.Tensor,
    w: Optional[torch.Tensor],
    layout: TableLayout,
    sketch: HotSketch,
) -> "tuple[TableRemap, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]":
    """One table's occurrences -> (hook data, physical rows, bag lengths, weights or None)."""
    cafe, budget = layout.cafe, layout.budget
    hot, medium = sketch.lookup(ids, cafe.medium_threshold if cafe.multi_level else 0.0)
    is_hot = hot >= 0
    rows = torch.where(is_hot, hot, shared_rows(ids, budget))
    bag = _bag_index(lens, ids.numel())
    factor = w.abs() if w is not None else None
    if layout.config.pooling == PoolingType.MEAN:
        inv_len = _inverse_lengths(lens, bag)
        factor = inv_len if factor is None else factor * inv_len
    remap = TableRemap(
        ids=ids,
        bag=bag,
        factor=factor,
        medium=(medium & ~is_hot) if cafe.multi_level else None,
        hot_hits=is_hot.float().mean() if ids.numel() else torch.zeros((), device=ids.device),
    )
    w_out = _pooling_weights(w, lens, bag, layout)
    if remap.medium is None:
        return remap, rows, lens, w_out
    # A medium ID's embedding is the sum of two shared rows: its bag gets a second entry.
    keep = torch.stack([torch.ones_like(remap.medium), remap.medium], dim=1)
    pair = torch.stack([rows, shared_rows(ids, budget, SECOND_SEED)], dim=1)
    lens_out = torch.zeros_like(lens).index_add_(0, bag, keep.sum(dim=1).to(lens.dtype))
    if w_out is not None:
        w_out = w_out.unsqueeze(1).expand(-1, 2)[keep]
    return remap, pair[keep], lens_out, w_out


def _inverse_lengths(lens: torch.Tensor, bag: torch.Tensor) -> torch.Tensor:
    return 1.0 / lens.clamp(min=1).to(torch.float32)[bag]


def _pooling_weights(
    w: Optional[torch.Tensor], lens: torch.Tensor, bag: torch.Tensor, layout: TableLayout
) -> Optional[torch.Tensor]:
    """Per-occurrence weights of the physical (possibly SUM-for-MEAN) table, None if unweighted."""
    if not layout.mean_as_weights:
        return w
    inv_len = _inverse_lengths(lens, bag)
    return inv_len if w is None else w * inv_len
