"""Where each feature's pooled embedding sits in an ``EmbeddingBagCollection``'s output."""

from typing import Dict, List

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig


def output_columns(tables: List[EmbeddingBagConfig]) -> Dict[str, torch.Tensor]:
    """Feature -> int64 column indices [dim] of its pooled output in an EBC of ``tables`` (tables
    in order, each table's features in order)."""
    cols, start = {}, 0
    for t in tables:
        for f in t.feature_names:
            cols[f] = torch.arange(start, start + t.embedding_dim)
            start += t.embedding_dim
    return cols
