"""Train TorchRec's DLRM with a chosen embedding method under a memory budget.

Methods (same logical tables; every compressed table gets the same budget, logical bytes / CR):
  full      - plain EmbeddingBagCollection (the reference; needs the full memory);
  hash      - the hashing trick: N / CR rows per table;
  qr        - the quotient-remainder trick (sum of a quotient and a remainder row);
  mch_lfu   - TorchRec's ManagedCollisionEmbeddingBagCollection, MCH with LFU eviction;
  mch_dlfu  - the same with DistanceLFU eviction;
  cafe       - CafeEmbeddingBagCollection at its defaults (grad-norm importance, adaptive bars,
               composed cold rows);
  cafe_paper - CAFE with the paper's settings (fixed threshold schedule, one hashed row per cold ID);
  cafe_freq  - CAFE with frequency importance.

Data: the bundled synthetic generator, raw Criteo TSV (label, 13 counts, 26 categories) or libFM
files with one-hot fields (e.g. Frappe); real data is read from the given paths, never copied.
The model runs under DistributedModelParallel (gloo on CPU, nccl on CUDA, picked at run time) with
fused TBE optimizers for the embeddings. Under torchrun every rank trains on its own share of each
global batch; rank 0 prints and writes the JSON.

    python -m examples.train_dlrm --method cafe --compression-ratio 100
    python -m examples.train_dlrm --data libfm --preset paper --epochs 10 --compression-ratio 5 \\
        --train ../shared/data/frappe_ctr/frappe.validation.libfm.gz \\
        --test ../shared/data/frappe_ctr/frappe.test.libfm.gz --out results/frappe_cafe_cr5.json
    torchrun --nproc_per_node 2 -m examples.train_dlrm --method hash --batch-size 1024
"""

import argparse
import itertools
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection, checkpoint, table_budget_bytes
from torchrec_cafe.checkpoint import cafe_modules
from torchrec_cafe.datasets import CRITEO_KAGGLE_CARDINALITIES, InMemoryCTR, SyntheticConfig, SyntheticCTR, local_batch, read_criteo_tsv, read_libfm
from torchrec_cafe.distributed import CafeEmbeddingBagCollectionSharder, CafeStorageReservation, RowWiseEverywhereEBCSharder
from torchrec_cafe.modules import HashingEmbeddingBagCollection, MCHEmbeddingBagCollection, QREmbeddingBagCollection, mch_sharder

METHODS = ("full", "hash", "qr", "mch_lfu", "mch_dlfu", "cafe", "cafe_paper", "cafe_freq")
_CAFE = CafeConfig(compression_ratio=1.0)  # the defaults of the cafe_* knobs
DATA = ("synthetic", "criteo", "libfm")
CTR_TASK = RecTaskInfo(name="ctr", label_name="label", prediction_name="prediction", weight_name="weight")
EMBEDDING_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad}
DENSE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}
# The paper's setting (official artifact: tasks/*.json and bench/*.sh, DLRM with bottom MLP
# 512-256-64-16 and top MLP 512-256-1); CafeConfig's defaults give its threshold and hash-fraction
# schedule by compression ratio.
PRESETS: Dict[str, Dict[str, object]] = {
    "paper": {
        "embedding_dim": 16, "embedding_optimizer": "sgd", "embedding_lr": 0.1, "dense_optimizer": "sgd", "dense_lr": 0.1,
        "batch_size": 128, "dense_arch": [512, 256, 64, 16], "over_arch": [512, 256, 1],
    },
}


