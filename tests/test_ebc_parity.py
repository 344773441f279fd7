"""Drop-in parity: the cases of TorchRec's own ``EmbeddingBagCollection`` unit tests (shapes, keys,
offsets, shared tables and features, weighted, meta device, device, FX, scripting), run on both
modules side by side, CAFE at CR 2 with tables small enough that some stay plain."""

import functools
from typing import Callable, List

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.inference import export_for_inference

CAFE = functools.partial(CafeEmbeddingBagCollection, cafe=CafeConfig(compression_ratio=2, threshold=1.0))
BOTH = pytest.mark.parametrize("make", [EmbeddingBagCollection, CAFE], ids=["ebc", "cafe"])


def _table(name: str, dim: int, features: List[str], rows: int = 1000) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features)


def _kjt(keys: List[str], device: str = "cpu", weighted: bool = False) -> KeyedJaggedTensor:
    # batch of 3; per key: [0, 1] [] [2] | [3] [4] [5, 6, 7] | ...
    offsets = [0, 2, 2, 3, 4, 5, 8, 9, 11, 12][: 3 * len(keys) + 1]
    values = torch.arange(offsets[-1], device=device) * 7 % 1000
    weights = torch.rand(values.numel(), device=device) if weighted else None
    return KeyedJaggedTensor.from_offsets_sync(keys=keys, values=values, offsets=torch.tensor(offsets, device=device), weights=weights)


@BOTH
def test_unweighted_shapes_keys_offsets(make: Callable) -> None:
    ebc = make(tables=[_table("t1", 3, ["f1"]), _table("t2", 4, ["f2"])])
    out = ebc(_kjt(["f1", "f2"]))
    assert out.values().shape == (3, 7) and out.keys() == ["f1", "f2"] and out.offset_per_key() == [0, 3, 7]


@BOTH
def test_shared_tables(make: Callable) -> None:
    out = make(tables=[_table("t1", 3, ["f1", "f2"])])(_kjt(["f1", "f2"]))
    assert out.values().shape == (3, 6) and out.keys() == ["f1", "f2"] and out.offset_per_key() == [0, 3, 6]


@BOTH
def test_shared_features(make: Callable) -> None:
    ebc = make(tables=[_table("t1", 3, ["f1"]), _table("t2", 4, ["f1"])])
    out = ebc(_kjt(["f1"]))
    assert out.values().shape == (3, 7) and out.keys() == ["f1@t1", "f1@t2"] and out.offset_per_key() == [0, 3, 7]


def test_shared_feature_reads_each_table_like_torchrec() -> None:
    """A feature read by a compressed and a plain table, next to a plain feature: trained, then the
    output of each key is what TorchRec's EBC gives with the same physical rows for that key."""
    tables = [_table("big", 4, ["f1", "f2"], rows=20_000), _table("small", 4, ["f1"], rows=50)]
    cafe = CafeEmbeddingBagCollection(tables, cafe={"big": CafeConfig(compression_ratio=20, threshold=1.0, importance="frequency")})
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        lengths = torch.randint(0, 4, (2 * 16,), generator=g)
        cafe(KeyedJaggedTensor(keys=["f2", "f1"], values=torch.randint(0, 300, (int(lengths.sum()),), generator=g), lengths=lengths))
    cafe.eval()
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([5, 7, 5, 49, 3]), lengths=torch.tensor([2, 1, 1, 1]))
    out = cafe(kjt)
    assert out.keys() == ["f1@big", "f2", "f1@small"]
    plain = EmbeddingBagCollection([_table("small", 4, ["f1"], rows=50)])
    plain.load_state_dict({"embedding_bags.small.weight": cafe.embedding_bags["small"].weight})
    torch.testing.assert_close(out["f1@small"], plain(KeyedJaggedTensor(keys=["f1"], values=torch.tensor([5, 7, 5]), lengths=torch.tensor([2, 1])))["f1"])
    alone = CafeEmbeddingBagCollection([_table("big", 4, ["f1", "f2"], rows=20_000)], cafe=CafeConfig(compression_ratio=20, threshold=1.0, importance="frequency"))
    alone.load_state_dict(cafe.state_dict(), strict=False)
    alone.eval()
    ref = alone(kjt)
    torch.testing.assert_close(out["f1@big"], ref["f1"])
    torch.testing.assert_close(out["f2"], ref["f2"])
    served = export_for_inference(cafe)(kjt)
    assert served.keys() == out.keys()
    torch.testing.assert_close(served.values(), out.values())


