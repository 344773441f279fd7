"""HotSketch: a bucketed SpaceSaving sketch that finds the hot IDs of one table, on any device.

Layout (all persistent buffers, shapes independent of world size):

- ``slot_ids``    int64   [K + 1, c]  tracked ID per slot.
- ``slot_scores`` float32 [K + 1, c]  score per slot, in *stored units* (see lazy decay).
- ``slot_hot``    int32   [K + 1, c]  -2 empty slot, -1 tracked but cold, >= 0 hot index.
- ``hot_slot``    int64   [H + 1]     flat slot (bucket * c + slot) owning hot index h, -1 if free.
- ``hot_free_since`` int64 [H + 1]    update in which hot index h was last freed (quarantine).
- scalars: ``step`` (updates applied), ``scale`` (lazy-decay factor), ``mass_since_decay``,
  ``promotions``, ``demotions``, ``dropped_mass``.

Bucket K and hot index H are sentinels that absorb masked writes, so every scatter of an update has
a fixed shape and the update needs no host synchronisation (no boolean indexing, no ``.item()``).

Batch semantics (the invariant): ``update(ids, scores)`` is a pure function of the *multiset* of
(id, score) pairs. Scores are quantised to multiples of 2**-16 and summed as integers, so
aggregation is exact and associative: shuffled batches, per-rank pre-aggregation and any reduction
order give bit-identical state. Per update:

1. aggregate: unique IDs and their summed (quantised) scores; non-finite or negative scores are
   dropped (counted in ``rejected``), never inserted;
2. IDs already tracked add their score;
3. newcomers, per bucket, ordered by (score desc, id asc): the first ones fill the empty slots
   (lowest slot first); if newcomers remain, the first remaining one takes over the lowest-score
   non-hot slot (lowest slot index on ties) with ``score_min + sum of all remaining newcomers'
   scores`` (SpaceSaving: mass is kept and scores over-estimate). If every slot is hot the mass is
   dropped (``dropped_mass``): hot slots are never taken over;
4. promotions: tracked, non-hot IDs of this update with score >= threshold, ordered by (score
   desc, id asc), take the lowest free hot indices; a hot index freed in update t is free again
   from update t + quarantine + 1;
5. decay: once the mass inserted since the last decay exceeds ``decay_mass``
   (official: 10 * K * threshold), all scores are multiplied by ``decay``; hot IDs that fall below
   threshold are demoted and free their hot index.

Decay is lazy (CAFE+): instead of scanning all slots, ``scale`` is divided by ``decay`` and new
mass is inserted multiplied by ``scale``, so ``stored = real * scale``. Only the H hot slots are
checked for demotion; stored values are renormalised rarely, in one scan, before they could
overflow.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from torchrec_cafe.sketch.hashing import hash_mod

EMPTY = -2
COLD = -1
_Q = 1 << 16  # score quantum: scores are multiples of 2**-16
_MAX_SCORE = float(1 << 40)  # a single occurrence's score is clamped here before quantising
_RENORM_AT = float(1 << 40)  # renormalise stored scores once scale exceeds this
_RENORM_CHECK_EVERY = 256  # updates between (host-synchronising) renormalisation checks
_BUCKET_SEED = 0x5EED


@dataclass
class SketchUpdate:
    """What one update changed, as fixed-shape tensors (no host sync needed to build it).

    ``promoted_ids`` / ``promoted_hot`` [N]: promoted IDs and their new hot index, valid where
    ``promoted`` is True; valid entries come first. ``demoted`` [H] bool: hot indices freed by
    this update. ``accepted_mass`` 0-dim float64: score mass inserted.
    """

    promoted_ids: torch.Tensor
    promoted_hot: torch.Tensor
    promoted: torch.Tensor
    demoted: torch.Tensor
    accepted_mass: torch.Tensor


def _first_in_segment(keys: torch.Tensor) -> torch.Tensor:
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    return first


def _rank_in_segment(keys: torch.Tensor) -> torch.Tensor:
    """Position of each element within its run of equal ``keys`` (keys sorted)."""
    pos = torch.arange(keys.numel(), device=keys.device)
    start = torch.where(_first_in_segment(keys), pos, torch.zeros_like(pos))
    return pos - torch.cummax(start, dim=0).values


def _segment_last(keys: torch.Tensor) -> torch.Tensor:
    """Index of the last element of each element's run of equal ``keys`` (keys sorted)."""
    n = keys.numel()
    pos = torch.arange(n, device=keys.device)
    last = torch.ones_like(keys, dtype=torch.bool)
    last[:-1] = keys[:-1] != keys[1:]
    end = torch.where(last, pos, torch.full_like(pos, n))
    return torch.flip(torch.cummin(torch.flip(end, [0]), dim=0).values, [0])


