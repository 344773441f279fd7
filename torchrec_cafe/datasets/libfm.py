"""libFM / libSVM files with one-hot fields (e.g. Frappe) as ``InMemoryCTR``: one table per field.

A line is ``<label> <id>:1 <id>:1 ...`` with the same number of features on every line; the k-th
feature belongs to field k and field k owns a fixed range of global IDs. The reader maps each to a
per-field local ID ``id - start_k``. Ranges are inferred over *all* files read together (so train
and test agree), or given as ``field_starts`` / ``cardinalities``.
"""

from typing import List, Optional, Sequence, Tuple

import torch

from torchrec_cafe.datasets.tabular import InMemoryCTR, open_text


def _parse(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (labels float32 [n] in {0, 1}, global ids int64 [n, F]); malformed lines raise ValueError."""
    labels: List[float] = []
    ids: List[List[int]] = []
    width = None
    with open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            where = f"{path}, line {line_no}"
            try:
                label = float(tokens[0])
            except ValueError:
                raise ValueError(f"{where}: label {tokens[0]!r} is not a number") from None
            row = []
            for tok in tokens[1:]:
                key, sep, value = tok.partition(":")
                if not sep or not key.isdigit():
                    raise ValueError(f"{where}: feature {tok!r} is not '<non-negative id>:<value>'")
                if value not in ("1", "1.0"):
                    raise ValueError(f"{where}: feature {tok!r} has value {value!r}; only one-hot fields (value 1) are supported")
                row.append(int(key))
            if width is None:
                width = len(row)
            if len(row) != width or width == 0:
                raise ValueError(f"{where}: {len(row)} features, expected {width} (one per field on every line)")
            labels.append(1.0 if label > 0 else 0.0)
            ids.append(row)
    if not ids:
        raise ValueError(f"{path}: no samples")
    return torch.tensor(labels), torch.tensor(ids, dtype=torch.int64)


def read_libfm(
    paths: Sequence[str],
    field_starts: Optional[Sequence[int]] = None,
    cardinalities: Optional[Sequence[int]] = None,
) -> List[InMemoryCTR]:
    """Reads libFM files into one ``InMemoryCTR`` each, with shared per-field ID ranges.

    Args:
        paths: libFM text files (``.gz`` allowed); labels > 0 are positives (1 vs -1 or 0).
        field_starts: first global ID of each field; inferred as the smallest ID seen in the
            field over all files.
        cardinalities: IDs per field; inferred as ``max - start + 1`` over all files.

    Returns:
        One data set per path, features ``cat_0 .. cat_{F-1}``, no dense features.
    """
    parsed = [_parse(p) for p in paths]
    widths = {ids.shape[1] for _, ids in parsed}
    if len(widths) != 1:
        raise ValueError(f"files disagree on the number of fields per line: {dict(zip(paths, [i.shape[1] for _, i in parsed]))}")
    all_ids = torch.cat([ids for _, ids in parsed])
    num_fields = all_ids.shape[1]
    starts = all_ids.min(0).values if field_starts is None else torch.tensor(list(field_starts), dtype=torch.int64)
    if starts.numel() != num_fields:
        raise ValueError(f"field_starts has {starts.numel()} entries, the files have {num_fields} fields")
    local = [ids - starts for _, ids in parsed]
    cards = (torch.cat(local).max(0).values + 1).tolist() if cardinalities is None else [int(c) for c in cardinalities]
    if len(cards) != num_fields:
        raise ValueError(f"cardinalities has {len(cards)} entries, the files have {num_fields} fields")
    bounds = torch.tensor(cards)
    for path, ids in zip(paths, local):
        bad = ((ids < 0) | (ids >= bounds)).any(0)
        if bad.any():
            f = int(bad.nonzero()[0])
            raise ValueError(f"{path}: field {f} has IDs outside [{int(starts[f])}, {int(starts[f]) + cards[f]}) (field_starts/cardinalities)")
    names = [f"cat_{f}" for f in range(num_fields)]
    return [
        InMemoryCTR(dense=torch.zeros(len(labels), 0), ids=ids, labels=labels, feature_names=names, cardinalities=cards)
        for (labels, _), ids in zip(parsed, local)
    ]