@dataclass
class TrainConfig:
    """One training run. Defaults: the README's main job (DLRM dim 16, CR 100)."""

    method: str = "cafe"
    compression_ratio: float = 100.0
    embedding_dim: int = 16
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    dense_optimizer: str = "adagrad"
    dense_lr: float = 0.05
    batch_size: int = 512
    epochs: int = 1
    eval_every: int = 0  # steps between evaluations; 0: at the end of every epoch only
    train_batches: int = 400  # synthetic data only
    eval_batches: int = 40  # synthetic data only
    seed: int = 0
    dense_arch: List[int] = field(default_factory=lambda: [64, 16])
    over_arch: List[int] = field(default_factory=lambda: [64, 32, 1])
    # CAFE knobs: CafeConfig's defaults
    cafe_threshold: Optional[float] = _CAFE.threshold
    cafe_promote_load: float = _CAFE.promote_load
    cafe_demote_load: float = _CAFE.demote_load
    cafe_cold_rows: str = _CAFE.cold_rows
    cafe_block_fraction: float = _CAFE.block_fraction
    cafe_sketch_slots_per_row: float = _CAFE.sketch_slots_per_row
    cafe_update_interval: int = _CAFE.update_interval
    cafe_slots_per_bucket: int = _CAFE.slots_per_bucket
    cafe_optimizer_state: str = _CAFE.optimizer_state
    cafe_sync: str = _CAFE.sync
    mch_eviction_interval: int = 1
    progress: bool = False
    checkpoint_dir: Optional[str] = None  # resume from its latest checkpoint; save every checkpoint_every steps
    checkpoint_every: int = 0
    pipeline: bool = False  # train and evaluate through TorchRec's TrainPipelineSparseDist

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer must be one of {tuple(EMBEDDING_OPTIMIZERS)}, got {self.embedding_optimizer!r}")
        if self.dense_optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(f"dense_optimizer must be one of {tuple(DENSE_OPTIMIZERS)}, got {self.dense_optimizer!r}")
        for name in ("embedding_dim", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.checkpoint_every < 0 or (self.checkpoint_every and not self.checkpoint_dir):
            raise ValueError(f"checkpoint_every must be >= 0 and needs checkpoint_dir, got {self.checkpoint_every}, {self.checkpoint_dir!r}")


@dataclass
class Epochs:
    """Training data that changes per epoch: ``batches(epoch)`` yields this rank's ``steps`` batches."""

    batches: Callable[[int], Iterable[Batch]]
    steps: int


TrainData = Union[Sequence[Batch], Epochs]
TestData = Union[Sequence[Batch], Callable[[int], Sequence[Batch]]]


def quiet_logs() -> None:
    """Silences per-model warnings (TorchRec's planner, torch's tracing) in example output."""
    # torchrec_cafe's "table stays full" warning: the result JSON lists those tables instead.
    for name in ("torchrec", "torch", "torchrec_cafe"):
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
    if cfg.method == "qr":
        return QREmbeddingBagCollection(tables, cfg.compression_ratio, device=device)
    if cfg.method.startswith("mch"):
        world = dist.get_world_size() if dist.is_initialized() else 1
        eviction = "lfu" if cfg.method == "mch_lfu" else "distance_lfu"
        return MCHEmbeddingBagCollection(tables, cfg.compression_ratio, eviction, cfg.mch_eviction_interval, buckets=world, device=device)
    return CafeEmbeddingBagCollection(tables, cafe=cafe_config(cfg), device=device)


def cafe_config(cfg: TrainConfig) -> CafeConfig:
    """The CafeConfig of a ``cafe*`` method: the trainer's ``cafe_*`` fields; ``cafe_paper`` starts
    from the paper's settings (threshold schedule, hashed cold rows) unless they are given."""
    settings = dict(
        threshold=cfg.cafe_threshold,
        promote_load=cfg.cafe_promote_load,
        demote_load=cfg.cafe_demote_load,
        cold_rows=cfg.cafe_cold_rows,
        block_fraction=cfg.cafe_block_fraction,
        sketch_slots_per_row=cfg.cafe_sketch_slots_per_row,
        importance="frequency" if cfg.method == "cafe_freq" else "grad_norm",
        update_interval=cfg.cafe_update_interval,
        slots_per_bucket=cfg.cafe_slots_per_bucket,
        optimizer_state=cfg.cafe_optimizer_state,
        sync=cfg.cafe_sync,
        # TrainPipelineSparseDist remaps batch k before batch k-1's update lands: a freed pool row
        # waits one update before a hot ID may claim it
        quarantine=1 if cfg.pipeline else 0,
    )
    if cfg.method == "cafe_paper":
        paper = CafeConfig.paper(cfg.compression_ratio)
        settings["cold_rows"] = paper.cold_rows
        settings["threshold"] = paper.threshold if cfg.cafe_threshold is None else cfg.cafe_threshold
    return CafeConfig(compression_ratio=cfg.compression_ratio, **settings)


def embedding_bytes(ebc: nn.Module) -> int:
    """Bytes of the embedding method, exactly: rows plus CAFE's sketch or MCH's id state."""
    if hasattr(ebc, "memory_report"):
        return sum(int(r["total_bytes"]) for r in ebc.memory_report().values())
    return sum(p.numel() * p.element_size() for p in ebc.parameters())


def budget_bytes(tables: Sequence[EmbeddingBagConfig], compression_ratio: float) -> int:
    """The memory every compressed method may use: the sum of the tables' budgets (logical bytes / CR)."""
    return sum(table_budget_bytes(t, compression_ratio) for t in tables)


def build_model(cfg: TrainConfig, tables: List[EmbeddingBagConfig], num_dense: int, device: torch.device) -> "tuple[DistributedModelParallel, torch.optim.Optimizer, int]":
    """TorchRec's ``DLRMTrain`` (batch -> (loss, (loss, logits, labels))) over a DLRM with the
    method's embeddings, under DMP; (model, dense optimizer, embedding bytes)."""
    torch.manual_seed(cfg.seed)
    ebc = build_ebc(cfg, tables, device)
    nbytes = embedding_bytes(ebc)
    # The dense part starts alike for every method of a seed (the embedding methods draw different
    # amounts of randomness): comparisons between methods are then paired, not also between inits.
    torch.manual_seed(cfg.seed + 1_000_003)
    model = DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=num_dense,
            dense_arch_layer_sizes=cfg.dense_arch,
            over_arch_layer_sizes=cfg.over_arch,
            dense_device=device,
        )
    )
    apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer], ebc.parameters(), {"lr": cfg.embedding_lr})
    plan, sharders = shard_plan(model, device)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    return dmp, DENSE_OPTIMIZERS[cfg.dense_optimizer](dense.values(), lr=cfg.dense_lr), nbytes


