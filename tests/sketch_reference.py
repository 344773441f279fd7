"""Sequential pure-Python reference of HotSketch's batch semantics (tests only).

Written from the semantics in ``torchrec_cafe/sketch/hot_sketch.py``'s module docstring, not from
its tensor code. Scores are Python floats (float64) in *real* units and decay is eager (every score
is multiplied at each decay event), so the only thing shared with the implementation is the bucket
hash. A slot is ``None`` (empty) or ``[id, score, hot]`` with ``hot == -1`` for a cold slot.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

from torchrec_cafe.sketch.hashing import hash_mod

Q = 1 << 16  # score quantum 2**-16
MAX_SCORE = float(1 << 24)  # per-occurrence clamp, as in hot_sketch.py
COLD = -1


def default_bucket_of(num_buckets: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda ids: hash_mod(ids, 0x5EED, num_buckets)


class RefSketch:
    def __init__(
        self,
        num_buckets: int,
        num_hot: int,
        threshold: float,
        slots_per_bucket: int = 4,
        decay: float = 0.99,
        decay_mass: Optional[float] = None,
        quarantine: int = 0,
        displace_ratio: float = 4.0,
        bucket_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.K, self.H, self.c = num_buckets, num_hot, slots_per_bucket
        self.threshold, self.decay, self.quarantine = float(threshold), float(decay), quarantine
        self.displace_ratio = float(displace_ratio)
        self.decay_mass = float(
            decay_mass if decay_mass is not None else 10.0 * num_buckets * max(threshold, 1.0)
        )
        self.bucket_of = bucket_of or default_bucket_of(num_buckets)
        self.buckets: List[List[Optional[list]]] = [[None] * self.c for _ in range(self.K)]
        self.where: Dict[int, tuple] = {}  # tracked id -> (bucket, slot)
        self.hot_owner: List[Optional[int]] = [None] * self.H  # hot index -> id
        self.freed_at: List[Optional[int]] = [None] * self.H  # hot index -> update it was freed in
        self.t = 0  # number of updates applied so far (= number of the next update)
        self.mass_since_decay_q = 0  # integer quanta
        self.inserted_q = self.dropped_q = 0
        self.promotions = self.demotions = self.rejected = self.decays = 0
        self.last_promoted: List[tuple] = []  # (id, hot index) of the last update, in order
        self.last_demoted: List[int] = []  # hot indices freed by the last update
        self.last_mass_q = 0  # quanta accepted by the last update

    def slot(self, x: int) -> list:
        b, i = self.where[x]
        return self.buckets[b][i]

    def score(self, x: int) -> float:
        return self.slot(x)[1] if x in self.where else 0.0

    def update(self, ids: Sequence[int], scores: Sequence[float]) -> None:
        # 1. aggregate exact integer quanta per id; bad scores are counted and skipped.
        agg: Dict[int, int] = {}
        for x, s in zip(ids, scores):
            s = float(s)
            if not math.isfinite(s) or s < 0:
                self.rejected += 1
                continue
            agg[int(x)] = agg.get(int(x), 0) + round(min(s, MAX_SCORE) * Q)
        uniq = list(agg)
        bucket = dict(zip(uniq, self.bucket_of(torch.tensor(uniq, dtype=torch.int64)).tolist()))

        # 2. tracked ids add their score; the others are this bucket's newcomers.
        newcomers: Dict[int, List[int]] = {}
        for x, q in agg.items():
            if x in self.where:
                self.slot(x)[1] += q / Q
            else:
                newcomers.setdefault(bucket[x], []).append(x)

        # 3. per bucket: fill empty slots, then one takeover of the weakest cold slot.
        for b, xs in newcomers.items():
            xs.sort(key=lambda x: (-agg[x], x))
            slots = self.buckets[b]
            empty = [i for i, s in enumerate(slots) if s is None]
            for x, i in zip(xs, empty):
                slots[i] = [x, agg[x] / Q, COLD]
                self.where[x] = (b, i)
            rest = xs[len(empty):]
            if not rest:
                continue
            mass = sum(agg[x] for x in rest)
            cold = [i for i, s in enumerate(slots) if s[2] == COLD]
            if not cold:
                self.dropped_q += mass
                continue
            i = min(cold, key=lambda i: (slots[i][1], i))
            del self.where[slots[i][0]]
            slots[i] = [rest[0], slots[i][1] + mass / Q, COLD]
            self.where[rest[0]] = (b, i)

        # 4. promotions of this update's tracked cold ids into the lowest free hot indices.
        cands = [
            x for x in agg
            if x in self.where and self.slot(x)[2] == COLD and self.slot(x)[1] >= self.threshold
        ]
        cands.sort(key=lambda x: (-self.slot(x)[1], x))
        free = [
            h for h in range(self.H)
            if self.hot_owner[h] is None
            and (self.freed_at[h] is None or self.freed_at[h] + self.quarantine < self.t)
        ]
        self.last_promoted = list(zip(cands, free))
        for x, h in self.last_promoted:
            self.slot(x)[2] = h
            self.hot_owner[h] = x
            self.promotions += 1

        # 4b. waiting candidates (strongest first) displace hot ids (weakest first) they outscore.
        displaced = []
        if self.displace_ratio > 0:
            held = sorted((self.slot(x)[1], h) for h, x in enumerate(self.hot_owner) if x is not None)
            for x, (score, h) in zip(cands[len(free):], held):
                if self.slot(x)[1] > self.displace_ratio * score:
                    displaced.append(h)
        for h in displaced:
            self.slot(self.hot_owner[h])[2] = COLD
            self.hot_owner[h] = None
            self.freed_at[h] = self.t
            self.demotions += 1

        # 5. eager decay once the mass since the last decay exceeds decay_mass, then demotions.
        mass = self.last_mass_q = sum(agg.values())
        self.inserted_q += mass
        self.mass_since_decay_q += mass
        if self.mass_since_decay_q / Q > self.decay_mass:
            for slots in self.buckets:
                for s in slots:
                    if s is not None:
                        s[1] *= self.decay
            self.mass_since_decay_q = 0
            self.decays += 1
        self.last_demoted = displaced
        for h, x in enumerate(self.hot_owner):
            if x is not None and self.slot(x)[1] < self.threshold:
                self.last_demoted.append(h)
                self.slot(x)[2] = COLD
                self.hot_owner[h] = None
                self.freed_at[h] = self.t
                self.demotions += 1
        self.last_demoted.sort()
        self.t += 1

    # ---------------------------------------------------------------- views for the tests

    def hot_ids(self) -> List[int]:
        return [-1 if x is None else x for x in self.hot_owner]

    def hot_of(self, x: int) -> int:
        return self.slot(x)[2] if x in self.where else -1

    def total_mass(self) -> float:
        return sum(s[1] for slots in self.buckets for s in slots if s is not None)
