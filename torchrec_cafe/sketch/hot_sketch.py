"""HotSketch: bucketed SpaceSaving sketches that pick the IDs owning a private row, for T tables at once.

Each compressed table has a *pool* of ``P`` hashed rows. Every ID has ``POOL_CHOICES`` candidate pool
rows (double hashing of its key). A *cold* ID reads its first candidate row that no hot ID owns;
a *hot* ID owns one candidate row privately (no other ID reads it). So there is no fixed split
between hot and shared rows: the hot set takes as many pool rows as the sketch finds IDs that
deserve them, and the cold IDs share the rest.

One HotSketch holds the sketches of T tables side by side (table t owns buckets
``[bucket_offset[t], bucket_offset[t] + K_t)`` and pool rows ``[pool_offset[t], pool_offset[t] + P_t)``),
so a training step updates every table with one batch of tensor ops.

Keys: an ID's key is ``fingerprint32(id)``, a bijection on ``[0, 2**32)``: the sketch is exact per
ID for tables of up to 2**32 rows, and a slot stores 4 bytes of key instead of 8 of id.

Layout (persistent buffers, shapes independent of the world size); 9 bytes per slot, 1 per pool row:

- ``slot_keys``   int32   [sum K + 1, c]  key per slot (its 32 bits).
- ``slot_scores`` float32 [sum K + 1, c]  score per slot, in *stored units* (see lazy decay).
- ``slot_state``  int8    [sum K + 1, c]  -2 empty, -1 tracked and cold, p >= 0 hot, owning its p-th choice.
- ``pool_state``  int8    [sum P + 1]     0 free, 1 owned by a hot ID, -q freed, q more updates in quarantine.
- per table [T]: ``scale`` (lazy-decay factor), ``mass`` (decayed score mass, stored units),
  ``mass_since_decay``, ``promotions``, ``demotions``, ``rejected``, ``dropped_mass``; and ``step``.

The last bucket and the last pool row are sentinels that absorb masked writes, so every scatter has
a fixed shape and an update needs no host synchronisation.

Batch semantics (the invariant): ``update(ids, scores, tables)`` is a pure function of the
*multiset* of (table, key, score) triples. Scores are quantised to multiples of 2**-16 and summed
as integers, so aggregation is exact and associative. Per update and table:

1. aggregate: unique keys and their summed (quantised) scores; non-finite or negative scores are
   dropped (counted in ``rejected``), never inserted;
2. tracked keys add their score;
3. newcomers, per bucket, ordered by (score desc, key asc): the first ones fill the empty slots
   (lowest slot first); if newcomers remain, the first remaining one takes over the lowest-score
   cold slot (lowest slot index on ties) with ``score_min + sum of all remaining newcomers'
   scores`` (SpaceSaving: mass is kept and scores over-estimate). If every slot is hot the mass is
   dropped (``dropped_mass``): hot slots are never taken over;
4. the accepted mass joins the table's ``mass``; once the mass inserted since the last decay
   exceeds ``decay_mass``, every score (and ``mass``) is multiplied by ``decay``;
5. promotion: tracked cold keys of this update whose *guaranteed* score (their score minus the
   lowest other score of their bucket, 0 if the bucket has an empty slot: what SpaceSaving's
   takeovers can have inherited) reaches the promotion bar, ordered by (table, guaranteed score
   desc, key asc), claim a pool row in ``POOL_CHOICES`` rounds: in round p each
   unplaced candidate asks for its p-th choice if that row is free (state 0), and of several asking
   for one row the first in that order gets it. Candidates left unplaced wait for a later update.
   With ``max_promotions`` m > 0 only a table's first m candidates are this update's candidates
   (the rest wait, and do not displace in step 8): an update then promotes at most m keys per
   table, so its row migration fits a fixed buffer of ``sum m`` pairs (``promotion_capacity``);
6. quarantine: freed rows count down one update;
7. demotion: hot keys whose score is below the demotion bar free their row (state ``-quarantine``,
   so it can be claimed again from update t + quarantine + 1 on);
8. displacement (``displace_ratio`` r > 0): each candidate of step 5 left unplaced, in promotion
   order, looks at the hot keys owning its choices (after step 7); if its guaranteed score exceeds
   r x the lowest of their scores (the lowest choice on ties), that owner is demoted as in step 7.
   Of several candidates naming one owner only the first counts. The freed row goes to whichever
   candidate claims it first at a later update: a full pool keeps changing toward the strongest
   keys (and after a popularity shift the new head takes the old head's rows) instead of keeping
   the first keys that qualified until decay lowers them below the demotion bar.

Bars (per table, real units): with a fixed ``threshold`` (the paper), both bars are the threshold;
adaptively (``threshold=None``), the promotion bar is ``promote_load`` x the average load of a pool
row, ``max(mass / P, MIN_LOAD)``, and the demotion bar ``demote_load`` x that load: an ID earns a
private row once it alone carries that share of what an average pool row carries, and keeps it
until it falls clearly below (hysteresis). The share of pool rows that become private therefore
follows the observed skew: a few on a flat long tail, most of them on a heavy head.

Decay is lazy (CAFE+): instead of scanning all slots, ``scale`` is divided by ``decay`` and new
mass is inserted multiplied by ``scale``, so ``stored = real * scale``. Stored values are
renormalised rarely, in one scan, before they overflow.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import nn

from torchrec_cafe.sketch import kernels
from torchrec_cafe.sketch.hashing import finalise64, fingerprint32, mix64, seed_offset
from torchrec_cafe.sketch.ops import first_in_row, first_in_segment, lexsort, rank_in_segment, segment_last, take

EMPTY = -2
COLD = -1
FREE = 0
OWNED = 1
POOL_CHOICES = 4  # candidate pool rows per key; a hot slot's state (0..3) says which one it owns
MIN_LOAD = 4.0  # adaptive bars use a pool-row load of at least this many (score-)occurrences
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
_BUCKET_SEED_OFFSET = seed_offset(_BUCKET_SEED)
POOL_SEED_OFFSET = seed_offset(0x9001)  # mix64(keys, 0x9001) == finalise64(keys + POOL_SEED_OFFSET)
_MAX_TABLES = (1 << 15) - 1
_MAX_QUARANTINE = 127  # pool_state is int8
_FLOOR_RUN = 256  # slots per demotion floor of the update kernel (csrc/hot_sketch.cpp: kFloorRun)
_LOW32 = (1 << 32) - 1

PerTable = Union[int, float, Sequence[int], Sequence[float]]
OptionalPerTable = Union[None, float, Sequence[Optional[float]]]


@dataclass
class SketchUpdate:
    """What one update changed, as fixed-shape tensors (no host sync needed to build it).

    Per unique pair of the update, the candidates first (grouped by table, in promotion order) [N]:
    ``tables``; ``ids``: the smallest id of the update with the pair's key (the id, for ids below
    2**32); ``src``: the pool row (within the table) the key read before this update, its first
    choice no hot key owned, or its first choice if all were owned (``src_blocked``); ``dst``: the
    pool row it now owns; all valid where ``promoted``.
    ``demoted`` [sum P] bool: pool rows freed by this update (global layout).
    ``accepted_mass`` 0-dim float64: score mass inserted.
    """

    tables: torch.Tensor
    ids: torch.Tensor
    src: torch.Tensor
    src_blocked: torch.Tensor
    dst: torch.Tensor
    promoted: torch.Tensor
    demoted: torch.Tensor
    accepted_mass: torch.Tensor


def _per_table(value: object, n: int, name: str) -> list:
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


def as_int32_bits(keys: torch.Tensor) -> torch.Tensor:
    """int64 keys in ``[0, 2**32)`` -> int32 with the same 32 bits."""
    return torch.where(keys >= (1 << 31), keys - (1 << 32), keys).to(torch.int32)


def pool_choices(keys: torch.Tensor, pool_rows: torch.Tensor) -> torch.Tensor:
    """Candidate pool rows of int64 ``keys`` [N] in pools of ``pool_rows`` [N] rows: [N, POOL_CHOICES]
    int64, row p = ``(h1 + p * h2) % P`` with h1, h2 the halves of one 64-bit hash (h2 odd)."""
    return choices_of_hash(finalise64(keys + POOL_SEED_OFFSET), pool_rows)


def choices_of_hash(h: torch.Tensor, pool_rows: torch.Tensor) -> torch.Tensor:
    """``pool_choices`` from the keys' 64-bit hash (TorchScript-able: literals only)."""
    h1, h2 = (h & 4294967295).unsqueeze(1), ((h >> 32) | 1).unsqueeze(1)
    p = torch.arange(4, device=h.device)  # POOL_CHOICES
    return torch.remainder(h1 + p * h2, pool_rows.unsqueeze(1))