def _first_in_row(mask: torch.Tensor) -> torch.Tensor:
    """Column of the first True per row of a [N, c] mask (0 where none)."""
    return mask.to(torch.int8).argmax(dim=1)


class HotSketch(nn.Module):
    """Device-resident HotSketch of one table: ``K`` buckets x ``c`` slots and ``H`` hot indices.

    Args:
        num_buckets: K (official CAFE: K = H).
        num_hot: H, the number of hot rows the sketch may hand out.
        threshold: score at which a tracked ID is promoted (and below which a hot ID is demoted
            after a decay).
        slots_per_bucket: c (official: 4).
        decay: multiplier applied to every score at each decay event, in (0, 1]; 1 disables decay.
        decay_mass: inserted score mass that triggers a decay; default
            ``10 * K * max(threshold, 1)`` (official: ``10 * K * threshold``; the floor keeps a
            zero threshold from decaying at every update).
        quarantine: updates a freed hot index waits before it is handed out again (pipelined
            training remaps a batch before the previous update lands).
        device: where the buffers live; all work happens there.
    """

    def __init__(
        self,
        num_buckets: int,
        num_hot: int,
        threshold: float,
        slots_per_bucket: int = 4,
        decay: float = 0.99,
        decay_mass: Optional[float] = None,
        quarantine: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if num_buckets < 1 or num_hot < 1 or slots_per_bucket < 1:
            raise ValueError(
                f"num_buckets, num_hot and slots_per_bucket must be >= 1, got "
                f"{num_buckets}, {num_hot}, {slots_per_bucket}"
            )
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if quarantine < 0:
            raise ValueError(f"quarantine must be >= 0, got {quarantine}")
        self.num_buckets = num_buckets
        self.num_hot = num_hot
        self.slots_per_bucket = slots_per_bucket
        self.threshold = float(threshold)
        self.decay = float(decay)
        self.decay_mass = float(
            decay_mass if decay_mass is not None else 10.0 * num_buckets * max(threshold, 1.0)
        )
        self.quarantine = quarantine
        k, c, h = num_buckets, slots_per_bucket, num_hot
        kw = {"device": device}
        self.register_buffer("slot_ids", torch.zeros(k + 1, c, dtype=torch.int64, **kw))
        self.register_buffer("slot_scores", torch.zeros(k + 1, c, dtype=torch.float32, **kw))
        self.register_buffer("slot_hot", torch.full((k + 1, c), EMPTY, dtype=torch.int32, **kw))
        self.register_buffer("hot_slot", torch.full((h + 1,), -1, dtype=torch.int64, **kw))
        self.register_buffer(
            "hot_free_since", torch.full((h + 1,), -(1 << 62), dtype=torch.int64, **kw)
        )
        for name, dtype, value in (
            ("step", torch.int64, 0),
            ("scale", torch.float64, 1.0),
            ("mass_since_decay", torch.float64, 0.0),
            ("promotions", torch.int64, 0),
            ("demotions", torch.int64, 0),
            ("rejected", torch.int64, 0),
            ("dropped_mass", torch.float64, 0.0),
        ):
            self.register_buffer(name, torch.tensor(value, dtype=dtype, **kw))
        self._updates_since_renorm_check = 0

    # ------------------------------------------------------------------ accounting

    @staticmethod
    def state_bytes(num_buckets: int, num_hot: int, slots_per_bucket: int = 4) -> int:
        """Exact bytes of all sketch buffers (sentinels and scalars included)."""
        slot = 8 + 4 + 4  # id, score, hot index
        return (num_buckets + 1) * slots_per_bucket * slot + (num_hot + 1) * 16 + 7 * 8

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # ------------------------------------------------------------------ queries

    def bucket_of(self, ids: torch.Tensor) -> torch.Tensor:
        return hash_mod(ids, _BUCKET_SEED, self.num_buckets)

    def _probe(self, ids: torch.Tensor) -> torch.Tensor:
        """Flat slot index holding each id, or -1 if untracked. [N] int64."""
        b = self.bucket_of(ids)
        match = (self.slot_ids[b] == ids.unsqueeze(1)) & (self.slot_hot[b] != EMPTY)
        flat = b * self.slots_per_bucket + _first_in_row(match)
        return torch.where(match.any(dim=1), flat, torch.full_like(flat, -1))

    def query(self, ids: torch.Tensor) -> torch.Tensor:
        """Hot index of each id, or -1. ``ids`` int64 [N] -> int64 [N]."""
        return self.lookup(ids)[0]

    def lookup(self, ids: torch.Tensor, level: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
        """One probe: (hot index or -1 [N] int64, tracked with real score >= ``level`` [N] bool)."""
        flat = self._probe(ids)
        safe = flat.clamp(min=0)
        hot = self.slot_hot.view(-1)[safe].to(torch.int64)
        tracked = flat >= 0
        hot = torch.where(tracked & (hot >= 0), hot, torch.full_like(hot, -1))
        return hot, tracked & (self.slot_scores.view(-1)[safe] >= self._stored(level))

    def query_scores(self, ids: torch.Tensor) -> torch.Tensor:
        """Real (decayed) score of each id, 0 for untracked ids. [N] float32."""
        flat = self._probe(ids)
        s = self.slot_scores.view(-1)[flat.clamp(min=0)]
        return torch.where(flat >= 0, s / self.scale.to(s.dtype), torch.zeros_like(s))

    def _stored(self, real: float) -> torch.Tensor:
        return (self.scale * real).to(torch.float32)

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, ids: torch.Tensor, scores: torch.Tensor) -> SketchUpdate:
        """Applies one batch of (id, score) occurrences; see the module docstring.

        Args:
            ids: int64 [N], any values.
            scores: float [N], non-negative; non-finite or negative entries are dropped.
        """
        if ids.dim() != 1 or scores.shape != ids.shape:
            raise ValueError(
                f"ids and scores must be 1-D of equal length, got {tuple(ids.shape)} and "
                f"{tuple(scores.shape)}"
            )
        if ids.dtype != torch.int64:
            raise ValueError(f"ids must be int64, got {ids.dtype}")
        ids = ids.to(self.slot_ids.device)
        scores = scores.to(self.slot_ids.device, torch.float64)
        uid, uq, valid = self._aggregate(ids, scores)
        self._add_present(uid, uq, valid)
        self._insert_newcomers(uid, uq, valid)
        promoted_ids, promoted_hot, promoted = self._promote(uid, valid)
        accepted = uq.sum().to(torch.float64) / _Q
        demoted = self._decay_and_demote(accepted)
        self.step += 1
        self._maybe_renormalise()
        return SketchUpdate(promoted_ids, promoted_hot, promoted, demoted, accepted)

    def _aggregate(
        self, ids: torch.Tensor, scores: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unique ids (ascending, padded) with exact integer score sums. All [N]."""
        ok = torch.isfinite(scores) & (scores >= 0)
        self.rejected += (~ok).sum()
        q = torch.where(ok, scores.clamp(max=_MAX_SCORE) * _Q, torch.zeros_like(scores))
        q = torch.round(q).to(torch.int64)
        sid, perm = torch.sort(ids)
        q, ok = q[perm], ok[perm]
        seg = torch.cumsum(_first_in_segment(sid), 0) - 1
        n = ids.numel()
        uq = torch.zeros(n, dtype=torch.int64, device=ids.device).index_add_(0, seg, q)
        any_ok = torch.zeros(n, dtype=torch.int64, device=ids.device).index_add_(0, seg, ok.long())
        uid = torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_(0, seg, sid)
        valid = any_ok > 0  # padding positions have count 0
        return uid, torch.where(valid, uq, torch.zeros_like(uq)), valid

    def _to_stored(self, q: torch.Tensor) -> torch.Tensor:
        return (q.to(torch.float64) / _Q * self.scale).to(torch.float32)

    def _add_present(self, uid: torch.Tensor, uq: torch.Tensor, valid: torch.Tensor) -> None:
        flat = self._probe(uid)
        present = valid & (flat >= 0)
        # Unique ids own distinct slots; masked entries add 0 to the sentinel bucket.
        target = torch.where(present, flat, torch.full_like(flat, self._trash_slot))
        inc = torch.where(present, self._to_stored(uq), torch.zeros(1, device=uq.device))
        self.slot_scores.view(-1).index_put_((target,), inc, accumulate=True)

    @property
    def _trash_slot(self) -> int:
        return self.num_buckets * self.slots_per_bucket

    def _insert_newcomers(self, uid: torch.Tensor, uq: torch.Tensor, valid: torch.Tensor) -> None:
        k, c = self.num_buckets, self.slots_per_bucket
        new = valid & (self._probe(uid) < 0)
        bucket = torch.where(new, self.bucket_of(uid), torch.full_like(uid, k))
        # Order by (bucket asc, score desc, id asc): uid is already ascending, sorts are stable.
        order = torch.sort(uq, descending=True, stable=True).indices
        order = order[torch.sort(bucket[order], stable=True).indices]
        b, q, sid = bucket[order], uq[order], uid[order]
        is_new = b < k
        rank = _rank_in_segment(b)
        empty = self.slot_hot[b] == EMPTY  # sentinel bucket K is never written as occupied
        n_empty = empty.sum(dim=1)
        fill = is_new & (rank < n_empty)
        nth_empty = empty & (torch.cumsum(empty.to(torch.int64), dim=1) == (rank + 1).unsqueeze(1))
        fill_slot = torch.where(fill, b * c + _first_in_row(nth_empty), self._trash_slot)
        self._write_slots(fill_slot, sid, self._to_stored(q), COLD)

        # The first newcomer that found no empty slot takes over the bucket's weakest cold slot
        # with the mass of every newcomer left over in that bucket.
        win = is_new & (rank == n_empty)
        csum = torch.cumsum(q, 0)
        rest = csum[_segment_last(b)] - csum + q
        stored = self.slot_scores[b]
        cold = self.slot_hot[b] == COLD
        masked = torch.where(cold, stored, torch.full_like(stored, float("inf")))
        low = masked.min(dim=1).values
        can = win & cold.any(dim=1)
        low_slot = b * c + _first_in_row(masked == low.unsqueeze(1))
        take = torch.where(can, low_slot, self._trash_slot)
        self._write_slots(take, sid, low + self._to_stored(rest), COLD)
        lost = torch.where(win & ~can, rest, torch.zeros_like(rest)).sum()
        self.dropped_mass += lost.to(torch.float64) / _Q

    def _write_slots(
        self, flat: torch.Tensor, ids: torch.Tensor, stored: torch.Tensor, state: int
    ) -> None:
        """Writes (id, score, state) at flat slots; the trash slot is reset after the write."""
        self.slot_ids.view(-1)[flat] = ids
        self.slot_scores.view(-1)[flat] = stored
        self.slot_hot.view(-1)[flat] = state
        self._clear_sentinels()

    def _clear_sentinels(self) -> None:
        self.slot_ids[-1].zero_()
        self.slot_scores[-1].zero_()
        self.slot_hot[-1].fill_(EMPTY)

    def _promote(
        self, uid: torch.Tensor, valid: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.num_hot
        flat = self._probe(uid)
        safe = flat.clamp(min=0)
        stored = self.slot_scores.view(-1)[safe]
        cand = (
            valid
            & (flat >= 0)
            & (self.slot_hot.view(-1)[safe] == COLD)
            & (stored >= self._stored(self.threshold))
        )
        # Candidates first, by (score desc, id asc); uid is ascending and the sorts are stable.
        key = torch.where(cand, stored, torch.full_like(stored, -1.0))
        order = torch.sort(key, descending=True, stable=True).indices
        order = order[torch.sort((~cand[order]).to(torch.int8), stable=True).indices]
        cand, flat, ids = cand[order], flat[order], uid[order]

        free = (self.hot_slot < 0) & (self.hot_free_since + self.quarantine < self.step)
        free[h] = False
        free_rank = torch.cumsum(free.to(torch.int64), 0) - 1
        free_list = torch.full((h + 2,), h, dtype=torch.int64, device=uid.device)
        free_list.scatter_(0, torch.where(free, free_rank, h + 1), torch.arange(h + 1, device=uid.device))
        cand_rank = torch.cumsum(cand.to(torch.int64), 0) - 1
        promoted = cand & (cand_rank < free.sum())
        hot = torch.where(promoted, free_list[cand_rank.clamp(0, h)], torch.full_like(flat, h))

        slot = torch.where(promoted, flat, self._trash_slot)
        self.slot_hot.view(-1)[slot] = hot.to(torch.int32)
        self._clear_sentinels()
        self.hot_slot[hot] = slot
        self.hot_slot[h] = -1
        self.promotions += promoted.sum()
        return ids, hot, promoted

    def _decay_and_demote(self, accepted: torch.Tensor) -> torch.Tensor:
        self.mass_since_decay += accepted
        due = self.mass_since_decay > self.decay_mass
        self.scale.copy_(torch.where(due, self.scale / self.decay, self.scale))
        self.mass_since_decay.copy_(torch.where(due, torch.zeros_like(accepted), self.mass_since_decay))
        owner = self.hot_slot[: self.num_hot]
        score = self.slot_scores.view(-1)[owner.clamp(min=0)]
        demoted = (owner >= 0) & (score < self._stored(self.threshold))
        slot = torch.where(demoted, owner, self._trash_slot)
        self.slot_hot.view(-1)[slot] = COLD
        self._clear_sentinels()
        self.hot_slot[: self.num_hot] = torch.where(demoted, -1, owner)
        self.hot_free_since[: self.num_hot] = torch.where(
            demoted, self.step, self.hot_free_since[: self.num_hot]
        )
        self.demotions += demoted.sum()
        return demoted

    def _maybe_renormalise(self) -> None:
        # The only host sync of the sketch, once every _RENORM_CHECK_EVERY updates.
        self._updates_since_renorm_check += 1
        if self._updates_since_renorm_check < _RENORM_CHECK_EVERY:
            return
        self._updates_since_renorm_check = 0
        if float(self.scale) > _RENORM_AT:
            self.slot_scores.copy_((self.slot_scores.to(torch.float64) / self.scale).float())
            self.scale.fill_(1.0)

    # ------------------------------------------------------------------ introspection

    def hot_ids(self) -> torch.Tensor:
        """ID owning each hot index, -1 where free. int64 [H] (ids equal to -1 are ambiguous)."""
        owner = self.hot_slot[: self.num_hot]
        ids = self.slot_ids.view(-1)[owner.clamp(min=0)]
        return torch.where(owner >= 0, ids, torch.full_like(ids, -1))

    def stats(self) -> Dict[str, int]:
        return {
            "tracked_ids": int((self.slot_hot[:-1] != EMPTY).sum()),
            "hot_ids": int((self.hot_slot[:-1] >= 0).sum()),
            "free_hot": int((self.hot_slot[:-1] < 0).sum()),
            "promotions": int(self.promotions),
            "demotions": int(self.demotions),
            "rejected_scores": int(self.rejected),
            "updates": int(self.step),
        }

    def total_mass(self) -> torch.Tensor:
        """Sum of real scores over all slots (float64, 0-dim)."""
        return self.slot_scores[:-1].to(torch.float64).sum() / self.scale

