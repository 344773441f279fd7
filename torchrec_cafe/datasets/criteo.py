"""Raw Criteo TSV (Kaggle or Terabyte day files) as ``InMemoryCTR``.

Lines are read with TorchRec's ``ReadLinesFromCSV`` and follow the conventions of TorchRec's Criteo
preprocessing (``BinaryCriteoUtils.tsv_to_npys``): 40 tab-separated fields ``label, I1..I13,
C1..C26``; a missing count or category reads as 0; categories are hex hashes, here reduced modulo
each table's size (as ``InMemoryBinaryCriteoIterDataPipe`` does with ``hashes``). Dense counts
become ``log(1 + max(x, 0))``: a fixed transform, unlike TorchRec's per-file ``x - min + 2``, so
train and test files get the same one.
"""

from typing import Any, List, Sequence, cast

import torch
from torchrec.datasets.criteo import CAT_FEATURE_COUNT, DEFAULT_CAT_NAMES, INT_FEATURE_COUNT
from torchrec.datasets.utils import ReadLinesFromCSV

from torchrec_cafe.datasets.tabular import InMemoryCTR, open_text

_FIELDS = 1 + INT_FEATURE_COUNT + CAT_FEATURE_COUNT


def read_criteo_tsv(path: str, cardinalities: Sequence[int]) -> InMemoryCTR:
    """Reads one Criteo TSV file (``.gz`` allowed).

    Args:
        path: file with labelled lines (the Kaggle ``test.txt`` has no labels and is refused).
        cardinalities: 26 table sizes; category ``c`` of feature f gets ID ``c mod cardinalities[f]``.

    Returns:
        Features ``cat_0 .. cat_25`` (TorchRec's ``DEFAULT_CAT_NAMES``), 13 dense features.
    """
    cards = [int(c) for c in cardinalities]
    if len(cards) != CAT_FEATURE_COUNT or min(cards) <= 0:
        raise ValueError(f"cardinalities must be {CAT_FEATURE_COUNT} positive sizes, got {cards}")
    labels: List[int] = []
    dense: List[List[int]] = []
    cats: List[List[int]] = []
    with open_text(path) as f:
        for line_no, row in enumerate(ReadLinesFromCSV(cast(Any, [(path, f)]), delimiter="\t"), 1):
            if len(row) != _FIELDS:
                raise ValueError(f"{path}, line {line_no}: {len(row)} tab-separated fields, expected {_FIELDS} (label, 13 counts, 26 categories)")
            try:
                label = int(row[0])
                counts = [int(x or "0") for x in row[1 : 1 + INT_FEATURE_COUNT]]
                hashes = [int(x or "0", 16) for x in row[1 + INT_FEATURE_COUNT :]]
            except ValueError as e:
                raise ValueError(f"{path}, line {line_no}: {e}") from None
            if label not in (0, 1):
                raise ValueError(f"{path}, line {line_no}: label {row[0]!r} is not 0 or 1")
            labels.append(label)
            dense.append(counts)
            cats.append(hashes)
    if not labels:
        raise ValueError(f"{path}: no samples")
    ids = torch.remainder(torch.tensor(cats, dtype=torch.int64), torch.tensor(cards))
    dense_counts = torch.tensor(dense, dtype=torch.float64).clamp_min(0)
    return InMemoryCTR(
        dense=torch.log1p(dense_counts).float(),
        ids=ids,
        labels=torch.tensor(labels, dtype=torch.float32),
        feature_names=list(DEFAULT_CAT_NAMES),
        cardinalities=cards,
    )
