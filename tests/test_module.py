"""CafeEmbeddingBagCollection against TorchRec's EmbeddingBagCollection and CAFE's own rules."""

import math
from typing import List

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType

from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.config import paper_threshold

from .cafe_reads import embeddings, reads, rows_read


def _tables(pooling: PoolingType = PoolingType.SUM) -> List[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=20_000, feature_names=["f0", "f1"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=5_000, feature_names=["f2"], pooling=pooling),
    ]


def _kjt(keys: List[str], batch: int, max_len: int = 3, high: int = 20_000, weighted: bool = False, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (len(keys) * batch,), generator=g)
    values = torch.randint(0, high, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


def _copy_into_plain_ebc(cafe: CafeEmbeddingBagCollection, tables: List[EmbeddingBagConfig], weighted: bool) -> EmbeddingBagCollection:
    ebc = EmbeddingBagCollection(tables, is_weighted=weighted)
    ebc.load_state_dict(cafe._embedding_bag_collection.state_dict())
    return ebc


def _pooled(weight: torch.Tensor, jt, pooling: PoolingType) -> torch.Tensor:
    """Reference pooling, bag by bag: sum(w * row) (/ len for MEAN)."""
    out, offsets = [], jt.offsets()
    for b in range(jt.lengths().numel()):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        rows = weight[jt.values()[lo:hi]]
        w = jt.weights()[lo:hi].unsqueeze(1) if jt.weights_or_none() is not None else torch.ones(hi - lo, 1)
        pooled = (w * rows).sum(0)
        out.append(pooled / max(hi - lo, 1) if pooling == PoolingType.MEAN else pooled)
    return torch.stack(out)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_plain_when_budget_holds_the_table(pooling: PoolingType, weighted: bool) -> None:
    tables = _tables(pooling)
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=1.0), is_weighted=weighted)
    assert all(not r["compressed"] for r in cafe.memory_report().values())
    kjt = _kjt(["f0", "f1", "f2"], batch=16, high=5_000, weighted=weighted)
    out = cafe(kjt)
    if not (weighted and pooling == PoolingType.MEAN):  # torch's EmbeddingBag has no weighted MEAN
        ref = _copy_into_plain_ebc(cafe, tables, weighted)(kjt)
        assert out.keys() == ref.keys() and out.length_per_key() == ref.length_per_key()
        torch.testing.assert_close(out.values(), ref.values())
    out_dict = out.to_dict()
    for table in tables:
        weight = cafe._embedding_bag_collection.embedding_bags[table.name].weight
        for f in table.feature_names:
            torch.testing.assert_close(out_dict[f], _pooled(weight, kjt[f], pooling), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("cold_rows", ["composed", "hashed"])
def test_compressed_output_is_the_sum_of_remapped_rows(pooling: PoolingType, cold_rows: str) -> None:
    tables = _tables(pooling)
    cfg = CafeConfig(compression_ratio=20, threshold=2.0, importance="frequency", cold_rows=cold_rows)
    cafe = CafeEmbeddingBagCollection(tables, cafe=cfg)
    kjt = _kjt(["f0", "f1", "f2"], batch=32, max_len=4, high=300)
    for _ in range(3):  # ids repeat: some become hot
        cafe(kjt)
    cafe.apply_pending_updates()
    cafe.eval()
    out = cafe(kjt).to_dict()
    for table in tables:
        weight = cafe._embedding_bag_collection.embedding_bags[table.name].weight
        for f in table.feature_names:
            expected = []
            for ids in kjt[f].to_dense():
                pooled = embeddings(cafe, table.name, weight, ids).sum(0) if ids.numel() else torch.zeros(table.embedding_dim)
                expected.append(pooled / ids.numel() if pooling == PoolingType.MEAN and ids.numel() else pooled)
            torch.testing.assert_close(out[f], torch.stack(expected), rtol=1e-5, atol=1e-6)
    stats = cafe.stats()["t0"]
    assert stats["promotions"] > 0 and 0 < stats["hot_hit_rate"] <= 1
    ids = torch.arange(300)
    row, hot, _ = reads(cafe, "t0", ids)
    private = set(row[hot].tolist())
    assert len(private) == int(hot.sum())  # a hot row is private ...
    assert not any(set(r) & private for r, h in zip(rows_read(cafe, "t0", ids), hot.tolist()) if not h)  # ... no cold id reads it


def test_same_keys_order_and_dims_as_ebc_and_plugs_into_dlrm() -> None:
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"c{i}"])
        for i, n in enumerate([100_000, 50, 30_000])
    ]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=100))
    kjt = _kjt(["c2", "c0", "c1"], batch=8, high=50)  # another key order than the tables
    out, ref = cafe(kjt), EmbeddingBagCollection(tables)(kjt)
    assert out.keys() == ref.keys() == ["c0", "c1", "c2"]
    assert out.length_per_key() == ref.length_per_key()
    assert cafe.embedding_bag_configs() == tables
    model = DLRM(embedding_bag_collection=cafe, dense_in_features=4, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])
    logits = model(torch.rand(8, 4), kjt)
    logits.sum().backward()
    assert logits.shape == (8, 1) and torch.isfinite(logits).all()


