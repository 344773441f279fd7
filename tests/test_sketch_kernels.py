"""The compiled CPU kernels (torchrec_cafe._C) against HotSketch's tensor implementation: every
buffer, every SketchUpdate field and every lookup bit-identical after each update, on random and
Zipf streams over many tables, with decay, quarantine, displacement, fixed and adaptive bars, bad
scores and a popularity shift; the compiled remap against the tensor remap during training; the
compiled serving lookup against the tensor one; the compiled row migration against the
tensor one under DMP; and the set-up builds them."""

from typing import Dict

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.modules.frozen import _CONSTANTS, export_for_inference, frozen_physical_features
from torchrec_cafe.remap import KJTRemapper
from torchrec_cafe.sketch import HotSketch, kernels

UPDATE_FIELDS = ("tables", "ids", "src", "src_blocked", "dst", "promoted", "demoted", "accepted_mass")


def test_the_setup_builds_the_kernels() -> None:
    """scripts/setup_env.sh builds torchrec_cafe._C (pip install --no-build-isolation -e .)."""
    assert kernels.AVAILABLE
    assert HotSketch(num_buckets=4, pool_rows=4).kernels_apply()
    for op in ("sketch_update_scores", "remap", "frozen_remap", "normalised_scores", "migrate_rows"):
        assert hasattr(torch.ops.torchrec_cafe, op), op


def _pair(monkeypatch: pytest.MonkeyPatch, **cfg: object) -> "tuple[HotSketch, HotSketch]":
    monkeypatch.setattr(HotSketch, "fixed_shapes", False)
    compiled, tensor = HotSketch(**cfg), HotSketch(**cfg)
    tensor.use_kernels = False
    assert compiled.kernels_apply() and not tensor.kernels_apply()
    return compiled, tensor


def _assert_same(compiled: HotSketch, tensor: HotSketch, uc: object, ut: object, where: str) -> None:
    expected: Dict[str, torch.Tensor] = tensor.state_dict()
    for name, value in compiled.state_dict().items():
        assert torch.equal(value, expected[name]), f"{where}: {name}"
    for field in UPDATE_FIELDS:
        assert torch.equal(getattr(uc, field), getattr(ut, field)), f"{where}: SketchUpdate.{field}"


