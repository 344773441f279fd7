"""Importance scores between a step's backward and the sketch update: what a step stashes
(``PendingScores``), their concatenation for one update, and the official CAFE rescaling."""

from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

from torchrec_cafe.sketch import kernels
from torchrec_cafe.sketch.replicas import spans_ranks


def normalised_scores(
    norms: torch.Tensor, feature: torch.Tensor, num_features: int, group: Optional[dist.ProcessGroup], compiled: bool = False
) -> torch.Tensor:
    """Official CAFE scaling: per feature, ``norm * n / sum(norm)`` so the mean score is 1.

    The sums run over the whole update (all ranks' occurrences when ``group`` spans ranks: one
    all-reduce of [2, F] float64), so every rank rescales as one process fed the global batch
    would. Non-finite norms stay non-finite (the sketch drops them) and do not enter the sums, so
    one bad gradient cannot poison the other occurrences' scores. ``compiled``: one process's
    float32 CPU norms take the compiled operator, bit for bit the same.
    """
    if compiled and kernels.AVAILABLE and norms.device.type == "cpu" and norms.dtype == torch.float32 and not spans_ranks(group):
        return torch.ops.torchrec_cafe.normalised_scores(norms, feature, num_features)
    finite = torch.isfinite(norms)
    clean = torch.where(finite, norms, torch.zeros_like(norms)).to(torch.float64)
    sums = torch.zeros(2, num_features, dtype=torch.float64, device=norms.device)
    sums[0].index_add_(0, feature, clean)
    sums[1].index_add_(0, feature, finite.to(torch.float64))
    if spans_ranks(group):
        dist.all_reduce(sums, group=group)
    total, count = sums[0], sums[1]
    scale = torch.where(total > 0, count / total, torch.zeros_like(total)).to(norms.dtype)
    return torch.where(finite, norms * scale.index_select(0, feature), norms)


class PendingScores(NamedTuple):
    """One training step's compressed occurrences, [n_c] each: raw id, sketch table, importance
    norm, feature; the step that remapped them; on CUDA, an event recorded after the norms."""

    ids: torch.Tensor
    tables: torch.Tensor
    norms: torch.Tensor
    feature: torch.Tensor
    step: int
    ready: Optional[torch.cuda.Event] = None


def concat_scores(
    due: List[PendingScores], device: torch.device
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]":
    """(ids, tables, norms, feature) of ``due``, concatenated in order, on the current stream
    (which waits for the norms' stream on CUDA); empty tensors on ``device`` when there are none."""
    if not due:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty, torch.zeros(0, device=device), empty
    for p in due:
        if p.ready is not None:
            stream = torch.cuda.current_stream(p.norms.device)
            stream.wait_event(p.ready)
            for t in p[:4]:
                t.record_stream(stream)
    ids, tables, norms, feature = (torch.cat(parts) for parts in zip(*(p[:4] for p in due)))
    return ids, tables, norms, feature