def test_key_order_does_not_change_the_output() -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10))
    cafe.eval()
    kjt = _kjt(["f0", "f1", "f2"], batch=8)
    shuffled = kjt.permute([2, 0, 1])
    torch.testing.assert_close(cafe(kjt).values(), cafe(shuffled).values())


def test_any_int64_id_is_valid() -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10))
    ids = torch.tensor([-1, -(2**63), 2**63 - 1, 10**15, 3, 7])
    kjt = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.cat([ids, ids[:2]]), lengths=torch.tensor([3, 3, 1, 1, 0, 0]))
    out = cafe(kjt)
    out.values().sum().backward()
    cafe(kjt)  # applies the scores of those ids
    assert torch.isfinite(out.values()).all()


def test_empty_batch_and_empty_bags() -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10))
    empty = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.empty(0, dtype=torch.int64), lengths=torch.zeros(6, dtype=torch.int64))
    out = cafe(empty)
    assert out.values().shape == (2, 20) and out.values().abs().sum() == 0
    out.values().sum().backward()
    no_rows = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=torch.empty(0, dtype=torch.int64), lengths=torch.empty(0, dtype=torch.int64), stride=0)
    assert cafe(no_rows).values().shape == (0, 20)
    cafe.apply_pending_updates()
    assert cafe.stats()["t0"]["tracked_ids"] == 0


def test_bad_keys_get_clear_errors() -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10))
    with pytest.raises(ValueError, match="unknown feature keys \\['oops'\\]"):
        cafe(_kjt(["f0", "f1", "f2", "oops"], batch=2))
    with pytest.raises(ValueError, match="missing feature keys \\['f2'\\]"):
        cafe(_kjt(["f0", "f1"], batch=2))
    with pytest.raises(ValueError, match="no weights"):
        CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10), is_weighted=True)(_kjt(["f0", "f1", "f2"], 2))


@pytest.mark.parametrize(
    "values, lengths, weights, message",
    [
        (torch.arange(5), torch.tensor([1, 1, 1, 1, 1, 2]), None, "lengths sum to 7 but it has 5 values"),
        (torch.arange(5), torch.tensor([3, -1, 1, 1, 1, 0]), None, "negative lengths"),
        (torch.arange(5), torch.tensor([1, 1, 1, 1, 1]), None, "5 lengths, expected 3"),
        (torch.arange(5).float(), torch.tensor([1, 1, 1, 1, 1, 0]), None, "integer IDs"),
        (torch.arange(5), torch.tensor([1, 1, 1, 1, 1, 0]), torch.ones(4), "4 weights for 5 values"),
    ],
)
def test_malformed_kjts_get_clear_errors_before_any_state_changes(values, lengths, weights, message: str) -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10, importance="frequency"))
    for seed in range(3):
        cafe(_kjt(["f0", "f1", "f2"], batch=8, high=300, seed=seed))
    state = lambda: dict(cafe.named_buffers()) | dict(cafe.named_parameters())  # noqa: E731 (state_dict() would apply the pending step)
    before = {k: v.detach().clone() for k, v in state().items()}
    pending = len(cafe._pending)
    assert pending > 0
    bad = KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=values, lengths=lengths, weights=weights)
    with pytest.raises(ValueError, match=message):
        cafe(bad)
    assert len(cafe._pending) == pending  # the due update was not applied either
    assert all(torch.equal(v, state()[k]) for k, v in before.items())


