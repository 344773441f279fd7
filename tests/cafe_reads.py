"""What a CAFE table's IDs read, from the public sketch lookup (tests only): the rows an ID's
embedding is the sum of, written from the layout rules of ``torchrec_cafe/remap.py``'s docstring."""

from typing import List, Tuple

import torch

from torchrec_cafe.sketch.hashing import fingerprint32
from torchrec_cafe.sketch.hot_sketch import pool_choices


def sketch_table(cafe, name: str) -> int:
    """Index of a sketched table in the module's sketch."""
    return [l.config.name for l in cafe._layouts if l.sketched].index(name)


def block_row(layout, ids: torch.Tensor) -> torch.Tensor:
    """Physical block row of each id of a composed table. [N] int64"""
    n = layout.config.num_embeddings
    return layout.budget.pool_rows + torch.remainder(ids, n) // layout.block_size


def reads(cafe, name: str, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pool row, hot, blocked) of each id of table ``name`` (static tables: choice 0, cold)."""
    layout = cafe._layout(name)
    if not layout.sketched:
        row = pool_choices(fingerprint32(ids), torch.full_like(ids, layout.budget.pool_rows))[:, 0]
        return row, torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
    return cafe._sketch.lookup(ids, torch.full_like(ids, sketch_table(cafe, name)))


def rows_read(cafe, name: str, ids: torch.Tensor) -> List[List[int]]:
    """Per id, the physical rows its embedding sums: a hot id its private row; composed cold ids
    their pool row and block row (blocked ones the block row alone); hashed cold ids the pool row
    (blocked ones none)."""
    layout = cafe._layout(name)
    row, hot, blocked = reads(cafe, name, ids)
    if not layout.composed:  # a blocked id reads no row: never another id's private one
        return [[] if bl else [r] for r, bl in zip(row.tolist(), blocked.tolist())]
    block = block_row(layout, ids)
    return [[r] if h else [b] if bl else [r, b] for r, h, bl, b in zip(row.tolist(), hot.tolist(), blocked.tolist(), block.tolist())]


def embeddings(cafe, name: str, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The embedding each id reads from ``weight`` (the physical table). [N, dim]"""
    return torch.stack([weight[r].sum(0) for r in rows_read(cafe, name, ids)]) if ids.numel() else weight[:0]  # [] sums to 0


def hot_row(cafe, name: str, id_: int) -> int:
    """The private pool row of a hot id, -1 if the id is cold."""
    row, hot, _ = reads(cafe, name, torch.tensor([id_]))
    return int(row) if bool(hot) else -1


def promotion_source(cafe, name: str, id_: int) -> List[int]:
    """The rows a cold id reads now, pool row first: its private row, once promoted, starts as
    their sum with the pool row's optimizer state."""
    return rows_read(cafe, name, torch.tensor([id_]))[0]
