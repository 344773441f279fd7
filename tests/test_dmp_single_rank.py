"""CafeEmbeddingBagCollection under DistributedModelParallel (world size 1, fused TBE optimizers)."""

from typing import Any, Dict, Type

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.remap import shared_rows
from torchrec_cafe.rows import tbe_shards


@pytest.mark.parametrize(
    "optimizer, kwargs, num_states",
    [
        (torch.optim.SGD, {"lr": 0.1}, 0),
        (torch.optim.Adagrad, {"lr": 0.1}, 1),
        (RowWiseAdagrad, {"lr": 0.1}, 1),
    ],
)
def test_promotion_copies_fused_rows_and_state(
    single_rank_pg: None, optimizer: Type[torch.optim.Optimizer], kwargs: Dict[str, Any], num_states: int
) -> None:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50_000, feature_names=["a", "b"])]
    cafe = CafeEmbeddingBagCollection(tables, CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency"))
    apply_optimizer_in_backward(optimizer, cafe._embedding_bag_collection.parameters(), kwargs)
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"))
    module = dmp.module
    assert isinstance(module._embedding_bag_collection, ShardedEmbeddingBagCollection)
    budget = module._layout("t").budget
    kjt = KeyedJaggedTensor(keys=["b", "a"], values=torch.tensor([42, 5, 42, 9, 11]), lengths=torch.tensor([1, 1, 2, 1]))
    for _ in range(2):  # 42 scores 2 per step: promoted by the 2nd update
        dmp(kjt).values().pow(2).sum().backward()
    (shard,) = tbe_shards(module._embedding_bag_collection, ["t"])
    assert len(shard.states) == num_states
    src = int(shared_rows(torch.tensor([42]), budget))
    row = shard.weight[src].clone()
    states = [s[src].clone() for s in shard.states]
    module.apply_pending_updates()
    hot = int(module._sketch.query(torch.tensor([42])))
    assert hot >= 0
    assert torch.equal(shard.weight[hot], row)
    for s, expected in zip(shard.states, states):
        assert torch.equal(s[hot], expected)
    # the fused optimizer's state dict sees the copied state (views, not copies)
    if num_states:
        opt_state = dmp.fused_optimizer.state_dict()["state"]["_embedding_bag_collection.embedding_bags.t.weight"]
        (momentum,) = [v for k, v in opt_state.items() if "momentum" in k]
        local = momentum.local_shards()[0].tensor if hasattr(momentum, "local_shards") else momentum
        assert torch.equal(local[hot], states[0])
    # the next forward reads the hot row: same pooled value as before promotion
    module.eval()
    single = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([42]), lengths=torch.tensor([1, 0]))
    assert torch.equal(dmp(single).to_dict()["a"][0], row)


def test_reset_policy_zeroes_the_promoted_rows_state(single_rank_pg: None) -> None:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50_000, feature_names=["a"])]
    cfg = CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency", optimizer_state="reset")
    cafe = CafeEmbeddingBagCollection(tables, cfg)
    apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"))
    module = dmp.module
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([42, 42, 9]), lengths=torch.tensor([2, 1]))
    for _ in range(2):
        dmp(kjt).values().pow(2).sum().backward()
    (shard,) = tbe_shards(module._embedding_bag_collection, ["t"])
    src = int(shared_rows(torch.tensor([42]), module._layout("t").budget))
    row, state = shard.weight[src].clone(), shard.states[0][src].clone()
    module.apply_pending_updates()
    hot = int(module._sketch.query(torch.tensor([42])))
    assert hot >= 0 and float(state) > 0
    assert torch.equal(shard.weight[hot], row) and float(shard.states[0][hot]) == 0.0
    assert torch.equal(shard.states[0][src], state)  # the source row keeps its state


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_mixed_dims_in_one_tbe_migrate_every_table_and_shard(single_rank_pg: None, sharding: str) -> None:
    """Tables of different dims (and a plain one) packed in one TBE, whole or in column shards:
    each promotion lands in its own table's rows and row-wise state."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=16, num_embeddings=30_000, feature_names=["fa"]),
        EmbeddingBagConfig(name="plain", embedding_dim=8, num_embeddings=50, feature_names=["fp"]),
        EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=20_000, feature_names=["fb"]),
    ]
    cafe = CafeEmbeddingBagCollection(tables, {n: CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency") for n in ("a", "b")})
    apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    constraints = {t.name: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"], min_partition=4) for t in tables}
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints).plan(
        cafe, [EmbeddingBagCollectionSharder()]
    )
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"), plan=plan)
    module = dmp.module
    kjt = KeyedJaggedTensor(keys=["fa", "fp", "fb"], values=torch.tensor([7, 7, 3, 11, 11]), lengths=torch.tensor([2, 1, 2]))
    for _ in range(2):
        dmp(kjt).values().pow(2).sum().backward()
    shards = tbe_shards(module._embedding_bag_collection, ["a", "b"])
    before = {}
    for name, id_ in (("a", 7), ("b", 11)):
        src = int(shared_rows(torch.tensor([id_]), module._layout(name).budget))
        before[name] = [(s.weight[src].clone(), [x[src].clone() for x in s.states]) for s in shards if s.table == name]
    module.apply_pending_updates()
    for t, (name, id_) in enumerate((("a", 7), ("b", 11))):
        hot = int(module._sketch.query(torch.tensor([id_]), torch.tensor([t])))
        assert hot >= 0
        mine = [s for s in shards if s.table == name]
        assert len(mine) == len(before[name]) >= (2 if sharding == "column_wise" else 1)
        for s, (row, states) in zip(mine, before[name]):
            assert torch.equal(s.weight[hot], row)
            for x, expected in zip(s.states, states):
                assert torch.equal(x[hot], expected)


def test_meta_device_module_is_materialised_by_dmp(single_rank_pg: None) -> None:
    """TorchRec's large-model pattern: build on meta, let DMP materialise the tables. The sketch
    must come out intact (not zero-filled) and training must promote as usual."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50_000, feature_names=["a"])]
    cfg = CafeConfig(compression_ratio=20, threshold=2.0, importance="frequency")
    cafe = CafeEmbeddingBagCollection(tables, cfg, device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"))
    fresh = CafeEmbeddingBagCollection(tables, cfg)
    for key, value in fresh._sketch.state_dict().items():
        assert torch.equal(dmp.module._sketch.state_dict()[key], value), key
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([5, 5, 6]), lengths=torch.tensor([2, 1]))
    for _ in range(2):
        dmp(kjt).values().sum().backward()
    dmp.module.apply_pending_updates()
    assert int(dmp.module._sketch.query(torch.tensor([5]))) >= 0
