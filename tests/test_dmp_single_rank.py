"""CafeEmbeddingBagCollection under DistributedModelParallel (world size 1, fused TBE optimizers)."""

import copy
from typing import Any, Dict, Type

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.distributed import CafeEmbeddingBagCollectionSharder, ShardedCafeEmbeddingBagCollection
from torchrec_cafe.rows import tbe_shards

from .cafe_reads import hot_row, promotion_source


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
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency"))
    apply_optimizer_in_backward(optimizer, cafe._embedding_bag_collection.parameters(), kwargs)
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"))
    module = dmp.module
    assert isinstance(module._embedding_bag_collection, ShardedEmbeddingBagCollection)
    kjt = KeyedJaggedTensor(keys=["b", "a"], values=torch.tensor([42, 5, 42, 9, 11]), lengths=torch.tensor([1, 1, 2, 1]))
    for _ in range(2):  # 42 scores 2 per step: promoted by the 2nd update
        dmp(kjt).values().pow(2).sum().backward()
    (shard,) = tbe_shards(module._embedding_bag_collection, ["t"])
    assert len(shard.states) == num_states
    src = promotion_source(module, "t", 42)
    row = shard.weight[src].sum(0)
    states = [s[src[0]].clone() for s in shard.states]
    module.apply_pending_updates()
    hot = hot_row(module, "t", 42)
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
    cafe = CafeEmbeddingBagCollection(tables, cafe=cfg)
    apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"))
    module = dmp.module
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([42, 42, 9]), lengths=torch.tensor([2, 1]))
    for _ in range(2):
        dmp(kjt).values().pow(2).sum().backward()
    (shard,) = tbe_shards(module._embedding_bag_collection, ["t"])
    src = promotion_source(module, "t", 42)
    row, state = shard.weight[src].sum(0), shard.states[0][src[0]].clone()
    module.apply_pending_updates()
    hot = hot_row(module, "t", 42)
    assert hot >= 0 and float(state) > 0
    assert torch.equal(shard.weight[hot], row) and float(shard.states[0][hot]) == 0.0
    if hot != src[0]:
        assert torch.equal(shard.states[0][src[0]], state)  # the source row keeps its state


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
    cafe = CafeEmbeddingBagCollection(tables, cafe={n: CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency") for n in ("a", "b")})
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
        src = promotion_source(module, name, id_)
        before[name] = [(s.weight[src].sum(0), [x[src[0]].clone() for x in s.states]) for s in shards if s.table == name]
    module.apply_pending_updates()
    for name, id_ in (("a", 7), ("b", 11)):
        hot = hot_row(module, name, id_)
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
    cafe = CafeEmbeddingBagCollection(tables, cafe=cfg, device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"))
    fresh = CafeEmbeddingBagCollection(tables, cafe=cfg)
    for key, value in fresh._sketch.state_dict().items():
        assert torch.equal(dmp.module._sketch.state_dict()[key], value), key
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([5, 5, 6]), lengths=torch.tensor([2, 1]))
    for _ in range(2):
        dmp(kjt).values().sum().backward()
    dmp.module.apply_pending_updates()
    assert hot_row(dmp.module, "t", 5) >= 0


def _data_parallel_dmp(cafe: CafeEmbeddingBagCollection) -> DistributedModelParallel:
    """``cafe`` under DMP with every table data-parallel (dense kernel), planned by the CAFE sharder."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    from torchrec_cafe import CafeEmbeddingBagCollectionSharder

    sharders = [CafeEmbeddingBagCollectionSharder()]
    constraints = {c.name: ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["dense"]) for c in cafe.embedding_bag_configs()}
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints).plan(cafe, sharders)
    return DistributedModelParallel(cafe, device=torch.device("cpu"), plan=plan, sharders=sharders)


@pytest.mark.parametrize(
    "optimizer, kwargs, num_states",
    [
        (torch.optim.SGD, {"lr": 0.1}, 0),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, 1),
        (torch.optim.Adagrad, {"lr": 0.1}, 1),
        (RowWiseAdagrad, {"lr": 0.1}, 1),
        (torch.optim.Adam, {"lr": 0.01}, 2),
    ],
)
def test_promotion_copies_data_parallel_rows_and_state(
    single_rank_pg: None, optimizer: Type[torch.optim.Optimizer], kwargs: Dict[str, Any], num_states: int
) -> None:
    """Data-parallel tables: the weights are a view of FBGEMM's dense TBE, the state lives in the
    dense optimizer that steps them; a promotion copies both into the hot row."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel

    from torchrec_cafe.distributed.sharder import ShardedCafeEmbeddingBagCollection
    from torchrec_cafe.rows import dense_shards

    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50_000, feature_names=["a", "b"])]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency"))
    dmp = _data_parallel_dmp(cafe)
    module = dmp.module
    assert isinstance(module, ShardedCafeEmbeddingBagCollection)
    assert dmp.plan.plan[""]["t"].compute_kernel == EmbeddingComputeKernel.DENSE.value
    (weight,) = [p for n, p in dmp.named_parameters() if n.endswith("embedding_bags.t.weight")]
    opt = optimizer([weight], **kwargs)
    module.cafe.attach_optimizer(opt)
    kjt = KeyedJaggedTensor(keys=["b", "a"], values=torch.tensor([42, 5, 42, 9, 11]), lengths=torch.tensor([1, 1, 2, 1]))
    for _ in range(2):  # 42 scores 2 per step: promoted by the 2nd update
        dmp(kjt).values().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    # As after a checkpoint load: new state tensors, which the groups cached at the first update
    # (inside the 2nd forward) do not alias.
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    (shard,) = dense_shards(module._embedding_bag_collection, ["t"], opt)
    assert len(shard.states) == num_states and shard.weight.data_ptr() == weight.data_ptr()
    src = promotion_source(module.cafe, "t", 42)
    row = weight[src].detach().sum(0)
    states = [s[src[0]].clone() for s in shard.states]
    assert all(bool(s.abs().sum() > 0) for s in states)  # trained state, not the initial zeros
    module.apply_pending_updates()
    hot = hot_row(module.cafe, "t", 42)
    assert hot >= 0
    assert torch.equal(weight[hot], row)
    for (key, value), expected in zip([(k, v) for k, v in opt.state[weight].items() if v.dim() > 0], states):
        assert torch.equal(value[hot], expected), key  # in the optimizer's own state tensors
    module.eval()
    single = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([42]), lengths=torch.tensor([1, 0]))
    assert torch.equal(dmp(single).to_dict()["a"][0], row)  # the forward reads the hot row


