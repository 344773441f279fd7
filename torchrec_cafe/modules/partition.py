"""Hash partitions of CAFE tables: what one rank owns in the partitioned sharded form, and all W
partitions emulated on one process.

Partition r of W owns the IDs with ``id mod W == r`` of every table, as *local* IDs
``(id div W) mod ceil(N / W)``: for IDs in ``[0, N)`` that is ``id div W``, a bijection onto
``[0, ceil(N / W))`` that keeps ID ranges together (composed block rows) and spreads IDs numbered
by popularity evenly over the ranks; other IDs fold onto those, as hashing does. Each partition is
a CAFE table of ``ceil(N / W)`` rows whose budget is ``floor(budget / W)``-ish (exactly
``floor(N * row_bytes / (CR * W))``, so the W partitions together stay within the table's budget),
with its own sketch, pool and block rows.

A bag's pooled output is the sum of its partitions' pooled outputs: SUM pooling only (MEAN would
divide each partition by its own share of the bag).
"""

import dataclasses
from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.config import CafeConfig
from torchrec_cafe.kjt import kjt_like
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection


def partition_size(num_embeddings: int, world_size: int) -> int:
    """Local IDs of one partition: ``ceil(N / W)``."""
    return -(-num_embeddings // world_size)


def partition_tables(tables: List[EmbeddingBagConfig], world_size: int) -> List[EmbeddingBagConfig]:
    """The logical tables of one partition: same names, features, dims; ``ceil(N / W)`` rows.

    Raises ``ValueError`` for MEAN pooling (partitions pool separately and are summed)."""
    mean = [t.name for t in tables if t.pooling != PoolingType.SUM]
    if mean and world_size > 1:
        raise ValueError(f"tables {mean}: the partitioned form needs SUM pooling (each rank pools its own IDs of a bag)")
    return [dataclasses.replace(t, num_embeddings=partition_size(t.num_embeddings, world_size)) for t in tables]


def partition_cafe(
    tables: List[EmbeddingBagConfig], cafe: Mapping[str, Optional[CafeConfig]], world_size: int
) -> Dict[str, CafeConfig]:
    """Per compressed table, its CafeConfig for one partition: the compression ratio that makes the
    partition's budget ``floor(N * row_bytes / (CR * W))`` of its ``ceil(N / W)`` rows' bytes."""
    out = {}
    for t in tables:
        c = cafe.get(t.name)
        if c is not None:
            scale = partition_size(t.num_embeddings, world_size) * world_size / t.num_embeddings
            out[t.name] = dataclasses.replace(c, compression_ratio=c.compression_ratio * scale)
    return out


def value_blocks(features: KeyedJaggedTensor, blocks: torch.Tensor) -> torch.Tensor:
    """Per value of a fixed-batch ``features``, ``blocks`` [keys] of its key, without a host read."""
    n, stride = features.values().numel(), features.stride()
    key_ends = features.offsets().index_select(0, torch.arange(1, len(features.keys()) + 1, device=blocks.device) * stride)
    key = torch.searchsorted(key_ends, torch.arange(n, device=blocks.device), right=True)
    return blocks.index_select(0, key.clamp(max=len(features.keys()) - 1))


def owner_and_local(values: torch.Tensor, blocks: torch.Tensor, world_size: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """Raw IDs [n] (any int64) -> (owning partition, local ID in ``[0, blocks)``), [n] int64 each."""
    values = values.long()
    return values.remainder(world_size), values.div(world_size, rounding_mode="floor").remainder(blocks)


class CafeEmbeddingBagPartitions(EmbeddingBagCollectionInterface):
    """The partitioned sharded form on one process: W ``CafeEmbeddingBagCollection`` partitions,
    each fed its IDs of every bag as local IDs, their pooled outputs summed. What W ranks of a
    row-wise ``CafeEmbeddingBagCollectionSharder(form="partitioned")`` compute, step for step (for
    tests, and to measure the partitioned form's quality on one process).

    Args: as ``CafeEmbeddingBagCollection``, plus ``world_size`` (W >= 1). Partition r is
    ``partitions[r]``; its tables are ``partition_tables(tables, W)``.
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        world_size: int,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        *,
        cafe: Union[CafeConfig, Mapping[str, CafeConfig]],
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        super().__init__()
        settings = cafe if isinstance(cafe, Mapping) else {t.name: cafe for t in tables}
        self._tables, self._is_weighted, self._world = list(tables), is_weighted, world_size
        local = partition_tables(self._tables, world_size)
        per_table = partition_cafe(self._tables, settings, world_size)
        self.partitions = nn.ModuleList(
            CafeEmbeddingBagCollection(local, is_weighted, device, cafe=per_table) for _ in range(world_size)
        )
        self._blocks = dict(self.partition(0).embedding_features())  # by embedding name

    def partition(self, rank: int) -> CafeEmbeddingBagCollection:
        """Partition ``rank`` (what rank ``rank`` of the sharded form holds)."""
        part = self.partitions[rank]
        assert isinstance(part, CafeEmbeddingBagCollection)
        return part

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    def partition_features(self, features: KeyedJaggedTensor, rank: int) -> KeyedJaggedTensor:
        """Partition ``rank``'s IDs of every bag of ``features`` (keyed by embedding names, as
        ``order_features`` returns them; same bags and order), as local IDs. Reads the lengths on
        the host (a one-process tool, not a training path)."""
        blocks = torch.tensor([self._blocks[k] for k in features.keys()], device=features.values().device)
        owner, local = owner_and_local(features.values(), value_blocks(features, blocks), self._world)
        keep = owner == rank
        bag = torch.repeat_interleave(torch.arange(features.lengths().numel(), device=keep.device), features.lengths())
        lengths = torch.zeros_like(features.lengths()).index_add_(0, bag, keep.to(features.lengths().dtype))
        weights = features.weights_or_none()
        return kjt_like(features, features.keys(), local[keep], lengths, None if weights is None else weights[keep])

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        features = self.partition(0).order_features(features)
        outputs = [p(self.partition_features(features, r)) for r, p in enumerate(self.partitions)]
        first = outputs[0]
        values = torch.stack([o.values() for o in outputs]).sum(dim=0)
        return KeyedTensor(keys=first.keys(), length_per_key=first.length_per_key(), values=values)
