"""What both sharded forms of ``CafeEmbeddingBagCollection`` share: the pipeline context and the
module surface (CAFE's reporting, DMP's contracts). The forms differ in where IDs are remapped:
the replicated form (``sharder.py``) before TorchRec's input dist, the partitioned form
(``partitioned.py``) on the rank that owns them, after it."""

from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Type

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
    """A sharded CAFE module: ``partitions`` is the CAFE logic on this rank (one module in the
    replicated form; the rank's partitions in the partitioned form). They are not children: their
    tables are the sharded ones, and their sketches and remap constants are registered by the
    subclass. Subclasses call ``_own(partitions)`` and set ``_embedding_bag_collection``."""

    _embedding_bag_collection: ShardedEmbeddingBagCollection

    def _own(self, partitions: List[CafeEmbeddingBagCollection]) -> None:
        self.__dict__["_partitions"] = list(partitions)
        # As the unsharded module: snapshots include the pending step (a collective in the
        # replicated form: every rank calls state_dict, as DCP's save does), loads drop this
        # module's own pending scores.
        self.register_state_dict_pre_hook(_apply_pending_before_save)
        self.register_load_state_dict_post_hook(_discard_pending_after_load)

    @property
    def partitions(self) -> List[CafeEmbeddingBagCollection]:
        """The CAFE logic on this rank, one module per partition it owns (one when replicated)."""
        return self.__dict__["_partitions"]

    @property
    def cafe(self) -> CafeEmbeddingBagCollection:
        """The CAFE logic (``memory_report()``, ``stats()``, ``apply_pending_updates()``) of a rank
        that holds one module; ``ValueError`` when it holds several partitions (see ``partitions``)."""
        if len(self.partitions) != 1:
            raise ValueError(f"this rank holds {len(self.partitions)} CAFE partitions: use .partitions")
        return self.partitions[0]

    def apply_pending_updates(self) -> None:
        """Sketch update and migrations of the scores stashed so far (a collective in the
        replicated form)."""
        for cafe in self.partitions:
            cafe.apply_pending_updates()

    def memory_report(self) -> Dict[str, Dict[str, float]]:
        """Per logical table, this rank's bytes and rows (its partitions' together)."""
        return _combine([p.memory_report() for p in self.partitions], _REPORT_CONSTANTS)

    def stats(self) -> Dict[str, Dict[str, float]]:
        """Per sketched table, this rank's counters (its partitions' together; the hot-hit rate
        their mean)."""
        out = _combine([p.stats() for p in self.partitions], ("updates",))
        for row in out.values():
            if "hot_hit_rate" in row:
                row["hot_hit_rate"] /= len(self.partitions)
        return out

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


# Per-table entries of a memory report that are the same in every partition (not summed).
_REPORT_CONSTANTS = ("compressed", "sketched", "row_bytes")


def _combine(reports: List[Dict[str, Dict[str, Any]]], constants: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per table, the sum over ``reports`` of each entry but ``constants`` (taken from the first);
    a ``compression_ratio`` entry is recomputed from the summed bytes."""
    if len(reports) == 1:
        return reports[0]
    out: Dict[str, Dict[str, Any]] = {}
    for name, first in reports[0].items():
        row = {k: v if k in constants else sum(r[name][k] for r in reports) for k, v in first.items()}
        if "compression_ratio" in row:
            row["compression_ratio"] = row["logical_bytes"] / row["total_bytes"]
        out[name] = row
    return out


def _apply_pending_before_save(sharded: ShardedCafeBase, _prefix: str, _keep_vars: bool) -> None:
    sharded.apply_pending_updates()


def _discard_pending_after_load(sharded: ShardedCafeBase, _incompatible: object) -> None:
    for cafe in sharded.partitions:  # a named function: modules with hooks must stay picklable
        cafe.discard_pending()
