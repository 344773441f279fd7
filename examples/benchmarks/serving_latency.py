"""Serving latency: the exported CAFE module against a hashed EBC of the same memory, both scripted.

16 tables of dim 16 (1M to 10M logical rows), CR 100; CAFE trained a few hundred steps on a
Zipf stream so that its sketch holds hot IDs; the hashed EBC is TorchRec's ``EmbeddingBagCollection``
with the hashing trick's row counts at the same CR, reading row ``id mod rows``. Both are
``torch.jit.script``-ed (CAFE through ``export_for_inference`` and
``torchrec.fx``), one thread, the same KJTs (Zipf IDs, bags of 1..4), forward only, interleaved
repetitions; medians.

    python -m examples.benchmarks.serving_latency --reps 200 --out results/serving_latency
"""

import argparse
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from examples.benchmarks.report import markdown_table, write_json
from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.inference import export_for_inference
from torchrec_cafe.modules.hashing import hashed_table_rows, resized_table

TABLES = [
    EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=1_000_000 * (1 + i % 10), feature_names=[f"f{i}"])
    for i in range(16)
]


def zipf_kjt(batch: int, seed: int) -> KeyedJaggedTensor:
    """Bags of 1..4 Zipf(1.1) IDs per feature, scattered over int64."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (len(TABLES) * batch,), generator=g)
    u = torch.rand(int(lengths.sum()), generator=g, dtype=torch.float64)
    ranks = u.pow(-1 / 0.1).clamp(max=1e7).long()
    return KeyedJaggedTensor(keys=[t.feature_names[0] for t in TABLES], values=ranks * 2654435761 % (1 << 40), lengths=lengths)


class HashedEBC(torch.nn.Module):
    """TorchRec's EBC of the hashing trick's sizes: raw IDs -> ``id mod rows`` -> pooled (scriptable)."""

    def __init__(self, compression_ratio: float) -> None:
        super().__init__()
        rows = [hashed_table_rows(t, compression_ratio) for t in TABLES]
        self.ebc = EmbeddingBagCollection([resized_table(t, r) for t, r in zip(TABLES, rows)])
        self.register_buffer("rows", torch.tensor(rows))
        self.keys = [t.feature_names[0] for t in TABLES]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        per_key = features.length_per_key()
        rows = torch.repeat_interleave(self.rows, torch.tensor(per_key), output_size=sum(per_key))
        values = torch.remainder(features.values(), rows)
        return self.ebc(KeyedJaggedTensor(keys=self.keys, values=values, lengths=features.lengths(), stride=features.stride()))


def trained_cafe(steps: int) -> CafeEmbeddingBagCollection:
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=CafeConfig(compression_ratio=100, importance="frequency"))
    for step in range(steps):
        cafe(zipf_kjt(512, 10_000 + step))
    cafe.apply_pending_updates()
    return cafe.eval()


def median_ms(module: torch.nn.Module, kjts: List[KeyedJaggedTensor]) -> float:
    times = []
    for kjt in kjts:
        start = time.perf_counter()
        module(kjt)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 512, 4096])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--out", default="results/serving_latency")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cafe = trained_cafe(args.train_steps)
    hot_ids = sum(s["hot_ids"] for s in cafe.stats().values())
    served = {
        "cafe (exported)": torch.jit.script(export_for_inference(cafe)),
        "hashed EBC": torch.jit.script(HashedEBC(100).eval()),
    }
    rows: List[Dict[str, object]] = []
    for batch in args.batches:
        kjts = [zipf_kjt(batch, seed) for seed in range(args.reps)]
        for module in served.values():  # warm-up
            module(kjts[0])
        times: Dict[str, List[float]] = {name: [] for name in served}
        for kjt in kjts:  # interleaved
            for name, module in served.items():
                times[name].append(median_ms(module, [kjt]))
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"batch": batch, **{f"{k} ms": v for k, v in med.items()}, "ratio": med["cafe (exported)"] / med["hashed EBC"]})
    table = markdown_table(
        ["batch", "CAFE exported (ms)", "hashed EBC (ms)", "CAFE / hashed"],
        [[r["batch"], f"{r['cafe (exported) ms']:.2f}", f"{r['hashed EBC ms']:.2f}", f"{r['ratio']:.2f}"] for r in rows],
    )
    print(table)
    write_json(args.out + ".json", {"tables": len(TABLES), "dim": 16, "compression_ratio": 100, "hot_ids": hot_ids, "runs": rows})
    with open(args.out + ".md", "w") as f:
        f.write(f"# Serving latency (one thread)\n\n`python -m examples.benchmarks.serving_latency --reps {args.reps} --out {args.out}`\n\n{table}\n")


if __name__ == "__main__":
    main()
