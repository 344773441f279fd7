"""CafeEmbeddingBagCollection under DistributedModelParallel on two real gloo ranks (table-wise and
column-wise fused placements): the sketch replicas stay bit-identical to each other and to one
process fed the global batches (frequency importance, so scores do not depend on the split)."""

import os
from typing import List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from tests.conftest import free_port
from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection

WORLD, STEPS, BATCH = 2, 12, 16
TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=20_000, feature_names=["a", "b"]),
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=8_000, feature_names=["c"]),
]
CONFIG = CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency", decay=0.9)


def _global_kjt(step: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(0, 4, (3 * BATCH,), generator=g)
    u = torch.rand(int(lengths.sum()), generator=g, dtype=torch.float64)
    values = (u.pow(-1 / 1.1).clamp(max=1e6).long() * 104729) % 8000
    return KeyedJaggedTensor(keys=["a", "b", "c"], values=values, lengths=lengths)


def _local(kjt: KeyedJaggedTensor, rank: int) -> KeyedJaggedTensor:
    half = BATCH // WORLD
    parts = {k: kjt[k] for k in kjt.keys()}
    lengths, values = [], []
    for k in kjt.keys():
        jt = parts[k]
        off = jt.offsets()
        lo, hi = rank * half, (rank + 1) * half
        lengths.append(jt.lengths()[lo:hi])
        values.append(jt.values()[off[lo] : off[hi]])
    return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths))


def _worker(rank: int, port: int, sharding: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        cafe = CafeEmbeddingBagCollection(TABLES, CONFIG)
        apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.05})
        constraints = {t.name: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"]) for t in TABLES}
        topology = Topology(world_size=WORLD, compute_device="cpu", local_world_size=WORLD)
        plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(cafe, [EmbeddingBagCollectionSharder()])
        dmp = DistributedModelParallel(cafe, device=torch.device("cpu"), plan=plan)
        for step in range(STEPS):
            dmp(_local(_global_kjt(step), rank)).values().pow(2).sum().backward()
        dmp.module.apply_pending_updates()
        torch.save(dmp.module._sketch.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_sketch_replicas_match_a_single_process(tmp_path, sharding: str) -> None:
    mp.start_processes(_worker, args=(free_port(), sharding, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    reference = CafeEmbeddingBagCollection(TABLES, CONFIG)
    for step in range(STEPS):
        reference(_global_kjt(step)).values().pow(2).sum().backward()
    reference.apply_pending_updates()
    expected = reference._sketch.state_dict()
    assert int(expected["promotions"].sum()) > 0
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in expected.items():
            assert torch.equal(state[key], value), (rank, key)
