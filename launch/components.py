"""TorchX components that launch the example trainer (``python -m examples.train_dlrm``) under torchrun.

Registered under the ``torchx.components`` entry point as ``cafe`` (``torchx run cafe.train``,
``torchx run cafe.smoke``), also addressable as ``launch/components.py:train``. The trainer runs as
a module, so the job's working directory must be the repository root: it is for ``local_cwd`` and
``slurm`` when ``torchx`` runs from there, and must be the image's WORKDIR on ``kubernetes``.
Trainer flags other than ``--out``/``--checkpoint-dir`` go after ``--`` and reach the trainer as is.

Elastic restart: ``max_retries`` is both the scheduler's retry count (slurm requeue, Volcano
RestartJob) and torchrun's ``--max-restarts`` (as ``PET_MAX_RESTARTS``), so when a worker dies
torchrun stops the others and restarts the worker group in place, on every scheduler (``local_cwd``
has no retries of its own). With ``checkpoint_dir`` (and ``-- --checkpoint-every N``) a restarted or
retried job resumes from the latest complete checkpoint there, and ends with the metrics of an
uninterrupted run; without it, it starts from scratch.
"""

from typing import Dict, List, Optional

import torchx.components.dist as dist
import torchx.specs as specs


def train(
    *script_args: str,
    out: str = "cafe_metrics.json",
    checkpoint_dir: Optional[str] = None,
    name: str = "cafe/",
    image: str = "torchrec-cafe:latest",
    j: str = "1x8",
    h: Optional[str] = None,
    cpu: int = 32,
    gpu: int = 8,
    memMB: int = 131072,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Trains a DLRM with the example trainer on N nodes x M processes (nccl on GPUs, gloo on CPUs).

    Args:
        script_args: extra trainer flags, passed as is (e.g. ``-- --method cafe --compression-ratio 1000``);
            see ``python -m examples.train_dlrm --help``
        out: the metrics JSON the trainer writes (``--out``), relative to the job's working directory;
            on several nodes put it on shared storage (see ``mounts``)
        checkpoint_dir: ``--checkpoint-dir`` for the trainer, forwarded only when set: the job resumes
            from the latest checkpoint there (also after a restart, see ``max_retries``) and saves
            one every ``-- --checkpoint-every N`` steps; on several nodes put it on shared storage
        name: ``{experiment}/{run}`` (the run defaults to ``train_dlrm``)
        image: container image with this repository at its WORKDIR and its dependencies installed
            (kubernetes, docker); local_cwd and slurm run in the current directory's environment instead
        j: ``[{min_nnodes}:]{nnodes}x{nproc_per_node}``; nproc_per_node must not exceed the GPUs per node
        h: a registered named resource (e.g. ``aws_p4d.24xlarge``, ``gpu.xlarge``); overrides cpu, gpu, memMB
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: host memory per node in MB
        env: extra environment variables (e.g. ``NCCL_DEBUG=INFO``)
        max_retries: how many times torchrun restarts the workers after one fails (``PET_MAX_RESTARTS``)
            and the scheduler restarts the job after a failure (slurm, kubernetes); restarts resume
            from the latest checkpoint in ``checkpoint_dir``
        mounts: ``type=bind,src=/host,dst=/job[,readonly]`` or ``type=volume,src=claim,dst=/data`` entries
        rdzv_port: port of the c10d rendezvous on the first node (multi-node jobs only)
    """
    return dist.ddp(
        *script_args,
        "--out",
        out,
        *(("--checkpoint-dir", checkpoint_dir) if checkpoint_dir else ()),
        m="examples.train_dlrm",
        name=name,
        image=image,
        j=j,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        # torchrun's own store is reused across restarts without a per-attempt prefix (torch 2.13,
        # pytorch/pytorch#135712, #167288): restarted workers read the killed attempt's gloo/NCCL
        # addresses; a fresh store per rendezvous round (rank 0 hosts it) avoids that
        env={**(env or {}), "PET_MAX_RESTARTS": str(max_retries), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
        max_retries=max_retries,
        mounts=mounts,
        rdzv_port=rdzv_port,
    )


def smoke(
    *script_args: str,
    out: str = "cafe_smoke_metrics.json",
    checkpoint_dir: Optional[str] = None,
    max_retries: int = 0,
) -> specs.AppDef:
    """CPU smoke run: CAFE on 1 node x 2 gloo processes, a few steps on tiny synthetic data.

    Args:
        script_args: extra trainer flags, after the smoke settings so they override them
            (e.g. ``-- --train-batches 20``)
        out: the metrics JSON the trainer writes (``--out``), relative to the job's working directory
        checkpoint_dir: ``--checkpoint-dir`` for the trainer, forwarded only when set: the job resumes
            from the latest checkpoint there and saves one every ``-- --checkpoint-every N`` steps
        max_retries: how many times torchrun restarts the 2 workers after one fails, each restart
            resuming from the latest checkpoint in ``checkpoint_dir`` (see ``train``)
    """
    return train(
        "--method",
        "cafe",
        "--compression-ratio",
        "10",
        "--train-batches",
        "4",
        "--eval-batches",
        "2",
        "--batch-size",
        "64",
        "--max-cardinality",
        "2000",
        *script_args,
        out=out,
        checkpoint_dir=checkpoint_dir,
        name="cafe/smoke",
        j="1x2",
        cpu=2,
        gpu=0,
        memMB=4096,
        env={"CUDA_VISIBLE_DEVICES": ""},
        max_retries=max_retries,
    )
