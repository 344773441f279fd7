"""Deterministic Criteo-like click-through data with a planted model.

The CAFE claim (a sketch that keeps hot IDs exact and shares the tail keeps most of the AUC of full
tables, the hashing trick does not) needs data whose ID popularity and per-ID effects are known.
Every random value here is a counter-based hash of ``(seed, purpose, index)``: any batch can be
regenerated in any order, on any machine, and nothing of size ``cardinality`` is ever stored.

The hash is deliberately a private copy rather than the model-side hashing module: the data must not
change when the model's hashing does, or benchmark numbers stop being comparable across versions.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

CRITEO_KAGGLE_CARDINALITIES: Tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip

# rank * multiplier must fit in int64 (both are below this bound).
_CARDINALITY_LIMIT = 1 << 31

_SPLITS: Dict[str, int] = {"train": 0, "val": 1, "test": 2}
# Purpose codes keep the hash streams of unrelated quantities independent.
_SAMPLES, _ID_MODEL, _DENSE_MODEL, _MULTIPLIER, _DRIFT = range(5)

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)


@dataclass
class SyntheticConfig:
    """Shape, skew and signal strength of the synthetic data.

    Attributes:
        cardinalities: number of distinct IDs per categorical feature; capped at
            ``max_cardinality`` in ``__post_init__``. Defaults to the 26 Criteo Kaggle features.
        max_cardinality: cap applied to every cardinality (at most 2**31).
        num_dense: number of dense (count-like, log1p-transformed) features.
        zipf_alpha: exponent of the truncated power law over popularity ranks, per feature.
        tail_share: share of the draws that are uniform over all ``N`` IDs instead of Zipf: the
            long tail of real catalogues and of Criteo, where most IDs are seen once or twice and
            such IDs carry a sizeable share of the traffic (0.25: on a 1M-ID feature, 600 x 512
            samples see ~120k distinct IDs, 94% of them at most twice, carrying 40% of the
            traffic; the Ciao ratings' item field: 80% and 38%).
        latent_dim: dimension of the planted per-ID latent vectors (pairwise interactions).
        signal_scale: std of the logit part made of per-ID scalar effects (a little less in
            practice: features with few IDs are dominated by their most popular one).
        interaction_scale: std of the logit part made of pairwise latent dot products (same caveat).
        dense_scale: std (approximately) of the logit part driven by dense features.
        noise: std of the unobserved Gaussian logit noise; lowers the reachable AUC.
        base_logit: intercept of the logit; sets the click rate (about 25% with defaults).
        batch_size: rows per batch.
        seed: selects the planted model, popularity maps and sample streams; in [0, 2**63).
        drift_every: if set, the rank -> ID map changes every ``drift_every`` steps, so a
            different set of IDs becomes popular; ``None`` keeps popularity fixed.
    """

    cardinalities: List[int] = field(default_factory=lambda: list(CRITEO_KAGGLE_CARDINALITIES))
    max_cardinality: int = 1_000_000
    num_dense: int = 13
    zipf_alpha: float = 1.1
    tail_share: float = 0.25
    latent_dim: int = 4
    signal_scale: float = 1.2
    interaction_scale: float = 0.9
    dense_scale: float = 0.4
    noise: float = 0.5
    base_logit: float = -1.4
    batch_size: int = 512
    seed: int = 0
    drift_every: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.cardinalities or any(int(c) <= 0 for c in self.cardinalities):
            raise ValueError(
                f"cardinalities must be a non-empty list of positive ints, got {self.cardinalities}"
            )
        if not 0 < self.max_cardinality <= _CARDINALITY_LIMIT:
            raise ValueError(f"max_cardinality must be in (0, 2**31], got {self.max_cardinality}")
        if self.num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {self.num_dense}")
        if not self.zipf_alpha > 0:
            raise ValueError(f"zipf_alpha must be > 0, got {self.zipf_alpha}")
        if not 0 <= self.tail_share < 1:
            raise ValueError(f"tail_share must be in [0, 1), got {self.tail_share}")
        if self.latent_dim <= 0:
            raise ValueError(f"latent_dim must be > 0, got {self.latent_dim}")
        for name in ("signal_scale", "interaction_scale", "dense_scale", "noise"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not math.isfinite(self.base_logit):
            raise ValueError(f"base_logit must be finite, got {self.base_logit}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {self.batch_size}")
        if not 0 <= self.seed < (1 << 63):
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.drift_every is not None and self.drift_every <= 0:
            raise ValueError(f"drift_every must be None or > 0, got {self.drift_every}")
        self.cardinalities = [min(int(c), self.max_cardinality) for c in self.cardinalities]


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(counter: torch.Tensor, salt: Union[int, torch.Tensor]) -> torch.Tensor:
    """splitmix64 output for state ``salt + counter * golden``; int64, all 64 bits mixed, broadcasts.

    int64 multiplication wraps in two's complement, which has the bits of uint64 arithmetic.
    """
    z = counter * _GOLDEN + salt
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _salt(*parts: int) -> int:
    """Folds non-negative int64 parts into one salt, naming an independent hash stream."""
    s = 0
    for p in parts:
        s = int(_splitmix64(torch.tensor(p, dtype=torch.int64), s))
    return s


def _uniform(h: torch.Tensor) -> torch.Tensor:
    """Hash bits -> float64 uniform in [0, 1), 53 bits of resolution; same shape."""
    return _shr(h, 11).double() * 2.0**-53


def _gaussian(h: torch.Tensor) -> torch.Tensor:
    """Hash bits -> float64 standard normal via Box-Muller on two 26-bit halves; same shape."""
    u1 = (_shr(h, 38) + 1).double() * 2.0**-26  # in (0, 1] so the log is finite
    u2 = (h & ((1 << 26) - 1)).double() * 2.0**-26
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def truncated_zipf_ranks(u: torch.Tensor, cardinalities: torch.Tensor, alpha: float) -> torch.Tensor:
    """Maps uniforms to popularity ranks in ``[0, N)`` with ``P(rank = r)`` about ``(r + 1)**-alpha``.

    Inverse CDF of the continuous power law ``x**-alpha`` on ``[1, N + 1)``, floored; written with
    log1p/expm1 so alpha close to 1 stays accurate.

    Args:
        u: float64 uniforms in [0, 1), any shape broadcastable with ``cardinalities``.
        cardinalities: int64 ``N`` per column (e.g. shape [F] against ``u`` of shape [B, F]).
        alpha: power-law exponent, > 0.

    Returns:
        int64 ranks, broadcast shape, each in ``[0, N)``.
    """
    log_n = torch.log(cardinalities.double() + 1.0)
    b = 1.0 - alpha
    if b == 0.0:
        log_x = u * log_n
    else:
        log_x = torch.log1p(u * torch.expm1(b * log_n)) / b
    ranks = torch.floor(torch.exp(log_x)).long() - 1
    # Rounding at u -> 1 can land on N; the bound is part of the contract.
    return torch.minimum(ranks.clamp_min(0), cardinalities - 1)


def mixed_ranks(u: torch.Tensor, cardinalities: torch.Tensor, alpha: float, tail_share: float) -> torch.Tensor:
    """Popularity ranks from one uniform each: ``u < tail_share`` draws uniformly over ``[0, N)``
    (the long tail), the rest follows ``truncated_zipf_ranks`` (the head); same shapes."""
    tail = torch.floor(u / max(tail_share, 1e-300) * cardinalities.double()).long()
    head = truncated_zipf_ranks(((u - tail_share) / (1.0 - tail_share)).clamp(0.0, 1.0 - 2.0**-53), cardinalities, alpha)
    return torch.where(u < tail_share, torch.minimum(tail, cardinalities - 1), head)


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the Mann-Whitney rank statistic; ties get average ranks.

    Args:
        scores: [n] real scores, higher means more likely positive.
        labels: [n] in {0, 1}; both classes must be present.
    """
    scores = scores.detach().flatten().double()
    positive = labels.detach().flatten() > 0.5
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels must contain both classes")
    order = torch.argsort(scores)
    _, group, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    # 1-based average rank of each tie group: mean of its first and last positions.
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1.0) / 2.0
    pos_rank_sum = mean_rank[group][positive[order]].sum().item()
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _coprime_multiplier(n: int, salt: int) -> int:
    """A pseudo-random ``a`` in ``[0, n)`` with ``gcd(a, n) = 1``, so ``r -> a * r mod n`` is a bijection."""
    a = salt % n
    while math.gcd(a, n) != 1:
        a = (a + 1) % n
    return a


