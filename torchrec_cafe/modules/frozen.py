"""The frozen serving form of a ``CafeEmbeddingBagCollection``.

``export_for_inference`` turns a trained ``CafeEmbeddingBagCollection`` into a
``CafeInferenceEBC``: a plain TorchRec ``EmbeddingBagCollection`` over the physical rows (pool
rows, then block rows, per table) plus the frozen lookup state: per pool row of the sketched
tables, whether a hot ID owns it and that ID's key (5 bytes per row). A hot ID finds the row it
owns among its four candidates; every other ID reads its first candidate that no hot ID owns (and,
composed, its block row), exactly as the trained module's remap does. There is no sketch, no scoring and no migration: outputs equal the trained
module's in ``eval()`` mode.

The lookup is vectorised over all features (a fixed number of elementwise ops per ID) and the
module is TorchScript-able (``torch.jit.script``, also what scripting the trained module gives),
the form TorchRec's inference stack uses.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.fx import symbolic_trace
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.kjt import bag_keys, bags_per_key, kjt_like, value_bags
from torchrec_cafe.modules.cafe_embedding import CafeEmbeddingCollection, ids_as_bags, jagged_outputs
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.modules.inputs import as_embedding_features
from torchrec_cafe.remap import block_rows
from torchrec_cafe.sketch import kernels
from torchrec_cafe.sketch.hashing import finalise64, fingerprint32
from torchrec_cafe.sketch.hot_sketch import POOL_SEED_OFFSET, choices_of_hash


class CafeInferenceEBC(nn.Module):
    """Frozen CAFE lookup: raw-ID KJT -> pooled ``KeyedTensor``, like the trained module in eval.

    Per value of feature f (module feature order), with per-feature constants ``[F]``: plain tables
    read ``id % N``; compressed ones a pool row (the candidate it owns: ``owned`` with its key in
    ``owner_keys``; else the first candidate whose ``owned`` flag is clear, or the first when all
    are owned) and, composed, block row ``P + (id % N) // block_size`` (a hot ID
    reads its pool row alone, a blocked one its block row alone, or nothing if not composed):
    the physical KJT holds only the entries read, unweighted for SUM tables of unweighted inputs.
    """

    # registered buffers (typed for the type checker; nn.Module's __getattr__ is untyped)
    _num_rows: torch.Tensor
    _sketch_table: torch.Tensor
    _compressed: torch.Tensor
    _pool: torch.Tensor
    _pool_offset: torch.Tensor
    _block_size: torch.Tensor
    _composed: torch.Tensor
    _mean_as_weights: torch.Tensor
    owner_keys: torch.Tensor
    owned: torch.Tensor

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        feature_names: List[str],
        input_features: List[str],
        constants: Dict[str, torch.Tensor],
        owner_keys: torch.Tensor,
        owned: torch.Tensor,
        is_weighted: bool,
        weighted_out: bool,
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self._feature_names = feature_names  # embedding names (``f@table`` for shared features)
        self._input_features = input_features  # the KJT key each reads
        self._is_weighted = is_weighted
        self._weighted_out = weighted_out
        self._any_varying = _any_varying(constants)
        # CPU inputs go through the compiled lookup when it is built (the TorchScript form then
        # needs torchrec_cafe's operators loaded, as TorchRec's needs FBGEMM's)
        self._compiled = kernels.AVAILABLE
        self._pool_seed = POOL_SEED_OFFSET  # TorchScript reads no module globals
        for name in ("num_rows", "sketch_table", "compressed", "pool", "pool_offset", "block_size", "composed", "mean_as_weights"):
            self.register_buffer("_" + name, constants[name])
        self.register_buffer("owner_keys", owner_keys)
        self.register_buffer("owned", owned)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        physical = frozen_physical_features(
            features,
            self._input_features,
            self._feature_names,
            [self._num_rows, self._sketch_table, self._compressed, self._pool, self._pool_offset, self._block_size,
             self._composed, self._mean_as_weights, self.owner_keys, self.owned],
            self._is_weighted,
            self._weighted_out,
            self._any_varying,
            self._pool_seed,
            self._compiled,
        )
        return self.embedding_bag_collection(physical)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` scripts the ``torchrec.fx`` trace of this module, as TorchRec's
        inference stack does: TorchRec's quantized EBCs are scriptable only that way."""
        return symbolic_trace(self)

    def nbytes(self) -> Dict[str, int]:
        """Bytes of the served form: the physical tables as stored (float rows, or a quantized
        EBC's FBGEMM row storage: quantized values, row scales and bias, rows padded to 16 bytes)
        and the frozen lookup state."""
        # A quantized EBC keeps its rows in FBGEMM int-N TBEs that are not registered submodules
        # (its state-dict "weight" entries are views): count their storages.
        kernels = getattr(self.embedding_bag_collection, "_emb_modules", [])
        storages = [getattr(k, n) for k in kernels for n in ("weights_dev", "weights_host", "weights_uvm") if hasattr(k, n)]
        if not kernels:
            storages = list(self.embedding_bag_collection.parameters())
        tables = sum(t.numel() * t.element_size() for t in storages)
        frozen = sum(b.numel() * b.element_size() for b in (self.owner_keys, self.owned))
        return {"table_bytes": tables, "map_bytes": frozen, "total_bytes": tables + frozen}


