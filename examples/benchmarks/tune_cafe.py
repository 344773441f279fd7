"""Tune CAFE's two layout knobs on validation data: a grid of block fraction x promotion load.

``block_fraction`` splits a composed table's rows between the pool (hashed rows, some of them
private) and the ID-range block rows; ``promote_load`` sets how hot an ID must be, relative to a
pool row's average score mass, to own a row (the demotion bar is half of it). The defaults were
chosen on the validation splits of Ciao, Frappe and the synthetic task; another popularity profile
may want others. Every grid point trains ``examples.train_dlrm`` with ``--method cafe`` and is
scored on the *validation* split (``--eval-split val``), so the test split stays untouched. Writes
``<out>.json`` (every run) and ``<out>.md`` (validation AUC per cell; the best cell per
compression ratio in bold), and prints the table.

    python -m examples.benchmarks.tune_cafe --out results/tune_synthetic
    python -m examples.benchmarks.tune_cafe --crs 100 --block-fractions 0.5 0.75 --promote-loads 0.1 1
"""

import argparse
import sys
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

from examples.benchmarks.report import markdown_table, write_json
from examples.harness.cli import parse_args
from examples.harness.data import load
from examples.harness.loop import run
from examples.harness.model import ensure_process_group, quiet_logs


def main(argv: Optional[Sequence[str]] = None) -> Dict[float, Dict[str, float]]:
    """Returns the best (block_fraction, promote_load, val AUC) per compression ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crs", type=float, nargs="+", default=[100, 1000])
    p.add_argument("--block-fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--promote-loads", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/tune_synthetic")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: arguments of examples.train_dlrm")
    args = p.parse_args(argv)
    quiet_logs()
    extra = [a for a in args.train_args if a != "--"] or ["--data", "synthetic", "--train-batches", "600"]
    train_args, base = parse_args([*extra, "--eval-split", "val", "--method", "cafe", "--no-progress"])
    base = replace(base, seed=args.seed)
    ensure_process_group()
    data, train, val = load(train_args, base)
    runs: List[Dict[str, object]] = []
    for cr in args.crs:
        for bf in args.block_fractions:
            for pl in args.promote_loads:
                cfg = replace(base, compression_ratio=cr, cafe_block_fraction=bf, cafe_promote_load=pl, cafe_demote_load=pl / 2)
                r = run(cfg, data, train, val)
                runs.append(r)
                print(f"CR {cr:g} block_fraction {bf:g} promote_load {pl:g}: val AUC {r['auc']:.4f}, hot IDs {r['hot_ids']}", flush=True)
                write_json(args.out + ".json", {"train_args": extra, "split": "val", "runs": runs})
    text, best = report(runs, args.crs, args.block_fractions, args.promote_loads)
    text = (f"Validation AUC of CAFE (seed {args.seed}) by block fraction and promotion load\n\n{text}"
            f"\n\nCommand: python -m examples.benchmarks.tune_cafe {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    return best


def report(runs: List[Dict[str, object]], crs: Sequence[float], block_fractions: Sequence[float],
           promote_loads: Sequence[float]) -> "tuple[str, Dict[float, Dict[str, float]]]":
    """Markdown grid (best cell per CR in bold; a run over its budget is marked and never chosen)
    and the best settings per CR."""
    best: Dict[float, Dict[str, float]] = {}
    for cr in crs:
        fits = [r for r in runs if r["compression_ratio"] == cr and _fits(r)]
        if fits:
            top = max(fits, key=lambda r: r["auc"])
            best[cr] = {"block_fraction": top["cafe_block_fraction"], "promote_load": top["cafe_promote_load"], "val_auc": top["auc"]}
    rows = []
    for cr in crs:
        for bf in block_fractions:
            cells = []
            for pl in promote_loads:
                r = next(r for r in runs if (r["compression_ratio"], r["cafe_block_fraction"], r["cafe_promote_load"]) == (cr, bf, pl))
                cell = f"{r['auc']:.4f} ({r['hot_ids']:,} hot)" + ("" if _fits(r) else " over budget")
                chosen = cr in best and (bf, pl) == (best[cr]["block_fraction"], best[cr]["promote_load"])
                cells.append(f"**{cell}**" if chosen else cell)
            rows.append([f"{cr:g}", f"{bf:g}", *cells])
    return markdown_table(["CR", "block fraction", *[f"promote load {pl:g}" for pl in promote_loads]], rows), best


def _fits(run: Dict[str, object]) -> bool:
    return run["bytes"] <= run["budget_bytes"]


if __name__ == "__main__":
    main()
