"""Tests of the synthetic Criteo-like CTR generator."""

import math
from typing import Any, Dict

import pytest
import torch
from torchrec.datasets.utils import Batch

from torchrec_cafe.datasets import (
    CRITEO_KAGGLE_CARDINALITIES,
    SyntheticConfig,
    SyntheticCTR,
    binary_auc,
    truncated_zipf_ranks,
)

BIG = "cat_2"  # 10M in Criteo, capped to 1M by default


def _ids(batch: Batch, feature: str) -> torch.Tensor:
    return batch.sparse_features[feature].values()


def _assert_same(a: Batch, b: Batch) -> None:
    assert torch.equal(a.dense_features, b.dense_features)
    assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
    assert torch.equal(a.labels, b.labels)


def test_default_config_is_capped_criteo() -> None:
    cfg = SyntheticConfig()
    assert len(cfg.cardinalities) == 26 and cfg.num_dense == 13
    assert cfg.cardinalities == [min(c, 1_000_000) for c in CRITEO_KAGGLE_CARDINALITIES]


def test_same_seed_and_step_give_identical_batches_in_any_order() -> None:
    a, b = SyntheticCTR(SyntheticConfig(seed=3)), SyntheticCTR(SyntheticConfig(seed=3))
    later = a.batch(7)
    _assert_same(a.batch(5), b.batch(5))
    _assert_same(later, b.batch(7))


def test_different_seed_or_step_gives_different_batches() -> None:
    a, b = SyntheticCTR(SyntheticConfig(seed=0)), SyntheticCTR(SyntheticConfig(seed=1))
    assert not torch.equal(_ids(a.batch(0), BIG), _ids(b.batch(0), BIG))
    assert not torch.equal(_ids(a.batch(0), BIG), _ids(a.batch(1), BIG))


def test_samples_are_indexed_globally_not_per_batch() -> None:
    small = SyntheticCTR(SyntheticConfig(batch_size=256)).batch(1)
    large = SyntheticCTR(SyntheticConfig(batch_size=512)).batch(0)
    assert torch.equal(small.labels, large.labels[256:])
    assert torch.equal(_ids(small, BIG), _ids(large, BIG)[256:])


def test_batch_layout_and_id_ranges() -> None:
    cfg = SyntheticConfig(batch_size=64)
    ds = SyntheticCTR(cfg)
    batch = ds.batch(2, "val")
    kjt = batch.sparse_features
    assert ds.feature_names == [f"cat_{f}" for f in range(26)]
    assert kjt.keys() == ds.feature_names
    assert kjt.values().dtype == torch.int64 and kjt.values().shape == (26 * 64,)
    assert torch.all(kjt.lengths() == 1) and kjt.stride() == 64
    for name, n in zip(ds.feature_names, cfg.cardinalities):
        ids = _ids(batch, name)
        assert ids.shape == (64,) and 0 <= ids.min() and ids.max() < n
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (64, 13)
    assert torch.all(batch.dense_features >= 0)
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (64,)
    assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("alpha", [0.6, 1.0, 1.1, 2.0])
def test_zipf_ranks_follow_truncated_power_law(alpha: float) -> None:
    n = 100_000
    ranks = truncated_zipf_ranks(torch.rand(200_000, dtype=torch.float64), torch.tensor(n), alpha)
    assert ranks.dtype == torch.int64 and 0 <= ranks.min() and ranks.max() < n
    for k in (1, 10, 1000):
        if alpha == 1.0:
            expected = math.log(k + 1) / math.log(n + 1)
        else:
            expected = (1 - (k + 1) ** (1 - alpha)) / (1 - (n + 1) ** (1 - alpha))
        assert abs((ranks < k).double().mean().item() - expected) < 0.005


def test_zipf_ranks_stay_in_range_at_the_edges() -> None:
    u = torch.tensor([0.0, 1.0 - 2.0**-53], dtype=torch.float64)
    assert truncated_zipf_ranks(u, torch.tensor(7), 1.1).tolist() == [0, 6]
    assert truncated_zipf_ranks(u, torch.tensor(1), 1.1).tolist() == [0, 0]


