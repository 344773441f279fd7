"""Importance scores between a step's backward and the sketch update: what a step stashes
(``PendingScores``), their concatenation for one update, and the official CAFE rescaling."""

from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

from torchrec_cafe.sketch import kernels
from torchrec_cafe.sketch.replicas import spans_ranks


def occurrence_norms(
    grad: torch.Tensor,
    columns: "tuple[int, torch.Tensor]",
    bag: torch.Tensor,
    factor: torch.Tensor,
    num_features: int,
    compiled: bool = False,
) -> torch.Tensor:
    """Per-occurrence importance before rescaling: ||d loss / d pooled bag|| * factor. [n] float32.

    ``grad`` [B, C] is the gradient of the pooled output; ``columns`` says which of its columns
    belong to which module feature: (d, output position of each feature [F]) when every feature
    has d columns, else (0, feature of each column [C]); ``bag`` [n] is each occurrence's
    key-major bag (feature * B + sample), ``factor`` [n] float32 its d pooled / d row. A bag's norm
    is the square root of its columns' squares summed in float64, rounded to float32; a
    non-finite gradient column stays within its own feature. ``compiled``: on CPU, one compiled
    pass (``torch.ops.torchrec_cafe.occurrence_norms``) gives the same float32 norms (its float64
    sums may add in another order, which shows in float32 only at a rounding tie).
    """
    dim, index = columns
    if compiled and kernels.AVAILABLE and grad.device.type == "cpu":
        return torch.ops.torchrec_cafe.occurrence_norms(grad, dim, index, bag, factor, num_features)
    g2 = grad.double().pow(2)
    if dim:
        squares = g2.reshape(grad.shape[0], -1, dim).sum(dim=2).index_select(1, index)  # [B, F]
    else:
        squares = torch.zeros(grad.shape[0], num_features, dtype=torch.float64, device=grad.device)
        squares.index_add_(1, index, g2)
    bag_norms = squares.sqrt().float().t().reshape(-1)  # key-major, like the KJT's bags
    return bag_norms.index_select(0, bag) * factor


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
    if len(due) == 1:  # one step per update (the default): nothing to concatenate
        return due[0].ids, due[0].tables, due[0].norms, due[0].feature
    ids, tables, norms, feature = (torch.cat(parts) for parts in zip(*(p[:4] for p in due)))
    return ids, tables, norms, feature
