"""Where a CAFE module's rows live, and the row migrations into them.

The physical tables are a plain ``EmbeddingBagCollection`` (unsharded) or TorchRec's sharded one:
fused TBEs (whole tables, column slices, row blocks, or one partition's block in the partitioned
form), data-parallel replicas stepped by the dense optimizer, or tables split by rows over the
ranks of the replica group. ``RowAccess`` finds each sketched table's rows and optimizer state
there (``rows.py`` reads the storages) and copies a migration's rows, locally or, for row-split
tables, by the row exchange (a collective over the group).
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_cafe.remap import Migration
from torchrec_cafe.rows import (
    RowExchange,
    RowGroup,
    RowShard,
    dense_shards,
    exchange_rows,
    indexed_groups,
    migrate_by_table,
    parameter_shards,
    storage_key,
    tbe_shards,
)
from torchrec_cafe.sketch.replicas import spans_ranks

# (row groups of the whole-row shards with per-tensor row bases [T] and membership [T]; per
# row-split table, its sketch index and local shards)
RowGroups = Tuple[List[Tuple[RowGroup, List[torch.Tensor], torch.Tensor]], List[Tuple[int, List[RowShard]]]]


class RowAccess:
    """The rows (and optimizer state) of a module's sketched tables ``names`` (in sketch order).

    Set by the module: ``optimizer``, the plain torch optimizer whose per-row state promotions
    copy (unsharded or data-parallel tables); ``local_block`` = (j, k), the module's rows being
    block j of k equal row blocks of this rank's shards (the partitioned form), else None.
    """

    # False keeps CPU migrations on the tensor code even when the compiled operator is built.
    use_kernels: bool = True

    def __init__(self, names: List[str]) -> None:
        self.names = names
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.local_block: Optional["tuple[int, int]"] = None
        self._cached: Optional["tuple[nn.Module, list]"] = None

    def forget(self) -> None:
        """Drops the cached TBE views and index tensors (the module moved or was re-sharded)."""
        self._cached = None

    def refuse_unreplicated(self, tables: nn.Module, group: Optional[dist.ProcessGroup]) -> None:
        """Tables sharded over several ranks by TorchRec's own EBC sharder (not CAFE's) under a
        local sketch: every rank would remap with its own, diverging sketch."""
        sharded = not isinstance(tables, EmbeddingBagCollection)
        if sharded and self.local_block is None and group is None and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                "CafeEmbeddingBagCollection's tables are sharded over several ranks but its sketch is "
                "local: shard the module itself with CafeEmbeddingBagCollectionSharder (not only its "
                "inner EmbeddingBagCollection), or call replicate_across(group) on every rank"
            )

    def groups(self, tables: nn.Module, device: torch.device, group: Optional[dist.ProcessGroup]) -> RowGroups:
        """(row groups of the whole-row shards, with per-tensor row bases [T] and membership [T];
        per row-split table, its sketch index and local shards, in the same order on every rank).

        Fused (TBE) tables are views that never move, so their part is cached. The state of plain
        torch optimizers (unsharded tables; data-parallel ones, stepped by the dense optimizer) is
        created lazily and replaced by ``load_state_dict``: unsharded groups are rebuilt each time,
        data-parallel ones whenever their storages change (no host-to-device copy otherwise).
        Raises for optimizer state a migration cannot carry.
        """
        names = self.names
        if isinstance(tables, EmbeddingBagCollection):
            shards = [
                s for n in names for s in parameter_shards(tables.embedding_bags[n].get_parameter("weight"), n, self.optimizer)
            ]
            return indexed_groups(shards, names, device), _row_split_tables(names, shards, device, group)
        if self._cached is None or self._cached[0] is not tables:
            shards = tbe_shards(tables, names, block=self.local_block)
            fused = indexed_groups([s for s in shards if not s.row_split], names, device)
            # [fused groups, row-split tables, data-parallel storage key, data-parallel groups]
            self._cached = (tables, [fused, _row_split_tables(names, shards, device, group), None, []])
        cache = self._cached[1]
        dense = dense_shards(tables, names, self.optimizer)
        key = storage_key(dense)
        if key != cache[2]:
            cache[2:] = [key, indexed_groups(dense, names, device)]
        return cache[0] + cache[3], cache[1]

    def migrate(self, m: Migration, tables: nn.Module, device: torch.device, group: Optional[dist.ProcessGroup]) -> None:
        """Copies each promoted ID's pool row (weights and optimizer state) into the row it now
        owns. Collective over ``group`` when a table is row-split."""
        groups, row_split = self.groups(tables, device, group)
        with record_function("## cafe: migration ##"):
            for row_group, bases, member in groups:
                migrate_by_table(
                    row_group, bases, member, m.tables, m.src, m.dst, m.mask, m.keep_weights, m.block, m.composed, m.reset_state,
                    self.use_kernels,
                )  # fmt: skip
            if row_split:
                exchange_rows(
                    [
                        RowExchange(shards, m.src, m.dst, m.mask & (m.tables == t), m.keep_weights, m.block, m.composed, m.reset_state)
                        for t, shards in row_split
                    ],
                    group,
                )


def _row_split_tables(
    names: List[str], shards: List[RowShard], device: torch.device, group: Optional[dist.ProcessGroup]
) -> List["tuple[int, List[RowShard]]"]:
    """Tables split by rows across the ranks of ``group``, agreed by all of them (one all-reduce,
    when building the cache). Every rank must hold a shard of each: the row exchange is a collective."""
    local = [[s for s in shards if s.table == n and s.row_split] for n in names]
    if not spans_ranks(group):
        return [(t, mine) for t, mine in enumerate(local) if mine]
    held = torch.tensor([[1 if mine else 0 for mine in local]] * 2, dtype=torch.int64, device=device)
    held[1] *= -1  # one all-reduce(MAX) gives max and -min
    dist.all_reduce(held, op=dist.ReduceOp.MAX, group=group)
    out = []
    for t, (most, neg_least) in enumerate(held.t().tolist()):
        if most and -neg_least == 0:
            raise NotImplementedError(
                f"table {names[t]!r} is split by rows over only some ranks (table-row-wise across "
                f"hosts): CAFE's row exchange needs a shard on every rank; use row_wise, "
                f"table_wise or column_wise"
            )
        if most:
            out.append((t, local[t]))
    return out