def shard_plan(model: nn.Module, device: torch.device) -> "tuple[ShardingPlan, List[ModuleSharder[nn.Module]]]":
    """Fused kernels for every physical table: table-wise, except MCH tables, row-wise (the only
    placement TorchRec's managed collisions support).

    Left alone, the planner makes small tables data-parallel with the dense kernel, which TorchRec
    steps with the dense optimizer instead of the fused one (CAFE would then need it attached) and
    which is slow on CPU. Every rank plans (the planner is
    deterministic), so an error cannot leave the other ranks waiting for a broadcast.
    """
    world = dist.get_world_size()
    constraints: Dict[str, ParameterConstraints] = {}
    for m in model.modules():  # pre-order: an MC-EBC comes before its inner EBC
        if isinstance(m, ManagedCollisionEmbeddingBagCollection):
            for c in m._embedding_module.embedding_bag_configs():
                constraints[c.name] = ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"])
        elif isinstance(m, EmbeddingBagCollection):
            for c in m.embedding_bag_configs():
                constraints.setdefault(c.name, ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]))
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, storage_reservation=CafeStorageReservation(percentage=0.15))
    sharders: List[ModuleSharder[nn.Module]] = [CafeEmbeddingBagCollectionSharder(), mch_sharder(), RowWiseEverywhereEBCSharder()]
    return planner.plan(model, sharders), sharders


def train_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], device: torch.device, pipeline: Optional[TrainPipelineSparseDist] = None
) -> "tuple[List[float], float]":
    """Trains on ``batches`` (through ``pipeline`` when given, which drains at their end); returns
    per-step losses and seconds spent in the steps."""
    model.train()
    if pipeline is not None:
        start = time.perf_counter()
        losses = [out[0] for out in pipelined(pipeline, batches)]
        return [float(x) for x in losses], time.perf_counter() - start
    losses, seconds = [], 0.0
    for batch in batches:
        batch = batch.to(device)
        start = time.perf_counter()
        loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
    return [float(x) for x in losses], seconds


