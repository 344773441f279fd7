"""Export for serving: a plain EmbeddingBagCollection plus a frozen id -> row map, TorchScript-able,
whose outputs equal the trained CafeEmbeddingBagCollection's in eval mode."""

import os

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from examples.export_model import export
from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection, CafeEmbeddingBagCollectionSharder
from torchrec_cafe.checkpoint import checkpoint_path, load, save
from torchrec_cafe.inference import export_for_inference, load_for_inference
from torchrec_cafe.sketch.hashing import _M1, _M2, _POSITIVE, _shr, finalise64, fingerprint32, mix64, seed_offset
from torchrec_cafe.sketch.hot_sketch import POOL_SEED_OFFSET


def _tables(pooling: PoolingType = PoolingType.SUM, dim: int = 4):
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=2 * dim, num_embeddings=20_000, feature_names=["a", "b"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=dim, num_embeddings=50, feature_names=["c"], pooling=pooling),
        EmbeddingBagConfig(name="t2", embedding_dim=dim, num_embeddings=40, feature_names=["d"], pooling=pooling),
    ]


def _kjt(seed: int, weighted: bool = False, keys=("a", "b", "c", "d")) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(keys) * 32,), generator=g)
    values = torch.randint(0, 300, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths, weights=weights)


def _trained(pooling: PoolingType, weighted: bool, cold_rows: str, dim: int = 4) -> CafeEmbeddingBagCollection:
    """t0 sketched, t1 plain, t2 static (two rows at CR 20: too few for a sketch)."""
    cfg = CafeConfig(compression_ratio=20, threshold=2.0, importance="frequency", cold_rows=cold_rows)
    cafe = CafeEmbeddingBagCollection(_tables(pooling, dim), cafe={"t0": cfg, "t2": cfg}, is_weighted=weighted)
    for step in range(4):
        cafe(_kjt(step, weighted))
    cafe.apply_pending_updates()
    return cafe.eval()


def test_scriptable_finaliser_is_splitmix64() -> None:
    """``finalise64``'s literals against the named constants, through the shift-emulating form."""
    z = torch.tensor([0, 1, -1, 2**62, -(2**63), 123456789], dtype=torch.int64)
    reference = (z ^ _shr(z, 30)) * _M1
    reference = (reference ^ _shr(reference, 27)) * _M2
    reference = (reference ^ _shr(reference, 31)) & _POSITIVE
    assert torch.equal(torch.jit.script(finalise64)(z), reference)
    for seed in (0x9001, 12345):
        assert torch.equal(mix64(z, seed), finalise64(z + seed_offset(seed)))
    assert POOL_SEED_OFFSET == seed_offset(0x9001)


def _murmur_fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_scriptable_fingerprint_is_murmur_fmix32_and_exact_below_2_32() -> None:
    ids = torch.tensor([0, 1, 7, 2**31, 2**32 - 1, 2**32, -1, -(2**63), 2**63 - 1], dtype=torch.int64)
    expected = [_murmur_fmix32((i & 0xFFFFFFFF) ^ _murmur_fmix32((i >> 32) & 0xFFFFFFFF)) for i in ids.tolist()]
    assert fingerprint32(ids).tolist() == expected == torch.jit.script(fingerprint32)(ids).tolist()
    dense = torch.arange(0, 2**20, dtype=torch.int64) * 4093  # distinct ids < 2**32: distinct keys
    assert fingerprint32(dense).unique().numel() == dense.numel()


