"""TorchRec's managed collisions (``ManagedCollisionEmbeddingBagCollection`` with one
``MCHManagedCollisionModule`` per table) at the same memory budget as the other methods.

An MCH table of Z rows keeps Z IDs (sorted raw IDs, their rows, eviction metadata): a kept ID reads
its own row, every other ID reads the last row. Every ``eviction_interval`` training steps the
module counts the IDs it saw and replaces the least valuable kept IDs (LFU: total count;
DistanceLFU: count discounted by the steps since the last access) by more frequent newcomers.

Memory, per compressed table (budget from ``table_budget``, the one CAFE gets): ``Z`` is the
largest count with ``Z * row_bytes + Z * id_state_per_row + id_state_fixed <= budget``, where the
id state is every buffer of the MCH module (sorted raw IDs, remap, counts and for DistanceLFU last
access, int64 each; three int64 scalars) except ``_output_segments_tensor``: 1025 int64 (8,200 B)
of resharding bookkeeping every TorchRec MC module carries whatever its size, reported as
``uncharged_bytes``. So is the history buffer MCH allocates at its first step (about 1.25 x the
IDs of ``eviction_interval`` batches, transient like CAFE's stash of pending scores). A table whose
budget holds the whole table stays plain; one too small for two MCH rows is hashed into its budget
(as every method does).

MC-EBC returns ``(KeyedTensor, remapped KJT or None)``; ``MCHEmbeddingBagCollection`` returns the
``KeyedTensor`` alone, in the logical order, so it is a drop-in ``embedding_bag_collection`` for
``DLRM``. Under ``DistributedModelParallel`` the MC-EBC is sharded by TorchRec's
``ManagedCollisionEmbeddingBagCollectionSharder`` (row-wise only): ``mch_sharder()`` returns one
that also plans, and evicts with row-wise Adagrad, on CPU.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, cast

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder, ShardedManagedCollisionEmbeddingBagCollection
from torchrec.distributed.types import ParameterSharding, ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    ManagedCollisionCollection,
    ManagedCollisionModule,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cafe.config import table_budget_bytes
from torchrec_cafe.kjt import with_values
from torchrec_cafe.modules.hashing import hash_rows, hashed_table_rows, resized_table
from torchrec_cafe.modules.remapped import LogicalColumns, RemappedEmbeddingBagCollection, ordered_features, output_columns, per_value

EVICTION_POLICIES = ("lfu", "distance_lfu")
_UNCHARGED_BUFFERS = ("_output_segments_tensor",)


def _policy(eviction: str) -> MCHEvictionPolicy:
    if eviction == "lfu":
        return LFU_EvictionPolicy()
    if eviction == "distance_lfu":
        return DistanceLFU_EvictionPolicy()
    raise ValueError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")


def _mch_module(zch_size: int, num_embeddings: int, eviction: str, eviction_interval: int, buckets: int, device: torch.device) -> MCHManagedCollisionModule:
    return MCHManagedCollisionModule(
        zch_size=zch_size,
        device=device,
        eviction_policy=_policy(eviction),
        eviction_interval=eviction_interval,
        input_hash_size=num_embeddings,
        buckets=buckets,
    )


def _state_bytes(module: MCHManagedCollisionModule) -> "tuple[int, int]":
    """(charged, uncharged) bytes of a module's buffers."""
    charged = uncharged = 0
    for name, b in module.named_buffers():
        if name in _UNCHARGED_BUFFERS:
            uncharged += b.numel() * b.element_size()
        else:
            charged += b.numel() * b.element_size()
    return charged, uncharged


@dataclass(frozen=True)
class MCHLayout:
    """Physical sizes of one logical table (``zch_rows == 0``: not managed, a table of
    ``plain_rows`` rows: the whole table, or hashed into the budget)."""

    logical_bytes: int
    budget_bytes: int
    zch_rows: int
    row_bytes: int
    id_state_bytes: int
    uncharged_bytes: int
    plain_rows: int = 0

    @property
    def compressed(self) -> bool:
        return self.zch_rows > 0

    @property
    def hashed(self) -> bool:
        return not self.compressed and self.plain_rows * self.row_bytes < self.logical_bytes

    @property
    def total_bytes(self) -> int:
        if not self.compressed:
            return self.plain_rows * self.row_bytes
        return self.zch_rows * self.row_bytes + self.id_state_bytes


