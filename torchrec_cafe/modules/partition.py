"""Hash partitions of CAFE tables: what the ranks own in the partitioned sharded form, and all P
partitions emulated on one process.

Partition p of P owns the IDs with ``id mod P == p`` of every table, as *local* IDs
``(id div P) mod ceil(N / P)``: for IDs in ``[0, N)`` that is ``id div P``, a bijection onto
``[0, ceil(N / P))`` that keeps ID ranges together (composed block rows) and spreads IDs numbered
by popularity evenly over the partitions; other IDs fold onto those, as hashing does. Each
partition is a CAFE table of ``ceil(N / P)`` rows whose budget is ``floor(budget / P)``-ish
(exactly ``floor(N * row_bytes / (CR * P))``, so the P partitions together stay within the
table's budget), with its own sketch, pool and block rows. P is the model's, not the cluster's:
W ranks (W dividing P) own P / W partitions each, so a checkpoint reshards between such W.

A table whose whole budget holds fewer than P rows (R) spreads its IDs over partitions 0 .. R - 1
only (``id mod R``; ``partition_spreads``): every partition holds at least one row of every table,
and spreading over all P would give the table P distinct rows where its budget holds R. The
other partitions' row of it is allocated and never read.

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
from torchrec_cafe.kjt import kjt_like, value_bags
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.modules.hashing import hashed_table_rows
from torchrec_cafe.modules.inputs import with_embedding_names
from torchrec_cafe.modules.layouts import dtype_bytes


def partition_size(num_embeddings: int, partitions: int) -> int:
    """Local IDs of one partition: ``ceil(N / P)``."""
    return -(-num_embeddings // partitions)


def partition_spreads(
    tables: List[EmbeddingBagConfig], cafe: Mapping[str, Optional[CafeConfig]], partitions: int
) -> Dict[str, int]:
    """Per table, the partitions its IDs spread over: P, or the rows its whole budget holds (at
    least one) when fewer, so that no table reads more distinct rows than its budget holds."""
    out = {}
    for t in tables:
        c = cafe.get(t.name)
        rows = t.num_embeddings if c is None else hashed_table_rows(t, c.compression_ratio, dtype_bytes(t))
        out[t.name] = min(partitions, rows)  # rows: at least one, at most N
    return out


def feature_spreads(tables: List[EmbeddingBagConfig], spreads: Mapping[str, int]) -> Dict[str, int]:
    """``partition_spreads`` by embedding name (the keys ``order_features`` returns)."""
    return {f: spreads[t.name] for t in with_embedding_names(tables) for f in t.feature_names}


def partition_tables(tables: List[EmbeddingBagConfig], partitions: int) -> List[EmbeddingBagConfig]:
    """The logical tables of one partition: same names, features, dims; ``ceil(N / P)`` rows.

    Raises ``ValueError`` for MEAN pooling (partitions pool separately and are summed)."""
    mean = [t.name for t in tables if t.pooling != PoolingType.SUM]
    if mean and partitions > 1:
        raise ValueError(f"tables {mean}: the partitioned form needs SUM pooling (each partition pools its own IDs of a bag)")
    return [dataclasses.replace(t, num_embeddings=partition_size(t.num_embeddings, partitions)) for t in tables]


def partition_cafe(
    tables: List[EmbeddingBagConfig], cafe: Mapping[str, Optional[CafeConfig]], partitions: int
) -> Dict[str, CafeConfig]:
    """Per compressed table, its CafeConfig for one partition: the compression ratio that makes the
    partition's budget ``floor(N * row_bytes / (CR * P))`` of its ``ceil(N / P)`` rows' bytes."""
    out = {}
    for t in tables:
        c = cafe.get(t.name)
        if c is not None:
            scale = partition_size(t.num_embeddings, partitions) * partitions / t.num_embeddings
            out[t.name] = dataclasses.replace(c, compression_ratio=c.compression_ratio * scale)
    return out


def value_keys(features: KeyedJaggedTensor) -> torch.Tensor:
    """The key index of each value of a fixed-batch ``features``, [n] int64, without a host read
    (index a per-key tensor with it)."""
    n, stride, keys = features.values().numel(), features.stride(), len(features.keys())
    device = features.values().device
    key_ends = features.offsets().index_select(0, torch.arange(1, keys + 1, device=device) * stride)
    return torch.searchsorted(key_ends, torch.arange(n, device=device), right=True).clamp(max=keys - 1)


def owner_and_local(values: torch.Tensor, blocks: torch.Tensor, spreads: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """Raw IDs [n] (any int64) -> (owning partition ``id mod spread``, local ID
    ``(id div spread) mod blocks``), [n] int64 each; ``blocks``, ``spreads`` [n] per value."""
    values = values.long()
    return values.remainder(spreads), values.div(spreads, rounding_mode="floor").remainder(blocks)


def select_partition(features: KeyedJaggedTensor, owner: torch.Tensor, local: torch.Tensor, partition: int) -> KeyedJaggedTensor:
    """The IDs of ``features`` whose ``owner`` [n] is ``partition``, as their ``local`` [n] IDs:
    same keys and bags, each bag keeping its own IDs in order. Reads the count on the host."""
    keep = owner == partition
    bag = value_bags(features.lengths(), features.values().numel())
    lengths = torch.zeros_like(features.lengths()).index_add_(0, bag, keep.to(features.lengths().dtype))
    weights = features.weights_or_none()
    return kjt_like(features, features.keys(), local[keep], lengths, None if weights is None else weights[keep])


def merge_bags(parts: List[KeyedJaggedTensor]) -> KeyedJaggedTensor:
    """KJTs of the same keys and bags -> one whose every bag holds the parts' IDs of that bag, part
    by part (a SUM-pooled bag's output is then the sum of the parts' outputs). No host read."""
    first = parts[0]
    values = torch.cat([p.values() for p in parts])
    bag = torch.cat([value_bags(p.lengths(), p.values().numel()) for p in parts])
    order = torch.sort(bag, stable=True).indices
    weights = None if first.weights_or_none() is None else torch.cat([p.weights() for p in parts]).index_select(0, order)
    lengths = torch.stack([p.lengths() for p in parts]).sum(dim=0)
    return kjt_like(first, first.keys(), values.index_select(0, order), lengths, weights)


class CafeEmbeddingBagPartitions(EmbeddingBagCollectionInterface):
    """The partitioned sharded form on one process: P ``CafeEmbeddingBagCollection`` partitions,
    each fed its IDs of every bag as local IDs, their pooled outputs summed. What the ranks of a
    row-wise ``CafeEmbeddingBagCollectionSharder(form="partitioned", partitions=P)`` compute, step
    for step, whatever their number (for tests, and to measure the partitioned form's quality on
    one process).

    Args: as ``CafeEmbeddingBagCollection``, plus ``num_partitions`` (P >= 1). Partition p is
    ``partitions[p]``; its tables are ``partition_tables(tables, P)``.
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        num_partitions: int,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        *,
        cafe: Union[CafeConfig, Mapping[str, CafeConfig]],
    ) -> None:
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        super().__init__()
        settings = cafe if isinstance(cafe, Mapping) else {t.name: cafe for t in tables}
        self._tables, self._is_weighted, self._num = list(tables), is_weighted, num_partitions
        local = partition_tables(self._tables, num_partitions)
        per_table = partition_cafe(self._tables, settings, num_partitions)
        self.partitions = nn.ModuleList(
            CafeEmbeddingBagCollection(local, is_weighted, device, cafe=per_table) for _ in range(num_partitions)
        )
        self._blocks = dict(self.partition(0).embedding_features())  # by embedding name
        self._spreads = feature_spreads(self._tables, partition_spreads(self._tables, settings, num_partitions))

    def partition(self, index: int) -> CafeEmbeddingBagCollection:
        """Partition ``index`` (rank r of W holds partitions ``r * P / W`` to ``(r + 1) * P / W - 1``)."""
        part = self.partitions[index]
        assert isinstance(part, CafeEmbeddingBagCollection)
        return part

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._tables

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        features = self.partition(0).order_features(features)
        device, key = features.values().device, value_keys(features)
        blocks = torch.tensor([self._blocks[k] for k in features.keys()], device=device).index_select(0, key)
        spreads = torch.tensor([self._spreads[k] for k in features.keys()], device=device).index_select(0, key)
        owner, local = owner_and_local(features.values(), blocks, spreads)
        outputs = [p(select_partition(features, owner, local, i)) for i, p in enumerate(self.partitions)]
        first = outputs[0]
        values = torch.stack([o.values() for o in outputs]).sum(dim=0)
        return KeyedTensor(keys=first.keys(), length_per_key=first.length_per_key(), values=values)
