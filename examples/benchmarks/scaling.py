"""Scale-out benchmark: per rank and training step, the CAFE-specific work and bytes of the
replicated and the partitioned sharded form at W = 1, 2, 4 (8) ranks and a fixed per-rank batch,
and a model of both to W = 1024 from the measured per-entry costs.

Each W spawns W processes (gloo on CPU, one thread each) training a DLRM over 8 CAFE tables
(100k IDs, dim 16, CR 10, row-wise, fused row-wise Adagrad) on Zipf(1.1) batches. Measured on
every rank, per step:

- ``cafe_cpu_ms``: CPU time of this rank's thread in CAFE's stages (``cafe.remap``, which applies
  the due sketch update and remaps, and ``cafe.land_migration``); waiting in collectives is not CPU
  time, so an oversubscribed machine (W > cores) still measures each rank's own work;
- ``sketch_entries``: entries the rank's sketch update consumes (all ranks' aggregated pairs in the
  replicated form, the occurrences the rank owns in the partitioned form);
- ``cafe_bytes_sent`` / ``_received``: bytes of the collectives CAFE itself calls (the replicated
  form's pair all-gather and its all-reduce of the staged rows of promoted IDs, counted as the
  tensor each way; the partitioned form calls none: its raw IDs travel in the row-wise input
  all-to-all that a row-wise EmbeddingBagCollection does anyway, as many as the physical IDs would).

    python -m examples.benchmarks.scaling --out results/scaling.json
"""

import argparse
import json
import os
import socket
import statistics
import time
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from examples.harness.model import quiet_logs
from torchrec_cafe import CafeConfig, CafeEmbeddingBagCollection, CafeEmbeddingBagCollectionSharder
from torchrec_cafe.sketch import HotSketch

TABLES = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=100_000, feature_names=[f"f{i}"]) for i in range(8)]
CONFIG = CafeConfig(compression_ratio=10)
FORMS = ("replicated", "partitioned")
_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "all_to_all_single", "broadcast")


def _batch(step: int, rank: int, batch: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(100_003 * step + rank)
    lengths = torch.randint(1, 4, (len(TABLES) * batch,), generator=g)
    u = torch.rand(int(lengths.sum()), generator=g, dtype=torch.float64)
    values = (u.pow(-1 / 1.1).clamp(max=1e9).long() * 104729) % 100_000
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(len(TABLES))], values=values, lengths=lengths)


