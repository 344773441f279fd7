"""CafeEmbeddingBagCollectionSharder and the sharded module it builds.

The physical tables (hot rows + shared rows, one per compressed logical table) are sharded by
TorchRec's own ``EmbeddingBagCollectionSharder`` (wrapped, not forked); the sketch stays a
replicated set of buffers under the same names as in the unsharded module. Raw IDs are remapped on
each rank's local batch *before* the input all-to-all, so every placement TorchRec offers for the
physical tables works, row-wise and data-parallel included.

``ShardedCafeEmbeddingBagCollection`` implements ``input_dist`` / ``compute_and_output_dist`` by
delegation, so ``TrainPipelineSparseDist`` pipelines it. ``input_dist`` applies the due sketch
update and remaps (on the pipeline's data-dist stream, one step ahead of the previous batch's
backward); the update's row migration lands in ``compute``, on the compute stream after that
backward, so no row is copied before its last gradient. With ``CafeConfig.pipeline_depth`` = the
pipeline's depth (1 for ``TrainPipelineSparseDist``) the pipelined run equals the unpipelined one.
"""

from typing import Any, Dict, List, Optional, Type

import torch
from torch import nn
from torchrec.distributed.embedding_types import (
    BaseEmbeddingSharder,
    EmbeddingComputeKernel,
    KJTList,
)
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, Topology
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    ModuleSharder,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
    ShardingType,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.distributed.base import CafeEmbeddingBagCollectionContext, ShardedCafeBase
from torchrec_cafe.distributed.partitioned import PartitionedCafeEmbeddingBagCollection
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection

_MODEL_PARALLEL_TYPES = [
    ShardingType.TABLE_WISE,
    ShardingType.COLUMN_WISE,
    ShardingType.TABLE_COLUMN_WISE,
    ShardingType.ROW_WISE,
    ShardingType.TABLE_ROW_WISE,
]
_SHARDING_TYPES = _MODEL_PARALLEL_TYPES + [ShardingType.DATA_PARALLEL]
FORMS = ("replicated", "partitioned")


