"""Training-run settings of the example trainer: methods, presets, ``TrainConfig`` and the CAFE
settings it implies."""


from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_cafe import CafeConfig
from torchrec_cafe.distributed.sharder import FORMS

METHODS = ("full", "hash", "qr", "mch_lfu", "mch_dlfu", "cafe", "cafe_paper", "cafe_freq")
_CAFE = CafeConfig(compression_ratio=1.0)  # the defaults of the cafe_* knobs
DATA = ("synthetic", "criteo", "libfm")
EMBEDDING_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rowwise_adagrad": RowWiseAdagrad}
DENSE_OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}
# The paper's setting (official artifact: tasks/*.json and bench/*.sh, DLRM with bottom MLP
# 512-256-64-16 and top MLP 512-256-1); CafeConfig's defaults give its threshold and hash-fraction
# schedule by compression ratio.
PRESETS: Dict[str, Dict[str, object]] = {
    "paper": {
        "embedding_dim": 16, "embedding_optimizer": "sgd", "embedding_lr": 0.1, "dense_optimizer": "sgd", "dense_lr": 0.1,
        "batch_size": 128, "dense_arch": [512, 256, 64, 16], "over_arch": [512, 256, 1],
    },
}


@dataclass
class TrainConfig:
    """One training run. Defaults: the README's main job (DLRM dim 16, CR 100)."""

    method: str = "cafe"
    compression_ratio: float = 100.0
    embedding_dim: int = 16
    embedding_optimizer: str = "rowwise_adagrad"
    embedding_lr: float = 0.05
    dense_optimizer: str = "adagrad"
    dense_lr: float = 0.05
    batch_size: int = 512
    epochs: int = 1
    eval_every: int = 0  # steps between evaluations; 0: at the end of every epoch only
    train_batches: int = 400  # synthetic data only
    eval_batches: int = 40  # synthetic data only
    seed: int = 0
    dense_arch: List[int] = field(default_factory=lambda: [64, 16])
    over_arch: List[int] = field(default_factory=lambda: [64, 32, 1])
    # CAFE knobs: CafeConfig's defaults
    cafe_threshold: Optional[float] = _CAFE.threshold
    cafe_promote_load: float = _CAFE.promote_load
    cafe_demote_load: float = _CAFE.demote_load
    cafe_displace_ratio: float = _CAFE.displace_ratio
    cafe_max_promotions: Optional[int] = _CAFE.max_promotions
    cafe_cold_rows: str = _CAFE.cold_rows
    cafe_block_fraction: float = _CAFE.block_fraction
    cafe_sketch_slots_per_row: float = _CAFE.sketch_slots_per_row
    cafe_decay: float = _CAFE.decay
    cafe_update_interval: int = _CAFE.update_interval
    cafe_slots_per_bucket: int = _CAFE.slots_per_bucket
    cafe_optimizer_state: str = _CAFE.optimizer_state
    cafe_sync: str = _CAFE.sync
    cafe_form: str = "replicated"  # how DMP shards CAFE (CafeEmbeddingBagCollectionSharder(form=...))
    cafe_partitions: Optional[int] = None  # partitioned form: hash partitions (default: the world size)
    mch_eviction_interval: int = 1
    progress: bool = False
    checkpoint_dir: Optional[str] = None  # resume from its latest checkpoint; save every checkpoint_every steps
    checkpoint_every: int = 0
    pipeline: bool = False  # train and evaluate through TorchRec's TrainPipelineSparseDist

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"embedding_optimizer must be one of {tuple(EMBEDDING_OPTIMIZERS)}, got {self.embedding_optimizer!r}")
        if self.dense_optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(f"dense_optimizer must be one of {tuple(DENSE_OPTIMIZERS)}, got {self.dense_optimizer!r}")
        for name in ("embedding_dim", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cafe_form not in FORMS:
            raise ValueError(f"cafe_form must be one of {FORMS}, got {self.cafe_form!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.checkpoint_every < 0 or (self.checkpoint_every and not self.checkpoint_dir):
            raise ValueError(f"checkpoint_every must be >= 0 and needs checkpoint_dir, got {self.checkpoint_every}, {self.checkpoint_dir!r}")




def cafe_config(cfg: TrainConfig) -> CafeConfig:
    """The CafeConfig of a ``cafe*`` method: the trainer's ``cafe_*`` fields; ``cafe_paper`` starts
    from the paper's settings (threshold schedule, hashed cold rows) unless they are given."""
    settings = dict(
        threshold=cfg.cafe_threshold,
        promote_load=cfg.cafe_promote_load,
        demote_load=cfg.cafe_demote_load,
        displace_ratio=cfg.cafe_displace_ratio,
        max_promotions=cfg.cafe_max_promotions,
        cold_rows=cfg.cafe_cold_rows,
        block_fraction=cfg.cafe_block_fraction,
        sketch_slots_per_row=cfg.cafe_sketch_slots_per_row,
        decay=cfg.cafe_decay,
        importance="frequency" if cfg.method == "cafe_freq" else "grad_norm",
        update_interval=cfg.cafe_update_interval,
        slots_per_bucket=cfg.cafe_slots_per_bucket,
        optimizer_state=cfg.cafe_optimizer_state,
        sync=cfg.cafe_sync,
        # TrainPipelineSparseDist remaps batch k + 1 before batch k's backward in the replicated
        # form: holding each step's scores back one more step makes the pipelined run equal the
        # plain loop's (the partitioned form updates in compute, after that backward)
        pipeline_depth=1 if cfg.pipeline and cfg.cafe_form == "replicated" else 0,
    )
    if cfg.method == "cafe_paper":
        paper = CafeConfig.paper(cfg.compression_ratio)
        settings["cold_rows"] = paper.cold_rows
        settings["displace_ratio"] = paper.displace_ratio
        settings["max_promotions"] = paper.max_promotions if cfg.cafe_max_promotions is None else cfg.cafe_max_promotions
        settings["threshold"] = paper.threshold if cfg.cafe_threshold is None else cfg.cafe_threshold
    return CafeConfig(compression_ratio=cfg.compression_ratio, **settings)
