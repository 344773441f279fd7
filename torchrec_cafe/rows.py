"""Row-level access to physical tables' weights and optimizer state, for migrations.

A promotion copies the shared row(s) an ID trained so far into its new hot row. Where the rows
live depends on how the inner ``EmbeddingBagCollection`` runs:

- unsharded: an ``nn.EmbeddingBag`` weight per table, optimizer state in a plain torch optimizer;
- wrapped by ``DistributedModelParallel``: FBGEMM TBE shards whose ``split_embedding_weights()`` and
  ``split_optimizer_states()`` are live views (in-place writes reach the next forward and the fused
  optimizer's state dict);
- data-parallel under ``DistributedModelParallel`` (dense kernel): a full replica per rank, whose
  per-table parameter is a view of FBGEMM's dense TBE weights and whose optimizer state lives in
  the torch optimizer that steps it (every rank applies the same copies, replicas stay identical).

Tables whose rows share one storage (all tables of one TBE) form a ``RowGroup``: one aliasing view
over the storage, so one scatter migrates the promotions of all its tables at once.

Policy (documented in the README): a promoted ID's private pool row gets its embedding so far, the
pool row it read (none if it was blocked) plus, in a composed table, its block row, which a hot ID
no longer reads; its optimizer state is copied from that pool row
(``CafeConfig.optimizer_state="copy"``) or zeroed (``"reset"``).
"""

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from torchrec_cafe.sketch import kernels


def rows_where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where`` choosing whole rows: ``mask`` [N] against rows of ``a``/``b`` [N, ...]."""
    return torch.where(mask.view((-1,) + (1,) * (a.dim() - 1)), a, b)


def masked_row_write_(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor, mask: torch.Tensor) -> None:
    """``dst[index[i]] = src[i]`` for every i with ``mask[i]``, with fixed shapes (no host sync).

    Masked-out entries repeat the first valid entry's write, or rewrite row 0 with itself when
    nothing is valid, so the duplicate writes of the scatter always agree.
    """
    if index.numel() == 0:
        return
    j = mask.to(torch.int8).argmax().view(1)  # stays a tensor: no host read of the position
    has = mask.any()
    idx0 = torch.where(has, index.index_select(0, j), torch.zeros_like(index[:1]))
    val0 = torch.where(has, src.index_select(0, j), dst[:1])
    dst.index_copy_(0, torch.where(mask, index, idx0), rows_where(mask, src, val0))


@dataclass
class RowShard:
    """One local block of one physical table: rows [row_offset, row_offset + num_rows)."""

    table: str
    weight: torch.Tensor  # [num_rows, cols] view
    states: List[torch.Tensor]  # optimizer states, [num_rows] or [num_rows, cols] views
    row_offset: int
    row_split: bool = False  # holds only some rows of the table (row-wise, table-row-wise)


@dataclass
class RowGroup:
    """Shards of several tables that live in the same storages, seen through one alias each.

    Row r of table t is row ``base[t][k] + r - row_offset[t]`` of tensor k (k = 0: ``weight``,
    k >= 1: ``states[k - 1]``): each storage packs tables at its own offsets (weights by rows of
    their dim, row-wise states by rows). A table appears at most once per group; its column-wise
    shards in one TBE form separate groups.
    """

    weight: torch.Tensor
    states: List[torch.Tensor]
    tables: List[str]
    base: Dict[str, List[int]]
    row_offset: Dict[str, int]

def _width(t: torch.Tensor) -> int:
    return t.shape[1] if t.dim() == 2 else 1


def _alias(view: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(whole-storage alias with ``view``'s row width, row index of ``view``'s first row)."""
    width = _width(view)
    full = torch.empty(0, dtype=view.dtype, device=view.device).set_(view.untyped_storage())
    rows = full.numel() // width
    shape = (rows, width) if view.dim() == 2 else (rows,)
    stride = (width, 1) if view.dim() == 2 else (1,)
    return full.as_strided(shape, stride, 0), view.storage_offset() // width


def _groupable(shard: RowShard) -> bool:
    tensors = [shard.weight] + shard.states
    return all(t.is_contiguous() and t.storage_offset() % _width(t) == 0 for t in tensors)


def group_shards(shards: Sequence[RowShard]) -> List[RowGroup]:
    """Groups shards by shared storages (one group per TBE), one group per shard otherwise."""
    groups: Dict[tuple, RowGroup] = {}
    for shard in shards:
        tensors = [shard.weight] + shard.states
        if _groupable(shard):
            key: Tuple[Any, ...] = tuple((t.untyped_storage().data_ptr(), t.dim(), _width(t)) for t in tensors)
            aliases = [_alias(t) for t in tensors]
        else:
            key, aliases = (id(shard),), [(t, 0) for t in tensors]
        repeat = 0  # the n-th shard of the same table in these storages (column-wise shards)
        while key + (repeat,) in groups and shard.table in groups[key + (repeat,)].base:
            repeat += 1
        key = key + (repeat,)
        if key not in groups:
            groups[key] = RowGroup(aliases[0][0], [a for a, _ in aliases[1:]], [], {}, {})
        group = groups[key]
        group.tables.append(shard.table)
        group.base[shard.table] = [offset for _, offset in aliases]
        group.row_offset[shard.table] = shard.row_offset
    return list(groups.values())


