"""The partitioned form of a sharded ``CafeEmbeddingBagCollection``, for row-wise plans.

The model has P partitions (``modules/partition.py``: partition p owns the IDs ``id mod P == p``
of every table, as local IDs ``< ceil(N / P)``), each with its own sketch, pool and block rows
within ``1 / P`` of the table's budget; rank r of W (W dividing P; P = W by default) owns
partitions ``r * P / W`` to ``(r + 1) * P / W - 1``. As TorchRec's managed-collision modules
shard (``mc_embedding_modules.py``), raw IDs travel to their owner through a
``RwSparseFeaturesDist`` with ``keep_original_indices``; the owner applies each partition's due
sketch update, lands its row migration and remaps, all in ``compute`` (on the default stream,
after the previous batch's backward), then looks up in its row block of the physical tables,
which TorchRec's EBC sharder shards row-wise (P blocks of one partition's rows, P / W per rank);
TorchRec's row-wise output dist sums the ranks' pooled outputs. Importance comes from the
gradient of the owner's pooled output. Nothing is replicated and nothing crosses ranks but the IDs
and the pooled rows: a rank's work and bytes follow its share of the IDs, not W. Since the state
is laid out by partition (rows: P blocks; sketches: a ShardedTensor [P, ...]), DCP reshards a
checkpoint between any W dividing P.

The run equals ``CafeEmbeddingBagPartitions`` (the P partitions on one process) fed the global
batches. Needs SUM pooling and fixed-batch KJTs.
"""

import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
from torchrec.distributed.embedding_sharding import EmbeddingShardingContext, KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding.rw_sharding import RwSparseFeaturesDist
from torchrec.distributed.types import Awaitable, LazyAwaitable, ParameterSharding, ShardingEnv, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.distributed.base import CafeEmbeddingBagCollectionContext, ShardedCafeBase
from torchrec_cafe.kjt import with_values
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.modules.partition import (
    feature_spreads,
    merge_bags,
    owner_and_local,
    partition_cafe,
    partition_spreads,
    partition_tables,
    select_partition,
    value_keys,
)
from torchrec_cafe.sketch.replicas import check_same_on_all_ranks


def partition_plan(
    plan: Dict[str, ParameterSharding], rows: Dict[str, int], dims: Dict[str, int], world_size: int, partitions: int
) -> Dict[str, ParameterSharding]:
    """The row-wise plan of the physical tables resized to P blocks of one partition's ``rows``
    each, rank r holding blocks ``r * P / W`` to ``(r + 1) * P / W - 1``. ``ValueError`` unless
    every table is row-wise over all W ranks in rank order."""
    out, per_rank = {}, partitions // world_size
    for name, ps in plan.items():
        shards = ps.sharding_spec.shards if isinstance(ps.sharding_spec, EnumerableShardingSpec) else []
        ranks = [s.placement.rank() for s in shards if s.placement is not None]
        if ps.sharding_type != ShardingType.ROW_WISE.value or ranks != list(range(world_size)):
            raise ValueError(
                f"table {name!r}: the partitioned form needs a row-wise placement over all {world_size} ranks in "
                f"rank order, got {ps.sharding_type!r} on ranks {ranks}; use form='replicated' for other placements"
            )
        size = per_rank * rows[name]
        blocks = [
            ShardMetadata(shard_offsets=[r * size, 0], shard_sizes=[size, dims[name]], placement=s.placement)
            for r, s in enumerate(shards)
        ]
        out[name] = dataclasses.replace(ps, sharding_spec=EnumerableShardingSpec(blocks))
    return out


