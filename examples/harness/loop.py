"""The training loop: steps (plain or through TrainPipelineSparseDist), evaluation (torchrec.metrics AUC
and NE), checkpoints, and one whole run."""

import itertools
import statistics
import time
from dataclasses import asdict
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.metrics.auc import AUCMetric
from torchrec.metrics.metrics_config import RecTaskInfo
from torchrec.metrics.ne import NEMetric
from tqdm import tqdm

from examples.harness.config import TrainConfig
from examples.harness.data import Epochs, TestData, TrainData, data_shape, embedding_tables
from examples.harness.model import budget_bytes, build_model, ensure_process_group
from torchrec_cafe import checkpoint
from torchrec_cafe.checkpoint import cafe_modules
from torchrec_cafe.datasets import InMemoryCTR, SyntheticCTR
from torchrec_cafe.modules import MCHEmbeddingBagCollection

CTR_TASK = RecTaskInfo(name="ctr", label_name="label", prediction_name="prediction", weight_name="weight")


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