def frozen_physical_features(
    features: KeyedJaggedTensor,
    input_features: List[str],
    feature_names: List[str],
    state: List[torch.Tensor],
    is_weighted: bool,
    weighted_out: bool,
    any_varying: bool,
    pool_seed: int,
    compiled: bool = False,
) -> KeyedJaggedTensor:
    """Raw-ID KJT -> physical-row KJT of the frozen lookup (see ``CafeInferenceEBC``).

    ``state``: the per-feature constants [F] (num_rows, sketch_table, compressed, pool,
    pool_offset, block_size, composed, mean_as_weights), then owner_keys and owned, one entry per
    pool row of the sketched tables (int32, int8). One free function, wrapped for ``torch.fx`` (a single node of a traced graph, so
    ``torchrec.fx.symbolic_trace`` of the served module traces the inner, possibly quantized,
    EmbeddingBagCollection as TorchRec's inference stack expects) and TorchScript-able.
    ``compiled``: CPU inputs (float32 weights) take the compiled lookup, bit for bit the same.
    """
    num_rows, sketch_table, compressed, pool, pool_offset, block_size, composed_f, mean_as_weights = state[:8]
    owner_keys, owned_rows = state[8], state[9]
    features = as_embedding_features(features, input_features, feature_names)
    w_in = features.weights_or_none()
    if compiled and features.values().device.type == "cpu" and (w_in is None or w_in.dtype == torch.float32):
        return _compiled_physical_features(features, feature_names, state, is_weighted, weighted_out, pool_seed)
    ids = features.values().to(torch.int64)
    lengths = features.lengths()
    device = ids.device
    bag = value_bags(lengths, ids.numel())
    feature = bag_keys(features, device).index_select(0, bag)
    n = num_rows.index_select(0, feature)
    pool_row, hot, blocked = _pool_rows(ids, feature, pool, sketch_table, pool_offset, owner_keys, owned_rows, pool_seed)
    rows = torch.where(compressed.index_select(0, feature), pool_row, torch.remainder(ids, n))
    w = torch.ones_like(ids, dtype=torch.float32)
    if is_weighted:
        w = features.weights()
    if weighted_out:
        w = torch.where(mean_as_weights.index_select(0, feature), w / lengths.clamp(min=1).index_select(0, bag).to(w.dtype), w)
    if not any_varying:
        return kjt_like(
            features, feature_names, rows, lengths, w if weighted_out else None, features.inverse_indices_or_none(),
            features.length_per_key(),
        )  # fmt: skip
    # Each ID becomes the entries it reads, in order: its pool row unless blocked, its block row
    # (composed features) unless hot.
    composed = composed_f.index_select(0, feature)
    block = block_rows(ids, n, pool.index_select(0, feature), block_size.index_select(0, feature))
    keep = torch.stack([~blocked, composed & ~hot], dim=1)
    count = keep.sum(dim=1)
    out_lengths = torch.zeros_like(lengths).index_add_(0, bag, count.to(lengths.dtype))
    # The entries per key: the one host read, which sizes the output and fills the KJT's per-key
    # caches the lookup would otherwise read; the kept entries, in order, by a stable sort (no
    # boolean indexing: fixed shapes once the size is known).
    per_key: List[int] = torch.zeros(len(feature_names), dtype=torch.int64, device=device).index_add_(0, feature, count).tolist()
    kept = torch.argsort((~keep).flatten().to(torch.int8), stable=True)[: sum(per_key)]
    values = torch.stack([rows, block], dim=1).flatten().index_select(0, kept)
    weights = torch.stack([w, w], dim=1).flatten().index_select(0, kept) if weighted_out else None
    return kjt_like(features, feature_names, values, out_lengths, weights, features.inverse_indices_or_none(), per_key)


torch.fx.wrap("frozen_physical_features")