CASES = {
    # name: (sketch settings, distribution, importance)
    "adaptive-zipf-3-tables": (dict(num_buckets=[64, 32, 8], pool_rows=[100, 40, 8], decay=[0.9, 0.5, 1.0],
                                    decay_mass=[800.0, 500.0, 300.0], quarantine=1, promote_load=0.3, demote_load=0.15), "zipf", "float"),
    "fixed-and-adaptive-displacing": (dict(num_buckets=[64, 32], pool_rows=[100, 40], threshold=[None, 5.0], decay=[0.9, 0.5],
                                           decay_mass=[800.0, 500.0], quarantine=2, promote_load=0.3, demote_load=0.15,
                                           displace_ratio=2.0), "zipf", "float"),
    "uniform-frequency-c2": (dict(num_buckets=[16, 16, 16, 16], pool_rows=[24, 24, 8, 64], slots_per_bucket=2, threshold=[2.0, None, 1.0, None],
                                  promote_load=0.1, demote_load=0.05), "uniform", "freq"),
    "many-tables-displacing": (dict(num_buckets=[8] * 26, pool_rows=[16] * 26, decay=0.99, quarantine=0, promote_load=0.1,
                                    demote_load=0.05, displace_ratio=4.0), "zipf", "float"),
    # tables of several demotion-floor runs (256 slots), the last one partial: 1200, 600 and 280 slots
    "adaptive-many-floor-runs": (dict(num_buckets=[300, 150, 70], pool_rows=[400, 150, 100],
                                      decay=[0.9, 0.99, 0.5], decay_mass=[600.0, 400.0, 300.0], quarantine=1, promote_load=0.1,
                                      demote_load=0.05), "zipf", "float"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_equal_the_tensor_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, dist, importance = CASES[case]
    compiled, tensor = _pair(monkeypatch, **cfg)
    num_tables = compiled.num_tables
    rng = np.random.default_rng(len(case))
    universe = rng.integers(-(1 << 62), 1 << 62, 4000)
    for step in range(160):
        shift = 0 if step < 80 else 2000  # popularity shift half-way
        ranks = np.minimum(rng.zipf(1.2, 512), 4000) - 1 if dist == "zipf" else rng.integers(0, 4000, 512)
        ids = torch.tensor(universe[(ranks + shift) % 4000])
        scores = torch.tensor(rng.exponential(1.0, 512).astype(np.float32) if importance == "float" else np.ones(512, np.float32))
        scores[torch.tensor(rng.random(512) < 0.02)] = float("nan")
        tables = torch.tensor(rng.integers(0, num_tables, 512))
        _assert_same(compiled, tensor, compiled.update(ids, scores, tables), tensor.update(ids, scores, tables), f"update {step}")
        for a, b in zip(compiled.lookup(ids, tables), tensor.lookup(ids, tables)):
            assert torch.equal(a, b), f"lookup after update {step}"
        for a, b in zip(compiled.lookup(ids), tensor.lookup(ids)):  # no tables: all in table 0
            assert torch.equal(a, b), f"table-0 lookup after update {step}"
    assert int(tensor.promotions.sum()) > 0 and int(tensor.demotions.sum()) > 0


def test_kernel_pool_choices_equal_the_tensor_path_for_any_pool_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels compute a key's bucket and four pool choices without divisions (multiply-based
    exact remainders); lookups and promotions must pick the same buckets and rows as
    ``torch.remainder`` for tables of one bucket or row, powers of two, primes and millions of
    buckets / tens of millions of rows."""
    pools = [1, 2, 3, 64, 65_537, 1 << 20, 50_000_017]
    buckets = [1, 2, 3, 64, 65_537, 1 << 20, 2_000_003]
    compiled, tensor = _pair(monkeypatch, num_buckets=buckets, pool_rows=pools, promote_load=0.1, demote_load=0.05)
    rng = np.random.default_rng(11)
    for step in range(4):
        ids = torch.tensor(rng.integers(-(1 << 62), 1 << 62, 50_000))
        tables = torch.tensor(rng.integers(0, len(pools), 50_000))
        for a, b in zip(compiled.lookup(ids, tables), tensor.lookup(ids, tables)):
            assert torch.equal(a, b), f"lookup {step}"
        repeated, on = ids[:64].repeat(8), tables[:64].repeat(8)  # scores enough to promote
        _assert_same(compiled, tensor, compiled.update(repeated, torch.ones(512), on), tensor.update(repeated, torch.ones(512), on), f"update {step}")
    assert int(tensor.promotions.sum()) > 0


@pytest.mark.parametrize("threshold", [4.0, None])
def test_the_kernel_scans_for_demotions_after_its_state_was_written_elsewhere(
    threshold: "float | None", monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel skips a table's demotion scan while its bar stays below a bound on its hot scores
    that it keeps between updates. Written elsewhere (here: every score quartered in place, as a
    load would), the bound must be dropped: the next update demotes what the tensor path demotes."""
    compiled, tensor = _pair(monkeypatch, num_buckets=[64, 16], pool_rows=[64, 16], threshold=threshold, decay=1.0,
                             promote_load=0.2, demote_load=0.1)
    rng = np.random.default_rng(5)
    def step(where: str) -> None:
        ids, tables = torch.tensor(rng.zipf(1.3, 1024) % 500), torch.tensor(rng.integers(0, 2, 1024))
        _assert_same(compiled, tensor, compiled.update(ids, torch.ones(1024), tables), tensor.update(ids, torch.ones(1024), tables), where)
    for i in range(20):
        step(f"update {i}")
    before = int(tensor.demotions.sum())
    for sketch in (compiled, tensor):
        sketch.slot_scores.mul_(0.25)
    step("after the scores were written")
    assert int(tensor.demotions.sum()) > before  # the quartered scores really fell below the bars


def test_kernels_equal_the_tensor_path_on_gathered_quanta(monkeypatch: pytest.MonkeyPatch) -> None:
    """``update_quanta`` (what ranks apply after the all-gather) and empty updates."""
    compiled, tensor = _pair(monkeypatch, num_buckets=[32, 16], pool_rows=[48, 16], quarantine=1, promote_load=0.2, demote_load=0.1)
    rng = np.random.default_rng(3)
    for step in range(60):
        n = 0 if step % 10 == 0 else 256
        ids = torch.tensor(np.minimum(rng.zipf(1.3, n), 3000), dtype=torch.int64)
        scores, tables = torch.ones(n), torch.tensor(rng.integers(0, 2, n))
        parts = [s.aggregate(ids, scores, tables) for s in (compiled, tensor)]
        for a, b in zip(*parts):
            assert torch.equal(a, b)
        _assert_same(compiled, tensor, compiled.update_quanta(*parts[0]), tensor.update_quanta(*parts[1]), f"update {step}")
    assert int(tensor.promotions.sum()) > 0


TABLES = [
    EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=20_000, feature_names=["a", "b"], pooling=PoolingType.MEAN),
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=3_000, feature_names=["c"]),
    EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=50, feature_names=["d"]),
    EmbeddingBagConfig(name="t3", embedding_dim=8, num_embeddings=40, feature_names=["e"]),
]
SETTINGS = {  # composed + MEAN; hashed cold rows; hashed into a budget too small to sketch; t3 plain
    "t0": CafeConfig(compression_ratio=20), "t1": CafeConfig(compression_ratio=10, cold_rows="hashed"), "t2": CafeConfig(compression_ratio=30),
}


