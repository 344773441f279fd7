"""The QR-trick and TorchRec-MCH baselines: drop-in EBC outputs, the lookups they promise, and memory
within the budget every method shares."""

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from torchrec_cafe import CafeConfig, table_budget
from torchrec_cafe.modules import MCHEmbeddingBagCollection, QREmbeddingBagCollection, mch_layout, qr_layout

TABLES = [
    EmbeddingBagConfig(name="t_big", embedding_dim=8, num_embeddings=20_000, feature_names=["a", "b"]),
    EmbeddingBagConfig(name="t_tiny", embedding_dim=4, num_embeddings=6, feature_names=["c"]),
    EmbeddingBagConfig(name="t_mean", embedding_dim=8, num_embeddings=5_000, feature_names=["d"], pooling=PoolingType.MEAN),
]


def _kjt() -> KeyedJaggedTensor:
    # Two samples, keys in another order than the tables, bags of 0-3 IDs, IDs beyond [0, N).
    return KeyedJaggedTensor(
        keys=["d", "c", "b", "a"],
        values=torch.tensor([7, 4999, 12, 3, 9, 10_000, 19_999, 5, 2**40, 1, -3]),
        lengths=torch.tensor([2, 1, 1, 0, 1, 2, 1, 3]),
    )


@pytest.mark.parametrize("build", [lambda: QREmbeddingBagCollection(TABLES, 10), lambda: MCHEmbeddingBagCollection(TABLES, 10)])
def test_output_matches_ebc_layout(build) -> None:  # noqa: ANN001
    kt = build()(_kjt())
    kjt = _kjt()
    ref = EmbeddingBagCollection(TABLES)(KeyedJaggedTensor(keys=kjt.keys(), values=torch.zeros_like(kjt.values()), lengths=kjt.lengths()))
    assert kt.keys() == ref.keys() and kt.length_per_key() == ref.length_per_key()
    assert kt.values().shape == ref.values().shape == (2, 28)


@pytest.mark.parametrize("cr", [2, 10, 100, 1000, 20_000])
def test_qr_layout_fits_the_budget_and_gives_unique_pairs(cr: int) -> None:
    for t in TABLES:
        layout = qr_layout(t, cr)
        budget = table_budget(t, CafeConfig(compression_ratio=cr))
        if not budget.compressed:  # plain for every method
            assert not layout.compressed and layout.total_bytes == layout.logical_bytes
            continue
        if not layout.compressed:  # under two rows: one row, as every method's floor
            assert layout.quotient_rows == 1 and layout.budget_bytes < 2 * layout.row_bytes
            continue
        rows = layout.quotient_rows + layout.remainder_rows
        assert layout.total_bytes <= layout.budget_bytes and rows == layout.budget_bytes // layout.row_bytes
        if rows * rows >= 4 * t.num_embeddings:  # a split exists with one (quotient, remainder) pair per ID
            assert layout.quotient_rows * layout.remainder_rows >= t.num_embeddings
            m = layout.remainder_rows - 1
            assert m < 2 or m * (rows - m) < t.num_embeddings  # and it has the most quotient rows


