"""Serving a trained CAFE model without the training machinery.

``export_for_inference`` turns a trained ``CafeEmbeddingBagCollection`` into a
``CafeInferenceEBC``: a plain TorchRec ``EmbeddingBagCollection`` over the physical rows (hot rows,
then shared rows, per table) plus a frozen id -> row map. The map holds, per compressed table, the
sorted IDs that were hot (their hot row) or medium (multi-level: two shared rows) when exported;
every other ID reads its hashed shared row, exactly as the trained module's remap does. There is
no sketch, no scoring and no migration: outputs equal the trained module's in ``eval()`` mode.

The result is TorchScript-able (``torch.jit.script``), the form TorchRec's inference stack uses.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
import torch.distributed.checkpoint as dcp
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.checkpoint import CheckpointLoadPlanner, verified_manifest
from torchrec_cafe.config import CafeConfig
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.remap import SECOND_SEED, SHARED_SEED
from torchrec_cafe.sketch.hashing import finalise64, seed_offset
from torchrec_cafe.sketch.hot_sketch import EMPTY

_MEDIUM = -1  # frozen map value of a medium (not hot) ID; a literal in TorchScript code


class CafeInferenceEBC(nn.Module):
    """Frozen CAFE lookup: raw-ID KJT -> pooled ``KeyedTensor``, like the trained module in eval.

    Per feature f (module feature order): plain tables read row ``id % N_f``; compressed tables look
    the ID up in their segment of the frozen map (``map_ids`` sorted within each table, ``map_rows``
    the hot row or ``-1`` for medium) and otherwise read ``H + hash1(id) % S``; medium IDs of
    multi-level tables read ``H + hash1(id) % S`` and ``H + hash2(id) % S``.
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        feature_names: List[str],
        feature_table: List[int],
        num_rows: List[int],
        num_hot: List[int],
        num_shared: List[int],
        multi_level: List[bool],
        mean_as_weights: List[bool],
        map_ids: torch.Tensor,
        map_rows: torch.Tensor,
        map_offsets: List[int],
        is_weighted: bool,
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self._feature_names = feature_names
        self._feature_table = feature_table
        self._num_rows = num_rows
        self._num_hot = num_hot
        self._num_shared = num_shared
        self._multi_level = multi_level
        self._mean_as_weights = mean_as_weights
        self._map_offsets = map_offsets
        self._is_weighted = is_weighted
        self._weighted_out = is_weighted or any(mean_as_weights)
        self._seed1 = seed_offset(SHARED_SEED)  # TorchScript has no big ints: offsets precomputed
        self._seed2 = seed_offset(SECOND_SEED)
        self.register_buffer("map_ids", map_ids)
        self.register_buffer("map_rows", map_rows)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        keys = features.keys()
        if keys != self._feature_names:
            features = features.permute([keys.index(k) for k in self._feature_names])
        values = features.values().to(torch.int64)
        lengths = features.lengths()
        offsets = features.offset_per_key()
        stride = features.stride()
        rows: List[torch.Tensor] = []
        counts: List[torch.Tensor] = []
        weights: List[torch.Tensor] = []
        for f in range(len(self._feature_names)):
            ids = values[offsets[f] : offsets[f + 1]]
            bag_lengths = lengths[f * stride : (f + 1) * stride]
            first, second = self._rows(f, ids)
            w = torch.ones_like(ids, dtype=torch.float32)
            if self._is_weighted:
                w = features.weights()[offsets[f] : offsets[f + 1]]
            if self._mean_as_weights[f]:
                w = w / torch.repeat_interleave(bag_lengths.clamp(min=1), bag_lengths).to(w.dtype)
            # A medium ID's embedding is the sum of two shared rows: its bag gets a second entry.
            keep = torch.stack([torch.ones_like(second, dtype=torch.bool), second >= 0], dim=1)
            rows.append(torch.stack([first, second], dim=1)[keep])
            weights.append(w.unsqueeze(1).expand(-1, 2)[keep])
            bag = torch.repeat_interleave(torch.arange(stride, device=ids.device), bag_lengths)
            counts.append(torch.zeros_like(bag_lengths).index_add_(0, bag, keep.sum(dim=1).to(bag_lengths.dtype)))
        physical = KeyedJaggedTensor(
            keys=self._feature_names,
            values=torch.cat(rows),
            lengths=torch.cat(counts),
            weights=torch.cat(weights) if self._weighted_out else None,
            stride=stride,
        )
        return self.embedding_bag_collection(physical)

    def _rows(self, f: int, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(row of each ID [n], its second shared row or -1 [n]) for feature ``f``."""
        none = torch.full_like(ids, -1)
        t = self._feature_table[f]
        if t < 0:
            return torch.remainder(ids, self._num_rows[f]), none
        lo, hi = self._map_offsets[t], self._map_offsets[t + 1]
        shared = self._num_hot[f] + torch.remainder(finalise64(ids + self._seed1), self._num_shared[f])
        if hi == lo:
            return shared, none
        keys = self.map_ids[lo:hi]
        pos = torch.searchsorted(keys, ids).clamp(max=hi - lo - 1)
        found = keys[pos] == ids
        value = torch.where(found, self.map_rows[lo:hi][pos], torch.full_like(ids, -2))  # -2: cold
        first = torch.where(value >= 0, value, shared)
        if not self._multi_level[f]:
            return first, none
        second = self._num_hot[f] + torch.remainder(finalise64(ids + self._seed2), self._num_shared[f])
        return first, torch.where(value == -1, second, none)  # -1: medium

    def nbytes(self) -> Dict[str, int]:
        """Bytes of the served form: the physical tables and the frozen map."""
        tables = sum(p.numel() * p.element_size() for p in self.embedding_bag_collection.parameters())
        frozen = sum(b.numel() * b.element_size() for b in (self.map_ids, self.map_rows))
        return {"table_bytes": tables, "map_bytes": frozen, "total_bytes": tables + frozen}


@torch.no_grad()
def export_for_inference(module: CafeEmbeddingBagCollection, device: Optional[torch.device] = None) -> CafeInferenceEBC:
    """Freezes a trained, unsharded ``CafeEmbeddingBagCollection`` into a ``CafeInferenceEBC``.

    The module is not changed. A model trained under ``DistributedModelParallel`` is exported by
    loading its checkpoint into an unsharded model first (``checkpoint.load`` reshards to one
    process). Scores stashed since the last update are not applied: as in the trained module's
    ``eval()`` mode, the sketch is used as it stands.
    """
    inner = module._embedding_bag_collection
    if not isinstance(inner, EmbeddingBagCollection):
        raise ValueError(
            "export_for_inference needs an unsharded CafeEmbeddingBagCollection; load the "
            "checkpoint of a sharded model into an unsharded one (torchrec_cafe.checkpoint.load) first"
        )
    device = device or next(inner.parameters()).device
    layouts, remapper = module._layouts, module._remapper
    ebc = EmbeddingBagCollection(
        tables=[l.physical_config() for l in layouts], is_weighted=remapper.weighted_out, device=device
    )
    ebc.load_state_dict(inner.state_dict())
    per_feature = [(l, t) for l in layouts for t in [_sketch_table(module, l)] for _ in l.config.feature_names]
    map_ids, map_rows, map_offsets = _frozen_map(module)
    return CafeInferenceEBC(
        embedding_bag_collection=ebc,
        feature_names=list(module._feature_names),
        feature_table=[t for _, t in per_feature],
        num_rows=[l.config.num_embeddings for l, _ in per_feature],
        num_hot=[l.budget.num_hot for l, _ in per_feature],
        num_shared=[max(l.budget.num_shared, 1) for l, _ in per_feature],
        multi_level=[l.multi_level for l, _ in per_feature],
        mean_as_weights=[l.mean_as_weights for l, _ in per_feature],
        map_ids=map_ids.to(device),
        map_rows=map_rows.to(device),
        map_offsets=map_offsets,
        is_weighted=module.is_weighted(),
    )


def load_for_inference(path: str) -> Dict[str, CafeInferenceEBC]:
    """Serving forms of every CAFE module of a checkpoint (``checkpoint.save``), keyed by state-dict
    prefix, built from the manifest alone: no model code, no process group, any saved world size.

    The checkpoint is verified first (``ValueError`` when incomplete or damaged).
    """
    manifest = verified_manifest(path)
    served = {}
    for prefix, description in zip(manifest["prefixes"], manifest["modules"]):
        module = _module_from_description(description)
        state = {f"model.{prefix}{k}": v for k, v in module.state_dict().items()}
        dcp.load(state, checkpoint_id=path, planner=CheckpointLoadPlanner(), no_dist=True)
        module.load_state_dict({k[len(f"model.{prefix}") :]: v for k, v in state.items()})
        served[prefix.rstrip(".")] = export_for_inference(module.eval())
    return served


def _module_from_description(tables: List[Dict[str, object]]) -> CafeEmbeddingBagCollection:
    """An untrained module with the tables and CAFE settings of a manifest entry."""
    configs = [
        EmbeddingBagConfig(
            name=t["name"],
            num_embeddings=t["num_embeddings"],
            embedding_dim=t["embedding_dim"],
            feature_names=list(t["feature_names"]),
            data_type=DataType[str(t["data_type"]).split(".")[-1]],
            pooling=PoolingType[str(t["pooling"]).split(".")[-1]],
        )
        for t in tables
    ]
    cafe = {t["name"]: CafeConfig(**t["cafe"]) for t in tables if t["cafe"] is not None}
    return CafeEmbeddingBagCollection(configs, cafe, is_weighted=bool(tables[0].get("is_weighted", False)))


def _sketch_table(module: CafeEmbeddingBagCollection, layout: object) -> int:
    return next((t for t, l in enumerate(module._compressed) if l is layout), -1)


def _frozen_map(module: CafeEmbeddingBagCollection) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Every tracked ID that is hot or (multi-level) medium, sorted by (table, id): ids [M], row or
    -1 for medium [M], and the per-table offsets [T + 1]."""
    sketch = module._sketch
    if sketch is None:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), [0]
    k = sketch.num_buckets
    tracked = sketch.slot_hot[:k] != EMPTY
    tables = sketch._table_of_bucket[:k].to(torch.int64).unsqueeze(1).expand_as(tracked)[tracked]
    ids = sketch.slot_ids[:k][tracked]
    hot, medium = sketch.lookup(ids, tables, module._remapper.medium_level)
    medium = medium & module._remapper.table_multi_level.index_select(0, tables)
    keep = (hot >= 0) | medium
    ids, tables, rows = ids[keep], tables[keep], torch.where(hot >= 0, hot, torch.full_like(hot, _MEDIUM))[keep]
    order = torch.sort(ids, stable=True).indices
    order = order[torch.sort(tables[order], stable=True).indices]
    counts = torch.bincount(tables, minlength=sketch.num_tables).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return ids[order].cpu(), rows[order].cpu(), offsets
