"""Datasets for CAFE experiments: the synthetic generator and readers of real CTR files."""

from torchrec_cafe.datasets.criteo import read_criteo_tsv
from torchrec_cafe.datasets.libfm import read_libfm
from torchrec_cafe.datasets.synthetic import (
    CRITEO_KAGGLE_CARDINALITIES,
    SyntheticConfig,
    SyntheticCTR,
    binary_auc,
    truncated_zipf_ranks,
)
from torchrec_cafe.datasets.tabular import InMemoryCTR, local_batch

__all__ = [
    "CRITEO_KAGGLE_CARDINALITIES",
    "InMemoryCTR",
    "SyntheticConfig",
    "SyntheticCTR",
    "binary_auc",
    "local_batch",
    "read_criteo_tsv",
    "read_libfm",
    "truncated_zipf_ranks",
]