class SyntheticCTR:
    """Criteo-like CTR batches drawn from a planted model; batch ``(split, step)`` is a pure function.

    Per sample and feature ``f``: a popularity rank ``r ~ truncated Zipf(alpha)`` on ``[0, N_f)``
    becomes ``id = (a_f * r + shift_f(epoch)) mod N_f``; ``epoch = step // drift_every`` (0 without
    drift), the same for every split, so train and test share popularity at a given step.

    Every ID has its own effect: a scalar ``b_f(id)`` and a latent ``v_f(id)`` in ``R^latent_dim``,
    standard normal hashes of ``(seed, f, id)``. The true logit is::

        base_logit + signal_scale * sum_f b_f / sqrt(F)
                   + interaction_scale * sum_{f<g} <v_f, v_g> / sqrt(F (F - 1) / 2 * latent_dim)
                   + dense_scale * w . standardized(dense) / |w|

    and ``label ~ Bernoulli(sigmoid(true logit + noise * eps))`` with unobserved ``eps ~ N(0, 1)``.
    Sample ``i`` of a split is hashed from its global index ``step * batch_size + row``.
    """

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        seed = config.seed
        num_features = len(config.cardinalities)
        self.feature_names: List[str] = [f"cat_{f}" for f in range(num_features)]
        self._cards = torch.tensor(config.cardinalities, dtype=torch.int64)
        self._multipliers = torch.tensor(
            [
                _coprime_multiplier(n, _salt(seed, _MULTIPLIER, f))
                for f, n in enumerate(config.cardinalities)
            ],
            dtype=torch.int64,
        )
        self._id_salts = torch.tensor(
            [_salt(seed, _ID_MODEL, f) for f in range(num_features)], dtype=torch.int64
        )
        self._stream_salts = {split: _salt(seed, _SAMPLES, code) for split, code in _SPLITS.items()}
        # Dense feature j is log1p of a lognormal count with log-mean mu_j and log-std sigma_j.
        h = _splitmix64(torch.arange(3 * config.num_dense).view(-1, 3), _salt(seed, _DENSE_MODEL))
        self._dense_weight = _gaussian(h[:, 0])
        self._dense_mu = 4.0 * _uniform(h[:, 1])
        self._dense_sigma = 0.5 + _uniform(h[:, 2])

    def batch(self, step: int, split: str = "train") -> Batch:
        """Batch ``step`` of ``split`` (one of "train", "val", "test").

        Returns:
            ``Batch`` with dense_features float32 [B, num_dense] (>= 0), sparse_features a KJT with
            keys ``feature_names`` and exactly one int64 ID in ``[0, N_f)`` per bag, labels float32 [B]
            in {0, 1}.
        """
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        cfg = self.config
        num_features, num_dense = len(self.feature_names), cfg.num_dense
        # Columns of per-sample randomness: F ranks, D dense, label noise, label draw.
        num_cols = num_features + num_dense + 2
        rows = torch.arange(cfg.batch_size, dtype=torch.int64) + step * cfg.batch_size
        h = _splitmix64(rows[:, None] * num_cols + torch.arange(num_cols), self._stream_salts[split])

        ranks = mixed_ranks(_uniform(h[:, :num_features]), self._cards, cfg.zipf_alpha, cfg.tail_share)
        ids = self._rank_to_id(ranks, step)
        dense = self._dense(_gaussian(h[:, num_features : num_features + num_dense]))
        logit = cfg.base_logit + self._id_logit(ids) + self._dense_logit(dense)
        noisy = logit + cfg.noise * _gaussian(h[:, -2])
        labels = (_uniform(h[:, -1]) < torch.sigmoid(noisy)).float()

        sparse = KeyedJaggedTensor(
            keys=self.feature_names,
            values=ids.t().reshape(-1),  # KJT values are key-major
            lengths=torch.ones(num_features * cfg.batch_size, dtype=torch.int32),
        )
        return Batch(dense_features=dense, sparse_features=sparse, labels=labels)

    def batches(self, num_batches: int, split: str = "train", start: int = 0) -> Iterator[Batch]:
        """Yields batches ``start, ..., start + num_batches - 1`` of ``split``."""
        for step in range(start, start + num_batches):
            yield self.batch(step, split)

    def true_logit(self, batch: Batch) -> torch.Tensor:
        """Noise-free float64 logit [B] of a batch from this generator under the planted model.

        A function of the observed features only (not of split or step): the labels were drawn from
        ``sigmoid(true_logit + noise * eps)``.
        """
        ids = batch.sparse_features.values().view(len(self.feature_names), -1).t()
        return self.config.base_logit + self._id_logit(ids) + self._dense_logit(batch.dense_features)

    def oracle_auc(self, num_batches: int, split: str = "test") -> float:
        """AUC of ``true_logit`` over batches ``0 .. num_batches - 1`` of ``split``: the Bayes reference.

        The noise is independent of the features, so no model ranks better in expectation.
        """
        batches = list(self.batches(num_batches, split))
        logits = torch.cat([self.true_logit(b) for b in batches])
        return binary_auc(logits, torch.cat([b.labels for b in batches]))

    def popular_ids(self, feature: str, k: int, step: int = 0) -> torch.Tensor:
        """int64 [min(k, N)]: the IDs of ``feature`` ranked most popular at ``step``, most popular first."""
        f = self.feature_names.index(feature)
        ranks = torch.arange(min(k, self.config.cardinalities[f]), dtype=torch.int64)
        return self._rank_to_id(ranks, step, f)

    def _shifts(self, step: int) -> torch.Tensor:
        """int64 [F]: rank -> ID offsets of the popularity epoch containing ``step``."""
        epoch = 0 if self.config.drift_every is None else step // self.config.drift_every
        features = torch.arange(len(self.feature_names), dtype=torch.int64)
        return torch.remainder(_splitmix64(features, _salt(self.config.seed, _DRIFT, epoch)), self._cards)

    def _rank_to_id(
        self, ranks: torch.Tensor, step: int, features: Union[int, slice] = slice(None)
    ) -> torch.Tensor:
        """Applies the rank -> ID bijection of ``features`` (default: all, along the last dim) at ``step``."""
        shifts = self._shifts(step)[features]
        return (ranks * self._multipliers[features] + shifts) % self._cards[features]

    def _id_logit(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-ID effects of int64 ids [B, F] -> float64 [B]."""
        cfg = self.config
        num_features, d = ids.shape[1], cfg.latent_dim
        counters = ids[:, :, None] * (d + 1) + torch.arange(d + 1)
        g = _gaussian(_splitmix64(counters, self._id_salts[:, None]))  # [B, F, d + 1]
        bias = g[:, :, 0].sum(1) / math.sqrt(num_features)
        v = g[:, :, 1:]
        # sum_{f<g} <v_f, v_g> = (|sum_f v_f|^2 - sum_f |v_f|^2) / 2, in O(F d).
        pairs = (v.sum(1).square().sum(1) - v.square().sum((1, 2))) / 2.0
        num_pairs = num_features * (num_features - 1) // 2
        return cfg.signal_scale * bias + cfg.interaction_scale * pairs / math.sqrt(max(num_pairs * d, 1))

    def _dense(self, g: torch.Tensor) -> torch.Tensor:
        """Latent normals [B, D] -> float32 features [B, D]: log1p of lognormal integer counts."""
        return torch.log1p(torch.floor(torch.exp(self._dense_mu + self._dense_sigma * g))).float()

    def _dense_logit(self, dense: torch.Tensor) -> torch.Tensor:
        """float32 features [B, D] -> float64 logit part [B]."""
        standardized = (dense.double() - self._dense_mu) / self._dense_sigma
        weight = self._dense_weight / self._dense_weight.norm().clamp_min(1e-12)
        return self.config.dense_scale * standardized @ weight
