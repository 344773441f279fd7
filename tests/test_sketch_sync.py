"""Two real gloo ranks: all-gathered updates keep every replica bit-identical to one process fed
the global batches."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import run_ranks
from torchrec_cafe.distributed import all_gather_aggregated, all_gather_occurrences
from torchrec_cafe.sketch import HotSketch

WORLD = 2
STEPS = 30


def _sketch() -> HotSketch:
    return HotSketch(num_buckets=[64, 32], pool_rows=[48, 24], threshold=[None, 6.0], decay=0.8, decay_mass=[300.0, 200.0], quarantine=1)


def _global_batch(step: int) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    g = torch.Generator().manual_seed(step)
    n = 400
    u = torch.rand(n, generator=g, dtype=torch.float64)
    ids = (u.pow(-1 / 1.2).clamp(max=1e6).long() * 7919) % 5000  # Pareto-skewed popularity
    tables = torch.randint(0, 2, (n,), generator=g)
    scores = torch.rand(n, generator=g) * 2
    scores[::37] = float("nan")  # bad scores are dropped identically everywhere
    return ids, scores, tables


def _worker(rank: int, world: int, out_dir: str, aggregated: bool) -> None:
    sketch = _sketch()
    for step in range(STEPS):
        ids, scores, tables = _global_batch(step)
        # an uneven split, and rank 1 gets nothing at step 3
        cut = 0 if step == 3 else 150 + step
        part = slice(0, cut) if rank == 0 else slice(cut, None)
        if step == 3:
            part = slice(0, ids.numel()) if rank == 0 else slice(0, 0)
        if aggregated:
            all_gather_aggregated(sketch, ids[part], scores[part], tables[part])
        else:
            sketch.update(*all_gather_occurrences(ids[part], scores[part], tables[part]))
    torch.save(sketch.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("aggregated", [False, True], ids=["occurrences", "pre-aggregated"])
def test_replicas_equal_a_single_process_fed_the_global_batches(tmp_path, aggregated: bool) -> None:
    run_ranks(_worker, WORLD, str(tmp_path), aggregated)
    reference = _sketch()
    for step in range(STEPS):
        reference.update(*_global_batch(step))
    assert int(reference.promotions.sum()) > 0 and int(reference.demotions.sum()) > 0
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in reference.state_dict().items():
            assert torch.equal(state[key], value), (rank, key)


def test_lower_layers_load_no_higher_ones() -> None:
    """The sketch layer (and its replicas over ranks) loads no TorchRec at all; the unsharded
    module loads no CAFE sharding code."""
    code = (
        "import sys, torchrec_cafe.sketch, torchrec_cafe.sketch.replicas\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torchrec'], 'sketch loaded torchrec'\n"
        "import torchrec_cafe.modules.cafe_embedding_bag\n"
        "assert 'torchrec_cafe.distributed' not in sys.modules, 'module loaded the sharder'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
