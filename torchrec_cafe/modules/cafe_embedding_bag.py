"""CafeEmbeddingBagCollection: a drop-in EmbeddingBagCollection under a per-table memory budget."""

import dataclasses
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing
from torch.profiler import record_function
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.config import CafeConfig
from torchrec_cafe.kjt import with_values
from torchrec_cafe.modules.inputs import as_embedding_features, check_kjt, with_embedding_names
from torchrec_cafe.modules.layouts import group_sketch, is_meta, table_layouts
from torchrec_cafe.modules.row_access import RowAccess
from torchrec_cafe.modules.scores import PendingScores, concat_scores, normalised_scores, occurrence_norms
from torchrec_cafe.remap import KJTRemapper, Migration, RemapContext, TableLayout
from torchrec_cafe.sketch.hot_sketch import HotSketch
from torchrec_cafe.sketch.replicas import all_gather_aggregated, all_gather_occurrences, check_same_on_all_ranks, spans_ranks


class CafeEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """EmbeddingBagCollection whose tables keep only their hot IDs' rows unique.

    Same constructor (``tables, is_weighted, device``; CAFE settings by keyword), same ``KeyedTensor`` output (keys, order, dims) and same
    ``embedding_bag_configs()`` as ``EmbeddingBagCollection(tables, is_weighted)``; each table named
    in ``cafe`` is stored as a pool of hashed rows (+ block rows when composed) + a HotSketch within
    ``num_embeddings * dim * bytes / compression_ratio`` bytes; hot IDs own pool rows privately.

    Lifecycle of one training step: ``forward`` applies the scores pending from the previous
    backward(s) (sketch update + row migrations, every ``update_interval`` steps), remaps raw IDs
    with the sketch, runs the inner ``EmbeddingBagCollection`` and hooks the output gradient;
    backward stashes one score per occurrence. State never changes inside backward. ``eval()``
    freezes the sketch: no scores, no updates, same remap.

    ``state_dict()`` first applies the scores pending since the last update (as
    ``apply_pending_updates()``), so any snapshot (``torch.save``, plain DCP,
    ``torchrec_cafe.checkpoint``) resumes exactly; loading discards the loaded module's own pending
    scores. With several ranks that makes ``state_dict()`` a collective, like DCP's save: call it on
    every rank.

    Args:
        tables: logical tables, exactly as for ``EmbeddingBagCollection``.
        is_weighted: whether input KJTs carry per-id weights.
        device: where tables and sketches live.
        cafe: (keyword only) one ``CafeConfig`` for every table, or a dict table name ->
            ``CafeConfig`` (tables not named stay plain).

    Example::

        ebc = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=100))
        kt = ebc(kjt)  # KeyedTensor, same as EmbeddingBagCollection(tables)(kjt)
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        *,
        cafe: Optional[Union[CafeConfig, Mapping[str, CafeConfig]]] = None,
    ) -> None:
        if not isinstance(is_weighted, bool):
            raise ValueError(
                f"is_weighted must be a bool, got {type(is_weighted).__name__} (the constructor is "
                f"EmbeddingBagCollection's: tables, is_weighted, device; CAFE settings go by keyword, cafe=...)"
            )
        if cafe is None:
            raise ValueError("cafe= is required: a CafeConfig for every table, or a dict table name -> CafeConfig")
        super().__init__()
        torch._C._log_api_usage_once(f"torchrec_cafe.{type(self).__name__}")
        self._logical_configs = list(tables)
        self._is_weighted = is_weighted
        # Physical tables read features under TorchRec's embedding names (``f@table`` for a feature
        # shared by tables): every name is then one table's feature, and the output keys are EBC's.
        self._layouts = table_layouts(with_embedding_names(tables), cafe, is_weighted)
        # Tables may start on the meta device (DMP materialises them); the sketch and the remap
        # constants must not (DMP would fill them with zeros), so they start on CPU and follow
        # the inputs' device at the first forward.
        state_device = torch.device("cpu") if is_meta(device) else device
        self._remapper = KJTRemapper(self._layouts, state_device)
        # A plain EBC, replaced by TorchRec's sharded one when the sharder shards this module.
        self._embedding_bag_collection: nn.Module = EmbeddingBagCollection(
            tables=[l.physical_config() for l in self._layouts],
            is_weighted=self._remapper.weighted_out,
            device=device,
        )
        self._device = self._embedding_bag_collection.device
        self._sketched = [l for l in self._layouts if l.sketched]
        self._sketch = group_sketch(self._sketched, state_device)
        self._feature_names = [f for l in self._layouts for f in l.config.feature_names]  # embedding names
        self._input_features = [f for t in tables for f in t.feature_names]  # the KJT key each reads
        # Per training step: its compressed occurrences' scores, waiting for a sketch update.
        self._pending: List[PendingScores] = []
        # Row migrations of updates already applied to the sketch whose rows have not been copied
        # yet (sharded: they land at the compute of the batch remapped after that update), in order.
        self._deferred: List[Migration] = []
        self._last_context: Optional[RemapContext] = None
        self._column_features: Dict["tuple[str, ...]", "tuple[int, torch.Tensor]"] = {}
        self._update_interval = self._sketched[0].settings.update_interval if self._sketched else 1
        self._steps_since_update = 0
        self._step = 0  # training steps remapped so far: tags each step's scores
        self._pipeline_depth = self._sketched[0].settings.pipeline_depth if self._sketched else 0
        self._sync = self._sketched[0].settings.sync if self._sketched else "aggregated"
        self._group: Optional[dist.ProcessGroup] = None  # replicas: see replicate_across
        self._rows = RowAccess([l.config.name for l in self._sketched])  # their rows, wherever they live
        self.register_state_dict_pre_hook(_apply_pending_before_save)
        self.register_load_state_dict_post_hook(_discard_pending_after_load)

    # ------------------------------------------------------------------ EBC interface

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._logical_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        """The compute device (as ``EmbeddingBagCollection.device``)."""
        return self._device

    @property
    def sketch(self) -> Optional[HotSketch]:
        """The HotSketch of all sketched tables (None if no table is sketched)."""
        return self._sketch

    @property
    def remapper(self) -> KJTRemapper:
        """Raw IDs -> physical rows (its constants are non-persistent buffers)."""
        return self._remapper

    @property
    def embedding_bags(self) -> nn.ModuleDict:
        """The *physical* tables by logical table name (``nn.EmbeddingBag`` of ``P + B`` rows for a
        compressed table, the full table otherwise): what ``EmbeddingBagCollection.embedding_bags``
        holds, at the compressed size. Unsharded modules only."""
        return self.physical_tables().embedding_bags

    def physical_tables(self) -> EmbeddingBagCollection:
        """The plain ``EmbeddingBagCollection`` of the physical tables (pool + block rows per
        compressed table); ``ValueError`` once a sharder has replaced it by its sharded form."""
        inner = self._embedding_bag_collection
        if not isinstance(inner, EmbeddingBagCollection):
            raise ValueError("the physical tables are sharded: the unsharded EmbeddingBagCollection is gone")
        return inner

    def install_sharded_tables(self, sharded: nn.Module, local_block: Optional["tuple[int, int]"] = None) -> None:
        """The sharder's call: the sharded form of ``physical_tables()`` replaces it (the state-dict
        names stay ``_embedding_bag_collection.*``). ``local_block`` = (j, k): this module's rows
        are block j of k equal row blocks of this rank's shard of ``sharded``'s tables, row r of a
        table being row r of the block (the partitioned form: a partition's own tables, migrated
        locally, no replica group)."""
        self._embedding_bag_collection = sharded
        self._rows.local_block = local_block

    @property
    def is_partition(self) -> bool:
        """Whether this is one rank's partition of a partitioned sharded module (its sketch is its
        own, not a replica)."""
        return self._rows.local_block is not None

    def embedding_features(self) -> List["tuple[str, int]"]:
        """(embedding name, its logical table's ``num_embeddings``) per feature, in module order:
        the keys ``order_features`` returns."""
        return [(f, l.config.num_embeddings) for l in self._layouts for f in l.config.feature_names]

    def cafe_settings(self) -> Dict[str, CafeConfig]:
        """The CafeConfig of every compressed logical table, by table name."""
        return {l.config.name: l.cafe for l in self._layouts if l.cafe is not None}

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` of an eval-mode module scripts its frozen lookup as it stands
        (``export_for_inference``: the outputs of ``eval()``; no sketch, scores or migrations, which
        TorchScript has no place for). Scripting a model that contains this module puts the frozen
        form in its place *in that model too* (torch's ``__prepare_scriptable__`` contract): script a
        copy of a model that trains on."""
        if self.training:
            raise ValueError(
                "torch.jit.script of a CafeEmbeddingBagCollection needs eval() mode: TorchScript gets "
                "its frozen lookup (export_for_inference), which does not train"
            )
        from torchrec_cafe.modules.frozen import export_bag_module  # imports this module

        return export_bag_module(self).__prepare_scriptable__()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Lets promotions copy the optimizer state of plain torch optimizers (unsharded use).

        Under ``DistributedModelParallel`` fused tables need nothing (their optimizer state lives in
        the tables); data-parallel tables are stepped by the dense optimizer, which must be
        attached (``sharded.cafe.attach_optimizer(opt)``) so promotions copy its state.
        """
        self._rows.optimizer = optimizer

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Raw-ID KJT (any key order, any int64 ids) -> pooled ``KeyedTensor`` [B, sum(dims)].

        Under ``torch.fx`` tracing (``torchrec.fx.symbolic_trace``) of an unsharded module, the
        trace records the frozen lookup as it stands (as ``export_for_inference`` serves it) and
        the physical tables: a graph for inference, which scripts."""
        if is_fx_tracing() and isinstance(self._embedding_bag_collection, EmbeddingBagCollection):
            from torchrec_cafe.modules.frozen import traced_physical_features  # imports this module

            return self._embedding_bag_collection(traced_physical_features(self, features))
        features, step, migration = self._prepare(features, self.training)
        if migration is not None:
            self._migrate_rows(migration)
        if features.stride() == 0:
            return self._empty_output(features.values().device)
        physical, context = self._remap(features, step)
        kt = self._embedding_bag_collection(physical)
        if self.training and context is not None:
            self._track_importance(kt, context)
        return kt

    def remap(self, features: KeyedJaggedTensor, training: bool) -> "tuple[KeyedJaggedTensor, Optional[RemapContext]]":
        """The part of a step before the table lookup, which a sharded module runs before its input
        dist: validates and orders ``features``, applies the due sketch update when ``training``
        (a collective over ``replicate_across``'s group) and maps raw IDs to physical rows.
        Returns the physical KJT (the physical tables' features) and the context
        ``track_importance`` and ``land_migration`` need (None without sketched tables).

        The update's row migration does not run here: it is ``context.migration``, which
        ``land_migration(context)`` copies before the batch's lookup. A pipeline remaps batch j + 1
        before batch j's backward, which writes the rows a migration copies; landing it at batch
        j + 1's compute copies them after that backward, as an unpipelined step does."""
        features, step, migration = self._prepare(features, training)
        physical, context = self._remap(features, step)
        if migration is not None:
            assert context is not None  # an update implies sketched tables, hence a context
            self._deferred.append(migration)
            context.migration = migration
        return physical, context

    @torch.no_grad()
    def land_migration(self, context: RemapContext) -> None:
        """Copies the rows of ``context.migration`` (and of any earlier migration still deferred),
        unless they have landed already (``apply_pending_updates`` lands every deferred one).
        Collective over ``replicate_across``'s group when a table is row-split."""
        if context.migration is None or not any(m is context.migration for m in self._deferred):
            return
        while self._deferred:
            migration = self._deferred.pop(0)
            self._migrate_rows(migration)
            if migration is context.migration:
                return

    def track_importance(self, output: KeyedTensor, context: RemapContext) -> None:
        """The part after the lookup, when training: ``output`` (the physical tables' pooled
        ``KeyedTensor`` for ``context``'s batch) gets the gradient hook that scores this step's
        occurrences for the next sketch update."""
        self._track_importance(output, context)

    def _prepare(
        self, features: KeyedJaggedTensor, training: bool
    ) -> "tuple[KeyedJaggedTensor, int, Optional[Migration]]":
        """Validates and orders ``features``, follows their device and, when training, applies the
        sketch update that is due (the scores of steps before ``step - pipeline_depth``). Returns
        the features, this training step's index (-1 in eval) and the update's row migration
        (None: no update, or nothing promoted), which the caller lands before the lookup."""
        features = self.order_features(features)
        if self._remapper.sketch_table.device != features.values().device:
            self.follow(features.values().device)
        step, migration = -1, None
        if training and self._sketch is not None:
            step, self._step = self._step, self._step + 1
            if self._steps_since_update >= self._update_interval:
                migration = self._update(step - self._pipeline_depth)
            self._steps_since_update += 1
        return features, step, migration

    def _remap(self, features: KeyedJaggedTensor, step: int) -> "tuple[KeyedJaggedTensor, Optional[RemapContext]]":
        """Ordered raw KJT -> (physical KJT, hook context); keeps the context for ``stats()``."""
        with record_function("## cafe: remap ##"):
            physical, context = self._remapper(features, self._sketch)
        if context is not None:
            context.step = step
        self._last_context = context
        return physical, context

    def follow(self, device: torch.device) -> None:
        """Moves the sketch and remap constants (not the tables) to ``device``: next to the inputs,
        or, sharded, next to the sharded tables (host-side, no sync)."""
        self._remapper.to(device)
        self._device = device
        if self._sketch is not None:
            self._sketch.to(device)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module's signature
        # Cached index tensors and TBE views belong to the old device or storage.
        self._column_features.clear()
        self._rows.forget()
        return super()._apply(fn, recurse)

    def _empty_output(self, device: torch.device) -> KeyedTensor:
        """A batch of 0 samples (which TorchRec's EBC cannot pool) gives [0, sum(dims)]."""
        dims = [c.embedding_dim for l in self._layouts for c in [l.config] for _ in c.feature_names]
        return KeyedTensor(keys=self._feature_names, length_per_key=dims, values=torch.zeros(0, sum(dims), device=device))

    # ------------------------------------------------------------------ validation

    def order_features(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Validates a raw-ID KJT (``ValueError`` naming the problem) and returns it keyed by the
        module's embedding names (``embedding_features()``) in the module's order."""
        check_kjt(features, may_sync=self._sketch is None or self._sketch.host_reads_are_free())
        keys = features.keys()
        if keys != self._feature_names:
            if len(set(keys)) != len(keys):
                raise ValueError(f"KJT has duplicate feature keys: {keys}")
            expected = list(dict.fromkeys(self._input_features))
            unknown = [k for k in keys if k not in expected]
            if unknown:
                raise ValueError(f"KJT has unknown feature keys {unknown}; expected {expected}")
            missing = [k for k in expected if k not in keys]
            if missing:
                raise ValueError(f"KJT is missing feature keys {missing}; expected {expected}")
            features = as_embedding_features(features, self._input_features, self._feature_names)
        if self._is_weighted and features.weights_or_none() is None:
            raise ValueError("module is_weighted=True but the KJT has no weights")
        if not self._is_weighted and features.weights_or_none() is not None:
            # EmbeddingBagCollection(is_weighted=False) ignores weights; so do we.
            features = with_values(features, features.values(), None)
        return features

    # ------------------------------------------------------------------ importance

    def _track_importance(self, kt: KeyedTensor, context: RemapContext) -> None:
        remapper = self._remapper
        if len(remapper.frequency_tables) == len(self._sketched):
            self._pending.append(PendingScores(context.ids, context.tables, torch.ones_like(context.factor), context.feature, context.step))
            return
        values = kt.values()
        if values.requires_grad:
            if context.inverse is not None:  # variable batch: outputs are expanded bags
                position = {k: i for i, k in enumerate(kt.keys())}
                offsets = kt.offset_per_key()
                spans = [(offsets[position[f]], offsets[position[f] + 1]) for f in self._feature_names]
                values.register_hook(lambda g: self._on_expanded_output_grad(g, context, spans))
            else:
                columns = self._columns_of(kt)
                values.register_hook(lambda g: self._on_output_grad(g, context, columns))

    def _columns_of(self, kt: KeyedTensor) -> "tuple[int, torch.Tensor]":
        """How to sum each feature's output columns, by key name. When every key has the same dim
        d (DLRM's case): (d, output position of each module feature [F]), a reshape and a sum;
        otherwise (0, feature index of each output column [sum(dims)]), an index_add_ over columns.
        Either way a non-finite gradient column stays within its own feature."""
        keys = tuple(kt.keys())
        if keys not in self._column_features:
            dims = kt.length_per_key()
            index = {f: i for i, f in enumerate(self._feature_names)}
            device = kt.values().device
            if len(set(dims)) == 1:
                position = {k: i for i, k in enumerate(keys)}
                plan = (dims[0], torch.tensor([position[f] for f in self._feature_names], device=device))
            else:
                plan = (0, torch.tensor([index[k] for k, d in zip(keys, dims) for _ in range(d)], device=device))
            self._column_features[keys] = plan
        return self._column_features[keys]

    def _on_output_grad(self, grad: torch.Tensor, context: RemapContext, columns: "tuple[int, torch.Tensor]") -> None:
        """Per-occurrence importance = ||d loss / d pooled bag|| * |weight| (/ len for MEAN).
        Stashes norms only: rescaling (a collective with several ranks) and state changes happen
        at the next update, never inside backward."""
        with torch.no_grad(), record_function("## cafe: importance ##"):
            compiled = self._sketch is not None and self._sketch.kernels_apply()
            norms = occurrence_norms(grad, columns, context.bag, context.factor, self._remapper.num_features, compiled)
            self._stash(norms, context)

    def _on_expanded_output_grad(
        self, grad: torch.Tensor, context: RemapContext, spans: "List[tuple[int, int]]"
    ) -> None:
        """Variable-batch KJTs: output row b of feature f is bag ``inverse[f, b]`` expanded, so a
        bag's gradient is the sum over the rows that repeat it. One index_add per feature."""
        inverse, bags = context.inverse, context.bags_per_feature
        assert inverse is not None and bags is not None  # hooked for variable-batch contexts only
        with torch.no_grad():
            squares = []
            for f, (lo, hi) in enumerate(spans):  # over features, not IDs
                bag_grad = torch.zeros(bags[f], hi - lo, dtype=torch.float64, device=grad.device)
                bag_grad.index_add_(0, inverse[f], grad[:, lo:hi].double())
                squares.append(bag_grad.pow(2).sum(dim=1))
            bag_norms = torch.cat(squares).sqrt().float()  # float64 sums, as occurrence_norms
            self._stash(bag_norms.index_select(0, context.bag) * context.factor, context)

    def _stash(self, norms: torch.Tensor, context: RemapContext) -> None:
        """Keeps per-occurrence norms [n_s] for the update."""
        ready = None
        if norms.is_cuda:  # the update may run on another stream (a pipeline's data-dist stream)
            ready = torch.cuda.Event()
            ready.record()
        self._pending.append(PendingScores(context.ids, context.tables, norms, context.feature, context.step, ready))

    # ------------------------------------------------------------------ updates and migration

    @torch.no_grad()
    def apply_pending_updates(self) -> None:
        """Lands every deferred row migration, then feeds all stashed scores (``pipeline_depth``
        holds none back here) to the sketch and migrates the promoted IDs' rows.

        Local unless ``replicate_across`` named a group of several ranks; then it is a collective
        over that group: every rank applies the all-gathered, exactly pre-aggregated occurrences of
        all ranks, so the replicated sketches stay bit-identical. Training ``forward`` runs the
        due updates itself, on every rank at the same steps.
        """
        while self._deferred:
            self._migrate_rows(self._deferred.pop(0))
        migration = self._update(None)
        if migration is not None:
            self._migrate_rows(migration)

    def _update(self, before: Optional[int]) -> Optional[Migration]:
        """One sketch update from the stashed scores of the steps before ``before`` (None: all).
        Returns its row migration (None when nothing was promoted, known for free on CPU)."""
        if self._sketch is None or self._steps_since_update == 0:
            # No training step since the last update: nothing to apply. The counter is host state
            # that every rank advances alike, so all ranks skip the collective together.
            return None
        # Refusals before any state changes: a refused update keeps its scores, sketch and rows.
        physical, device = self._embedding_bag_collection, self._remapper.sketch_table.device
        self._rows.refuse_unreplicated(physical, self._group)
        self._rows.groups(physical, device, self._group)  # refuses optimizer state it cannot migrate
        is_due = [before is None or p.step < before for p in self._pending]
        due = [p for p, d in zip(self._pending, is_due) if d]
        self._pending, self._steps_since_update = [p for p, d in zip(self._pending, is_due) if not d], 0
        ids, tables, norms, feature = concat_scores(due, self._sketch.step.device)
        distributed = spans_ranks(self._group)
        if not (due or distributed):
            return None
        with record_function("## cafe: importance ##"):
            compiled = self._sketch.kernels_apply()
            scores = normalised_scores(norms, feature, self._remapper.num_features, self._group, compiled)
            if self._remapper.frequency_tables:
                frequency = self._remapper.frequency.index_select(0, tables)
                scores = torch.where(frequency, torch.ones_like(scores), scores)
        if distributed:
            with record_function("## cafe: sketch sync + update ##"):
                if self._sync == "aggregated":
                    update = all_gather_aggregated(self._sketch, ids, scores, tables, self._group)
                else:
                    update = self._sketch.update(*all_gather_occurrences(ids, scores, tables, self._group))
        else:
            with record_function("## cafe: sketch update ##"):
                update = self._sketch.update(ids, scores, tables)
        # Free checks on CPU (every rank agrees: replicas are identical): nothing to migrate, or
        # only the few promoted pairs of thousands.
        compact = self._sketch.host_reads_are_free()
        if compact and not bool(update.promoted.any()):
            return None
        migration = self._remapper.migration(update)
        if compact:
            return migration.promoted_only()
        capacity = self._sketch.promotion_capacity  # a bound on the promotions: fixed [capacity] buffers
        return migration if capacity is None else migration.within(capacity)

    def _migrate_rows(self, m: Migration) -> None:
        self._rows.migrate(m, self._embedding_bag_collection, self._remapper.sketch_table.device, self._group)

    def describe(self) -> List[Dict[str, object]]:
        """JSON-able description of every logical table and its physical form (sizes, CAFE
        settings): what must agree between ranks, and between a checkpoint and a module."""
        return [
            {
                "name": c.name,
                "num_embeddings": c.num_embeddings,
                "embedding_dim": c.embedding_dim,
                "data_type": str(c.data_type),
                "feature_names": list(logical.feature_names),
                "pooling": str(c.pooling),
                "is_weighted": self._is_weighted,
                "cafe": dataclasses.asdict(l.cafe) if l.cafe is not None else None,
                "pool_rows": l.budget.pool_rows,
                "block_rows": l.budget.block_rows,
                "sketch_buckets": l.budget.num_buckets if l.compressed else 0,
            }
            for logical, l in zip(self._logical_configs, self._layouts)
            for c in [l.config]
        ]

    def discard_pending(self) -> None:
        """Drops the scores stashed since the last update (after loading a checkpoint they belong
        to the run that was replaced) and restarts the update interval."""
        self._pending, self._deferred, self._steps_since_update, self._last_context = [], [], 0, None

    def replicate_across(self, group: Optional[dist.ProcessGroup]) -> None:
        """Keeps this module's sketch a replica over the ranks of ``group`` (None: local, the
        default: an unsharded module never communicates, whatever process groups exist).

        Collective over ``group``, before any other of this module's: raises the same
        ``ValueError`` on every rank if the ranks' tables or CAFE settings differ (the replicas
        would diverge). From then on every sketch update and row migration is a collective over
        ``group``. The CAFE sharder calls it with its ``ShardingEnv``'s group; call it yourself to
        replicate an unsharded module (e.g. under DDP)."""
        if spans_ranks(group):
            assert group is not None
            device = self._remapper.sketch_table.device
            check_same_on_all_ranks(self.describe(), group, "CafeEmbeddingBagCollection tables or CafeConfig", device)
        self._group = group

    # ------------------------------------------------------------------ reporting

    def _layout(self, name: str) -> TableLayout:
        return next(l for l in self._layouts if l.config.name == name)

    def memory_report(self) -> Dict[str, Dict[str, float]]:
        """Per logical table: bytes and rows of the physical form, exact and sketch included.

        The sketch's shared sentinel state is charged to the first compressed table, so the
        tables' ``sketch_bytes`` add up to the sketch's ``nbytes()``.
        """
        report = {}
        first = self._sketched[0].config.name if self._sketched else None
        for l in self._layouts:
            b = l.budget
            sketch = b.sketch_bytes
            if l.config.name == first:
                sketch += HotSketch.shared_state_bytes(l.settings.slots_per_bucket)
            total = b.rows * b.row_bytes + sketch
            report[l.config.name] = {
                "compressed": b.compressed,
                "sketched": l.sketched,
                "logical_bytes": b.logical_bytes,
                "budget_bytes": b.budget_bytes,
                "pool_rows": b.pool_rows,
                "block_rows": b.block_rows,
                "sketch_buckets": b.num_buckets,
                "row_bytes": b.row_bytes,
                "sketch_bytes": sketch,
                "total_bytes": total,
                "compression_ratio": b.logical_bytes / total,
            }
        return report

    def stats(self) -> Dict[str, Dict[str, float]]:
        """Per sketched table: hot-hit rate of the last batch and sketch counters (host sync)."""
        out: Dict[str, Dict[str, float]] = {}
        sketch = self._sketch
        if sketch is None:
            return out
        for t, layout in enumerate(self._sketched):
            s: Dict[str, float] = dict(sketch.stats(t))
            c = self._last_context
            s["hot_hit_rate"] = float(c.hot_hits[t]) if c is not None else float("nan")
            out[layout.config.name] = s
        return out

def _apply_pending_before_save(module: CafeEmbeddingBagCollection, _prefix: str, _keep_vars: bool) -> None:
    module.apply_pending_updates()  # the snapshot then holds the whole trained state


def _discard_pending_after_load(module: CafeEmbeddingBagCollection, _incompatible: object) -> None:
    module.discard_pending()  # a named function: modules with hooks must stay picklable