def test_data_parallel_refuses_unreachable_optimizer_state(single_rank_pg: None) -> None:
    """No attached optimizer, or one whose state is not per row: refused, never skipped, before
    the update changes anything (the sketch is untouched and the scores wait for a retry)."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50_000, feature_names=["a"])]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency"))
    dmp = _data_parallel_dmp(cafe)
    module = dmp.module
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([42, 42, 9]), lengths=torch.tensor([2, 1]))
    dmp(kjt).values().sum().backward()
    before = {k: v.clone() for k, v in module.cafe.sketch.state_dict().items()}
    with pytest.raises(ValueError, match="'t' is data-parallel.*attach_optimizer"):
        module.apply_pending_updates()
    assert all(torch.equal(module.cafe.sketch.state_dict()[k], v) for k, v in before.items())
    (weight,) = [p for n, p in dmp.named_parameters() if n.endswith("embedding_bags.t.weight")]
    opt = torch.optim.Adafactor([weight], lr=0.01)  # factored second moment: a [1, dim] column state
    module.cafe.attach_optimizer(opt)
    opt.step()  # its state, from the first step's gradient
    with pytest.raises(NotImplementedError, match="Adafactor keeps state 'col_var'"):
        module.apply_pending_updates()
    assert all(torch.equal(module.cafe.sketch.state_dict()[k], v) for k, v in before.items())
    module.cafe.attach_optimizer(torch.optim.SGD([weight], lr=0.01))  # stateless: nothing to refuse
    dmp(kjt).values().sum().backward()  # the forward applies the first step's kept scores (42: 2)
    module.apply_pending_updates()  # and this the second's (42: 4 >= threshold 3)
    assert hot_row(module.cafe, "t", 42) >= 0


def test_fused_and_data_parallel_tables_in_one_module_both_migrate(single_rank_pg: None) -> None:
    """A fused table-wise table (state in its TBE) next to a data-parallel one (state in the dense
    optimizer): one update promotes in both, each from its own storage."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    from torchrec_cafe import CafeEmbeddingBagCollectionSharder
    from torchrec_cafe.rows import dense_shards

    tables = [
        EmbeddingBagConfig(name="f", embedding_dim=8, num_embeddings=30_000, feature_names=["fa"]),
        EmbeddingBagConfig(name="d", embedding_dim=4, num_embeddings=20_000, feature_names=["fd"]),
    ]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency"))
    apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    sharders = [CafeEmbeddingBagCollectionSharder()]
    constraints = {
        "f": ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]),
        "d": ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["dense"]),
    }
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints).plan(cafe, sharders)
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"), plan=plan, sharders=sharders)
    module = dmp.module
    (weight,) = [p for n, p in dmp.named_parameters() if n.endswith("embedding_bags.d.weight")]
    opt = torch.optim.Adagrad([weight], lr=0.1)  # TorchRec leaves dense kernels to the dense optimizer
    module.cafe.attach_optimizer(opt)
    kjt = KeyedJaggedTensor(keys=["fa", "fd"], values=torch.tensor([7, 7, 3, 11, 11]), lengths=torch.tensor([2, 1, 2, 0]))
    for _ in range(2):
        dmp(kjt).values().pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    inner = module._embedding_bag_collection
    shards = {s.table: s for s in tbe_shards(inner, ["f", "d"]) + dense_shards(inner, ["f", "d"], opt)}
    assert sorted(shards) == ["d", "f"] and len(shards["f"].states) == len(shards["d"].states) == 1
    before = {}
    for name, id_ in (("f", 7), ("d", 11)):
        src = promotion_source(module.cafe, name, id_)
        before[name] = (shards[name].weight[src].sum(0), shards[name].states[0][src[0]].clone())
    module.apply_pending_updates()
    for name, id_ in (("f", 7), ("d", 11)):
        hot = hot_row(module.cafe, name, id_)
        assert hot >= 0
        assert torch.equal(shards[name].weight[hot], before[name][0])
        assert torch.equal(shards[name].states[0][hot], before[name][1])


