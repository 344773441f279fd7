"""Two-rank train step: CAFE vs the hashing trick at the same memory under the same plan, and the
cost of keeping the sketch replicas identical (bytes and milliseconds per step).

Spawns ``--world`` processes (gloo on CPU, nccl on CUDA), builds the synthetic-data DLRM with
``CafeEmbeddingBagCollectionSharder`` (CAFE) or TorchRec's EBC sharder (hashing), every physical
table placed ``--sharding`` with fused row-wise Adagrad, and times interleaved rounds of steps.

    python -m examples.benchmarks.sharded_step --out results/sharded_step.json
    python -m examples.benchmarks.sharded_step --sharding row_wise --form partitioned --out results/sharded_step_row_wise_partitioned.json
"""

import argparse
import json
import os
import socket
import statistics
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.models.dlrm import DLRM
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

import torchrec_cafe.modules.cafe_embedding_bag as cafe_module
from examples.harness.config import TrainConfig
from examples.harness.data import embedding_tables, synthetic
from examples.harness.model import build_ebc, quiet_logs
from torchrec_cafe.distributed import CafeEmbeddingBagCollectionSharder, CafeStorageReservation, RowWiseEverywhereEBCSharder
from torchrec_cafe.sketch import HotSketch
from torchrec_cafe.sketch.replicas import spans_ranks


def _timed_sync(stats: Dict[str, float]) -> None:
    """Counts the bytes each rank ships for a CAFE update and the time of its collectives
    (the gather forms time the whole call minus the sketch update itself)."""
    occurrences, aggregated = cafe_module.all_gather_occurrences, cafe_module.all_gather_aggregated
    rescale, update_quanta = cafe_module.normalised_scores, HotSketch.update_quanta

    def timed(fn, sent):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            stats["sync_s"] += time.perf_counter() - start
            stats["sync_bytes"] += sent(*args)
            return out

        return call

    def untimed_update(self, *args):  # noqa: ANN001, ANN002, ANN202
        start = time.perf_counter()
        out = update_quanta(self, *args)
        stats["sync_s"] -= time.perf_counter() - start
        return out

    cafe_module.all_gather_occurrences = timed(occurrences, lambda ids, *_: ids.numel() * 20 + 8)
    cafe_module.all_gather_aggregated = timed(
        aggregated, lambda sketch, ids, scores, tables, *_: _pairs(sketch, ids, tables) * 24 + 8 + 8 * sketch.num_tables
    )
    cafe_module.normalised_scores = timed(
        rescale, lambda norms, feature, num_features, group, *_: 16 * num_features if spans_ranks(group) else 0
    )
    HotSketch.update_quanta = untimed_update


