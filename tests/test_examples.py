"""The example trainer end to end on tiny synthetic data: every method trains, evaluates and stays
within its memory."""

import json
import math

import pytest
import torch

from examples.harness.config import METHODS, TrainConfig
from examples.harness.data import embedding_tables, synthetic
from examples.harness.loop import run
from torchrec_cafe import CafeConfig, table_budget


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_tiny_data(single_rank_pg: None, method: str) -> None:
    data = synthetic(seed=0, batch_size=64, max_cardinality=20_000)
    train, test = list(data.batches(12)), list(data.batches(3, "test"))
    cfg = TrainConfig(method=method, compression_ratio=10, train_batches=12, eval_batches=3, cafe_threshold=2.0)
    r = run(cfg, data, train, test)
    assert 0.0 <= r["auc"] <= 1.0 and math.isfinite(r["logloss"]) and r["samples_per_s"] > 0
    budgets = [table_budget(t, CafeConfig(compression_ratio=10)) for t in embedding_tables(data.config.cardinalities, 16)]
    full_bytes = sum(b.logical_bytes for b in budgets)
    if method == "full":
        assert r["bytes"] == full_bytes
    else:  # compressed tables within their budget; tables too small to compress stay full
        assert r["bytes"] <= sum(b.budget_bytes if b.compressed else b.logical_bytes for b in budgets)
    if method.startswith("cafe"):
        assert r["promotions"] > 0


def test_quality_sweep_writes_tables_and_resumes(single_rank_pg: None, tmp_path, capsys: pytest.CaptureFixture) -> None:
    """The sweep on tiny synthetic data: JSON of every run, a markdown table with mean ± std and the
    achieved compression, and --resume runs only what is missing."""

    from examples.benchmarks import quality_sweep

    out = str(tmp_path / "q")
    tiny = ["--", "--data", "synthetic", "--train-batches", "4", "--eval-batches", "2", "--batch-size", "64",
            "--max-cardinality", "5000"]
    quality_sweep.main(["--methods", "hash", "--crs", "10", "--seeds", "0", "1", "--out", out, *tiny])
    runs = json.load(open(out + ".json"))["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("hash", 0), ("hash", 1)]
    quality_sweep.main(["--methods", "hash", "cafe", "--crs", "10", "--seeds", "0", "1", "--resume", "--out", out, *tiny])
    runs = json.load(open(out + ".json"))["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == [("cafe", 0), ("cafe", 1), ("hash", 0), ("hash", 1)]
    quality_sweep.main(["--methods", "cafe", "--crs", "10", "--seeds", "0", "--resume", "--label", "[th 1]", "--out", out,
                        *tiny, "--cafe-threshold", "1"])
    variant = [r for r in json.load(open(out + ".json"))["runs"] if r["method"] == "cafe[th 1]"]
    assert len(variant) == 1 and variant[0]["cafe_threshold"] == 1.0
    md = open(out + ".md").read()
    assert "| cafe[th 1] |" in md
    hash_row = next(line for line in md.splitlines() if line.startswith("| hash |"))
    assert "±" in hash_row and "x)" in md.split("Embedding bytes")[1]


def test_tune_cafe_scores_every_grid_point_on_validation(single_rank_pg: None, tmp_path) -> None:
    from examples.benchmarks import tune_cafe

    out = str(tmp_path / "t")
    best = tune_cafe.main(["--crs", "10", "--block-fractions", "0.25", "0.75", "--promote-loads", "0.5", "--out", out, "--",
                           "--data", "synthetic", "--train-batches", "4", "--eval-batches", "2", "--max-cardinality", "5000"])
    runs = json.load(open(out + ".json"))["runs"]
    assert sorted(r["cafe_block_fraction"] for r in runs) == [0.25, 0.75]
    assert {r["cafe_promote_load"] for r in runs} == {0.5} and {r["cafe_demote_load"] for r in runs} == {0.25}
    assert best[10.0]["val_auc"] == max(r["auc"] for r in runs)
    assert "**" in open(out + ".md").read()


def test_sketch_throughput_runs_and_reports(tmp_path) -> None:
    from examples.benchmarks import sketch_throughput

    out = tmp_path / "s.json"
    sketch_throughput.main(["--batch-sizes", "256", "--buckets", "64", "--group-tables", "2", "--group-buckets", "16",
                            "--num-ids", "2000", "--warmup-ids", "1024", "--ids-per-rep", "512", "--repeats", "1",
                            "--devices", "cpu", "--out", str(out)])
    rows = json.load(open(out))["results"]
    assert all(r["update_ids_per_s"]["median"] > 0 and r["query_ids_per_s"]["median"] > 0 for r in rows)
    assert sorted((r["implementation"], r["case"]) for r in rows) == [(i, c) for i in ("kernels", "tensor") for c in ("grouped T=2", "single")]


def test_serving_latency_runs_and_reports(tmp_path) -> None:
    from examples.benchmarks import serving_latency

    out = str(tmp_path / "serve")
    threads = torch.get_num_threads()
    try:
        serving_latency.main(["--batches", "8", "--reps", "2", "--train-steps", "2", "--out", out])
    finally:
        torch.set_num_threads(threads)  # the benchmark pins one thread
    rows = json.load(open(out + ".json"))["runs"]
    assert len(rows) == 1 and rows[0]["batch"] == 8 and rows[0]["ratio"] > 0
