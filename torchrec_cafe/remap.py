"""Remap: a KJT of raw IDs -> a KJT of physical rows, plus what the importance hook needs.

Physical layout of a compressed table of N logical rows: rows ``[0, P)`` are the *pool* (hashed
rows), rows ``[P, P + B)`` the *block* rows (``cold_rows="composed"`` only). An ID reads

- a pool row: the one it owns if it is hot, else its first of four hashed choices that no hot ID
  owns (``HotSketch.lookup``); a table too small for a sketch (a budget of under
  ``MIN_SKETCHED_ROWS`` rows) has no hot IDs and reads its first choice;
- composed tables, a cold ID also reads its block row ``P + (id mod N) // ceil(N / B)``: every
  cold ID is a distinct (pool row, block row) pair, QR-style, and cold IDs of one range share the
  block row. A hot ID reads its private row alone, so neither kind of shared row is trained by the
  head: the tail shares rows only with the tail. A cold ID whose every choice is owned (most of
  the pool private) reads its block row alone.

Plain tables reduce IDs modulo N, so any int64 ID is valid everywhere. The physical KJT holds the
entries an ID reads and no others (a composed cold ID two, a hot or blocked one one, a blocked ID
of a hashed table none): SUM tables pool from an unweighted KJT (when the input is), so the lookup
does no more work than the rows read. MEAN tables whose bags change (composed or sketched) pool as
SUM with weights ``w / len`` (``len``: the bag's IDs). All features are remapped together by
per-feature constant tensors: a fixed number of tensor ops whatever the number of tables.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import reorder_inverse_indices
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cafe.config import CafeConfig, TableBudget
from torchrec_cafe.kjt import bag_keys, bags_per_key, kjt_like, value_bags
from torchrec_cafe.sketch import kernels
from torchrec_cafe.sketch.hashing import fingerprint32
from torchrec_cafe.sketch.hot_sketch import _BUCKET_SEED_OFFSET, POOL_SEED_OFFSET, HotSketch, SketchUpdate, pool_choices
from torchrec_cafe.sketch.ops import take


@dataclass(frozen=True)
class TableLayout:
    """A logical table and its physical form. ``cafe`` is None for plain tables."""

    config: EmbeddingBagConfig
    cafe: Optional[CafeConfig]
    budget: TableBudget
    weighted: bool = False

    @property
    def compressed(self) -> bool:
        return self.cafe is not None and self.budget.compressed

    @property
    def settings(self) -> CafeConfig:
        """The CAFE settings of a table that has them (compressed and sketched ones do)."""
        if self.cafe is None:
            raise ValueError(f"table {self.config.name!r} is plain: it has no CAFE settings")
        return self.cafe

    @property
    def sketched(self) -> bool:
        return self.compressed and self.budget.sketched

    @property
    def composed(self) -> bool:
        return self.compressed and self.budget.block_rows > 0

    @property
    def block_size(self) -> int:
        """Consecutive IDs per block row (composed tables)."""
        return math.ceil(self.config.num_embeddings / max(self.budget.block_rows, 1))

    @property
    def entries_vary(self) -> bool:
        """Sketched and composed tables read 0 to 2 physical entries per ID, so a bag's entries
        are not its IDs."""
        return self.composed or self.sketched

    @property
    def mean_as_weights(self) -> bool:
        """MEAN is computed as SUM with weights w/len when bags' entries are not their IDs
        (``entries_vary``) or carry weights (torch's EmbeddingBag has no weighted MEAN)."""
        return self.config.pooling == PoolingType.MEAN and (self.weighted or self.entries_vary)

    def physical_config(self) -> EmbeddingBagConfig:
        c = self.config
        return EmbeddingBagConfig(
            num_embeddings=self.budget.rows,
            embedding_dim=c.embedding_dim,
            name=c.name,
            data_type=c.data_type,
            feature_names=list(c.feature_names),
            weight_init_max=c.weight_init_max,
            weight_init_min=c.weight_init_min,
            init_fn=c.init_fn,
            pooling=PoolingType.SUM if self.mean_as_weights else c.pooling,
        )


@dataclass
class RemapContext:
    """What one forward saw of its sketched occurrences, [n_s] each (n_s = values of sketched tables)."""

    ids: torch.Tensor  # raw ids
    tables: torch.Tensor  # sketch table of each occurrence
    bag: torch.Tensor  # bag index in key-major KJT order: feature * B + sample
    feature: torch.Tensor  # feature index (module feature order)
    factor: torch.Tensor  # |weight| (/ bag length for MEAN): d pooled / d row, up to the gradient
    hot_hits: torch.Tensor  # [T] fraction of each sketched table's occurrences that hit a hot row
    # Variable-batch KJTs only: per feature, the bag of each sample of the full batch [F, B_full]
    # (TorchRec's inverse indices, module feature order) and the bags per feature [F] (host ints).
    inverse: Optional[torch.Tensor] = None
    bags_per_feature: Optional[List[int]] = None
    # Set by the module: the training step that remapped this batch (its scores' tag), and the
    # row migration of the sketch update that preceded this remap, when it is to land later (at
    # the sharded module's compute, after the previous batch's backward).
    step: int = -1
    migration: Optional["Migration"] = None

    def record_stream(self, stream: torch.Stream) -> None:
        """Marks every tensor as used on ``stream`` (made on the data-dist stream, read on the
        compute stream by the gradient hook and the migration)."""
        migration = self.migration.tensors() if self.migration is not None else ()
        for t in (self.ids, self.tables, self.bag, self.feature, self.factor, self.hot_hits, self.inverse, *migration):
            if t is not None:
                t.record_stream(stream)


@dataclass
class Migration:
    """Row copies of one sketch update, per promoted pair [N] (physical rows of its table)."""

    tables: torch.Tensor  # sketch table
    src: torch.Tensor  # the pool row the ID read
    dst: torch.Tensor  # the pool row it now owns
    mask: torch.Tensor  # promoted
    keep_weights: torch.Tensor  # False: the ID read no pool row (blocked)
    block: torch.Tensor  # its block row (composed tables), added to dst: the ID's embedding so far
    composed: torch.Tensor
    reset_state: torch.Tensor  # optimizer state of dst zeroed instead of copied from src

    def tensors(self) -> "tuple[torch.Tensor, ...]":
        return (self.tables, self.src, self.dst, self.mask, self.keep_weights, self.block, self.composed, self.reset_state)

    def promoted_only(self) -> "Migration":
        """The promoted pairs alone (a host read of their count: for CPU, where promotions are a
        few per update and the pairs thousands; accelerators keep the fixed shapes)."""
        keep = self.mask.nonzero().squeeze(1)
        return Migration(*(t.index_select(0, keep) for t in self.tensors()))

    def within(self, capacity: int) -> "Migration":
        """The promoted pairs, in order, packed into ``capacity`` entries (``mask`` False after
        them): fixed shapes, no host read. For accelerators when the sketch caps its promotions
        (``HotSketch.promotion_capacity``), so the copies stage [capacity] rows instead of one per
        distinct pair of the update. Needs at most ``capacity`` promoted pairs (what the cap
        guarantees); pairs past it would not be copied."""
        rank = torch.cumsum(self.mask, 0) - 1
        slot = torch.where(self.mask & (rank < capacity), rank, capacity)  # the rest: one trash entry

        def pack(t: torch.Tensor) -> torch.Tensor:
            return t.new_zeros(capacity + 1).index_copy_(0, slot, t)[:capacity]

        return Migration(*(pack(t) for t in self.tensors()))


_NO_SKETCH = HotSketch(1, 1)  # buffers to pass the remap kernel when there is no sketch (never read)


def _with_batch_layout(context: RemapContext, kjt: KeyedJaggedTensor) -> RemapContext:
    """Adds a variable-batch KJT's inverse indices and bags per feature to ``context``."""
    if kjt.variable_stride_per_key():
        context.inverse = reorder_inverse_indices(kjt.inverse_indices_or_none(), kjt.keys())
        context.bags_per_feature = kjt.stride_per_key()
    return context


def block_rows(ids: torch.Tensor, num_rows: torch.Tensor, pool: torch.Tensor, block_size: torch.Tensor) -> torch.Tensor:
    """Physical block row of each id of a composed table (per-value N, P and block size, [n]
    each): ``P + (id mod N) // block_size``. TorchScript-able. [n] int64"""
    return pool + torch.remainder(ids, num_rows) // block_size


def _positions(length_per_key: List[int], features: List[int], device: torch.device) -> torch.Tensor:
    """Positions of the values of ``features`` (key indices), given the values per key (host):
    contiguous runs."""
    offsets = [0]
    for n in length_per_key:
        offsets.append(offsets[-1] + n)
    starts = [offsets[f] for f in features]
    counts = [length_per_key[f] for f in features]
    total = sum(counts)
    counts_t = torch.tensor(counts, device=device)
    run_start = torch.tensor(starts, device=device) - (torch.cumsum(counts_t, 0) - counts_t)
    return torch.arange(total, device=device) + torch.repeat_interleave(run_start, counts_t, output_size=total)


class KJTRemapper(nn.Module):
    """Maps KJTs in module feature order (the layouts' tables, then their features) to physical
    rows, using a ``HotSketch`` whose table t is the t-th sketched layout."""

    # False keeps CPU remaps on the tensor code even when the compiled kernel is built (tests
    # compare the two); the kernel also follows the sketch's ``kernels_apply()``.
    use_kernels: bool = True

    # registered buffers (typed for the type checker; nn.Module's __getattr__ is untyped)
    sketch_table: torch.Tensor
    num_rows: torch.Tensor
    static: torch.Tensor
    pool: torch.Tensor
    block_size: torch.Tensor
    composed: torch.Tensor
    mean: torch.Tensor
    mean_as_weights: torch.Tensor
    frequency: torch.Tensor
    table_composed: torch.Tensor
    table_rows: torch.Tensor
    table_pool: torch.Tensor
    table_block_size: torch.Tensor
    table_reset_state: torch.Tensor

    def __init__(self, layouts: List[TableLayout], device: Optional[torch.device] = None) -> None:
        super().__init__()
        sketched = [l for l in layouts if l.sketched]
        sketch_table = {l.config.name: t for t, l in enumerate(sketched)}
        per_feature: List[Tuple[TableLayout, int]] = [
            (l, sketch_table.get(l.config.name, -1)) for l in layouts for _ in l.config.feature_names
        ]
        self.num_features = len(per_feature)
        self.sketched_features = [i for i, (_, t) in enumerate(per_feature) if t >= 0]
        self.static_features = [i for i, (l, t) in enumerate(per_feature) if l.compressed and t < 0]
        self.entries_vary = any(l.entries_vary for l in layouts)
        self.weighted_out = any(l.weighted or l.mean_as_weights for l in layouts)
        self.frequency_tables = [t for t, l in enumerate(sketched) if l.settings.importance == "frequency"]
        constants = {
            "sketch_table": ([t for _, t in per_feature], torch.int64),
            "num_rows": ([l.config.num_embeddings for l, _ in per_feature], torch.int64),
            "pool": ([l.budget.pool_rows for l, _ in per_feature], torch.int64),
            "block_size": ([l.block_size for l, _ in per_feature], torch.int64),
            "composed": ([l.composed for l, _ in per_feature], torch.bool),
            "mean": ([l.config.pooling == PoolingType.MEAN for l, _ in per_feature], torch.bool),
            "mean_as_weights": ([l.mean_as_weights for l, _ in per_feature], torch.bool),
            "static": ([l.compressed and t < 0 for l, t in per_feature], torch.bool),
            # per sketched table
            "frequency": ([l.settings.importance == "frequency" for l in sketched] or [False], torch.bool),
            "table_composed": ([l.composed for l in sketched] or [False], torch.bool),
            "table_rows": ([l.config.num_embeddings for l in sketched] or [1], torch.int64),
            "table_pool": ([l.budget.pool_rows for l in sketched] or [1], torch.int64),
            "table_block_size": ([l.block_size for l in sketched] or [1], torch.int64),
            "table_reset_state": ([l.settings.optimizer_state == "reset" for l in sketched] or [False], torch.bool),
        }
        for name, (values, dtype) in constants.items():
            self.register_buffer(name, torch.tensor(values, dtype=dtype, device=device), persistent=False)

    def forward(
        self, kjt: KeyedJaggedTensor, sketch: Optional[HotSketch]
    ) -> Tuple[KeyedJaggedTensor, Optional[RemapContext]]:
        if self._kernel_applies(kjt, sketch):
            return self._kernel_forward(kjt, sketch)
        ids = kjt.values().to(torch.int64)
        lengths = kjt.lengths()
        n, device = ids.numel(), ids.device
        bag = value_bags(lengths, n)
        feature = take(bag_keys(kjt, device), bag)
        # Every value is mapped as if its table were each kind, and the right kind kept: fixed
        # shapes, no host read of where each feature's values lie.
        rows = torch.remainder(ids, take(self.num_rows, feature))  # plain rows; compressed ones below
        if self.static_features:
            first = pool_choices(fingerprint32(ids), take(self.pool, feature).clamp(min=1))[:, 0]
            rows = torch.where(take(self.static, feature), first, rows)
        if sketch is None or not self.sketched_features:
            return self._physical(kjt, ids, rows, bag, feature, None)[0], None
        table = take(self.sketch_table, feature)
        tables = table.clamp(min=0)  # other features' values query table 0, and are not kept
        row, hot, blocked = sketch.lookup(ids, tables)
        rows = torch.where(table >= 0, row, rows)
        # Hot IDs read their pool row alone (code 1, composed tables), blocked ones no pool row
        # (2): their block row alone, or (hashed cold rows) nothing, never another ID's row.
        # Static tables (code 0) read their first choice (and block row).
        code = torch.where(hot & take(self.composed, feature), 1, torch.where(blocked, 2, 0))
        physical, length_per_key = self._physical(kjt, ids, rows, bag, feature, torch.where(table >= 0, code, 0))
        sel = _positions(length_per_key, self.sketched_features, device)
        context = self._context(kjt, sel, take(ids, sel), take(tables, sel), take(bag, sel), take(feature, sel), take(hot, sel))
        return physical, context

    def _kernel_applies(self, kjt: KeyedJaggedTensor, sketch: Optional[HotSketch]) -> bool:
        w = kjt.weights_or_none()
        return (
            kernels.AVAILABLE
            and self.use_kernels
            and kjt.values().device.type == "cpu"
            and (sketch is None or sketch.kernels_apply())
            and (w is None or w.dtype == torch.float32)
        )

    def _kernel_forward(
        self, kjt: KeyedJaggedTensor, sketch: Optional[HotSketch]
    ) -> Tuple[KeyedJaggedTensor, Optional[RemapContext]]:
        """``forward`` in one compiled pass (sketch/kernels.py), bit for bit the tensor code's result."""
        with_sketch = sketch is not None and bool(self.sketched_features)
        s = sketch if sketch is not None and with_sketch else _NO_SKETCH
        w = kjt.weights_or_none()
        values, lengths, weights, ids, tables, bag, feature, factor, hot_hits, per_key = torch.ops.torchrec_cafe.remap(
            kjt.values(), kjt.lengths(), w if w is not None else torch.zeros(0), bags_per_key(kjt),
            self.sketch_table, self.num_rows, self.pool, self.block_size, self.composed, self.mean, self.mean_as_weights,
            self.static, self.weighted_out, with_sketch, self.frequency.numel(),
            *kernels.lookup_state(s), _BUCKET_SEED_OFFSET, POOL_SEED_OFFSET,
        )  # fmt: skip
        # The entries per key fill the physical KJT's per-key caches (a free read on CPU), so the
        # lookup does not sum its lengths again.
        physical = kjt_like(
            kjt, kjt.keys(), values, lengths, weights if self.weighted_out else None, kjt.inverse_indices_or_none(), per_key.tolist()
        )
        if not with_sketch:
            return physical, None
        return physical, _with_batch_layout(RemapContext(ids=ids, tables=tables, bag=bag, feature=feature, factor=factor, hot_hits=hot_hits), kjt)

    def _physical(
        self,
        kjt: KeyedJaggedTensor,
        ids: torch.Tensor,
        rows: torch.Tensor,
        bag: torch.Tensor,
        feature: torch.Tensor,
        alone: Optional[torch.Tensor],
    ) -> Tuple[KeyedJaggedTensor, List[int]]:
        """``alone`` [n]: per value, 1 if it reads its pool row alone (hot, composed), 2 if it reads
        no pool row (blocked), 0 otherwise. Each value becomes its entries, in order (pool row,
        block row), within its bag. Returns the physical KJT and the input's values per key."""
        lengths = kjt.lengths()
        weights: Optional[torch.Tensor] = None
        if self.weighted_out:
            w = kjt.weights_or_none()
            base = w if w is not None else torch.ones_like(rows, dtype=torch.float32)
            inv_len = 1.0 / take(lengths.clamp(min=1).to(base.dtype), bag)
            weights = torch.where(take(self.mean_as_weights, feature), base * inv_len, base)
        if not self.entries_vary or ids.device.type == "meta":
            # (meta tensors hold no data to count entries by; the pooled output's shape is the same)
            same = kjt.length_per_key() if ids.device.type != "meta" else kjt.length_per_key_or_none()
            physical = kjt_like(kjt, kjt.keys(), rows, lengths, weights, kjt.inverse_indices_or_none(), same)
            return physical, same if same is not None else []
        composed = take(self.composed, feature)
        code = alone if alone is not None else torch.zeros_like(ids)
        reads_pool = (code != 2).to(torch.int64)
        reads_block = (composed & (code != 1)).to(torch.int64)
        count = reads_pool + reads_block
        block = block_rows(ids, take(self.num_rows, feature), take(self.pool, feature), take(self.block_size, feature))
        # The physical KJT's entries per key and the input's values per key in one host read (on
        # accelerators the step's only one): it fills the per-key caches TorchRec's lookup (or
        # input dist) would otherwise read back itself.
        per_key = torch.zeros(2, self.num_features, dtype=torch.int64, device=ids.device)
        length_per_key, values_per_key = per_key.index_add_(1, feature, torch.stack([count, torch.ones_like(count)])).tolist()
        total = sum(length_per_key)
        src = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), count, output_size=total)
        # An entry is a value's block row when it is its second, or its first and it reads no pool row.
        second = (torch.arange(total, device=ids.device) - take(torch.cumsum(count, 0) - count, src)) == 1
        is_block = second | (take(reads_pool, src) == 0)
        values = torch.where(is_block, take(block, src), take(rows, src))
        out_lengths = torch.zeros_like(lengths).index_add_(0, bag, count.to(lengths.dtype))
        out_weights = take(weights, src) if weights is not None else None
        physical = kjt_like(kjt, kjt.keys(), values, out_lengths, out_weights, kjt.inverse_indices_or_none(), length_per_key)
        return physical, values_per_key

    def _context(
        self,
        kjt: KeyedJaggedTensor,
        sel: torch.Tensor,
        ids: torch.Tensor,
        tables: torch.Tensor,
        bag: torch.Tensor,
        feature: torch.Tensor,
        hot: torch.Tensor,
    ) -> RemapContext:
        """Hook data of the sketched occurrences (all arguments but ``kjt``/``sel``: [n_s])."""
        w = kjt.weights_or_none()
        factor = take(w, sel).abs().float() if w is not None else torch.ones(sel.numel(), device=ids.device)
        inv_len = 1.0 / take(kjt.lengths().clamp(min=1).to(factor.dtype), bag)
        factor = torch.where(take(self.mean, feature), factor * inv_len, factor)
        num_tables = self.frequency.numel()
        hits = torch.zeros(num_tables, device=ids.device).index_add_(0, tables, hot.float())
        seen = torch.zeros(num_tables, device=ids.device).index_add_(0, tables, torch.ones_like(factor))
        return _with_batch_layout(RemapContext(ids=ids, tables=tables, bag=bag, feature=feature, factor=factor, hot_hits=hits / seen.clamp(min=1)), kjt)

    def migration(self, update: SketchUpdate) -> Migration:
        """The row copies of a sketch update: pool rows are the first rows of a physical table."""
        t = update.tables
        composed = take(self.table_composed, t)
        block = block_rows(update.ids, take(self.table_rows, t), take(self.table_pool, t), take(self.table_block_size, t))
        return Migration(
            tables=t,
            src=update.src,
            dst=update.dst,
            mask=update.promoted,
            keep_weights=~update.src_blocked,
            block=torch.where(composed, block, update.src),
            composed=composed,
            reset_state=take(self.table_reset_state, t),
        )
