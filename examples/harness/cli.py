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
import json
import os
import time
from dataclasses import fields
from typing import Dict, Optional, Sequence

import torch.distributed as dist

from examples.harness.config import DATA, DENSE_OPTIMIZERS, EMBEDDING_OPTIMIZERS, METHODS, PRESETS, TrainConfig
from examples.harness.data import load
from examples.harness.loop import run
from examples.harness.model import ensure_process_group, quiet_logs


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
    p.add_argument("--cafe-displace-ratio", type=float, help="a blocked candidate demotes an owner it beats by this factor (0: never)")
    p.add_argument("--cafe-max-promotions", type=int, help="IDs one sketch update may promote per table (default: max(32, pool rows / 64); 0: no cap)")
    p.add_argument("--cafe-cold-rows", choices=["composed", "hashed"], help="cold IDs: pool + block row (default) or one hashed row (paper)")
    p.add_argument("--cafe-block-fraction", type=float, help="share of the rows that are block rows (default 0.5)")
    p.add_argument("--cafe-sketch-slots-per-row", type=float, help="sketch slots per physical row (default 1)")
    p.add_argument("--cafe-decay", type=float, help="sketch score decay factor per decay event (paper and default 0.99)")
    p.add_argument("--cafe-slots-per-bucket", type=int, help="sketch slots per bucket (paper: 4)")
    p.add_argument("--cafe-optimizer-state", choices=["copy", "reset"], help="a promoted ID's optimizer state: copied from the row it read (default) or reset")
    p.add_argument("--cafe-form", choices=["replicated", "partitioned"],
                   help="how DMP shards CAFE: replicated sketch (table-wise tables, default) or partitioned (row-wise: each rank owns a hash partition)")
    p.add_argument("--cafe-partitions", type=int, help="partitioned form: hash partitions P, a multiple of the ranks (default: the ranks)")
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
