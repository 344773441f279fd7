"""Sequential pure-Python reference of HotSketch's batch semantics (tests only), for one table.

Written from the semantics in ``torchrec_cafe/sketch/hot_sketch.py``'s module docstring, not from
its tensor code. Scores are Python floats (float64) in *real* units and decay is eager (every score
and the table mass are multiplied at each decay event), so what it shares with the implementation
is only the hashing: ``fingerprint32`` (id -> key), the bucket of a key and its pool choices.
A slot is ``None`` (empty) or ``[key, score, state]`` with state -1 cold, p >= 0 hot (owns choice p).
"""

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

from torchrec_cafe.sketch.hashing import fingerprint32
from torchrec_cafe.sketch.hot_sketch import MIN_LOAD, POOL_CHOICES, pool_choices

Q = 1 << 16  # score quantum 2**-16
MAX_SCORE = float(1 << 24)  # per-occurrence clamp, as in hot_sketch.py
COLD = -1


def key_of(ids: Sequence[int]) -> List[int]:
    return fingerprint32(torch.tensor(list(ids), dtype=torch.int64)).tolist()


class RefSketch:
    def __init__(
        self,
        num_buckets: int,
        pool_rows: int,
        threshold: Optional[float] = None,
        slots_per_bucket: int = 4,
        decay: float = 0.99,
        decay_mass: Optional[float] = None,
        quarantine: int = 0,
        promote_load: float = 1.0,
        demote_load: float = 0.5,
        displace_ratio: float = 0.0,
        max_promotions: int = 0,
        bucket_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        self.K, self.P, self.c = num_buckets, pool_rows, slots_per_bucket
        self.threshold, self.decay, self.quarantine = threshold, float(decay), quarantine
        self.promote_load, self.demote_load = float(promote_load), float(demote_load)
        self.displace_ratio = float(displace_ratio)
        self.max_promotions = max_promotions
        default_mass = 10.0 * num_buckets * (max(threshold, 1.0) if threshold is not None else slots_per_bucket)
        self.decay_mass = float(decay_mass if decay_mass is not None else default_mass)
        self.bucket_of = bucket_of
        self.buckets: List[List[Optional[list]]] = [[None] * self.c for _ in range(self.K)]
        self.where: Dict[int, tuple] = {}  # tracked key -> (bucket, slot)
        self.pool: List[int] = [0] * self.P  # 0 free, 1 owned, -q quarantined
        self.mass = 0.0  # real, eagerly decayed
        self.t = 0  # number of updates applied so far (= number of the next update)
        self.mass_since_decay_q = 0  # integer quanta
        self.dropped_q = 0
        self.promotions = self.demotions = self.rejected = self.decays = self.displacements = 0
        self.last_promoted: List[tuple] = []  # (key, id, src row, src blocked, dst row) of the last update, in order
        self.last_demoted: List[int] = []  # pool rows freed by the last update
        self.last_mass_q = 0  # quanta accepted by the last update

    # ---------------------------------------------------------------- helpers

    def slot(self, key: int) -> list:
        b, i = self.where[key]
        return self.buckets[b][i]

    def score(self, key: int) -> float:
        return self.slot(key)[1] if key in self.where else 0.0

    def guaranteed(self, key: int) -> float:
        """Score minus the lowest other score of the key's bucket (0 if the bucket has an empty slot)."""
        b, i = self.where[key]
        slots = self.buckets[b]
        others = [s[1] for j, s in enumerate(slots) if j != i and s is not None]
        floor = 0.0 if any(s is None for s in slots) or not others else min(others)
        return slots[i][1] - floor

    def choices(self, key: int) -> List[int]:
        k = torch.tensor([key], dtype=torch.int64)
        return pool_choices(k, torch.tensor([self.P])).squeeze(0).tolist()

    def bars(self) -> "tuple[float, float]":
        if self.threshold is not None:
            return self.threshold, self.threshold
        load = max(self.mass / self.P, MIN_LOAD)
        return self.promote_load * load, self.demote_load * load

    def reads(self, key: int) -> "tuple[int, bool, bool]":
        """(pool row, hot, blocked) of a key, as ``HotSketch.lookup``."""
        rows = self.choices(key)
        if key in self.where and self.slot(key)[2] >= 0:
            return rows[self.slot(key)[2]], True, False
        free = [r for r in rows if self.pool[r] != 1]
        return (free[0], False, False) if free else (rows[0], False, True)

    # ---------------------------------------------------------------- one update

    def update(self, ids: Sequence[int], scores: Sequence[float]) -> None:
        # 1. aggregate exact integer quanta per key (and its smallest id); bad scores are counted
        # and skipped.
        agg: Dict[int, int] = {}
        rep: Dict[int, int] = {}
        for x, i, s in zip(key_of(ids) if len(ids) else [], ids, scores):
            rep[x] = min(rep.get(x, int(i)), int(i))
            s = float(s)
            if not math.isfinite(s) or s < 0:
                self.rejected += 1
                continue
            agg[x] = agg.get(x, 0) + round(min(s, MAX_SCORE) * Q)
        self.update_keys(agg, rep)

    def update_keys(self, agg: Dict[int, int], rep: Dict[int, int]) -> None:
        uniq = list(agg)
        bucket = dict(zip(uniq, self.bucket_of(torch.tensor(uniq, dtype=torch.int64)).tolist())) if uniq else {}

        # 2. tracked keys add their score; the others are this bucket's newcomers.
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

        # 4. mass, then an eager decay once the mass since the last decay exceeds decay_mass.
        accepted = self.last_mass_q = sum(agg.values())
        self.mass += accepted / Q
        self.mass_since_decay_q += accepted
        if self.mass_since_decay_q / Q > self.decay_mass:
            for slots in self.buckets:
                for s in slots:
                    if s is not None:
                        s[1] *= self.decay
            self.mass *= self.decay
            self.mass_since_decay_q = 0
            self.decays += 1

        # 5. promotion: candidates (guaranteed score >= bar) in (guaranteed desc, key asc) order claim free choices in rounds.
        promote_bar, demote_bar = self.bars()
        cands = [x for x in agg if x in self.where and self.slot(x)[2] == COLD and self.guaranteed(x) >= promote_bar]
        cands.sort(key=lambda x: (-self.guaranteed(x), x))
        if self.max_promotions:  # the rest wait for a later update (and do not displace)
            cands = cands[: self.max_promotions]
        src = {x: self.reads(x) for x in cands}
        placed: Dict[int, int] = {}
        for p in range(POOL_CHOICES):
            for x in cands:
                row = self.choices(x)[p]
                if x not in placed and self.pool[row] == 0:
                    self.pool[row] = 1
                    self.slot(x)[2] = p
                    placed[x] = row
        self.last_promoted = [(x, rep[x], src[x][0], src[x][2], placed[x]) for x in cands if x in placed]
        self.promotions += len(placed)

        # 6. quarantine countdown; 7. demotion below the demotion bar.
        self.pool = [s + 1 if s < 0 else s for s in self.pool]
        self.last_demoted = []
        for slots in self.buckets:
            for s in slots:
                if s is not None and s[2] >= 0 and s[1] < demote_bar:
                    row = self.choices(s[0])[s[2]]
                    self.pool[row] = -self.quarantine
                    s[2] = COLD
                    self.last_demoted.append(row)
                    self.demotions += 1
        # 8. displacement: unplaced candidates, in order, demote the weakest owner of their choices.
        if self.displace_ratio > 0:
            owner = {self.choices(s[0])[s[2]]: s for slots in self.buckets for s in slots if s is not None and s[2] >= 0}
            for x in cands:
                if x in placed:
                    continue
                owned = [(owner[r][1], p, r) for p, r in enumerate(self.choices(x)) if r in owner]
                if not owned:
                    continue
                weakest, _, row = min(owned)
                if self.guaranteed(x) > self.displace_ratio * weakest:
                    owner.pop(row)[2] = COLD
                    self.pool[row] = -self.quarantine
                    self.last_demoted.append(row)
                    self.demotions += 1
                    self.displacements += 1
        self.last_demoted.sort()
        self.t += 1

    # ---------------------------------------------------------------- views for the tests

    def hot_keys(self) -> List[int]:
        return sorted(s[0] for slots in self.buckets for s in slots if s is not None and s[2] >= 0)

    def total_mass(self) -> float:
        return sum(s[1] for slots in self.buckets for s in slots if s is not None)
