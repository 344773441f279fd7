"""CafeEmbeddingBagCollection under DistributedModelParallel on two real gloo ranks, for every
fused placement (table-, column-, row- and table-row-wise): the sketch replicas stay bit-identical
to each other and to one process fed the global batches (frequency importance, so scores do not
depend on the split), and promoted rows equal their source rows right after migration, also when
source and destination live on different ranks."""

import dataclasses
import os
from typing import List

import pytest
import torch
import torch.distributed as dist
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from tests.conftest import local_part, run_ranks
from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.distributed import CafeEmbeddingBagCollectionSharder, RowWiseEverywhereEBCSharder
from torchrec_cafe.rows import tbe_shards

from .cafe_reads import reads, rows_read

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


def _local_rows(module: CafeEmbeddingBagCollection) -> dict:
    """This rank's rows of each table: {table: [(row_offset, col_offset, weight copy)]}."""
    out = {}
    for shard in tbe_shards(module._embedding_bag_collection, [t.name for t in TABLES]):
        out.setdefault(shard.table, []).append((shard.row_offset, shard.weight.clone()))
    return out


def _worker(rank: int, world: int, sharding: str, out: str, importance: str = "frequency") -> None:
    torch.manual_seed(0)
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=dataclasses.replace(CONFIG, importance=importance))
    apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.05})
    constraints = {t.name: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"]) for t in TABLES}
    topology = Topology(world_size=WORLD, compute_device="cpu", local_world_size=WORLD)
    sharders = [CafeEmbeddingBagCollectionSharder()]
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(cafe, sharders)
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"), plan=plan, sharders=sharders)
    for step in range(STEPS):
        dmp(local_part(_global_kjt(step), rank, WORLD)).values().pow(2).sum().backward()
    module = dmp.module
    rows_before = _local_rows(module)
    module.apply_pending_updates()
    state = {
        "sketch": module._sketch.state_dict(),
        "rows_before": rows_before,
        "rows_after": _local_rows(module),
    }
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))


def _full_table(per_rank: List[dict], table: str) -> torch.Tensor:
    """Reassembles a table from every rank's (row_offset, rows) shards (column shards: by rank
    order, which is how the plan laid them out)."""
    blocks = {}
    for rows in per_rank:
        for offset, weight in rows.get(table, []):
            blocks.setdefault(offset, []).append(weight)
    return torch.cat([torch.cat(blocks[o], dim=1) for o in sorted(blocks)], dim=0)


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "row_wise", "table_row_wise"])
def test_sketch_replicas_and_migrations_match_a_single_process(tmp_path, sharding: str) -> None:
    run_ranks(_worker, WORLD, sharding, str(tmp_path))
    reference = CafeEmbeddingBagCollection(TABLES, cafe=CONFIG)
    for step in range(STEPS):
        reference(_global_kjt(step)).values().pow(2).sum().backward()
    ids = torch.arange(8000)  # every id the stream draws
    read_before = {t.name: (rows_read(reference, t.name, ids), reads(reference, t.name, ids)[1]) for t in TABLES}
    reference.apply_pending_updates()
    expected = reference._sketch.state_dict()
    assert int(expected["promotions"].sum()) > 0
    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for rank, state in enumerate(states):
        for key, value in expected.items():
            assert torch.equal(state["sketch"][key], value), (rank, key)
    # The last update's promotions: each new private row equals what its ID read just before
    # (pool row + block row), whichever ranks held them.
    migrated = crossed = 0
    for table in TABLES:
        before = _full_table([s["rows_before"] for s in states], table.name)
        after = _full_table([s["rows_after"] for s in states], table.name)
        src_rows, hot_before = read_before[table.name]
        row, hot_after, _ = reads(reference, table.name, ids)
        owners = sorted(o for s in states for o, _ in s["rows_before"].get(table.name, []))
        for i in torch.nonzero(hot_after & ~hot_before).flatten().tolist():
            dst, src = int(row[i]), src_rows[i]
            torch.testing.assert_close(after[dst], before[src].sum(0), rtol=0, atol=0)
            migrated += 1
            shard = lambda r: sum(o <= r for o in owners)  # noqa: E731
            crossed += any(shard(r) != shard(dst) for r in src)  # a row read on another rank
    assert migrated > 0
    if sharding in ("row_wise", "table_row_wise"):
        assert crossed > 0, "no promotion read a row of another rank"


