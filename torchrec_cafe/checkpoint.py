"""Distributed checkpoints of models holding CAFE modules: atomic, verified, reshardable.

A checkpoint is a directory written by ``torch.distributed.checkpoint`` (DCP) with
``{"model": model.state_dict(), "optim": optimizer.state_dict()}``, plus ``cafe_manifest.json``,
written last, holding every CAFE module's description (tables, budgets, ``CafeConfig``), the size
and SHA-256 of every file, and the caller's ``extra`` (e.g. the step). Tables (and fused optimizer
state) are ShardedTensors, the sketch is replicated plain tensors whose shapes do not depend on the
world size, so a checkpoint saved on N ranks loads on M ranks under another plan.

Invariants:
    * ``save`` is atomic: everything goes to ``<path>.partial`` and is renamed to ``path`` once the
      manifest is on disk; a directory without a manifest is never loaded.
    * ``load`` verifies every file and the module descriptions *before* touching the model, so a
      corrupted, truncated or mismatched checkpoint is refused and the model is left as it was.
    * ``save`` first applies the scores stashed since the last sketch update (as the next training
      forward would), so resuming continues exactly; with ``update_interval > 1`` this is exact
      when saving at a multiple of the interval, otherwise the partial interval lands early, and
      with ``pipeline_depth > 0`` the held-back steps' scores land early too (a resumed run then
      continues as the run that saved, which differs from one that never saved by that timing).

Example::

    path = save(checkpoint_path(root, step), dmp, optimizer, extra={"step": step})
    ...
    extra = load(latest(root), dmp, optimizer)  # any world size, any plan
"""

import hashlib
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.state_dict import _init_optim_state
from torchrec.optim.keyed import KeyedOptimizer

from torchrec_cafe.distributed.base import ShardedCafeBase
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection

MANIFEST = "cafe_manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
T = TypeVar("T")


def cafe_modules(model: nn.Module) -> List[CafeEmbeddingBagCollection]:
    """The CAFE modules of ``model`` (for sharded ones, their CAFE logic: of a partitioned one, its
    first partition on this rank, alike on every rank), each once, in module order."""
    found: Dict[int, CafeEmbeddingBagCollection] = {}
    for m in model.modules():
        cafe = m.partitions[0] if isinstance(m, ShardedCafeBase) else m
        if isinstance(cafe, CafeEmbeddingBagCollection):
            found.setdefault(id(cafe), cafe)
    return list(found.values())


def checkpoint_path(root: str, step: int) -> str:
    """``<root>/step-<step, 8 digits>``: the names ``latest`` orders."""
    return os.path.join(root, f"step-{step:08d}")


def latest(root: str) -> Optional[str]:
    """The complete checkpoint (manifest present) with the highest step under ``root``, or None."""
    if not os.path.isdir(root):
        return None
    steps = [
        (int(m.group(1)), name)
        for name in os.listdir(root)
        for m in [_STEP_DIR.match(name)]
        if m and os.path.isfile(os.path.join(root, name, MANIFEST))
    ]
    return os.path.join(root, max(steps)[1]) if steps else None


def save(
    path: str,
    model: nn.Module,
    optimizer: Optional[Any] = None,
    extra: Optional[Mapping[str, Any]] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> str:
    """Collective: saves ``model`` (and ``optimizer``'s state) to the new directory ``path``.

    Args:
        path: directory to create; must not exist.
        model: a ``DistributedModelParallel`` or any module (unsharded models save from one process).
        optimizer: anything with ``state_dict``/``load_state_dict`` (torch optimizer,
            ``KeyedOptimizer``, ``CombinedOptimizer``, ``dmp.fused_optimizer``), or a dict of them
            (e.g. ``{"sparse": dmp.fused_optimizer, "dense": dense_optimizer}``).
        extra: JSON-able values returned by ``load`` (e.g. ``{"step": 1000}``).

    Returns ``path``. Raises ``FileExistsError`` if ``path`` exists, ``RuntimeError`` if the sketch
    replicas differ between ranks (they must be identical; DCP keeps one copy).
    """
    path = os.fspath(path)
    partial = path + ".partial"

    def prepare() -> None:
        if os.path.exists(path):
            raise FileExistsError(f"checkpoint {path!r} already exists; checkpoints are never overwritten")
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that died
        os.makedirs(partial)

    _on_rank0(prepare, process_group)
    cafes = cafe_modules(model)
    for cafe in cafes:
        cafe.apply_pending_updates()
    _check_replicas(cafes, process_group)
    state = _state(model, optimizer)
    dcp.save(
        state,
        storage_writer=FileSystemWriter(partial),
        planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True),
        process_group=process_group,
        no_dist=not _distributed(process_group),
    )
    _barrier(process_group)  # every rank's files are written

    def finish() -> None:
        manifest = {
            "format_version": FORMAT_VERSION,
            "world_size": dist.get_world_size(process_group) if _distributed(process_group) else 1,
            "modules": [cafe.describe() for cafe in cafes],
            "prefixes": _prefixes(list(state["model"]), cafes),
            "extra": dict(extra or {}),
            "files": {name: _file_digest(os.path.join(partial, name)) for name in sorted(os.listdir(partial))},
        }
        _write_json(os.path.join(partial, MANIFEST), manifest)
        os.replace(partial, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))

    _on_rank0(finish, process_group)
    return path


