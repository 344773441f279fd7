"""Tune CAFE's two budget knobs on validation data: a grid of hash fraction x threshold.

The paper's schedule (``CafeConfig`` defaults) was tuned on Criteo with tens of millions of samples;
a shorter stream or another popularity profile may want another split of the budget. Every grid
point trains ``examples.train_dlrm`` with ``--method cafe`` and is scored on the *validation*
split (``--eval-split val``), so the test split stays untouched for the sweep that reports the
chosen setting. Writes ``<out>.json`` (every run) and ``<out>.md`` (validation AUC per cell; the
best cell per compression ratio in bold), and prints the table.

    python -m examples.benchmarks.tune_cafe --out results/tune_synthetic
    python -m examples.benchmarks.tune_cafe --crs 100 --hash-fractions 0.02 0.3 --thresholds 5 100
"""

import argparse
import sys
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

from examples.benchmarks.report import markdown_table, write_json
from examples.train_dlrm import ensure_process_group, load, parse_args, quiet_logs, run


def main(argv: Optional[Sequence[str]] = None) -> Dict[float, Dict[str, float]]:
    """Returns the best (hash_fraction, threshold, val AUC) per compression ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crs", type=float, nargs="+", default=[100, 1000])
    p.add_argument("--hash-fractions", type=float, nargs="+", default=[0.02, 0.1, 0.3])
    p.add_argument("--thresholds", type=float, nargs="+", default=[5, 20, 100])
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
        for hf in args.hash_fractions:
            for th in args.thresholds:
                r = run(replace(base, compression_ratio=cr, cafe_hash_fraction=hf, cafe_threshold=th), data, train, val)
                runs.append(r)
                print(f"CR {cr:g} hash_fraction {hf:g} threshold {th:g}: val AUC {r['auc']:.4f}, hot IDs {r['hot_ids']}", flush=True)
                write_json(args.out + ".json", {"train_args": extra, "split": "val", "runs": runs})
    text, best = report(runs, args.crs, args.hash_fractions, args.thresholds)
    text = (f"Validation AUC of CAFE (seed {args.seed}) by hash fraction and threshold\n\n{text}"
            f"\n\nCommand: python -m examples.benchmarks.tune_cafe {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    return best


def report(runs: List[Dict[str, object]], crs: Sequence[float], hash_fractions: Sequence[float],
           thresholds: Sequence[float]) -> "tuple[str, Dict[float, Dict[str, float]]]":
    """Markdown grid (best eligible cell per CR in bold) and the best settings per CR. A setting is
    eligible only within the budget: a small hash fraction can leave a table too few shared rows to
    compress it, and a table kept full costs far more than its budget."""
    best: Dict[float, Dict[str, float]] = {}
    for cr in crs:
        fits = [r for r in runs if r["compression_ratio"] == cr and _fits(r)]
        if fits:
            top = max(fits, key=lambda r: r["auc"])
            best[cr] = {"hash_fraction": top["cafe_hash_fraction"], "threshold": top["cafe_threshold"], "val_auc": top["auc"]}
    rows = []
    for cr in crs:
        for hf in hash_fractions:
            cells = []
            for th in thresholds:
                r = next(r for r in runs if (r["compression_ratio"], r["cafe_hash_fraction"], r["cafe_threshold"]) == (cr, hf, th))
                cell = f"{r['auc']:.4f} ({r['hot_ids']:,} hot)" + ("" if _fits(r) else " over budget")
                chosen = cr in best and (hf, th) == (best[cr]["hash_fraction"], best[cr]["threshold"])
                cells.append(f"**{cell}**" if chosen else cell)
            rows.append([f"{cr:g}", f"{hf:g}", *cells])
    return markdown_table(["CR", "hash fraction", *[f"threshold {th:g}" for th in thresholds]], rows), best


def _fits(run: Dict[str, object]) -> bool:
    return run["bytes"] <= run["budget_bytes"]


if __name__ == "__main__":
    main()