def test_top_one_percent_of_ids_dominates() -> None:
    ds = SyntheticCTR(SyntheticConfig(cardinalities=[100_000], num_dense=0))
    ids = torch.cat([_ids(b, "cat_0") for b in ds.batches(20)])
    counts = torch.bincount(ids, minlength=100_000).sort(descending=True).values
    assert counts[:1000].sum().item() / ids.numel() > 0.6  # uniform would give <= 0.1
    # The most popular IDs are scattered, not 0, 1, 2, ...
    assert ds.popular_ids("cat_0", 3).tolist() != [0, 1, 2]


def _share_in(ids: torch.Tensor, popular: torch.Tensor) -> float:
    return torch.isin(ids, popular).double().mean().item()


def test_drift_changes_the_popular_set() -> None:
    ds = SyntheticCTR(SyntheticConfig(drift_every=2))
    top = [ds.popular_ids(BIG, 100, step) for step in range(4)]
    assert torch.equal(top[0], top[1]) and torch.equal(top[2], top[3])
    assert torch.isin(top[0], top[2]).sum() < 5
    ids0, ids2 = _ids(ds.batch(0), BIG), _ids(ds.batch(2), BIG)
    assert _share_in(ids0, top[0]) > 0.3 and _share_in(ids2, top[0]) < 0.05
    assert _share_in(ids2, top[2]) > 0.3
    # The first epoch is the undrifted data, so runs with and without drift start identical.
    _assert_same(ds.batch(1), SyntheticCTR(SyntheticConfig()).batch(1))


def test_oracle_auc_is_high_but_not_perfect() -> None:
    ds = SyntheticCTR(SyntheticConfig())
    assert 0.75 < ds.oracle_auc(30) < 0.86
    click_rate = torch.cat([b.labels for b in ds.batches(10)]).mean().item()
    assert 0.15 < click_rate < 0.35


def test_splits_differ_but_share_model_and_popularity() -> None:
    ds = SyntheticCTR(SyntheticConfig())
    train = [ds.batch(s, "train") for s in range(4)]
    test = [ds.batch(s, "test") for s in range(4)]
    assert not torch.equal(_ids(train[0], BIG), _ids(test[0], BIG))
    top = ds.popular_ids(BIG, 10)
    for batches in (train, test):
        assert _share_in(torch.cat([_ids(b, BIG) for b in batches]), top) > 0.2
    # The planted model is split-agnostic: it ranks test labels, another seed's model does not.
    test_labels = torch.cat([b.labels for b in test])
    own = torch.cat([ds.true_logit(b) for b in test])
    other = SyntheticCTR(SyntheticConfig(seed=1))
    foreign = torch.cat([other.true_logit(b) for b in test])
    assert binary_auc(own, test_labels) > 0.75
    assert abs(binary_auc(foreign, test_labels) - 0.5) < 0.1


def test_binary_auc_matches_pairwise_count_with_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (300,), generator=gen).float()
    labels = (torch.rand(300, generator=gen) < 0.4).float()
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).double().sum() + 0.5 * (diff == 0).double().sum()) / diff.numel()
    assert binary_auc(scores, labels) == pytest.approx(expected.item(), abs=1e-12)
    assert binary_auc(torch.tensor([0.1, 0.9]), torch.tensor([0.0, 1.0])) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        binary_auc(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize(
    "field, value",
    [
        ("cardinalities", [10, 0]),
        ("cardinalities", []),
        ("max_cardinality", 0),
        ("max_cardinality", 1 << 32),
        ("num_dense", -1),
        ("zipf_alpha", 0.0),
        ("latent_dim", 0),
        ("signal_scale", -1.0),
        ("interaction_scale", -0.1),
        ("dense_scale", float("nan")),
        ("noise", -0.5),
        ("base_logit", float("inf")),
        ("batch_size", 0),
        ("seed", -1),
        ("drift_every", 0),
    ],
)
def test_invalid_config_raises_naming_the_field(field: str, value: Any) -> None:
    kwargs: Dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**kwargs)


def test_invalid_split_or_step_raises() -> None:
    ds = SyntheticCTR(SyntheticConfig(batch_size=8))
    with pytest.raises(ValueError, match="split"):
        ds.batch(0, "dev")
    with pytest.raises(ValueError, match="step"):
        ds.batch(-1)