def test_grad_norm_replicas_stay_identical(tmp_path) -> None:
    """Gradient-norm scores differ per rank (local gradients); the gathered, globally rescaled
    update still leaves both replicas bit-identical, with promotions."""
    run_ranks(_worker, WORLD, "row_wise", str(tmp_path), "grad_norm")
    first, second = (torch.load(tmp_path / f"rank{rank}.pt")["sketch"] for rank in range(WORLD))
    assert int(first["promotions"].sum()) > 0
    for key, value in first.items():
        assert torch.equal(second[key], value), key


def _mismatched_worker(rank: int, world: int, out: str) -> None:
    config = dataclasses.replace(CONFIG, threshold=3.0 + rank)
    # Unsharded, the module is local even in a 2-rank group: rank 0 alone trains and updates
    # (a collective would wait for rank 1 until the timeout).
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=config)
    if rank == 0:
        for step in range(STEPS):
            cafe(_global_kjt(step)).values().pow(2).sum().backward()
        cafe.apply_pending_updates()
        assert int(cafe._sketch.promotions.sum()) > 0
    messages = []
    with pytest.raises(ValueError, match="differ between the ranks") as replicas:
        cafe.replicate_across(dist.group.WORLD)
    messages.append(str(replicas.value))
    topology = Topology(world_size=WORLD, compute_device="cpu", local_world_size=WORLD)
    sharders = [CafeEmbeddingBagCollectionSharder()]
    module = CafeEmbeddingBagCollection(TABLES, cafe=config)
    plan = EmbeddingShardingPlanner(topology=topology).plan(module, sharders)
    with pytest.raises(ValueError, match="differ between the ranks") as sharded:
        DistributedModelParallel(module, device=torch.device("cpu"), plan=plan, sharders=sharders)
    messages.append(str(sharded.value))
    partitioned = [CafeEmbeddingBagCollectionSharder(form="partitioned")]
    module = CafeEmbeddingBagCollection(TABLES, cafe=config)
    plan = EmbeddingShardingPlanner(topology=topology).plan(module, partitioned)
    with pytest.raises(ValueError, match="differ between the ranks") as parts:
        DistributedModelParallel(module, device=torch.device("cpu"), plan=plan, sharders=partitioned)
    messages.append(str(parts.value))
    # TorchRec's EBC sharder alone shards the inner tables and leaves the sketch local: refused.
    module = CafeEmbeddingBagCollection(TABLES, cafe=config)
    sharders = [RowWiseEverywhereEBCSharder()]
    plan = EmbeddingShardingPlanner(topology=topology).plan(module, sharders)
    dmp = DistributedModelParallel(module, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dmp(local_part(_global_kjt(0), rank, WORLD)).values().sum().backward()
    with pytest.raises(RuntimeError, match="CafeEmbeddingBagCollectionSharder") as local:
        dmp.module.apply_pending_updates()
    messages.append(str(local.value))
    torch.save(messages, os.path.join(out, f"rank{rank}.pt"))


def test_ranks_with_different_configs_are_refused_and_unsharded_modules_stay_local(tmp_path) -> None:
    """Different CAFE settings: ``replicate_across`` and sharding under DMP (either form) raise the
    same error on every rank (the configs are compared before any other collective); an unsharded module never
    communicates; tables sharded by TorchRec's EBC sharder alone under a local sketch are refused."""
    run_ranks(_mismatched_worker, WORLD, str(tmp_path), timeout_s=60)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD))
    assert first == second and len(first) == 4
