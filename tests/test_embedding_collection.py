"""CafeEmbeddingCollection against TorchRec's EmbeddingCollection: same outputs for plain tables,
each ID's embedding the rows it reads for compressed ones, scores per occurrence, checkpoints,
serving and DistributedModelParallel."""

from typing import List

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel

from torchrec_cafe import CafeConfig, CafeEmbeddingCollection

from .cafe_reads import embeddings


def _tables(rows: int = 20_000) -> List[EmbeddingConfig]:
    return [
        EmbeddingConfig(name="t1", embedding_dim=4, num_embeddings=rows, feature_names=["f1", "f2"]),
        EmbeddingConfig(name="t2", embedding_dim=4, num_embeddings=50, feature_names=["f2"]),
    ]


def _kjt(seed: int, batch: int = 8, high: int = 300) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (2 * batch,), generator=g)
    return KeyedJaggedTensor(keys=["f2", "f1"], values=torch.randint(0, high, (int(lengths.sum()),), generator=g), lengths=lengths)


def _assert_same_jagged(out: "dict[str, JaggedTensor]", ref: "dict[str, JaggedTensor]") -> None:
    assert list(out) == list(ref)
    for k in ref:
        assert torch.equal(out[k].lengths(), ref[k].lengths()), k
        torch.testing.assert_close(out[k].values(), ref[k].values())


@pytest.mark.parametrize("need_indices", [False, True])
def test_plain_tables_equal_torchrec_embedding_collection(need_indices: bool) -> None:
    tables = _tables(rows=300)
    cafe = CafeEmbeddingCollection(tables, need_indices=need_indices, cafe=CafeConfig(compression_ratio=1.0))
    ec = EmbeddingCollection(tables, need_indices=need_indices)
    for name in ("t1", "t2"):
        ec.embeddings[name].weight.data.copy_(cafe.embeddings[name].weight)
    kjt = _kjt(0, high=50)  # TorchRec's EC needs IDs < num_embeddings
    out, ref = cafe(kjt), ec(kjt)
    assert list(out) == ["f1", "f2@t1", "f2@t2"]
    _assert_same_jagged(out, ref)
    if need_indices:
        assert all(torch.equal(out[k].weights(), ref[k].weights()) for k in ref)
    assert cafe.embedding_dim() == 4 and cafe.need_indices() == need_indices
    assert cafe.embedding_names_by_table() == ec.embedding_names_by_table()


def test_compressed_ids_read_their_rows_and_hot_ids_get_promoted() -> None:
    cafe = CafeEmbeddingCollection(_tables(), cafe={"t1": CafeConfig(compression_ratio=20, threshold=1.0)})
    for seed in range(4):
        out = cafe(_kjt(seed))
        sum(jt.values().pow(2).sum() for jt in out.values()).backward()
    cafe.apply_pending_updates()
    assert cafe.stats()["t1"]["hot_ids"] > 0
    cafe.eval()
    kjt = _kjt(9)
    out = cafe(kjt)
    weight = cafe.embeddings["t1"].weight
    for key, name in (("f1", "f1"), ("f2@t1", "f2")):
        ids = kjt[name].values()
        torch.testing.assert_close(out[key].values(), embeddings(cafe.bags, "t1", weight, ids))


def test_scores_are_per_occurrence_embedding_gradient_norms() -> None:
    cafe = CafeEmbeddingCollection(_tables(), cafe={"t1": CafeConfig(compression_ratio=20)})
    kjt = _kjt(3)
    out = cafe(kjt)
    upstream = {k: torch.randn_like(jt.values()) for k, jt in out.items()}
    sum((out[k].values() * upstream[k]).sum() for k in out).backward()
    ids, _, norms, feature = cafe.bags._pending[-1][:4]
    # module features: f1 then f2 (as t1 reads them); each occurrence's gradient is its upstream row
    expected = torch.cat([upstream["f1"].norm(dim=1), upstream["f2@t1"].norm(dim=1)])
    torch.testing.assert_close(norms, expected)
    assert torch.equal(ids, torch.cat([kjt["f1"].values(), kjt["f2"].values()]))


def test_empty_batch() -> None:
    cafe = CafeEmbeddingCollection(_tables(), cafe=CafeConfig(compression_ratio=20))
    empty = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(6, dtype=torch.int64))
    out = cafe(empty)
    assert all(jt.values().shape == (0, 4) and jt.lengths().tolist() == [0, 0, 0] for jt in out.values())


