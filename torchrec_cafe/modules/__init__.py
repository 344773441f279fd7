from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.modules.hashing import HashingEmbeddingBagCollection

__all__ = ["CafeEmbeddingBagCollection", "HashingEmbeddingBagCollection"]
