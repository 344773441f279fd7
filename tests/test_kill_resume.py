"""Kill and resume: a 2-rank DLRM + sharded CAFE run that checkpoints every 10 steps has one rank
SIGKILLed at step 25; restarted, it resumes from its step-20 checkpoint and ends bit-identical to
an uninterrupted run (grad-norm importance, same plan: same sketch, tables, optimizer state and
losses)."""

import dataclasses
import json
import os
import signal
from typing import Optional

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import run_ranks
from tests.test_checkpoint_reshard import CONFIG, STEPS, _final, _model, _train
from torchrec_cafe.checkpoint import checkpoint_path, latest, load, save

EVERY, WORLD = 10, 2


def _worker(rank: int, world: int, root: str, crash_at: Optional[int]) -> None:
    dmp, optimizer = _model(world, "row_wise", dataclasses.replace(CONFIG, importance="grad_norm"))
    resume = latest(root)
    start = load(resume, dmp, optimizer)["step"] if resume else 0
    losses = []
    for step in range(start, STEPS):
        losses += _train(dmp, optimizer, range(step, step + 1), rank, world)
        if (step + 1) % EVERY == 0:
            save(checkpoint_path(root, step + 1), dmp, optimizer, extra={"step": step + 1})
        if step + 1 == crash_at and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    save(os.path.join(root, "final"), dmp, optimizer)
    if rank == 0:
        with open(os.path.join(root, "losses.json"), "w") as f:
            json.dump(losses[-10:], f)


def _launch(root: str, crash_at: Optional[int] = None) -> None:
    run_ranks(_worker, WORLD, root, crash_at)


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path) -> None:
    uninterrupted, killed = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    _launch(uninterrupted)
    with pytest.raises(mp.ProcessExitedException, match="signal|SIGKILL"):
        _launch(killed, crash_at=25)
    assert latest(killed) == checkpoint_path(killed, 20)
    _launch(killed)  # the restart
    expected, expected_losses = _final(uninterrupted)
    got, losses = _final(killed)
    assert int(expected[next(k for k in expected if k.endswith("_sketch.promotions"))].sum()) > 0
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert losses == expected_losses