def test_pipeline_depth_holds_each_steps_scores_back_one_more_update() -> None:
    """pipeline_depth d: the update at step j applies the scores of steps <= j - 1 - d. With
    frequency scores (known at the forward), a depth-1 module after step j + 1 holds the sketch a
    depth-0 module holds after step j: the same updates, each one step later."""
    modules = {
        d: CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10, importance="frequency", pipeline_depth=d))
        for d in (0, 1)
    }
    batches = [_kjt(["f0", "f1", "f2"], batch=32, high=400, seed=s) for s in range(8)]
    states = {}
    for d, cafe in modules.items():
        states[d] = []
        for kjt in batches:
            cafe(kjt)
            states[d].append(torch.cat([v.double().flatten() for v in cafe.sketch.state_dict().values()]))
    assert sum(s["promotions"] for s in modules[0].stats().values()) > 0
    for j in range(len(batches) - 1):
        assert torch.equal(states[1][j + 1], states[0][j]), j
    assert not torch.equal(states[1][-1], states[0][-1])
    with pytest.raises(ValueError, match="pipeline_depth"):
        CafeConfig(compression_ratio=10, pipeline_depth=-1)


@pytest.mark.parametrize("cold_rows", ["composed", "hashed"])
def test_fixed_shape_path_migrates_through_buffers_of_max_promotions(cold_rows: str) -> None:
    """The accelerator path forced on CPU (fixed shapes, no host reads): with ``max_promotions`` on
    every table, each update's migration is [sum max_promotions] entries whatever the batch, the
    cap bounds each update's promotions, and training equals the CPU path (outputs, rows, Adagrad
    state, sketch) bit for bit, through the step API a sharded module uses."""
    cap, keys = 4, ["f0", "f1", "f2"]
    cfg = CafeConfig(compression_ratio=10, promote_load=0.05, demote_load=0.02, max_promotions=cap, cold_rows=cold_rows)
    modules = []
    for fixed_shapes in (True, False):
        torch.manual_seed(0)
        cafe = CafeEmbeddingBagCollection(_tables(), cafe=cfg)
        cafe.sketch.fixed_shapes = fixed_shapes
        opt = torch.optim.Adagrad(cafe.parameters(), lr=0.1)
        cafe.attach_optimizer(opt)
        modules.append((cafe, opt))
    (fixed, _), (cpu, _) = modules
    assert fixed.sketch.promotion_capacity == 2 * cap and not fixed.sketch.host_reads_are_free()
    sizes, deltas = set(), []
    for step in range(16):
        kjt = _kjt(keys, batch=64, high=3000, seed=step)
        outputs = []
        for cafe, opt in modules:
            before = cafe.sketch.promotions.clone()
            physical, context = cafe.remap(kjt, True)
            assert context is not None
            if cafe is fixed and context.migration is not None:
                sizes |= {t.numel() for t in context.migration.tensors()}
            cafe.land_migration(context)
            kt = cafe.physical_tables()(physical)
            cafe.track_importance(kt, context)
            opt.zero_grad()
            kt.values().pow(2).sum().backward()
            opt.step()
            outputs.append(kt.values().detach())
            if cafe is fixed:
                deltas.append(cafe.sketch.promotions - before)
        assert torch.equal(outputs[0], outputs[1]), step
    assert sizes == {2 * cap}
    assert max(int(d.max()) for d in deltas) == cap and sum(int(d.sum()) for d in deltas) > 4 * cap
    for name, value in fixed.sketch.state_dict().items():
        assert torch.equal(value, cpu.sketch.state_dict()[name]), name
    for (name, value), other in zip(fixed.state_dict().items(), cpu.state_dict().values()):
        assert torch.equal(value, other), name
    (_, fixed_opt), (_, cpu_opt) = modules
    for a, b in zip(fixed_opt.state.values(), cpu_opt.state.values()):
        assert torch.equal(a["sum"], b["sum"])
    with pytest.raises(ValueError, match="max_promotions"):
        CafeConfig(compression_ratio=10, max_promotions=-1)


