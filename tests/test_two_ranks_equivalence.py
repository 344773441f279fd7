"""Two gloo ranks against one process: DLRM over CafeEmbeddingBagCollection sharded by
CafeEmbeddingBagCollectionSharder, 30 steps, each rank fed half of every global batch, versus the
same model at world size 1 fed the global batches (tables table-wise, fused row-wise Adagrad).
Sketches end bit-identical (frequency importance), and updated tables and pooled outputs match
within float tolerance. Data-parallel tables (dense kernel, stepped by the dense row-wise Adagrad
attached to CAFE) must also end bit-identical on both ranks."""

import os
from typing import Dict

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.models.dlrm import DLRM
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from tests.conftest import local_part, run_ranks
from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection, CafeEmbeddingBagCollectionSharder

STEPS, BATCH = 30, 16
TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=20_000, feature_names=["a", "b"]),
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=8_000, feature_names=["c"]),
]


def _batch(step: int) -> "tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]":
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(1, 4, (3 * BATCH,), generator=g)
    u = torch.rand(int(lengths.sum()), generator=g, dtype=torch.float64)
    values = (u.pow(-1 / 1.1).clamp(max=1e6).long() * 104729) % 8000
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=values, lengths=lengths)
    return torch.rand(BATCH, 4, generator=g), kjt, torch.randint(0, 2, (BATCH,), generator=g).float()


def _half(step: int, rank: int, world: int) -> "tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]":
    dense, kjt, labels = _batch(step)
    if world == 1:
        return dense, kjt, labels
    n = BATCH // world
    lo, hi = rank * n, (rank + 1) * n
    local = local_part(kjt, rank, world)
    return dense[lo:hi], local, labels[lo:hi]


def _run(rank: int, world: int, sharding: str, sync: str = "aggregated") -> Dict[str, object]:
    torch.manual_seed(0)
    cfg = CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency", sync=sync)
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=cfg)
    model = DLRM(embedding_bag_collection=cafe, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    sharders = [CafeEmbeddingBagCollectionSharder()]
    kernel = "dense" if sharding == "data_parallel" else "fused"
    constraints = {t.name: ParameterConstraints(sharding_types=[sharding], compute_kernels=[kernel]) for t in TABLES}
    topology = Topology(world_size=world, compute_device="cpu", local_world_size=world)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(model, sharders)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dmp.load_state_dict(initial)  # CPU shards are not copied from the module
    dense = [p for n, p in dmp.named_parameters() if "embedding_bag" not in n]
    opt = torch.optim.SGD(dense, lr=0.1)
    sharded = dmp.module.sparse_arch.embedding_bag_collection
    opts = [opt]
    if sharding == "data_parallel":
        # TorchRec steps dense-kernel tables with the dense optimizer (in-backward ones are
        # dropped); FBGEMM's eps, to match the fused reference.
        table_params = [p for n, p in dmp.named_parameters() if "embedding_bags" in n]
        opts.append(RowWiseAdagrad(table_params, lr=0.1, eps=1e-8))
        sharded.cafe.attach_optimizer(opts[-1])
    for step in range(STEPS):
        d, kjt, labels = _half(step, rank, world)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(d, kjt).squeeze(-1), labels)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
    sharded.apply_pending_updates()
    dmp.eval()
    probe_dense, probe, _ = _half(STEPS, rank, world)
    with torch.no_grad():
        pooled = sharded(probe).values()
    tables = {}
    for name, tensor in dmp.state_dict().items():
        if "embedding_bags" in name and name.endswith(".weight"):
            if isinstance(tensor, ShardedTensor):
                full = torch.zeros(tensor.size()) if rank == 0 else None
                tensor.gather(dst=0, out=full)  # collective: whole ShardedTensor on rank 0
            else:
                full = tensor.detach().clone()  # data-parallel: this rank's full replica
            tables[name] = full
    return {"sketch": sharded._sketch.state_dict(), "pooled": pooled, "tables": tables}


def _worker(rank: int, world: int, sharding: str, out: str, sync: str) -> None:
    torch.save(_run(rank, world, sharding, sync), os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize(
    "sharding, sync",
    [("table_wise", "aggregated"), ("row_wise", "aggregated"), ("column_wise", "aggregated"),
     ("table_row_wise", "aggregated"), ("row_wise", "occurrences"), ("data_parallel", "aggregated")],
)
def test_two_ranks_equal_one_process(tmp_path, single_rank_pg: None, sharding: str, sync: str) -> None:
    run_ranks(_worker, 2, sharding, str(tmp_path), sync)
    reference = _run(0, 1, "table_wise")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert int(reference["sketch"]["promotions"].sum()) > 0
    for r in ranks:
        for key, value in reference["sketch"].items():
            assert torch.equal(r["sketch"][key], value), key
    torch.testing.assert_close(torch.cat([r["pooled"] for r in ranks]), reference["pooled"], rtol=1e-4, atol=1e-5)
    for name, full in ranks[0]["tables"].items():
        torch.testing.assert_close(full, reference["tables"][name], rtol=1e-4, atol=1e-5)
        if sharding == "data_parallel":  # replicas: same updates and migrations on every rank
            assert torch.equal(ranks[1]["tables"][name], full), name