def load(
    path: str,
    model: nn.Module,
    optimizer: Optional[Any] = None,
    process_group: Optional[dist.ProcessGroup] = None,
) -> Dict[str, Any]:
    """Collective: loads a checkpoint written by ``save`` into ``model`` (and ``optimizer``).

    Any world size and plan: ShardedTensors are resharded by DCP, the replicated sketch is read
    whole by every rank. Returns the ``extra`` given to ``save``.

    Raises ``ValueError`` on every rank, naming the problem, before the model or optimizer is
    touched, when ``path`` is not a complete checkpoint, a file is missing, truncated or corrupted,
    or the model's CAFE tables or settings differ from the checkpoint's (rank 0 checks; ranks whose
    settings differ from rank 0's are refused at the first sketch update).
    """
    path = os.fspath(path)
    cafes = cafe_modules(model)
    described = [cafe.describe() for cafe in cafes]

    def check() -> Dict[str, Any]:
        manifest = verified_manifest(path)
        _check_descriptions(manifest["modules"], described, path)
        return manifest

    manifest = _on_rank0(check, process_group)
    for opt in _optimizers(optimizer).values():
        if isinstance(opt, torch.optim.Optimizer) and not isinstance(opt, KeyedOptimizer):
            _init_optim_state(opt)  # lazily created state (momentum, Adam) must exist to be loaded into
    state = _state(model, optimizer)
    dcp.load(
        state,
        storage_reader=FileSystemReader(path),
        planner=CheckpointLoadPlanner(),
        process_group=process_group,
        no_dist=not _distributed(process_group),
    )
    model.load_state_dict(state["model"])
    if isinstance(optimizer, Mapping):
        for name, opt in optimizer.items():
            opt.load_state_dict(state["optim"][name])
    elif optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    for cafe in cafes:
        cafe.discard_pending()
    return manifest["extra"]


def verified_manifest(path: str) -> Dict[str, Any]:
    """The manifest of a complete checkpoint whose files all match it (sizes and SHA-256).

    Raises ``ValueError`` naming the problem otherwise."""
    manifest = _read_manifest(path)
    _verify_files(path, manifest["files"])
    return manifest


class CheckpointLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner without its guess that a checkpoint holding keys this rank lacks
    was written before torch 2.4: under a table-wise plan a rank's state dict has only its own
    tables (and their fused optimizer state), and the guess re-flattens it the old way and fails
    (``Missing key in checkpoint state_dict: optim.dense.param_groups``). Every key the state dict
    asks for must still be in the checkpoint."""

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None  # set by set_up_planner before any plan
        return create_default_local_load_plan(self.state_dict, self.metadata, not self.allow_partial_load)


# ---------------------------------------------------------------------- helpers


def _optimizers(optimizer: Optional[Any]) -> Dict[str, Any]:
    if optimizer is None:
        return {}
    return dict(optimizer) if isinstance(optimizer, Mapping) else {"": optimizer}


def _on_rank0(fn: Callable[[], T], process_group: Optional[dist.ProcessGroup]) -> T:
    """Runs ``fn`` on rank 0 only; every rank returns its result or raises its error, so no rank is
    left waiting in a collective when one check or file operation fails."""
    outcome: List[Any] = [None]
    if _rank(process_group) == 0:
        try:
            outcome = [(True, fn())]
        except (OSError, ValueError, RuntimeError) as e:
            outcome = [(False, e)]
    if _distributed(process_group):
        dist.broadcast_object_list(outcome, group=process_group, group_src=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _state(model: nn.Module, optimizer: Optional[Any]) -> Dict[str, Any]:
    state: Dict[str, Any] = {"model": model.state_dict()}
    if isinstance(optimizer, Mapping):
        state["optim"] = {name: opt.state_dict() for name, opt in optimizer.items()}
    elif optimizer is not None:
        state["optim"] = optimizer.state_dict()
    return state


def _prefixes(keys: List[str], cafes: List[CafeEmbeddingBagCollection]) -> List[str]:
    """State-dict prefix of each CAFE module (``""`` for the model itself), in module order: where
    ``inference.load_for_inference`` finds a module's tensors without rebuilding the model."""
    out, taken = [], set()
    for cafe in cafes:
        suffix = f"_embedding_bag_collection.embedding_bags.{cafe._layouts[0].config.name}.weight"
        key = next((k for k in keys if k.endswith(suffix) and k not in taken), None)
        if key is None:
            raise RuntimeError(f"no state-dict entry ends with {suffix!r}: cannot locate a CAFE module's tables")
        taken.add(key)
        out.append(key[: -len(suffix)])
    return out