class _Wrapper(torch.nn.Module):
    def __init__(self, ebc: torch.nn.Module) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> Any:
        return self.ebc(kjt)


@pytest.mark.parametrize("sharder", ["cafe", "inner_ebc"])
def test_variable_batch_and_shared_features_through_dmp(single_rank_pg: None, sharder: str) -> None:
    """Sharded: a variable-batch KJT (inverse indices) and a feature read by two tables give the
    outputs of the expanded batch, keys named as TorchRec's EBC names them. Tables large enough
    for the planner to shard them table-wise: TorchRec 1.8's own sharded EBC fails on variable-batch
    input once a data-parallel table sits next to a model-parallel one."""
    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=200_000, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=3000, feature_names=["f1"]),
    ]
    cafe = CafeEmbeddingBagCollection(tables, cafe={"t1": CafeConfig(compression_ratio=20, threshold=1.0)})
    apply_optimizer_in_backward(torch.optim.SGD, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    if sharder == "cafe":
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

        # table-wise: TorchRec 1.8's row-wise reduce-scatter of variable batches fails on CPU
        constraints = {t.name: ParameterConstraints(sharding_types=["table_wise"]) for t in tables}
        model, sharders = _Wrapper(cafe), [CafeEmbeddingBagCollectionSharder()]
        plan = EmbeddingShardingPlanner(Topology(world_size=1, compute_device="cpu"), constraints=constraints).plan(model, sharders)
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), sharders=sharders, plan=plan)
        module = dmp.module.ebc
        assert isinstance(module, ShardedCafeEmbeddingBagCollection)
    else:
        dmp = DistributedModelParallel(cafe, device=torch.device("cpu"))
        module = dmp.module
    inverse = torch.tensor([[0, 1, 1, 0], [0, 1, 2, 2]])
    vbe = KeyedJaggedTensor(
        keys=["f1", "f2"],
        values=torch.tensor([3, 5, 9, 5, 7, 3, 11]),
        lengths=torch.tensor([1, 2, 1, 1, 2]),
        stride_per_key_per_rank=[[2], [3]],
        inverse_indices=(["f1", "f2"], inverse),
    )
    expanded = KeyedJaggedTensor(
        keys=["f1", "f2"],
        values=torch.tensor([3, 5, 9, 5, 9, 3, 5, 7, 3, 11, 3, 11]),
        lengths=torch.tensor([1, 2, 2, 1, 1, 1, 2, 2]),
    )
    for _ in range(3):
        out = dmp(vbe)
        assert out.keys() == ["f1@t1", "f2", "f1@t2"] and out.values().shape == (4, 12)
        out.values().pow(2).sum().backward()
    module.apply_pending_updates()
    assert int(module._sketch.promotions.sum()) > 0
    dmp.eval()
    torch.testing.assert_close(dmp(vbe).values(), dmp(expanded).values())
