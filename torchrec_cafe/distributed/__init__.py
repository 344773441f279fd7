"""Multi-rank CAFE: the sharder, the sharded module and the sketch synchronisation."""

from torchrec_cafe.distributed.sharder import (
    CafeEmbeddingBagCollectionSharder,
    CafeStorageReservation,
    RowWiseEverywhereEBCSharder,
    ShardedCafeEmbeddingBagCollection,
)
from torchrec_cafe.distributed.sketch_sync import all_gather_aggregated, all_gather_occurrences

__all__ = [
    "CafeEmbeddingBagCollectionSharder",
    "CafeStorageReservation",
    "RowWiseEverywhereEBCSharder",
    "ShardedCafeEmbeddingBagCollection",
    "all_gather_aggregated",
    "all_gather_occurrences",
]
