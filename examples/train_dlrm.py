"""Train TorchRec's DLRM with a chosen embedding method under a memory budget.

Methods (same logical tables, same memory for every compressed one):
  full      - plain EmbeddingBagCollection (the reference; needs the full memory);
  hash      - the hashing trick: N / CR rows per table;
  cafe      - CafeEmbeddingBagCollection at CR (grad-norm importance);
  cafe_ml   - CAFE with multi-level hashing;
  cafe_freq - CAFE with frequency importance.

The model runs under DistributedModelParallel (gloo on CPU, nccl on CUDA, picked at run time) with
fused TBE optimizers for the embeddings, as a TorchRec user would train it.

    python -m examples.train_dlrm --method cafe --compression-ratio 100
"""

import argparse
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchmetrics.functional.classification import binary_auroc
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.models.dlrm import DLRM
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.datasets import SyntheticConfig, SyntheticCTR
from torchrec_cafe.modules import HashingEmbeddingBagCollection

METHODS = ("full", "hash", "cafe", "cafe_ml", "cafe_freq")
EMBEDDING_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad}


@dataclass
class TrainConfig:
    """One training run. Defaults: the README's main job (DLRM dim 16, CR 100)."""

    method: str = "cafe"
    compression_ratio: float = 100.0
    embedding_dim: int = 16
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    dense_lr: float = 0.05
    train_batches: int = 400
    eval_batches: int = 40
    seed: int = 0
    dense_arch: List[int] = field(default_factory=lambda: [64, 16])
    over_arch: List[int] = field(default_factory=lambda: [64, 32, 1])
    cafe_threshold: Optional[float] = None
    cafe_hash_fraction: Optional[float] = None
    cafe_update_interval: int = 1
    cafe_optimizer_state: str = "copy"
    cafe_sync: str = "aggregated"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer must be one of {tuple(EMBEDDING_OPTIMIZERS)}, got {self.embedding_optimizer!r}")


def quiet_logs() -> None:
    """Silences TorchRec's and torch's per-model planner/tracing warnings in example output."""
    for name in ("torchrec", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def device_and_backend() -> "tuple[torch.device, str]":
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "nccl"
    return torch.device("cpu"), "gloo"


def ensure_process_group() -> torch.device:
    """Joins the torchrun group if launched by one, else starts a world of size 1."""
    device, backend = device_and_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            from socket import socket

            with socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        dist.init_process_group(backend)
    return device


def embedding_tables(cardinalities: Sequence[int], dim: int) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"cat_{i}"])
        for i, n in enumerate(cardinalities)
    ]


def build_ebc(cfg: TrainConfig, tables: List[EmbeddingBagConfig], device: torch.device) -> nn.Module:
    if cfg.method == "full":
        return EmbeddingBagCollection(tables, device=device)
    if cfg.method == "hash":
        return HashingEmbeddingBagCollection(tables, cfg.compression_ratio, device=device)
    cafe = CafeConfig(
        compression_ratio=cfg.compression_ratio,
        threshold=cfg.cafe_threshold,
        hash_fraction=cfg.cafe_hash_fraction,
        multi_level=cfg.method == "cafe_ml",
        importance="frequency" if cfg.method == "cafe_freq" else "grad_norm",
        update_interval=cfg.cafe_update_interval,
        optimizer_state=cfg.cafe_optimizer_state,
        sync=cfg.cafe_sync,
    )
    return CafeEmbeddingBagCollection(tables, cafe, device=device)


def embedding_bytes(ebc: nn.Module) -> int:
    """Bytes of the embedding method: tables plus (for CAFE) the sketch, exactly."""
    if isinstance(ebc, CafeEmbeddingBagCollection):
        return sum(int(r["total_bytes"]) for r in ebc.memory_report().values())
    inner = getattr(ebc, "_embedding_bag_collection", ebc)
    return sum(c.num_embeddings * c.embedding_dim * 4 for c in inner.embedding_bag_configs())


