"""The partitioned sharded form (CafeEmbeddingBagCollectionSharder(form="partitioned"), row-wise):
1, 2 and 4 gloo ranks holding P = W partitions, and ranks holding several partitions each, against
CafeEmbeddingBagPartitions, the same P partitions on one process fed the global batches. DLRM, 12
steps, fused row-wise Adagrad against torch's. Each partition's sketch must equal the emulation's
bit for bit (frequency importance), its row block the partition's rows and the losses the
emulation's within float tolerance; a rank of W holds 1/W of the module's bytes. DCP checkpoints
reshard between runs of different W over the same partitions and continue exactly."""

import dataclasses
import os
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import construct_module_sharding_plan
from torchrec.distributed.sharding_plan import table_wise as table_wise_plan
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingEnv
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from tests.conftest import FieldsBatch, local_part, run_ranks
from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection, CafeEmbeddingBagCollectionSharder
from torchrec_cafe.checkpoint import checkpoint_path, load, save
from torchrec_cafe.modules.partition import CafeEmbeddingBagPartitions

STEPS, BATCH, LR, SAVE_AT = 12, 16, 0.1, 6
TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=20_000, feature_names=["a", "b"]),
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=8_001, feature_names=["c"]),
    # Its budget holds one row: its IDs all go to partition 0 (the others' row of it stays unused).
    EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=6, feature_names=["d"]),
]
CONFIG = CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency")
PHYSICAL = "sparse_arch.embedding_bag_collection._embedding_bag_collection.embedding_bags.{}.weight"


def _batch(step: int) -> "tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]":
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(1, 4, (4 * BATCH,), generator=g)
    u = torch.rand(int(lengths.sum()), generator=g, dtype=torch.float64)
    values = (u.pow(-1 / 1.1).clamp(max=1e6).long() * 104729) % 8000
    kjt = KeyedJaggedTensor(keys=["a", "b", "c", "d"], values=values, lengths=lengths)
    return torch.rand(BATCH, 4, generator=g), kjt, torch.randint(0, 2, (BATCH,), generator=g).float()


def _dlrm(ebc: torch.nn.Module) -> DLRM:
    return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])


def _emulation(partitions: int) -> "tuple[DLRM, CafeEmbeddingBagPartitions]":
    torch.manual_seed(0)
    emulation = CafeEmbeddingBagPartitions(TABLES, partitions, cafe=CONFIG)
    return _dlrm(emulation), emulation


def _initial_state(partitions: int) -> Dict[str, torch.Tensor]:
    """The emulation's initial state under the sharded model's names (row blocks concatenated,
    sketches stacked)."""
    model, emulation = _emulation(partitions)
    state = {k: v for k, v in model.state_dict().items() if ".partitions." not in k}
    for t in TABLES:
        blocks = [p.embedding_bags[t.name].weight.detach() for p in emulation.partitions]
        state[PHYSICAL.format(t.name)] = torch.cat(blocks)
    for k in emulation.partition(0).sketch.state_dict():
        stacked = torch.stack([p.sketch.state_dict()[k] for p in emulation.partitions])
        state[f"sparse_arch.embedding_bag_collection._sketch.{k}"] = stacked
    return state


def _train(dmp: DistributedModelParallel, opt: torch.optim.Optimizer, steps: range, rank: int, world: int) -> List[float]:
    losses = []
    for step in steps:
        dense, kjt, labels = _batch(step)
        n = BATCH // world
        logits = dmp(dense[rank * n : (rank + 1) * n], local_part(kjt, rank, world)).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[rank * n : (rank + 1) * n])
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def _dense_optimizer(dmp: DistributedModelParallel) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for n, p in dmp.named_parameters() if "embedding_bag" not in n], lr=LR)


def _final(dmp: DistributedModelParallel) -> Dict[str, object]:
    """This rank's partitions' sketches (by partition index) and row blocks, pending scores applied."""
    sharded = dmp.module.sparse_arch.embedding_bag_collection
    sharded.apply_pending_updates()
    rows = {}
    for t in TABLES:
        tensor = dmp.state_dict()[PHYSICAL.format(t.name)]
        assert isinstance(tensor, ShardedTensor)
        rows[t.name] = tensor.local_shards()[0].tensor.clone()
    first = dist.get_rank() * len(sharded.partitions)
    sketches = {first + j: p.sketch.state_dict() for j, p in enumerate(sharded.partitions)}
    return {"sketches": sketches, "rows": rows, "bytes": _rank_bytes(sharded)}


def _run(rank: int, world: int, partitions: int) -> Dict[str, object]:
    dmp = _model(world, partitions=partitions)
    dmp.load_state_dict(_initial_state(partitions))
    losses = _train(dmp, _dense_optimizer(dmp), range(STEPS), rank, world)
    return {"losses": losses, **_final(dmp)}


