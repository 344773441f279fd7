"""CafeEmbeddingBagCollectionSharder on two real gloo ranks: DMP with the CAFE sharder next to
TorchRec's EBC sharder, the planner with the sketch reservation, a mixed plan, and
TrainPipelineSparseDist against the unpipelined run."""

import dataclasses
import os
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from tests.conftest import FieldsBatch, run_ranks
from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.distributed.sharder import (
    CafeEmbeddingBagCollectionSharder,
    CafeStorageReservation,
    ShardedCafeEmbeddingBagCollection,
)

WORLD, STEPS, BATCH = 2, 30, 8
TABLES = [
    EmbeddingBagConfig(name="rw", embedding_dim=8, num_embeddings=20_000, feature_names=["a"]),
    EmbeddingBagConfig(name="tw", embedding_dim=8, num_embeddings=10_000, feature_names=["b"]),
    EmbeddingBagConfig(name="cw", embedding_dim=8, num_embeddings=10_000, feature_names=["c"]),
]
PLAIN = [EmbeddingBagConfig(name="plain", embedding_dim=8, num_embeddings=100, feature_names=["d"])]
PLACEMENT = {"rw": "row_wise", "tw": "table_wise", "cw": "column_wise", "plain": "table_wise"}


class _Model(torch.nn.Module):
    """DLRM over a CAFE collection plus a plain EBC sharded by TorchRec's own sharder."""

    def __init__(self) -> None:
        super().__init__()
        cfg = CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency", pipeline_depth=1)
        self.dlrm = DLRM(
            embedding_bag_collection=CafeEmbeddingBagCollection(TABLES, cafe=cfg),
            dense_in_features=4,
            dense_arch_layer_sizes=[8, 8],
            over_arch_layer_sizes=[8, 1],
        )
        self.plain = EmbeddingBagCollection(PLAIN)

    def forward(self, batch: "_Batch") -> "tuple[torch.Tensor, torch.Tensor]":
        logits = self.dlrm(batch.dense, batch.cafe).squeeze(-1)
        extra = self.plain(batch.plain).values().sum(dim=1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits + extra, batch.labels)
        return loss, loss.detach()  # the pipeline's progress() returns the second item


@dataclasses.dataclass
class _Batch(FieldsBatch):
    """Two KJTs, one per collection: the pipeline traces each module's input to a batch field."""

    dense: torch.Tensor
    cafe: KeyedJaggedTensor
    plain: KeyedJaggedTensor
    labels: torch.Tensor



def _kjt(g: torch.Generator, keys: List[str]) -> KeyedJaggedTensor:
    lengths = torch.randint(1, 3, (len(keys) * BATCH,), generator=g)
    u = torch.rand(int(lengths.sum()), generator=g, dtype=torch.float64)
    values = (u.pow(-1 / 1.1).clamp(max=1e6).long() * 104729) % 100
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)


def _batch(step: int, rank: int) -> _Batch:
    g = torch.Generator().manual_seed(1000 * step + rank)
    labels = torch.randint(0, 2, (BATCH,), generator=g).float()
    return _Batch(torch.rand(BATCH, 4, generator=g), _kjt(g, ["a", "b", "c"]), _kjt(g, ["d"]), labels)


def _build(sharders: list) -> DistributedModelParallel:
    torch.manual_seed(0)
    model = _Model()
    for ebc in (model.dlrm.sparse_arch.embedding_bag_collection._embedding_bag_collection, model.plain):
        apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.1})
    constraints = {n: ParameterConstraints(sharding_types=[t], compute_kernels=["fused"]) for n, t in PLACEMENT.items()}
    topology = Topology(world_size=WORLD, compute_device="cpu", local_world_size=WORLD)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, storage_reservation=CafeStorageReservation(percentage=0.15))
    plan = planner.plan(model, sharders)  # every rank plans: deterministic, no collective_plan hang
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)


