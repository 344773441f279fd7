"""The hashing trick as an EmbeddingBagCollection: the baseline CAFE is measured against."""

from typing import List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cafe.config import hashed_rows, table_budget_bytes
from torchrec_cafe.kjt import with_values
from torchrec_cafe.modules.remapped import RemappedEmbeddingBagCollection, ordered_features, per_value
from torchrec_cafe.sketch.hashing import mix64

_HASH_SEED = 0x4A54


def hash_rows(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The hashing trick's row of each id in a table of ``rows`` rows (elementwise)."""
    return torch.remainder(mix64(ids, _HASH_SEED), rows)


def hashed_table_rows(table: EmbeddingBagConfig, compression_ratio: float, dtype_bytes: int = 4) -> int:
    """Rows of ``table`` hashed into its budget (``N`` when the budget holds the whole table): what
    every method falls back to when its own structure does not fit a table's budget."""
    budget = table_budget_bytes(table, compression_ratio, dtype_bytes)
    row = table.embedding_dim * dtype_bytes
    return table.num_embeddings if budget >= table.num_embeddings * row else hashed_rows(budget, row)


def resized_table(table: EmbeddingBagConfig, rows: int) -> EmbeddingBagConfig:
    """``table``'s physical form with ``rows`` rows (name, dim, features, pooling and dtype kept;
    the init bounds follow the new row count, as TorchRec derives them)."""
    return EmbeddingBagConfig(
        num_embeddings=rows,
        embedding_dim=table.embedding_dim,
        name=table.name,
        feature_names=list(table.feature_names),
        pooling=table.pooling,
        data_type=table.data_type,
    )


class _HashRemap(nn.Module):
    """Raw KJT -> KJT of hashed rows, ``mix64(id) % rows`` of each feature's table."""

    _rows: torch.Tensor  # registered buffer, typed

    def __init__(self, features: List[str], rows: List[int]) -> None:
        super().__init__()
        self._features = features
        self.register_buffer("_rows", torch.tensor(rows, dtype=torch.int64), persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        features = ordered_features(features, self._features)
        (rows,) = per_value(features, [self._rows])
        return with_values(features, hash_rows(features.values(), rows), features.weights_or_none())


class HashingEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """Each table keeps as many rows as its budget (logical bytes / CR) holds, at least one, and
    every ID reads row ``mix64(id) % rows``: no sketch, no id state.

    Output and ``embedding_bag_configs()`` match ``EmbeddingBagCollection(tables)``.
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression_ratio: float,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
    ) -> None:
        rows = {t.name: hashed_table_rows(t, compression_ratio) for t in tables}
        remap = _HashRemap([f for t in tables for f in t.feature_names], [rows[t.name] for t in tables for _ in t.feature_names])
        lookup = EmbeddingBagCollection([resized_table(t, rows[t.name]) for t in tables], is_weighted, device)
        super().__init__(tables, is_weighted, remap, lookup, nn.Identity())
