"""Fixed-shape tensor helpers for segmented (sorted-run) work: no host sync, any device."""

import torch


def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along dim 0; index_select is several times faster than advanced indexing on CPU."""
    return t.index_select(0, index)


def first_in_segment(*keys: torch.Tensor) -> torch.Tensor:
    """Whether each element starts a new run of equal key tuples (keys sorted)."""
    first = torch.zeros_like(keys[0], dtype=torch.bool)
    first[:1] = True
    for k in keys:
        first[1:] |= k[1:] != k[:-1]
    return first


def rank_in_segment(keys: torch.Tensor) -> torch.Tensor:
    """Position of each element within its run of equal ``keys`` (keys sorted)."""
    pos = torch.arange(keys.numel(), device=keys.device)
    start = torch.where(first_in_segment(keys), pos, torch.zeros_like(pos))
    return pos - torch.cummax(start, dim=0).values


def segment_last(keys: torch.Tensor) -> torch.Tensor:
    """Index of the last element of each element's run of equal ``keys`` (keys sorted)."""
    n = keys.numel()
    pos = torch.arange(n, device=keys.device)
    last = torch.ones_like(keys, dtype=torch.bool)
    last[:-1] = keys[:-1] != keys[1:]
    end = torch.where(last, pos, torch.full_like(pos, n))
    return torch.flip(torch.cummin(torch.flip(end, [0]), dim=0).values, [0])


def first_in_row(mask: torch.Tensor) -> torch.Tensor:
    """Column of the first True per row of a [N, c] mask (0 where none).

    Weights c, c-1, .., 1 make the first True the largest; ``amax`` is about twice as fast as
    ``argmax`` on CPU and does not wake idle threads for tiny rows the way ``min(dim)`` does.
    """
    c = mask.shape[1]
    weights = torch.arange(c, 0, -1, dtype=torch.int8, device=mask.device)
    return torch.remainder(c - (mask.to(torch.int8) * weights).amax(dim=1).to(torch.int64), c)


def lexsort(major: torch.Tensor, minor: torch.Tensor, descending_minor: bool = False, may_sync: bool = False) -> torch.Tensor:
    """Stable permutation ordering elements by (``major`` asc, ``minor`` asc or desc): int64 [N] -> [N].

    Two stable sorts in general. With ``may_sync`` (reading a scalar is free, i.e. on CPU) and
    ``minor >= 0`` and both small enough to pack into one int64, a single sort of the packed keys:
    the same permutation for about half the cost.
    """
    if may_sync and minor.numel():
        lo, hi = int(minor.min()), int(minor.max())
        bits = hi.bit_length()
        if lo >= 0 and bits <= 62 and int(major.min()) >= 0 and int(major.max()) < (1 << (62 - bits)):
            packed = (major << bits) | ((hi - minor) if descending_minor else minor)
            return torch.sort(packed, stable=True).indices
    order = torch.sort(minor, descending=descending_minor, stable=True).indices
    return take(order, torch.sort(take(major, order), stable=True).indices)
