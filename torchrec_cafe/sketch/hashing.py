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


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in ``[0, 2**32)``: a bijection
    of that range (products wrap in int64 but only their low 32 bits are kept, which wrapping does
    not change). ``fmix32(0) == 0``. TorchScript-able (the mask 2**32 - 1 is a literal)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 4294967295
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 4294967295
    return x ^ (x >> 16)


def fingerprint32(ids: torch.Tensor) -> torch.Tensor:
    """32-bit key of each int64 id, as int64 in ``[0, 2**32)``: ``fmix32(low ^ fmix32(high))``.

    Distinct for distinct ids in ``[0, 2**32)`` (there ``high == 0`` and ``fmix32`` is a bijection),
    so a sketch keyed by it is exact for every table of up to 4.29 billion rows; larger or negative
    ids fold their high half in and may share a key, like any hashed id. TorchScript-able.
    """
    ids = ids.to(torch.int64)
    return fmix32((ids & 4294967295) ^ fmix32((ids >> 32) & 4294967295))
