"""Building the model: each method's embedding module, TorchRec's DLRM under DistributedModelParallel."""

import logging
import os
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter

from examples.harness.config import DENSE_OPTIMIZERS, EMBEDDING_OPTIMIZERS, TrainConfig, cafe_config
from torchrec_cafe import CafeEmbeddingBagCollection, table_budget_bytes
from torchrec_cafe.distributed import CafeEmbeddingBagCollectionSharder, CafeStorageReservation, RowWiseEverywhereEBCSharder, ShardedCafeBase
from torchrec_cafe.modules import HashingEmbeddingBagCollection, MCHEmbeddingBagCollection, QREmbeddingBagCollection, mch_sharder


def quiet_logs() -> None:
    """Silences per-model warnings (TorchRec's planner, torch's tracing) in example output."""
    # torchrec_cafe's "table stays full" warning: the result JSON lists those tables instead.
    for name in ("torchrec", "torch", "torchrec_cafe"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def device_and_backend() -> "tuple[torch.device, str]":
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "nccl"
    return torch.device("cpu"), "gloo"


def ensure_process_group() -> torch.device:
    """Joins the torchrun group if launched by one, else starts a world of size 1."""
    device, backend = device_and_backend()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            from socket import socket

            with socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        dist.init_process_group(backend)
    return device


def build_ebc(cfg: TrainConfig, tables: List[EmbeddingBagConfig], device: torch.device) -> nn.Module:
    if cfg.method == "full":
        return EmbeddingBagCollection(tables, device=device)
    if cfg.method == "hash":
        return HashingEmbeddingBagCollection(tables, cfg.compression_ratio, device=device)
    if cfg.method == "qr":
        return QREmbeddingBagCollection(tables, cfg.compression_ratio, device=device)
    if cfg.method.startswith("mch"):
        world = dist.get_world_size() if dist.is_initialized() else 1
        eviction = "lfu" if cfg.method == "mch_lfu" else "distance_lfu"
        return MCHEmbeddingBagCollection(tables, cfg.compression_ratio, eviction, cfg.mch_eviction_interval, buckets=world, device=device)
    return CafeEmbeddingBagCollection(tables, cafe=cafe_config(cfg), device=device)


def embedding_bytes(ebc: nn.Module) -> int:
    """Bytes of the embedding method, exactly: rows plus CAFE's sketch or MCH's id state."""
    if hasattr(ebc, "memory_report"):
        return sum(int(r["total_bytes"]) for r in ebc.memory_report().values())
    return sum(p.numel() * p.element_size() for p in ebc.parameters())


def partitioned_bytes(dmp: nn.Module, device: torch.device) -> int:
    """Bytes of the partitioned CAFE modules over all ranks (each rank reports its partitions):
    what the P partitions allocate, which differs from the unpartitioned module's by a few rows."""
    mine = sum(
        int(r["total_bytes"]) for m in dmp.modules() if isinstance(m, ShardedCafeBase) for r in m.memory_report().values()
    )
    total = torch.tensor([mine], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total)


def budget_bytes(tables: Sequence[EmbeddingBagConfig], compression_ratio: float) -> int:
    """The memory every compressed method may use: the sum of the tables' budgets (logical bytes / CR)."""
    return sum(table_budget_bytes(t, compression_ratio) for t in tables)


def build_model(cfg: TrainConfig, tables: List[EmbeddingBagConfig], num_dense: int, device: torch.device) -> "tuple[DistributedModelParallel, torch.optim.Optimizer, int]":
    """TorchRec's ``DLRMTrain`` (batch -> (loss, (loss, logits, labels))) over a DLRM with the
    method's embeddings, under DMP; (model, dense optimizer, embedding bytes)."""
    torch.manual_seed(cfg.seed)
    ebc = build_ebc(cfg, tables, device)
    nbytes = embedding_bytes(ebc)
    # The dense part starts alike for every method of a seed (the embedding methods draw different
    # amounts of randomness): comparisons between methods are then paired, not also between inits.
    torch.manual_seed(cfg.seed + 1_000_003)
    model = DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=num_dense,
            dense_arch_layer_sizes=cfg.dense_arch,
            over_arch_layer_sizes=cfg.over_arch,
            dense_device=device,
        )
    )
    apply_optimizer_in_backward(EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer], ebc.parameters(), {"lr": cfg.embedding_lr})
    plan, sharders = shard_plan(model, device, cfg.cafe_form, cfg.cafe_partitions)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    if cfg.cafe_form == "partitioned" and isinstance(ebc, CafeEmbeddingBagCollection):
        nbytes = partitioned_bytes(dmp, device)
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    return dmp, DENSE_OPTIMIZERS[cfg.dense_optimizer](dense.values(), lr=cfg.dense_lr), nbytes


def shard_plan(
    model: nn.Module, device: torch.device, cafe_form: str = "replicated", cafe_partitions: Optional[int] = None
) -> "tuple[ShardingPlan, List[ModuleSharder[nn.Module]]]":
    """Fused kernels for every physical table: table-wise, except MCH tables and CAFE tables in
    the partitioned ``cafe_form``, row-wise (the only placement TorchRec's managed collisions and
    CAFE's partitioned form support).

    Left alone, the planner makes small tables data-parallel with the dense kernel, which TorchRec
    steps with the dense optimizer instead of the fused one (CAFE would then need it attached) and
    which is slow on CPU. Every rank plans (the planner is
    deterministic), so an error cannot leave the other ranks waiting for a broadcast.
    """
    world = dist.get_world_size()
    constraints: Dict[str, ParameterConstraints] = {}
    for m in model.modules():  # pre-order: an MC-EBC comes before its inner EBC
        if isinstance(m, ManagedCollisionEmbeddingBagCollection):
            for c in m._embedding_module.embedding_bag_configs():
                constraints[c.name] = ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"])
        elif isinstance(m, CafeEmbeddingBagCollection) and cafe_form == "partitioned":
            for c in m.physical_tables().embedding_bag_configs():
                constraints[c.name] = ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused"])
        elif isinstance(m, EmbeddingBagCollection):
            for c in m.embedding_bag_configs():
                constraints.setdefault(c.name, ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]))
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints, storage_reservation=CafeStorageReservation(percentage=0.15))
    sharders: List[ModuleSharder[nn.Module]] = [CafeEmbeddingBagCollectionSharder(form=cafe_form, partitions=cafe_partitions), mch_sharder(), RowWiseEverywhereEBCSharder()]
    return planner.plan(model, sharders), sharders
