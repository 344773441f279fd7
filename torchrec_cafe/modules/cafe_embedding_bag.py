"""CafeEmbeddingBagCollection: a drop-in EmbeddingBagCollection under a per-table memory budget."""

from typing import Dict, List, Mapping, Optional, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType, data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.config import CafeConfig, table_budget
from torchrec_cafe.remap import SECOND_SEED, TableLayout, TableRemap, remap_kjt, shared_rows
from torchrec_cafe.rows import RowShard, migrate_rows, parameter_shards, tbe_shards
from torchrec_cafe.sketch.hot_sketch import HotSketch


def _normalised_scores(norms: torch.Tensor, feature: torch.Tensor, num_features: int) -> torch.Tensor:
    """Official CAFE scaling: per feature, ``norm * n / sum(norm)`` so the mean score is 1.

    Non-finite norms stay non-finite (the sketch drops them) and do not enter the sums, so one bad
    gradient cannot poison the other occurrences' scores.
    """
    finite = torch.isfinite(norms)
    clean = torch.where(finite, norms, torch.zeros_like(norms))
    total = torch.zeros(num_features, dtype=norms.dtype, device=norms.device).index_add_(0, feature, clean)
    count = torch.zeros(num_features, dtype=norms.dtype, device=norms.device).index_add_(
        0, feature, finite.to(norms.dtype)
    )
    scale = torch.where(total > 0, count / total, torch.zeros_like(total))
    return torch.where(finite, norms * scale[feature], norms)


class CafeEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """EmbeddingBagCollection whose tables keep only their hot IDs' rows unique.

    Same constructor tables, same ``KeyedTensor`` output (keys, order, dims) and same
    ``embedding_bag_configs()`` as ``EmbeddingBagCollection(tables, is_weighted)``; each table named
    in ``cafe`` is stored as ``H`` hot rows + ``S`` shared rows + a HotSketch within
    ``num_embeddings * dim * bytes / compression_ratio`` bytes.

    Lifecycle of one training step: ``forward`` applies the scores pending from the previous
    backward (sketch update + row migrations), remaps raw IDs with the sketch, runs the inner
    ``EmbeddingBagCollection`` and hooks the output gradient; backward stashes one score per
    occurrence. State never changes inside backward. ``eval()`` freezes the sketch: no scores, no
    updates, same remap. Call ``apply_pending_updates()`` to apply the last step's scores
    explicitly (e.g. before a checkpoint).

    Args:
        tables: logical tables, exactly as for ``EmbeddingBagCollection``.
        cafe: one ``CafeConfig`` for every table, or a dict table name -> ``CafeConfig`` (tables not
            named stay plain).
        is_weighted: whether input KJTs carry per-id weights.
        device: where tables and sketches live.

    Example::

        ebc = CafeEmbeddingBagCollection(tables, CafeConfig(compression_ratio=100))
        kt = ebc(kjt)  # KeyedTensor, same as EmbeddingBagCollection(tables)(kjt)
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        cafe: Union[CafeConfig, Mapping[str, CafeConfig]],
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        torch._C._log_api_usage_once(f"torchrec_cafe.{type(self).__name__}")
        self._logical_configs = list(tables)
        self._is_weighted = is_weighted
        self._layouts = _layouts(tables, cafe, is_weighted)
        self._inner_weighted = is_weighted or any(l.mean_as_weights for l in self._layouts)
        self._embedding_bag_collection = EmbeddingBagCollection(
            tables=[l.physical_config() for l in self._layouts],
            is_weighted=self._inner_weighted,
            device=device,
        )
        self._sketches = nn.ModuleDict(
            {
                l.config.name: HotSketch(
                    num_buckets=l.budget.num_buckets,
                    num_hot=l.budget.num_hot,
                    threshold=l.cafe.threshold,
                    slots_per_bucket=l.cafe.slots_per_bucket,
                    decay=l.cafe.decay,
                    quarantine=l.cafe.quarantine,
                    device=device,
                )
                for l in self._layouts
                if l.compressed
            }
        )
        self._feature_names = [f for l in self._layouts for f in l.config.feature_names]
        self._feature_set = set(self._feature_names)
        self._pending: Dict[str, List["tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]"]] = {}
        self._last_remap: Dict[str, TableRemap] = {}
        self._optimizer: Optional[torch.optim.Optimizer] = None

    # ------------------------------------------------------------------ EBC interface

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._logical_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Lets promotions copy the optimizer state of plain torch optimizers (unsharded use).

        Not needed under ``DistributedModelParallel``: fused optimizer state lives in the tables.
        """
        self._optimizer = optimizer

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Raw-ID KJT (any key order, any int64 ids) -> pooled ``KeyedTensor`` [B, sum(dims)]."""
        features = self._check_and_order(features)
        if self.training:
            self.apply_pending_updates()
        if features.stride() == 0:
            return self._empty_output(features.values().device)
        physical, seen = remap_kjt(
            features, self._layouts, dict(self._sketches.items()), self._inner_weighted
        )
        self._last_remap = seen
        kt = self._embedding_bag_collection(physical)
        if self.training and seen:
            self._track_importance(kt, seen, features.stride())
        return kt

    def _empty_output(self, device: torch.device) -> KeyedTensor:
        """A batch of 0 samples (which TorchRec's EBC cannot pool) gives [0, sum(dims)]."""
        dims = [c.embedding_dim for l in self._layouts for c in [l.config] for _ in c.feature_names]
        return KeyedTensor(keys=self._feature_names, length_per_key=dims, values=torch.zeros(0, sum(dims), device=device))

    # ------------------------------------------------------------------ validation

    def _check_and_order(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        if keys != self._feature_names:
            unknown = [k for k in keys if k not in self._feature_set]
            if unknown:
                raise ValueError(f"KJT has unknown feature keys {unknown}; expected {self._feature_names}")
            missing = [k for k in self._feature_names if k not in set(keys)]
            if missing:
                raise ValueError(f"KJT is missing feature keys {missing}; expected {self._feature_names}")
            if len(keys) != len(self._feature_names):
                raise ValueError(f"KJT has duplicate feature keys: {keys}")
            features = features.permute([keys.index(k) for k in self._feature_names])
        if self._is_weighted and features.weights_or_none() is None:
            raise ValueError("module is_weighted=True but the KJT has no weights")
        if not self._is_weighted and features.weights_or_none() is not None:
            # EmbeddingBagCollection(is_weighted=False) ignores weights; so do we.
            features = KeyedJaggedTensor(
                keys=features.keys(), values=features.values(), lengths=features.lengths(), stride=features.stride()
            )
        return features

    # ------------------------------------------------------------------ importance

    def _track_importance(self, kt: KeyedTensor, seen: Dict[str, TableRemap], batch: int) -> None:
        values = kt.values()
        frequency = {n for n in seen if self._layout(n).cafe.importance == "frequency"}
        for name in frequency:
            r = seen[name]
            self._stash(name, r.ids, torch.ones_like(r.ids, dtype=torch.float32), r.medium)
        grad_tables = {n: r for n, r in seen.items() if n not in frequency}
        if not grad_tables or not values.requires_grad:
            return
        columns = self._feature_columns(kt)
        values.register_hook(lambda g: self._on_output_grad(g, grad_tables, columns, batch))

    def _feature_columns(self, kt: KeyedTensor) -> Dict[str, "tuple[int, int]"]:
        starts = kt.offset_per_key()
        return {k: (starts[i], starts[i + 1]) for i, k in enumerate(kt.keys())}

    def _on_output_grad(
        self,
        grad: torch.Tensor,
        tables: Dict[str, TableRemap],
        columns: Dict[str, "tuple[int, int]"],
        batch: int,
    ) -> None:
        """Per-occurrence score = ||d loss / d pooled bag|| * |weight| (/ len for MEAN), then
        rescaled to mean 1 per feature. Stashes scores only; state changes at the next step."""
        with torch.no_grad():
            for name, r in tables.items():
                feats = self._layout(name).config.feature_names
                bag_norms = torch.cat([grad[:, slice(*columns[f])].norm(dim=1) for f in feats])
                norms = bag_norms.float()[r.bag]
                if r.factor is not None:
                    norms = norms * r.factor
                feature = torch.div(r.bag, max(batch, 1), rounding_mode="floor")
                self._stash(name, r.ids, _normalised_scores(norms, feature, len(feats)), r.medium)

    def _stash(
        self, name: str, ids: torch.Tensor, scores: torch.Tensor, medium: Optional[torch.Tensor]
    ) -> None:
        self._pending.setdefault(name, []).append((ids.detach(), scores.detach(), medium))

    # ------------------------------------------------------------------ updates and migration

    @torch.no_grad()
    def apply_pending_updates(self) -> None:
        """Feeds the stashed scores to each sketch and migrates promoted IDs' rows."""
        pending, self._pending = self._pending, {}
        for name, parts in pending.items():
            ids = torch.cat([p[0] for p in parts])
            scores = torch.cat([p[1] for p in parts])
            update = self._sketches[name].update(ids, scores)
            medium = None
            if parts[0][2] is not None:
                medium = _medium_of(update.promoted_ids, ids, torch.cat([p[2] for p in parts]))
            self._migrate(name, update.promoted_ids, update.promoted_hot, update.promoted, medium)

    def _migrate(
        self,
        name: str,
        ids: torch.Tensor,
        hot: torch.Tensor,
        mask: torch.Tensor,
        medium: Optional[torch.Tensor],
    ) -> None:
        budget = self._layout(name).budget
        src = shared_rows(ids, budget)
        src2 = shared_rows(ids, budget, SECOND_SEED) if medium is not None else None
        dst = torch.where(mask, hot, torch.zeros_like(hot))
        migrate_rows(self._row_shards(name), src, dst, mask, src2, medium)

    def _row_shards(self, name: str) -> List[RowShard]:
        inner = self._embedding_bag_collection
        if isinstance(inner, EmbeddingBagCollection):
            return parameter_shards(inner.embedding_bags[name].weight, self._optimizer)
        return tbe_shards(inner, name)

    # ------------------------------------------------------------------ reporting

    def _layout(self, name: str) -> TableLayout:
        return next(l for l in self._layouts if l.config.name == name)

    def memory_report(self) -> Dict[str, Dict[str, float]]:
        """Per logical table: bytes and rows of the physical form (exact, sketch included)."""
        report = {}
        for l in self._layouts:
            b = l.budget
            report[l.config.name] = {
                "compressed": b.compressed,
                "logical_bytes": b.logical_bytes,
                "budget_bytes": b.budget_bytes,
                "hot_rows": b.num_hot,
                "shared_rows": b.num_shared,
                "row_bytes": b.row_bytes,
                "sketch_bytes": b.sketch_bytes,
                "total_bytes": b.total_bytes,
                "compression_ratio": b.logical_bytes / b.total_bytes,
            }
        return report

    def stats(self) -> Dict[str, Dict[str, float]]:
        """Per compressed table: hot-hit rate of the last batch and sketch counters (host sync)."""
        out = {}
        for name, sketch in self._sketches.items():
            s = dict(sketch.stats())
            r = self._last_remap.get(name)
            s["hot_hit_rate"] = float(r.hot_hits) if r is not None else float("nan")
            out[name] = s
        return out


def _medium_of(promoted: torch.Tensor, ids: torch.Tensor, medium: torch.Tensor) -> torch.Tensor:
    """Whether each promoted id read two shared rows when it was last remapped."""
    sorted_ids, order = torch.sort(ids)
    pos = torch.searchsorted(sorted_ids, promoted).clamp(max=max(ids.numel() - 1, 0))
    return medium[order][pos] & (sorted_ids[pos] == promoted)


def _layouts(
    tables: List[EmbeddingBagConfig],
    cafe: Union[CafeConfig, Mapping[str, CafeConfig]],
    is_weighted: bool,
) -> List[TableLayout]:
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"table names must be unique, got {names}")
    if isinstance(cafe, CafeConfig):
        per_table = {n: cafe for n in names}
    elif isinstance(cafe, Mapping):
        unknown = sorted(set(cafe) - set(names))
        if unknown:
            raise ValueError(f"cafe names tables {unknown} that are not in tables {names}")
        bad = [n for n, c in cafe.items() if not isinstance(c, CafeConfig)]
        if bad:
            raise ValueError(f"cafe[{bad[0]!r}] must be a CafeConfig, got {type(cafe[bad[0]]).__name__}")
        per_table = dict(cafe)
    else:
        raise ValueError(f"cafe must be a CafeConfig or a dict of them, got {type(cafe).__name__}")
    layouts = []
    for t in tables:
        c = per_table.get(t.name)
        if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table {t.name!r}: pooling {t.pooling} is not supported (SUM or MEAN)")
        dtype_bytes = torch.empty((), dtype=data_type_to_dtype(t.data_type)).element_size()
        budget = table_budget(t, c, dtype_bytes) if c is not None else table_budget(t, _PLAIN, dtype_bytes)
        layouts.append(TableLayout(t, c if budget.compressed else None, budget, is_weighted))
    return layouts


_PLAIN = CafeConfig(compression_ratio=1.0)