def test_mismatched_configs_get_clear_errors() -> None:
    tables = _tables()
    with pytest.raises(ValueError, match="not in tables"):
        CafeEmbeddingBagCollection(tables, cafe={"nope": CafeConfig(compression_ratio=10)})
    with pytest.raises(ValueError, match="unique"):
        CafeEmbeddingBagCollection(tables + tables[:1], cafe=CafeConfig(compression_ratio=10))
    with pytest.raises(ValueError, match="must be a CafeConfig"):
        CafeEmbeddingBagCollection(tables, cafe={"t0": {"compression_ratio": 10}})
    bad = EmbeddingBagConfig(name="x", embedding_dim=4, num_embeddings=10, feature_names=["x"], pooling=PoolingType.NONE)
    with pytest.raises(ValueError, match="pooling"):
        CafeEmbeddingBagCollection([bad], cafe=CafeConfig(compression_ratio=10))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"compression_ratio": 0.5}, "compression_ratio"),
        ({"compression_ratio": float("nan")}, "compression_ratio"),
        ({"compression_ratio": 10, "block_fraction": 1.0}, "block_fraction"),
        ({"compression_ratio": 10, "block_fraction": 0.0}, "block_fraction"),
        ({"compression_ratio": 10, "cold_rows": "qr"}, "cold_rows"),
        ({"compression_ratio": 10, "sketch_slots_per_row": 0.0}, "sketch_slots_per_row"),
        ({"compression_ratio": 10, "promote_load": 0.1, "demote_load": 0.2}, "demote_load"),
        ({"compression_ratio": 10, "threshold": -1.0}, "threshold"),
        ({"compression_ratio": 10, "decay": 0.0}, "decay"),
        ({"compression_ratio": 10, "decay": 1.5}, "decay"),
        ({"compression_ratio": 10, "slots_per_bucket": 0}, "slots_per_bucket"),
        ({"compression_ratio": 10, "importance": "magic"}, "importance"),
        ({"compression_ratio": 10, "optimizer_state": "zero"}, "optimizer_state"),
        ({"compression_ratio": 10, "quarantine": -1}, "quarantine"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CafeConfig(**kwargs)


def test_paper_schedule_defaults() -> None:
    assert CafeConfig(compression_ratio=100).threshold is None  # adaptive by default
    paper = CafeConfig.paper(100)
    assert (paper.threshold, paper.cold_rows) == (100.0, "hashed")
    assert (paper_threshold(2), paper_threshold(10), paper_threshold(150), paper_threshold(10**6)) == (10.0, 20.0, 100.0, 500.0)


def test_promotions_per_update_default_to_a_64th_of_the_pool_and_bound_the_migration() -> None:
    """By default an update promotes at most max(32, ceil(P / 64)) IDs of a table of P pool rows,
    so every table is capped and the accelerator path's migration has a fixed capacity; the paper's
    settings have no cap."""
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=2))
    pools = [cafe._layout(t).budget.pool_rows for t in ("t0", "t1")]
    assert pools[0] > 64 * 32  # one table past the minimum
    assert cafe.sketch.promotion_capacity == sum(max(32, math.ceil(p / 64)) for p in pools)
    paper = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig.paper(2))
    assert paper.sketch.promotion_capacity is None
    assert CafeConfig(compression_ratio=4, max_promotions=7).promotions_per_update(10**6) == 7


@pytest.mark.parametrize("cr", [2, 10, 100, 1000, 10_000])
def test_memory_never_exceeds_the_budget(cr: float) -> None:
    tables = [EmbeddingBagConfig(name="big", embedding_dim=16, num_embeddings=3_000_000, feature_names=["b"])]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=cr), device=torch.device("meta"))
    r = cafe.memory_report()["big"]
    assert r["compressed"] and r["total_bytes"] <= r["budget_bytes"] == r["logical_bytes"] // cr
    assert r["sketch_bytes"] == cafe._sketch.nbytes()
    rows = cafe._embedding_bag_collection.embedding_bags["big"].weight.shape[0]
    assert rows == r["pool_rows"] + r["block_rows"] and r["pool_rows"] > 0 and r["block_rows"] > 0
    assert r["total_bytes"] == rows * 64 + r["sketch_bytes"]
    # the budget is nearly spent: less than one row with its sketch share (9 B/slot, 1 B/pool
    # row) and a bucket's rounding is left over
    assert r["budget_bytes"] - r["total_bytes"] < 64 + 9 + 1 + 36


