"""The partitioned form of a sharded ``CafeEmbeddingBagCollection``, for row-wise plans.

Rank r of W owns partition r of every table (``modules/partition.py``: the IDs ``id mod W == r``,
as local IDs ``< ceil(N / W)``): its own sketch, pool and block rows, within ``1 / W`` of the
table's budget. As TorchRec's managed-collision modules shard (``mc_embedding_modules.py``), raw
IDs travel to their owner through a ``RwSparseFeaturesDist`` with ``keep_original_indices``; the
owner applies its due sketch update, lands the row migration and remaps, all in ``compute`` (on
the default stream, after the previous batch's backward), then looks up in its row block of the
physical tables, which TorchRec's EBC sharder shards row-wise (W blocks of one partition's rows
each); TorchRec's row-wise output dist sums the partitions' pooled outputs. Importance comes from
the gradient of the owner's pooled output. Nothing is replicated and nothing crosses ranks but
the IDs and the pooled rows: a rank's work and bytes follow its share of the IDs, not W.

The run equals ``CafeEmbeddingBagPartitions`` (the W partitions on one process) fed the global
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
from torchrec_cafe.kjt import kjt_like
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.modules.partition import owner_and_local, partition_cafe, partition_tables, value_blocks
from torchrec_cafe.sketch.replicas import check_same_on_all_ranks


def partition_plan(
    plan: Dict[str, ParameterSharding], rows: Dict[str, int], dims: Dict[str, int], world_size: int
) -> Dict[str, ParameterSharding]:
    """The row-wise plan of the physical tables resized to W blocks of one partition's ``rows``
    each, rank r holding block r. ``ValueError`` unless every table is row-wise over all W ranks
    in rank order."""
    out = {}
    for name, ps in plan.items():
        shards = ps.sharding_spec.shards if isinstance(ps.sharding_spec, EnumerableShardingSpec) else []
        ranks = [s.placement.rank() for s in shards if s.placement is not None]
        if ps.sharding_type != ShardingType.ROW_WISE.value or ranks != list(range(world_size)):
            raise ValueError(
                f"table {name!r}: the partitioned form needs a row-wise placement over all {world_size} ranks in "
                f"rank order, got {ps.sharding_type!r} on ranks {ranks}; use form='replicated' for other placements"
            )
        blocks = [
            ShardMetadata(shard_offsets=[r * rows[name], 0], shard_sizes=[rows[name], dims[name]], placement=s.placement)
            for r, s in enumerate(shards)
        ]
        out[name] = dataclasses.replace(ps, sharding_spec=EnumerableShardingSpec(blocks))
    return out


class PartitionedCafeEmbeddingBagCollection(ShardedCafeBase):
    """Sharded ``CafeEmbeddingBagCollection`` whose rank r owns partition r of every table.

    Same ``KeyedTensor`` output as the other forms; ``cafe`` is this rank's partition (a
    ``CafeEmbeddingBagCollection`` of ``partition_tables(tables, W)``: its ``memory_report()`` is
    this rank's share). State dict: ``_embedding_bag_collection.*`` row-wise ShardedTensors of W
    blocks, ``_sketch.*`` this rank's sketch.
    """

    _blocks: torch.Tensor  # per module feature, its partition's local IDs ceil(N / W)

    def __init__(
        self,
        module: CafeEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        ebc_sharder: EmbeddingBagCollectionSharder,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__()
        world, self._rank = env.world_size, env.rank
        if env.process_group is None:
            raise ValueError("the partitioned form sends IDs to their owners: it needs a ShardingEnv with a process group")
        state_device = device if device is not None else torch.device("cpu")
        # First, before any collective: every rank must partition the same tables alike.
        if world > 1:
            check_same_on_all_ranks(module.describe(), env.process_group, "CafeEmbeddingBagCollection tables or CafeConfig", state_device)
        tables = module.embedding_bag_configs()
        cafe = CafeEmbeddingBagCollection(
            partition_tables(tables, world),
            module.is_weighted(),
            torch.device("meta"),  # its tables are replaced by the sharded ones below
            cafe=partition_cafe(tables, module.cafe_settings(), world),
        )
        local = cafe.physical_tables()
        rows = {c.name: c.num_embeddings for c in local.embedding_bag_configs()}
        dims = {c.name: c.embedding_dim for c in local.embedding_bag_configs()}
        plan = partition_plan(table_name_to_parameter_sharding, rows, dims, world)
        physical = EmbeddingBagCollection(
            [dataclasses.replace(c, num_embeddings=world * c.num_embeddings) for c in local.embedding_bag_configs()],
            is_weighted=local.is_weighted(),
            device=torch.device("meta"),
        )
        _copy_optimizer_marks(module.physical_tables(), physical)
        inner_fqn = f"{module_fqn}._embedding_bag_collection" if module_fqn else None
        sharded = ebc_sharder.shard(physical, plan, env, device, inner_fqn)
        # This module dists the raw IDs itself and feeds the sharded tables' compute, as TorchRec's
        # MC-EBC does with its inner EBC (same flag, same reason).
        sharded._has_uninitialized_input_dist = False
        cafe.install_sharded_tables(sharded, local_rows=True)
        cafe.follow(state_device)
        self._embedding_bag_collection = sharded
        self._own(cafe)
        (sharding,) = sharded._embedding_shardings  # one row-wise sharding (as MC-EBC reads it)
        names = [f for f, _ in cafe.embedding_features()]
        self._lookup_order = [names.index(f) for f in sharding.feature_names()]
        self._output_names, self._output_dims = sharding.embedding_names(), sharding.embedding_dims()
        blocks = torch.tensor([n for _, n in cafe.embedding_features()], dtype=torch.int64, device=state_device)
        self.register_buffer("_blocks", blocks, persistent=False)
        self._world, self._pg = world, env.process_group
        # Each rank's sketch is its own: in state dicts a ShardedTensor [W, *shape] of one slice
        # per rank (a plain tensor would be taken for a replica, and DCP keeps one copy of those).
        self._register_state_dict_hook(_sketch_as_sharded)
        self._register_load_state_dict_pre_hook(_sketch_from_sharded, with_module=True)
        self._dist = RwSparseFeaturesDist(
            pg=env.process_group,
            num_features=len(names),
            feature_hash_sizes=[world * n for _, n in cafe.embedding_features()],
            device=state_device,
            keep_original_indices=True,
        )

    def input_dist(
        self, ctx: CafeEmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """Validates, then sends every raw ID to its owner (routed as ``owner * blocks + local``)."""
        features = self.cafe.order_features(features)
        if features.variable_stride_per_key():
            raise ValueError("the partitioned form takes fixed-batch KJTs (variable-batch KJTs: use form='replicated')")
        blocks = value_blocks(features, self._blocks)
        owner, local = owner_and_local(features.values(), blocks, self._world)
        routed = kjt_like(features, features.keys(), owner * blocks + local, features.lengths(), features.weights_or_none())
        ctx.variable_batch_per_feature, ctx.inverse_indices = False, None
        ctx.sharding_contexts.append(
            EmbeddingShardingContext(batch_size_per_feature_pre_a2a=features.stride_per_key(), variable_batch_per_feature=False)
        )
        return KJTListSplitsAwaitable([self._dist(routed)], ctx)

    def compute(self, ctx: CafeEmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        """The owner's step: due sketch update and migration, remap, lookup in its row block."""
        received = dist_input[0]
        local = received.values() - self._rank * value_blocks(received, self._blocks)
        cafe = self.cafe
        physical, context = cafe.remap(kjt_like(received, received.keys(), local, received.lengths(), received.weights_or_none()), self.training)
        if context is not None:
            cafe.land_migration(context)
            ctx.cafe_context = context
        if self._lookup_order != list(range(len(self._lookup_order))):
            physical = physical.permute(self._lookup_order)
        output = self._embedding_bag_collection.compute(ctx, KJTList([physical]))
        if self.training and context is not None:
            pooled = KeyedTensor(keys=self._output_names, length_per_key=self._output_dims, values=output[0])
            cafe.track_importance(pooled, context)
        return output

    def output_dist(self, ctx: CafeEmbeddingBagCollectionContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        return self._embedding_bag_collection.output_dist(ctx, output)

    def compute_and_output_dist(self, ctx: CafeEmbeddingBagCollectionContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))


