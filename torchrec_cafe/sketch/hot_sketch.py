"""HotSketch: bucketed SpaceSaving sketches that find the hot IDs of T tables at once, on any device.

One HotSketch holds the sketches of T tables side by side, so a training step updates every table
with one batch of tensor ops instead of one per table. Table t owns buckets
``[bucket_offset[t], bucket_offset[t] + K_t)`` and hot indices ``[0, H_t)`` (stored globally at
``hot_offset[t] + h``); nothing is shared between tables. With T = 1 it is the plain sketch.

Layout (persistent buffers, shapes independent of world size):

- ``slot_ids``    int64   [sum K + 1, c]  tracked ID per slot.
- ``slot_scores`` float32 [sum K + 1, c]  score per slot, in *stored units* (see lazy decay).
- ``slot_hot``    int32   [sum K + 1, c]  -2 empty slot, -1 tracked but cold, >= 0 hot index.
- ``hot_slot``    int64   [sum H + 1]     flat slot (bucket * c + slot) owning a hot index, or -1.
- ``hot_free_since`` int64 [sum H + 1]    update in which the hot index was last freed.
- per table [T]: ``scale`` (lazy-decay factor), ``mass_since_decay``, ``promotions``,
  ``demotions``, ``rejected``, ``dropped_mass``; and ``step`` (updates applied).

The last bucket and the last hot index are sentinels that absorb masked writes, so every scatter
of an update has a fixed shape and an update needs no host synchronisation.

Batch semantics (the invariant): ``update(ids, scores, tables)`` is a pure function of the
*multiset* of (table, id, score) triples. Scores are quantised to multiples of 2**-16 and summed as
integers, so aggregation is exact and associative: shuffled batches, per-rank pre-aggregation and
any reduction order give bit-identical state. Per update and table:

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
4b. displacement: the candidates left waiting (no free index), strongest first, are paired with
   their table's hot IDs, weakest first (score asc, hot index asc); each pair whose candidate
   scores above ``displace_ratio`` x the hot ID's score demotes that hot ID (its index is freed in
   this update, so the candidates compete for it in a later one);
5. decay: once the mass inserted since the last decay exceeds ``decay_mass``
   (official: 10 * K * threshold), all scores are multiplied by ``decay``; hot IDs that fall below
   threshold are demoted and free their hot index.

Decay is lazy (CAFE+): instead of scanning all slots, ``scale`` is divided by ``decay`` and new
mass is inserted multiplied by ``scale``, so ``stored = real * scale``. Only the hot slots are
checked for demotion; stored values are renormalised rarely, in one scan, before they overflow.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from torchrec_cafe.sketch.hashing import mix64
from torchrec_cafe.sketch.ops import first_in_row, first_in_segment, lexsort, rank_in_segment, segment_last, take

EMPTY = -2
COLD = -1
_Q = 1 << 16  # score quantum: scores are multiples of 2**-16
# One occurrence's score is clamped to 2**24 (2**40 quanta), so int64 sums stay exact for batches
# of up to 2**23 maximal occurrences.
_MAX_SCORE = float(1 << 24)
# A table's stored scores are renormalised once its scale exceeds 2**40. Stored scores are float32
# (max ~2**127) and real scores stay far below 2**30, so scale may grow by 2**57 between two checks.
_RENORM_AT = float(1 << 40)
_RENORM_HEADROOM = 57 * math.log(2)
_RENORM_CHECK_MAX_INTERVAL = 256  # updates between (host-synchronising) renormalisation checks
_BUCKET_SEED = 0x5EED
_MAX_TABLES = (1 << 15) - 1  # table indices are stored as int16

PerTable = Union[int, float, Sequence[int], Sequence[float]]


@dataclass
class SketchUpdate:
    """What one update changed, as fixed-shape tensors (no host sync needed to build it).

    ``promoted_ids`` / ``promoted_tables`` / ``promoted_hot`` / ``prior_scores`` [N]: promoted
    IDs, their table, their new hot index (within the table) and their real score before this
    update (-1 if it was untracked), valid where ``promoted`` is True (valid entries come first, grouped by table).
    ``demoted`` [sum H] bool: hot indices freed by this update (global layout).
    ``accepted_mass`` 0-dim float64: score mass inserted.
    """

    promoted_ids: torch.Tensor
    promoted_tables: torch.Tensor
    promoted_hot: torch.Tensor
    prior_scores: torch.Tensor
    promoted: torch.Tensor
    demoted: torch.Tensor
    accepted_mass: torch.Tensor


def _per_table(value: PerTable, n: int, name: str) -> List[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} tables")
    return values


def _offsets(sizes: Sequence[int]) -> List[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _quantise(scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 scores -> (int64 quanta of 2**-16, 0 where invalid; valid mask)."""
    ok = torch.isfinite(scores) & (scores >= 0)
    q = torch.where(ok, scores.clamp(max=_MAX_SCORE) * _Q, torch.zeros_like(scores))
    return torch.round(q).to(torch.int64), ok



