"""Shared output of the benchmark scripts: mean ± std cells, markdown tables, JSON files, plots.

matplotlib is optional (requirements-dev.txt): without it the scripts write everything but the PNG.
"""

import json
import os
import statistics
from typing import Callable, Dict, List, Optional, Sequence


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``"m ± s"`` (sample std) for several values, ``"m"`` for one, ``"n/a"`` for none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, obj: object) -> None:
    """Writes atomically (a sweep interrupted mid-write keeps its previous file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def plot(path: str, draw: Callable[["object"], None]) -> Optional[str]:
    """Calls ``draw(axes)`` on a fresh figure and saves it; returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-dev.txt): no plot written")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def group(runs: List[Dict[str, object]], *keys: str) -> Dict[tuple, List[Dict[str, object]]]:
    """Runs grouped by the values of ``keys``, in first-seen order."""
    out: Dict[tuple, List[Dict[str, object]]] = {}
    for r in runs:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out
