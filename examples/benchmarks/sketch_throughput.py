"""Batched HotSketch throughput: ``update`` and query (``lookup``) ids/s on CPU (the compiled
kernels and the tensor implementation), and on CUDA when available (tensor implementation).

A Zipf-like stream (rank r of ~10M distinct ids drawn with probability ~ (r + 1)**-s, ranks hashed
over int64, score 1 per occurrence) feeds two sketches: one table with K = H = 100k (c = 4,
threshold 20, decay 0.99), and 26 tables with K = H = 4000 each, the table of each occurrence drawn
uniformly, to show that one grouped update costs the same as one table of the same total size.
After a warm-up that fills the sketch, each repetition times ``--ids-per-rep`` ids of updates, then
queries of the same ids; the median and best repetitions are compared with the official CAFE C++
sketch (serial, batches of 16k ids, on this kind of machine).

    python -m examples.benchmarks.sketch_throughput --out results/sketch_throughput.json
    python -m examples.benchmarks.sketch_throughput --profile 16384   # top ops of the updates only
"""

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from torchrec_cafe.sketch import HotSketch, kernels
from torchrec_cafe.sketch.hashing import mix64

# Official CAFE C++ sketch, serial, batches of 16k ids: millions of ids per second.
CPP_UPDATE_MIDS, CPP_QUERY_MIDS = 41.0, 93.0
_ID_SEED = 0xCAFE

Batch = Tuple[torch.Tensor, Optional[torch.Tensor]]
BatchFn = Callable[[torch.Tensor, Optional[torch.Tensor]], object]


@dataclass
class Case:
    name: str
    tables: int
    buckets: int  # K = H of each table


class ZipfStream:
    """Batches of (ids, tables): ranks from a power law truncated to ``num_ids``, hashed to int64."""

    def __init__(self, num_ids: int, exponent: float, num_tables: int, seed: int) -> None:
        self.num_ids, self.num_tables = num_ids, num_tables
        self.gen = torch.Generator().manual_seed(seed)
        # Inverse CDF of the density ~ x**-s on [1, num_ids + 1).
        self._inv = 1.0 / (1.0 - exponent)
        self._span = 1.0 - (num_ids + 1.0) ** (1.0 - exponent)

    def batch(self, n: int, device: torch.device) -> Batch:
        u = torch.rand(n, generator=self.gen, dtype=torch.float64)
        rank = ((1.0 - u * self._span) ** self._inv).long().sub_(1).clamp_(0, self.num_ids - 1)
        tables = torch.randint(self.num_tables, (n,), generator=self.gen) if self.num_tables > 1 else None
        return mix64(rank, _ID_SEED).to(device), None if tables is None else tables.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: BatchFn, batches: List[Batch], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for ids, tables in batches:
        fn(ids, tables)
    _sync(device)
    return time.perf_counter() - start


def _summary(rates: List[float]) -> Dict[str, object]:
    return {"median": statistics.median(rates), "best": max(rates), "runs": rates}


