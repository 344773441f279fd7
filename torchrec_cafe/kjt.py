"""KJT plumbing shared by the remap and the modules (the lowest layer next to the sketch)."""

from typing import List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def kjt_like(
    like: KeyedJaggedTensor,
    keys: List[str],
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: Optional[torch.Tensor],
    inverse_indices: Optional[Tuple[List[str], torch.Tensor]] = None,
) -> KeyedJaggedTensor:
    """A KJT of new values/lengths/weights with the batch layout of ``like``: its stride, or, for a
    variable-batch KJT, its ``stride_per_key_per_rank`` and the given ``inverse_indices`` (by input
    feature name, which ``KJT.permute`` drops and TorchRec's EBC needs to expand to the full batch)."""
    if like.variable_stride_per_key():
        return KeyedJaggedTensor(
            keys=keys,
            values=values,
            lengths=lengths,
            weights=weights,
            stride_per_key_per_rank=like.stride_per_key_per_rank(),
            inverse_indices=inverse_indices,
        )
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights, stride=like.stride())


def bags_per_key(kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Bags (samples) of each key, [keys] int64 on CPU: the stride, or a variable-batch KJT's
    per-key strides. TorchScript-able."""
    if kjt.variable_stride_per_key():
        return torch.tensor(kjt.stride_per_key(), dtype=torch.int64)
    return torch.full([len(kjt.keys())], kjt.stride(), dtype=torch.int64)


def value_bags(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """The bag of each of a KJT's ``n`` values, [n] int64, from its ``lengths`` (``n`` is their
    sum, known on the host as the values' size: no host read). TorchScript-able."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=n)
