"""The example trainer end to end on tiny synthetic data: every method trains, evaluates and stays
within its memory."""

import math

import pytest

from examples.train_dlrm import METHODS, TrainConfig, embedding_tables, run, synthetic
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
