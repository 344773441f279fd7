"""Datasets for CAFE experiments."""

from torchrec_cafe.datasets.synthetic import (
    CRITEO_KAGGLE_CARDINALITIES,
    SyntheticConfig,
    SyntheticCTR,
    binary_auc,
    truncated_zipf_ranks,
)

__all__ = [
    "CRITEO_KAGGLE_CARDINALITIES",
    "SyntheticConfig",
    "SyntheticCTR",
    "binary_auc",
    "truncated_zipf_ranks",
]
