"""The example trainer's data: the synthetic generator, Criteo TSV and libFM files, split per rank."""

import argparse
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch.distributed as dist
from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch

from examples.harness.config import TrainConfig
from torchrec_cafe.datasets import CRITEO_KAGGLE_CARDINALITIES, InMemoryCTR, SyntheticConfig, SyntheticCTR, local_batch, read_criteo_tsv, read_libfm


@dataclass
class Epochs:
    """Training data that changes per epoch: ``batches(epoch)`` yields this rank's ``steps`` batches."""

    batches: Callable[[int], Iterable[Batch]]
    steps: int


TrainData = Union[Sequence[Batch], Epochs]
TestData = Union[Sequence[Batch], Callable[[int], Sequence[Batch]]]


def embedding_tables(cardinalities: Sequence[int], dim: int) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(cardinalities)
    ]


def data_shape(data: Union[SyntheticCTR, InMemoryCTR]) -> "tuple[List[int], int]":
    """(cardinalities, number of dense features) of a data set."""
    if isinstance(data, SyntheticCTR):
        return list(data.config.cardinalities), data.config.num_dense
    return list(data.cardinalities), data.num_dense


def synthetic(seed: int, batch_size: int, max_cardinality: int, drift_every: Optional[int] = None) -> SyntheticCTR:
    return SyntheticCTR(SyntheticConfig(seed=seed, batch_size=batch_size, max_cardinality=max_cardinality, drift_every=drift_every))


def load(args: argparse.Namespace, cfg: TrainConfig) -> "tuple[Union[SyntheticCTR, InMemoryCTR], TrainData, TestData]":
    """The data of ``args.data`` as (shape source, this rank's train data, this rank's test data)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cfg.batch_size % world or args.eval_batch_size % world:
        raise ValueError(f"batch sizes ({cfg.batch_size}, eval {args.eval_batch_size}) must divide by the world size {world}")
    if args.data == "synthetic":
        data = synthetic(cfg.seed, cfg.batch_size, args.max_cardinality, args.drift_every)
        train = [local_batch(b, rank, world) for b in data.batches(cfg.train_batches, "train")]
        tests: Dict[int, List[Batch]] = {}

        def test_at(step: int) -> List[Batch]:
            """Test batches of the popularity of the last training step (fixed without drift)."""
            start = (step - 1) // args.drift_every * args.drift_every if args.drift_every and step else 0
            if start not in tests:
                tests[start] = [local_batch(b, rank, world) for b in data.batches(cfg.eval_batches, args.eval_split, start=start)]
            return tests[start]

        return data, train, test_at
    if args.data == "libfm":
        train_set, test_set = read_libfm([args.train, args.test])
    else:
        cards = [min(c, args.max_cardinality) for c in CRITEO_KAGGLE_CARDINALITIES] if args.criteo_hash_size is None else [args.criteo_hash_size] * 26
        train_set, test_set = read_criteo_tsv(args.train, cards), read_criteo_tsv(args.test, cards)
    if args.eval_split == "val":
        # Tuning: train on the rest of the training file, evaluate on its held-out part; the test
        # file is never evaluated (the split does not depend on the run's seed).
        train_set, test_set = train_set.split(args.val_fraction)
    epochs = Epochs(
        lambda epoch: train_set.batches(cfg.batch_size, shuffle_seed=cfg.seed * 1_000_003 + epoch, drop_last=True, rank=rank, world_size=world),
        train_set.num_batches(cfg.batch_size, drop_last=True),
    )
    return train_set, epochs, list(test_set.batches(args.eval_batch_size, rank=rank, world_size=world))