def pipelined(pipeline: TrainPipelineSparseDist, batches: Iterable[Batch]) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (loss, logits, labels) of each batch through ``pipeline`` (a training step each when the
    model trains, a forward when it evaluates); the pipeline is empty again at the end."""
    it = iter(batches)
    while True:
        try:
            yield pipeline.progress(it)
        except StopIteration:
            return


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device, pipeline: Optional[TrainPipelineSparseDist] = None) -> Dict[str, float]:
    """Test AUC and NE (``torchrec.metrics``: AUCMetric, NEMetric, one window over every rank's
    batches) and logloss (mean binary cross-entropy, nats) over ``batches``; ``model`` maps a
    batch to (loss, (loss, logits, labels)), called directly or through ``pipeline``."""
    model.eval()
    batches = list(batches)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    size = max((b.labels.numel() for b in batches), default=1)
    window = world * sum(b.labels.numel() for b in batches) + 1  # never slides: the whole test split
    metrics = [
        m(world_size=world, my_rank=rank, batch_size=size, tasks=[CTR_TASK], window_size=window, compute_on_all_ranks=True)
        for m in (AUCMetric, NEMetric)
    ]
    for m in metrics:
        m.to(device)
    loss, count = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.float64, device=device)
    outputs = pipelined(pipeline, batches) if pipeline is not None else (model(b.to(device))[1] for b in batches)
    for _, logits, labels in outputs:
        logit, label = logits.float(), labels.float()
        for m in metrics:
            m.update(predictions={"ctr": torch.sigmoid(logit)}, labels={"ctr": label}, weights={"ctr": torch.ones_like(label)})
        loss += nn.functional.binary_cross_entropy_with_logits(logit, label, reduction="sum")
        count += label.numel()
    model.train()
    if world > 1:
        totals = torch.stack([loss, count])
        dist.all_reduce(totals)
        loss, count = totals[0], totals[1]
    values = {k: float(v) for m in metrics for k, v in m.compute().items()}
    return {"auc": values["auc-ctr|window_auc"], "ne": values["ne-ctr|window_ne"], "logloss": float(loss / count)}


def fit(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, train: TrainData, test: TestData, device: torch.device) -> Dict[str, object]:
    """Trains ``cfg.epochs`` epochs, evaluating every ``cfg.eval_every`` steps and after every epoch.

    ``test`` may be a function of the step (drifting data is tested at the current popularity).
    Returns the eval history (``train_loss``: mean over the steps since the previous eval), the
    losses, and the samples (all ranks) and seconds (slowest rank) spent in training steps.

    With ``cfg.checkpoint_dir``, starts from its latest checkpoint (model, fused and dense optimizer
    state, this loop's progress; any world size) and saves one every ``cfg.checkpoint_every`` steps:
    a restarted job skips the batches it already trained on and ends as an uninterrupted one.
    """
    epochs = train if isinstance(train, Epochs) else Epochs(lambda _: train, len(train))
    test_at = test if callable(test) else (lambda _: test)
    pipeline = TrainPipelineSparseDist(model, optimizer, device) if cfg.pipeline else None
    optimizers = {"sparse": model.fused_optimizer, "dense": optimizer}
    progress = {"step": 0, "history": [], "losses": [], "samples": 0, "seconds": 0.0}
    resume = checkpoint.latest(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    if resume:
        progress = checkpoint.load(resume, model, optimizers)["progress"]
    history: List[Dict[str, float]] = progress["history"]
    losses: List[float] = progress["losses"]
    step, samples, seconds = progress["step"], progress["samples"], progress["seconds"]
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    bar = tqdm(total=cfg.epochs * epochs.steps, initial=step, disable=not (cfg.progress and rank0), unit="step", dynamic_ncols=True)

    def eval_now(epoch: int) -> None:
        for cafe in cafe_modules(model):
            cafe.apply_pending_updates()
        metrics = evaluate(model, test_at(step), device, pipeline)
        since = losses[history[-1]["step"] if history else 0 :]
        history.append({"step": step, "epoch": epoch, **metrics, "train_loss": statistics.fmean(since)})
        bar.set_postfix(auc=f"{metrics['auc']:.4f}", ne=f"{metrics['ne']:.4f}")

    def until_next(every: int) -> int:
        return every - step % every if every else 50

    for epoch in range(step // epochs.steps, cfg.epochs):
        batches = itertools.islice(epochs.batches(epoch), step - epoch * epochs.steps, None)  # resumed mid-epoch
        while True:
            # Chunks end at eval and checkpoint points, and are short enough for a live progress bar.
            chunk = list(itertools.islice(batches, min(until_next(cfg.eval_every), until_next(cfg.checkpoint_every), 50)))
            if not chunk:
                break
            chunk_losses, chunk_seconds = train_steps(model, optimizer, chunk, device, pipeline)
            losses += chunk_losses
            seconds += chunk_seconds
            samples += sum(b.labels.numel() for b in chunk)
            step += len(chunk)
            bar.update(len(chunk))
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == (epoch + 1) * epochs.steps:
                eval_now(epoch)  # before a checkpoint of the same step: a resumed run never redoes it
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                state = {"step": step, "history": history, "losses": losses, "samples": samples, "seconds": seconds}
                checkpoint.save(checkpoint.checkpoint_path(cfg.checkpoint_dir, step), model, optimizers, extra={"progress": state})
        if not history or history[-1]["step"] != step:  # an epoch shorter than epochs.steps
            eval_now(epoch)
    bar.close()
    if dist.is_initialized() and dist.get_world_size() > 1:
        total_samples, slowest = torch.tensor(samples), torch.tensor(seconds, dtype=torch.float64)
        dist.all_reduce(total_samples)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        samples, seconds = int(total_samples), float(slowest)
    return {"history": history, "losses": losses, "steps": step, "samples": samples, "seconds": seconds, "resumed_from": resume}


def data_shape(data: Union[SyntheticCTR, InMemoryCTR]) -> "tuple[List[int], int]":
    """(cardinalities, number of dense features) of a data set."""
    if isinstance(data, SyntheticCTR):
        return list(data.config.cardinalities), data.config.num_dense
    return list(data.cardinalities), data.num_dense


def run(cfg: TrainConfig, data: Union[SyntheticCTR, InMemoryCTR], train: TrainData, test: TestData) -> Dict[str, object]:
    """Trains one method and evaluates it; returns a JSON-able dict (final metrics = last eval).

    Args:
        data: gives the table sizes and dense width.
        train: this rank's batches of one epoch (reused every epoch), or ``Epochs``.
        test: this rank's test batches, or a function of the training step returning them.
    """
    device = ensure_process_group()
    cardinalities, num_dense = data_shape(data)
    tables = embedding_tables(cardinalities, cfg.embedding_dim)
    model, optimizer, nbytes = build_model(cfg, tables, num_dense, device)
    out = fit(cfg, model, optimizer, train, test, device)
    full_bytes = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)
    losses = out["losses"]
    result: Dict[str, object] = {
        **asdict(cfg),
        **{k: v for k, v in out["history"][-1].items() if k in ("auc", "ne", "logloss")},
        "bytes": nbytes,
        "budget_bytes": full_bytes if cfg.method == "full" else budget_bytes(tables, cfg.compression_ratio),
        "full_bytes": full_bytes,
        "achieved_compression": full_bytes / nbytes,
        "samples_per_s": out["samples"] / out["seconds"],
        "train_samples": out["samples"],
        "steps": out["steps"],
        "resumed_from": out["resumed_from"],
        "world_size": dist.get_world_size(),
        "final_train_loss": statistics.fmean(losses[-20:]),
        "history": out["history"],
    }
    for mch in (m for m in model.modules() if isinstance(m, MCHEmbeddingBagCollection)):
        result["uncharged_bytes"] = sum(int(r["uncharged_bytes"]) for r in mch.memory_report().values())
    for cafe in cafe_modules(model):
        stats = cafe.stats()
        result["hot_ids"] = sum(s["hot_ids"] for s in stats.values())
        result["promotions"] = sum(s["promotions"] for s in stats.values())
        result["demotions"] = sum(s["demotions"] for s in stats.values())
    return result


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


def parse_args(argv: Optional[Sequence[str]] = None) -> "tuple[argparse.Namespace, TrainConfig]":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=DATA, default="synthetic")
    p.add_argument("--train", help="training file (criteo: TSV, libfm: libFM; .gz allowed)")
    p.add_argument("--test", help="test file, same format")
    p.add_argument("--method", choices=METHODS, default="cafe")
    p.add_argument("--compression-ratio", type=float, default=100.0)
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper: DLRM dim 16 (MLPs 512-256-64-16 and 512-256-1), SGD lr 0.1 (embeddings and dense), batch 128")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (default 512, paper preset 128)")
    p.add_argument("--eval-batch-size", type=int, default=4096, help="real data only")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: end of each epoch)")
    p.add_argument("--seed", type=int)
    p.add_argument("--embedding-dim", type=int)
    p.add_argument("--dense-arch", type=int, nargs="+", help="DLRM bottom MLP sizes (last = embedding dim)")
    p.add_argument("--over-arch", type=int, nargs="+", help="DLRM top MLP sizes (last = 1)")
    p.add_argument("--embedding-optimizer", choices=sorted(EMBEDDING_OPTIMIZERS))
    p.add_argument("--embedding-lr", type=float)
    p.add_argument("--dense-optimizer", choices=sorted(DENSE_OPTIMIZERS))
    p.add_argument("--dense-lr", type=float)
    p.add_argument("--cafe-update-interval", type=int)
    p.add_argument("--cafe-threshold", type=float, help="fixed promotion score (default: adaptive; cafe_paper: the paper's schedule)")
    p.add_argument("--cafe-promote-load", type=float, help="adaptive promotion bar, x the average pool-row load (default 0.1)")
    p.add_argument("--cafe-demote-load", type=float, help="adaptive demotion bar, x the average pool-row load (default 0.05)")
    p.add_argument("--cafe-cold-rows", choices=["composed", "hashed"], help="cold IDs: pool + block row (default) or one hashed row (paper)")
    p.add_argument("--cafe-block-fraction", type=float, help="share of the rows that are block rows (default 0.5)")
    p.add_argument("--cafe-sketch-slots-per-row", type=float, help="sketch slots per physical row (default 1)")
    p.add_argument("--cafe-slots-per-bucket", type=int, help="sketch slots per bucket (paper: 4)")
    p.add_argument("--cafe-optimizer-state", choices=["copy", "reset"], help="a promoted ID's optimizer state: copied from the row it read (default) or reset")
    p.add_argument("--mch-eviction-interval", type=int)
    p.add_argument("--train-batches", type=int, help="synthetic: batches per epoch (default 400)")
    p.add_argument("--eval-batches", type=int, help="synthetic: test batches (default 40)")
    p.add_argument("--max-cardinality", type=int, default=1_000_000, help="synthetic and criteo: cap on table sizes")
    p.add_argument("--eval-split", choices=["test", "val"], default="test",
                   help="the split that evaluates: tune knobs on val, report test. synthetic: its val stream; "
                        "real data: val holds --val-fraction of the --train file out (the --test file is not evaluated)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="real data, --eval-split val: held-out share of the training file")
    p.add_argument("--drift-every", type=int, help="synthetic: the popular IDs change every N steps")
    p.add_argument("--criteo-hash-size", type=int, help="criteo: rows of every table (default: Kaggle sizes, capped)")
    p.add_argument("--checkpoint-dir", help="resume from the latest checkpoint here (if any) and save new ones here")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (needs --checkpoint-dir)")
    p.add_argument("--pipeline", action="store_true", default=None,
                   help="train and evaluate through TorchRec's TrainPipelineSparseDist (input dist of batch k+1 overlaps step k)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=None, help="write the result JSON here (rank 0)")
    args = p.parse_args(argv)
    if args.data != "synthetic" and not (args.train and args.test):
        raise ValueError(f"--data {args.data} needs --train PATH and --test PATH")
    names = {f.name for f in fields(TrainConfig)}
    explicit = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = TrainConfig(**{**PRESETS.get(args.preset or "", {}), **explicit, "method": args.method,
                         "compression_ratio": args.compression_ratio, "progress": not args.no_progress})
    return args, cfg


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args, cfg = parse_args(argv)
    quiet_logs()
    start = time.perf_counter()
    ensure_process_group()
    data, train, test = load(args, cfg)
    result = run(cfg, data, train, test)
    result.update(data=args.data, train_path=args.train, test_path=args.test, wall_s=time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