def test_qr_pools_quotient_plus_remainder_rows() -> None:
    qr = QREmbeddingBagCollection(TABLES, 10)
    kt = qr(_kjt())
    weights = {n: b.weight.detach() for n, b in qr._embedding_bag_collection.embedding_bags.items()}

    def row(table: str, x: int) -> torch.Tensor:
        t = next(t for t in TABLES if t.name == table)
        layout = qr_layout(t, 10)
        h = x % t.num_embeddings
        w = weights[table]
        if not layout.compressed:  # the whole table, or one row
            return w[h % layout.quotient_rows]
        m, q = layout.remainder_rows, layout.quotient_rows
        return w[(h // m) % q] + w[q + h % m]

    torch.testing.assert_close(kt["a"][1], row("t_big", 2**40) + row("t_big", 1) + row("t_big", -3))
    torch.testing.assert_close(kt["b"][0], row("t_big", 9))
    torch.testing.assert_close(kt["b"][1], row("t_big", 10_000) + row("t_big", 19_999))
    torch.testing.assert_close(kt["c"][0], row("t_tiny", 3))
    assert torch.all(kt["c"][1] == 0)  # empty bag
    torch.testing.assert_close(kt["d"][0], (row("t_mean", 7) + row("t_mean", 4999)) / 2)  # MEAN bag


def test_qr_trains_through_both_rows() -> None:
    qr = QREmbeddingBagCollection(TABLES, 10)
    qr(_kjt()).values().sum().backward()
    grad = qr._embedding_bag_collection.embedding_bags["t_big"].weight.grad
    layout = qr_layout(TABLES[0], 10)
    touched = grad.abs().sum(1).nonzero().flatten()
    assert (touched < layout.quotient_rows).any() and (touched >= layout.quotient_rows).any()


@pytest.mark.parametrize("eviction", ["lfu", "distance_lfu"])
@pytest.mark.parametrize("cr", [2, 10, 100])
def test_mch_memory_within_budget_counts_id_buffers(eviction: str, cr: int) -> None:
    mch = MCHEmbeddingBagCollection(TABLES, cr, eviction=eviction)
    report = mch.memory_report()
    for t in TABLES:
        r = report[t.name]
        if not r["compressed"]:  # the whole table, or hashed into the budget (at least one row)
            assert r["total_bytes"] == r["logical_bytes"] or r["total_bytes"] <= max(r["budget_bytes"], r["row_bytes"])
            continue
        assert r["total_bytes"] <= r["budget_bytes"]
        module = mch.managed_collision_ebc._managed_collision_collection._managed_collision_modules[t.name]
        buffers = {n: b.numel() * b.element_size() for n, b in module.named_buffers()}
        assert r["id_state_bytes"] + r["uncharged_bytes"] == sum(buffers.values())
        assert r["uncharged_bytes"] == buffers["_output_segments_tensor"]
        rows = mch.managed_collision_ebc._embedding_module.embedding_bags[t.name].weight
        assert r["zch_rows"] * r["row_bytes"] == rows.numel() * rows.element_size()


def test_mch_admits_frequent_ids_and_shares_a_row_for_the_rest() -> None:
    mch = MCHEmbeddingBagCollection(TABLES, 10, eviction="lfu")
    frequent = torch.tensor([11, 12, 13])
    for step in range(6):
        noise = torch.arange(100) + 1000 + 100 * step  # each seen once
        ids = torch.cat([frequent.repeat(5), noise])
        kjt = KeyedJaggedTensor(keys=["a"], values=ids, lengths=torch.ones(ids.numel(), dtype=torch.int32))
        mch(KeyedJaggedTensor.concat([kjt, _other_features(ids.numel())]))
    mch.eval()
    probe = torch.tensor([11, 12, 13, 5_000, 6_000])
    out = mch(KeyedJaggedTensor.concat([
        KeyedJaggedTensor(keys=["a"], values=probe, lengths=torch.ones(5, dtype=torch.int32)), _other_features(5)
    ]))["a"]
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[3])  # own rows
    torch.testing.assert_close(out[3], out[4])  # never admitted: the shared last row


def _other_features(batch: int) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=["b", "c", "d"], values=torch.zeros(3 * batch, dtype=torch.int64), lengths=torch.ones(3 * batch, dtype=torch.int32))


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(ValueError, match="eviction"):
        MCHEmbeddingBagCollection(TABLES, 10, eviction="lru_typo")
    with pytest.raises(ValueError, match="eviction_interval"):
        MCHEmbeddingBagCollection(TABLES, 10, eviction_interval=0)
    for module in (QREmbeddingBagCollection(TABLES, 10), MCHEmbeddingBagCollection(TABLES, 10)):
        with pytest.raises(ValueError, match=r"lacks features \['d'\]"):
            module(KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.zeros(3, dtype=torch.int64), lengths=torch.ones(3, dtype=torch.int32)))


def test_mch_budget_too_small_for_its_buckets_is_hashed_into_it() -> None:
    # t_big at CR 100: 6,400 B hold 113 MCH rows, fewer than one per bucket of 128: like every
    # method's small tables, its IDs are hashed into the rows the budget holds.
    assert mch_layout(TABLES[0], 100, buckets=1).zch_rows == 113
    layout = mch_layout(TABLES[0], 100, buckets=128)
    assert not layout.compressed and layout.hashed and layout.plain_rows == 6_400 // 32
