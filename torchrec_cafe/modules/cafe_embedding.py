"""CafeEmbeddingCollection: a drop-in (unpooled) EmbeddingCollection under a per-table memory budget.

An unpooled lookup is a pooled one with one ID per bag: the module turns the input KJT into a KJT
whose bags are single IDs and runs a ``CafeEmbeddingBagCollection`` (SUM) on it. Sketch, remap,
migrations, checkpoints, sharding and serving are the bag module's; an occurrence's score is the
norm of the gradient of its own embedding, as in the paper's unpooled case.
"""

from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingCollectionInterface
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from torchrec_cafe.config import CafeConfig
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.modules.inputs import check_kjt, embedding_names


def bag_tables(tables: List[EmbeddingConfig]) -> List[EmbeddingBagConfig]:
    """The pooled (SUM) twin of each unpooled table: same name, rows, dim, features, dtype, init."""
    return [
        EmbeddingBagConfig(
            num_embeddings=t.num_embeddings,
            embedding_dim=t.embedding_dim,
            name=t.name,
            data_type=t.data_type,
            feature_names=list(t.feature_names),
            weight_init_max=t.weight_init_max,
            weight_init_min=t.weight_init_min,
            init_fn=t.init_fn,
            pooling=PoolingType.SUM,
        )
        for t in tables
    ]


def ids_as_bags(features: KeyedJaggedTensor) -> Tuple[KeyedJaggedTensor, List[int]]:
    """KJT of F keys with n_f IDs each -> (KJT whose bags are single IDs, stride S = max n_f, key f's
    IDs in its first n_f bags; n_f per key, host ints). Weights are dropped (EC reads none)."""
    per_key = features.length_per_key()
    stride = max(per_key) if len(per_key) > 0 else 0
    device = features.values().device
    counts = torch.tensor(per_key, device=device).unsqueeze(1)
    lengths = (torch.arange(stride, device=device).unsqueeze(0) < counts).reshape(-1)
    bags = KeyedJaggedTensor(
        keys=features.keys(), values=features.values(), lengths=lengths.to(features.lengths().dtype), stride=stride
    )
    return bags, per_key


def jagged_outputs(
    pooled: KeyedTensor, features: KeyedJaggedTensor, per_key: List[int], inputs: List[str], need_indices: bool
) -> Dict[str, JaggedTensor]:
    """Pooled single-ID bags [S, sum dims] -> one JaggedTensor per embedding name (its feature's
    lengths, values [n_f, d]; the IDs as weights when ``need_indices``), in the module's order."""
    n_of = dict(zip(features.keys(), per_key))
    per_feature = features.to_dict()
    values = pooled.to_dict()
    out: Dict[str, JaggedTensor] = {}
    for name, feature in zip(pooled.keys(), inputs):
        jt = per_feature[feature]
        out[name] = JaggedTensor(
            values=values[name][: n_of[feature]], lengths=jt.lengths(), weights=jt.values() if need_indices else None
        )
    return out


class CafeEmbeddingCollection(EmbeddingCollectionInterface):
    """EmbeddingCollection whose tables keep only their hot IDs' rows unique.

    Same constructor (``tables, device, need_indices``; CAFE settings by keyword), same output
    (``Dict[str, JaggedTensor]``, keys ``f`` or ``f@table`` for shared features, values [n_f, d]
    float32) as ``EmbeddingCollection``. Each table is stored and trained as in
    ``CafeEmbeddingBagCollection`` (held as ``bags``; its ``memory_report()``, ``stats()``,
    ``apply_pending_updates()`` are this module's too).

    Cost of the reuse: the bag module sees a batch of S = max_f n_f single-ID bags per feature,
    so its pooled output holds S x F rows (empty bags of shorter features included).
    """

    def __init__(
        self,
        tables: List[EmbeddingConfig],
        device: Optional[torch.device] = None,
        need_indices: bool = False,
        *,
        cafe: Optional[Union[CafeConfig, Mapping[str, CafeConfig]]] = None,
    ) -> None:
        super().__init__()
        dims = {t.embedding_dim for t in tables}
        if len(dims) > 1:
            raise ValueError(f"all tables of an EmbeddingCollection need the same embedding_dim, got {sorted(dims)}")
        self._configs = list(tables)
        self._need_indices = need_indices
        self.bags = CafeEmbeddingBagCollection(bag_tables(tables), device=device, cafe=cafe)
        self._names_by_table = embedding_names(tables)
        self._inputs = [f for t in tables for f in t.feature_names]  # the KJT key of each embedding name

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        """Raw-ID KJT -> per embedding name, the embeddings of its IDs [n_f, d] (same lengths)."""
        check_kjt(features)
        if features.variable_stride_per_key():
            raise ValueError("CafeEmbeddingCollection takes fixed-batch KJTs (no stride_per_key_per_rank)")
        bags, per_key = ids_as_bags(features)
        return jagged_outputs(self.bags(bags), features, per_key, self._inputs, self._need_indices)

    def __prepare_scriptable__(self) -> nn.Module:
        """As the bag module's: ``torch.jit.script`` of an eval-mode module scripts its frozen form."""
        if self.training:
            raise ValueError("torch.jit.script of a CafeEmbeddingCollection needs eval() mode (it scripts the frozen lookup)")
        from torchrec_cafe.modules.frozen import export_for_inference  # imports this module

        return export_for_inference(self)

    def embedding_configs(self) -> List[EmbeddingConfig]:
        return self._configs

    def input_features(self) -> List[str]:
        """The KJT key each output (embedding name, in order) reads."""
        return self._inputs

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        return self._configs[0].embedding_dim if self._configs else -1

    def embedding_names_by_table(self) -> List[List[str]]:
        return self._names_by_table

    @property
    def device(self) -> torch.device:
        return self.bags.device

    @property
    def embeddings(self) -> nn.ModuleDict:
        """The *physical* tables by table name (``nn.EmbeddingBag`` of ``P + B`` rows for a
        compressed table; ``.weight`` as ``EmbeddingCollection.embeddings[t].weight``)."""
        return self.bags.embedding_bags

    def memory_report(self) -> Dict[str, Dict[str, float]]:
        return self.bags.memory_report()

    def stats(self) -> Dict[str, Dict[str, float]]:
        return self.bags.stats()

    def apply_pending_updates(self) -> None:
        self.bags.apply_pending_updates()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.bags.attach_optimizer(optimizer)
