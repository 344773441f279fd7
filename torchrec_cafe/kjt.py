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
