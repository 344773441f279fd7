from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection

__all__ = ["CafeEmbeddingBagCollection"]