def mch_layout(table: EmbeddingBagConfig, compression_ratio: float, eviction: str = "lfu", buckets: int = 1, dtype_bytes: int = 4) -> MCHLayout:
    """The largest MCH table (a multiple of ``buckets`` rows) whose rows and id state fit the budget.

    The id state is measured on modules built on the meta device, so it follows TorchRec's buffers.
    """
    row = table.embedding_dim * dtype_bytes
    logical, budget = table.num_embeddings * row, table_budget_bytes(table, compression_ratio, dtype_bytes)
    plain = MCHLayout(logical, budget, 0, row, 0, 0, hashed_table_rows(table, compression_ratio, dtype_bytes))
    if budget >= logical:
        return plain
    meta = torch.device("meta")
    one, _ = _state_bytes(_mch_module(1, table.num_embeddings, eviction, 1, 1, meta))
    two, _ = _state_bytes(_mch_module(2, table.num_embeddings, eviction, 1, 1, meta))
    per_row, fixed = two - one, 2 * one - two
    zch = (budget - fixed) // (row + per_row) // buckets * buckets
    if zch < 2:
        return plain  # too small for MCH: hashed into its budget
    charged, uncharged = _state_bytes(_mch_module(zch, table.num_embeddings, eviction, 1, buckets, meta))
    return MCHLayout(logical, budget, zch, row, charged, uncharged)