def _distributed(process_group: Optional[dist.ProcessGroup]) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _rank(process_group: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(process_group) if _distributed(process_group) else 0


def _barrier(process_group: Optional[dist.ProcessGroup]) -> None:
    if _distributed(process_group):
        dist.barrier(group=process_group)


@torch.no_grad()
def _check_replicas(cafes: List[CafeEmbeddingBagCollection], process_group: Optional[dist.ProcessGroup]) -> None:
    """DCP saves one rank's copy of replicated tensors: refuse to save diverged sketches (a
    partitioned module's sketches are each rank's own)."""
    if not _distributed(process_group) or not cafes:
        return
    sums = []
    for cafe in cafes:
        if cafe._sketch is None or cafe.is_partition:
            continue
        for _, buf in sorted(cafe._sketch.state_dict().items()):
            raw = buf.detach().reshape(-1).contiguous().view(torch.uint8).to(torch.int64)  # the bytes, any dtype
            weights = torch.arange(raw.numel(), device=raw.device) % 65521 + 1  # order-sensitive
            sums.append((raw * weights).sum())
    if not sums:
        return
    mine = torch.stack(sums)
    both = torch.stack([mine, -mine])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=process_group)
    if not (torch.equal(both[0], mine) and torch.equal(-both[1], mine)):
        raise RuntimeError("sketch replicas differ between ranks: refusing to save a checkpoint of diverged state")


def _file_digest(path: str) -> Dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(path: str) -> Dict[str, Any]:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{path!r} is not a complete torchrec_cafe checkpoint: {MANIFEST} is missing (an interrupted save?)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path!r}: {MANIFEST} is unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path!r}: unsupported manifest (format_version {FORMAT_VERSION} expected)")
    for key in ("files", "modules", "extra"):
        if key not in manifest:
            raise ValueError(f"checkpoint {path!r}: {MANIFEST} has no {key!r}")
    return manifest


def _verify_files(path: str, files: Mapping[str, Mapping[str, Any]]) -> None:
    for name, expected in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"checkpoint {path!r}: file {name!r} is missing")
        size = os.path.getsize(file)
        if size != expected["bytes"]:
            raise ValueError(f"checkpoint {path!r}: file {name!r} has {size} bytes, {expected['bytes']} were saved (truncated?)")
        if _file_digest(file)["sha256"] != expected["sha256"]:
            raise ValueError(f"checkpoint {path!r}: file {name!r} is corrupted (SHA-256 differs from the manifest)")


def _check_descriptions(saved: List[List[Dict[str, Any]]], current: List[List[Dict[str, Any]]], path: str) -> None:
    """Names the first difference between the checkpoint's CAFE modules and the model's."""
    if len(saved) != len(current):
        raise ValueError(f"checkpoint {path!r} holds {len(saved)} CAFE modules, the model has {len(current)}")
    for m, (old, new) in enumerate(zip(saved, current)):
        old_names, new_names = [t["name"] for t in old], [t["name"] for t in new]
        if old_names != new_names:
            raise ValueError(f"checkpoint {path!r}: CAFE module {m} has tables {old_names}, the model has {new_names}")
        for o, n in zip(old, new):
            for key in list(o) + [k for k in n if k not in o]:  # description order: causes first
                a, b = o.get(key), n.get(key)
                if isinstance(a, dict) and isinstance(b, dict):
                    diff = [k for k in list(a) + [k for k in b if k not in a] if a.get(k) != b.get(k)]
                    if diff:
                        k = diff[0]
                        raise ValueError(f"checkpoint {path!r}: table {o['name']!r} has {key}.{k}={a.get(k)!r}, the model has {b.get(k)!r}")
                elif a != b:
                    raise ValueError(f"checkpoint {path!r}: table {o['name']!r} has {key}={a!r}, the model has {b!r}")
