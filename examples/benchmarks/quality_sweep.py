"""Quality sweep: test AUC and logloss vs compression ratio, every method, several seeds.

Every (method, compression ratio, seed) trains TorchRec's DLRM through ``examples.train_dlrm`` on
the same data, with every method at the same memory per table (sketch and id buffers included);
``full`` trains once per seed. Writes ``<out>.json`` (every run, after each one: ``--resume``
continues an interrupted sweep), ``<out>.md`` (mean ± std tables, also printed) and ``<out>.png``.

Suites (overridable; arguments after ``--`` go to ``examples.train_dlrm``):
  frappe    - train on frappe.validation, test on frappe.test, paper preset, 10 epochs, CR 2 5 10 20;
  synthetic - the planted Criteo-like task (README main job), CR 2 .. 10000;
  ciao      - Ciao ratings (a 105k-item long tail): train on ciao.train, test on ciao.test, trainer
              defaults, 2 epochs, CR 10 100 1000.

    python -m examples.benchmarks.quality_sweep --suite frappe --out results/quality_frappe
    python -m examples.benchmarks.quality_sweep --suite synthetic --crs 100 1000 --out results/quality_synthetic
    python -m examples.benchmarks.quality_sweep --methods hash cafe --crs 10 --seeds 0 -- --data libfm \\
        --train a.libfm --test b.libfm --epochs 2
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from typing import Dict, List, Optional, Sequence

import torch.distributed as dist

from examples.benchmarks.report import group, markdown_table, mean_std, plot, write_json
from examples.harness.cli import parse_args
from examples.harness.config import METHODS
from examples.harness.data import load
from examples.harness.loop import run
from examples.harness.model import ensure_process_group, quiet_logs

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")
FRAPPE_DIR = os.path.join(DATA_DIR, "frappe_ctr")
CIAO_DIR = os.path.join(DATA_DIR, "ciao_ratings")
SUITES: Dict[str, Dict[str, object]] = {
    "frappe": {
        "crs": [2, 5, 10, 20],
        "train_args": ["--data", "libfm", "--train", os.path.join(FRAPPE_DIR, "frappe.validation.libfm.gz"),
                       "--test", os.path.join(FRAPPE_DIR, "frappe.test.libfm.gz"), "--preset", "paper", "--epochs", "10"],
    },
    "synthetic": {"crs": [2, 5, 10, 100, 1000, 10000], "train_args": ["--data", "synthetic", "--train-batches", "600"]},
    "ciao": {
        "crs": [10, 100, 1000],
        "train_args": ["--data", "libfm", "--train", os.path.join(CIAO_DIR, "ciao.train.libfm.gz"),
                       "--test", os.path.join(CIAO_DIR, "ciao.test.libfm.gz"), "--epochs", "2"],
    },
}


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def sweep(methods: Sequence[str], crs: Sequence[float], seeds: Sequence[int], train_args: List[str], out: str, resume: bool,
          label: str = "") -> List[Dict[str, object]]:
    """Runs every missing (method, CR, seed); returns all runs (errors recorded, e.g. a budget MCH cannot fit).
    ``label`` is appended to the recorded method names but full's (a variant's settings in the
    train arguments, e.g. tuned CAFE knobs, sit beside the default runs in one file)."""
    path = out + ".json"
    runs: List[Dict[str, object]] = []
    if resume and os.path.exists(path):
        with open(path) as f:
            runs = json.load(f)["runs"]
    done = {(r["method"], r["compression_ratio"], r["seed"]) for r in runs}
    args, base = parse_args([*train_args, "--no-progress"])
    ensure_process_group()
    for seed in seeds:
        cfg = replace(base, seed=seed)
        data = None
        for method in methods:
            for cr in ([1.0] if method == "full" else crs):
                name = method if method == "full" else method + label
                if (name, float(cr), seed) in done:
                    continue
                if data is None:
                    data, train, test = load(args, cfg)
                start = time.perf_counter()
                try:
                    r = run(replace(cfg, method=method, compression_ratio=float(cr)), data, train, test)
                except ValueError as e:
                    r = {**asdict(replace(cfg, method=method, compression_ratio=float(cr))), "error": str(e)}
                r["wall_s"] = time.perf_counter() - start
                r["method"] = name
                runs.append(r)
                status = r.get("error") or f"auc {r['auc']:.4f} logloss {r['logloss']:.4f} bytes {r['bytes']:,}"
                if rank0():
                    print(f"seed {seed} {name:<9} CR {cr:>7g}: {status} ({r['wall_s']:.0f} s)", flush=True)
                    write_json(path, {"train_args": train_args, "runs": runs})
    return runs


def tables(runs: List[Dict[str, object]], crs: Sequence[float]) -> str:
    """Markdown: AUC and logloss (mean ± std over seeds) per method and CR; full is CR-independent."""
    ok = [r for r in runs if "error" not in r]
    cells = group(ok, "method", "compression_ratio")
    methods = list(dict.fromkeys(r["method"] for r in runs))
    out = []
    for metric in ("auc", "logloss"):
        rows = []
        for m in methods:
            row: List[object] = [m]
            for cr in crs:
                rs = cells.get((m, 1.0 if m == "full" else float(cr)), [])
                err = [r["error"] for r in runs if r["method"] == m and r["compression_ratio"] == float(cr) and "error" in r]
                row.append(mean_std([float(r[metric]) for r in rs]) if rs else ("does not fit" if err else "n/a"))
            rows.append(row)
        out.append(f"Test {metric.upper() if metric == 'auc' else metric} (mean ± std over seeds)\n\n"
                   + markdown_table(["method"] + [f"CR {cr:g}" for cr in crs], rows))
    def bytes_cell(r: Dict[str, object]) -> str:
        return f"{int(r['bytes']):,} ({float(r['achieved_compression']):.3g}x)"

    mem = [[m, *[bytes_cell(cells[(m, float(cr))][0]) if (m, float(cr)) in cells else "" for cr in crs]]
           for m in methods if m != "full"]
    full = next((r for r in ok if r["method"] == "full"), None)
    head = "Embedding bytes, sketch and id state included (achieved compression: full bytes / bytes spent)"
    head += f"; full tables: {int(full['bytes']):,}" if full else ""
    out.append(head + "\n\n" + markdown_table(["method"] + [f"CR {cr:g}" for cr in crs], mem))
    return "\n\n".join(out) + "\n"


def draw(runs: List[Dict[str, object]], crs: Sequence[float], title: str):  # noqa: ANN201
    def on(ax) -> None:  # noqa: ANN001
        cells = group([r for r in runs if "error" not in r], "method", "compression_ratio")
        for m in dict.fromkeys(r["method"] for r in runs):
            if m == "full":
                aucs = [float(r["auc"]) for r in cells.get(("full", 1.0), [])]
                if aucs:
                    ax.axhline(sum(aucs) / len(aucs), color="black", linestyle="--", label="full")
                continue
            xs = [cr for cr in crs if (m, float(cr)) in cells]
            ys = [[float(r["auc"]) for r in cells[(m, float(cr))]] for cr in xs]
            means = [sum(y) / len(y) for y in ys]
            stds = [math.sqrt(sum((v - mu) ** 2 for v in y) / max(len(y) - 1, 1)) for y, mu in zip(ys, means)]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio")
        ax.set_ylabel("test AUC")
        ax.set_title(title)

    return on


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="synthetic")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--crs", type=float, nargs="+", help="compression ratios (default: the suite's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=None, help="output prefix (default results/quality_<suite>)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in <out>.json")
    p.add_argument("--label", default="", help="suffix of the recorded method names (a variant, e.g. '[hf 0.02, th 5]')")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: arguments of examples.train_dlrm (default: the suite's)")
    args = p.parse_args(argv)
    quiet_logs()
    suite = SUITES[args.suite]
    crs = args.crs or suite["crs"]
    train_args = [a for a in args.train_args if a != "--"] or list(suite["train_args"])
    out = args.out or f"results/quality_{args.suite}"
    runs = sweep(args.methods, crs, args.seeds, train_args, out, args.resume, args.label)
    if not rank0():  # under torchrun every rank trains; rank 0 reports
        return
    text = tables(runs, crs)
    text += f"\nCommand: python -m examples.benchmarks.quality_sweep {' '.join(argv if argv is not None else sys.argv[1:])}\n"
    print(text)
    with open(out + ".md", "w") as f:
        f.write(text)
    png = plot(out + ".png", draw(runs, crs, f"{args.suite}: test AUC vs compression ratio"))
    if png:
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