class ShardedCafeEmbeddingBagCollection(ShardedCafeBase):
    """Sharded form of ``CafeEmbeddingBagCollection``: same ``KeyedTensor`` output, same state-dict
    names (``_embedding_bag_collection.*`` as ShardedTensors, ``_sketch.*`` replicated)."""

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
        # First, before any collective: every rank must shard the same tables and CAFE settings.
        module.replicate_across(env.process_group)
        inner_fqn = f"{module_fqn}._embedding_bag_collection" if module_fqn else None
        sharded = ebc_sharder.shard(module.physical_tables(), table_name_to_parameter_sharding, env, device, inner_fqn)
        # The unsharded module keeps the CAFE logic; it is not a child (its tables are replaced by
        # the sharded ones below), its sketch and remap constants are.
        module.install_sharded_tables(sharded)
        if device is not None:
            module.follow(device)
        self._embedding_bag_collection = sharded
        self._own([module])
        self._sketch, self._remapper = module.sketch, module.remapper

    def input_dist(
        self, ctx: CafeEmbeddingBagCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[KJTList]]:
        """Applies due updates (collective), remaps the local batch, then TorchRec's input dist."""
        cafe = self.cafe
        physical, context = cafe.remap(features, self.training)
        ctx.cafe_context = context
        return self._embedding_bag_collection.input_dist(ctx, physical)

    def compute(self, ctx: CafeEmbeddingBagCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        self._land_migration(ctx)
        return self._embedding_bag_collection.compute(ctx, dist_input)

    def output_dist(
        self, ctx: CafeEmbeddingBagCollectionContext, output: List[torch.Tensor]
    ) -> LazyAwaitable[KeyedTensor]:
        return self._with_importance(ctx, self._embedding_bag_collection.output_dist(ctx, output))

    def compute_and_output_dist(
        self, ctx: CafeEmbeddingBagCollectionContext, input: KJTList
    ) -> LazyAwaitable[KeyedTensor]:
        self._land_migration(ctx)
        return self._with_importance(ctx, self._embedding_bag_collection.compute_and_output_dist(ctx, input))

    def _land_migration(self, ctx: CafeEmbeddingBagCollectionContext) -> None:
        """The row copies of the update that preceded this batch's remap, before its lookup."""
        if ctx.cafe_context is not None:
            self.cafe.land_migration(ctx.cafe_context)

    def _with_importance(
        self, ctx: CafeEmbeddingBagCollectionContext, awaitable: LazyAwaitable[KeyedTensor]
    ) -> LazyAwaitable[KeyedTensor]:
        context = ctx.cafe_context
        if self.training and context is not None:

            def hook(kt: KeyedTensor) -> KeyedTensor:
                self.cafe.track_importance(kt, context)
                return kt

            awaitable.callbacks.append(hook)
        return awaitable


class CafeEmbeddingBagCollectionSharder(BaseEmbeddingSharder[CafeEmbeddingBagCollection]):
    """Shards ``CafeEmbeddingBagCollection``'s physical tables with TorchRec's EBC sharder.

    Offers table-, column-, table-column-, row- and table-row-wise placements with fused kernels
    on every device (row-wise ones run on CPU/gloo too), and data-parallel with the dense kernel.
    A data-parallel table is a full replica on every rank (its gradient all-reduced by DDP) and is
    stepped by the dense optimizer, not by ``apply_optimizer_in_backward`` (TorchRec drops that on
    dense kernels): hand that optimizer to ``cafe.attach_optimizer`` so that promotions copy its
    per-row state, identically on every rank.

    ``form``: ``"replicated"`` (default): every rank holds the whole sketch and remaps its own batch
    before TorchRec's input dist (every placement above); ``"partitioned"``: row-wise plans only,
    the tables are cut into ``partitions`` hash partitions (default: the world size W; a multiple
    of W), each with its own sketch and rows within ``1 / P`` of the budget; rank r owns P / W of
    them and remaps the IDs sent to it (``PartitionedCafeEmbeddingBagCollection``). Checkpoints of
    a partitioned model load into any W dividing P: pick P for the largest W it will run on.

    Example::

        dmp = DistributedModelParallel(model, sharders=[CafeEmbeddingBagCollectionSharder(),
                                                        EmbeddingBagCollectionSharder()])
        # with data-parallel CAFE tables: the optimizer stepping them (e.g. TorchRec's
        # in_backward_optimizer_filter(dmp.named_parameters()) set) must be attached
        sharded_cafe.cafe.attach_optimizer(dense_optimizer)
    """

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
        form: str = "replicated",
        partitions: Optional[int] = None,
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if partitions is not None and (form != "partitioned" or partitions < 1):
            raise ValueError(f"partitions={partitions} needs form='partitioned' and must be >= 1")
        super().__init__(fused_params, qcomm_codecs_registry)
        self._form, self._partitions = form, partitions
        self._ebc_sharder = EmbeddingBagCollectionSharder(fused_params, qcomm_codecs_registry)

    def shard(  # type: ignore[override]  # TorchRec declares ModuleSharder.shard an abstractclassmethod
        self,
        module: CafeEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedCafeBase:
        tables = set(self.shardable_parameters(module))
        unknown = sorted(set(params) - tables)
        if unknown:
            raise ValueError(f"the plan names tables {unknown} that {type(module).__name__} does not have ({sorted(tables)})")
        device_type = device.type if device else "cpu"
        for name, sharding in params.items():
            if sharding.sharding_type not in self.sharding_types(device_type):
                raise ValueError(
                    f"table {name!r}: sharding type {sharding.sharding_type!r} is not supported by CAFE's {self._form} "
                    f"form (it offers {self.sharding_types(device_type)})"
                )
            # Migrations find rows by kernel: fused tables in their TBE, dense ones as full replicas.
            dense = sharding.compute_kernel == EmbeddingComputeKernel.DENSE.value
            if dense != (sharding.sharding_type == ShardingType.DATA_PARALLEL.value):
                raise ValueError(
                    f"table {name!r}: compute kernel {sharding.compute_kernel!r} with sharding type "
                    f"{sharding.sharding_type!r} is not supported by CAFE (dense goes with data_parallel only)"
                )
        if self._form == "partitioned":
            return PartitionedCafeEmbeddingBagCollection(module, params, env, self._ebc_sharder, device, module_fqn, self._partitions)
        return ShardedCafeEmbeddingBagCollection(module, params, env, self._ebc_sharder, device, module_fqn)

    def shardable_parameters(self, module: CafeEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        return self._ebc_sharder.shardable_parameters(module.physical_tables())

    @property
    def module_type(self) -> Type[CafeEmbeddingBagCollection]:
        return CafeEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        if self._form == "partitioned":
            return [ShardingType.ROW_WISE.value]
        return [t.value for t in _SHARDING_TYPES]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if sharding_type == ShardingType.DATA_PARALLEL.value:
            return [EmbeddingComputeKernel.DENSE.value]
        return ["fused", "fused_uvm"] if compute_device_type == "cuda" else ["fused"]


class RowWiseEverywhereEBCSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EBC sharder, also offering row-wise placements on CPU, where they run on gloo
    (TorchRec lists them for CUDA only). For plain EBCs next to CAFE ones in CPU jobs and tests."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return [t.value for t in _MODEL_PARALLEL_TYPES]


class CafeStorageReservation(HeuristicalStorageReservation):
    """TorchRec's heuristic reservation plus every CAFE sketch's bytes on every device (the sketch
    is replicated; the 1.8 planner never asks sharders for such state)."""

    def reserve(
        self,
        topology: Topology,
        batch_size: int,
        module: nn.Module,
        sharders: List[ModuleSharder[nn.Module]],
        constraints: Optional[Dict[str, ParameterConstraints]] = None,
    ) -> Topology:
        topology = super().reserve(topology, batch_size, module, sharders, constraints)
        sketch = sum(m.sketch.nbytes() for m in module.modules() if isinstance(m, CafeEmbeddingBagCollection) and m.sketch is not None)
        for device in topology.devices:
            if topology.compute_device == "cuda":
                device.storage.hbm -= sketch
            else:
                device.storage.ddr -= sketch
        return topology