def _rank_bytes(sharded: torch.nn.Module) -> int:
    """Bytes of everything this rank holds for the module: row blocks, optimizer state, sketch,
    remap constants and every other buffer."""
    tensors = {id(t): t for t in list(sharded.parameters()) + list(sharded.buffers())}
    inner = sharded._embedding_bag_collection
    for state in inner.fused_optimizer.state_dict()["state"].values():
        for v in state.values():
            local = v.local_shards()[0].tensor if isinstance(v, ShardedTensor) else v
            tensors[id(local)] = local
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _reference(partitions: int) -> Dict[str, object]:
    model, emulation = _emulation(partitions)
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if ".partitions." not in n], lr=LR)
    tables = RowWiseAdagrad([p for n, p in model.named_parameters() if ".partitions." in n], lr=LR, eps=1e-8)
    for p in emulation.partitions:
        p.attach_optimizer(tables)
    losses = []
    for step in range(STEPS):
        dense, kjt, labels = _batch(step)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(-1), labels)
        loss.backward()
        for o in (opt, tables):
            o.step()
            o.zero_grad()
        losses.append(float(loss))
    for p in emulation.partitions:
        p.apply_pending_updates()
    return {"losses": losses, "emulation": emulation}


def _worker(rank: int, world: int, out: str, partitions: int) -> None:
    torch.save(_run(rank, world, partitions), os.path.join(out, f"rank{rank}.pt"))


def _ranks(world: int, out: str, partitions: int) -> List[Dict[str, object]]:
    run_ranks(_worker, world, out, partitions)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


def _whole_rows(ranks: List[Dict[str, object]]) -> Dict[str, torch.Tensor]:
    """Every table's rows, the ranks' blocks in rank order (partition p's rows are block p)."""
    return {t.name: torch.cat([r["rows"][t.name] for r in ranks]) for t in TABLES}


def _sketches(ranks: List[Dict[str, object]]) -> Dict[int, Dict[str, torch.Tensor]]:
    return {p: s for r in ranks for p, s in r["sketches"].items()}


