"""Keeping replicated HotSketches identical across the ranks of an explicit process group.

A sketch update is a pure function of the multiset of (table, id, score) occurrences (scores are
quantised per occurrence and summed as integers), so if every rank applies the concatenation of
all ranks' occurrences, every replica ends bit-identical to a single process fed the global batch.

Two all-gather forms: ``all_gather_occurrences`` ships every occurrence (20 bytes each);
``all_gather_aggregated`` ships each rank's exact pre-aggregation (unique (table, key) pairs with
their smallest id and integer quanta, 24 bytes per pair, plus the rejected counts), which is what
the module uses. ``check_same_on_all_ranks`` compares what the replicas are built from before any
other collective, so ranks that disagree raise instead of hanging in mismatched collectives.

Only ``torch.distributed``: this layer loads nothing of ``torchrec.distributed``.
"""

import hashlib
import json
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
import torch.distributed as dist

from torchrec_cafe.sketch.hot_sketch import as_int32_bits

if TYPE_CHECKING:
    from torchrec_cafe.sketch.hot_sketch import HotSketch, SketchUpdate


def spans_ranks(group: Optional[dist.ProcessGroup]) -> bool:
    """Whether replicas over ``group`` need collectives (a group of more than one rank)."""
    return group is not None and dist.get_world_size(group) > 1


def check_same_on_all_ranks(description: object, group: dist.ProcessGroup, what: str, device: torch.device) -> None:
    """Collective (one all-reduce of 2 int64): raises the same ``ValueError`` on every rank of
    ``group`` if the JSON-able ``description`` is not the same on all of them."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).digest()
    mine = int.from_bytes(digest[:7], "big")  # fits int64
    seen = torch.tensor([mine, -mine], dtype=torch.int64, device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=group)
    high, low = int(seen[0]), -int(seen[1])
    if high != low:
        raise ValueError(f"{what} differ between the ranks of the process group (digests range over [{low}, {high}])")


def _gathered_sizes(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> List[int]:
    """Every rank's length of ``x`` (one small all-gather and a host read, to size the buffers)."""
    length = torch.tensor([x.numel()], dtype=torch.int64, device=x.device)
    lengths = [torch.empty_like(length) for _ in range(dist.get_world_size(group))]
    dist.all_gather(lengths, length, group=group)
    return [int(n) for n in lengths]


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
    sizes = _gathered_sizes(ids, group)
    if max(sizes) == 0:
        return ids, scores, tables
    return (
        _all_gather_varlen(ids.to(torch.int64), sizes, group),
        _all_gather_varlen(scores.to(torch.float32), sizes, group),
        _all_gather_varlen(tables.to(torch.int32), sizes, group).to(torch.int64),
    )


def all_gather_aggregated(
    sketch: "HotSketch",
    ids: torch.Tensor,
    scores: torch.Tensor,
    tables: torch.Tensor,
    group: Optional[dist.ProcessGroup] = None,
) -> "SketchUpdate":
    """Collective update: each rank pre-aggregates its occurrences exactly, the pairs are
    all-gathered and every replica applies all of them (bit-identical to one process fed all
    ranks' occurrences). Bytes per rank: 24 per unique local (table, key) + 8 per table."""
    keys, uid, quanta, utab, rejected = sketch.aggregate(ids, scores, tables)
    sizes = _gathered_sizes(keys, group)
    dist.all_reduce(rejected, group=group)
    if max(sizes) == 0:
        empty = keys.new_zeros(0)
        return sketch.update_quanta(empty, empty, empty, empty, rejected)
    return sketch.update_quanta(
        _all_gather_varlen(as_int32_bits(keys), sizes, group).to(torch.int64) & 0xFFFFFFFF,  # 32-bit keys
        _all_gather_varlen(uid, sizes, group),
        _all_gather_varlen(quanta, sizes, group),
        _all_gather_varlen(utab.to(torch.int32), sizes, group).to(torch.int64),
        rejected,
    )
