"""The shape the baselines (hashing, QR, MCH) share: raw-ID KJT --remap--> physical KJT --lookup
(the physical EBCs, sharded by DMP)--> pooled --combine--> the logical ``KeyedTensor``.

``remap`` and ``combine`` are modules without tables, so ``torch.fx`` sees them as leaf calls in
TorchRec's train pipeline (which traces every module holding a sharded one): the forward traces,
and the lookups run unpipelined (their input is computed, not a field of the batch).
"""

from typing import Dict, List, Sequence, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.modules.inputs import as_embedding_features


def output_columns(tables: List[EmbeddingBagConfig]) -> Dict[str, torch.Tensor]:
    """Feature -> int64 column indices [dim] of its pooled output in an EBC of ``tables`` (tables
    in order, each table's features in order)."""
    cols, start = {}, 0
    for t in tables:
        for f in t.feature_names:
            cols[f] = torch.arange(start, start + t.embedding_dim)
            start += t.embedding_dim
    return cols


def ordered_features(features: KeyedJaggedTensor, names: Sequence[str]) -> KeyedJaggedTensor:
    """``features`` with keys ``names`` in that order (``ValueError`` naming any that is missing)."""
    keys = features.keys()
    missing = sorted(set(names) - set(keys))
    if missing:
        raise ValueError(f"KJT lacks features {missing} of this module")
    return as_embedding_features(features, list(names), list(names))


def per_value(features: KeyedJaggedTensor, constants: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Per-feature constants [F] (the KJT's key order) -> per-value ones [n]."""
    lengths = features.length_per_key()
    repeats = torch.tensor(lengths, device=features.values().device)
    return [torch.repeat_interleave(c, repeats, output_size=sum(lengths)) for c in constants]


class LogicalColumns(nn.Module):
    """Pooled physical outputs [B, C] -> the logical ``KeyedTensor``: column ``first[j]``, plus
    ``second[i]`` added into logical column ``target[i]`` (QR's remainder halves; none for MCH)."""

    _first: torch.Tensor  # registered buffers, typed
    _second: torch.Tensor
    _target: torch.Tensor

    def __init__(self, keys: List[str], dims: List[int], first: torch.Tensor, second: torch.Tensor, target: torch.Tensor) -> None:
        super().__init__()
        self._keys, self._dims = keys, dims
        self.register_buffer("_first", first, persistent=False)
        self.register_buffer("_second", second, persistent=False)
        self.register_buffer("_target", target, persistent=False)

    def forward(self, pooled: Union[KeyedTensor, torch.Tensor]) -> KeyedTensor:
        # A sharded EBC gives a LazyAwaitable[KeyedTensor]: not a KeyedTensor, but it has values()
        values = pooled if isinstance(pooled, torch.Tensor) else pooled.values()
        out = values.index_select(1, self._first)
        if self._second.numel():
            out = out.index_add(1, self._target, values.index_select(1, self._second))
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=out)


class RemappedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """Drop-in ``EmbeddingBagCollection`` built from ``remap``, ``lookup`` (held as
    ``_embedding_bag_collection``) and ``combine``; ``embedding_bag_configs()`` are the logical
    tables."""

    def __init__(
        self, tables: List[EmbeddingBagConfig], is_weighted: bool, remap: nn.Module, lookup: nn.Module, combine: nn.Module
    ) -> None:
        super().__init__()
        self._configs = list(tables)
        self._is_weighted = is_weighted
        self.remap = remap
        self._embedding_bag_collection = lookup
        self.combine = combine

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Raw-ID KJT (keys in any order) -> pooled ``KeyedTensor`` [B, sum dims], logical order."""
        return self.combine(self._embedding_bag_collection(self.remap(features)))

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted
