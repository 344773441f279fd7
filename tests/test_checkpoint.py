"""Checkpoints of one process: state_dict round trips, DCP save/load resuming exactly, and bad
checkpoints refused before anything is changed."""

import dataclasses
import json
import os
from typing import Dict, List

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.checkpoint import MANIFEST, checkpoint_path, latest, load, save

TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=20_000, feature_names=["a", "b"]),
    EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=5_000, feature_names=["c"]),
]
CONFIG = CafeConfig(compression_ratio=20, threshold=1.0, decay=0.9)


def _kjt(step: int, batch: int = 32) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(0, 4, (3 * batch,), generator=g)
    u = torch.rand(int(lengths.sum()), generator=g, dtype=torch.float64)
    values = (u.pow(-1 / 1.1).clamp(max=1e6).long() * 104729) % 5000
    return KeyedJaggedTensor(keys=["a", "b", "c"], values=values, lengths=lengths)


def _build(config: CafeConfig = CONFIG, tables: List[EmbeddingBagConfig] = TABLES) -> "tuple[CafeEmbeddingBagCollection, torch.optim.Optimizer]":
    torch.manual_seed(0)
    cafe = CafeEmbeddingBagCollection(tables, cafe=config)
    opt = torch.optim.Adagrad(cafe.parameters(), lr=0.1)
    cafe.attach_optimizer(opt)
    return cafe, opt


def _train(cafe: CafeEmbeddingBagCollection, opt: torch.optim.Optimizer, steps: range) -> List[float]:
    losses = []
    for step in steps:
        out = cafe(_kjt(step)).values()
        loss = (out - 0.5).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def _snapshot(cafe: CafeEmbeddingBagCollection, opt: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in cafe.state_dict().items()}
    for i, s in enumerate(opt.state.values()):
        state.update({f"opt{i}.{k}": v.clone() for k, v in s.items()})
    return state


def _assert_same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_state_dict_round_trip_is_exact() -> None:
    cafe, opt = _build()
    _train(cafe, opt, range(10))
    assert int(cafe._sketch.promotions.sum()) > 0
    other, _ = _build()
    other.load_state_dict(cafe.state_dict())
    _assert_same({k: v for k, v in cafe.state_dict().items()}, {k: v for k, v in other.state_dict().items()})
    cafe.eval(), other.eval()
    kjt = _kjt(99)
    assert torch.equal(cafe(kjt).values(), other(kjt).values())


def test_save_load_resumes_exactly(tmp_path) -> None:
    cafe, opt = _build()
    _train(cafe, opt, range(10))
    path = save(checkpoint_path(str(tmp_path), 10), cafe, opt, extra={"step": 10})
    uninterrupted = _train(cafe, opt, range(10, 30))
    resumed, resumed_opt = _build()
    assert load(latest(str(tmp_path)), resumed, resumed_opt) == {"step": 10}
    assert path == latest(str(tmp_path))
    assert _train(resumed, resumed_opt, range(10, 30)) == uninterrupted
    _assert_same(_snapshot(cafe, opt), _snapshot(resumed, resumed_opt))
    assert int(resumed._sketch.promotions.sum()) > 0


def test_save_is_atomic_and_never_overwrites(tmp_path) -> None:
    cafe, opt = _build()
    _train(cafe, opt, range(3))
    root = str(tmp_path)
    save(checkpoint_path(root, 3), cafe, opt)
    with pytest.raises(FileExistsError, match="already exists"):
        save(checkpoint_path(root, 3), cafe, opt)
    # A save that died before its manifest leaves only a .partial directory: never picked up.
    os.makedirs(checkpoint_path(root, 7) + ".partial")
    os.makedirs(checkpoint_path(root, 9))  # no manifest either
    assert latest(root) == checkpoint_path(root, 3)
    with pytest.raises(ValueError, match="not a complete"):
        load(checkpoint_path(root, 9), cafe, opt)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damaged_checkpoint_is_refused_and_nothing_changes(tmp_path, damage: str) -> None:
    cafe, opt = _build()
    _train(cafe, opt, range(5))
    path = save(checkpoint_path(str(tmp_path), 5), cafe, opt)
    data = max((f for f in os.listdir(path) if f.endswith(".distcp")), key=lambda f: os.path.getsize(os.path.join(path, f)))
    file = os.path.join(path, data)
    if damage == "truncate":
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) // 2)
    elif damage == "flip":
        with open(file, "r+b") as f:
            f.seek(os.path.getsize(file) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "delete":
        os.remove(file)
    else:
        with open(os.path.join(path, MANIFEST), "w") as f:
            f.write("{not json")
    other, other_opt = _build()
    _train(other, other_opt, range(50, 52))
    before = _snapshot(other, other_opt)
    with pytest.raises(ValueError, match="truncated|corrupted|missing|unreadable"):
        load(path, other, other_opt)
    _assert_same(before, _snapshot(other, other_opt))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"compression_ratio": 10}, "compression_ratio"),
        ({"slots_per_bucket": 2}, "slots_per_bucket"),
        ({"block_fraction": 0.25}, "block_fraction"),
        ({"promote_load": 0.5, "demote_load": 0.25}, "promote_load"),
    ],
)
def test_mismatched_config_is_refused(tmp_path, change: Dict[str, object], message: str) -> None:
    cafe, opt = _build()
    _train(cafe, opt, range(3))
    path = save(checkpoint_path(str(tmp_path), 3), cafe, opt)
    other, other_opt = _build(dataclasses.replace(CONFIG, **change))
    before = _snapshot(other, other_opt)
    with pytest.raises(ValueError, match=message):
        load(path, other, other_opt)
    _assert_same(before, _snapshot(other, other_opt))