def _kjt(step: int, weighted: bool, variable_batch: bool) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(step)
    keys = ["a", "b", "c", "d", "e"]
    strides = [32, 20, 32, 7, 32] if variable_batch else [32] * 5
    lengths = torch.randint(0, 4, (sum(strides),), generator=g)
    values = (torch.rand(int(lengths.sum()), generator=g).pow(-1.3).long() * 7919) % 20_000 - 5
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    if not variable_batch:
        return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)
    inverse = torch.stack([torch.randint(0, s, (32,), generator=g) for s in strides])
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights,
                             stride_per_key_per_rank=[[s] for s in strides], inverse_indices=(keys, inverse))


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("variable_batch", [False, True], ids=["fixed-batch", "variable-batch"])
def test_remap_kernel_equals_the_tensor_remap(weighted: bool, variable_batch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled remap gives the tensor remap's physical KJT (values, lengths, weights) and hook
    context, step after step of training (hot, cold, blocked, static and plain features)."""
    module = CafeEmbeddingBagCollection(TABLES, is_weighted=weighted, cafe=SETTINGS)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    remapper = module.remapper
    for step in range(30):
        features = module._prepare(_kjt(step, weighted, variable_batch), True)[0]  # rows: irrelevant here
        monkeypatch.setattr(KJTRemapper, "use_kernels", True)
        assert remapper._kernel_applies(features, module.sketch)
        compiled, compiled_context = remapper(features, module.sketch)
        monkeypatch.setattr(KJTRemapper, "use_kernels", False)
        tensor, tensor_context = remapper(features, module.sketch)
        assert torch.equal(compiled.values(), tensor.values()) and torch.equal(compiled.lengths(), tensor.lengths())
        assert torch.equal(compiled.weights(), tensor.weights())  # composed and sketched tables pool weighted entries
        assert compiled.stride_per_key() == tensor.stride_per_key()
        # the per-key caches arrive filled (the lookup then reads no lengths back), and right
        per_key = [int(x.sum()) for x in tensor.lengths().split(tensor.stride_per_key())]
        assert compiled.length_per_key_or_none() == tensor.length_per_key_or_none() == per_key
        for field in ("ids", "tables", "bag", "feature", "factor", "hot_hits"):
            assert torch.equal(getattr(compiled_context, field), getattr(tensor_context, field)), field
        if variable_batch:
            assert torch.equal(compiled_context.inverse, tensor_context.inverse)
        assert compiled_context.bags_per_feature == tensor_context.bags_per_feature
        monkeypatch.setattr(KJTRemapper, "use_kernels", True)
        module(_kjt(step, weighted, variable_batch)).values().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    stats = module.stats()
    assert stats["t0"]["hot_ids"] > 0 and stats["t1"]["hot_ids"] > 0 and "t2" not in stats


def test_remap_kernel_equals_the_tensor_remap_for_huge_tables_and_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Block rows (id mod N) / block size and hashed rows id mod N are computed by multiplications
    in the kernel: they must equal the tensor remap's for tables of 2**40 and 10**12 + 39 rows
    (block sizes near 2**33) and ids over the whole int64 range, negative ones included."""
    tables = [
        EmbeddingBagConfig(name="huge", embedding_dim=8, num_embeddings=1 << 40, feature_names=["a"]),
        EmbeddingBagConfig(name="odd", embedding_dim=8, num_embeddings=10**12 + 39, feature_names=["b"]),
    ]
    cafe = {"huge": CafeConfig(compression_ratio=2.0**31), "odd": CafeConfig(compression_ratio=2.0**31, cold_rows="hashed")}
    module = CafeEmbeddingBagCollection(tables, cafe=cafe)
    rng = np.random.default_rng(7)
    ids = np.r_[rng.integers(-(1 << 63), (1 << 63) - 1, 4000, dtype=np.int64), [-(1 << 63), (1 << 63) - 1, -1, 0, (1 << 40) - 1]]
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor(np.r_[ids, ids]), lengths=torch.ones(2 * ids.size, dtype=torch.int64))
    features = module._prepare(kjt, True)[0]
    out = {}
    for use in (True, False):
        monkeypatch.setattr(KJTRemapper, "use_kernels", use)
        out[use] = module.remapper(features, module.sketch)[0]
    assert torch.equal(out[True].values(), out[False].values()) and torch.equal(out[True].lengths(), out[False].lengths())


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_frozen_lookup_kernel_equals_the_tensor_lookup(weighted: bool) -> None:
    """The served module's compiled lookup gives the tensor lookup's outputs, eager (fixed and
    variable batch) and scripted."""
    module = CafeEmbeddingBagCollection(TABLES, is_weighted=weighted, cafe=SETTINGS)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for step in range(30):
        module(_kjt(step, weighted, False)).values().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    served = export_for_inference(module.eval())
    assert served._compiled
    scripted = torch.jit.script(served)
    for step, variable_batch in [(100, False), (101, True), (102, False)]:
        features = _kjt(step, weighted, variable_batch)
        compiled = served(features).values()
        served._compiled = False
        tensor = served(features).values()
        served._compiled = True
        assert torch.equal(compiled, tensor)
        if not variable_batch:
            assert torch.equal(scripted(features).values(), tensor)
        # the physical KJTs agree, and the compiled one arrives with its per-key caches filled
        state = [getattr(served, "_" + n) for n in _CONSTANTS] + [served.owner_keys, served.owned]
        args = (served._input_features, served._feature_names, state, weighted, served._weighted_out, served._any_varying, served._pool_seed)
        fast, slow = frozen_physical_features(features, *args, compiled=True), frozen_physical_features(features, *args, compiled=False)
        assert torch.equal(fast.values(), slow.values()) and torch.equal(fast.lengths(), slow.lengths())
        assert fast.length_per_key_or_none() == slow.length_per_key()


