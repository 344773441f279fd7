"""Input KJTs of the CAFE modules: validation (a malformed KJT gets a ``ValueError`` naming the
problem before any state changes, not an error from deep inside the remap or FBGEMM) and TorchRec's
embedding names (a feature read by several tables is looked up once per table, as ``f@table``)."""

import dataclasses
from typing import Dict, List, Sequence, TypeVar

import torch
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_cafe.kjt import kjt_like

ConfigT = TypeVar("ConfigT", bound=BaseEmbeddingConfig)

_ID_DTYPES = (torch.int32, torch.int64)


def check_kjt(features: KeyedJaggedTensor, may_sync: bool = True) -> None:
    """Raises ``ValueError`` unless ``features`` is a well-formed KJT of integer IDs.

    Checked: integer ID values (int32/int64, 1-D), one length per (key, sample) -- ``stride x keys``,
    or the sum of ``stride_per_key()`` for variable-batch KJTs --, weights (when present) one per
    value, no negative length, lengths summing to the number of values. The last two read the
    lengths: on CPU they are checked here; on an accelerator (or with ``may_sync`` False: a module
    on its fixed-shape, sync-free path) they become an asynchronous device assertion
    (``torch._assert_async``), because a ``ValueError`` would need a host sync per step.
    """
    values = features.values()
    if values.dim() != 1 or values.dtype not in _ID_DTYPES:
        raise ValueError(
            f"KJT values must be a 1-D tensor of integer IDs (int32 or int64), got {values.dtype} "
            f"of shape {tuple(values.shape)}"
        )
    weights = features.weights_or_none()
    if weights is not None and weights.shape != values.shape:
        raise ValueError(f"KJT has {weights.numel()} weights for {values.numel()} values: one weight per value")
    lengths = features.lengths()
    keys = features.keys()
    if features.variable_stride_per_key():
        expected = sum(features.stride_per_key())
        layout = f"the sum of stride_per_key() {features.stride_per_key()}"
    else:
        expected = features.stride() * len(keys)
        layout = f"stride {features.stride()} x {len(keys)} keys"
    if lengths.dim() != 1 or lengths.numel() != expected:
        raise ValueError(f"KJT has {lengths.numel()} lengths, expected {expected} ({layout}): one length per key and sample")
    if lengths.device.type == "cpu" and may_sync:
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"KJT has negative lengths (min {int(lengths.min())})")
        total = int(lengths.sum())
        if total != values.numel():
            raise ValueError(f"KJT lengths sum to {total} but it has {values.numel()} values")
    else:
        ok = (lengths >= 0).all() & (lengths.sum() == values.numel())
        torch._assert_async(ok, "KJT has negative lengths or lengths that do not sum to its number of values")


def embedding_names(tables: Sequence[BaseEmbeddingConfig]) -> List[List[str]]:
    """Per table, the output name of each of its features, as TorchRec names them: the feature
    name, or ``feature@table`` when several tables read that feature."""
    count: Dict[str, int] = {}
    for t in tables:
        for f in t.feature_names:
            count[f] = count.get(f, 0) + 1
    return [[f if count[f] == 1 else f"{f}@{t.name}" for f in t.feature_names] for t in tables]


def with_embedding_names(tables: Sequence[ConfigT]) -> List[ConfigT]:
    """The tables with each feature renamed to its embedding name: every feature is then read by
    one table, and the physical tables' output keys are TorchRec's."""
    return [dataclasses.replace(t, feature_names=names) for t, names in zip(tables, embedding_names(tables))]


def as_embedding_features(features: KeyedJaggedTensor, inputs: List[str], names: List[str]) -> KeyedJaggedTensor:
    """Raw KJT (keys in any order, each once) -> KJT with one key per embedding name ``names[i]``,
    holding input feature ``inputs[i]`` (a shared feature's bags repeated once per table). A
    variable-batch KJT keeps its inverse indices (by input name, as TorchRec's EBC reads them)."""
    keys = features.keys()
    if keys == names:
        return features
    ordered = features.permute([keys.index(k) for k in inputs])
    if inputs == names and not features.variable_stride_per_key():
        return ordered
    return kjt_like(
        ordered, names, ordered.values(), ordered.lengths(), ordered.weights_or_none(),
        features.inverse_indices_or_none(), ordered.length_per_key_or_none(),
    )  # fmt: skip
