"""Train-step time of CAFE vs the hashing trick at the same memory, same DLRM, same batches.

Both models train under DistributedModelParallel (world size 1 unless launched by torchrun) with
fused row-wise Adagrad. Timings interleave the methods in rounds so that machine noise hits both
alike; the ratio of medians is the figure of merit (target <= 1.15).

    python -m examples.benchmarks.train_step --out results/train_step.json
"""

import argparse
import json
import os
import statistics
import time
from typing import Dict, List

import torch

from examples.harness.config import TrainConfig
from examples.harness.data import embedding_tables, synthetic
from examples.harness.model import build_model, ensure_process_group, quiet_logs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--methods", nargs="+", default=["hash", "cafe", "cafe:4"],
        help="method[:cafe_update_interval], e.g. cafe:4 updates the sketch every 4 steps",
    )
    p.add_argument("--compression-ratio", type=float, default=100.0)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=40)
    p.add_argument("--max-cardinality", type=int, default=1_000_000)
    p.add_argument("--out", default="results/train_step.json")
    args = p.parse_args()
    quiet_logs()

    device = ensure_process_group()
    data = synthetic(0, args.batch_size, args.max_cardinality)
    tables = embedding_tables(data.config.cardinalities, 16)
    n = args.warmup + args.rounds * args.steps_per_round
    batches = [b.to(device) for b in data.batches(n)]
    models = {}
    for m in args.methods:
        method, _, interval = m.partition(":")
        cfg = TrainConfig(method=method, compression_ratio=args.compression_ratio, cafe_update_interval=int(interval or 1))
        models[m] = build_model(cfg, tables, data.config.num_dense, device)

    def step(model, opt, batch) -> None:
        loss, _ = model(batch)  # DLRMTrain: batch -> (loss, (loss, logits, labels))
        loss.backward()
        opt.step()
        opt.zero_grad()

    for m, (model, opt, _) in models.items():
        for b in batches[: args.warmup]:
            step(model, opt, b)
    times: Dict[str, List[float]] = {m: [] for m in models}
    for r in range(args.rounds):
        chunk = batches[args.warmup + r * args.steps_per_round : args.warmup + (r + 1) * args.steps_per_round]
        for m, (model, opt, _) in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in chunk:
                step(model, opt, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[m].append((time.perf_counter() - start) / len(chunk) * 1e3)

    base = args.methods[0]
    rows = []
    for m in models:
        med = statistics.median(times[m])
        rows.append({
            "method": m,
            "step_ms_median": med,
            "step_ms_rounds": times[m],
            "samples_per_s": args.batch_size / med * 1e3,
            "ratio_vs_" + base: med / statistics.median(times[base]),
            "embedding_bytes": models[m][2],
        })
    print(f"{'method':<10} {'step ms':>9} {'samples/s':>10} {'ratio':>7} {'bytes':>12}")
    for r in rows:
        print(f"{r['method']:<10} {r['step_ms_median']:>9.2f} {r['samples_per_s']:>10.0f} {r['ratio_vs_' + base]:>7.3f} {r['embedding_bytes']:>12}")
    result = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "compression_ratio": args.compression_ratio,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