class _MCHRemap(nn.Module):
    """Raw KJT -> (KJT of the managed features, raw IDs mod N; KJT of the plain ones, hashed into
    their rows when a table is hashed)."""

    _n: torch.Tensor  # registered buffers, typed
    _hashed_rows: torch.Tensor

    def __init__(self, managed: List[str], plain: List[str], n: List[int], hashed_rows: List[int]) -> None:
        super().__init__()
        self._managed, self._plain = managed, plain
        self.register_buffer("_n", torch.tensor(n), persistent=False)
        self.register_buffer("_hashed_rows", torch.tensor(hashed_rows), persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> Tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
        features = ordered_features(features, self._managed + self._plain)
        n, hashed = per_value(features, [self._n, self._hashed_rows])
        values = features.values()
        rows = torch.where(hashed > 0, hash_rows(values, hashed.clamp(min=1)), torch.remainder(values, n))
        physical = with_values(features, rows, features.weights_or_none())
        managed, plain = physical.split([len(self._managed), len(self._plain)])
        return managed, plain


class _MCHLookup(nn.Module):
    """(managed KJT, plain KJT) -> pooled [B, managed dims | plain dims] through TorchRec's MC-EBC
    and a plain EBC (either may be absent)."""

    def __init__(self, managed: Optional[ManagedCollisionEmbeddingBagCollection], plain: Optional[EmbeddingBagCollection]) -> None:
        super().__init__()
        self.managed = managed
        self.plain = plain

    def forward(self, features: Tuple[KeyedJaggedTensor, KeyedJaggedTensor]) -> torch.Tensor:
        managed, plain = features
        pooled = []
        if self.managed is not None:
            kt, _ = self.managed(managed)
            pooled.append(kt.values())
        if self.plain is not None:
            pooled.append(self.plain(plain).values())
        return torch.cat(pooled, dim=1)


class MCHEmbeddingBagCollection(RemappedEmbeddingBagCollection):
    """Drop-in ``EmbeddingBagCollection`` whose compressed tables are TorchRec MCH tables.

    Args:
        tables: logical tables (N = cardinality); output keys, order and dims are those of
            ``EmbeddingBagCollection(tables)``.
        compression_ratio: logical bytes / budget bytes, per table.
        eviction: ``"lfu"`` or ``"distance_lfu"``.
        eviction_interval: training steps between evictions.
        buckets: MCH buckets per table; a multiple of the world size when sharded.

    Any int64 ID is valid: IDs are reduced mod N (MCH's row-wise input dist routes raw IDs by
    range, and plain tables index rows directly).
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        compression_ratio: float,
        eviction: str = "lfu",
        eviction_interval: int = 1,
        buckets: int = 1,
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
    ) -> None:
        if eviction_interval < 1:
            raise ValueError(f"eviction_interval must be >= 1, got {eviction_interval}")
        _policy(eviction)  # validates it even when no table is compressed
        layouts = {t.name: mch_layout(t, compression_ratio, eviction, buckets) for t in tables}
        managed = [t for t in tables if layouts[t.name].compressed]
        plain = [t for t in tables if not layouts[t.name].compressed]
        physical = [resized_table(t, layouts[t.name].zch_rows) for t in managed]
        device = device or torch.device("cpu")
        mc_ebc: Optional[ManagedCollisionEmbeddingBagCollection] = None
        if managed:
            modules: Dict[str, ManagedCollisionModule] = {
                t.name: _mch_module(layouts[t.name].zch_rows, t.num_embeddings, eviction, eviction_interval, buckets, device)
                for t in managed
            }
            mc_ebc = ManagedCollisionEmbeddingBagCollection(
                EmbeddingBagCollection(physical, is_weighted, device),
                ManagedCollisionCollection(modules, physical),
                return_remapped_features=False,
            )
        plain_physical = [resized_table(t, layouts[t.name].plain_rows) for t in plain]
        plain_ebc = EmbeddingBagCollection(plain_physical, is_weighted, device) if plain else None
        per_feature = [(t, layouts[t.name]) for t in managed + plain for _ in t.feature_names]
        remap = _MCHRemap(
            [f for t in managed for f in t.feature_names],
            [f for t in plain for f in t.feature_names],
            [t.num_embeddings for t, _ in per_feature],
            [l.plain_rows if l.hashed else 0 for _, l in per_feature],
        )
        # Output columns: [managed outputs | plain outputs] -> the logical order.
        cols = output_columns(managed + plain)
        keys = [f for t in tables for f in t.feature_names]
        empty = torch.zeros(0, dtype=torch.int64)
        combine = LogicalColumns(keys, [t.embedding_dim for t in tables for _ in t.feature_names], torch.cat([cols[f] for f in keys]), empty, empty)
        super().__init__(tables, is_weighted, remap, _MCHLookup(mc_ebc, plain_ebc), combine)
        self._layouts = layouts

    @property
    def managed_collision_ebc(self) -> Optional[nn.Module]:
        """TorchRec's MC-EBC of the compressed tables (sharded under DMP), None when none is."""
        lookup = self._embedding_bag_collection
        assert isinstance(lookup, _MCHLookup)
        return lookup.managed

    def memory_report(self) -> Dict[str, Dict[str, float]]:
        """Per logical table: rows and bytes; ``total_bytes`` (rows + id state) <= ``budget_bytes``
        when compressed; ``uncharged_bytes``: TorchRec's fixed resharding buffer, not counted."""
        return {
            name: {
                "compressed": l.compressed,
                "logical_bytes": l.logical_bytes,
                "budget_bytes": l.budget_bytes,
                "zch_rows": l.zch_rows,
                "plain_rows": l.plain_rows,
                "row_bytes": l.row_bytes,
                "id_state_bytes": l.id_state_bytes,
                "uncharged_bytes": l.uncharged_bytes,
                "total_bytes": l.total_bytes,
                "compression_ratio": l.logical_bytes / l.total_bytes,
            }
            for name, l in self._layouts.items()
        }


class _ShardedMCHEmbeddingBagCollection(ShardedManagedCollisionEmbeddingBagCollection):
    """TorchRec's sharded MC-EBC. On CPU an eviction zeroes the row-wise Adagrad momentum of the
    evicted rows through the TBE's state views (what ``fbgemm::reset_weight_momentum`` does; it has
    no CPU kernel) and re-initialises the rows with the table's ``init_fn``, as TorchRec does."""

    def _evict(self, evictions_per_table: Dict[str, Optional[torch.Tensor]]) -> None:
        if self._device.type != "cpu":
            return super()._evict(evictions_per_table)
        with torch.no_grad():
            for table, rows in evictions_per_table.items():
                if rows is None:
                    continue
                tbe, index = self._table_to_tbe_and_index[table]
                if tbe.optimizer == OptimType.EXACT_ROWWISE_ADAGRAD:
                    for state in tbe.split_optimizer_states()[int(index)]:
                        state[rows] = 0
                weight = self._embedding_module.embedding_bags.get_parameter(f"{table}.weight")
                init_fn = self._embedding_module._table_name_to_config[table].init_fn
                assert init_fn is not None  # EmbeddingBagConfig sets a default
                fresh = init_fn(weight[rows])
                if fresh is not None:
                    weight[rows] = fresh


class _CPUCapableMCEBCSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """TorchRec's MC-EBC sharder, with the fused kernel on CPU (TorchRec hard-codes CUDA kernels,
    which the CPU planner rejects), row-wise placement of the inner EBC on CPU too, and CPU
    evictions that work with row-wise Adagrad."""

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if compute_device_type == "cpu":
            return [EmbeddingComputeKernel.FUSED.value]
        return super().compute_kernels(sharding_type, compute_device_type)

    def shard(  # type: ignore[override]  # TorchRec declares ModuleSharder.shard an abstractclassmethod
        self,
        module: ManagedCollisionEmbeddingBagCollection,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedManagedCollisionEmbeddingBagCollection:
        return _ShardedMCHEmbeddingBagCollection(
            module, params, ebc_sharder=cast(EmbeddingBagCollectionSharder, self._e_sharder), mc_sharder=self._mc_sharder, env=env, device=device or torch.device("cuda")
        )


def mch_sharder() -> ManagedCollisionEmbeddingBagCollectionSharder:
    """The sharder for the MC-EBC inside ``MCHEmbeddingBagCollection`` (row-wise, CPU and CUDA)."""
    # Imported here: torchrec_cafe.distributed imports this package's CAFE module.
    from torchrec_cafe.distributed.sharder import RowWiseEverywhereEBCSharder

    return _CPUCapableMCEBCSharder(ebc_sharder=RowWiseEverywhereEBCSharder())
