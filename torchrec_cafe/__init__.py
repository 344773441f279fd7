"""torchrec_cafe: CAFE (Compact, Adaptive, Fast Embedding) as a TorchRec module.

Layers, each readable alone: ``sketch`` (HotSketch, pure tensor ops; its replicas across ranks)
-> ``remap`` (raw IDs -> physical rows) -> ``modules`` (CafeEmbeddingBagCollection,
CafeEmbeddingCollection; hashing, QR and MCH baselines) -> ``distributed`` (sharder, sharded
modules) -> ``checkpoint`` (DCP save/load, any world size) and ``inference`` (export for serving);
``datasets`` holds the synthetic generator and the Criteo / libFM readers.

The names below are imported on first use, so ``import torchrec_cafe.sketch`` loads neither
TorchRec nor ``torchrec.distributed``.
"""

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CafeConfig": "torchrec_cafe.config",
    "CafeEmbeddingBagCollection": "torchrec_cafe.modules.cafe_embedding_bag",
    "CafeEmbeddingBagCollectionSharder": "torchrec_cafe.distributed.sharder",
    "CafeEmbeddingBagPartitions": "torchrec_cafe.modules.partition",
    "CafeEmbeddingCollection": "torchrec_cafe.modules.cafe_embedding",
    "CafeStorageReservation": "torchrec_cafe.distributed.sharder",
    "HotSketch": "torchrec_cafe.sketch.hot_sketch",
    "SketchUpdate": "torchrec_cafe.sketch.hot_sketch",
    "TableBudget": "torchrec_cafe.config",
    "paper_threshold": "torchrec_cafe.config",
    "table_budget": "torchrec_cafe.config",
    "table_budget_bytes": "torchrec_cafe.config",
}
__all__ = [
    "CafeConfig",
    "CafeEmbeddingBagCollection",
    "CafeEmbeddingBagCollectionSharder",
    "CafeEmbeddingBagPartitions",
    "CafeEmbeddingCollection",
    "CafeStorageReservation",
    "HotSketch",
    "SketchUpdate",
    "TableBudget",
    "paper_threshold",
    "table_budget",
    "table_budget_bytes",
]
assert sorted(_EXPORTS) == __all__

if TYPE_CHECKING:
    from torchrec_cafe.config import CafeConfig, TableBudget, paper_threshold, table_budget, table_budget_bytes
    from torchrec_cafe.distributed.sharder import CafeEmbeddingBagCollectionSharder, CafeStorageReservation
    from torchrec_cafe.modules.cafe_embedding import CafeEmbeddingCollection
    from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
    from torchrec_cafe.modules.partition import CafeEmbeddingBagPartitions
    from torchrec_cafe.sketch.hot_sketch import HotSketch, SketchUpdate


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'torchrec_cafe' has no attribute {name!r}")