def _pick(rows: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """``rows[i, choice[i]]`` ([N, POOL_CHOICES], [N] -> [N]); a choice of -1 reads column 0."""
    return rows.gather(1, choice.clamp(min=0).unsqueeze(1)).squeeze(1)


def _sync_host_step_after_load(module: "HotSketch", _incompatible: object) -> None:
    module._sync_host_step()  # a named function: modules with hooks must stay picklable


class HotSketch(nn.Module):
    """Device-resident HotSketches of T tables: ``K_t`` buckets x ``c`` slots over a pool of ``P_t`` rows.

    Args:
        num_buckets: K per table (an int for one table, or a sequence).
        pool_rows: P per table, the hashed rows cold IDs share and hot IDs may own.
        threshold: fixed promotion/demotion score per table (the paper), or ``None`` (default) for
            the adaptive bars (see the module docstring); one value or one per table.
        slots_per_bucket: c (paper: 4), shared by all tables.
        decay: per-table multiplier applied to every score at each decay event, in (0, 1].
        decay_mass: inserted score mass that triggers a decay, per table; default
            ``10 * K * threshold`` with a fixed threshold (the paper) and ``10 * K * c`` otherwise.
        quarantine: updates a freed pool row waits before a hot ID may claim it again (pipelined
            training remaps a batch before the previous update lands); at most 127.
        promote_load / demote_load: adaptive bars as multiples of the average pool-row load, per
            table; ``0 <= demote_load <= promote_load``.
        displace_ratio: how many times a waiting candidate's guaranteed score must exceed the
            weakest owner of its choices to demote it (step 8), shared by all tables; 0 disables
            displacement.
        max_promotions: promotion candidates per table and update (step 5), per table; 0 (default)
            for no cap. Caps on every table bound an update's migration (``promotion_capacity``).
        device: where the buffers live; all work happens there.
    """

    # registered buffers (typed for the type checker; nn.Module's __getattr__ is untyped)
    slot_keys: torch.Tensor
    slot_scores: torch.Tensor
    slot_state: torch.Tensor
    pool_state: torch.Tensor
    step: torch.Tensor
    scale: torch.Tensor
    mass: torch.Tensor
    mass_since_decay: torch.Tensor
    promotions: torch.Tensor
    demotions: torch.Tensor
    rejected: torch.Tensor
    dropped_mass: torch.Tensor
    _bucket_offset: torch.Tensor
    _buckets: torch.Tensor
    _pool_offset: torch.Tensor
    _pool: torch.Tensor
    _threshold: torch.Tensor
    _decay: torch.Tensor
    _decay_mass: torch.Tensor
    _promote_load: torch.Tensor
    _demote_load: torch.Tensor
    _fixed: torch.Tensor
    _max_promotions: torch.Tensor

    # True forces the accelerator code path (fixed shapes, no host reads) on CPU too; tests run
    # both paths. See host_reads_are_free.
    fixed_shapes: bool = False
    # False keeps CPU updates and lookups on the tensor code even when the compiled kernels
    # (sketch/kernels.py) are built; tests compare the two.
    use_kernels: bool = True

    def __init__(
        self,
        num_buckets: Union[int, Sequence[int]],
        pool_rows: Union[int, Sequence[int]],
        threshold: OptionalPerTable = None,
        slots_per_bucket: int = 4,
        decay: PerTable = 0.99,
        decay_mass: Optional[PerTable] = None,
        quarantine: int = 0,
        promote_load: PerTable = 1.0,
        demote_load: PerTable = 0.5,
        displace_ratio: float = 0.0,
        max_promotions: PerTable = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        ks = [int(k) for k in (num_buckets if isinstance(num_buckets, (list, tuple)) else [num_buckets])]
        t = len(ks)
        ps = [int(p) for p in _per_table(pool_rows, t, "pool_rows")]
        thresholds = _per_table(threshold, t, "threshold")
        decays = [float(x) for x in _per_table(decay, t, "decay")]
        promote = [float(x) for x in _per_table(promote_load, t, "promote_load")]
        demote = [float(x) for x in _per_table(demote_load, t, "demote_load")]
        self._check_args(ks, ps, thresholds, decays, promote, demote, slots_per_bucket, quarantine)
        if not (displace_ratio == 0 or (displace_ratio >= 1 and math.isfinite(displace_ratio))):
            raise ValueError(f"displace_ratio must be 0 (off) or a finite number >= 1, got {displace_ratio}")
        self.displace_ratio = float(displace_ratio)
        caps = [int(m) for m in _per_table(max_promotions, t, "max_promotions")]
        if min(caps) < 0:
            raise ValueError(f"max_promotions must be >= 0 (0: no cap), got {caps}")
        self.promotion_capacity: Optional[int] = sum(caps) if min(caps) > 0 else None
        fixed = [th is not None for th in thresholds]
        thresholds = [float(th) if th is not None else 0.0 for th in thresholds]
        if decay_mass is None:
            masses = [10.0 * k * (max(th, 1.0) if f else slots_per_bucket) for k, th, f in zip(ks, thresholds, fixed)]
        else:
            masses = [float(x) for x in _per_table(decay_mass, t, "decay_mass")]
        self.num_tables, self.slots_per_bucket, self.quarantine = t, slots_per_bucket, quarantine
        self.num_buckets_per_table, self.pool_rows_per_table = ks, ps
        self.num_buckets, self.pool_rows = sum(ks), sum(ps)
        self.thresholds = [th if f else None for th, f in zip(thresholds, fixed)]
        k, c, p = self.num_buckets, slots_per_bucket, self.pool_rows
        self.register_buffer("slot_keys", torch.zeros(k + 1, c, dtype=torch.int32, device=device))
        self.register_buffer("slot_scores", torch.zeros(k + 1, c, dtype=torch.float32, device=device))
        self.register_buffer("slot_state", torch.full((k + 1, c), EMPTY, dtype=torch.int8, device=device))
        self.register_buffer("pool_state", torch.zeros(p + 1, dtype=torch.int8, device=device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        for name, dtype, value in (
            ("scale", torch.float64, 1.0),
            ("mass", torch.float64, 0.0),
            ("mass_since_decay", torch.float64, 0.0),
            ("promotions", torch.int64, 0),
            ("demotions", torch.int64, 0),
            ("rejected", torch.int64, 0),
            ("dropped_mass", torch.float64, 0.0),
        ):
            self.register_buffer(name, torch.full((t,), value, dtype=dtype, device=device))
        # Constants derived from the constructor arguments: not state, not saved.
        for name, values, dtype in (
            ("_bucket_offset", _offsets(ks), torch.int64),
            ("_buckets", ks, torch.int64),
            ("_pool_offset", _offsets(ps), torch.int64),
            ("_pool", ps, torch.int64),
            ("_threshold", thresholds, torch.float64),
            ("_decay", decays, torch.float64),
            ("_decay_mass", masses, torch.float64),
            ("_promote_load", [0.0 if f else x for x, f in zip(promote, fixed)], torch.float64),
            ("_demote_load", [0.0 if f else x for x, f in zip(demote, fixed)], torch.float64),
            ("_fixed", fixed, torch.bool),
            ("_max_promotions", caps, torch.int64),
        ):
            self.register_buffer(name, torch.tensor(values, dtype=dtype, device=device), persistent=False)
        # A decay event happens at most once per update, so scale grows at most 1/decay per update.
        fastest = max(-math.log(d) for d in decays)
        self._renorm_interval = min(
            _RENORM_CHECK_MAX_INTERVAL, max(1, int(_RENORM_HEADROOM / fastest)) if fastest > 0 else _RENORM_CHECK_MAX_INTERVAL
        )
        # Host mirror of ``step`` so the renormalisation schedule needs no sync; restored on load.
        self._host_step = 0
        # Not state: the update kernel's lower bounds on the hot scores of each run of _FLOOR_RUN
        # slots of a table (demotion_floor).
        runs = sum(-(-k * slots_per_bucket // _FLOOR_RUN) for k in ks)
        self._hot_floor = torch.full((runs,), -math.inf, dtype=torch.float32)
        self._floor_token: Optional[Tuple[Tuple[int, int], ...]] = None
        self.register_load_state_dict_post_hook(_sync_host_step_after_load)

    @staticmethod
    def _check_args(
        ks: List[int], ps: List[int], thresholds: list, decays: List[float], promote: List[float],
        demote: List[float], slots_per_bucket: int, quarantine: int,
    ) -> None:
        if not ks or min(ks) < 1 or min(ps) < 1 or slots_per_bucket < 1:
            raise ValueError(f"num_buckets, pool_rows and slots_per_bucket must be >= 1, got {ks}, {ps}, {slots_per_bucket}")
        if len(ks) > _MAX_TABLES:
            raise ValueError(f"a HotSketch holds at most {_MAX_TABLES} tables, got {len(ks)}")
        if sum(ks) * slots_per_bucket >= (1 << 31) - 1:
            raise ValueError(f"a HotSketch holds fewer than 2**31 slots, got {sum(ks) * slots_per_bucket}")
        if any(th is not None and not (float(th) >= 0 and math.isfinite(float(th))) for th in thresholds):
            raise ValueError(f"threshold must be None or a finite number >= 0, got {thresholds}")
        if not all(0 < d <= 1 for d in decays):
            raise ValueError(f"decay must be in (0, 1], got {decays}")
        if not all(0 <= lo <= hi and math.isfinite(hi) for lo, hi in zip(demote, promote)):
            raise ValueError(f"need 0 <= demote_load <= promote_load (finite), got {demote} and {promote}")
        if not 0 <= quarantine <= _MAX_QUARANTINE:
            raise ValueError(f"quarantine must be in [0, {_MAX_QUARANTINE}], got {quarantine}")

    def _sync_host_step(self) -> None:
        self._host_step = int(self.step)

    # ------------------------------------------------------------------ accounting

    @staticmethod
    def table_state_bytes(num_buckets: int, pool_rows: int, slots_per_bucket: int = 4) -> int:
        """Bytes one table owns: its slots (key 4 + score 4 + state 1), one state byte per pool row,
        seven 8-byte counters and its constants (ten 8-byte values and a flag)."""
        return num_buckets * slots_per_bucket * 9 + pool_rows + 7 * 8 + 10 * 8 + 1

    @staticmethod
    def shared_state_bytes(slots_per_bucket: int = 4) -> int:
        """Bytes shared by all tables of a sketch: the sentinel bucket and pool row, ``step``, and
        the closing entries of the two offset arrays."""
        return slots_per_bucket * 9 + 1 + 8 + 2 * 8

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

    def bucket_of(self, keys: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Global bucket of each (table, key). [N] int64."""
        return take(self._bucket_offset, tables) + torch.remainder(mix64(keys, _BUCKET_SEED), take(self._buckets, tables))

    def _probe(self, keys: torch.Tensor, tables: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(flat slot holding each (table, key) or -1, its bucket). [N] int64 each."""
        b = self.bucket_of(keys, tables)
        match = (take(self.slot_keys, b) == as_int32_bits(keys).unsqueeze(1)) & (take(self.slot_state, b) != EMPTY)
        flat = b * self.slots_per_bucket + first_in_row(match)
        return torch.where(match.any(dim=1), flat, torch.full_like(flat, -1)), b

    def _choices(self, keys: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """Global pool rows of each key's choices. [N, POOL_CHOICES] int64."""
        return take(self._pool_offset, tables).unsqueeze(1) + pool_choices(keys, take(self._pool, tables))

    def _first_unowned(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(first choice whose row no hot key owns, or 0; whether all were owned). [N] each."""
        owned = take(self.pool_state, rows.reshape(-1)).view(rows.shape) == OWNED
        return first_in_row(~owned), owned.all(dim=1)

    def lookup(self, ids: torch.Tensor, tables: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pool row each id reads: (row within its table's pool [N] int64, hot [N] bool,
        blocked [N] bool). A hot id reads the row it owns; a cold one its first choice no hot id
        owns, or (``blocked``) its first choice when every choice is owned."""
        if self.kernels_apply():  # the fingerprints in the kernel: a dozen tensor ops fewer
            ids = ids.to(self.slot_keys.device, torch.int64)
            tables = None if tables is None else self._tables_like(ids, tables)
            return kernels.lookup(self, ids, tables, _BUCKET_SEED_OFFSET, POOL_SEED_OFFSET, from_ids=True)
        return self.lookup_keys(fingerprint32(ids), self._tables_like(ids, tables))

    def lookup_keys(self, keys: torch.Tensor, tables: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``lookup`` by key (``fingerprint32`` of the ids) and table. [N] each."""
        if self.kernels_apply():
            return kernels.lookup(self, keys, tables, _BUCKET_SEED_OFFSET, POOL_SEED_OFFSET)
        flat, _ = self._probe(keys, tables)
        state = take(self.slot_state.view(-1), flat.clamp(min=0)).to(torch.int64)
        hot = (flat >= 0) & (state >= 0)
        rows = self._choices(keys, tables)
        free, blocked = self._first_unowned(rows)
        p = torch.where(hot, state, free)
        row = rows.gather(1, p.unsqueeze(1)).squeeze(1) - take(self._pool_offset, tables)
        return row, hot, blocked & ~hot

    def query_scores(self, ids: torch.Tensor, tables: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Real (decayed) score of each id, 0 for untracked ids. [N] float32."""
        tables = self._tables_like(ids, tables)
        flat, _ = self._probe(fingerprint32(ids), tables)
        s = take(self.slot_scores.view(-1), flat.clamp(min=0))
        return torch.where(flat >= 0, s / take(self.scale, tables).to(s.dtype), torch.zeros_like(s))

    def bars(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(promotion bar, demotion bar) per table [T], in stored units (float32)."""
        load = torch.maximum(self.mass / self._pool, MIN_LOAD * self.scale)
        fixed = self._threshold * self.scale
        promote = torch.where(self._fixed, fixed, self._promote_load * load)
        demote = torch.where(self._fixed, fixed, self._demote_load * load)
        return promote.to(torch.float32), demote.to(torch.float32)

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, ids: torch.Tensor, scores: torch.Tensor, tables: Optional[torch.Tensor] = None) -> SketchUpdate:
        """Applies one batch of (table, id, score) occurrences; see the module docstring.

        Args:
            ids: int64 [N], any values.
            scores: float [N], non-negative; non-finite or negative entries are dropped.
            tables: int [N] table of each occurrence, in [0, T); default all 0.
        """
        ids, tables = self._check(ids, scores, tables)
        if self.kernels_apply():
            update = kernels.update_scores(self, ids, scores, tables, _BUCKET_SEED_OFFSET, POOL_SEED_OFFSET, MIN_LOAD)
            return self._after_kernel(update)
        q, ok = _quantise(scores.to(ids.device, torch.float64))
        self.rejected.index_add_(0, tables, (~ok).to(torch.int64))
        return self._update_pairs(*self._aggregate(fingerprint32(ids), ids, q, ok, tables))

    @torch.no_grad()
    def aggregate(
        self, ids: torch.Tensor, scores: torch.Tensor, tables: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact pre-aggregation of occurrences, to ship fewer bytes between ranks.

        Returns (keys [U] int64, ids [U] int64, quanta [U] int64, tables [U], rejected [T]): the
        unique (table, key) pairs with at least one valid score, the smallest id with that key,
        their summed scores in 2**-16 quanta, and the bad scores per table. ``update_quanta`` of
        the concatenation over ranks leaves the same state as ``update`` of all ranks' occurrences
        (integer sums are associative, minima too). No state changes.
        """
        ids, tables = self._check(ids, scores, tables)
        q, ok = _quantise(scores.to(ids.device, torch.float64))
        rejected = torch.zeros_like(self.rejected).index_add_(0, tables, (~ok).to(torch.int64))
        keys, uid, utab, uq, valid, _ = self._aggregate(fingerprint32(ids), ids, q, ok, tables)
        keep = valid.nonzero().squeeze(1)  # variable length: the caller ships it anyway
        return take(keys, keep), take(uid, keep), take(uq, keep), take(utab, keep), rejected

    @torch.no_grad()
    def update_quanta(
        self, keys: torch.Tensor, ids: torch.Tensor, quanta: torch.Tensor, tables: torch.Tensor, rejected: torch.Tensor
    ) -> SketchUpdate:
        """``update`` from (gathered) ``aggregate`` outputs: keys, ids, integer quanta, all valid."""
        keys, tables = self._check(keys, quanta, tables)
        self.rejected += rejected.to(self.rejected.device)
        quanta = quanta.to(keys.device, torch.int64)
        valid = torch.ones_like(quanta, dtype=torch.bool)
        ids = ids.to(keys.device, torch.int64)
        if self.kernels_apply():
            return self._kernel_update(keys, ids, quanta, valid, tables)
        return self._update_pairs(*self._aggregate(keys, ids, quanta, valid, tables))

    def _check(self, ids: torch.Tensor, scores: torch.Tensor, tables: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if ids.dim() != 1 or scores.shape != ids.shape:
            raise ValueError(f"ids and scores must be 1-D of equal length, got {tuple(ids.shape)} and {tuple(scores.shape)}")
        if ids.dtype != torch.int64:
            raise ValueError(f"ids must be int64, got {ids.dtype}")
        ids = ids.to(self.slot_keys.device)
        return ids, self._tables_like(ids, tables)

    def kernels_apply(self) -> bool:
        """Whether updates and lookups run the compiled CPU kernels (built, on CPU, not forced to
        the fixed-shape path, ``use_kernels``)."""
        return kernels.AVAILABLE and self.use_kernels and self.host_reads_are_free()

    def _kernel_update(
        self, keys: torch.Tensor, ids: torch.Tensor, quanta: torch.Tensor, ok: torch.Tensor, tables: torch.Tensor
    ) -> SketchUpdate:
        """Steps 1-8 of aggregated quanta in the compiled kernel."""
        return self._after_kernel(kernels.update(self, keys, ids, quanta, ok, tables, _BUCKET_SEED_OFFSET, POOL_SEED_OFFSET, MIN_LOAD))

    def demotion_floor(self) -> torch.Tensor:
        """For the update kernel: per run of ``_FLOOR_RUN`` slots of a table (a table's last run may
        be shorter) a lower bound on its hot slots' stored scores, float32 [runs] (updated in place
        by the kernel). An update scans for demotions only the runs whose bound its table's bar has
        passed: exact, as hot scores only grow and promotions lower the bound. It is
        -inf (scan) unless the scores, states, scales and masses are the same tensors, untouched
        (version counters), since the kernel update that set it: a tensor-path update, a load, a
        renormalisation or a device move all invalidate it."""
        token = self._state_token()
        if token is None or token != self._floor_token:
            self._hot_floor.fill_(-math.inf)
        self._floor_token = None  # until the kernel update taking it has succeeded (_after_kernel)
        return self._hot_floor

    def _floor_bounds(self) -> Tuple[torch.Tensor, ...]:
        b = self._buffers  # not the attributes: four module attribute lookups cost ~4 us
        return tuple(cast(torch.Tensor, b[n]) for n in ("slot_scores", "slot_state", "scale", "mass"))

    def _state_token(self) -> Optional[Tuple[Tuple[int, int], ...]]:
        """What the floor bounds are and which version of them; None for inference tensors (no
        version counters): no floor then."""
        bounds = self._floor_bounds()
        if any(b.is_inference() for b in bounds):
            return None
        return tuple((b.data_ptr(), b._version) for b in bounds)

    def _after_kernel(self, out: kernels.Update) -> SketchUpdate:
        """The kernel's outputs as a SketchUpdate, then the step counter and renormalisation."""
        tab, uid, src, blocked, dst, promoted, demoted, accepted = out
        torch.autograd.graph.increment_version(self._floor_bounds())  # custom operators leave them alone
        self._floor_token = self._state_token()  # what the kernel left; renormalising changes it
        self.step += 1
        self._maybe_renormalise()
        return SketchUpdate(tab, uid, src, blocked, dst, promoted, demoted, accepted.sum())

    def host_reads_are_free(self) -> bool:
        """On CPU reading a scalar costs nothing, so an update trims padding and skips empty phases;
        on accelerators it keeps fixed shapes and never syncs. Both give the same state (tested)."""
        return self.slot_keys.device.type == "cpu" and not self.fixed_shapes

    def _aggregate(
        self, keys: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, ok: torch.Tensor, tables: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unique (table, key) pairs sorted by (table, key), padded to [N], with their smallest id,
        exact integer sums of the quanta ``q``, validity (a valid occurrence ``ok``), and the number
        of pairs (0-dim). Keys have 32 bits and tables 15, so one sort of the packed pair orders them."""
        order = torch.sort((tables << 32) | keys, stable=True).indices
        skey, sid, stab, q, ok = (take(x, order) for x in (keys, ids, tables, q, ok))
        seg = torch.cumsum(first_in_segment(stab, skey), 0) - 1
        n = keys.numel()
        zeros = torch.zeros(n, dtype=torch.int64, device=keys.device)
        uq = zeros.clone().index_add_(0, seg, q)
        any_ok = zeros.clone().index_add_(0, seg, ok.to(torch.int64))
        ukey = zeros.clone().scatter_(0, seg, skey)
        uid = torch.full_like(zeros, (1 << 63) - 1).scatter_reduce_(0, seg, sid, reduce="amin")
        utab = zeros.clone().scatter_(0, seg, stab)
        valid = any_ok > 0  # padding positions have count 0
        num_unique = seg[-1] + 1 if n else torch.zeros((), dtype=torch.int64, device=keys.device)
        return ukey, uid, utab, torch.where(valid, uq, torch.zeros_like(uq)), valid, num_unique

    def _update_pairs(
        self, key: torch.Tensor, uid: torch.Tensor, tab: torch.Tensor, uq: torch.Tensor, valid: torch.Tensor, num_unique: torch.Tensor
    ) -> SketchUpdate:
        if self.host_reads_are_free():
            n = int(num_unique)
            key, uid, tab, uq, valid = key[:n], uid[:n], tab[:n], uq[:n], valid[:n]
        flat, bucket = self._probe(key, tab)
        present = valid & (flat >= 0)
        self._add_present(flat, present, tab, uq)
        written = self._insert_newcomers(valid & ~present, bucket, key, tab, uq)
        accepted = torch.zeros(self.num_tables, dtype=torch.int64, device=key.device).index_add_(0, tab, uq)
        accepted = accepted.to(torch.float64) / _Q
        self._account(accepted)
        update, waiting = self._promote(key, uid, tab, valid, torch.where(present, flat, written))
        update.demoted = self._demote() | self._displace(*waiting)
        update.accepted_mass = accepted.sum()
        self.step += 1
        self._maybe_renormalise()
        return update

    def _to_stored(self, q: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return (q.to(torch.float64) / _Q * take(self.scale, tables)).to(torch.float32)

    @property
    def _trash_slot(self) -> int:
        return self.num_buckets * self.slots_per_bucket

    def _add_present(self, flat: torch.Tensor, present: torch.Tensor, tab: torch.Tensor, uq: torch.Tensor) -> None:
        # Unique pairs own distinct slots; masked entries add 0 to the sentinel bucket.
        target = torch.where(present, flat, torch.full_like(flat, self._trash_slot))
        inc = torch.where(present, self._to_stored(uq, tab), torch.zeros(1, device=uq.device))
        self.slot_scores.view(-1).index_add_(0, target, inc)

    def _insert_newcomers(
        self, new: torch.Tensor, bucket: torch.Tensor, key: torch.Tensor, tab: torch.Tensor, uq: torch.Tensor
    ) -> torch.Tensor:
        """Inserts the ``new`` pairs; returns the flat slot each pair was written to, -1 if none. [N]"""
        k, c = self.num_buckets, self.slots_per_bucket
        keep = torch.arange(new.numel(), device=new.device)
        written = torch.full_like(key, -1)
        if self.host_reads_are_free():
            keep = new.nonzero().squeeze(1)
            new, bucket, key, tab, uq = (take(x, keep) for x in (new, bucket, key, tab, uq))
        bucket = torch.where(new, bucket, torch.full_like(key, k))
        # Order by (bucket asc, score desc, key asc): keys ascend within a table (a bucket belongs
        # to one table) and the sorts are stable.
        order = lexsort(bucket, uq, descending_minor=True, may_sync=self.host_reads_are_free())
        b, q, skey, stab = (take(x, order) for x in (bucket, uq, key, tab))
        is_new = b < k
        rank = rank_in_segment(b)
        empty = take(self.slot_state, b) == EMPTY  # the sentinel bucket is never left occupied
        n_empty = empty.sum(dim=1)
        fill = is_new & (rank < n_empty)
        nth_empty = empty & (torch.cumsum(empty.to(torch.int64), dim=1) == (rank + 1).unsqueeze(1))
        fill_slot = torch.where(fill, b * c + first_in_row(nth_empty), self._trash_slot)
        self._write_slots(fill_slot, skey, self._to_stored(q, stab))

        # The first newcomer that found no empty slot takes over the bucket's weakest cold slot
        # with the mass of every newcomer left over in that bucket (slots just filled included).
        win = is_new & (rank == n_empty)
        csum = torch.cumsum(q, 0)
        rest = take(csum, segment_last(b)) - csum + q
        stored = take(self.slot_scores, b)
        cold = take(self.slot_state, b) == COLD
        masked = torch.where(cold, stored, torch.full_like(stored, float("inf")))
        low = masked.amin(dim=1)
        can = win & cold.any(dim=1)
        low_slot = b * c + first_in_row(cold & (masked == low.unsqueeze(1)))
        taken = torch.where(can, low_slot, self._trash_slot)
        self._write_slots(taken, skey, low + self._to_stored(rest, stab))
        lost = torch.where(win & ~can, rest, torch.zeros_like(rest))
        self.dropped_mass += torch.zeros_like(self.promotions).index_add_(0, stab, lost).to(torch.float64) / _Q
        slot = torch.where(fill, fill_slot, torch.where(can, low_slot, -1))
        return written.index_copy_(0, take(keep, order), slot)

    def _write_slots(self, flat: torch.Tensor, keys: torch.Tensor, stored: torch.Tensor) -> None:
        """Writes (key, score, cold) at flat slots; the trash slot is reset after the write."""
        self.slot_keys.view(-1).index_copy_(0, flat, as_int32_bits(keys))
        self.slot_scores.view(-1).index_copy_(0, flat, stored)
        self.slot_state.view(-1).index_fill_(0, flat, COLD)
        self._clear_sentinels()

    def _clear_sentinels(self) -> None:
        self.slot_keys[-1].zero_()
        self.slot_scores[-1].zero_()
        self.slot_state[-1].fill_(EMPTY)
        self.pool_state[-1] = FREE

    def _account(self, accepted: torch.Tensor) -> None:
        """Adds an update's accepted real mass [T] to ``mass`` and decays the tables that are due."""
        self.mass += accepted * self.scale
        self.mass_since_decay += accepted
        due = self.mass_since_decay > self._decay_mass
        self.scale.copy_(torch.where(due, self.scale / self._decay, self.scale))
        self.mass_since_decay.copy_(torch.where(due, torch.zeros_like(accepted), self.mass_since_decay))

    def _promote(
        self, key: torch.Tensor, uid: torch.Tensor, tab: torch.Tensor, valid: torch.Tensor, written: torch.Tensor
    ) -> Tuple[SketchUpdate, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Step 5. ``written`` [N]: the slot each pair held or was written to in this update (-1 if
        none); a later newcomer of the same update may have taken that slot over, hence the key
        check (it replaces a second probe of the buckets). Returns the update and, for step 8, the
        candidates left unplaced, in promotion order: (mask, guaranteed stored score, global choice
        rows [., POOL_CHOICES], table)."""
        safe = written.clamp(min=0)
        stored = self._guaranteed(safe)
        promote_bar, _ = self.bars()
        cand = (
            valid
            & (written >= 0)
            & (take(self.slot_keys.view(-1), safe) == as_int32_bits(key))
            & (take(self.slot_state.view(-1), safe) == COLD)
            & (stored >= take(promote_bar, tab))
        )
        slot = written
        if self.host_reads_are_free():
            index = cand.nonzero().squeeze(1)
            cand, slot, stored, tab, key, uid = (take(x, index) for x in (cand, slot, stored, tab, key, uid))
        # Candidates first, grouped by table, by (guaranteed score desc, key asc) within a table: keys ascend
        # within a table and the sorts are stable.
        order = torch.sort(torch.where(cand, stored, torch.full_like(stored, -1.0)), descending=True, stable=True).indices
        group = torch.where(cand, tab, torch.full_like(tab, self.num_tables))
        order = take(order, torch.sort(take(group, order), stable=True).indices)
        cand, slot, tab, key, uid, stored, group = (take(x, order) for x in (cand, slot, tab, key, uid, stored, group))
        cap = take(self._max_promotions, tab)
        cand = cand & ((cap == 0) | (rank_in_segment(group) < cap))
        rows = self._choices(key, tab)
        src_choice, src_blocked = self._first_unowned(rows)
        chosen = self._claim_rows(cand, rows)
        promoted = chosen >= 0
        self.slot_state.view(-1).index_copy_(
            0, torch.where(promoted, slot, self._trash_slot), chosen.clamp(min=0).to(torch.int8)
        )
        self._clear_sentinels()
        self.promotions.index_add_(0, tab, promoted.to(torch.int64))
        offset = take(self._pool_offset, tab)
        src = _pick(rows, src_choice) - offset
        update = SketchUpdate(tab, uid, src, src_blocked, _pick(rows, chosen) - offset, promoted, torch.zeros(0), torch.zeros(()))
        return update, (cand & ~promoted, stored, rows, tab)

    def _guaranteed(self, slot: torch.Tensor) -> torch.Tensor:
        """The part of each flat slot's stored score that SpaceSaving guarantees: its score minus
        the lowest score among the other slots of its bucket (0 if the bucket has an empty slot, so
        never took anything over). A key that took a slot over inherited at most the bucket's
        minimum of that time, and no slot's score has decreased since relative to the others. [N]"""
        c = self.slots_per_bucket
        bucket = slot // c
        scores, state = take(self.slot_scores, bucket), take(self.slot_state, bucket)
        others = (torch.arange(c, device=slot.device) != (slot % c).unsqueeze(1)) & (state != EMPTY)
        floor = torch.where(others, scores, torch.full_like(scores, float("inf"))).amin(dim=1)
        floor = torch.where((state == EMPTY).any(dim=1) | ~others.any(dim=1), torch.zeros_like(floor), floor)
        return take(self.slot_scores.view(-1), slot) - floor

    def _claim_rows(self, cand: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rounds of step 5 over candidates in promotion order: the choice each one claimed, or -1.
        Marks the claimed rows owned."""
        n = cand.numel()
        pos = torch.arange(n, device=cand.device)
        chosen = torch.full_like(pos, -1)
        sentinel = self.pool_rows
        for p in range(POOL_CHOICES):
            row = rows[:, p]
            ask = cand & (chosen < 0) & (take(self.pool_state, row) == FREE)
            target = torch.where(ask, row, sentinel)
            first = torch.full((sentinel + 1,), n, dtype=torch.int64, device=cand.device)
            first.scatter_reduce_(0, target, pos, reduce="amin")
            won = ask & (take(first, target) == pos)
            self.pool_state.index_fill_(0, torch.where(won, row, sentinel), OWNED)
            self._clear_sentinels()
            chosen = torch.where(won, p, chosen)
        return chosen

    def _demote(self) -> torch.Tensor:
        """Steps 6 and 7: quarantine countdown, then hot keys below the demotion bar free their row.
        Returns the freed pool rows [sum P] bool."""
        k, c = self.num_buckets, self.slot_state.shape[1]
        if self.quarantine:
            pool = self.pool_state
            pool.copy_(torch.where(pool < 0, pool + 1, pool))
        _, demote_bar = self.bars()
        table = self._bucket_tables()
        state, scores = self.slot_state[:k], self.slot_scores[:k]
        drop = (state >= 0) & (scores < take(demote_bar, table).unsqueeze(1))
        drop, flat = drop.view(-1), torch.arange(k * c, device=drop.device)
        if self.host_reads_are_free():
            if not bool(drop.any()):
                return torch.zeros(self.pool_rows, dtype=torch.bool, device=drop.device)
            flat = drop.nonzero().squeeze(1)
            drop = torch.ones_like(flat, dtype=torch.bool)
        tab = take(table, flat // c)
        row = torch.where(drop, self._owned_rows(flat, tab), self.pool_rows)
        return self._free(drop, flat, row, tab)

    def _bucket_tables(self) -> torch.Tensor:
        """Table of each bucket (sentinel excluded). [sum K] int64"""
        t = torch.arange(self.num_tables, device=self._buckets.device)
        return torch.repeat_interleave(t, self._buckets, output_size=self.num_buckets)

    def _owned_rows(self, flat: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        """Global pool row owned by each hot flat slot of table ``tab`` (any value for cold ones). [N]"""
        choice = take(self.slot_state.view(-1), flat).to(torch.int64).clamp(min=0)
        return _pick(self._choices(take(self.slot_keys.view(-1), flat).to(torch.int64) & _LOW32, tab), choice)

    def _free(self, drop: torch.Tensor, flat: torch.Tensor, row: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        """Demotes the hot slots ``flat`` where ``drop`` (owning ``row``; the pool sentinel where
        not ``drop``): rows to quarantine, slots cold. Returns the freed rows [sum P] bool."""
        self.pool_state.index_fill_(0, row, -self.quarantine)
        self.slot_state.view(-1).index_fill_(0, torch.where(drop, flat, self._trash_slot), COLD)
        self._clear_sentinels()
        self.demotions.index_add_(0, tab, drop.to(torch.int64))
        return torch.zeros(self.pool_rows + 1, dtype=torch.bool, device=drop.device).index_fill_(0, row, True)[:-1]

    def _displace(self, waiting: torch.Tensor, guaranteed: torch.Tensor, rows: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        """Step 8 for the unplaced candidates (in promotion order, [N] each, ``rows`` [N,
        POOL_CHOICES] global). Returns the freed pool rows [sum P] bool."""
        device = waiting.device
        if not self.displace_ratio:
            return torch.zeros(self.pool_rows, dtype=torch.bool, device=device)
        if self.host_reads_are_free():
            if not bool(waiting.any()):
                return torch.zeros(self.pool_rows, dtype=torch.bool, device=device)
            keep = waiting.nonzero().squeeze(1)
            waiting, guaranteed, rows, tab = (take(x, keep) for x in (waiting, guaranteed, rows, tab))
        owner_score, owner_slot = self._owners()
        score = take(owner_score, rows.reshape(-1)).view(rows.shape)
        weakest = score.amin(dim=1)
        row = _pick(rows, first_in_row(score == weakest.unsqueeze(1)))
        ok = waiting & torch.isfinite(weakest) & (guaranteed > self.displace_ratio * weakest)
        target = torch.where(ok, row, self.pool_rows)
        pos = torch.arange(ok.numel(), device=device)
        first = torch.full((self.pool_rows + 1,), ok.numel(), dtype=torch.int64, device=device)
        first.scatter_reduce_(0, target, pos, reduce="amin")
        won = ok & (take(first, target) == pos)
        row = torch.where(won, row, self.pool_rows)
        return self._free(won, take(owner_slot, row), row, tab)

    def _owners(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(stored score of the hot key owning each global pool row, +inf if none; its flat slot),
        [sum P + 1] each (the sentinel last): one pass over the hot slots."""
        k, c = self.num_buckets, self.slots_per_bucket
        flat = torch.arange(k * c, device=self.slot_state.device)
        hot = self.slot_state[:k].reshape(-1) >= 0
        if self.host_reads_are_free():
            flat = hot.nonzero().squeeze(1)
            hot = torch.ones_like(flat, dtype=torch.bool)
        row = torch.where(hot, self._owned_rows(flat, take(self._bucket_tables(), flat // c)), self.pool_rows)
        inf = torch.full((self.pool_rows + 1,), float("inf"), device=flat.device)
        score = inf.index_put((row,), torch.where(hot, take(self.slot_scores.view(-1), flat), inf[0]))
        score[-1] = float("inf")  # hot keys own distinct rows; the sentinel took the cold slots' writes
        slot = torch.full((self.pool_rows + 1,), self._trash_slot, dtype=torch.int64, device=flat.device)
        return score, slot.index_put((row,), torch.where(hot, flat, self._trash_slot))

    def _maybe_renormalise(self) -> None:
        # The only host sync of the sketch, once every ``_renorm_interval`` updates; scheduled by
        # ``step`` so that a reloaded sketch renormalises at the same updates as the original.
        self._host_step += 1
        if self._host_step % self._renorm_interval:
            return
        big = self.scale > _RENORM_AT
        if bool(big.any()):
            table = torch.repeat_interleave(torch.arange(self.num_tables, device=big.device), self._buckets)
            factor = torch.where(big, self.scale, torch.ones_like(self.scale))
            self.slot_scores[:-1].copy_((self.slot_scores[:-1].to(torch.float64) / factor[table].unsqueeze(1)).float())
            self.mass.copy_(self.mass / factor)
            self.scale.copy_(torch.where(big, torch.ones_like(self.scale), self.scale))

    # ------------------------------------------------------------------ introspection

    def _table_slots(self, table: int) -> slice:
        b0 = sum(self.num_buckets_per_table[:table])
        return slice(b0, b0 + self.num_buckets_per_table[table])

    def hot_keys(self, table: int = 0) -> torch.Tensor:
        """Keys (``fingerprint32`` of the ids) of ``table``'s hot slots, sorted. int64 [hot]."""
        s = self._table_slots(table)
        hot = self.slot_state[s] >= 0
        return torch.sort(self.slot_keys[s][hot].to(torch.int64) & _LOW32).values

    def stats(self, table: int = 0) -> Dict[str, int]:
        """Counters of one table (host sync: for reporting, not for the training step)."""
        s = self._table_slots(table)
        p0 = sum(self.pool_rows_per_table[:table])
        pool = self.pool_state[p0 : p0 + self.pool_rows_per_table[table]]
        return {
            "tracked_ids": int((self.slot_state[s] != EMPTY).sum()),
            "hot_ids": int((self.slot_state[s] >= 0).sum()),
            "pool_rows": self.pool_rows_per_table[table],
            "owned_rows": int((pool == OWNED).sum()),
            "promotions": int(self.promotions[table]),
            "demotions": int(self.demotions[table]),
            "rejected_scores": int(self.rejected[table]),
            "updates": int(self.step),
        }

    def total_mass(self, table: int = 0) -> torch.Tensor:
        """Sum of real scores over one table's slots (float64, 0-dim)."""
        return self.slot_scores[self._table_slots(table)].to(torch.float64).sum() / self.scale[table]