@BOTH
def test_weighted(make: Callable) -> None:
    ebc = make(tables=[_table("t1", 3, ["f1", "f3"]), _table("t2", 4, ["f2"])], is_weighted=True)
    out = ebc(_kjt(["f1", "f3", "f2"], weighted=True))
    assert out.values().shape == (3, 10) and out.keys() == ["f1", "f3", "f2"] and out.offset_per_key() == [0, 3, 6, 10]


@BOTH
def test_forward_on_the_meta_device(make: Callable) -> None:
    ebc = make(tables=[_table("t1", 3, ["f1", "f3"]), _table("t2", 4, ["f2"])], is_weighted=True, device=torch.device("meta"))
    out = ebc(_kjt(["f1", "f3", "f2"], device="meta", weighted=True))
    assert out.values().shape == (3, 10) and out.keys() == ["f1", "f3", "f2"] and out.values().device.type == "meta"


@BOTH
def test_duplicate_table_names_fail(make: Callable) -> None:
    with pytest.raises(ValueError):
        make(tables=[_table("t1", 3, ["f1"]), _table("t1", 4, ["f2"])])


@BOTH
def test_device(make: Callable) -> None:
    config = _table("t1", 3, ["f1"])
    ebc = make(tables=[config], device=torch.device("meta"))
    assert ebc.embedding_bags["t1"].weight.device.type == "meta" and ebc.device.type == "meta"
    with torch.device("meta"):
        ebc = make(tables=[config])
    assert ebc.embedding_bags["t1"].weight.device.type == "meta" and ebc.device.type == "meta"
    ebc = make(tables=[config])
    assert ebc.embedding_bags["t1"].weight.device == torch.device("cpu") and ebc.device == torch.device("cpu")


def test_cafe_settings_go_by_keyword() -> None:
    with pytest.raises(ValueError, match="CAFE settings go by keyword"):
        CafeEmbeddingBagCollection([_table("t1", 3, ["f1"])], CafeConfig(compression_ratio=2))


@BOTH
def test_scripting_in_eval_mode(make: Callable) -> None:
    """Scripting an eval-mode module gives the same outputs (for CAFE: its frozen lookup, with a
    sketch that has promoted IDs); the module itself is left as it was."""
    ebc = make(tables=[_table("t1", 3, ["f1", "f3"], rows=20_000), _table("t2", 4, ["f2"])], is_weighted=True)
    for _ in range(3):
        ebc(_kjt(["f1", "f3", "f2"], weighted=True)).values().sum().backward()
    kjt = _kjt(["f1", "f3", "f2"], weighted=True)
    ebc.eval()
    scripted = torch.jit.script(ebc)
    out, ref = scripted(kjt), ebc(kjt)
    assert out.keys() == ref.keys()
    torch.testing.assert_close(out.values(), ref.values())
    assert type(ebc) is make or isinstance(ebc, CafeEmbeddingBagCollection)


def test_scripting_a_training_cafe_module_is_refused() -> None:
    with pytest.raises(ValueError, match="eval"):
        torch.jit.script(CAFE(tables=[_table("t1", 3, ["f1"], rows=20_000)]))


