"""torchrec_cafe: CAFE (Compact, Adaptive, Fast Embedding) as a TorchRec module.

Layers, each readable alone: ``sketch`` (HotSketch, pure tensor ops) -> ``remap`` (raw IDs ->
physical rows) -> ``modules`` (CafeEmbeddingBagCollection, CafeEmbeddingCollection; hashing, QR and MCH baselines) ->
``distributed`` (sharder, sketch sync across ranks) -> ``checkpoint`` (DCP save/load, any world
size) and ``inference`` (export for serving); ``datasets`` holds the synthetic generator and the
Criteo / libFM readers.
"""

from torchrec_cafe.config import CafeConfig, TableBudget, paper_threshold, table_budget, table_budget_bytes
from torchrec_cafe.distributed.sharder import CafeEmbeddingBagCollectionSharder, CafeStorageReservation
from torchrec_cafe.modules.cafe_embedding import CafeEmbeddingCollection
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.sketch.hot_sketch import HotSketch, SketchUpdate

__all__ = [
    "CafeConfig",
    "CafeEmbeddingBagCollection",
    "CafeEmbeddingBagCollectionSharder",
    "CafeEmbeddingCollection",
    "CafeStorageReservation",
    "HotSketch",
    "SketchUpdate",
    "TableBudget",
    "paper_threshold",
    "table_budget",
    "table_budget_bytes",
]