if kernels.AVAILABLE:

    def _compiled_physical_features(
        features: KeyedJaggedTensor, feature_names: List[str], state: List[torch.Tensor], is_weighted: bool,
        weighted_out: bool, pool_seed: int,
    ) -> KeyedJaggedTensor:
        """``frozen_physical_features`` of CPU inputs in one compiled pass (features already in
        module order), the entries per key from the same pass."""
        w = features.weights() if is_weighted else torch.zeros(0)
        out = torch.ops.torchrec_cafe.frozen_remap(
            features.values(), features.lengths(), w, bags_per_key(features), state[0], state[1], state[2], state[3], state[4], state[5],
            state[6], state[7], state[8], state[9], weighted_out, pool_seed,
        )
        per_key: List[int] = out[3].tolist()  # fills the physical KJT's per-key caches
        return kjt_like(features, feature_names, out[0], out[1], out[2] if weighted_out else None, features.inverse_indices_or_none(), per_key)

else:

    def _compiled_physical_features(
        features: KeyedJaggedTensor, feature_names: List[str], state: List[torch.Tensor], is_weighted: bool,
        weighted_out: bool, pool_seed: int,
    ) -> KeyedJaggedTensor:
        raise RuntimeError("torchrec_cafe._C (the compiled lookup) is not built")


def _pool_rows(
    ids: torch.Tensor,
    feature: torch.Tensor,
    pool_f: torch.Tensor,
    sketch_table: torch.Tensor,
    pool_offset: torch.Tensor,
    owner_keys: torch.Tensor,
    owned_rows: torch.Tensor,
    pool_seed: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pool row of each value, hot, whether a cold value found every choice owned). [n] each.

    A hot ID owns one of its candidates: the one whose owner key is its key (among owned rows).
    A cold one reads its first unowned candidate."""
    key = fingerprint32(ids)
    pool = pool_f.index_select(0, feature).clamp(min=1)
    choices = choices_of_hash(finalise64(key + pool_seed), pool)
    sketched = (sketch_table.index_select(0, feature) >= 0).unsqueeze(1)
    where = (pool_offset.index_select(0, feature).unsqueeze(1) + choices).clamp(max=owned_rows.numel() - 1).reshape(-1)
    owned = (owned_rows.index_select(0, where).view(choices.shape) == 1) & sketched  # OWNED
    mine = owned & (owner_keys.index_select(0, where).view(choices.shape) == key.to(torch.int32).unsqueeze(1))
    # First True of a row: weights 4, 3, 2, 1 make it the largest.
    rank = torch.arange(4, 0, -1, device=ids.device)
    first_free = torch.remainder(4 - ((~owned).to(torch.int64) * rank).amax(dim=1), 4)
    first_mine = torch.remainder(4 - (mine.to(torch.int64) * rank).amax(dim=1), 4)
    hot = mine.any(dim=1)
    row = choices.gather(1, torch.where(hot, first_mine, first_free).unsqueeze(1)).squeeze(1)
    return row, hot, owned.all(dim=1) & ~hot

class CafeInferenceEC(nn.Module):
    """Frozen ``CafeEmbeddingCollection``: raw-ID KJT -> ``Dict[str, JaggedTensor]``, through the
    frozen bag lookup of single-ID bags, like the trained module in eval."""

    def __init__(self, bags: CafeInferenceEBC, input_features: List[str], need_indices: bool) -> None:
        super().__init__()
        self.bags = bags
        self._input_features = input_features
        self._need_indices = need_indices

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        bags, per_key = ids_as_bags(features)
        return jagged_outputs(self.bags(bags), features, per_key, self._input_features, self._need_indices)


@torch.no_grad()
def export_for_inference(
    module: Union[CafeEmbeddingBagCollection, CafeEmbeddingCollection], device: Optional[torch.device] = None
) -> Union[CafeInferenceEBC, CafeInferenceEC]:
    """Freezes a trained, unsharded CAFE module (bag or unpooled) for serving; see
    ``export_bag_module``."""
    if isinstance(module, CafeEmbeddingCollection):
        return CafeInferenceEC(export_bag_module(module.bags, device), module.input_features(), module.need_indices())
    return export_bag_module(module, device)


@torch.no_grad()
def export_bag_module(module: CafeEmbeddingBagCollection, device: Optional[torch.device] = None) -> CafeInferenceEBC:
    """Freezes a trained, unsharded ``CafeEmbeddingBagCollection`` into a ``CafeInferenceEBC``.

    The module is not changed. A model trained under ``DistributedModelParallel`` is exported by
    loading its checkpoint into an unsharded model first (``checkpoint.load`` reshards to one
    process). Scores stashed since the last update are not applied: as in the trained module's
    ``eval()`` mode, the sketch is used as it stands.
    """
    inner = module._embedding_bag_collection
    if not isinstance(inner, EmbeddingBagCollection):
        raise ValueError(
            "export_for_inference needs an unsharded CafeEmbeddingBagCollection; load the "
            "checkpoint of a sharded model into an unsharded one (torchrec_cafe.checkpoint.load) first"
        )
    device = device or next(inner.parameters()).device
    remapper = module._remapper
    ebc = EmbeddingBagCollection(tables=[l.physical_config() for l in module._layouts], is_weighted=remapper.weighted_out, device=device)
    ebc.load_state_dict(inner.state_dict())
    constants, owner_keys, owned = frozen_state(module, device)
    return CafeInferenceEBC(
        embedding_bag_collection=ebc,
        feature_names=list(module._feature_names),
        input_features=list(module._input_features),
        constants=constants,
        owner_keys=owner_keys,
        owned=owned,
        is_weighted=module.is_weighted(),
        weighted_out=remapper.weighted_out,
    )


_CONSTANTS = ("num_rows", "sketch_table", "compressed", "pool", "pool_offset", "block_size", "composed", "mean_as_weights")


@torch.no_grad()
def frozen_state(
    module: CafeEmbeddingBagCollection, device: Optional[torch.device] = None
) -> "tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor]":
    """The frozen lookup of ``module`` as it stands: (per-feature constants [F] by name, the key
    owning each pool row [sum P] int32, pool-row states [sum P] int8)."""
    layouts = module._layouts
    sketched = [l for l in layouts if l.sketched]
    pool_offset = [0]
    for l in sketched:
        pool_offset.append(pool_offset[-1] + l.budget.pool_rows)
    per_feature = [l for l in layouts for _ in l.config.feature_names]
    table = [next((t for t, s in enumerate(sketched) if s is l), -1) for l in per_feature]
    constants = {
        "num_rows": [l.config.num_embeddings for l in per_feature],
        "sketch_table": table,
        "compressed": [l.compressed for l in per_feature],
        "pool": [l.budget.pool_rows for l in per_feature],
        "pool_offset": [pool_offset[t] if t >= 0 else 0 for t in table],
        "block_size": [l.block_size for l in per_feature],
        "composed": [l.composed for l in per_feature],
        "mean_as_weights": [l.mean_as_weights for l in per_feature],
    }
    owner_keys, owned = _frozen_lookup(module)
    device = device or module._remapper.sketch_table.device
    return {k: torch.tensor(v, device=device) for k, v in constants.items()}, owner_keys.to(device), owned.to(device)


def _any_varying(constants: Dict[str, torch.Tensor]) -> bool:
    """Whether some feature's bags read other entries than their IDs (composed or sketched)."""
    return bool((constants["composed"] | (constants["sketch_table"] >= 0)).any())