def _vbe_kjt() -> "tuple[KeyedJaggedTensor, KeyedJaggedTensor]":
    """A variable-batch KJT (f1: 2 distinct bags, f2: 3, full batch 4) and its expanded twin."""
    lengths = torch.tensor([1, 2, 1, 1, 2])
    values = torch.tensor([3, 5, 9, 5, 7, 3, 11])
    inverse = torch.tensor([[0, 1, 1, 0], [0, 1, 2, 2]])
    vbe = KeyedJaggedTensor(
        keys=["f1", "f2"], values=values, lengths=lengths, stride_per_key_per_rank=[[2], [3]], inverse_indices=(["f1", "f2"], inverse)
    )
    per_key = [[[3], [5, 9]], [[5], [7], [3, 11]]]
    bags = [per_key[f][int(j)] for f in range(2) for j in inverse[f]]
    expanded = KeyedJaggedTensor(
        keys=["f1", "f2"], values=torch.tensor([v for b in bags for v in b]), lengths=torch.tensor([len(b) for b in bags])
    )
    return vbe, expanded


@BOTH
def test_variable_batch_kjts_give_the_expanded_batch_output(make: Callable) -> None:
    ebc = make(tables=[_table("t1", 3, ["f1"], rows=20_000), _table("t2", 4, ["f2"])])
    vbe, expanded = _vbe_kjt()
    out = ebc(vbe)
    assert out.values().shape == (4, 7)
    ebc.eval()
    torch.testing.assert_close(ebc(vbe).values(), ebc(expanded).values())
    if isinstance(ebc, CafeEmbeddingBagCollection):  # served form, eager (TorchRec 1.8's scripted KJT
        # cannot rebuild a variable-batch KJT: stride_per_key_per_rank().tolist() dtype mismatch)
        torch.testing.assert_close(export_for_inference(ebc)(vbe).values(), ebc(expanded).values())


def test_variable_batch_scores_are_the_norms_of_the_bag_gradients() -> None:
    """A bag repeated by the inverse indices gets the summed gradient of its output rows."""
    cafe = CafeEmbeddingBagCollection([_table("t1", 3, ["f1", "f2"], rows=20_000)], cafe=CafeConfig(compression_ratio=2))
    vbe, _ = _vbe_kjt()
    upstream = torch.randn(4, 6)
    (cafe(vbe).values() * upstream).sum().backward()
    _, _, norms, _ = cafe._pending[-1][:4]
    bag_grads = [upstream[[0, 3], 0:3].sum(0), upstream[[1, 2], 0:3].sum(0), upstream[0, 3:6], upstream[1, 3:6], upstream[[2, 3], 3:6].sum(0)]
    expected = torch.stack([bag_grads[b].norm() for b in (0, 1, 1, 2, 3, 4, 4)])
    torch.testing.assert_close(norms, expected)


@BOTH
def test_fx_trace_scripts_and_serves_eval_outputs(make: Callable) -> None:
    """``torchrec.fx.symbolic_trace`` then ``torch.jit.script``, as TorchRec's own test does; for
    CAFE the trace is the frozen lookup as it stands: eval-mode outputs, the module untouched."""
    from torchrec.fx import symbolic_trace

    ebc = make(tables=[_table("t1", 3, ["f1", "f3"], rows=20_000), _table("t2", 4, ["f2"])], is_weighted=True)
    for _ in range(3):
        ebc(_kjt(["f1", "f3", "f2"], weighted=True)).values().sum().backward()
    before = {k: v.clone() for k, v in ebc.state_dict().items()}
    gm = symbolic_trace(ebc)
    scripted = torch.jit.script(gm)
    kjt = _kjt(["f1", "f3", "f2"], weighted=True)
    out = gm(kjt)
    assert out.values().shape == (3, 10) and out.keys() == ["f1", "f3", "f2"] and out.offset_per_key() == [0, 3, 6, 10]
    ebc.eval()
    torch.testing.assert_close(out.values(), ebc(kjt).values())
    torch.testing.assert_close(scripted(kjt).values(), out.values())
    after = ebc.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