def _pairs(sketch: HotSketch, ids: torch.Tensor, tables: torch.Tensor) -> int:
    """Unique (table, id) pairs a rank ships in the aggregated form (counted outside the timing)."""
    return int(torch.unique(ids * sketch.num_tables + tables).numel()) if ids.numel() else 0


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    quiet_logs()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(args.world))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.world)
    try:
        data = synthetic(rank, args.batch_size, args.max_cardinality)  # each rank: its own stream
        tables = embedding_tables(data.config.cardinalities, 16)
        n = args.warmup + args.rounds * args.steps_per_round
        batches = [b.to(device) for b in data.batches(n)]
        stats = {"sync_s": 0.0, "sync_bytes": 0.0}
        _timed_sync(stats)
        models = {}
        for method in ("hash", "cafe"):
            torch.manual_seed(0)
            ebc = build_ebc(TrainConfig(method=method, compression_ratio=args.compression_ratio, cafe_sync=args.sync), tables, device)
            model = DLRM(embedding_bag_collection=ebc, dense_in_features=13, dense_arch_layer_sizes=[64, 16],
                         over_arch_layer_sizes=[64, 32, 1], dense_device=device)
            apply_optimizer_in_backward(RowWiseAdagrad, ebc._embedding_bag_collection.parameters(), {"lr": 0.05})
            sharders = [CafeEmbeddingBagCollectionSharder(form=args.form), RowWiseEverywhereEBCSharder()]
            names = [c.name for c in ebc._embedding_bag_collection.embedding_bag_configs()]
            constraints = {t: ParameterConstraints(sharding_types=[args.sharding], compute_kernels=["fused"]) for t in names}
            topology = Topology(world_size=args.world, compute_device=device.type, local_world_size=args.world)
            planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                               storage_reservation=CafeStorageReservation(percentage=0.15))
            plan = planner.plan(model, sharders)
            dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
            dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
            models[method] = (dmp, torch.optim.Adagrad(dense.values(), lr=0.05))

        def step(dmp, opt, batch) -> None:  # noqa: ANN001
            logits = dmp(batch.dense_features, batch.sparse_features).squeeze(-1)
            torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
            opt.step()
            opt.zero_grad()

        for dmp, opt in models.values():
            for b in batches[: args.warmup]:
                step(dmp, opt, b)
        times: Dict[str, List[float]] = {m: [] for m in models}
        for r in range(args.rounds):
            chunk = batches[args.warmup + r * args.steps_per_round : args.warmup + (r + 1) * args.steps_per_round]
            for method, (dmp, opt) in models.items():
                if method == "cafe":
                    stats.update(sync_s=0.0, sync_bytes=0.0)
                dist.barrier()
                start = time.perf_counter()
                for b in chunk:
                    step(dmp, opt, b)
                if cuda:
                    torch.cuda.synchronize()
                times[method].append((time.perf_counter() - start) / len(chunk) * 1e3)
        result = {
            "step_ms": {m: statistics.median(t) for m, t in times.items()},
            "sync_ms_per_step": stats["sync_s"] / args.steps_per_round * 1e3,
            "sync_bytes_per_step": stats["sync_bytes"] / args.steps_per_round,
        }
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sharding", default=ShardingType.TABLE_WISE.value)
    p.add_argument("--sync", choices=["aggregated", "occurrences"], default="aggregated", help="replicated form's sketch sync")
    p.add_argument("--form", choices=["replicated", "partitioned"], default="replicated", help="CAFE's sharded form (partitioned: row_wise only)")
    p.add_argument("--compression-ratio", type=float, default=100.0)
    p.add_argument("--batch-size", type=int, default=512, help="per rank")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps-per-round", type=int, default=30)
    p.add_argument("--max-cardinality", type=int, default=1_000_000)
    p.add_argument("--out", default="results/sharded_step.json")
    args = p.parse_args()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, args, out_dir), nprocs=args.world, start_method="spawn")
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(args.world)]
    for r in range(args.world):
        os.remove(os.path.join(out_dir, f"rank{r}.pt"))
    step = {m: max(r["step_ms"][m] for r in ranks) for m in ("hash", "cafe")}
    summary = {
        "world": args.world,
        "sharding": args.sharding,
        "sync": args.sync,
        "form": args.form,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "batch_per_rank": args.batch_size,
        "step_ms": step,
        "ratio_cafe_vs_hash": step["cafe"] / step["hash"],
        "sync_ms_per_step": max(r["sync_ms_per_step"] for r in ranks),
        "sync_bytes_per_step_per_rank": ranks[0]["sync_bytes_per_step"],
        "ranks": ranks,
    }
    print("| world | sharding | form | sync | hash step ms | CAFE step ms | ratio | sketch sync ms/step | sync bytes/step/rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.world} | {args.sharding} | {args.form} | {args.sync} | {step['hash']:.2f} | {step['cafe']:.2f} | {summary['ratio_cafe_vs_hash']:.2f} | "
          f"{summary['sync_ms_per_step']:.2f} | {summary['sync_bytes_per_step_per_rank']:,.0f} |")
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
