"""CafeEmbeddingCollectionSharder and its sharded module: the unpooled CAFE module sharded as its
bag module is (it owns a ``ShardedCafeEmbeddingBagCollection`` built by the bag sharder and turns
the raw KJT into single-ID bags before, and the pooled output into JaggedTensors after)."""

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Type, cast

import torch
from torch import nn
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, KJTList, ShardedEmbeddingModule
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    QuantizedCommCodecs,
    ShardingEnv,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.distributed.sharder import CafeEmbeddingBagCollectionContext, CafeEmbeddingBagCollectionSharder
from torchrec_cafe.modules.cafe_embedding import CafeEmbeddingCollection, ids_as_bags, jagged_outputs
from torchrec_cafe.modules.inputs import check_kjt


@dataclass
class CafeEmbeddingCollectionContext(CafeEmbeddingBagCollectionContext):
    """The bag module's context plus the raw batch (its lengths and IDs shape the outputs) and the
    IDs per key (host ints)."""

    features: Optional[KeyedJaggedTensor] = None
    ids_per_key: List[int] = field(default_factory=list)

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.features is not None:
            self.features.record_stream(cast(torch.cuda.Stream, stream))  # TorchRec types it CUDA-only


class ShardedCafeEmbeddingCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], Dict[str, JaggedTensor], CafeEmbeddingCollectionContext]
):
    """Sharded ``CafeEmbeddingCollection``: same outputs, same state-dict names (``bags.*``)."""

    def __init__(
        self,
        module: CafeEmbeddingCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        bag_sharder: CafeEmbeddingBagCollectionSharder,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.bags = bag_sharder.shard(module.bags, params, env, device, f"{module_fqn}.bags" if module_fqn else None)
        self._inputs = module.input_features()
        self._need_indices = module.need_indices()

    def create_context(self) -> CafeEmbeddingCollectionContext:
        return CafeEmbeddingCollectionContext()

    def input_dist(self, ctx: CafeEmbeddingCollectionContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        check_kjt(features)
        bags, ctx.ids_per_key = ids_as_bags(features)
        ctx.features = features
        return self.bags.input_dist(ctx, bags)

    def compute(self, ctx: CafeEmbeddingCollectionContext, dist_input: KJTList) -> List[torch.Tensor]:
        return self.bags.compute(ctx, dist_input)

    def output_dist(self, ctx: CafeEmbeddingCollectionContext, output: List[torch.Tensor]) -> LazyAwaitable[Dict[str, JaggedTensor]]:
        return self._as_jagged(ctx, self.bags.output_dist(ctx, output))

    def compute_and_output_dist(self, ctx: CafeEmbeddingCollectionContext, input: KJTList) -> LazyAwaitable[Dict[str, JaggedTensor]]:
        return self._as_jagged(ctx, self.bags.compute_and_output_dist(ctx, input))

    def _as_jagged(self, ctx: CafeEmbeddingCollectionContext, awaitable: LazyAwaitable[KeyedTensor]) -> Any:
        features, per_key = ctx.features, ctx.ids_per_key
        assert features is not None  # set by input_dist

        def to_jagged(kt: KeyedTensor) -> Dict[str, JaggedTensor]:
            return jagged_outputs(kt, features, per_key, self._inputs, self._need_indices)

        # Callbacks run in order when the output is waited for: after the bag module's importance
        # hook, this one changes the result's type (TorchRec types callbacks as KT -> KT).
        callbacks: List[Any] = awaitable.callbacks
        callbacks.append(to_jagged)
        return awaitable

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        return self.bags.sharded_parameter_names(prefix=f"{prefix}.bags" if prefix else "bags")

    @property
    def fused_optimizer(self) -> Any:
        return self.bags.fused_optimizer

    @property
    def cafe(self) -> Any:
        """The bag module's CAFE logic (``memory_report()``, ``stats()``, ``apply_pending_updates()``)."""
        return self.bags.cafe

    @property
    def unsharded_module_type(self) -> Type[CafeEmbeddingCollection]:
        return CafeEmbeddingCollection


class CafeEmbeddingCollectionSharder(BaseEmbeddingSharder[CafeEmbeddingCollection]):
    """Shards ``CafeEmbeddingCollection``'s physical tables with the placements and kernels of
    ``CafeEmbeddingBagCollectionSharder`` (TorchRec's EC sharder's, plus table-column-wise)."""

    def __init__(
        self,
        fused_params: Optional[Dict[str, Any]] = None,
        qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None,
    ) -> None:
        super().__init__(fused_params, qcomm_codecs_registry)
        self._bag_sharder = CafeEmbeddingBagCollectionSharder(fused_params, qcomm_codecs_registry)

    def shard(  # type: ignore[override]  # TorchRec declares ModuleSharder.shard an abstractclassmethod
        self,
        module: CafeEmbeddingCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> ShardedCafeEmbeddingCollection:
        return ShardedCafeEmbeddingCollection(module, params, env, self._bag_sharder, device, module_fqn)

    def shardable_parameters(self, module: CafeEmbeddingCollection) -> Dict[str, nn.Parameter]:
        return self._bag_sharder.shardable_parameters(module.bags)

    @property
    def module_type(self) -> Type[CafeEmbeddingCollection]:
        return CafeEmbeddingCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return self._bag_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return self._bag_sharder.compute_kernels(sharding_type, compute_device_type)
