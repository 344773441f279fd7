"""The hashing trick as an EmbeddingBagCollection: the baseline CAFE is measured against."""

from typing import Dict, List, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.config import hashed_rows, table_budget_bytes
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


class HashingEmbeddingBagCollection(EmbeddingBagCollectionInterface):
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
        super().__init__()
        self._configs = list(tables)
        self._is_weighted = is_weighted
        self._rows: Dict[str, int] = {t.name: hashed_table_rows(t, compression_ratio) for t in tables}
        physical = [resized_table(t, self._rows[t.name]) for t in tables]
        self._embedding_bag_collection = EmbeddingBagCollection(physical, is_weighted, device)
        self._feature_rows = [self._rows[t.name] for t in tables for _ in t.feature_names]
        self._feature_names = [f for t in tables for f in t.feature_names]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Raw-ID KJT -> pooled KeyedTensor, IDs hashed per table."""
        features = features.permute([features.keys().index(k) for k in self._feature_names])
        lengths = features.length_per_key()
        rows = torch.repeat_interleave(
            torch.tensor(self._feature_rows, device=features.values().device),
            torch.tensor(lengths, device=features.values().device),
            output_size=sum(lengths),
        )
        hashed = hash_rows(features.values(), rows)
        return self._embedding_bag_collection(
            KeyedJaggedTensor(
                keys=features.keys(),
                values=hashed,
                lengths=features.lengths(),
                weights=features.weights_or_none(),
                stride=features.stride(),
            )
        )

    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._embedding_bag_collection.parameters())
