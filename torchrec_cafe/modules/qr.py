"""The quotient-remainder trick (Shi et al., KDD 2020) as an EmbeddingBagCollection at a memory budget.

Each compressed logical table (N rows, dim d) becomes one physical table of ``R = Q + m`` rows,
quotient rows ``[0, Q)`` then remainder rows ``[Q, Q + m)``. ID x (reduced to ``h = x mod N``)
reads quotient row ``(h // m) mod Q`` plus remainder row ``Q + h mod m``. The two are *added*
(the paper's "add" operation): addition commutes with pooling, so one pooled TBE lookup of both
rows per ID gives exactly the pooled sum of per-ID embeddings for SUM, MEAN and weighted bags, and
the physical table shards and trains with TorchRec's fused kernels like any table.

Memory: ``R = floor(budget / row_bytes)`` with the budget every method gets (logical bytes / CR);
``m`` is the smallest value >= 2 with ``m * (R - m) >= N`` (every ID in [0, N) gets its own
(quotient, remainder) pair, with as many quotient rows as the budget allows), or ``R // 2`` when no
split is that large. A table whose budget holds the whole table stays plain; one whose budget
holds fewer than two rows is one row (hashed into its budget, as every method does). Bytes =
rows * d * 4, nothing else.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cafe.config import table_budget_bytes
from torchrec_cafe.modules.remapped import LogicalColumns, RemappedEmbeddingBagCollection, ordered_features, output_columns, per_value

_REMAINDER_SUFFIX = "@qr_remainder"


@dataclass(frozen=True)
class QRLayout:
    """Physical sizes of one logical table (``remainder_rows == 0``: one table of ``quotient_rows``
    rows read at ``id mod rows``, the whole table when it fits the budget, else a single row)."""

    logical_bytes: int
    budget_bytes: int
    quotient_rows: int
    remainder_rows: int
    row_bytes: int

    @property
    def compressed(self) -> bool:
        return self.remainder_rows > 0

    @property
    def total_bytes(self) -> int:
        return (self.quotient_rows + self.remainder_rows) * self.row_bytes


def _physical_table(t: EmbeddingBagConfig, layout: QRLayout) -> EmbeddingBagConfig:
    """The physical table of ``t``: Q + m rows; a compressed one also serves the remainder feature."""
    extra: Dict[str, Any] = {}
    if layout.compressed:
        # Two rows per ID: scale each so their sum starts like a row of the logical table.
        bound = math.sqrt(1.0 / (2 * t.num_embeddings))
        extra = {"weight_init_min": -bound, "weight_init_max": bound}
    return EmbeddingBagConfig(
        num_embeddings=layout.quotient_rows + layout.remainder_rows,
        embedding_dim=t.embedding_dim,
        name=t.name,
        feature_names=list(t.feature_names) + ([f + _REMAINDER_SUFFIX for f in t.feature_names] if layout.compressed else []),
        pooling=t.pooling,
        data_type=t.data_type,
        **extra,
    )


def qr_layout(table: EmbeddingBagConfig, compression_ratio: float, dtype_bytes: int = 4) -> QRLayout:
    """Splits the table's budget into quotient and remainder rows (see the module docstring)."""
    n, row = table.num_embeddings, table.embedding_dim * dtype_bytes
    logical, budget = n * row, table_budget_bytes(table, compression_ratio, dtype_bytes)
    rows = budget // row
    if budget >= logical or rows < 2:
        return QRLayout(logical, budget, n if budget >= logical else 1, 0, row)
    if rows * rows >= 4 * n:
        m = max(2, math.ceil((rows - math.sqrt(rows * rows - 4 * n)) / 2))
        while m > 2 and (m - 1) * (rows - m + 1) >= n:  # float rounding of the root
            m -= 1
        while m * (rows - m) < n:
            m += 1
    else:
        m = rows // 2
    return QRLayout(logical, budget, rows - m, m, row)


