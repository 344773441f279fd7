"""Deterministic 64-bit integer hashing on tensors.

Every rank, device and process must map an ID to the same bucket and shared row, so the hash is a
fixed integer mix (splitmix64's finaliser) rather than Python's salted ``hash``. torch has no
unsigned 64-bit arithmetic: multiplications wrap in two's complement (the same bits as uint64) and
right shifts are arithmetic, so logical shifts are emulated with a mask.
"""

import torch

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_POSITIVE = (1 << 63) - 1


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _as_int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= (1 << 63) else v


def mix64(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Hashes int64 ``x`` (any values, negative included) to non-negative int64, elementwise."""
    return finalise64(x.to(torch.int64) + seed_offset(seed))


def seed_offset(seed: int) -> int:
    """The int64 that ``mix64(x, seed)`` adds to ``x`` before the finaliser."""
    return _as_int64((seed + 1) * _GOLDEN)


def finalise64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, masked to non-negative. TorchScript-able: it has neither big ints nor
    globals, so ``_M1``, ``_M2``, ``_POSITIVE`` and the shift masks are literals (tested equal)."""
    z = (z ^ ((z >> 30) & 17179869183)) * -4658895280553007687
    z = (z ^ ((z >> 27) & 137438953471)) * -7723592293110705685
    z = z ^ ((z >> 31) & 8589934591)
    return z & 9223372036854775807


def hash_mod(x: torch.Tensor, seed: int, n: int) -> torch.Tensor:
    """Maps int64 ids to ``[0, n)`` with the seeded mix; same shape as ``x``."""
    return torch.remainder(mix64(x, seed), n)
