"""The compiled CPU kernels (``torchrec_cafe._C``, built by the set-up from ``torchrec_cafe/csrc``)
as ``torch.ops.torchrec_cafe.*`` operators: HotSketch's update and lookup here, the remap's
(``torch.ops.torchrec_cafe.remap``) in ``torchrec_cafe/remap.py``, a migration's row copies
(``migrate_rows``) in ``torchrec_cafe/rows.py``.

They apply an update and answer lookups serially, one hash probe per pair, on the sketch's own
buffers and with its exact semantics: the state after every update and every lookup equals the
tensor implementation's bit for bit (tested on random and Zipf streams, decay, quarantine,
displacement, many tables). ``HotSketch`` uses them on CPU unless ``fixed_shapes`` is set or
``use_kernels`` is off; the tensor code stays the reference and the path on other devices.
"""

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

try:
    from torchrec_cafe import _C  # noqa: F401  (registers the operators)

    AVAILABLE = True
except ImportError:  # not built: the tensor implementation serves
    AVAILABLE = False

if TYPE_CHECKING:
    from torchrec_cafe.sketch.hot_sketch import HotSketch

Update = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def lookup_state(sketch: "HotSketch") -> List[torch.Tensor]:
    """What the lookup reads, in the operators' argument order: slot keys and states, pool states,
    bucket and pool layout."""
    s = sketch
    return [s.slot_keys, s.slot_state, s.pool_state, s._bucket_offset, s._buckets, s._pool_offset, s._pool]


def _update_state(sketch: "HotSketch", bucket_seed_offset: int, pool_seed_offset: int, min_load: float) -> list:
    """The state and settings both update operators take (csrc: SKETCH_STATE_SCHEMA)."""
    s = sketch
    return [
        s.slot_keys, s.slot_scores, s.slot_state, s.pool_state, s.scale, s.mass, s.mass_since_decay,
        s.promotions, s.demotions, s.dropped_mass, s.demotion_floor(),
        s._bucket_offset, s._buckets, s._pool_offset, s._pool, s._threshold, s._decay, s._decay_mass,
        s._promote_load, s._demote_load, s._fixed, s._max_promotions,
        s.quarantine, bucket_seed_offset, pool_seed_offset, min_load, s.displace_ratio,
    ]  # fmt: skip


def update(
    sketch: "HotSketch", keys: torch.Tensor, ids: torch.Tensor, quanta: torch.Tensor, ok: torch.Tensor,
    tables: torch.Tensor, bucket_seed_offset: int, pool_seed_offset: int, min_load: float,
) -> Update:
    """One update of occurrences (keys [N] int64 < 2**32, ids [N], integer quanta [N], valid [N],
    tables [N]): (tables, ids, src, src_blocked, dst, promoted) per candidate in promotion order,
    the freed pool rows [sum P] bool and the accepted real mass per table [T] float64."""
    state = _update_state(sketch, bucket_seed_offset, pool_seed_offset, min_load)
    return torch.ops.torchrec_cafe.sketch_update(keys, ids, quanta, ok, tables, *state)


def update_scores(
    sketch: "HotSketch", ids: torch.Tensor, scores: torch.Tensor, tables: torch.Tensor, bucket_seed_offset: int,
    pool_seed_offset: int, min_load: float,
) -> Update:
    """``update`` from raw occurrences (ids [N] int64, float scores [N], tables [N]): fingerprints,
    quantisation and the bad-score counts (``sketch.rejected``) in the kernel too."""
    state = _update_state(sketch, bucket_seed_offset, pool_seed_offset, min_load)
    return torch.ops.torchrec_cafe.sketch_update_scores(ids, scores, tables, sketch.rejected, *state)


def lookup(
    sketch: "HotSketch", keys: torch.Tensor, tables: Optional[torch.Tensor], bucket_seed_offset: int,
    pool_seed_offset: int, from_ids: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``HotSketch.lookup_keys`` (``from_ids``: ``HotSketch.lookup``, ``keys`` holding int64 ids, the
    fingerprints taken in the kernel): (row within the table's pool, hot, blocked), [N] each.
    ``tables`` None: every key in table 0."""
    return torch.ops.torchrec_cafe.sketch_lookup(
        keys, tables, from_ids, *lookup_state(sketch), bucket_seed_offset, pool_seed_offset
    )