def _worker(rank: int, world: int, out: str) -> None:
    sharders = [CafeEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]
    plain, piped = _build(sharders), _build(sharders)
    piped.load_state_dict(plain.state_dict())  # CPU shards are not copied from the module
    sharded = plain.module.dlrm.sparse_arch.embedding_bag_collection
    assert isinstance(sharded, ShardedCafeEmbeddingBagCollection)
    results: Dict[str, List[float]] = {"plain": [], "piped": []}
    dense = [p for n, p in plain.named_parameters() if "embedding_bag" not in n and "plain" not in n]
    opt = torch.optim.SGD(dense, lr=0.05)
    for step in range(STEPS):
        loss, _ = plain(_batch(step, rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        results["plain"].append(float(loss))
    piped_dense = [p for n, p in piped.named_parameters() if "embedding_bag" not in n and "plain" not in n]
    pipeline = TrainPipelineSparseDist(piped, torch.optim.SGD(piped_dense, lr=0.05), torch.device("cpu"))
    batches = iter([_batch(step, rank) for step in range(STEPS)])
    for _ in range(STEPS):
        results["piped"].append(float(pipeline.progress(batches)))
    piped_module = piped.module.dlrm.sparse_arch.embedding_bag_collection
    results["pipelined_modules"] = [type(m).__name__ for m in pipeline._pipelined_modules]
    results["sketch_equal_across_ranks"], states = [], []
    for module in (sharded, piped_module):
        module.apply_pending_updates()
        states.append(torch.cat([v.double().flatten() for v in module._sketch.state_dict().values()]))
        gathered = [torch.empty_like(states[-1]) for _ in range(WORLD)]
        dist.all_gather(gathered, states[-1])
        results["sketch_equal_across_ranks"].append(bool(torch.equal(gathered[0], gathered[1])))
    results["sketch_piped_equals_plain"] = bool(torch.equal(states[0], states[1]))
    results["promotions"] = int(sharded._sketch.promotions.sum())
    results["plan"] = {n: s.sharding_type for n, s in plain.plan.get_plan_for_module("dlrm.sparse_arch.embedding_bag_collection").items()}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def test_sharder_mixed_plan_and_pipeline(tmp_path) -> None:
    run_ranks(_worker, WORLD, str(tmp_path))
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["plan"] == {"rw": "row_wise", "tw": "table_wise", "cw": "column_wise"}
        assert "ShardedCafeEmbeddingBagCollection" in r["pipelined_modules"]
        assert r["sketch_equal_across_ranks"] == [True, True]
        assert r["promotions"] > 0
        # pipeline_depth 1: the pipelined run is the plain loop's, sketch and losses.
        assert r["sketch_piped_equals_plain"]
        plain, piped = torch.tensor(r["plain"]), torch.tensor(r["piped"])
        torch.testing.assert_close(piped, plain, rtol=1e-5, atol=1e-6)


def test_sharder_refuses_bad_plans() -> None:
    sharder = CafeEmbeddingBagCollectionSharder()
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=CafeConfig(compression_ratio=20))
    assert set(sharder.shardable_parameters(cafe)) == {"rw", "tw", "cw"}
    assert "data_parallel" in sharder.sharding_types("cpu") and sharder.compute_kernels("data_parallel", "cpu") == ["dense"]
    from torchrec.distributed.types import ParameterSharding, ShardingEnv

    bogus = {"nope": ParameterSharding(sharding_type="table_wise", compute_kernel="fused", ranks=[0])}
    with pytest.raises(ValueError, match="names tables \\['nope'\\]"):
        sharder.shard(cafe, bogus, ShardingEnv.from_local(1, 0), torch.device("cpu"))
    for sharding_type, kernel in (("table_wise", "dense"), ("data_parallel", "fused")):
        bad = {"rw": ParameterSharding(sharding_type=sharding_type, compute_kernel=kernel, ranks=[0])}
        with pytest.raises(ValueError, match="dense goes with data_parallel"):
            sharder.shard(cafe, bad, ShardingEnv.from_local(1, 0), torch.device("cpu"))


def test_storage_reservation_counts_the_replicated_sketch() -> None:
    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation

    model = _Model()
    sketch = model.dlrm.sparse_arch.embedding_bag_collection._sketch.nbytes()
    sharders = [CafeEmbeddingBagCollectionSharder(), EmbeddingBagCollectionSharder()]

    def ddr(reservation: HeuristicalStorageReservation) -> List[int]:
        topology = Topology(world_size=WORLD, compute_device="cpu", local_world_size=WORLD)
        return [d.storage.ddr for d in reservation.reserve(topology, 512, model, sharders).devices]

    base, cafe = ddr(HeuristicalStorageReservation(percentage=0.15)), ddr(CafeStorageReservation(percentage=0.15))
    assert sketch > 0 and [b - c for b, c in zip(base, cafe)] == [sketch] * WORLD