def test_grad_norm_scores_are_normalised_per_occurrence_gradient_norms() -> None:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10_000, feature_names=["a", "b"], pooling=PoolingType.MEAN)]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=10), is_weighted=True)
    kjt = KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor([5, 6, 7, 8, 9]),
        lengths=torch.tensor([2, 1, 0, 2]),
        weights=torch.tensor([0.5, -2.0, 1.0, 3.0, 1.0]),
    )
    out = cafe(kjt)
    r = torch.randn_like(out.values())
    (out.values() * r).sum().backward()
    cafe.apply_pending_updates()
    # d loss / d pooled = r; occurrence j of bag b: |w_j| * ||r_b|| / len_b, rescaled per feature
    a, b = r[:, :4].norm(dim=1), r[:, 4:].norm(dim=1)
    raw_a = torch.stack([0.5 * a[0] / 2, 2.0 * a[0] / 2, 1.0 * a[1]])
    raw_b = torch.stack([3.0 * b[1] / 2, 1.0 * b[1] / 2])
    expected = torch.cat([raw_a * 3 / raw_a.sum(), raw_b * 2 / raw_b.sum()])
    got = cafe._sketch.query_scores(torch.tensor([5, 6, 7, 8, 9]))
    torch.testing.assert_close(got, expected, rtol=0, atol=2.0**-16)


def test_nan_gradients_do_not_poison_the_sketch() -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10, threshold=1.0))
    kjt = _kjt(["f0", "f1", "f2"], batch=8)
    cafe(kjt).values().sum().backward()
    cafe.apply_pending_updates()
    before = {k: v.clone() for k, v in cafe._sketch.state_dict().items()}
    out = cafe(kjt)
    (out.values() * float("nan")).sum().backward()
    cafe.apply_pending_updates()
    after = cafe._sketch.state_dict()
    for k, v in before.items():
        if k.endswith(("step", "rejected")):
            continue
        assert torch.equal(v, after[k]), k
    assert int(after["rejected"][0]) > 0
    cafe(kjt).values().sum().backward()  # training goes on
    cafe.apply_pending_updates()
    assert cafe.stats()["t0"]["updates"] == 3