def test_compiled_rescaling_equals_the_tensor_rescaling() -> None:
    """The importance rescaling (per feature: norm * count / sum of the finite norms) of one process
    through the compiled operator, bit for bit the tensor code's, non-finite norms included."""
    from torchrec_cafe.modules.scores import normalised_scores

    g = torch.Generator().manual_seed(3)
    norms = torch.rand(5000, generator=g) * torch.rand(5000, generator=g).pow(8) * 100
    norms[::97] = float("nan")
    norms[5::211] = float("inf")
    norms[7::13] = 0.0
    feature = torch.randint(0, 7, (5000,), generator=g)
    feature[feature == 6] = 5  # feature 6 absent: its scale is never used
    for n in (5000, 0):
        tensor = normalised_scores(norms[:n], feature[:n], 7, None, compiled=False)
        compiled = normalised_scores(norms[:n], feature[:n], 7, None, compiled=True)
        assert torch.equal(tensor.isnan(), compiled.isnan())
        assert torch.equal(torch.nan_to_num(tensor), torch.nan_to_num(compiled))
        if n:
            finite = torch.isfinite(norms)
            assert torch.allclose(tensor[finite & (feature == 0)].mean(), torch.tensor(1.0))


@pytest.mark.parametrize("equal_dims", [True, False], ids=["equal-dims", "mixed-dims"])
def test_compiled_occurrence_norms_equal_the_tensor_norms(equal_dims: bool) -> None:
    """The per-occurrence gradient norms of the importance hook through the compiled operator equal
    the tensor code's: float32 and float16 gradients of wide dynamic range, a NaN and an inf column
    (which stay within their feature's bags), every column layout the hook meets (permuted keys of
    one dim; features of mixed dims)."""
    from torchrec_cafe.modules.scores import occurrence_norms

    g = torch.Generator().manual_seed(5)
    B, F, d = 300, 7, 16
    C = F * d
    grad = torch.randn(B, C, generator=g) * torch.rand(B, 1, generator=g).pow(6) * 1e3
    grad[4, 9], grad[17, 40] = float("nan"), float("inf")
    if equal_dims:
        columns = (d, torch.randperm(F, generator=g))  # feature f is output key columns[f]
    else:
        widths = [8, 24, 16, 4, 28, 16, 16]  # C columns, contiguous per feature, out of order
        columns = (0, torch.cat([torch.full((w,), f) for f, w in zip([3, 0, 6, 1, 5, 2, 4], widths)]))
    bag = torch.randint(0, F * B, (20_000,), generator=g)
    factor = torch.rand(20_000, generator=g)
    for dtype in (torch.float32, torch.float16):
        gd = grad.clamp(-6e4, 6e4).to(dtype) if dtype == torch.float16 else grad.clone()
        gd[17, 40] = float("inf")  # the clamp took it
        tensor = occurrence_norms(gd, columns, bag, factor, F, compiled=False)
        compiled = occurrence_norms(gd, columns, bag, factor, F, compiled=True)
        assert compiled.dtype == tensor.dtype == torch.float32
        assert torch.equal(tensor.isnan(), compiled.isnan()) and tensor.isnan().any() and tensor.isinf().any()
        assert torch.equal(torch.nan_to_num(tensor), torch.nan_to_num(compiled))


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_compiled_migration_equals_the_tensor_migration(single_rank_pg: None, sharding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Promotions under DMP (tables of two dims and a plain one in one fused TBE, whole or in
    column shards, row-wise Adagrad state; composed, hashed-cold-row and reset-state tables) give
    the same rows and optimizer state bit for bit with the compiled migration as with the tensor one."""
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from torchrec_cafe.modules.row_access import RowAccess
    from torchrec_cafe.rows import tbe_shards

    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=16, num_embeddings=30_000, feature_names=["fa"]),
        EmbeddingBagConfig(name="plain", embedding_dim=8, num_embeddings=50, feature_names=["fp"]),
        EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=20_000, feature_names=["fb"]),
        EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=20_000, feature_names=["fc"]),
    ]
    settings = {
        "a": CafeConfig(compression_ratio=20), "b": CafeConfig(compression_ratio=20, cold_rows="hashed"),
        "c": CafeConfig(compression_ratio=20, optimizer_state="reset"),
    }  # fmt: skip

    def trained(compiled: bool) -> list:
        monkeypatch.setattr(RowAccess, "use_kernels", compiled)
        torch.manual_seed(0)
        cafe = CafeEmbeddingBagCollection(tables, cafe=settings)
        apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
        constraints = {t.name: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"], min_partition=4) for t in tables}
        plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints).plan(
            cafe, [EmbeddingBagCollectionSharder()]
        )
        dmp = DistributedModelParallel(cafe, device=torch.device("cpu"), plan=plan)
        g = torch.Generator().manual_seed(1)
        for _ in range(25):
            lengths = torch.randint(0, 4, (4 * 32,), generator=g)
            values = (torch.rand(int(lengths.sum()), generator=g).pow(-1.2).long() * 7919) % 20_000
            kjt = KeyedJaggedTensor(keys=["fa", "fp", "fb", "fc"], values=values, lengths=lengths)
            dmp(kjt).values().pow(2).sum().backward()
        dmp.module.apply_pending_updates()
        stats = dmp.module.stats()
        assert all(stats[n]["hot_ids"] > 0 for n in settings)
        return [t.clone() for s in tbe_shards(dmp.module._embedding_bag_collection, list(settings)) for t in [s.weight, *s.states]]

    compiled, tensor = trained(True), trained(False)
    assert len(compiled) == len(tensor) >= 6
    for a, b in zip(compiled, tensor):
        assert torch.equal(a, b)