class _QRRemap(nn.Module):
    """Raw KJT -> physical KJT: each ID's quotient row under its feature, and, for compressed
    tables, its remainder row ``Q + h % m`` under ``<feature>@qr_remainder`` (h = id mod N)."""

    _n: torch.Tensor  # registered buffers, typed
    _m: torch.Tensor
    _q: torch.Tensor
    _is_qr: torch.Tensor

    def __init__(self, features: List[str], n: List[int], m: List[int], q: List[int], is_qr: List[bool], num_compressed: int) -> None:
        super().__init__()
        self._features = features  # compressed features first: their remainders are a prefix
        self._num_compressed = num_compressed
        for name, values in (("_n", n), ("_m", m), ("_q", q), ("_is_qr", is_qr)):
            self.register_buffer(name, torch.tensor(values), persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        features = ordered_features(features, self._features)
        n, m, q, is_qr = per_value(features, [self._n, self._m, self._q, self._is_qr])
        h = torch.remainder(features.values(), n)
        quotient = torch.where(is_qr, torch.remainder(h // m, q), torch.remainder(h, q))
        n_qr = sum(features.length_per_key()[: self._num_compressed])
        remainder = q[:n_qr] + torch.remainder(h[:n_qr], m[:n_qr])
        stride = features.stride()
        weights = features.weights_or_none()
        return KeyedJaggedTensor(
            keys=features.keys() + [f + _REMAINDER_SUFFIX for f in self._features[: self._num_compressed]],
            values=torch.cat([quotient, remainder]),
            lengths=torch.cat([features.lengths(), features.lengths()[: self._num_compressed * stride]]),
            weights=None if weights is None else torch.cat([weights, weights[:n_qr]]),
            stride=stride,
        )


class QREmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """Drop-in ``EmbeddingBagCollection`` whose compressed tables use the quotient-remainder trick.

    Output: the ``KeyedTensor`` (keys, order, dims) of ``EmbeddingBagCollection(tables)``;
    ``embedding_bag_configs()`` returns the logical configs. Any int64 ID is valid (reduced mod N).
    Physical tables keep the logical names; a compressed one also serves a second feature,
    ``<feature>@qr_remainder``, for the remainder lookups.
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression_ratio: float,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
    ) -> None:
        layouts: Dict[str, QRLayout] = {t.name: qr_layout(t, compression_ratio) for t in tables}
        compressed = [t for t in tables if layouts[t.name].compressed]
        plain = [t for t in tables if not layouts[t.name].compressed]
        # Compressed features first: their remainder lookups are then a prefix of the values.
        features = [(f, t) for t in compressed + plain for f in t.feature_names]
        physical = [_physical_table(t, layouts[t.name]) for t in tables]
        per_feature = [layouts[t.name] for _, t in features]
        remap = _QRRemap(
            [f for f, _ in features],
            [t.num_embeddings for _, t in features],
            [max(l.remainder_rows, 1) for l in per_feature],
            [l.quotient_rows for l in per_feature],
            [l.compressed for l in per_feature],
            sum(len(t.feature_names) for t in compressed),
        )
        # Output columns: the logical order, each compressed feature = its quotient + remainder columns.
        physical_cols, logical_cols = output_columns(physical), output_columns(tables)
        first, second, target = [], [], []
        for t in tables:
            for f in t.feature_names:
                first.append(physical_cols[f])
                if layouts[t.name].compressed:
                    second.append(physical_cols[f + _REMAINDER_SUFFIX])
                    target.append(logical_cols[f])
        empty = [torch.zeros(0, dtype=torch.int64)]
        combine = LogicalColumns(
            [f for t in tables for f in t.feature_names],
            [t.embedding_dim for t in tables for _ in t.feature_names],
            torch.cat(first),
            torch.cat(second or empty),
            torch.cat(target or empty),
        )
        super().__init__(tables, is_weighted, remap, EmbeddingBagCollection(physical, is_weighted, device), combine)
        self._layouts = layouts

    def memory_report(self) -> Dict[str, Dict[str, float]]:
        """Per logical table: rows and bytes (``total_bytes <= budget_bytes`` when compressed)."""
        return {
            name: {
                "compressed": l.compressed,
                "logical_bytes": l.logical_bytes,
                "budget_bytes": l.budget_bytes,
                "quotient_rows": l.quotient_rows,
                "remainder_rows": l.remainder_rows,
                "row_bytes": l.row_bytes,
                "total_bytes": l.total_bytes,
                "compression_ratio": l.logical_bytes / l.total_bytes,
            }
            for name, l in self._layouts.items()
        }