@pytest.mark.parametrize("cold_rows", ["composed", "hashed"])
def test_promotion_initialises_the_private_row_from_what_the_id_read(cold_rows: str) -> None:
    """The promoted ID's embedding is unchanged by the move (hashed: its pool row; composed: pool
    row + block row), and its Adagrad state is its pool row's."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10_000, feature_names=["a"])]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=10, threshold=3.0, importance="frequency", cold_rows=cold_rows))
    opt = torch.optim.Adagrad(cafe.parameters(), lr=0.1)
    cafe.attach_optimizer(opt)
    weight = cafe._embedding_bag_collection.embedding_bags["t"].weight
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.tensor([42, 42, 7]), lengths=torch.tensor([2, 1]))
    for _ in range(2):  # 42 scores 2 per step -> crosses threshold 3 at the 2nd update
        opt.zero_grad()
        cafe(kjt).values().pow(2).sum().backward()
        opt.step()
    ids = torch.tensor([42])
    src = rows_read(cafe, "t", ids)[0]
    assert len(src) == (2 if cold_rows == "composed" else 1)
    embedding, state = weight[src].sum(0).detach().clone(), opt.state[weight]["sum"][src[0]].clone()
    cafe.apply_pending_updates()
    row, hot, _ = reads(cafe, "t", ids)
    assert bool(hot) and rows_read(cafe, "t", ids) == [[int(row)]] and int(row) < cafe._layout("t").budget.pool_rows
    assert torch.equal(weight[int(row)], embedding) and torch.equal(opt.state[weight]["sum"][int(row)], state)
    assert not bool(reads(cafe, "t", torch.tensor([7]))[1])


def test_eval_freezes_the_sketch() -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10, threshold=1.0))
    kjt = _kjt(["f0", "f1", "f2"], batch=8)
    cafe(kjt).values().sum().backward()
    cafe.eval()
    before = {k: v.clone() for k, v in cafe.state_dict().items()}
    with torch.no_grad():
        first = cafe(kjt).values()
        second = cafe(kjt).values()
    assert torch.equal(first, second)
    assert all(torch.equal(v, cafe.state_dict()[k]) for k, v in before.items())
    cafe.train()
    cafe(kjt)  # the stashed scores land now
    assert int(cafe._sketch.step) == 1


def test_state_dict_round_trip() -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10, threshold=1.0))
    for seed in range(3):
        cafe(_kjt(["f0", "f1", "f2"], batch=8, seed=seed)).values().sum().backward()
    cafe.apply_pending_updates()
    other = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10, threshold=1.0))
    other.load_state_dict(cafe.state_dict())
    for a, b in zip(cafe.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    cafe.eval(), other.eval()
    kjt = _kjt(["f0", "f1", "f2"], batch=8, seed=9)
    assert torch.equal(cafe(kjt).values(), other(kjt).values())


def test_learns_like_a_table_when_everything_is_hot() -> None:
    """Few IDs, generous budget: every ID is promoted and training drives the loss down."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=50_000, feature_names=["a"])]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=10, threshold=2.0, importance="frequency"))
    opt = torch.optim.SGD(cafe.parameters(), lr=10.0)
    ids = torch.arange(0, 40) * 997
    target = torch.randn(40, 4)
    kjt = KeyedJaggedTensor(keys=["a"], values=ids, lengths=torch.ones(40, dtype=torch.int64))
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (cafe(kjt).values() - target).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert cafe.stats()["t"]["hot_ids"] == 40
    assert losses[-1] < 0.05 * losses[0] and math.isfinite(losses[-1])