def _sync_host_step_after_load(module: "HotSketch", _incompatible: object) -> None:
    module._sync_host_step()  # a named function: modules with hooks must stay picklable

class HotSketch(nn.Module):
    """Device-resident HotSketches of T tables: ``K_t`` buckets x ``c`` slots, ``H_t`` hot indices.

    Args:
        num_buckets: K per table (an int for one table, or a sequence; paper: K = H).
        num_hot: H per table, the hot rows the sketch may hand out.
        threshold: score at which a tracked ID is promoted (and below which a hot ID is demoted
            after a decay); one value or one per table.
        slots_per_bucket: c (paper: 4), shared by all tables.
        decay: per-table multiplier applied to every score at each decay event, in (0, 1].
        decay_mass: inserted score mass that triggers a decay, per table; default
            ``10 * K * max(threshold, 1)`` (paper: ``10 * K * threshold``; the floor keeps a zero
            threshold from decaying at every update).
        quarantine: updates a freed hot index waits before it is handed out again (pipelined
            training remaps a batch before the previous update lands).
        displace_ratio: a full table frees the hot index of its weakest hot ID when a waiting
            candidate's score exceeds this multiple of that ID's score (step 4b); 0 never (the
            paper: a full hot set changes only by decay, so on stationary data it keeps the first
            IDs that crossed the threshold rather than the strongest).
        device: where the buffers live; all work happens there.
    """

    # True forces the accelerator code path (fixed shapes, no host reads) on CPU too; tests run
    # both paths. See host_reads_are_free.
    fixed_shapes: bool = False

    def __init__(
        self,
        num_buckets: Union[int, Sequence[int]],
        num_hot: Union[int, Sequence[int]],
        threshold: PerTable,
        slots_per_bucket: int = 4,
        decay: PerTable = 0.99,
        decay_mass: Optional[PerTable] = None,
        quarantine: int = 0,
        displace_ratio: float = 4.0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        ks = [int(k) for k in (num_buckets if isinstance(num_buckets, (list, tuple)) else [num_buckets])]
        t = len(ks)
        hs = [int(h) for h in _per_table(num_hot, t, "num_hot")]
        thresholds = [float(x) for x in _per_table(threshold, t, "threshold")]
        decays = [float(x) for x in _per_table(decay, t, "decay")]
        if t < 1 or min(ks) < 1 or min(hs) < 1 or slots_per_bucket < 1:
            raise ValueError(
                f"num_buckets, num_hot and slots_per_bucket must be >= 1, got {ks}, {hs}, {slots_per_bucket}"
            )
        if min(thresholds) < 0:
            raise ValueError(f"threshold must be >= 0, got {thresholds}")
        if not all(0 < d <= 1 for d in decays):
            raise ValueError(f"decay must be in (0, 1], got {decays}")
        if quarantine < 0:
            raise ValueError(f"quarantine must be >= 0, got {quarantine}")
        if not (displace_ratio >= 0 and math.isfinite(displace_ratio)):
            raise ValueError(f"displace_ratio must be a finite number >= 0, got {displace_ratio}")
        self.displace_ratio = float(displace_ratio)
        if decay_mass is None:
            masses = [10.0 * k * max(th, 1.0) for k, th in zip(ks, thresholds)]
        else:
            masses = [float(x) for x in _per_table(decay_mass, t, "decay_mass")]
        self.num_tables, self.slots_per_bucket, self.quarantine = t, slots_per_bucket, quarantine
        self.num_buckets_per_table, self.num_hot_per_table = ks, hs
        self.num_buckets, self.num_hot = sum(ks), sum(hs)
        self.thresholds, self.decays = thresholds, decays
        k, c, h = self.num_buckets, slots_per_bucket, self.num_hot
        kw = {"device": device}
        self.register_buffer("slot_ids", torch.zeros(k + 1, c, dtype=torch.int64, **kw))
        self.register_buffer("slot_scores", torch.zeros(k + 1, c, dtype=torch.float32, **kw))
        self.register_buffer("slot_hot", torch.full((k + 1, c), EMPTY, dtype=torch.int32, **kw))
        self.register_buffer("hot_slot", torch.full((h + 1,), -1, dtype=torch.int64, **kw))
        self.register_buffer("hot_free_since", torch.full((h + 1,), -(1 << 62), dtype=torch.int64, **kw))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, **kw))
        for name, dtype, value in (
            ("scale", torch.float64, 1.0),
            ("mass_since_decay", torch.float64, 0.0),
            ("promotions", torch.int64, 0),
            ("demotions", torch.int64, 0),
            ("rejected", torch.int64, 0),
            ("dropped_mass", torch.float64, 0.0),
        ):
            self.register_buffer(name, torch.full((t,), value, dtype=dtype, **kw))
        # Constants derived from the constructor arguments: not state, not saved.
        bucket_off, hot_off = _offsets(ks), _offsets(hs)
        for name, values, dtype in (
            ("_bucket_offset", bucket_off, torch.int64),
            ("_buckets", ks, torch.int64),
            ("_hot_offset", hot_off, torch.int64),
            ("_threshold", thresholds, torch.float64),
            ("_decay", decays, torch.float64),
            ("_decay_mass", masses, torch.float64),
        ):
            self.register_buffer(name, torch.tensor(values, dtype=dtype, **kw), persistent=False)
        if t > _MAX_TABLES:
            raise ValueError(f"a HotSketch holds at most {_MAX_TABLES} tables, got {t}")
        for name, sizes in (("_table_of_bucket", ks), ("_table_of_hot", hs)):
            # int16: 2 bytes per bucket / hot index, counted in table_state_bytes.
            index = torch.repeat_interleave(torch.arange(t + 1, dtype=torch.int16), torch.tensor(sizes + [1]))
            self.register_buffer(name, index.to(device), persistent=False)
        # A decay event happens at most once per update, so scale grows at most 1/decay per update.
        fastest = max(-math.log(d) for d in decays)
        self._renorm_interval = min(
            _RENORM_CHECK_MAX_INTERVAL, max(1, int(_RENORM_HEADROOM / fastest)) if fastest > 0 else _RENORM_CHECK_MAX_INTERVAL
        )
        # Host mirror of ``step`` so the renormalisation schedule needs no sync; restored on load.
        self._host_step = 0
        self.register_load_state_dict_post_hook(_sync_host_step_after_load)

    def _sync_host_step(self) -> None:
        self._host_step = int(self.step)

    # ------------------------------------------------------------------ accounting

    @staticmethod
    def table_state_bytes(num_buckets: int, num_hot: int, slots_per_bucket: int = 4) -> int:
        """Bytes one table owns: its slots (id 8 + score 4 + hot index 4), hot map (slot 8 +
        freed-at 8), the int16 table index of each bucket and hot index (2 + 2), six 8-byte
        counters and six 8-byte constants (offsets, sizes, threshold, decay, decay mass)."""
        return num_buckets * (slots_per_bucket * 16 + 2) + num_hot * (16 + 2) + 12 * 8

    @staticmethod
    def shared_state_bytes(slots_per_bucket: int = 4) -> int:
        """Bytes shared by all tables of a sketch: the sentinel bucket and hot index (and their
        table-index entries), ``step``, and the closing entries of the two offset arrays."""
        return slots_per_bucket * 16 + 2 + 16 + 2 + 8 + 2 * 8

    def nbytes(self) -> int:
        """Exact bytes of every buffer: the checkpointed state and the derived constants."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # ------------------------------------------------------------------ queries

    def _tables_like(self, ids: torch.Tensor, tables: Optional[torch.Tensor]) -> torch.Tensor:
        if tables is None:
            return torch.zeros_like(ids)
        if tables.shape != ids.shape:
            raise ValueError(f"tables must match ids' shape {tuple(ids.shape)}, got {tuple(tables.shape)}")
        return tables.to(ids.device, torch.int64)

    def bucket_of(self, ids: torch.Tensor, tables: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Global bucket of each (table, id). [N] int64."""
        tables = self._tables_like(ids, tables)
        return take(self._bucket_offset, tables) + torch.remainder(mix64(ids, _BUCKET_SEED), take(self._buckets, tables))

    def _probe(self, ids: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Flat slot index holding each (table, id), or -1 if untracked. [N] int64."""
        return self._probe_bucket(ids, tables)[0]

    def _probe_bucket(self, ids: torch.Tensor, tables: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(flat slot or -1, bucket) of each (table, id). [N] int64 each."""
        b = self.bucket_of(ids, tables)
        match = (take(self.slot_ids, b) == ids.unsqueeze(1)) & (take(self.slot_hot, b) != EMPTY)
        flat = b * self.slots_per_bucket + first_in_row(match)
        return torch.where(match.any(dim=1), flat, torch.full_like(flat, -1)), b

    def query(self, ids: torch.Tensor, tables: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hot index (within its table) of each id, or -1. int64 [N] -> int64 [N]."""
        return self.lookup(ids, tables)[0]

    def lookup(
        self, ids: torch.Tensor, tables: Optional[torch.Tensor] = None, level: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One probe: (hot index or -1 [N] int64, tracked with real score >= ``level[table]`` [N]).

        ``level`` is a [T] tensor of real scores (default 0: "tracked").
        """
        tables = self._tables_like(ids, tables)
        flat = self._probe(ids, tables)
        safe = flat.clamp(min=0)
        hot = take(self.slot_hot.view(-1), safe).to(torch.int64)
        tracked = flat >= 0
        hot = torch.where(tracked & (hot >= 0), hot, torch.full_like(hot, -1))
        if level is None:
            return hot, tracked
        return hot, tracked & (take(self.slot_scores.view(-1), safe) >= take(self._stored(level), tables))

    def query_scores(self, ids: torch.Tensor, tables: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Real (decayed) score of each id, 0 for untracked ids. [N] float32."""
        tables = self._tables_like(ids, tables)
        flat = self._probe(ids, tables)
        s = take(self.slot_scores.view(-1), flat.clamp(min=0))
        return torch.where(flat >= 0, s / take(self.scale, tables).to(s.dtype), torch.zeros_like(s))

    def _stored(self, real: torch.Tensor) -> torch.Tensor:
        """Real per-table scores [T] -> stored units [T] float32."""
        return (self.scale * real).to(torch.float32)

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(
        self, ids: torch.Tensor, scores: torch.Tensor, tables: Optional[torch.Tensor] = None
    ) -> SketchUpdate:
        """Applies one batch of (table, id, score) occurrences; see the module docstring.

        Args:
            ids: int64 [N], any values.
            scores: float [N], non-negative; non-finite or negative entries are dropped.
            tables: int [N] table of each occurrence, in [0, T); default all 0.
        """
        ids, tables = self._check(ids, scores, tables)
        q, ok = _quantise(scores.to(ids.device, torch.float64))
        self.rejected.index_add_(0, tables, (~ok).to(torch.int64))
        return self._update_pairs(*self._aggregate(ids, q, ok, tables))

    @torch.no_grad()
    def aggregate(
        self, ids: torch.Tensor, scores: torch.Tensor, tables: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact pre-aggregation of occurrences, to ship fewer bytes between ranks.

        Returns (ids [U], quanta [U] int64, tables [U], rejected [T]): the unique (table, id) pairs
        with at least one valid score, their summed scores in 2**-16 quanta, and the bad scores
        per table. ``update_quanta`` of the concatenation over ranks leaves the same state as
        ``update`` of all ranks' occurrences (integer sums are associative). No state changes.
        """
        ids, tables = self._check(ids, scores, tables)
        q, ok = _quantise(scores.to(ids.device, torch.float64))
        rejected = torch.zeros_like(self.rejected).index_add_(0, tables, (~ok).to(torch.int64))
        uid, utab, uq, valid, _ = self._aggregate(ids, q, ok, tables)
        keep = valid.nonzero().squeeze(1)  # variable length: the caller ships it anyway
        return take(uid, keep), take(uq, keep), take(utab, keep), rejected

    @torch.no_grad()
    def update_quanta(
        self, ids: torch.Tensor, quanta: torch.Tensor, tables: torch.Tensor, rejected: torch.Tensor
    ) -> SketchUpdate:
        """``update`` from (gathered) ``aggregate`` outputs: integer quanta, all valid."""
        ids, tables = self._check(ids, quanta, tables)
        self.rejected += rejected.to(self.rejected.device)
        quanta = quanta.to(ids.device, torch.int64)
        return self._update_pairs(*self._aggregate(ids, quanta, torch.ones_like(quanta, dtype=torch.bool), tables))

    def _check(
        self, ids: torch.Tensor, scores: torch.Tensor, tables: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if ids.dim() != 1 or scores.shape != ids.shape:
            raise ValueError(
                f"ids and scores must be 1-D of equal length, got {tuple(ids.shape)} and {tuple(scores.shape)}"
            )
        if ids.dtype != torch.int64:
            raise ValueError(f"ids must be int64, got {ids.dtype}")
        ids = ids.to(self.slot_ids.device)
        return ids, self._tables_like(ids, tables)

    def _update_pairs(
        self, uid: torch.Tensor, utab: torch.Tensor, uq: torch.Tensor, valid: torch.Tensor, num_unique: torch.Tensor
    ) -> SketchUpdate:
        if self.host_reads_are_free():
            n = int(num_unique)
            uid, utab, uq, valid = uid[:n], utab[:n], uq[:n], valid[:n]
        flat, bucket = self._probe_bucket(uid, utab)
        present = valid & (flat >= 0)
        prior = torch.where(present, take(self.slot_scores.view(-1), flat.clamp(min=0)).double(), 0.0)
        # Untracked IDs get -1 so that no level >= 0 counts them as having been medium.
        prior = torch.where(present, prior / take(self.scale, utab), -1.0).float()
        self._add_present(flat, present, utab, uq)
        written = self._insert_newcomers(valid & ~present, bucket, uid, utab, uq)
        order, promoted_hot, promoted, displaced = self._promote(uid, utab, valid, torch.where(present, flat, written))
        accepted = torch.zeros(self.num_tables, dtype=torch.int64, device=uid.device).index_add_(0, utab, uq)
        accepted = accepted.to(torch.float64) / _Q
        demoted = self._decay_and_demote(accepted) | displaced
        self.step += 1
        self._maybe_renormalise()
        return SketchUpdate(
            take(uid, order), take(utab, order), promoted_hot, take(prior, order), promoted, demoted, accepted.sum()
        )

    def host_reads_are_free(self) -> bool:
        """On CPU reading a scalar costs nothing, so an update trims padding and skips empty phases;
        on accelerators it keeps fixed shapes and never syncs. Both give the same state (tested)."""
        return self.slot_ids.device.type == "cpu" and not self.fixed_shapes

    def _aggregate(
        self, ids: torch.Tensor, q: torch.Tensor, ok: torch.Tensor, tables: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unique (table, id) pairs sorted by (table, id), padded to [N], with exact integer sums of
        the quanta ``q``, validity (a valid occurrence ``ok``), and the number of pairs (0-dim)."""
        order = lexsort(tables, ids, may_sync=self.host_reads_are_free())
        sid, stab, q, ok = (take(x, order) for x in (ids, tables, q, ok))
        seg = torch.cumsum(first_in_segment(stab, sid), 0) - 1
        n = ids.numel()
        zeros = torch.zeros(n, dtype=torch.int64, device=ids.device)
        uq = zeros.clone().index_add_(0, seg, q)
        any_ok = zeros.clone().index_add_(0, seg, ok.to(torch.int64))
        uid = zeros.clone().scatter_(0, seg, sid)
        utab = zeros.clone().scatter_(0, seg, stab)
        valid = any_ok > 0  # padding positions have count 0
        num_unique = seg[-1] + 1 if n else torch.zeros((), dtype=torch.int64, device=ids.device)
        return uid, utab, torch.where(valid, uq, torch.zeros_like(uq)), valid, num_unique

    def _to_stored(self, q: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return (q.to(torch.float64) / _Q * take(self.scale, tables)).to(torch.float32)

    @property
    def _trash_slot(self) -> int:
        return self.num_buckets * self.slots_per_bucket

    def _add_present(self, flat: torch.Tensor, present: torch.Tensor, utab: torch.Tensor, uq: torch.Tensor) -> None:
        # Unique pairs own distinct slots; masked entries add 0 to the sentinel bucket.
        target = torch.where(present, flat, torch.full_like(flat, self._trash_slot))
        inc = torch.where(present, self._to_stored(uq, utab), torch.zeros(1, device=uq.device))
        self.slot_scores.view(-1).index_add_(0, target, inc)

    def _insert_newcomers(
        self, new: torch.Tensor, bucket: torch.Tensor, uid: torch.Tensor, utab: torch.Tensor, uq: torch.Tensor
    ) -> torch.Tensor:
        """Inserts the ``new`` pairs; returns the flat slot each pair was written to, -1 if none. [N]"""
        k, c = self.num_buckets, self.slots_per_bucket
        keep = torch.arange(new.numel(), device=new.device)
        written = torch.full_like(uid, -1)
        if self.host_reads_are_free():
            keep = new.nonzero().squeeze(1)
            new, bucket, uid, utab, uq = (take(x, keep) for x in (new, bucket, uid, utab, uq))
        bucket = torch.where(new, bucket, torch.full_like(uid, k))
        # Order by (bucket asc, score desc, id asc): uid ascends within a table (a bucket belongs to
        # one table) and the sorts are stable.
        order = lexsort(bucket, uq, descending_minor=True, may_sync=self.host_reads_are_free())
        b, q, sid, tab = (take(x, order) for x in (bucket, uq, uid, utab))
        is_new = b < k
        rank = rank_in_segment(b)
        empty = take(self.slot_hot, b) == EMPTY  # the sentinel bucket is never left occupied
        n_empty = empty.sum(dim=1)
        fill = is_new & (rank < n_empty)
        nth_empty = empty & (torch.cumsum(empty.to(torch.int64), dim=1) == (rank + 1).unsqueeze(1))
        fill_slot = torch.where(fill, b * c + first_in_row(nth_empty), self._trash_slot)
        self._write_slots(fill_slot, sid, self._to_stored(q, tab))

        # The first newcomer that found no empty slot takes over the bucket's weakest cold slot
        # with the mass of every newcomer left over in that bucket.
        win = is_new & (rank == n_empty)
        csum = torch.cumsum(q, 0)
        rest = take(csum, segment_last(b)) - csum + q
        stored = take(self.slot_scores, b)
        cold = take(self.slot_hot, b) == COLD
        masked = torch.where(cold, stored, torch.full_like(stored, float("inf")))
        low = masked.amin(dim=1)
        can = win & cold.any(dim=1)
        low_slot = b * c + first_in_row(cold & (masked == low.unsqueeze(1)))
        taken = torch.where(can, low_slot, self._trash_slot)
        self._write_slots(taken, sid, low + self._to_stored(rest, tab))
        lost = torch.where(win & ~can, rest, torch.zeros_like(rest))
        self.dropped_mass += torch.zeros_like(self.promotions).index_add_(0, tab, lost).to(torch.float64) / _Q
        slot = torch.where(fill, fill_slot, torch.where(can, low_slot, -1))
        return written.index_copy_(0, take(keep, order), slot)

    def _write_slots(self, flat: torch.Tensor, ids: torch.Tensor, stored: torch.Tensor) -> None:
        """Writes (id, score, cold) at flat slots; the trash slot is reset after the write."""
        self.slot_ids.view(-1).index_copy_(0, flat, ids)
        self.slot_scores.view(-1).index_copy_(0, flat, stored)
        self.slot_hot.view(-1).index_fill_(0, flat, COLD)
        self._clear_sentinels()

    def _clear_sentinels(self) -> None:
        self.slot_ids[-1].zero_()
        self.slot_scores[-1].zero_()
        self.slot_hot[-1].fill_(EMPTY)

    def _promote(
        self, uid: torch.Tensor, utab: torch.Tensor, valid: torch.Tensor, written: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (positions of the unique pairs, candidates first, hot index within table,
        promoted): [N] each on the fixed-shape path, [number of candidates] on the CPU path; and
        the hot indices displacement freed [sum H].

        ``written`` [N]: the slot each pair held or was written to in this update (-1 if none). A
        later newcomer of the same update may have taken that slot over, hence the id check (it
        replaces a second probe of the buckets).
        """
        h, t = self.num_hot, self.num_tables
        safe = written.clamp(min=0)
        flat = written
        stored = take(self.slot_scores.view(-1), safe)
        cand = (
            valid
            & (written >= 0)
            & (take(self.slot_ids.view(-1), safe) == uid)
            & (take(self.slot_hot.view(-1), safe) == COLD)
            & (stored >= take(self._stored(self._threshold), utab))
        )
        index = torch.arange(cand.numel(), device=cand.device)
        if self.host_reads_are_free():
            index = cand.nonzero().squeeze(1)
            cand, flat, stored, utab = (take(x, index) for x in (cand, flat, stored, utab))
        # Candidates first, grouped by table, by (score desc, id asc) within a table: uid ascends
        # within a table and the sorts are stable.
        order = torch.sort(torch.where(cand, stored, torch.full_like(stored, -1.0)), descending=True, stable=True).indices
        group = torch.where(cand, utab, torch.full_like(utab, t))
        order = take(order, torch.sort(take(group, order), stable=True).indices)
        cand, flat, tab, group, index, stored = (take(x, order) for x in (cand, flat, utab, group, index, stored))
        cand_rank = rank_in_segment(group)

        # Free hot indices of each table, lowest first: free_list[hot_offset[t] + j] is table t's
        # j-th free index (global numbering).
        free = (self.hot_slot < 0) & (self.hot_free_since + self.quarantine < self.step)
        free[h] = False
        cum = torch.cumsum(free.to(torch.int64), 0)
        before = take(torch.cat([cum.new_zeros(1), cum]), self._hot_offset)  # free indices below each table
        n_free = before[1:] - before[:-1]
        table_of_hot = self._table_of_hot.clamp(max=t - 1).to(torch.int64)
        rank = cum - 1 - take(before, table_of_hot)
        pos = torch.where(free, take(self._hot_offset, table_of_hot) + rank, h + 1)
        free_list = torch.full((h + 2,), h, dtype=torch.int64, device=uid.device)
        free_list.scatter_(0, pos, torch.arange(h + 1, device=uid.device))
        offset = take(self._hot_offset, tab)
        promoted = cand & (cand_rank < take(n_free, tab))
        hot = torch.where(promoted, take(free_list, (offset + cand_rank).clamp(max=h)), h)

        slot = torch.where(promoted, flat, self._trash_slot)
        self.slot_hot.view(-1).index_copy_(0, slot, (hot - offset).to(torch.int32))
        self._clear_sentinels()
        self.hot_slot.index_copy_(0, hot, slot)
        self.hot_slot[h] = -1
        self.promotions.index_add_(0, tab, promoted.to(torch.int64))
        local = torch.where(promoted, hot - offset, torch.zeros_like(hot))
        waiting = cand & ~promoted
        displaced = self._displace(waiting, cand_rank - take(n_free, tab), tab, stored)
        return index, local, promoted, displaced

    def _displace(self, waiting: torch.Tensor, rank: torch.Tensor, tab: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """Frees the hot indices of the weakest hot IDs that waiting candidates outscore by
        ``displace_ratio``: the j-th strongest waiting candidate of a table (``rank`` j, sorted by
        score desc) against the table's j-th weakest hot ID (score asc, index asc). Returns the
        freed indices [sum H] bool; the candidates compete for them from the next free update on.
        """
        h = self.num_hot
        none = torch.zeros(h, dtype=torch.bool, device=waiting.device)
        if self.displace_ratio <= 0 or (self.host_reads_are_free() and not bool(waiting.any())):
            return none
        owner, table, score = self._hot_map()
        # Non-negative float32 scores order like their int32 bits; tables own contiguous index
        # ranges, so the sort keeps each table's indices within its own range.
        weakest = lexsort(table, score.view(torch.int32).to(torch.int64), may_sync=self.host_reads_are_free())
        size = take(self._hot_offset[1:] - self._hot_offset[:-1], tab)
        paired = take(weakest, (take(self._hot_offset, tab) + rank.clamp(min=0, max=h)).clamp(max=h - 1))
        outscored = stored > take(score, paired) * self.displace_ratio
        target = torch.where(waiting & (rank < size) & outscored, paired, h)
        displaced = torch.zeros(h + 1, dtype=torch.bool, device=waiting.device).index_fill_(0, target, True)[:h]
        self._free_hot(displaced, owner, table)
        return displaced

    def _decay_and_demote(self, accepted: torch.Tensor) -> torch.Tensor:
        self.mass_since_decay += accepted
        due = self.mass_since_decay > self._decay_mass
        self.scale.copy_(torch.where(due, self.scale / self._decay, self.scale))
        self.mass_since_decay.copy_(torch.where(due, torch.zeros_like(accepted), self.mass_since_decay))
        h = self.num_hot
        if self.host_reads_are_free() and not bool(due.any()):
            # Scores only grow between decays, so nobody can fall below the threshold.
            return torch.zeros(h, dtype=torch.bool, device=accepted.device)
        owner, table, score = self._hot_map()
        demoted = (owner >= 0) & (score < take(self._stored(self._threshold), table))
        self._free_hot(demoted, owner, table)
        return demoted

    def _hot_map(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per hot index [sum H]: owning flat slot (-1 if free), table, stored score (inf if free)."""
        owner = self.hot_slot[: self.num_hot]
        score = torch.where(owner >= 0, take(self.slot_scores.view(-1), owner.clamp(min=0)), float("inf"))
        return owner, self._table_of_hot[: self.num_hot].to(torch.int64), score

    def _free_hot(self, freed: torch.Tensor, owner: torch.Tensor, table: torch.Tensor) -> None:
        """Demotes the owners of the ``freed`` hot indices [sum H] (owner: their flat slots)."""
        h = self.num_hot
        slot = torch.where(freed, owner, self._trash_slot)
        self.slot_hot.view(-1).index_fill_(0, slot, COLD)
        self._clear_sentinels()
        self.hot_slot[:h] = torch.where(freed, -1, owner)
        self.hot_free_since[:h] = torch.where(freed, self.step, self.hot_free_since[:h])
        self.demotions.index_add_(0, table, freed.to(torch.int64))

    def _maybe_renormalise(self) -> None:
        # The only host sync of the sketch, once every ``_renorm_interval`` updates; scheduled by
        # ``step`` so that a reloaded sketch renormalises at the same updates as the original.
        self._host_step += 1
        if self._host_step % self._renorm_interval:
            return
        big = self.scale > _RENORM_AT
        if bool(big.any()):
            table = self._table_of_bucket.clamp(max=self.num_tables - 1).to(torch.int64)
            factor = torch.where(big, self.scale, torch.ones_like(self.scale))[table]
            self.slot_scores.copy_((self.slot_scores.to(torch.float64) / factor.unsqueeze(1)).float())
            self.scale.copy_(torch.where(big, torch.ones_like(self.scale), self.scale))

    # ------------------------------------------------------------------ introspection

    def hot_ids(self, table: int = 0) -> torch.Tensor:
        """ID owning each hot index of ``table``, -1 where free. int64 [H_t] (an ID of -1 is ambiguous)."""
        lo = sum(self.num_hot_per_table[:table])
        owner = self.hot_slot[lo : lo + self.num_hot_per_table[table]]
        ids = self.slot_ids.view(-1)[owner.clamp(min=0)]
        return torch.where(owner >= 0, ids, torch.full_like(ids, -1))

    def stats(self, table: int = 0) -> Dict[str, int]:
        """Counters of one table (host sync: for reporting, not for the training step)."""
        b0 = sum(self.num_buckets_per_table[:table])
        h0 = sum(self.num_hot_per_table[:table])
        slots = self.slot_hot[b0 : b0 + self.num_buckets_per_table[table]]
        owners = self.hot_slot[h0 : h0 + self.num_hot_per_table[table]]
        return {
            "tracked_ids": int((slots != EMPTY).sum()),
            "hot_ids": int((owners >= 0).sum()),
            "free_hot": int((owners < 0).sum()),
            "promotions": int(self.promotions[table]),
            "demotions": int(self.demotions[table]),
            "rejected_scores": int(self.rejected[table]),
            "updates": int(self.step),
        }

    def total_mass(self, table: int = 0) -> torch.Tensor:
        """Sum of real scores over one table's slots (float64, 0-dim)."""
        b0 = sum(self.num_buckets_per_table[:table])
        slots = self.slot_scores[b0 : b0 + self.num_buckets_per_table[table]]
        return slots.to(torch.float64).sum() / self.scale[table]
