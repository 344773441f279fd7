"""Keeping replicated HotSketches identical across ranks.

A sketch update is a pure function of the multiset of (table, id, score) occurrences (scores are
quantised per occurrence and summed as integers), so if every rank applies the concatenation of
all ranks' occurrences, every replica ends bit-identical to a single process fed the global batch.
This is the simple all-gather form: 20 bytes per occurrence (int64 id, int32 table, float32
score) from each rank to all others.
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


def _all_gather_varlen(x: torch.Tensor, sizes: List[int], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenation over ranks of 1-D tensors of per-rank lengths ``sizes``."""
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


def all_gather_occurrences(
    ids: torch.Tensor,
    scores: torch.Tensor,
    tables: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's (ids [n_r] int64, scores [n_r] float, tables [n_r]) -> all ranks' [sum n_r],
    in ``HotSketch.update``'s argument order.

    Collective: every rank of ``group`` must call it at the same point. The per-rank lengths are
    exchanged first (one small all-gather and a host read of the lengths, so shapes can be set).
    """
    if not (ids.shape == scores.shape == tables.shape and ids.dim() == 1):
        raise ValueError(
            f"ids, scores and tables must be 1-D of one length, got {tuple(ids.shape)}, "
            f"{tuple(scores.shape)}, {tuple(tables.shape)}"
        )
    world = dist.get_world_size(group)
    length = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    sizes = [int(n) for n in lengths]
    if max(sizes) == 0:
        return ids, scores, tables
    return (
        _all_gather_varlen(ids.to(torch.int64), sizes, group),
        _all_gather_varlen(scores.to(torch.float32), sizes, group),
        _all_gather_varlen(tables.to(torch.int32), sizes, group).to(torch.int64),
    )