class PartitionedCafeEmbeddingBagCollection(ShardedCafeBase):
    """Sharded ``CafeEmbeddingBagCollection`` whose rank r owns P / W of its P partitions.

    Same ``KeyedTensor`` output as the other forms; ``partitions`` are this rank's (each a
    ``CafeEmbeddingBagCollection`` of ``partition_tables(tables, P)``; ``memory_report()`` is this
    rank's share). State dict: ``_embedding_bag_collection.*`` row-wise ShardedTensors of P
    partition blocks, ``_sketch.*`` ShardedTensors [P, ...] of one sketch per partition: the same
    global state for every W, so DCP reshards it.

    ``partitions``: P, a multiple of W (default W). With P / W > 1 partitions per rank, splitting
    a rank's IDs between its partitions reads their counts on the host once per step.
    """

    _blocks: torch.Tensor  # per module feature, one partition's local IDs ceil(N / P)
    _spreads: torch.Tensor  # per module feature, the partitions its IDs spread over (P, or fewer)
    _physical_rows: torch.Tensor  # per module feature, one partition's physical rows of its table

    def __init__(
        self,
        module: CafeEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        ebc_sharder: EmbeddingBagCollectionSharder,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
        partitions: Optional[int] = None,
    ) -> None:
        super().__init__()
        world, self._rank = env.world_size, env.rank
        total = world if partitions is None else partitions
        if env.process_group is None:
            raise ValueError("the partitioned form sends IDs to their owners: it needs a ShardingEnv with a process group")
        if total < 1 or total % world:
            raise ValueError(f"partitions={total} must be a positive multiple of the world size {world}")
        state_device = device if device is not None else torch.device("cpu")
        # First, before any collective: every rank must partition the same tables alike.
        if world > 1:
            description = {"module": module.describe(), "partitions": total}
            check_same_on_all_ranks(description, env.process_group, "CafeEmbeddingBagCollection tables, CafeConfig or partitions", state_device)
        self._world, self._total, self._per_rank, self._pg = world, total, total // world, env.process_group
        tables = module.embedding_bag_configs()
        local_tables, settings = partition_tables(tables, total), partition_cafe(tables, module.cafe_settings(), total)
        spreads = feature_spreads(tables, partition_spreads(tables, module.cafe_settings(), total))
        # Built on meta: their tables are replaced by the sharded ones below.
        mine = [
            CafeEmbeddingBagCollection(local_tables, module.is_weighted(), torch.device("meta"), cafe=settings)
            for _ in range(self._per_rank)
        ]
        local = mine[0].physical_tables()
        rows = {c.name: c.num_embeddings for c in local.embedding_bag_configs()}
        dims = {c.name: c.embedding_dim for c in local.embedding_bag_configs()}
        plan = partition_plan(table_name_to_parameter_sharding, rows, dims, world, total)
        physical = EmbeddingBagCollection(
            [dataclasses.replace(c, num_embeddings=total * c.num_embeddings) for c in local.embedding_bag_configs()],
            is_weighted=local.is_weighted(),
            device=torch.device("meta"),
        )
        _copy_optimizer_marks(module.physical_tables(), physical)
        inner_fqn = f"{module_fqn}._embedding_bag_collection" if module_fqn else None
        sharded = ebc_sharder.shard(physical, plan, env, device, inner_fqn)
        # This module dists the raw IDs itself and feeds the sharded tables' compute, as TorchRec's
        # MC-EBC does with its inner EBC (same flag, same reason).
        sharded._has_uninitialized_input_dist = False
        for j, cafe in enumerate(mine):
            cafe.install_sharded_tables(sharded, local_block=(j, self._per_rank))
            cafe.follow(state_device)
        self._embedding_bag_collection = sharded
        self._own(mine)
        self._sketches = torch.nn.ModuleList([c.sketch for c in mine if c.sketch is not None])
        self._remappers = torch.nn.ModuleList([c.remapper for c in mine])
        (sharding,) = sharded._embedding_shardings  # one row-wise sharding (as MC-EBC reads it)
        features = mine[0].embedding_features()
        names = [f for f, _ in features]
        self._lookup_order = [names.index(f) for f in sharding.feature_names()]
        self._output_names, self._output_dims = sharding.embedding_names(), sharding.embedding_dims()
        table_of = {f: c.name for c in local.embedding_bag_configs() for f in c.feature_names}
        self.register_buffer("_blocks", torch.tensor([n for _, n in features], device=state_device), persistent=False)
        self.register_buffer("_spreads", torch.tensor([spreads[f] for f in names], device=state_device), persistent=False)
        self.register_buffer(
            "_physical_rows", torch.tensor([rows[table_of[f]] for f in names], device=state_device), persistent=False
        )
        # Each partition's sketch is its own: in state dicts a ShardedTensor [P, *shape] of one
        # slice per partition (a plain tensor would be taken for a replica, and DCP keeps one copy).
        self._register_state_dict_hook(_sketch_as_sharded)
        self._register_load_state_dict_pre_hook(_sketch_from_sharded, with_module=True)
        self._dist = RwSparseFeaturesDist(
            pg=env.process_group,
            num_features=len(names),
            feature_hash_sizes=[total * n for _, n in features],
            device=state_device,
            keep_original_indices=True,
        )

    def input_dist(
        self, ctx: CafeEmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """Validates, then sends every raw ID to its owner (routed as ``partition * blocks + local``)."""
        features = self.partitions[0].order_features(features)
        if features.variable_stride_per_key():
            raise ValueError("the partitioned form takes fixed-batch KJTs (variable-batch KJTs: use form='replicated')")
        key = value_keys(features)
        blocks = self._blocks.index_select(0, key)
        owner, local = owner_and_local(features.values(), blocks, self._spreads.index_select(0, key))
        routed = with_values(features, owner * blocks + local, features.weights_or_none())
        ctx.variable_batch_per_feature, ctx.inverse_indices = False, None
        ctx.sharding_contexts.append(
            EmbeddingShardingContext(batch_size_per_feature_pre_a2a=features.stride_per_key(), variable_batch_per_feature=False)
        )
        return KJTListSplitsAwaitable([self._dist(routed)], ctx)

    def compute(self, ctx: CafeEmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        """Each partition's step (due sketch update and migration, remap), then one lookup in
        this rank's row blocks. The remap contexts stay local: nothing here crosses streams."""
        received = dist_input[0]
        blocks = self._blocks.index_select(0, value_keys(received))
        first = self._rank * self._per_rank
        owner, local = received.values().div(blocks, rounding_mode="floor") - first, received.values().remainder(blocks)
        physical, contexts = [], []
        for j, cafe in enumerate(self.partitions):
            if self._per_rank == 1:
                mine = with_values(received, local, received.weights_or_none())
            else:
                mine = select_partition(received, owner, local, j)
            rows, context = cafe.remap(mine, self.training)
            if context is not None:
                cafe.land_migration(context)
            contexts.append(context)
            # Partition j's rows are block j of this rank's shard.
            shifted = rows.values() + j * self._physical_rows.index_select(0, value_keys(rows))
            physical.append(with_values(rows, shifted, rows.weights_or_none()))
        merged = physical[0] if len(physical) == 1 else merge_bags(physical)
        if self._lookup_order != list(range(len(self._lookup_order))):
            merged = merged.permute(self._lookup_order)
        output = self._embedding_bag_collection.compute(ctx, KJTList([merged]))
        if self.training:
            pooled = KeyedTensor(keys=self._output_names, length_per_key=self._output_dims, values=output[0])
            for cafe, context in zip(self.partitions, contexts):
                if context is not None:  # each partition's bags are the merged bags: same gradient
                    cafe.track_importance(pooled, context)
        return output

    def output_dist(self, ctx: CafeEmbeddingBagCollectionContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        return self._embedding_bag_collection.output_dist(ctx, output)

    def compute_and_output_dist(self, ctx: CafeEmbeddingBagCollectionContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))


def _sketch_keys(module: PartitionedCafeEmbeddingBagCollection) -> List[str]:
    """Names of one partition's sketch state (none without sketched tables)."""
    return list(module._sketches[0].state_dict()) if len(module._sketches) else []


def _sketch_as_sharded(
    module: PartitionedCafeEmbeddingBagCollection, state: Dict[str, Any], prefix: str, _meta: Any
) -> None:
    """``_sketches.{j}.{name}`` -> ``_sketch.{name}``: a ShardedTensor [P, *shape] of which this
    rank holds rows ``first .. first + P / W``."""
    first = module._rank * module._per_rank
    for name in _sketch_keys(module):
        local = torch.stack([state.pop(f"{prefix}_sketches.{j}.{name}") for j in range(module._per_rank)])
        shard = Shard.from_tensor_and_offsets(local, [first] + [0] * (local.dim() - 1), module._rank)
        state[f"{prefix}_sketch.{name}"] = init_from_local_shards([shard], [module._total, *local.shape[1:]], process_group=module._pg)


def _sketch_from_sharded(module: PartitionedCafeEmbeddingBagCollection, state: Dict[str, Any], prefix: str, *_: Any) -> None:
    """The inverse of ``_sketch_as_sharded``: from a ShardedTensor with this rank's rows (as DCP
    loads it) or a whole [P, *shape] tensor."""
    first = module._rank * module._per_rank
    for name in _sketch_keys(module):
        value = state.pop(f"{prefix}_sketch.{name}", None)
        if isinstance(value, ShardedTensor):
            (shard,) = value.local_shards()
            value = shard.tensor
        elif value is not None:
            value = value[first : first + module._per_rank]
        if value is not None:
            for j in range(module._per_rank):
                state[f"{prefix}_sketches.{j}.{name}"] = value[j]


# What ``apply_optimizer_in_backward`` marks a parameter with: TorchRec's sharder fuses it into the TBE.
_OPTIMIZER_MARKS = ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs")


def _copy_optimizer_marks(source: EmbeddingBagCollection, target: EmbeddingBagCollection) -> None:
    """The in-backward optimizer of each of ``source``'s tables, on ``target``'s table of that name."""
    for name, bag in source.embedding_bags.items():
        weight, resized = bag.weight, target.embedding_bags[name].weight
        for mark in _OPTIMIZER_MARKS:
            if hasattr(weight, mark):
                setattr(resized, mark, getattr(weight, mark))
