"""What both sharded forms of ``CafeEmbeddingBagCollection`` share: the pipeline context and the
module surface (CAFE's reporting, DMP's contracts). The forms differ in where IDs are remapped:
the replicated form (``sharder.py``) before TorchRec's input dist, the partitioned form
(``partitioned.py``) on the rank that owns them, after it."""

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Type

import torch
from torchrec.distributed.embedding_types import KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionContext, ShardedEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.remap import RemapContext


@dataclass
class CafeEmbeddingBagCollectionContext(EmbeddingBagCollectionContext):
    """TorchRec's EBC context plus what the remap of this batch saw (read when the output
    awaitable resolves, to hook the importance scores); ``record_stream`` covers both, since the
    pipeline remaps on its data-dist stream and the scores are taken on the compute stream."""

    cafe_context: Optional[RemapContext] = None

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.cafe_context is not None:
            self.cafe_context.record_stream(stream)


class ShardedCafeBase(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, CafeEmbeddingBagCollectionContext]
):
    """A sharded CAFE module: ``cafe`` is the CAFE logic on this rank (not a child: its tables
    are the sharded ones, its sketch and remap constants are children of the sharded module).
    Subclasses set ``cafe`` with ``_own(cafe)`` and ``_embedding_bag_collection``."""

    _embedding_bag_collection: ShardedEmbeddingBagCollection

    def _own(self, cafe: CafeEmbeddingBagCollection) -> None:
        self.__dict__["_cafe"] = cafe
        self._sketch = cafe.sketch
        self._remapper = cafe.remapper
        # As the unsharded module: snapshots include the pending step (a collective in the
        # replicated form: every rank calls state_dict, as DCP's save does), loads drop this
        # module's own pending scores.
        self.register_state_dict_pre_hook(_apply_pending_before_save)
        self.register_load_state_dict_post_hook(_discard_pending_after_load)

    @property
    def cafe(self) -> CafeEmbeddingBagCollection:
        """The CAFE logic (``memory_report()``, ``stats()``, ``apply_pending_updates()``)."""
        return self.__dict__["_cafe"]

    def apply_pending_updates(self) -> None:
        """Sketch update and migrations of the scores stashed so far (a collective in the
        replicated form)."""
        self.cafe.apply_pending_updates()

    def memory_report(self) -> Dict[str, Dict[str, float]]:
        return self.cafe.memory_report()

    def stats(self) -> Dict[str, Dict[str, float]]:
        return self.cafe.stats()

    def create_context(self) -> CafeEmbeddingBagCollectionContext:
        return CafeEmbeddingBagCollectionContext()

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        # Keeps DDP off the tables and the sketch alike (DDP would broadcast rank 0's buffers;
        # the sketch keeps itself consistent).
        for name, _ in self.named_parameters(prefix=prefix):
            yield name
        for name, _ in self.named_buffers(prefix=prefix):
            yield name

    @property
    def fused_optimizer(self) -> Any:
        return self._embedding_bag_collection.fused_optimizer

    @property
    def unsharded_module_type(self) -> Type[CafeEmbeddingBagCollection]:
        return CafeEmbeddingBagCollection


def _apply_pending_before_save(sharded: ShardedCafeBase, _prefix: str, _keep_vars: bool) -> None:
    sharded.cafe.apply_pending_updates()


def _discard_pending_after_load(sharded: ShardedCafeBase, _incompatible: object) -> None:
    sharded.cafe.discard_pending()  # a named function: modules with hooks must stay picklable