def test_mismatched_tables_are_refused(tmp_path) -> None:
    cafe, opt = _build()
    path = save(checkpoint_path(str(tmp_path), 0), cafe, opt)
    renamed = [dataclasses.replace(TABLES[0], name="u0"), TABLES[1]]
    other, other_opt = _build(tables=renamed)
    with pytest.raises(ValueError, match=r"tables \['t0', 't1'\].*\['u0', 't1'\]"):
        load(path, other, other_opt)
    bigger = [dataclasses.replace(TABLES[0], num_embeddings=40_000), TABLES[1]]
    other, other_opt = _build(tables=bigger)
    with pytest.raises(ValueError, match="num_embeddings=20000, the model has 40000"):
        load(path, other, other_opt)


def test_manifest_records_tables_and_files(tmp_path) -> None:
    cafe, opt = _build()
    path = save(checkpoint_path(str(tmp_path), 0), cafe, opt, extra={"step": 0, "seed": 3})
    with open(os.path.join(path, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["extra"] == {"step": 0, "seed": 3}
    assert [t["name"] for t in manifest["modules"][0]] == ["t0", "t1"]
    assert set(manifest["files"]) == set(os.listdir(path)) - {MANIFEST}


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p, lr=0.01)])
def test_lazily_created_optimizer_state_is_restored(tmp_path, make) -> None:
    """Momentum and Adam create their state at the first step: a fresh optimizer has none, and
    loading must still restore it, not silently keep it empty."""
    torch.manual_seed(0)
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=CONFIG)
    opt = make(cafe.parameters())
    cafe.attach_optimizer(opt)
    _train(cafe, opt, range(6))
    path = save(checkpoint_path(str(tmp_path), 6), cafe, opt)
    expected = _train(cafe, opt, range(6, 12))
    torch.manual_seed(0)
    resumed = CafeEmbeddingBagCollection(TABLES, cafe=CONFIG)
    resumed_opt = make(resumed.parameters())
    resumed.attach_optimizer(resumed_opt)
    assert not resumed_opt.state
    load(path, resumed, resumed_opt)
    assert _train(resumed, resumed_opt, range(6, 12)) == expected
    _assert_same(_snapshot(cafe, opt), _snapshot(resumed, resumed_opt))


@pytest.mark.parametrize("update_interval", [1, 3])
@pytest.mark.parametrize("how", ["torch.save", "dcp"])
def test_any_state_dict_snapshot_resumes_exactly(tmp_path, how: str, update_interval: int) -> None:
    """A user's own snapshot mid-training (``torch.save`` or plain DCP, no CAFE helper) resumes
    bit-identically: ``state_dict()`` first applies the scores stashed by the last backward."""
    config = dataclasses.replace(CONFIG, update_interval=update_interval)
    cafe, opt = _build(config)
    _train(cafe, opt, range(50))
    if how == "torch.save":
        torch.save({"model": cafe.state_dict(), "opt": opt.state_dict()}, tmp_path / "snap.pt")
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": cafe.state_dict()}, checkpoint_id=str(tmp_path / "dcp"))
        torch.save({"opt": opt.state_dict()}, tmp_path / "snap.pt")
    uninterrupted = _train(cafe, opt, range(50, 70))

    resumed, resumed_opt = _build(config)
    saved = torch.load(tmp_path / "snap.pt")
    if how == "torch.save":
        resumed.load_state_dict(saved["model"])
    else:
        state = {"model": resumed.state_dict()}
        dcp.load(state, checkpoint_id=str(tmp_path / "dcp"))
        resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert _train(resumed, resumed_opt, range(50, 70)) == uninterrupted
    _assert_same(_snapshot(cafe, opt), _snapshot(resumed, resumed_opt))
