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

from typing import TYPE_CHECKING, List, Optional, Tuple, cast

import torch

try:
    from torchrec_cafe import _C  # noqa: F401  (registers the operators)

    AVAILABLE = True
except ImportError:  # not built: the tensor implementation serves
    AVAILABLE = False

if TYPE_CHECKING:
    from torchrec_cafe.sketch.hot_sketch import HotSketch

Update = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# The buffers each operator reads, in its argument order (csrc: SKETCH_STATE_SCHEMA, sketch_lookup).
_LOOKUP_BUFFERS = ("slot_keys", "slot_state", "pool_state", "_bucket_offset", "_buckets", "_pool_offset", "_pool")
_UPDATE_BUFFERS = (
    "slot_keys", "slot_scores", "slot_state", "pool_state", "scale", "mass", "mass_since_decay", "promotions",
    "demotions", "dropped_mass",
)  # fmt: skip
_UPDATE_CONSTANTS = (
    "_bucket_offset", "_buckets", "_pool_offset", "_pool", "_threshold", "_decay", "_decay_mass", "_promote_load",
    "_demote_load", "_fixed", "_max_promotions",
)  # fmt: skip


def _buffers(sketch: "HotSketch", names: Tuple[str, ...]) -> List[torch.Tensor]:
    # From the module's buffer dict: a module attribute lookup costs ~1 us, and an update reads 21.
    b = sketch._buffers
    return [cast(torch.Tensor, b[n]) for n in names]


def lookup_state(sketch: "HotSketch") -> List[torch.Tensor]:
    """What the lookup reads, in the operators' argument order: slot keys and states, pool states,
    bucket and pool layout."""
    return _buffers(sketch, _LOOKUP_BUFFERS)


def _update_state(sketch: "HotSketch", bucket_seed_offset: int, pool_seed_offset: int, min_load: float) -> list:
    """The state and settings both update operators take (csrc: SKETCH_STATE_SCHEMA)."""
    return [
        *_buffers(sketch, _UPDATE_BUFFERS), sketch.demotion_floor(), *_buffers(sketch, _UPDATE_CONSTANTS),
        sketch.quarantine, bucket_seed_offset, pool_seed_offset, min_load, sketch.displace_ratio,
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
