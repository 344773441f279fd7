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
    length_per_key: Optional[List[int]] = None,
) -> KeyedJaggedTensor:
    """A KJT of new values/lengths/weights with the batch layout of ``like``: its stride, or, for a
    variable-batch KJT, its ``stride_per_key_per_rank`` and the given ``inverse_indices`` (by input
    feature name, which ``KJT.permute`` drops and TorchRec's EBC needs to expand to the full batch).
    ``length_per_key`` (the new lengths' sum per key, when the caller knows it) fills the KJT's
    per-key caches, so TorchRec's lookup and input dist do not read the lengths back (a host sync
    on accelerators)."""
    offset_per_key: Optional[List[int]] = None
    if length_per_key is not None:
        offsets: List[int] = [0]
        for n in length_per_key:
            offsets.append(offsets[-1] + n)
        offset_per_key = offsets
    variable = like.variable_stride_per_key()
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=lengths,
        weights=weights,
        stride=None if variable else like.stride(),
        stride_per_key_per_rank=like.stride_per_key_per_rank() if variable else None,
        inverse_indices=inverse_indices if variable else None,
        length_per_key=length_per_key,
        offset_per_key=offset_per_key,
    )


def with_values(like: KeyedJaggedTensor, values: torch.Tensor, weights: Optional[torch.Tensor]) -> KeyedJaggedTensor:
    """``like`` with new values and weights, one per value: same keys, lengths and batch layout,
    and its per-key caches when it has them (the lengths are the same, so are their sums)."""
    return kjt_like(
        like, like.keys(), values, like.lengths(), weights, like.inverse_indices_or_none(), like.length_per_key_or_none()
    )


def bags_per_key(kjt: KeyedJaggedTensor) -> torch.Tensor:
    """Bags (samples) of each key, [keys] int64 on CPU: the stride, or a variable-batch KJT's
    per-key strides. TorchScript-able."""
    if kjt.variable_stride_per_key():
        return torch.tensor(kjt.stride_per_key(), dtype=torch.int64)
    return torch.full([len(kjt.keys())], kjt.stride(), dtype=torch.int64)


def bag_keys(kjt: KeyedJaggedTensor, device: torch.device) -> torch.Tensor:
    """The key index of each bag, [bags] int64 in key-major order: from the batch layout (host
    metadata), without reading the lengths."""
    per_key = kjt.stride_per_key() if kjt.variable_stride_per_key() else [kjt.stride()] * len(kjt.keys())
    counts = torch.tensor(per_key, dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(per_key), device=device), counts, output_size=sum(per_key))


def value_bags(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """The bag of each of a KJT's ``n`` values, [n] int64, from its ``lengths`` (``n`` is their
    sum, known on the host as the values' size: no host read). TorchScript-able."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=n)