def test_mixed_mean_tables_with_composed_pool_correctly() -> None:
    """A composed MEAN table forces weights on the KJT: every MEAN table then pools as SUM with
    weights 1/len and must still equal a MEAN."""
    tables = [
        EmbeddingBagConfig(name="big", embedding_dim=4, num_embeddings=20_000, feature_names=["x"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="plain", embedding_dim=4, num_embeddings=30, feature_names=["y"], pooling=PoolingType.MEAN),
    ]
    cafe = CafeEmbeddingBagCollection(tables, cafe={"big": CafeConfig(compression_ratio=10)})
    assert cafe._layout("big").composed and not cafe._layout("plain").compressed
    kjt = _kjt(["x", "y"], batch=8, high=30)
    out = cafe(kjt).to_dict()
    weight = cafe._embedding_bag_collection.embedding_bags["plain"].weight
    torch.testing.assert_close(out["y"], _pooled(weight, kjt["y"], PoolingType.MEAN), rtol=1e-5, atol=1e-6)


def test_a_table_too_small_for_a_sketch_serves_ids_from_cold_rows_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    tables = [
        EmbeddingBagConfig(name="big", embedding_dim=16, num_embeddings=1_000_000, feature_names=["b"]),
        EmbeddingBagConfig(name="small", embedding_dim=16, num_embeddings=60, feature_names=["s"]),
        EmbeddingBagConfig(name="tiny", embedding_dim=16, num_embeddings=10, feature_names=["t"]),
    ]
    with caplog.at_level("INFO", logger="torchrec_cafe"):
        cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=20))
    report = cafe.memory_report()
    assert report["big"]["sketched"] and not report["small"]["sketched"] and report["small"]["compressed"]
    assert report["small"]["total_bytes"] == (60 // 20) * 64 <= report["small"]["budget_bytes"]  # 3 rows
    assert report["tiny"]["total_bytes"] == 64 and not report["tiny"]["sketched"]  # one row, at least
    assert "'small'" in caplog.text and "'big'" not in caplog.text
    ids = torch.arange(0, 60, 7)
    out = cafe(KeyedJaggedTensor(keys=["b", "s", "t"], values=torch.cat([ids, ids, ids]), lengths=torch.tensor([ids.numel()] * 3)))
    weight = cafe._embedding_bag_collection.embedding_bags["small"].weight
    torch.testing.assert_close(out["s"][0], embeddings(cafe, "small", weight, ids).sum(0))
    assert all(len(r) == 2 for r in rows_read(cafe, "small", ids))  # pool row + block row
    # A budget of 0 B (3 rows x 64 B at CR 1000, as Criteo's smallest features): one row, no error.
    speck = [EmbeddingBagConfig(name="speck", embedding_dim=16, num_embeddings=3, feature_names=["p"])]
    cafe = CafeEmbeddingBagCollection(speck, cafe=CafeConfig(compression_ratio=1000))
    assert cafe.memory_report()["speck"]["budget_bytes"] == 0 and cafe.memory_report()["speck"]["total_bytes"] == 64
    out = cafe(KeyedJaggedTensor(keys=["p"], values=torch.tensor([0, 1, 2]), lengths=torch.tensor([3])))
    assert out["p"].shape == (1, 16)



@pytest.mark.parametrize("cold_rows", ["composed", "hashed"])
def test_blocked_ids_never_read_a_private_row(cold_rows: str) -> None:
    """A pool too small for the hot set: cold IDs whose four candidates are all owned read their
    block row alone (composed) or nothing (hashed), never another ID's private row."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10_000, feature_names=["a"])]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=100, threshold=1.0, importance="frequency", cold_rows=cold_rows))
    ids = torch.arange(400)
    kjt = KeyedJaggedTensor(keys=["a"], values=ids, lengths=torch.ones(400, dtype=torch.int64))
    for _ in range(3):
        cafe(kjt)
    cafe.apply_pending_updates()
    cafe.eval()
    row, hot, blocked = reads(cafe, "t", ids)
    assert bool(blocked.any()) and int(hot.sum()) > cafe._layout("t").budget.pool_rows // 2
    out = cafe(kjt).values()
    weight = cafe._embedding_bag_collection.embedding_bags["t"].weight
    torch.testing.assert_close(out, embeddings(cafe, "t", weight, ids))
    if cold_rows == "hashed":
        assert out[blocked].abs().sum() == 0


@pytest.mark.parametrize("cold_rows", ["composed", "hashed"])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_the_lookup_reads_only_the_rows_an_id_uses(cold_rows: str, use_kernels: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The physical KJT holds, per ID in order, exactly the rows its embedding sums (a hot ID its
    private row, a cold one pool + block row, a blocked one its block row or nothing): the fused
    lookup reads and updates no other row, and SUM tables of unweighted inputs pool unweighted."""
    from torchrec_cafe.remap import KJTRemapper

    monkeypatch.setattr(KJTRemapper, "use_kernels", use_kernels)
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10_000, feature_names=["a"])]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=100, threshold=1.0, importance="frequency", cold_rows=cold_rows))
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.arange(60), lengths=torch.ones(60, dtype=torch.int64))
    for _ in range(3):
        cafe(kjt)
    cafe.apply_pending_updates()
    ids = torch.arange(400)  # seen and unseen
    batch = KeyedJaggedTensor(keys=["a"], values=ids.flip(0), lengths=torch.tensor([1, 3, 0, 396]))
    physical, _ = cafe.remap(batch, training=False)
    expected = rows_read(cafe, "t", ids.flip(0))
    _, hot, blocked = reads(cafe, "t", ids)
    assert bool(hot.any()) and bool(blocked.any()) and not bool((hot | blocked).all())
    assert physical.weights_or_none() is None
    assert physical.values().tolist() == [r for rows in expected for r in rows]
    bags = torch.tensor([0, 1, 1, 1] + [3] * 396)
    per_bag = torch.zeros(4, dtype=torch.int64).index_add_(0, bags, torch.tensor([len(r) for r in expected]))
    assert physical.lengths().tolist() == per_bag.tolist()


def test_profiler_sees_cafe_stages() -> None:
    """record_function ranges around CAFE's stages, for users' traces."""
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10, threshold=1.0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for seed in range(3):
            cafe(_kjt(["f0", "f1", "f2"], batch=32, max_len=4, high=300, seed=seed)).values().pow(2).sum().backward()
    names = {e.key for e in prof.key_averages()}
    for stage in ("remap", "importance", "sketch update", "migration"):
        assert f"## cafe: {stage} ##" in names, stage