@pytest.mark.parametrize("world,partitions", [(1, 1), (2, 2), (4, 4), (1, 2), (2, 4)])
def test_partitioned_run_equals_its_emulation(tmp_path, single_rank_pg: None, world: int, partitions: int) -> None:
    ranks = _ranks(world, str(tmp_path), partitions)
    reference = _reference(partitions)
    torch.testing.assert_close(ranks[0]["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    sketches, rows = _sketches(ranks), _whole_rows(ranks)
    assert sorted(sketches) == list(range(partitions))
    promoted = 0
    for p, part in enumerate(reference["emulation"].partitions):
        promoted += int(part.sketch.state_dict()["promotions"].sum())
        for key, value in part.sketch.state_dict().items():
            assert torch.equal(sketches[p][key], value), (p, key)
    for t in TABLES:
        expected = torch.cat([part.embedding_bags[t.name].weight.detach() for part in reference["emulation"].partitions])
        torch.testing.assert_close(rows[t.name], expected, rtol=1e-5, atol=1e-6)
    assert promoted > 0  # the runs migrated rows
    if world == partitions > 1:  # a rank holds its share of the bytes the module takes on one rank, plus 5%
        whole = _run(0, 1, 1)["bytes"]
        print(world, whole, [r["bytes"] for r in ranks])
        assert max(r["bytes"] for r in ranks) <= (1 / world + 0.05) * whole


def _model(world: int, wrap: Callable[[DLRM], torch.nn.Module] = lambda m: m, partitions: Optional[int] = None) -> DistributedModelParallel:
    torch.manual_seed(0)
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=CONFIG)
    model = wrap(_dlrm(cafe))
    apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": LR})
    sharders = [CafeEmbeddingBagCollectionSharder(form="partitioned", partitions=partitions)]
    constraints = {t.name: ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"]) for t in TABLES}
    topology = Topology(world_size=world, compute_device="cpu", local_world_size=world)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(model, sharders)
    return DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)


def _resume_worker(rank: int, world: int, root: str) -> None:
    """Trains STEPS steps saving at SAVE_AT; a fresh model loads that checkpoint and trains the rest."""
    dmp = _model(world)
    opt = _dense_optimizer(dmp)
    optimizers = {"sparse": dmp.fused_optimizer, "dense": opt}
    losses = _train(dmp, opt, range(SAVE_AT), rank, world)
    save(checkpoint_path(root, SAVE_AT), dmp, optimizers)
    losses += _train(dmp, opt, range(SAVE_AT, STEPS), rank, world)
    resumed = _model(world)
    resumed_opt = _dense_optimizer(resumed)
    load(checkpoint_path(root, SAVE_AT), resumed, {"sparse": resumed.fused_optimizer, "dense": resumed_opt})
    resumed_losses = _train(resumed, resumed_opt, range(SAVE_AT, STEPS), rank, world)
    torch.save({"run": _final(dmp), "resumed": _final(resumed), "losses": (losses[SAVE_AT:], resumed_losses)}, os.path.join(root, f"rank{rank}.pt"))


def test_partitioned_checkpoint_resumes_exactly(tmp_path, single_rank_pg: None) -> None:
    """DCP save on 2 ranks, load into a fresh 2-rank model: it continues as the run that saved
    (each rank's own sketch restored, not rank 0's). A model with another W is refused clearly."""
    world = 2
    run_ranks(_resume_worker, world, str(tmp_path))
    sketches = []
    for r in range(world):
        out = torch.load(tmp_path / f"rank{r}.pt")
        run, resumed = out["run"], out["resumed"]
        torch.testing.assert_close(out["losses"][1], out["losses"][0], rtol=1e-5, atol=1e-6)
        for key, value in run["sketches"][r].items():
            assert torch.equal(resumed["sketches"][r][key], value), key
        for t in TABLES:
            torch.testing.assert_close(resumed["rows"][t.name], run["rows"][t.name], rtol=1e-5, atol=1e-6)
        sketches.append(run["sketches"][r]["slot_keys"])
    assert not torch.equal(sketches[0], sketches[1])  # the ranks' sketches are their own
    with pytest.raises(ValueError, match="num_embeddings=10000, the model has 20000"):  # 2 partitions, not 1
        load(checkpoint_path(str(tmp_path), SAVE_AT), _model(1))


def _reshard_worker(rank: int, world: int, root: str, partitions: int, phase: str) -> None:
    """``save``: trains STEPS steps, saving at SAVE_AT; ``load``: a fresh model (any W) loads that
    checkpoint and trains the rest. Both record the losses after SAVE_AT and the final state."""
    dmp = _model(world, partitions=partitions)
    opt = _dense_optimizer(dmp)
    optimizers = {"sparse": dmp.fused_optimizer, "dense": opt}
    if phase == "save":
        _train(dmp, opt, range(SAVE_AT), rank, world)
        save(checkpoint_path(root, SAVE_AT), dmp, optimizers)
    else:
        load(checkpoint_path(root, SAVE_AT), dmp, optimizers)
    losses = _train(dmp, opt, range(SAVE_AT, STEPS), rank, world)
    torch.save({"losses": losses, **_final(dmp)}, os.path.join(root, f"{phase}-rank{rank}.pt"))


@pytest.mark.parametrize("before,after,partitions", [(2, 1, 2), (1, 2, 2), (2, 4, 4)])
def test_partitioned_checkpoint_reshards_between_world_sizes(tmp_path, single_rank_pg: None, before: int, after: int, partitions: int) -> None:
    """A checkpoint of P partitions saved on ``before`` ranks, loaded on ``after`` ranks (DCP
    moves each partition's rows, optimizer state and sketch to its new owner), continues exactly as
    the run that saved it: the same losses, sketches bit for bit, the same rows."""
    for world, phase in ((before, "save"), (after, "load")):
        run_ranks(_reshard_worker, world, str(tmp_path), partitions, phase)
    saved = [torch.load(tmp_path / f"save-rank{r}.pt") for r in range(before)]
    loaded = [torch.load(tmp_path / f"load-rank{r}.pt") for r in range(after)]
    torch.testing.assert_close(loaded[0]["losses"], saved[0]["losses"], rtol=1e-5, atol=1e-6)
    want, got = _sketches(saved), _sketches(loaded)
    assert sorted(got) == sorted(want) == list(range(partitions))
    for p in want:
        for key, value in want[p].items():
            assert torch.equal(got[p][key], value), (p, key)
    rows = _whole_rows(saved)
    for name, value in _whole_rows(loaded).items():
        torch.testing.assert_close(value, rows[name], rtol=1e-5, atol=1e-6)


@dataclasses.dataclass
class _Batch(FieldsBatch):
    dense: torch.Tensor
    kjt: KeyedJaggedTensor
    labels: torch.Tensor



class _WithLoss(torch.nn.Module):
    """The model TrainPipelineSparseDist drives: batch -> (loss, loss)."""

    def __init__(self, dlrm: torch.nn.Module) -> None:
        super().__init__()
        self.dlrm = dlrm

    def forward(self, batch: _Batch) -> "tuple[torch.Tensor, torch.Tensor]":
        loss = torch.nn.functional.binary_cross_entropy_with_logits(self.dlrm(batch.dense, batch.kjt).squeeze(-1), batch.labels)
        return loss, loss.detach()


def _local_batch(step: int, rank: int, world: int) -> _Batch:
    dense, kjt, labels = _batch(step)
    n = BATCH // world
    return _Batch(dense[rank * n : (rank + 1) * n], local_part(kjt, rank, world), labels[rank * n : (rank + 1) * n])


def _pipeline_worker(rank: int, world: int, out: str) -> None:
    models = [_model(world, wrap=_WithLoss) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    plain, piped = models
    opt = _dense_optimizer(plain)
    losses = []
    for step in range(STEPS):
        loss, _ = plain(_local_batch(step, rank, world))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    pipeline = TrainPipelineSparseDist(piped, _dense_optimizer(piped), torch.device("cpu"))
    batches = iter([_local_batch(step, rank, world) for step in range(STEPS)])
    piped_losses = [float(pipeline.progress(batches)) for _ in range(STEPS)]
    pipelined = [type(m).__name__ for m in pipeline._pipelined_modules]
    sketches = [m.module.dlrm.sparse_arch.embedding_bag_collection.cafe for m in models]
    for cafe in sketches:
        cafe.apply_pending_updates()
    same = all(torch.equal(a, b) for a, b in zip(sketches[0].sketch.state_dict().values(), sketches[1].sketch.state_dict().values()))
    torch.save({"losses": (losses, piped_losses), "pipelined": pipelined, "sketch_equal": same}, os.path.join(out, f"rank{rank}.pt"))


def test_partitioned_pipeline_equals_plain_loop(tmp_path) -> None:
    """TrainPipelineSparseDist remaps batch j + 1 before batch j's backward; the partitioned form
    updates and remaps in compute, after it: the pipelined run is the plain loop's, exactly."""
    run_ranks(_pipeline_worker, 2, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["pipelined"] == ["PartitionedCafeEmbeddingBagCollection"]
        assert out["sketch_equal"]
        torch.testing.assert_close(out["losses"][1], out["losses"][0], rtol=1e-5, atol=1e-6)


def test_partitioned_form_refuses_what_it_cannot_compute(single_rank_pg: None) -> None:
    """Clear ValueErrors, before any state changes: a placement other than row-wise, MEAN pooling,
    variable-batch KJTs; the sharder offers row-wise only."""
    sharder = CafeEmbeddingBagCollectionSharder(form="partitioned")
    assert sharder.sharding_types("cpu") == ["row_wise"]
    with pytest.raises(ValueError, match="form must be one of"):
        CafeEmbeddingBagCollectionSharder(form="sharded")
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=CONFIG)
    table_wise = construct_module_sharding_plan(
        cafe.physical_tables(), {t.name: table_wise_plan(rank=0) for t in TABLES}, local_size=1, world_size=1, device_type="cpu"
    )
    with pytest.raises(ValueError, match="not supported by CAFE's partitioned form"):
        sharder.shard(cafe, table_wise, env, torch.device("cpu"))
    mean = [dataclasses.replace(t, pooling=PoolingType.MEAN) for t in TABLES]
    with pytest.raises(ValueError, match="SUM pooling"):
        CafeEmbeddingBagPartitions(mean, 2, cafe=CONFIG)
    dmp = _model(1)
    kjt = KeyedJaggedTensor(
        keys=["a", "b", "c", "d"], values=torch.arange(5), lengths=torch.tensor([1, 1, 1, 1, 1]), stride_per_key_per_rank=[[1], [2], [1], [1]]
    )
    sketch = {k: v.clone() for k, v in dmp.module.sparse_arch.embedding_bag_collection.cafe.sketch.state_dict().items()}
    with pytest.raises(ValueError, match="fixed-batch KJTs"):
        dmp.module.sparse_arch.embedding_bag_collection(kjt)
    after = dmp.module.sparse_arch.embedding_bag_collection.cafe.sketch.state_dict()
    assert all(torch.equal(after[k], v) for k, v in sketch.items())


def test_a_small_table_reads_no_more_rows_than_its_budget_holds() -> None:
    """A table whose budget holds R < P rows spreads its IDs over R partitions: its IDs read at
    most R distinct rows, as hashed into its budget (not one row per partition)."""
    tiny = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=6, feature_names=["f"])]
    config = CafeConfig(compression_ratio=3)  # 6 rows x 32 B / 3 = 64 B: two rows
    emulation = CafeEmbeddingBagPartitions(tiny, 4, cafe=config).eval()
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.arange(6), lengths=torch.ones(6, dtype=torch.int64))
    pooled = emulation(kjt).values()
    assert len({tuple(row.tolist()) for row in pooled}) == 2