def traced_physical_features(module: CafeEmbeddingBagCollection, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """What ``torch.fx`` records for an unsharded module's remap: the frozen lookup as it stands
    (its state becomes constants of the traced graph), as one ``frozen_physical_features`` node."""
    constants, owner_keys, owned = frozen_state(module)
    return frozen_physical_features(
        features,
        list(module._input_features),
        list(module._feature_names),
        [constants[name] for name in _CONSTANTS] + [owner_keys, owned],
        module.is_weighted(),
        module._remapper.weighted_out,
        _any_varying(constants),
        POOL_SEED_OFFSET,
        kernels.AVAILABLE,
    )


def _frozen_lookup(module: CafeEmbeddingBagCollection) -> "tuple[torch.Tensor, torch.Tensor]":
    """(the key of the hot ID owning each pool row of all sketched tables [sum P] int32, the
    ``fingerprint32`` bits; the pool-row states [sum P] int8) of the module's sketch as it stands.
    A hot ID owns one of its four candidate rows, so serving finds it there: no search."""
    sketch = module._sketch
    if sketch is None:
        return torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int8)
    owners = torch.zeros(sum(sketch.pool_rows_per_table), dtype=torch.int64)
    offset = 0
    for t, p in enumerate(sketch.pool_rows_per_table):
        keys = sketch.hot_keys(t).cpu()
        row, _, _ = sketch.lookup_keys(keys.to(sketch.slot_keys.device), torch.full_like(keys, t).to(sketch.slot_keys.device))
        owners[offset + row.cpu()] = keys
        offset += p
    return owners.to(torch.int32), sketch.pool_state[:-1].clone().cpu()
