"""The physical form of a CAFE module's tables: one ``TableLayout`` per logical table (its budget
split into rows and sketch) and the one HotSketch all sketched tables share."""

import logging
from typing import List, Mapping, Optional, Union

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType, data_type_to_dtype

from torchrec_cafe.config import CafeConfig, table_budget
from torchrec_cafe.remap import TableLayout
from torchrec_cafe.sketch.hot_sketch import HotSketch

logger: logging.Logger = logging.getLogger(__name__)

PLAIN = CafeConfig(compression_ratio=1.0)  # a table kept whole


def is_meta(device: Optional[torch.device]) -> bool:
    return device is not None and torch.device(device).type == "meta"


def dtype_bytes(table: EmbeddingBagConfig) -> int:
    """Bytes of one element of ``table``'s rows (its ``data_type``)."""
    return torch.empty((), dtype=data_type_to_dtype(table.data_type)).element_size()


def group_sketch(sketched: List[TableLayout], device: Optional[torch.device]) -> Optional[HotSketch]:
    """One HotSketch for all sketched tables: one batch of ops per step whatever their count."""
    if not sketched:
        return None
    for field in ("slots_per_bucket", "quarantine", "pipeline_depth", "update_interval", "sync", "displace_ratio"):
        values = {getattr(l.settings, field) for l in sketched}
        if len(values) > 1:
            raise ValueError(f"CafeConfig.{field} must be the same for all tables of a module, got {sorted(values)}")
    return HotSketch(
        num_buckets=[l.budget.num_buckets for l in sketched],
        pool_rows=[l.budget.pool_rows for l in sketched],
        threshold=[l.settings.threshold for l in sketched],
        slots_per_bucket=sketched[0].settings.slots_per_bucket,
        decay=[l.settings.decay for l in sketched],
        quarantine=sketched[0].settings.quarantine,
        promote_load=[l.settings.promote_load for l in sketched],
        demote_load=[l.settings.demote_load for l in sketched],
        displace_ratio=sketched[0].settings.displace_ratio,
        max_promotions=[l.settings.promotions_per_update(l.budget.pool_rows) for l in sketched],
        device=device,
    )


def table_layouts(
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
        settings = c if c is not None else PLAIN
        budget = table_budget(t, settings, dtype_bytes(t))
        if budget.compressed and not budget.sketched:
            # The budget may be 0 B (a 3-row table at CR 1000): the table still gets one row.
            logger.info(
                "table %r: its budget of %d B (compression ratio %g) holds %d rows, too few for a "
                "sketch: they serve every ID as cold rows",
                t.name, budget.budget_bytes, settings.compression_ratio, budget.rows,
            )
        layouts.append(TableLayout(t, c if budget.compressed else None, budget, is_weighted))
    if not is_weighted and any(l.mean_as_weights for l in layouts):
        # A MEAN table whose bags' entries are not their IDs pools as SUM with weights 1/len, and a
        # KJT carries weights for every feature or none: every MEAN table then does.
        layouts = [TableLayout(l.config, l.cafe, l.budget, True) for l in layouts]
    return layouts