def build_model(cfg: TrainConfig, tables: List[EmbeddingBagConfig], num_dense: int, device: torch.device) -> "tuple[DistributedModelParallel, torch.optim.Optimizer, int]":
    torch.manual_seed(cfg.seed)
    ebc = build_ebc(cfg, tables, device)
    nbytes = embedding_bytes(ebc)
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=num_dense,
        dense_arch_layer_sizes=cfg.dense_arch,
        over_arch_layer_sizes=cfg.over_arch,
        dense_device=device,
    )
    inner = getattr(ebc, "_embedding_bag_collection", ebc)
    apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer], inner.parameters(), {"lr": cfg.embedding_lr})
    dmp = DistributedModelParallel(model, device=device, plan=fused_plan(model, device))
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    return dmp, torch.optim.Adagrad(dense.values(), lr=cfg.dense_lr), nbytes


def fused_plan(model: nn.Module, device: torch.device) -> ShardingPlan:
    """Table-wise placement with fused kernels for every physical table.

    Left alone, the planner makes small tables data-parallel with the dense kernel, whose optimizer
    state CAFE migrations cannot reach (and which is slow on CPU).
    """
    world = dist.get_world_size()
    names = [n for m in model.modules() if isinstance(m, EmbeddingBagCollection) for n in m.embedding_bags]
    constraints = {n: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for n in names}
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)


def cafe_modules(model: nn.Module) -> List[CafeEmbeddingBagCollection]:
    return [m for m in model.modules() if isinstance(m, CafeEmbeddingBagCollection)]


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], device: torch.device) -> "tuple[List[float], float]":
    """Trains on ``batches``; returns per-step losses and seconds spent in the steps."""
    model.train()
    losses, seconds = [], 0.0
    for batch in batches:
        batch = batch.to(device)
        start = time.perf_counter()
        logits = model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
    return [float(x) for x in losses], seconds


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> Dict[str, float]:
    model.eval()
    logits, labels = [], []
    for batch in batches:
        batch = batch.to(device)
        logits.append(model(batch.dense_features, batch.sparse_features).squeeze(-1).float())
        labels.append(batch.labels)
    model.train()
    logit, label = torch.cat(logits), torch.cat(labels)
    return {
        "auc": float(binary_auroc(torch.sigmoid(logit), label.long())),
        "logloss": float(nn.functional.binary_cross_entropy_with_logits(logit, label)),
    }


def run(cfg: TrainConfig, data: SyntheticCTR, train: Sequence[Batch], test: Sequence[Batch]) -> Dict[str, object]:
    """Trains one method on pre-built batches and evaluates it; returns a JSON-able dict."""
    device = ensure_process_group()
    tables = embedding_tables(data.config.cardinalities, cfg.embedding_dim)
    model, optimizer, nbytes = build_model(cfg, tables, data.config.num_dense, device)
    losses, seconds = train_steps(model, optimizer, train, device)
    for cafe in cafe_modules(model):
        cafe.apply_pending_updates()
    metrics = evaluate(model, test, device)
    full_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    result: Dict[str, object] = {
        **asdict(cfg),
        **metrics,
        "bytes": nbytes,
        "achieved_compression": full_bytes / nbytes,
        "samples_per_s": len(train) * train[0].labels.numel() / seconds,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
    }
    for cafe in cafe_modules(model):
        stats = cafe.stats()
        result["hot_ids"] = sum(s["hot_ids"] for s in stats.values())
        result["promotions"] = sum(s["promotions"] for s in stats.values())
        result["demotions"] = sum(s["demotions"] for s in stats.values())
    return result


def synthetic(seed: int, batch_size: int, max_cardinality: int) -> SyntheticCTR:
    return SyntheticCTR(SyntheticConfig(seed=seed, batch_size=batch_size, max_cardinality=max_cardinality))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="cafe")
    p.add_argument("--compression-ratio", type=float, default=100.0)
    p.add_argument("--train-batches", type=int, default=400)
    p.add_argument("--eval-batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--max-cardinality", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result JSON here")
    args = p.parse_args(argv)
    quiet_logs()
    data = synthetic(args.seed, args.batch_size, args.max_cardinality)
    cfg = TrainConfig(method=args.method, compression_ratio=args.compression_ratio, train_batches=args.train_batches, eval_batches=args.eval_batches, seed=args.seed)
    train = list(data.batches(cfg.train_batches, "train"))
    test = list(data.batches(cfg.eval_batches, "test"))
    result = run(cfg, data, train, test)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
