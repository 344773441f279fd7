from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.modules.hashing import HashingEmbeddingBagCollection
from torchrec_cafe.modules.mch import MCHEmbeddingBagCollection, mch_layout, mch_sharder
from torchrec_cafe.modules.partition import CafeEmbeddingBagPartitions
from torchrec_cafe.modules.qr import QREmbeddingBagCollection, qr_layout

__all__ = [
    "CafeEmbeddingBagCollection",
    "CafeEmbeddingBagPartitions",
    "HashingEmbeddingBagCollection",
    "MCHEmbeddingBagCollection",
    "QREmbeddingBagCollection",
    "mch_layout",
    "mch_sharder",
    "qr_layout",
]