def _sketch_keys(module: PartitionedCafeEmbeddingBagCollection, prefix: str) -> List[str]:
    sketch = module.cafe.sketch
    return [] if sketch is None else [f"{prefix}_sketch.{name}" for name in sketch.state_dict()]


def _sketch_as_sharded(
    module: PartitionedCafeEmbeddingBagCollection, state: Dict[str, Any], prefix: str, _meta: Any
) -> None:
    for key in _sketch_keys(module, prefix):
        local = state[key].unsqueeze(0)
        shard = Shard.from_tensor_and_offsets(local, [module._rank] + [0] * (local.dim() - 1), module._rank)
        state[key] = init_from_local_shards([shard], [module._world, *local.shape[1:]], process_group=module._pg)


def _sketch_from_sharded(module: PartitionedCafeEmbeddingBagCollection, state: Dict[str, Any], prefix: str, *_: Any) -> None:
    for key in _sketch_keys(module, prefix):
        value = state.get(key)
        if isinstance(value, ShardedTensor):
            (shard,) = value.local_shards()
            state[key] = shard.tensor.squeeze(0)


# What ``apply_optimizer_in_backward`` marks a parameter with: TorchRec's sharder fuses it into the TBE.
_OPTIMIZER_MARKS = ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs")


def _copy_optimizer_marks(source: EmbeddingBagCollection, target: EmbeddingBagCollection) -> None:
    """The in-backward optimizer of each of ``source``'s tables, on ``target``'s table of that name."""
    for name, bag in source.embedding_bags.items():
        weight, resized = bag.weight, target.embedding_bags[name].weight
        for mark in _OPTIMIZER_MARKS:
            if hasattr(weight, mark):
                setattr(resized, mark, getattr(weight, mark))