class _Meter:
    """CPU time in CAFE's stages, sketch entries, and bytes of the collectives called inside them."""

    def __init__(self) -> None:
        self.totals = {
            "cafe_cpu_ms": 0.0, "sketch_entries": 0.0, "cafe_bytes_sent": 0.0, "cafe_bytes_received": 0.0,
            "all_gather_bytes_sent": 0.0, "all_reduce_bytes": 0.0,
        }
        self._inside = 0

    def stage(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, self._inside = time.thread_time(), self._inside + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside -= 1
                self.totals["cafe_cpu_ms"] += 1e3 * (time.thread_time() - start)

        return timed

    def collective(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Counts a collective called inside a CAFE stage: an all-gather sends its input and
        receives the other ranks' slices; an all-reduce is counted as its tensor each way."""

        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._inside:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                lists = [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
                sent = sum(t.numel() * t.element_size() for t in tensors[-1:])
                whole = sum(t.numel() * t.element_size() for t in lists) or sum(t.numel() * t.element_size() for t in tensors[:1])
                self.totals["cafe_bytes_sent"] += sent
                self.totals["cafe_bytes_received"] += sent if name == "all_reduce" else whole - sent
                self.totals["all_reduce_bytes" if name == "all_reduce" else "all_gather_bytes_sent"] += sent
            return fn(*args, **kwargs)

        return counted

    def entries(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(sketch: HotSketch, first: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.totals["sketch_entries"] += first.numel()
            return fn(sketch, first, *args, **kwargs)

        return counted


def _run(rank: int, world: int, form: str, batch: int, steps: int, warmup: int) -> Dict[str, float]:
    torch.manual_seed(0)
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=CONFIG)
    apply_optimizer_in_backward(RowWiseAdagrad, cafe.physical_tables().parameters(), {"lr": 0.05})
    sharders = [CafeEmbeddingBagCollectionSharder(form=form)]
    constraints = {t.name: ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"]) for t in TABLES}
    topology = Topology(world_size=world, compute_device="cpu", local_world_size=world)
    plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).plan(cafe, sharders)
    dmp = DistributedModelParallel(cafe, device=torch.device("cpu"), plan=plan, sharders=sharders)
    logic = dmp.module.cafe
    meter = _Meter()
    logic.remap, logic.land_migration = meter.stage(logic.remap), meter.stage(logic.land_migration)
    HotSketch.update, HotSketch.update_quanta = meter.entries(HotSketch.update), meter.entries(HotSketch.update_quanta)
    for name in _COLLECTIVES:
        setattr(dist, name, meter.collective(name, getattr(dist, name)))
    walls = []
    for step in range(warmup + steps):
        if step == warmup:
            meter.totals = dict.fromkeys(meter.totals, 0.0)
        start = time.perf_counter()
        dmp(_batch(step, rank, batch)).values().pow(2).mean().backward()
        walls.append(time.perf_counter() - start)
    out = {k: v / steps for k, v in meter.totals.items()}
    out["step_wall_ms"] = 1e3 * statistics.median(walls[warmup:])
    out["state_bytes"] = float(_state_bytes(dmp.module))
    return out


def bag_cost(batch: int, steps: int = 30, spreads: "tuple[int, ...]" = (1, 64)) -> float:
    """CPU ms per bag of ``cafe.remap`` on one process: the same IDs in ``batch`` bags per feature
    and in 64x as many (63 of 64 empty, as an owner receives a global batch from many ranks)."""
    cafe = CafeEmbeddingBagCollection(TABLES, cafe=CONFIG)
    medians = []
    for spread in spreads:
        times = []
        for step in range(steps):
            kjt = _batch(step, 0, batch)
            lengths = torch.zeros(kjt.lengths().numel() * spread, dtype=kjt.lengths().dtype)
            lengths[::spread] = kjt.lengths()
            spread_kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=lengths)
            start = time.thread_time()
            cafe.remap(spread_kjt, True)
            times.append(1e3 * (time.thread_time() - start))
        medians.append(statistics.median(times[5:]))
    bags = [len(TABLES) * batch * s for s in spreads]
    return (medians[-1] - medians[0]) / (bags[-1] - bags[0])


def _state_bytes(sharded: torch.nn.Module) -> int:
    """This rank's bytes of the module: row blocks, sketch, remap constants, other buffers."""
    tensors = {t.data_ptr(): t for t in list(sharded.parameters()) + list(sharded.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _worker(rank: int, world: int, port: int, form: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    quiet_logs()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _run(rank, world, form, args.batch, args.steps, args.warmup)
        with open(os.path.join(out, f"{form}-{world}-{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model(
    measured: Dict[str, Dict[int, Dict[str, float]]], worlds: List[int], per_bag: float, batch: int
) -> Dict[str, Dict[int, Dict[str, float]]]:
    """Per form and W: modelled per-rank CPU ms, sketch entries, bytes received and state bytes.

    Replicated: a rank applies every rank's aggregated pairs (W x its own, measured at W >= 2) and
    receives the other ranks' ((W - 1) x its all-gathered bytes) plus the all-reduce of the staged
    rows of promoted IDs (bounded by the promotion cap: taken as measured at the largest W); it
    holds rows / W plus the whole sketch. Partitioned: a rank applies the occurrences it owns (its
    share of the global batch: constant at a fixed per-rank batch, IDs spread evenly by ``id mod
    W``) and CAFE sends nothing, but it sees every bag of the global batch (W x batch x features,
    mostly empty at large W: row-wise sharding's own lookup has that shape too); it holds (rows +
    sketch) / W. CPU ms, replicated: the measured cost per entry (median over W >= 2, where it
    includes aggregation and the collectives' CPU) times the modelled entries; partitioned: the
    measured W = 1 ms plus ``per_bag`` (``bag_cost``, measured on one process) times the bags
    added by W. Rows and sketch bytes from the memory report."""
    report = CafeEmbeddingBagCollection(TABLES, device=torch.device("meta"), cafe=CONFIG).memory_report().values()
    rows = sum((r["pool_rows"] + r["block_rows"]) * r["row_bytes"] for r in report)
    sketch = sum(r["sketch_bytes"] for r in report)
    multi = {w: r for w, r in measured["replicated"].items() if w > 1}
    bags = len(TABLES) * batch
    pairs = statistics.median(r["sketch_entries"] / w for w, r in multi.items())
    gathered = statistics.median(r["all_gather_bytes_sent"] for r in multi.values())
    reduced = multi[max(multi)]["all_reduce_bytes"]
    owned = statistics.fmean(r["sketch_entries"] for r in measured["partitioned"].values())
    per_pair = statistics.median(r["cafe_cpu_ms"] / r["sketch_entries"] for r in multi.values())
    alone = measured["partitioned"][1]["cafe_cpu_ms"]
    out: Dict[str, Dict[int, Dict[str, float]]] = {f: {} for f in FORMS}
    for w in worlds:
        entries = {"replicated": w * pairs, "partitioned": owned}
        received = {"replicated": (w - 1) * gathered + reduced if w > 1 else 0.0, "partitioned": 0.0}
        state = {"replicated": rows / w + sketch, "partitioned": (rows + sketch) / w}
        for f in FORMS:
            out[f][w] = {
                "sketch_entries": entries[f],
                "cafe_cpu_ms": per_pair * entries[f] if f == "replicated" else alone + per_bag * bags * (w - 1),
                "cafe_bytes_received": received[f],
                "state_bytes": state[f],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=1024, help="samples per rank and step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="results/scaling.json")
    parser.add_argument("--model-only", action="store_true", help="recompute the model from the measurements in --out")
    args = parser.parse_args()
    if args.model_only:
        with open(args.out) as f:
            saved = json.load(f)
        measured = {f: {int(w): r for w, r in saved["measured"][f].items()} for f in FORMS}
        args.batch = saved["batch_per_rank"]
        _report(measured, saved["per_bag_ms"], args)
        return
    tmp = args.out + ".ranks"
    os.makedirs(tmp, exist_ok=True)
    measured: Dict[str, Dict[int, Dict[str, float]]] = {f: {} for f in FORMS}
    for world in args.worlds:
        for form in FORMS:
            mp.start_processes(_worker, args=(world, _free_port(), form, args, tmp), nprocs=world, start_method="spawn")
            ranks = []
            for r in range(world):
                with open(os.path.join(tmp, f"{form}-{world}-{r}.json")) as f:
                    ranks.append(json.load(f))
            measured[form][world] = {k: statistics.fmean(x[k] for x in ranks) for k in ranks[0]}
            print(form, world, {k: round(v, 2) for k, v in measured[form][world].items()}, flush=True)
    torch.set_num_threads(1)
    _report(measured, bag_cost(args.batch), args)


def _report(measured: Dict[str, Dict[int, Dict[str, float]]], per_bag: float, args: argparse.Namespace) -> None:
    """Prints the measured and modelled tables; writes the JSON."""
    modelled = model(measured, [2, 4, 8, 64, 1024], per_bag, args.batch)
    print(f"\nremap CPU per 1k bags (one process): {1e3 * per_bag:.4f} ms")
    print("\n| form | W | CAFE CPU ms/step/rank | sketch entries/rank | CAFE bytes sent/rank | received/rank | state bytes/rank | step wall ms |")
    print("|---|---|---|---|---|---|---|---|")
    for form in FORMS:
        for w, r in measured[form].items():
            print(f"| {form} | {w} | {r['cafe_cpu_ms']:.2f} | {r['sketch_entries']:.0f} | {r['cafe_bytes_sent']:.0f} | "
                  f"{r['cafe_bytes_received']:.0f} | {r['state_bytes']:.0f} | {r['step_wall_ms']:.1f} |")
    print("\nmodel:\n| form | W | CAFE CPU ms/step/rank | sketch entries/rank | CAFE bytes received/rank | state bytes/rank |")
    print("|---|---|---|---|---|---|")
    for form in FORMS:
        for w, r in modelled[form].items():
            print(f"| {form} | {w} | {r['cafe_cpu_ms']:.1f} | {r['sketch_entries']:.0f} | {r['cafe_bytes_received']:.0f} | {r['state_bytes']:.0f} |")
    with open(args.out, "w") as f:
        json.dump({"batch_per_rank": args.batch, "tables": len(TABLES), "per_bag_ms": per_bag, "measured": measured, "model": modelled}, f, indent=2)


if __name__ == "__main__":
    main()