def indexed_groups(
    shards: Sequence[RowShard], names: Sequence[str], device: torch.device
) -> List[Tuple[RowGroup, List[torch.Tensor], torch.Tensor]]:
    """``group_shards`` plus, per group, each tensor's row base per table (``base - row_offset``,
    0 for tables not in the group) [T] int64 and the group's membership [T] bool, for ``migrate_group``.

    Built from host lists (a host-to-device copy): callers cache it per storage layout.
    """
    out = []
    for g in group_shards(shards):
        bases = [
            torch.tensor([g.base[n][k] - g.row_offset[n] if n in g.base else 0 for n in names], device=device)
            for k in range(1 + len(g.states))
        ]
        member = torch.tensor([n in g.base for n in names], device=device)
        out.append((g, bases, member))
    return out


@torch.no_grad()
def migrate_group(
    group: RowGroup,
    bases: Sequence[torch.Tensor],
    src: torch.Tensor,
    dst: torch.Tensor,
    mask: torch.Tensor,
    keep_weights: Optional[torch.Tensor] = None,
    src2: Optional[torch.Tensor] = None,
    use_src2: Optional[torch.Tensor] = None,
    reset_state: Optional[torch.Tensor] = None,
) -> None:
    """Initialises rows ``dst[i]`` (where ``mask``) with the weights of ``src[i]`` (where
    ``keep_weights``) plus ``src2[i]`` (where ``use_src2``); optimizer state is copied from
    ``src[i]``, or zeroed where ``reset_state``.

    ``bases[k]`` [N]: each entry's ``base - row_offset`` in tensor k of this group;
    ``src``/``dst`` are the tables' physical rows [N] int64, which every shard must hold
    (unsharded, table-wise and column-wise placements).
    """
    # Entries of other groups' tables may point past this group's rows: park them on row 0.
    zero = torch.zeros_like(src)

    def rows(r: torch.Tensor, k: int) -> torch.Tensor:
        return torch.where(mask, r + bases[k], zero)

    w = group.weight
    value = w.index_select(0, rows(src, 0))
    if keep_weights is not None:
        value = rows_where(keep_weights, value, torch.zeros_like(value))
    if src2 is not None and use_src2 is not None:
        value = value + use_src2.unsqueeze(1).to(value.dtype) * w.index_select(0, rows(src2, 0))
    masked_row_write_(w, rows(dst, 0), value, mask)
    for k, state in enumerate(group.states, start=1):
        value = state.index_select(0, rows(src, k))
        if reset_state is not None:
            value = rows_where(reset_state, torch.zeros_like(value), value)
        masked_row_write_(state, rows(dst, k), value, mask)


def migrate_by_table(
    group: RowGroup,
    bases: Sequence[torch.Tensor],
    member: torch.Tensor,
    tables: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    mask: torch.Tensor,
    keep_weights: torch.Tensor,
    block: torch.Tensor,
    composed: torch.Tensor,
    reset_state: torch.Tensor,
    compiled: bool = True,
) -> None:
    """``migrate_group`` of a migration's entries [N] over a group given per table: ``bases[k]``
    [T] each table's ``base - row_offset`` in tensor k, ``member`` [T] whether the group holds it,
    ``tables`` [N] each entry's table; entries of other groups' tables are skipped. Each entry's
    weights become those of ``src`` (unless ``keep_weights`` is False) plus its ``block`` row
    where ``composed``. ``compiled``: float32 CPU storages take one compiled operator, bit for
    bit the same writes.
    """
    tensors = [group.weight] + group.states
    if compiled and kernels.AVAILABLE and all(
        t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and t.dim() <= 2 for t in tensors
    ):
        torch.ops.torchrec_cafe.migrate_rows(
            group.weight, group.states, list(bases), member, tables, src, dst, mask, keep_weights, block, composed, reset_state
        )
        return
    mask = mask & member.index_select(0, tables)
    bases = [b.index_select(0, tables) for b in bases]
    migrate_group(group, bases, src, dst, mask, keep_weights, block, composed, reset_state)


