"""Row-level access to a physical table's weights and optimizer state, for migrations.

A promotion copies the shared row(s) an ID trained so far into its new hot row. Where the rows
live depends on how the inner ``EmbeddingBagCollection`` runs:

- unsharded: an ``nn.EmbeddingBag`` weight, optimizer state in a plain torch optimizer;
- wrapped by ``DistributedModelParallel``: FBGEMM TBE shards whose ``split_embedding_weights()`` and
  ``split_optimizer_states()`` are live views (in-place writes reach the next forward and the fused
  optimizer's state dict).

Policy (documented in the README): the hot row's weights become the ID's embedding so far (the
sum of its two shared rows for a medium ID), and its optimizer state is *copied* from the ID's
first shared row, so a promoted ID keeps the step size it trained with.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn


def masked_row_write_(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor, mask: torch.Tensor) -> None:
    """``dst[index[i]] = src[i]`` for every i with ``mask[i]``, with fixed shapes (no host sync).

    ``mask`` must be a prefix (valid entries first). Masked entries repeat entry 0's write, or
    rewrite row 0 with itself when nothing is valid, so duplicate writes always agree.
    """
    if index.numel() == 0:
        return
    idx0 = torch.where(mask[0], index[0], torch.zeros_like(index[0]))
    val0 = torch.where(mask[0], src[0], dst[0])
    shape = (-1,) + (1,) * (src.dim() - 1)
    dst[torch.where(mask, index, idx0)] = torch.where(mask.view(shape), src, val0)


@dataclass
class RowShard:
    """One local block of a physical table: rows [row_offset, row_offset + num_rows)."""

    weight: torch.Tensor  # [num_rows, cols] view
    states: List[torch.Tensor]  # optimizer states, [num_rows] or [num_rows, cols] views
    row_offset: int
    num_rows: int


@torch.no_grad()
def migrate_rows(
    shards: List[RowShard],
    src: torch.Tensor,
    dst: torch.Tensor,
    mask: torch.Tensor,
    src2: Optional[torch.Tensor] = None,
    use_src2: Optional[torch.Tensor] = None,
) -> None:
    """Initialises rows ``dst[i]`` (where ``mask``) from ``src[i]`` (+ ``src2[i]`` where ``use_src2``).

    All indices are global physical rows [P] int64; every shard must hold all rows it is given
    (true for unsharded, table-wise and column-wise placements).
    """
    for shard in shards:
        lo = shard.row_offset
        w = shard.weight
        value = w[src - lo]
        if src2 is not None:
            value = value + use_src2.unsqueeze(1).to(value.dtype) * w[src2 - lo]
        masked_row_write_(w, dst - lo, value, mask)
        for state in shard.states:
            masked_row_write_(state, dst - lo, state[src - lo], mask)


def parameter_shards(weight: nn.Parameter, optimizer: Optional[torch.optim.Optimizer]) -> List[RowShard]:
    """The single shard of an unsharded table, with the row-shaped state of a torch optimizer."""
    states: List[torch.Tensor] = []
    if optimizer is not None:
        for value in optimizer.state.get(weight, {}).values():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == weight.shape[0]:
                states.append(value)
    return [RowShard(weight.data, states, 0, weight.shape[0])]


def tbe_shards(sharded_ebc: nn.Module, table: str) -> List[RowShard]:
    """Local shards of ``table`` in a ``ShardedEmbeddingBagCollection`` with fused (TBE) kernels."""
    shards: List[RowShard] = []
    for lookup in sharded_ebc._lookups:
        lookup = getattr(lookup, "module", lookup)  # unwrap DistributedDataParallel
        for emb in getattr(lookup, "_emb_modules", []):
            tbe = getattr(emb, "_emb_module", None)
            configs = emb._config.embedding_tables
            for k, cfg in enumerate(configs):
                if cfg.name != table:
                    continue
                if not hasattr(tbe, "split_embedding_weights"):
                    raise NotImplementedError(
                        f"table {table!r}: CAFE migrations need a fused (TBE) compute kernel, got "
                        f"{type(emb).__name__}"
                    )
                states = tbe.split_optimizer_states()[k] if _has_state(tbe) else []
                row_offset = cfg.local_metadata.shard_offsets[0] if cfg.local_metadata else 0
                shards.append(
                    RowShard(tbe.split_embedding_weights()[k], list(states), row_offset, cfg.local_rows)
                )
    return shards


def _has_state(tbe: nn.Module) -> bool:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return getattr(tbe, "optimizer", EmbOptimType.EXACT_SGD) not in (
        EmbOptimType.EXACT_SGD,
        EmbOptimType.NONE,
    )
