"""No host synchronisation in a CAFE training step on the fixed-shape path (what accelerators run).

A CPU stand-in for ``torch.cuda.set_sync_debug_mode``: a dispatch mode records every op that reads
device data on the host (``_local_scalar_dense``: ``item``/``int``/``bool``) or whose output size
depends on the data (``nonzero``, boolean indexing, ...), and ``Tensor.tolist`` (which reads without
dispatching) is counted as it runs. ``HotSketch.fixed_shapes`` makes the CPU take the accelerator
path. The step (forward with the due sketch update and migration, backward, optimizer) must make
exactly the reads TorchRec's own EBC step makes on the same input (the lookup's per-key lengths),
under DMP no more of any kind than TorchRec's sharded EBC step.
"""

import collections
from typing import Any, Callable, Counter, Dict, Iterator, List

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection
from torchrec_cafe.modules.frozen import export_for_inference

_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
          "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default"}  # fmt: skip


class _HostReads(TorchDispatchMode):
    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        kwargs = kwargs or {}
        if name == "aten.index.Tensor":  # boolean-mask indexing sizes its output from the data
            if any(t is not None and t.dtype == torch.bool for t in args[1]):
                self.counts[name] += 1
        elif name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
            self.counts[name] += 1
        elif name in _READS:
            self.counts[name] += 1
        return func(*args, **kwargs)


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], None]], Counter[str]]:
    """``host_reads(step)``: runs ``step`` and returns the host reads it made, by op."""

    def run(step: Callable[[], None]) -> Counter[str]:
        counts: Counter[str] = collections.Counter()
        tolist = torch.Tensor.tolist

        def counted(t: torch.Tensor, *args: Any) -> Any:
            counts["Tensor.tolist"] += 1
            return tolist(t, *args)

        with monkeypatch.context() as m, _HostReads(counts):
            m.setattr(torch.Tensor, "tolist", counted)
            step()
        return counts

    return run


def _tables() -> List[EmbeddingBagConfig]:
    """Sketched tables (SUM and MEAN) and one too small for a sketch (hashed into its budget)."""
    return [
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=20_000, feature_names=["a", "b"]),
        EmbeddingBagConfig(name="mean", embedding_dim=8, num_embeddings=20_000, feature_names=["c"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=30, feature_names=["d"]),
    ]


def _batches(n: int) -> Iterator[KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(0)
    keys, sizes = ["a", "b", "c", "d"], [20_000, 20_000, 20_000, 30]
    for _ in range(n):
        lengths = torch.randint(0, 4, (len(keys), 32), generator=g)
        skewed = [(torch.rand(int(l.sum()), generator=g) ** 4 * size).long() for l, size in zip(lengths, sizes)]
        yield KeyedJaggedTensor(keys=keys, values=torch.cat(skewed), lengths=lengths.flatten())


def _reads_of_last_step(model: torch.nn.Module, step: Callable[[KeyedJaggedTensor], None], host_reads: Callable) -> Counter[str]:
    *warm, last = list(_batches(8))
    for kjt in warm:
        step(kjt)
    return host_reads(lambda: step(last))


def test_unsharded_step_reads_the_host_only_as_torchrec_ebc_does(host_reads: Callable) -> None:
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10))
    cafe.sketch.fixed_shapes = True
    ebc = EmbeddingBagCollection(_tables())

    def stepper(module: torch.nn.Module) -> Callable[[KeyedJaggedTensor], None]:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)  # state to migrate, no host reads of its own
        if isinstance(module, CafeEmbeddingBagCollection):
            module.attach_optimizer(optimizer)

        def step(kjt: KeyedJaggedTensor) -> None:
            if isinstance(module, EmbeddingBagCollection):  # the plain EBC needs IDs within its rows
                kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() % 30, lengths=kjt.lengths())
            module(kjt).values().pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    promoted_before = sum(s["promotions"] for s in cafe.stats().values())
    cafe_reads = _reads_of_last_step(cafe, stepper(cafe), host_reads)
    ebc_reads = _reads_of_last_step(ebc, stepper(ebc), host_reads)
    assert sum(s["promotions"] for s in cafe.stats().values()) > promoted_before  # updates migrated rows
    assert cafe_reads == ebc_reads == collections.Counter({"Tensor.tolist": 1})


def test_dmp_step_reads_the_host_only_as_the_sharded_ebc_does(single_rank_pg: None, host_reads: Callable) -> None:
    def model(cafe: bool) -> DistributedModelParallel:
        module = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10)) if cafe else EmbeddingBagCollection(_tables())
        inner = module._embedding_bag_collection if cafe else module
        apply_optimizer_in_backward(RowWiseAdagrad, inner.parameters(), {"lr": 0.1})
        dmp = DistributedModelParallel(module, device=torch.device("cpu"))
        if cafe:
            dmp.module.sketch.fixed_shapes = True
        return dmp

    def stepper(dmp: DistributedModelParallel, modulo: bool) -> Callable[[KeyedJaggedTensor], None]:
        def step(kjt: KeyedJaggedTensor) -> None:
            if modulo:
                kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() % 30, lengths=kjt.lengths())
            dmp(kjt).values().pow(2).sum().backward()

        return step

    cafe, ebc = model(True), model(False)
    stats: Dict[str, Dict[str, float]] = cafe.module.stats()
    promoted_before = sum(s["promotions"] for s in stats.values())
    cafe_reads = _reads_of_last_step(cafe, stepper(cafe, False), host_reads)
    ebc_reads = _reads_of_last_step(ebc, stepper(ebc, True), host_reads)
    assert sum(s["promotions"] for s in cafe.module.stats().values()) > promoted_before
    # TorchRec's own lookups read the host a placement-dependent number of times (its tables differ
    # in size from CAFE's physical ones): CAFE adds none of any kind, and reads the lengths once.
    assert cafe_reads - ebc_reads == collections.Counter() and cafe_reads["Tensor.tolist"] == 1


def test_served_tensor_lookup_reads_the_host_only_as_torchrec_ebc_does(host_reads: Callable) -> None:
    """The exported module's tensor lookup (what other devices than CPU serve with) makes the one
    read TorchRec's EBC forward makes: the per-key lengths of the KJT the tables read."""
    cafe = CafeEmbeddingBagCollection(_tables(), cafe=CafeConfig(compression_ratio=10))
    _reads_of_last_step(cafe, lambda kjt: cafe(kjt).values().sum().backward(), lambda step: step())
    served = export_for_inference(cafe.eval())
    served._compiled = False
    kjt = next(_batches(1))
    with torch.no_grad():
        served_reads = host_reads(lambda: served(kjt))
        ebc = EmbeddingBagCollection(_tables())
        plain = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values() % 30, lengths=kjt.lengths())
        ebc_reads = host_reads(lambda: ebc(plain))
    assert served_reads == ebc_reads == collections.Counter({"Tensor.tolist": 1})