def test_mixed_dims_are_refused() -> None:
    tables = _tables() + [EmbeddingConfig(name="t3", embedding_dim=8, num_embeddings=10, feature_names=["f3"])]
    with pytest.raises(ValueError, match="same embedding_dim"):
        CafeEmbeddingCollection(tables, cafe=CafeConfig(compression_ratio=2))


def _trained_ec() -> CafeEmbeddingCollection:
    cafe = CafeEmbeddingCollection(_tables(), cafe={"t1": CafeConfig(compression_ratio=20, threshold=1.0)})
    for seed in range(4):
        sum(jt.values().pow(2).sum() for jt in cafe(_kjt(seed)).values()).backward()
    cafe.zero_grad()
    return cafe


def test_checkpoint_resumes_exactly(tmp_path) -> None:
    from torchrec_cafe.checkpoint import checkpoint_path, load, save

    cafe = _trained_ec()
    opt = torch.optim.SGD(cafe.parameters(), lr=0.1)
    path = save(checkpoint_path(str(tmp_path), 4), cafe, opt)
    resumed = CafeEmbeddingCollection(_tables(), cafe={"t1": CafeConfig(compression_ratio=20, threshold=1.0)})
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.1)
    load(path, resumed, resumed_opt)
    for module, optimizer in ((cafe, opt), (resumed, resumed_opt)):
        for seed in range(4, 8):
            sum(jt.values().pow(2).sum() for jt in module(_kjt(seed)).values()).backward()
            optimizer.step()
            optimizer.zero_grad()
    for (k, a), (_, b) in zip(cafe.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_served_and_scripted_forms_equal_eval_outputs(tmp_path) -> None:
    from torchrec_cafe.inference import CafeInferenceEC, export_for_inference, quantize_for_inference

    cafe = _trained_ec().eval()
    kjt = _kjt(11)
    ref = cafe(kjt)
    served = export_for_inference(cafe)
    assert isinstance(served, CafeInferenceEC)
    _assert_same_jagged(served(kjt), ref)
    path = tmp_path / "ec.pt"
    torch.jit.save(torch.jit.script(cafe), path)  # eval mode: scripts the frozen form
    _assert_same_jagged(torch.jit.load(path)(kjt), ref)
    quantized = quantize_for_inference(served, "int8")
    out = quantized(kjt)
    for k in ref:
        assert (out[k].values() - ref[k].values()).abs().max() <= 1e-2 * ref[k].values().abs().max()


def test_sharded_by_dmp_equals_unsharded(single_rank_pg: None, tmp_path) -> None:
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    from torchrec_cafe.checkpoint import checkpoint_path, load, save
    from torchrec_cafe.distributed import CafeEmbeddingCollectionSharder, ShardedCafeEmbeddingCollection

    class Model(torch.nn.Module):
        def __init__(self, ec: torch.nn.Module) -> None:
            super().__init__()
            self.ec = ec

        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            return torch.cat([jt.values() for jt in self.ec(kjt).values()])

    config = {"t1": CafeConfig(compression_ratio=20, threshold=1.0)}
    cafe = CafeEmbeddingCollection(_tables(), cafe=config)
    apply_optimizer_in_backward(torch.optim.SGD, cafe.parameters(), {"lr": 0.1})
    sharders = [CafeEmbeddingCollectionSharder()]
    model = Model(cafe)
    constraints = {"t1": ParameterConstraints(sharding_types=["row_wise"]), "t2": ParameterConstraints(sharding_types=["table_wise"])}
    plan = EmbeddingShardingPlanner(Topology(world_size=1, compute_device="cpu"), constraints=constraints).plan(model, sharders)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    assert isinstance(dmp.module.ec, ShardedCafeEmbeddingCollection)
    reference = Model(CafeEmbeddingCollection(_tables(), cafe=config))
    load(save(checkpoint_path(str(tmp_path), 0), dmp), reference)  # the sharded tables, unsharded
    reference = reference.ec
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for seed in range(4):
        dmp(_kjt(seed)).pow(2).sum().backward()
        sum(jt.values().pow(2).sum() for jt in reference(_kjt(seed)).values()).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    dmp.module.ec.cafe.apply_pending_updates()
    reference.apply_pending_updates()
    assert dmp.module.ec.cafe.stats()["t1"]["hot_ids"] == reference.stats()["t1"]["hot_ids"] > 0
    dmp.eval(), reference.eval()
    torch.testing.assert_close(dmp(_kjt(9)), torch.cat([jt.values() for jt in reference(_kjt(9)).values()]))
