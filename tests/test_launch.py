"""TorchX launch components, through the real ``torchx`` CLI from the repository root: a local
2-process CPU smoke job that trains and writes its metrics, and the slurm / kubernetes (Volcano)
requests ``--dryrun`` shows for the GPU component."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml
from torchx.components.component_test_base import ComponentTestCase

from launch import components

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # torchx and torchrun of this venv
    "TORCHXCONFIG": str(ROOT / ".torchxconfig"),  # the repository's settings only (no ~/.torchxconfig)
}


def torchx(*args: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
    """Runs the torchx CLI; on timeout SIGTERMs it, and its local scheduler stops the job's processes."""
    with subprocess.Popen(["torchx", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            p.communicate(timeout=30)
            raise
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def dryrun(*args: str) -> str:
    """The scheduler request ``torchx run --dryrun ARGS`` prints."""
    p = torchx("run", "--dryrun", *args)
    assert p.returncode == 0, p.stderr
    return p.stdout.split("=== SCHEDULER REQUEST ===", 1)[1]


class ComponentsTest(ComponentTestCase):
    def test_train_validates(self) -> None:
        self.validate(components, "train")

    def test_smoke_validates(self) -> None:
        self.validate(components, "smoke")


def test_entry_point_registers_cafe_components_and_keeps_builtins() -> None:
    p = torchx("builtins")
    assert p.returncode == 0, p.stderr
    listed = {line.split(". ", 1)[1] for line in p.stdout.splitlines() if ". " in line}
    assert {"cafe.train", "cafe.smoke", "dist.ddp", "utils.echo"} <= listed


def test_smoke_runs_two_processes_locally_and_writes_metrics(tmp_path: Path) -> None:
    out, logs = tmp_path / "metrics.json", tmp_path / "logs"
    p = torchx("run", "-s", "local_cwd", "-cfg", f"log_dir={logs}", "cafe.smoke", "--out", str(out), timeout=110)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "Job finished: SUCCEEDED" in p.stderr
    (app_dir,) = (logs / "torchx").iterdir()
    assert (app_dir / "SUCCESS").exists()
    workers = sorted(d.name for d in app_dir.glob("torchelastic/train_dlrm/*/attempt_0/*"))
    assert workers == ["0", "1"]  # torchrun started 2 local ranks
    metrics = json.loads(out.read_text())
    assert metrics["world_size"] == 2 and metrics["method"] == "cafe" and metrics["train_batches"] == 4
    assert 0.0 <= metrics["auc"] <= 1.0


def sbatch_lines(request: str, prefix: str) -> List[str]:
    return [line for line in request.splitlines() if line.startswith(prefix)]


def test_slurm_dryrun_two_gpu_nodes() -> None:
    request = dryrun(
        "-s", "slurm", "cafe.train", "-j", "2x8", "--env", "NCCL_DEBUG=INFO", "--checkpoint_dir", "/ckpt",
        "--", "--compression-ratio", "1000",
    )
    groups = sbatch_lines(request, "#SBATCH --job-name")  # one heterogeneous group per node; --time from .torchxconfig
    assert groups == [
        f"#SBATCH --job-name=train_dlrm-{i} --requeue --time=04:00:00 --ntasks-per-node=1 --cpus-per-task=32 --mem=131072 --gpus-per-task=8"
        for i in range(2)
    ]
    assert "export TORCHX_MAX_RETRIES=1" in request  # [component:cafe.train] max_retries
    trainer = "-m examples.train_dlrm --compression-ratio 1000 --out cafe_metrics.json --checkpoint-dir /ckpt"
    for node in range(2):
        srun = next(line for line in request.splitlines() if f"train_dlrm-{node}.out" in line)
        assert "--export=ALL,NCCL_DEBUG=INFO," in srun
        assert "torchrun --rdzv_backend c10d --rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in srun
        assert "--nnodes 2 --nproc_per_node 8" in srun and trainer in srun


def test_slurm_dryrun_cpu_smoke_by_file_path() -> None:
    request = dryrun("-s", "slurm", "launch/components.py:smoke", "--", "--train-batches", "20")
    (group,) = sbatch_lines(request, "#SBATCH --job-name")
    assert group == "#SBATCH --job-name=train_dlrm-0 --requeue --time=04:00:00 --ntasks-per-node=1 --cpus-per-task=2 --mem=4096"
    assert "export TORCHX_MAX_RETRIES=0" in request
    (srun,) = [line for line in request.splitlines() if line.startswith("srun ")]
    assert "--export=ALL,CUDA_VISIBLE_DEVICES=," in srun  # gloo on CPU even on a GPU host
    assert "--rdzv_endpoint localhost:0" in srun and "--nnodes 1 --nproc_per_node 2" in srun
    assert "--max-cardinality 2000 --train-batches 20 --out cafe_smoke_metrics.json'" in srun


def test_kubernetes_dryrun_volcano_job_on_named_resources() -> None:
    request = dryrun(
        "--workspace", "", "-s", "kubernetes", "cafe.train", "-j", "2x8", "-h", "aws_p4d.24xlarge",
        "--max_retries", "2", "--env", "NCCL_DEBUG=INFO", "--mounts", "type=volume,src=cafe-data,dst=/data",
        "--out", "/data/metrics.json",
    )
    job: Dict[str, Any] = yaml.safe_load(request)
    assert job["kind"] == "Job" and job["spec"]["schedulerName"] == "volcano"
    assert job["spec"]["queue"] == "default" and job["spec"]["maxRetry"] == 2  # queue from .torchxconfig
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["traindlrm-0", "traindlrm-1"]
    rank0_hosts = ["TORCHX_RANK0_HOST", "VC_TRAINDLRM_0_HOSTS"]  # node 0 sees itself as localhost
    for task, rank0 in zip(tasks, rank0_hosts):
        assert task["maxRetry"] == 2 and {p["event"] for p in task["policies"]} == {"PodEvicted", "PodFailed"}
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        bash, dash_c, cmd = container["command"]
        assert (bash, dash_c) == ("bash", "-c")
        assert cmd.startswith(f"torchrun --rdzv_backend c10d --rdzv_endpoint ${{{rank0}:=localhost}}:29500 ")
        assert "--nnodes 2 --nproc_per_node 8" in cmd and cmd.endswith("-m examples.train_dlrm --out /data/metrics.json")
        assert container["image"] == "torchrec-cafe:latest"
        assert {"name": "NCCL_DEBUG", "value": "INFO"} in container["env"]
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8" and limits["cpu"] == "96000m" and limits["vpc.amazonaws.com/efa"] == "4"
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
        assert {"mountPath": "/data", "name": "mount-0", "readOnly": False} in container["volumeMounts"]
        assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "cafe-data"}} in pod["volumes"]
