"""Real CTR data held in memory as tensors, served as TorchRec ``Batch``es.

Readers (``libfm.py``, ``criteo.py``) parse files once into an ``InMemoryCTR``; batches are then
slices of tensors (no per-sample Python work), optionally shuffled per epoch and split across ranks
(each rank takes its own contiguous share of every global batch).
"""

import gzip
from dataclasses import dataclass
from typing import IO, Iterator, List, Optional

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def open_text(path: str) -> IO[str]:
    """Opens a text file, gunzipping ``*.gz``; a missing path raises ``ValueError`` naming it.

    ``newline=""`` keeps CRLF files (e.g. Frappe's) from leaving ``\\r`` in the last field of a
    line through ``csv``; ``str.split()`` strips it anyway.
    """
    try:
        if path.endswith(".gz"):
            return gzip.open(path, "rt", newline="")
        return open(path, "r", newline="")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ValueError(f"cannot read data file {path!r}: {e.strerror}") from e


@dataclass
class InMemoryCTR:
    """A CTR data set: one categorical ID per feature and sample, dense features, binary labels.

    Attributes:
        dense: float32 [n, num_dense] (num_dense may be 0).
        ids: int64 [n, F]; column f holds IDs in ``[0, cardinalities[f])``.
        labels: float32 [n] in {0, 1}.
        feature_names: F KJT keys, one table per feature.
        cardinalities: F logical table sizes.
    """

    dense: torch.Tensor
    ids: torch.Tensor
    labels: torch.Tensor
    feature_names: List[str]
    cardinalities: List[int]

    def __post_init__(self) -> None:
        n, f = self.ids.shape
        if self.dense.shape[0] != n or self.labels.shape != (n,):
            raise ValueError(f"dense {tuple(self.dense.shape)}, ids {(n, f)} and labels {tuple(self.labels.shape)} disagree on rows")
        if len(self.feature_names) != f or len(self.cardinalities) != f:
            raise ValueError(f"{f} ID columns but {len(self.feature_names)} feature names and {len(self.cardinalities)} cardinalities")

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def num_dense(self) -> int:
        return self.dense.shape[1]

    def split(self, fraction: float, seed: int = 0) -> "tuple[InMemoryCTR, InMemoryCTR]":
        """(rest, held out): a deterministic random ``fraction`` of the rows held out, e.g. a
        validation split of a training file for tuning without touching the test file. Both keep
        this set's feature names and cardinalities (so tables are sized alike)."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        cut = len(self) - max(1, int(round(fraction * len(self))))
        return self._subset(order[:cut].sort().values), self._subset(order[cut:].sort().values)

    def _subset(self, rows: torch.Tensor) -> "InMemoryCTR":
        return InMemoryCTR(self.dense[rows], self.ids[rows], self.labels[rows], list(self.feature_names), list(self.cardinalities))

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(
        self,
        batch_size: int,
        shuffle_seed: Optional[int] = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Global batches of ``batch_size`` rows (in file order, or permuted by ``shuffle_seed``);
        yields rank ``rank``'s contiguous share of each, the same size on every rank: ``batch_size``
        must divide by ``world_size``, and a last partial batch is cut to a multiple of it (at most
        ``world_size - 1`` rows left out)."""
        if batch_size <= 0 or batch_size % world_size:
            raise ValueError(f"batch_size must be a positive multiple of world_size={world_size}, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        order = None
        if shuffle_seed is not None:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(shuffle_seed))
        for b in range(self.num_batches(batch_size, drop_last)):
            end = min((b + 1) * batch_size, len(self))
            end -= (end - b * batch_size) % world_size
            if end == b * batch_size:
                return
            rows = torch.arange(b * batch_size, end).view(world_size, -1)[rank]
            yield self._batch(rows if order is None else order[rows])

    def _batch(self, rows: torch.Tensor) -> Batch:
        ids = self.ids[rows]
        sparse = KeyedJaggedTensor(
            keys=self.feature_names,
            values=ids.t().reshape(-1),  # KJT values are key-major
            lengths=torch.ones(ids.numel(), dtype=torch.int32),
            stride=rows.numel(),
        )
        return Batch(dense_features=self.dense[rows], sparse_features=sparse, labels=self.labels[rows])


def local_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s contiguous share of the samples of a global ``Batch`` (any KJT bags)."""
    n = batch.labels.numel()
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    kjt = batch.sparse_features
    lengths = kjt.lengths().view(len(kjt.keys()), -1)
    offsets = kjt.offsets().view(-1)
    # One (start, end) value range per key: a fixed number of slices, not a loop over IDs.
    starts = offsets[torch.arange(len(kjt.keys())) * n + lo]
    ends = offsets[torch.arange(len(kjt.keys())) * n + hi]
    values = torch.cat([kjt.values()[s:e] for s, e in zip(starts.tolist(), ends.tolist())])
    weights = kjt.weights_or_none()
    if weights is not None:
        weights = torch.cat([weights[s:e] for s, e in zip(starts.tolist(), ends.tolist())])
    sparse = KeyedJaggedTensor(
        keys=kjt.keys(), values=values, lengths=lengths[:, lo:hi].reshape(-1), weights=weights, stride=hi - lo
    )
    return Batch(dense_features=batch.dense_features[lo:hi], sparse_features=sparse, labels=batch.labels[lo:hi])