@dataclass
class RowExchange:
    """One row-split table's promotions [P], for ``exchange_rows``."""

    shards: Sequence[RowShard]  # this rank's row shards of the table (full columns)
    src: torch.Tensor
    dst: torch.Tensor
    mask: torch.Tensor
    keep_weights: Optional[torch.Tensor] = None
    src2: Optional[torch.Tensor] = None
    use_src2: Optional[torch.Tensor] = None
    reset_state: Optional[torch.Tensor] = None


def _owned(shard: RowShard, rows: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    lo, hi = shard.row_offset, shard.row_offset + shard.weight.shape[0]
    own = valid & (rows >= lo) & (rows < hi)
    return own, torch.where(own, rows - lo, torch.zeros_like(rows))


def _staged(t: torch.Tensor, local: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    v = t.index_select(0, local)
    return rows_where(own, v, torch.zeros_like(v))


def _stage(part: RowExchange) -> List[torch.Tensor]:
    """[weight rows, state rows...] of the promotions' sources that this rank owns, zeros elsewhere."""
    template = part.shards[0]
    n = part.src.numel()
    buffers = [torch.zeros((n,) + t.shape[1:], dtype=t.dtype, device=part.src.device) for t in [template.weight] + template.states]
    keep = part.mask if part.keep_weights is None else part.mask & part.keep_weights
    for shard in part.shards:
        own, local = _owned(shard, part.src, part.mask)
        buffers[0] += _staged(shard.weight, local, own & keep)
        if part.src2 is not None and part.use_src2 is not None:
            own2, local2 = _owned(shard, part.src2, part.mask & part.use_src2)
            buffers[0] += _staged(shard.weight, local2, own2)
        for buffer, state in zip(buffers[1:], shard.states):
            buffer += _staged(state, local, own)
    return buffers


@torch.no_grad()
def exchange_rows(parts: Sequence[RowExchange], group: Optional[dist.ProcessGroup] = None) -> None:
    """``migrate_group`` for tables whose rows are split over ranks (row-wise placements).

    Collective: every rank calls it with the same tables and promotions. Each rank stages the
    source rows (and optimizer-state rows) it owns into zero buffers; one all-reduce(SUM) per dtype
    over all tables' buffers assembles them everywhere (x + 0 is exact); each rank then writes the
    destination rows it owns.
    """
    staged = [_stage(part) for part in parts]
    flat = [b for buffers in staged for b in buffers]
    for dtype in sorted({b.dtype for b in flat}, key=str):
        same = [b for b in flat if b.dtype == dtype]
        packed = torch.cat([b.reshape(-1) for b in same])
        dist.all_reduce(packed, group=group)
        for b, chunk in zip(same, packed.split([b.numel() for b in same])):
            b.copy_(chunk.view_as(b))
    for part, (weight, *states) in zip(parts, staged):
        if part.reset_state is not None:
            states = [rows_where(part.reset_state, torch.zeros_like(b), b) for b in states]
        for shard in part.shards:
            own, local = _owned(shard, part.dst, part.mask)
            masked_row_write_(shard.weight, local, weight, own)
            for state, buffer in zip(shard.states, states):
                masked_row_write_(state, local, buffer, own)


def parameter_shards(weight: nn.Parameter, table: str, optimizer: Optional[torch.optim.Optimizer]) -> List[RowShard]:
    """The single shard of an unsharded table, with the row-shaped state of a torch optimizer."""
    states: List[torch.Tensor] = []
    if optimizer is not None:
        for value in optimizer.state.get(weight, {}).values():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == weight.shape[0]:
                states.append(value)
    return [RowShard(table, weight.data, states, 0)]


def _kernels(sharded_ebc: nn.Module) -> Iterator[Tuple[Any, Any]]:
    """(TorchRec kernel, its FBGEMM module or None) of every lookup of a
    ``ShardedEmbeddingBagCollection`` (TorchRec internals: typed ``Any``)."""
    lookups: Any = sharded_ebc._lookups
    for lookup in lookups:
        lookup = getattr(lookup, "module", lookup)  # unwrap DistributedDataParallel
        for emb in getattr(lookup, "_emb_modules", []):
            yield emb, getattr(emb, "_emb_module", None)


def _is_dense(tbe: Optional[nn.Module]) -> bool:
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen

    return isinstance(tbe, DenseTableBatchedEmbeddingBagsCodegen)


def tbe_shards(sharded_ebc: nn.Module, tables: Sequence[str], block: Optional[Tuple[int, int]] = None) -> List[RowShard]:
    """Local shards of ``tables`` in a ``ShardedEmbeddingBagCollection`` with fused (TBE) kernels
    (dense-kernel tables are ``dense_shards``'). ``block`` = (j, k): each local shard is cut into k
    equal row blocks and block j is addressed as a table of its own (row 0 = its first row), as the
    partitioned form's partitions are."""
    wanted = set(tables)
    shards: List[RowShard] = []
    for emb, tbe in _kernels(sharded_ebc):
        if _is_dense(tbe):
            continue
        for k, cfg in enumerate(emb._config.embedding_tables):
            if cfg.name not in wanted:
                continue
            if not hasattr(tbe, "split_optimizer_states"):
                raise NotImplementedError(
                    f"table {cfg.name!r}: CAFE migrations need a fused or dense compute kernel, got "
                    f"{type(emb).__name__}; constrain the table to compute_kernels=['fused'] "
                    f"(or data_parallel with ['dense'])"
                )
            states = list(tbe.split_optimizer_states()[k]) if _has_state(tbe) else []
            weight = tbe.split_embedding_weights()[k]
            if block is not None:
                rows = weight.shape[0] // block[1]
                start, end = block[0] * rows, (block[0] + 1) * rows
                shards.append(RowShard(cfg.name, weight[start:end], [s[start:end] for s in states], 0, False))
                continue
            row_offset = cfg.local_metadata.shard_offsets[0] if cfg.local_metadata else 0
            shards.append(RowShard(cfg.name, weight, states, row_offset, cfg.local_rows != cfg.num_embeddings))
    return shards


def dense_shards(
    sharded_ebc: nn.Module, tables: Sequence[str], optimizer: Optional[torch.optim.Optimizer]
) -> List[RowShard]:
    """Data-parallel (dense-kernel) shards of ``tables`` in a ``ShardedEmbeddingBagCollection``.

    Each is a whole table [rows, dim]: the per-table ``TableBatchedEmbeddingSlice`` parameter, a view
    of ``DenseTableBatchedEmbeddingBagsCodegen.weights``. Its optimizer state is ``optimizer``'s
    (TorchRec 1.8 leaves dense kernels to the dense optimizer; in-backward optimizers are dropped),
    read afresh on each call: torch optimizers create state lazily and ``load_state_dict`` replaces it.

    Raises ``ValueError`` when a data-parallel table is not stepped by ``optimizer`` (its state
    would be unreachable), ``NotImplementedError`` when that optimizer keeps state that is not per
    row (a migration could not carry it).
    """
    wanted = set(tables)
    shards: List[RowShard] = []
    for emb, tbe in _kernels(sharded_ebc):
        if not _is_dense(tbe):
            continue
        for k, cfg in enumerate(emb._config.embedding_tables):
            if cfg.name not in wanted:
                continue
            param = emb._param_per_table[cfg.name]  # the parameter the dense optimizer steps
            weight = tbe.split_embedding_weights()[k]
            if cfg.local_rows != cfg.num_embeddings or param.shape != weight.shape:
                raise NotImplementedError(f"table {cfg.name!r}: CAFE supports the dense kernel for data_parallel only")
            states = param_states(param, cfg.name, optimizer)
            shards.append(RowShard(cfg.name, weight, states, 0))
    return shards


def param_states(param: torch.Tensor, table: str, optimizer: Optional[torch.optim.Optimizer]) -> List[torch.Tensor]:
    """Row-shaped state tensors ([rows, ...]) of ``param`` in a torch optimizer (or a TorchRec
    ``KeyedOptimizer``/``CombinedOptimizer``); scalars such as Adam's ``step`` are per parameter,
    shared by all rows, as in FBGEMM's fused optimizers."""
    if optimizer is None or not any(p is param for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(
            f"table {table!r} is data-parallel: its optimizer state lives in the dense optimizer that "
            f"steps it, which CAFE promotions must copy; pass that optimizer to attach_optimizer()"
            + (f" (the attached {type(optimizer).__name__} does not hold this table)" if optimizer is not None else "")
        )
    states: List[torch.Tensor] = []
    for key, value in optimizer.state.get(param, {}).items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == param.shape[0]:
            states.append(value)
        elif not (value is None or isinstance(value, (int, float)) or (torch.is_tensor(value) and value.dim() == 0)):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise NotImplementedError(
                f"table {table!r}: {type(optimizer).__name__} keeps state {key!r} ({shape}) that is not "
                f"per row, so CAFE promotions cannot carry it; use an optimizer with per-row or "
                f"per-element state (SGD, Adagrad, RowWiseAdagrad, Adam, ...) or a fused kernel"
            )
    return states


def storage_key(shards: Sequence[RowShard]) -> Tuple[Tuple[str, int, Tuple[int, ...]], ...]:
    """Identifies the storages behind ``shards`` (host-side, no sync): cached groups over them stay
    valid while it is unchanged (the groups' aliases keep those storages alive)."""
    return tuple((s.table, s.weight.data_ptr(), tuple(t.data_ptr() for t in s.states)) for s in shards)


def _has_state(tbe: nn.Module) -> bool:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return getattr(tbe, "optimizer", EmbOptimType.EXACT_SGD) not in (
        EmbOptimType.EXACT_SGD,
        EmbOptimType.NONE,
    )
