"""DCP checkpoints across world sizes and plans, on real gloo ranks: a DLRM over a sharded
CafeEmbeddingBagCollection saved after 20 steps on N ranks, loaded on M ranks under another plan
and trained 20 more steps, ends where the uninterrupted run ends: same sketch (bit for bit), same
tables, fused and dense optimizer state and losses within float tolerance (2 -> 2, 2 -> 1, 1 -> 2)."""

import json
import os
from typing import Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.models.dlrm import DLRM
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from tests.conftest import run_ranks
from tests.test_two_ranks_equivalence import TABLES, _half
from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection, CafeEmbeddingBagCollectionSharder
from torchrec_cafe.checkpoint import checkpoint_path, latest, load, save

SAVE_AT, STEPS = 20, 40
CONFIG = CafeConfig(compression_ratio=20, threshold=3.0, importance="frequency", decay=0.9)


def _model(world: int, sharding: str, config: CafeConfig = CONFIG) -> "tuple[DistributedModelParallel, CombinedOptimizer]":
    torch.manual_seed(0)
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=config)
    model = DLRM(embedding_bag_collection=cafe, dense_in_features=4, dense_arch_layer_sizes=[8, 8], over_arch_layer_sizes=[8, 1])
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    sharders = [CafeEmbeddingBagCollectionSharder()]
    constraints = {t.name: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"]) for t in TABLES}
    topology = Topology(world_size=world, compute_device="cpu", local_world_size=world)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(model, sharders)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dmp.load_state_dict(initial)  # CPU shards are not copied from the module
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizer = CombinedOptimizer(
        [("sparse", dmp.fused_optimizer), ("dense", KeyedOptimizerWrapper(dense, lambda p: torch.optim.Adagrad(p, lr=0.05)))]
    )
    return dmp, optimizer


def _train(dmp: DistributedModelParallel, optimizer: CombinedOptimizer, steps: range, rank: int, world: int) -> List[float]:
    losses = []
    for step in steps:
        dense, kjt, labels = _half(step, rank, world)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(dense, kjt).squeeze(-1), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
        losses.append(float(global_loss) / world)
    return losses


def _run(rank: int, world: int, sharding: str, root: str, resume_from: Optional[str]) -> None:
    """Trains to STEPS, saving at SAVE_AT, or resumes from ``resume_from``; saves the final state."""
    dmp, optimizer = _model(world, sharding)
    start = 0
    if resume_from is not None:
        start = load(latest(resume_from), dmp, optimizer)["step"]
    losses = _train(dmp, optimizer, range(start, SAVE_AT), rank, world)
    if resume_from is None:
        save(checkpoint_path(root, SAVE_AT), dmp, optimizer, extra={"step": SAVE_AT})
    losses += _train(dmp, optimizer, range(max(start, SAVE_AT), STEPS), rank, world)
    save(os.path.join(root, "final"), dmp, optimizer, extra={"step": STEPS})
    if rank == 0:
        with open(os.path.join(root, "losses.json"), "w") as f:
            json.dump(losses[-(STEPS - SAVE_AT):], f)


def _launch(world: int, sharding: str, root: str, resume_from: Optional[str] = None) -> None:
    os.makedirs(root, exist_ok=True)
    run_ranks(_run, world, sharding, root, resume_from)


def _final(root: str) -> "tuple[Dict[str, torch.Tensor], List[float]]":
    """Whole tensors of the final checkpoint (ShardedTensors gathered by DCP) and the losses."""
    out = os.path.join(root, "final.pt")
    dcp_to_torch_save(os.path.join(root, "final"), out)
    flat: Dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    with open(os.path.join(root, "losses.json")) as f:
        return flat, json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Dict[int, str]:
    """Uninterrupted runs at world sizes 2 (table-wise) and 1, each saved at SAVE_AT on the way."""
    roots = {}
    for world in (2, 1):
        roots[world] = str(tmp_path_factory.mktemp(f"uninterrupted{world}"))
        _launch(world, "table_wise", roots[world])
    return roots


@pytest.mark.parametrize(
    "saved_world, world, sharding",
    [(2, 2, "row_wise"), (2, 1, "table_wise"), (1, 2, "column_wise")],
    ids=["2to2-tw-to-rw", "2to1", "1to2-tw-to-cw"],
)
def test_resume_on_another_world_size_and_plan(tmp_path, uninterrupted: Dict[int, str], saved_world: int, world: int, sharding: str) -> None:
    _launch(world, sharding, str(tmp_path), resume_from=uninterrupted[saved_world])
    expected, expected_losses = _final(uninterrupted[saved_world])
    got, losses = _final(str(tmp_path))
    assert set(got) == set(expected)
    sketch = [k for k in expected if "._sketch." in k]
    assert sketch and int(expected[next(k for k in sketch if k.endswith("promotions"))].sum()) > 0
    for key in sketch:
        assert torch.equal(got[key], expected[key]), key
    assert any(k.startswith("optim.state.sparse") and k.endswith("momentum1") for k in expected)
    assert any(k.startswith("optim.state.dense") for k in expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-4, atol=1e-6)