def _setup(
    case: Case, args: argparse.Namespace, batch: int, device: torch.device, use_kernels: bool = True
) -> Tuple[HotSketch, ZipfStream, BatchFn]:
    """A warmed-up sketch of ``case``, its stream, and its update function."""
    t, k = case.tables, case.buckets
    sk = HotSketch([k] * t, [k] * t, args.threshold, slots_per_bucket=args.slots, decay=args.decay, device=device)
    sk.use_kernels = use_kernels
    stream = ZipfStream(args.num_ids, args.zipf, t, args.seed)
    ones = torch.ones(batch, device=device)

    def update(ids: torch.Tensor, tables: Optional[torch.Tensor]) -> object:
        return sk.update(ids, ones, tables)

    for _ in range(max(1, args.warmup_ids // batch)):
        update(*stream.batch(batch, device))
    _sync(device)
    return sk, stream, update


def measure(case: Case, args: argparse.Namespace, batch: int, device: torch.device, use_kernels: bool) -> Dict[str, object]:
    sk, stream, update = _setup(case, args, batch, device, use_kernels)
    steps = max(1, args.ids_per_rep // batch)
    upd, qry = [], []
    for _ in range(args.repeats):
        batches = [stream.batch(batch, device) for _ in range(steps)]
        upd.append(steps * batch / _timed(update, batches, device))
        qry.append(steps * batch / _timed(sk.lookup, batches, device))
    stats = sk.stats(0)
    return {
        "device": str(device),
        "implementation": "kernels" if sk.kernels_apply() else "tensor",
        "case": case.name,
        "tables": case.tables,
        "buckets_per_table": case.buckets,
        "batch": batch,
        "ids_per_rep": steps * batch,
        "update_ids_per_s": _summary(upd),
        "query_ids_per_s": _summary(qry),
        "vs_cpp": {
            "update": statistics.median(upd) / 1e6 / CPP_UPDATE_MIDS,
            "query": statistics.median(qry) / 1e6 / CPP_QUERY_MIDS,
        },
        "table0_hot_ids": stats["hot_ids"],
        "table0_tracked_ids": stats["tracked_ids"],
    }


def profile(case: Case, args: argparse.Namespace, batch: int, device: torch.device) -> None:
    """Prints the 10 ops with the most self time over ``--ids-per-rep`` ids of updates."""
    _, stream, update = _setup(case, args, batch, device)
    batches = [stream.batch(batch, device) for _ in range(max(1, args.ids_per_rep // batch))]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _timed(update, batches, device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### {device}, {case.name}, batch {batch}: top ops by {sort_by}\n")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=10))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16384, 262144])
    p.add_argument("--buckets", type=int, default=100_000, help="K = H of the single-table case")
    p.add_argument("--group-tables", type=int, default=26)
    p.add_argument("--group-buckets", type=int, default=4000, help="K = H of each table of the grouped case")
    p.add_argument("--slots", type=int, default=4, help="c, slots per bucket")
    p.add_argument("--threshold", type=float, default=20.0)
    p.add_argument("--decay", type=float, default=0.99)
    p.add_argument("--num-ids", type=int, default=10_000_000, help="distinct ids of the stream")
    p.add_argument("--zipf", type=float, default=1.1, help="exponent s of the id distribution (> 1)")
    p.add_argument("--warmup-ids", type=int, default=1 << 22)
    p.add_argument("--ids-per-rep", type=int, default=1 << 21)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument(
        "--profile", type=int, nargs="?", const=16384, metavar="BATCH",
        help="instead of the benchmark, profile single-table updates at this batch size (default 16384)",
    )
    p.add_argument("--out", default="results/sketch_throughput.json")
    args = p.parse_args(argv)

    cases = [
        Case("single", 1, args.buckets),
        Case(f"grouped T={args.group_tables}", args.group_tables, args.group_buckets),
    ]
    devices = [torch.device(d) for d in args.devices]
    if args.profile is not None:
        for device in devices:
            profile(cases[0], args, args.profile, device)
        return

    paths = {d: ([True, False] if d.type == "cpu" and kernels.AVAILABLE else [False]) for d in devices}
    results = [
        measure(case, args, b, device, k) for device in devices for k in paths[device] for case in cases for b in args.batch_sizes
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; M ids/s as median (best)\n")
    print("| device | implementation | case | batch | update M ids/s | query M ids/s | vs official C++ (41 upd, 93 qry M/s) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        u, q = r["update_ids_per_s"], r["query_ids_per_s"]
        print(
            f"| {r['device']} | {r['implementation']} | {r['case']} | {r['batch']} | {u['median'] / 1e6:.2f} ({u['best'] / 1e6:.2f}) "
            f"| {q['median'] / 1e6:.2f} ({q['best'] / 1e6:.2f}) "
            f"| upd {r['vs_cpp']['update']:.3g}x, qry {r['vs_cpp']['query']:.3g}x |"
        )
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "profile")},
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "reference_official_cpp": {
            "update_mids_per_s": CPP_UPDATE_MIDS,
            "query_mids_per_s": CPP_QUERY_MIDS,
            "note": "official CAFE serial C++ sketch, batches of 16k ids, this kind of machine",
        },
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
