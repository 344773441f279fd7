"""Multi-rank CAFE: the sharder, the sharded module and the sketch synchronisation."""

from torchrec_cafe.distributed.base import CafeEmbeddingBagCollectionContext, ShardedCafeBase
from torchrec_cafe.distributed.embedding_sharder import CafeEmbeddingCollectionSharder, ShardedCafeEmbeddingCollection
from torchrec_cafe.distributed.partitioned import PartitionedCafeEmbeddingBagCollection
from torchrec_cafe.distributed.sharder import (
    CafeEmbeddingBagCollectionSharder,
    CafeStorageReservation,
    RowWiseEverywhereEBCSharder,
    ShardedCafeEmbeddingBagCollection,
)
from torchrec_cafe.sketch.replicas import all_gather_aggregated, all_gather_occurrences

__all__ = [
    "CafeEmbeddingBagCollectionContext",
    "CafeEmbeddingBagCollectionSharder",
    "CafeEmbeddingCollectionSharder",
    "CafeStorageReservation",
    "PartitionedCafeEmbeddingBagCollection",
    "RowWiseEverywhereEBCSharder",
    "ShardedCafeBase",
    "ShardedCafeEmbeddingBagCollection",
    "ShardedCafeEmbeddingCollection",
    "all_gather_aggregated",
    "all_gather_occurrences",
]
