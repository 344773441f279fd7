"""TorchX launch components, through the real ``torchx`` CLI from the repository root: a local
2-process CPU smoke job that trains and writes its metrics, the same job restarted by torchrun from
its checkpoint after one of its workers is killed, and the slurm / kubernetes (Volcano) requests
``--dryrun`` shows for the GPU component."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
import yaml
from torchx.components.component_test_base import ComponentTestCase

from launch import components

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # torchx and torchrun of this venv
    "TORCHXCONFIG": str(ROOT / ".torchxconfig"),  # the repository's settings only (no ~/.torchxconfig)
}


def torchx(
    *args: str, timeout: float = 60, while_running: Optional[Callable[["subprocess.Popen[str]"], None]] = None
) -> "subprocess.CompletedProcess[str]":
    """Runs the torchx CLI, calling ``while_running(process)`` once it started; on a timeout or an
    error SIGTERMs it, and its local scheduler stops the job's processes."""
    with subprocess.Popen(["torchx", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            if while_running:
                while_running(p)
            stdout, stderr = p.communicate(timeout=timeout)
        except BaseException:
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


def test_entry_point_registers_cafe_components_and_keeps_builtins_as_they_are() -> None:
    from torchx.specs.finder import ModuleComponentsFinder

    p = torchx("builtins")
    assert p.returncode == 0, p.stderr
    listed = {line.split(". ", 1)[1] for line in p.stdout.splitlines() if ". " in line}
    # what torchx lists without any registered package (valid components of torchx.components)
    torchx_own = {c.name for c in ModuleComponentsFinder("torchx.components", "").find() if not c.validation_errors}
    assert listed == torchx_own | {"cafe.train", "cafe.smoke"}


def test_installed_as_torchrec_cafe_launch_not_a_top_level_launch_module() -> None:
    import configparser
    import importlib.metadata

    import setuptools

    dist = importlib.metadata.distribution("torchrec-cafe")
    (entry,) = [e for e in dist.entry_points if e.group == "torchx.components" and e.name == "cafe"]
    assert entry.value == "torchrec_cafe_launch.components"
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('launch') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/", env=ENV).returncode == 0  # nothing named launch
    # setup.cfg lists the packages explicitly (to map launch/): it must name every one on disk
    packages = set(setuptools.find_packages(str(ROOT), include=["torchrec_cafe*"])) | {"torchrec_cafe_launch"}
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert set(cfg["options"]["packages"].split()) == packages


@pytest.mark.parametrize("component", ["cafe.train", "cafe.smoke", "launch/components.py:train", "launch/components.py:smoke"])
def test_every_component_dry_runs_locally_on_a_host_without_gpus(component: str) -> None:
    request = dryrun("-s", "local_cwd", component)
    assert "examples.train_dlrm" in request


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


def torchrun_workers(marker: str) -> List[int]:
    """PIDs of the trainer processes (``python -u -m examples.train_dlrm``) that a torchrun agent
    started for a job whose command line holds ``marker`` (never the agent itself, nor another
    test's or user's processes)."""
    procs: Dict[int, "tuple[int, List[str]]"] = {}
    for d in (d for d in Path("/proc").iterdir() if d.name.isdigit()):
        try:
            argv = [a.decode() for a in (d / "cmdline").read_bytes().split(b"\0") if a]
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)"
        except (OSError, ValueError, IndexError):  # not a process, or it just exited
            continue
        procs[int(d.name)] = (ppid, argv)

    def is_torchrun(pid: int) -> bool:
        return any(Path(a).name == "torchrun" for a in procs.get(pid, (0, []))[1][:2])

    return sorted(
        pid
        for pid, (ppid, argv) in procs.items()
        if marker in " ".join(argv) and argv[1:4] == ["-u", "-m", "examples.train_dlrm"] and is_torchrun(ppid)
    )


def test_killed_worker_restarts_from_checkpoint_and_ends_as_uninterrupted(tmp_path: Path) -> None:
    """Elastic restart: ``--max_retries 1`` lets torchrun restart the workers after one is SIGKILLed
    mid-run (right after the first checkpoint); they resume from the latest checkpoint and the job
    succeeds with the metrics of an uninterrupted run with the same settings."""
    steps, every = 100, 10  # ~10 s of training on 2 busy cores: the kill lands ~90 steps before the end
    trainer = ["--", "--train-batches", str(steps), "--checkpoint-every", str(every), "--no-progress"]

    def smoke(run: str, *args: str, while_running: Optional[Callable[["subprocess.Popen[str]"], None]] = None) -> "tuple[Path, Dict[str, Any]]":
        out, logs = tmp_path / run / "metrics.json", tmp_path / run / "logs"
        p = torchx(
            "run", "-s", "local_cwd", "-cfg", f"log_dir={logs}", "cafe.smoke", "--out", str(out),
            "--checkpoint_dir", str(tmp_path / run / "ckpt"), *args, *trainer, timeout=120, while_running=while_running,
        )
        assert p.returncode == 0 and "Job finished: SUCCEEDED" in p.stderr, p.stderr[-4000:]
        (app_dir,) = (logs / "torchx").iterdir()
        return app_dir, json.loads(out.read_text())

    _, uninterrupted = smoke("a")
    assert uninterrupted["resumed_from"] is None and uninterrupted["steps"] == steps

    killed: Dict[str, Any] = {}

    def kill_one_worker_after_first_checkpoint(job: "subprocess.Popen[str]") -> None:
        first = tmp_path / "b" / "ckpt" / f"step-{every:08d}" / "cafe_manifest.json"
        deadline = time.monotonic() + 90
        while not first.exists():
            assert job.poll() is None and time.monotonic() < deadline, "the job wrote no checkpoint"
            time.sleep(0.05)
        workers = torchrun_workers(str(tmp_path / "b"))
        assert len(workers) == 2, workers
        assert not (tmp_path / "b" / "metrics.json").exists()  # the run is not over
        os.kill(workers[1], signal.SIGKILL)  # raises if it already exited
        killed.update(pid=workers[1], checkpoints=sorted(p.name for p in first.parent.parent.glob("step-*")))

    app_dir, restarted = smoke("b", "--max_retries", "1", while_running=kill_one_worker_after_first_checkpoint)
    assert killed, "no worker was killed"
    agent_log = (app_dir / "train_dlrm" / "0" / "stderr.log").read_text()
    assert "failed (exitcode: -9) local_rank: " in agent_log and f"(pid: {killed['pid']})" in agent_log
    (elastic_dir,) = app_dir.glob("torchelastic/train_dlrm/*")
    attempts = sorted(d.relative_to(elastic_dir).as_posix() for d in elastic_dir.glob("attempt_*/*"))
    assert attempts == ["attempt_0/0", "attempt_0/1", "attempt_1/0", "attempt_1/1"]  # torchrun restarted both ranks
    resumed = Path(restarted["resumed_from"] or "")
    assert resumed.parent == tmp_path / "b" / "ckpt" and resumed.name in killed["checkpoints"]
    assert int(resumed.name.split("-")[1]) < steps  # resumed mid-run, from a checkpoint there before the kill
    assert f'"resumed_from": "{resumed}"' in (elastic_dir / "attempt_1" / "0" / "stdout.log").read_text()
    run_dependent = {"samples_per_s", "wall_s", "resumed_from", "checkpoint_dir"}
    assert {k: v for k, v in restarted.items() if k not in run_dependent} == {k: v for k, v in uninterrupted.items() if k not in run_dependent}


def test_local_cwd_dryrun_smoke_restarts_workers_from_checkpoint() -> None:
    """local_cwd has no retries of its own: ``max_retries`` reaches torchrun as ``PET_MAX_RESTARTS``."""
    request = ast.literal_eval(dryrun("-s", "local_cwd", "cafe.smoke", "--max_retries", "1", "--checkpoint_dir", "/ckpt"))
    (replica,) = request["role_params"]["train_dlrm"]
    assert replica["env"]["PET_MAX_RESTARTS"] == "1" and replica["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert replica["args"][2].endswith("--out cafe_smoke_metrics.json --checkpoint-dir /ckpt")


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
        # max_retries also restarts the workers in place (torchrun), on a fresh store per restart
        assert "--export=ALL,NCCL_DEBUG=INFO,PET_MAX_RESTARTS=1,TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1," in srun
        assert "torchrun --rdzv_backend c10d --rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in srun
        assert "--nnodes 2 --nproc_per_node 8" in srun and trainer in srun


def test_slurm_dryrun_cpu_smoke_by_file_path() -> None:
    request = dryrun("-s", "slurm", "launch/components.py:smoke", "--", "--train-batches", "20")
    (group,) = sbatch_lines(request, "#SBATCH --job-name")
    assert group == "#SBATCH --job-name=train_dlrm-0 --requeue --time=04:00:00 --ntasks-per-node=1 --cpus-per-task=2 --mem=4096"
    assert "export TORCHX_MAX_RETRIES=0" in request
    (srun,) = [line for line in request.splitlines() if line.startswith("srun ")]
    # gloo on CPU even on a GPU host; no restarts by default
    assert "--export=ALL,CUDA_VISIBLE_DEVICES=,PET_MAX_RESTARTS=0,TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1," in srun
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
        assert {"name": "PET_MAX_RESTARTS", "value": "2"} in container["env"]  # torchrun restarts too
        limits = container["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8" and limits["cpu"] == "96000m" and limits["vpc.amazonaws.com/efa"] == "4"
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
        assert {"mountPath": "/data", "name": "mount-0", "readOnly": False} in container["volumeMounts"]
        assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "cafe-data"}} in pod["volumes"]