@pytest.mark.parametrize("cold_rows", ["composed", "hashed"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_export_equals_trained_module_in_eval(pooling: PoolingType, weighted: bool, cold_rows: str) -> None:
    cafe = _trained(pooling, weighted, cold_rows)
    assert cafe._layout("t0").sketched and not cafe._layout("t2").sketched and cafe._layout("t2").compressed
    assert int(cafe._sketch.promotions.sum()) > 0
    served = export_for_inference(cafe)
    scripted = torch.jit.script(served)
    for seed in (9, 10):
        for keys in (("a", "b", "c", "d"), ("c", "a", "d", "b")):  # any key order, as the trained module
            kjt = _kjt(seed, weighted, keys)
            expected = cafe(kjt)
            for out in (served(kjt), scripted(kjt)):
                assert out.keys() == expected.keys() and out.length_per_key() == expected.length_per_key()
                torch.testing.assert_close(out.values(), expected.values(), rtol=1e-6, atol=1e-7)
    sizes = served.nbytes()
    assert sizes["table_bytes"] == sum(p.numel() * 4 for p in cafe._embedding_bag_collection.parameters())
    hot = int(cafe._sketch.stats(0)["hot_ids"])
    pool_rows = cafe._layout("t0").budget.pool_rows
    assert hot > 0 and int((served.owned == 1).sum()) == hot and served.owned.numel() == pool_rows
    # the frozen map: per pool row of the sketched tables, its owner's key (int32) and an owned flag
    assert sizes["map_bytes"] == 5 * pool_rows


def test_scripted_export_saves_and_loads(tmp_path) -> None:
    cafe = _trained(PoolingType.SUM, False, "composed")
    path = str(tmp_path / "served.pt")
    torch.jit.save(torch.jit.script(export_for_inference(cafe)), path)
    kjt = _kjt(11)
    torch.testing.assert_close(torch.jit.load(path)(kjt).values(), cafe(kjt).values())


def test_export_of_a_dmp_trained_model_goes_through_its_checkpoint(tmp_path, single_rank_pg: None) -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=20, threshold=2.0))
    apply_optimizer_in_backward(RowWiseAdagrad, cafe._embedding_bag_collection.parameters(), {"lr": 0.1})
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"), sharders=[CafeEmbeddingBagCollectionSharder()])
    for step in range(6):
        dmp(_kjt(step)).values().pow(2).sum().backward()
    with pytest.raises(ValueError, match="unsharded"):
        export_for_inference(dmp.module.cafe)
    path = save(checkpoint_path(str(tmp_path), 6), dmp)
    plain = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=20, threshold=2.0))
    load(path, plain)
    assert int(plain._sketch.promotions.sum()) > 0 and os.path.isdir(path)
    dmp.eval()
    kjt = _kjt(12)
    expected = dmp(kjt).values()
    served = torch.jit.script(export_for_inference(plain))
    torch.testing.assert_close(served(kjt).values(), expected)
    # Straight from the checkpoint, without model code: the manifest describes the module.
    from_checkpoint = load_for_inference(path)
    assert list(from_checkpoint) == [""]  # the checkpointed model is the CAFE module itself
    torch.testing.assert_close(torch.jit.script(from_checkpoint[""])(kjt).values(), expected)
    sizes = export(path, str(tmp_path / "served"))  # the export command
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "served" / "cafe.pt"))(kjt).values(), expected)
    assert sizes["cafe"]["file_bytes"] > sizes["cafe"]["table_bytes"]
    int8 = export(path, str(tmp_path / "int8"), "int8")  # quantized rows, same map
    out = torch.jit.load(str(tmp_path / "int8" / "cafe.pt"))(kjt).values()
    assert (out - expected).abs().max() <= 1e-2 * expected.abs().max()
    assert int8["cafe"]["map_bytes"] == sizes["cafe"]["map_bytes"]


@pytest.mark.parametrize("cold_rows", ["composed", "hashed"])
def test_export_equals_trained_module_with_blocked_ids(cold_rows: str) -> None:
    """A full pool (cold IDs blocked: block row alone, or no row) serves as trained."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10_000, feature_names=["a"], pooling=PoolingType.MEAN)]
    cafe = CafeEmbeddingBagCollection(tables, cafe=CafeConfig(compression_ratio=100, threshold=1.0, importance="frequency", cold_rows=cold_rows))
    kjt = KeyedJaggedTensor(keys=["a"], values=torch.arange(400), lengths=torch.full((100,), 4))
    for _ in range(3):
        cafe(kjt)
    cafe.apply_pending_updates()
    cafe.eval()
    assert bool(cafe._sketch.lookup(torch.arange(400))[2].any())
    scripted = torch.jit.script(export_for_inference(cafe))
    torch.testing.assert_close(scripted(kjt).values(), cafe(kjt).values())


@pytest.mark.parametrize("weight_dtype, tolerance", [("fp16", 1e-3), ("int8", 1e-2), ("int4", 1.5e-1)])
def test_quantized_export_is_close_smaller_and_scriptable(tmp_path, weight_dtype: str, tolerance: float) -> None:
    """TorchRec's quantized tables under the frozen ID map: outputs within the stated share of the
    float export's largest output, fewer table bytes, same map, TorchScript round trip exact."""
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    from torchrec_cafe.inference import quantize_for_inference

    served = export_for_inference(_trained(PoolingType.SUM, True, "composed", dim=32))  # FBGEMM pads int rows to 16 B
    quantized = quantize_for_inference(served, weight_dtype)
    assert isinstance(quantized.embedding_bag_collection, QuantEBC)
    kjt = _kjt(11, weighted=True)
    ref, out = served(kjt), quantized(kjt)
    assert out.keys() == ref.keys() and out.values().dtype == torch.float32
    assert (out.values() - ref.values()).abs().max() <= tolerance * ref.values().abs().max()
    sizes, float_sizes = quantized.nbytes(), served.nbytes()
    assert sizes["table_bytes"] < float_sizes["table_bytes"] and sizes["map_bytes"] == float_sizes["map_bytes"]
    path = tmp_path / "q.pt"
    torch.jit.save(torch.jit.script(quantized), path)
    assert torch.equal(torch.jit.load(path)(kjt).values(), out.values())
    with pytest.raises(ValueError, match="weight_dtype"):
        quantize_for_inference(served, "int2")
