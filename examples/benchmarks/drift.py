"""Drift: the synthetic stream's popular IDs change mid-training; test AUC over time per method.

The planted task (``SyntheticConfig(drift_every=D)``) maps popularity ranks to other IDs from step D
on, so the IDs that matter after the drift were rare before it. Each method trains 2·D steps and is
evaluated every ``--eval-every`` steps on test batches of the popularity in force at the last
training step. Reported per method (mean over seeds): AUC just before the drift, the lowest AUC
after it, and the steps after the drift until AUC is back within 1 % of its pre-drift value.
Writes ``<out>.json`` and ``<out>.png``, prints a markdown table.

    python -m examples.benchmarks.drift --out results/drift
    python -m examples.benchmarks.drift --drift-at 10 --eval-every 5 --batch-size 64 --max-cardinality 20000
"""

import argparse
import statistics
import sys
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

from examples.benchmarks.report import group, markdown_table, mean_std, plot, write_json
from examples.harness.cli import parse_args
from examples.harness.config import METHODS
from examples.harness.data import load
from examples.harness.loop import run
from examples.harness.model import ensure_process_group, quiet_logs


def recovery(history: List[Dict[str, float]], drift_at: int, tolerance: float = 0.01) -> Dict[str, Optional[float]]:
    """Pre-drift AUC (the eval at the drift step), the post-drift minimum, and the steps after the
    drift to the first eval with AUC >= (1 - tolerance) x pre-drift AUC (None: never)."""
    pre = next(h["auc"] for h in history if h["step"] == drift_at)
    after = [h for h in history if h["step"] > drift_at]
    back = next((h["step"] - drift_at for h in after if h["auc"] >= (1 - tolerance) * pre), None)
    return {"pre_drift_auc": pre, "min_auc_after": min(h["auc"] for h in after), "recovery_steps": back}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["hash", "qr", "mch_lfu", "mch_dlfu", "cafe"])
    p.add_argument("--compression-ratio", type=float, default=100.0)
    p.add_argument("--drift-at", type=int, default=400, help="step at which the popular IDs change (train 2x this)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--max-cardinality", type=int, default=1_000_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="results/drift")
    args = p.parse_args(argv)
    if args.drift_at % args.eval_every:
        raise ValueError(f"--drift-at ({args.drift_at}) must be a multiple of --eval-every ({args.eval_every})")
    quiet_logs()
    ensure_process_group()
    d = args.drift_at
    runs = []
    for seed in args.seeds:
        train_args, base = parse_args(["--drift-every", str(d), "--train-batches", str(2 * d), "--eval-batches", str(args.eval_batches),
                                       "--batch-size", str(args.batch_size), "--max-cardinality", str(args.max_cardinality),
                                       "--compression-ratio", str(args.compression_ratio), "--eval-every", str(args.eval_every),
                                       "--seed", str(seed), "--no-progress"])
        data, train, test = load(train_args, base)  # test(step): batches of the popularity of step - 1
        for method in args.methods:
            r = run(replace(base, method=method), data, train, test)
            r.update(recovery(r["history"], d))
            runs.append(r)
            print(f"seed {seed} {method:<9} pre-drift AUC {r['pre_drift_auc']:.4f}  min after {r['min_auc_after']:.4f}  "
                  f"recovered after {r['recovery_steps']} steps", flush=True)
            write_json(args.out + ".json", {"args": vars(args), "runs": runs})

    rows = []
    for (method,), rs in group(runs, "method").items():
        steps = [r["recovery_steps"] for r in rs]
        recovered = [s for s in steps if s is not None]
        rows.append([method, mean_std([r["pre_drift_auc"] for r in rs]), mean_std([r["min_auc_after"] for r in rs]),
                     f"{statistics.mean(recovered):.0f}" if recovered else "never", f"{len(recovered)}/{len(steps)}",
                     mean_std([r["auc"] for r in rs])])
    text = (f"Drift at step {d} of {2 * d} (CR {args.compression_ratio:g}, batch {args.batch_size}, seeds {args.seeds})\n\n"
            + markdown_table(["method", "AUC before drift", "lowest AUC after", "steps to within 1 %", "seeds recovered", "final AUC"], rows)
            + f"\n\nCommand: python -m examples.benchmarks.drift {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text)

    def draw(ax) -> None:  # noqa: ANN001
        for (method,), rs in group(runs, "method").items():
            steps = [h["step"] for h in rs[0]["history"]]
            aucs = [statistics.mean(r["history"][i]["auc"] for r in rs) for i in range(len(steps))]
            ax.plot(steps, aucs, marker=".", label=method)
        ax.axvline(d, color="black", linestyle=":", label="drift")
        ax.set_xlabel("training step")
        ax.set_ylabel("test AUC (mean over seeds)")
        ax.set_title(f"Popularity drift at step {d}, CR {args.compression_ratio:g}")

    png = plot(args.out + ".png", draw)
    if png:
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
