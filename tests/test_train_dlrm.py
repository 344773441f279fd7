"""The DLRM trainer and the real-data readers: every method learns a few steps on tiny data within
its memory, the CLI runs end to end on libFM and Criteo files (and on two ranks), bad input fails
with clear errors. Real data is read from ../shared/data when present, never copied."""

import gzip
import json
import math
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch
import torch.distributed as dist

from examples.harness.cli import main, parse_args
from examples.harness.config import METHODS, TrainConfig
from examples.harness.data import synthetic
from examples.harness.loop import run
from tests.conftest import run_ranks
from torchrec_cafe.checkpoint import cafe_modules
from torchrec_cafe.datasets import InMemoryCTR, local_batch, read_criteo_tsv, read_libfm

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FRAPPE = DATA / "frappe_ctr"
CRITEO = DATA / "criteo_kaggle_head8k"


@pytest.fixture(autouse=True)
def _no_leftover_process_group() -> Iterator[None]:
    """``main()`` initialises the default process group (as under torchrun) and leaves it: close it
    so that a later test can set up its own."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_within_budget(single_rank_pg: None, method: str) -> None:
    data = synthetic(seed=1, batch_size=64, max_cardinality=20_000)
    train = list(data.batches(15))
    cfg = TrainConfig(method=method, compression_ratio=10, epochs=2, eval_every=10, cafe_threshold=2.0)
    # Scored on batches it trained on: 30 steps generalise too little for a held-out AUC to say
    # more than noise (full tables score 0.46-0.57 on 3 test batches), but every method must fit them.
    r = run(cfg, data, train, train[:3])
    assert [h["step"] for h in r["history"]] == [10, 15, 20, 30]  # every 10 steps and at each epoch's end
    assert r["steps"] == 30 and r["train_samples"] == 30 * 64
    assert 0.6 < r["auc"] <= 1.0 and math.isfinite(r["logloss"])
    losses = [h["train_loss"] for h in r["history"]]  # the second epoch repeats the batches: overfits
    assert losses[-1] < losses[0] - 0.1
    if method == "full":
        assert r["bytes"] == r["full_bytes"] == r["budget_bytes"]
    else:
        assert r["bytes"] <= r["budget_bytes"] < r["full_bytes"]


def test_partitioned_cafe_learns_and_reports_what_its_partitions_allocate(single_rank_pg: None) -> None:
    """--cafe-form partitioned --cafe-partitions 2 on one rank: it learns, and the reported bytes
    are those of its two partitions (a few rows from the unpartitioned module's), within budget."""
    from examples.harness.config import cafe_config
    from examples.harness.data import embedding_tables
    from torchrec_cafe.modules.partition import CafeEmbeddingBagPartitions

    data = synthetic(seed=1, batch_size=64, max_cardinality=20_000)
    train = list(data.batches(15))
    cfg = TrainConfig(method="cafe", compression_ratio=10, epochs=2, cafe_threshold=2.0, cafe_form="partitioned", cafe_partitions=2)
    r = run(cfg, data, train, train[:3])
    assert 0.6 < r["auc"] <= 1.0 and r["promotions"] > 0
    tables = embedding_tables(data.config.cardinalities, cfg.embedding_dim)
    emulation = CafeEmbeddingBagPartitions(tables, 2, device=torch.device("meta"), cafe=cafe_config(cfg))
    assert r["bytes"] == sum(int(t["total_bytes"]) for p in emulation.partitions for t in p.memory_report().values())
    assert r["bytes"] <= r["budget_bytes"]


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_left() -> Iterator[None]:
    """``main`` joins (or starts) a world-size-1 group as a launched trainer would; later test
    modules start their own."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_paper_preset_and_explicit_flags() -> None:
    _, cfg = parse_args(["--preset", "paper", "--method", "qr"])
    assert (cfg.embedding_dim, cfg.embedding_optimizer, cfg.embedding_lr, cfg.dense_optimizer, cfg.dense_lr, cfg.batch_size) == (
        16, "sgd", 0.1, "sgd", 0.1, 128)
    assert cfg.dense_arch[-1] == 16 and cfg.over_arch[-1] == 1
    _, cfg = parse_args(["--preset", "paper", "--batch-size", "256", "--embedding-lr", "0.5"])
    assert cfg.batch_size == 256 and cfg.embedding_lr == 0.5 and cfg.embedding_optimizer == "sgd"


def _write_libfm(path: Path, rows: int, seed: int) -> None:
    """Three one-hot fields in global ranges [0, 20), [20, 2020), [2020, 2023); the label follows
    field 0 (its first half clicks more: a segment of the catalogue), field 1 is noise."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, 20, (rows,), generator=g)
    other = torch.randint(0, 2000, (rows,), generator=g) + 20
    tiny = torch.randint(0, 3, (rows,), generator=g) + 2020
    label = torch.where(torch.rand(rows, generator=g) < torch.where(user < 10, 0.8, 0.2), 1, -1)
    with gzip.open(path, "wt") as f:
        for y, u, o, t in zip(label.tolist(), user.tolist(), other.tolist(), tiny.tolist()):
            f.write(f"{y} {u}:1 {o}:1 {t}:1\r\n")


def test_cli_trains_on_libfm_files_and_writes_json(single_rank_pg: None, tmp_path: Path) -> None:
    _write_libfm(tmp_path / "train.libfm.gz", 2000, 0)
    _write_libfm(tmp_path / "test.libfm.gz", 500, 1)
    out = tmp_path / "out" / "r.json"
    main(["--data", "libfm", "--train", str(tmp_path / "train.libfm.gz"), "--test", str(tmp_path / "test.libfm.gz"),
          "--method", "cafe", "--compression-ratio", "2", "--batch-size", "100", "--epochs", "2", "--eval-every", "5",
          "--embedding-optimizer", "adagrad", "--dense-optimizer", "adagrad", "--no-progress", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["steps"] == 40 and [h["step"] for h in r["history"]] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert r["auc"] > 0.7  # the planted user effect is learnt
    assert r["bytes"] <= r["budget_bytes"] and r["data"] == "libfm"


def test_libfm_reader_maps_frappe_fields_to_local_ids() -> None:
    if not FRAPPE.is_dir():
        pytest.skip(f"{FRAPPE} absent")
    train, test = read_libfm([str(FRAPPE / "frappe.validation.libfm.gz"), str(FRAPPE / "frappe.test.libfm.gz")])
    assert (len(train), len(test)) == (57_722, 28_860)
    assert train.cardinalities == test.cardinalities and len(train.cardinalities) == 10
    assert train.cardinalities[1] == 4082 and train.cardinalities[2:5] == [7, 7, 2]  # item, daytime, weekday, isweekend
    for d in (train, test):
        assert d.num_dense == 0 and set(d.labels.unique().tolist()) == {0.0, 1.0}
        assert abs(float(d.labels.mean()) - 0.33) < 0.01
        assert bool((d.ids >= 0).all()) and bool((d.ids < torch.tensor(d.cardinalities)).all())
    batch = next(train.batches(128))
    assert batch.sparse_features.keys() == [f"cat_{f}" for f in range(10)] and batch.labels.shape == (128,)


def test_criteo_reader_and_cli_on_the_kaggle_head() -> None:
    if not CRITEO.is_dir():
        pytest.skip(f"{CRITEO} absent")
    d = read_criteo_tsv(str(CRITEO / "train.tsv.gz"), [1000] * 26)
    assert len(d) == 7200 and d.dense.shape == (7200, 13) and d.ids.shape == (7200, 26)
    assert bool(torch.isfinite(d.dense).all()) and float(d.dense.min()) >= 0
    assert bool((d.ids < 1000).all()) and abs(float(d.labels.mean()) - 1549 / 7200) < 1e-6
    # C6 has 7 distinct non-empty values over the 8,000 rows (README), empty reads as 0.
    assert 2 <= d.ids[:, 5].unique().numel() <= 8


def test_cli_criteo_end_to_end(single_rank_pg: None, tmp_path: Path) -> None:
    if not CRITEO.is_dir():
        pytest.skip(f"{CRITEO} absent")
    r = main(["--data", "criteo", "--train", str(CRITEO / "dev.tsv.gz"), "--test", str(CRITEO / "test.tsv.gz"),
              "--criteo-hash-size", "2000", "--method", "mch_dlfu", "--compression-ratio", "5", "--batch-size", "64",
              "--no-progress", "--out", str(tmp_path / "r.json")])
    assert r["steps"] == 409 // 64 and 0.0 <= r["auc"] <= 1.0 and r["bytes"] <= r["budget_bytes"]


def test_batches_split_global_batches_across_ranks() -> None:
    data = synthetic(seed=0, batch_size=8, max_cardinality=1000)
    batch = data.batch(0)
    parts = [local_batch(batch, r, 2) for r in range(2)]
    for key in batch.sparse_features.keys():
        whole = batch.sparse_features[key]
        assert torch.equal(torch.cat([p.sparse_features[key].values() for p in parts]), whole.values())
        assert torch.equal(torch.cat([p.sparse_features[key].lengths() for p in parts]), whole.lengths())
    assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels)

    table = InMemoryCTR(dense=torch.zeros(11, 0), ids=torch.arange(11).view(11, 1), labels=torch.zeros(11),
                        feature_names=["cat_0"], cardinalities=[11])
    shares = [[b.sparse_features.values().tolist() for b in table.batches(4, rank=r, world_size=2)] for r in range(2)]
    assert shares == [[[0, 1], [4, 5], [8]], [[2, 3], [6, 7], [9]]]  # row 10 cannot be split evenly


def test_bad_input_raises_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read data file"):
        read_libfm([str(tmp_path / "missing.libfm")])
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="lsh")
    with pytest.raises(ValueError, match="needs --train PATH and --test PATH"):
        main(["--data", "libfm", "--no-progress"])
    bad = tmp_path / "bad.libfm"
    for lines, message in [
        ("1 0:1 5:1\n-1 1:1 x:1\n", r"line 2: feature 'x:1'"),
        ("1 0:1 5:1\n-1 1:1\n", r"line 2: 1 features, expected 2"),
        ("1 0:1 5:0.5\n", r"line 1: .*only one-hot"),
        ("yes 0:1\n", r"line 1: label 'yes'"),
    ]:
        bad.write_text(lines)
        with pytest.raises(ValueError, match=message):
            read_libfm([str(bad)])
    bad.write_text("1 0:1 5:1\n")
    with pytest.raises(ValueError, match="field 1 has IDs outside"):
        read_libfm([str(bad)], field_starts=[0, 2], cardinalities=[1, 3])
    tsv = tmp_path / "bad.tsv"
    row = ["0"] + ["1"] * 13 + ["68fd1e64"] * 26
    tsv.write_text("\t".join(row) + "\n" + "\t".join(row[:30]) + "\n")
    with pytest.raises(ValueError, match="line 2: 30 tab-separated fields, expected 40"):
        read_criteo_tsv(str(tsv), [100] * 26)
    tsv.write_text("\t".join(row[:-1] + ["zz"]) + "\n")
    with pytest.raises(ValueError, match="line 1: invalid literal"):
        read_criteo_tsv(str(tsv), [100] * 26)
    with pytest.raises(ValueError, match="26 positive sizes"):
        read_criteo_tsv(str(tsv), [100] * 13)


def _two_rank_worker(rank: int, world: int, out: str) -> None:
    results: Dict[str, List[float]] = {}
    for method in ("mch_lfu", "qr"):
        r = main(["--method", method, "--compression-ratio", "10", "--train-batches", "8", "--eval-batches", "2",
                  "--batch-size", "64", "--max-cardinality", "5000", "--embedding-optimizer", "sgd", "--no-progress"])
        results[method] = [r["auc"], r["logloss"], float(r["world_size"]), float(r["train_samples"])]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def test_two_ranks_share_each_global_batch(tmp_path: Path) -> None:
    run_ranks(_two_rank_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1]  # metrics over all ranks' test samples
    for auc, logloss, world, samples in ranks[0].values():
        assert world == 2 and samples == 8 * 64 and 0.0 <= auc <= 1.0 and math.isfinite(logloss)


def test_restarted_run_resumes_from_its_checkpoint_and_ends_as_uninterrupted(tmp_path) -> None:
    """The trainer's --checkpoint-dir: a run cut short (its later checkpoints lost) and restarted
    resumes from the latest checkpoint and writes the same metrics as an uninterrupted run."""
    common = ["--method", "cafe", "--compression-ratio", "10", "--train-batches", "24", "--eval-batches", "3", "--batch-size", "64",
              "--max-cardinality", "5000", "--checkpoint-every", "8", "--eval-every", "12", "--no-progress"]
    full = main(common + ["--checkpoint-dir", str(tmp_path / "a")])
    assert sorted(os.listdir(tmp_path / "a")) == ["step-00000008", "step-00000016", "step-00000024"]
    shutil.copytree(tmp_path / "a" / "step-00000008", tmp_path / "b" / "step-00000008")
    resumed = main(common + ["--checkpoint-dir", str(tmp_path / "b")])
    assert resumed["resumed_from"] == str(tmp_path / "b" / "step-00000008")
    run_dependent = {"samples_per_s", "wall_s", "resumed_from", "checkpoint_dir"}
    assert {k: v for k, v in resumed.items() if k not in run_dependent} == {k: v for k, v in full.items() if k not in run_dependent}
    assert full["promotions"] > 0 and len(full["history"]) == 2


@pytest.mark.parametrize("method", METHODS)
def test_pipelined_training_matches_the_plain_loop(single_rank_pg: None, method: str) -> None:
    """--pipeline: the same steps through TorchRec's TrainPipelineSparseDist (training and eval)
    give the plain loop's losses, for the same model config. Plain tables and CAFE's sharded module
    are pipelined (CAFE with pipeline_depth 1: batch k + 1 is remapped before batch k's backward,
    its migrations land at its compute), the baselines' remap and combine are fx leaves and their
    lookups run unpipelined. CAFE promotes on the way, and its sketches end equal."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from examples.harness.data import embedding_tables
    from examples.harness.loop import train_steps
    from examples.harness.model import build_model, ensure_process_group

    data = synthetic(seed=1, batch_size=64, max_cardinality=20_000)
    train = list(data.batches(12))
    device = ensure_process_group()
    tables = embedding_tables(data.config.cardinalities, 16)
    losses, sketches = {}, {}
    for pipelined in (False, True):
        cfg = TrainConfig(method=method, compression_ratio=10, pipeline=True)  # CAFE: pipeline_depth 1 both times
        model, optimizer, _ = build_model(cfg, tables, data.config.num_dense, device)
        pipe = TrainPipelineSparseDist(model, optimizer, device) if pipelined else None
        losses[pipelined], _ = train_steps(model, optimizer, train, device, pipe)
        if pipe is not None:  # the sharded EBC / CAFE module takes the batch's KJT: pipelined
            assert len(pipe._pipelined_modules) == (1 if method == "full" or method.startswith("cafe") else 0)
        if method.startswith("cafe"):
            cafe = cafe_modules(model)[0]
            assert sum(s["promotions"] for s in cafe.stats().values()) > 0
            sketches[pipelined] = {k: v.clone() for k, v in cafe.sketch.state_dict().items()}
    assert len(losses[True]) == 12 and all(math.isfinite(x) for x in losses[True])
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for name, value in sketches.get(False, {}).items():
        assert torch.equal(sketches[True][name], value), name
    r = run(TrainConfig(method=method, compression_ratio=10, eval_every=6, pipeline=True), data, train, train[:3])
    assert [h["step"] for h in r["history"]] == [6, 12] and r["pipeline"] and 0.5 < r["auc"] <= 1.0 and math.isfinite(r["ne"])


def test_evaluate_reports_torchrec_auc_and_ne_over_all_batches() -> None:
    """AUC and NE from torchrec.metrics over every batch: the AUC of all predictions at once, and
    NE = logloss / entropy of the mean label."""
    from torchmetrics.functional.classification import binary_auroc
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from examples.harness.loop import evaluate

    class Fixed(torch.nn.Module):  # as DLRMTrain, logit = the first dense feature
        def forward(self, batch: Batch) -> "tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]":
            logits = batch.dense_features[:, 0]
            return logits.sum(), (logits.sum(), logits, batch.labels)

    g = torch.Generator().manual_seed(0)
    empty = KeyedJaggedTensor(keys=["a"], values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(100, dtype=torch.int64))
    batches = []
    for _ in range(3):
        logit = torch.randn(100, 1, generator=g)
        labels = (torch.rand(100, generator=g) < torch.sigmoid(logit[:, 0])).float()
        batches.append(Batch(dense_features=logit, sparse_features=empty, labels=labels))
    metrics = evaluate(Fixed(), batches, torch.device("cpu"))
    logit, labels = torch.cat([b.dense_features[:, 0] for b in batches]), torch.cat([b.labels for b in batches])
    assert metrics["auc"] == pytest.approx(float(binary_auroc(torch.sigmoid(logit), labels.long())), abs=1e-6)
    logloss = float(torch.nn.functional.binary_cross_entropy_with_logits(logit, labels))
    p = float(labels.mean())
    assert metrics["logloss"] == pytest.approx(logloss, rel=1e-6)
    assert metrics["ne"] == pytest.approx(logloss / -(p * math.log(p) + (1 - p) * math.log(1 - p)), rel=1e-5)
