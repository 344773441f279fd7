"""HotSketch against the sequential pure-Python reference (tests/sketch_reference.py), plus the
batch-semantics invariants of the module docstring: order independence, mass conservation, hot
slots never taken over, pool rows owned by one key, adaptive bars with hysteresis, quarantine, bad
scores, checkpoints, empty/invalid input, renormalisation, extreme ids, exact memory."""

import copy
import math
import os
import sys

import numpy as np
import pytest
import torch

from torchrec_cafe.sketch import HotSketch, kernels
from torchrec_cafe.sketch.hashing import fingerprint32
from torchrec_cafe.sketch.hot_sketch import pool_choices

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sketch_reference import Q, RefSketch, key_of  # noqa: E402

EMPTY, COLD = -2, -1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, params=["kernels", "tensor", "fixed-shape"], ids=["cpu-kernels", "cpu-path", "fixed-shape-path"])
def code_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every test runs on the compiled CPU kernels, on the tensor CPU path (trims padding, skips
    empty phases) and on the fixed-shape, sync-free path that accelerators take: all must give
    the same state."""
    if request.param == "kernels" and not kernels.AVAILABLE:
        pytest.skip("torchrec_cafe._C is not built")
    monkeypatch.setattr(HotSketch, "fixed_shapes", request.param == "fixed-shape")
    monkeypatch.setattr(HotSketch, "use_kernels", request.param == "kernels")
    return request.param == "fixed-shape"


def make_pair(**cfg):
    sk = HotSketch(**cfg)
    return sk, RefSketch(**cfg, bucket_of=lambda keys: sk.bucket_of(keys, torch.zeros_like(keys)))


def universe(rng, n):
    """n distinct int64 ids spread over the whole int64 range (negatives and huge ones included)."""
    ids = np.unique(rng.integers(I64_MIN, I64_MAX, size=2 * n, dtype=np.int64, endpoint=True))
    return rng.permutation(ids)[:n]


def draw_ids(rng, pool, n, dist):
    if dist == "zipf":  # rank r with probability ~ r**-1.2, clipped to the pool
        ranks = np.minimum(rng.zipf(1.2, n), len(pool)) - 1
    else:
        ranks = rng.integers(0, len(pool), n)
    return pool[ranks]


def draw_scores(rng, n, mode):
    if mode == "freq":
        return np.ones(n, np.float32)
    s = rng.exponential(1.0, n).astype(np.float32)
    s[rng.random(n) < 0.05] = 0.0  # zero scores are valid (inserted with score 0)
    return s


def feed(sk, ref, ids, scores):
    out = sk.update(torch.as_tensor(np.asarray(ids), dtype=torch.int64), torch.as_tensor(np.asarray(scores, np.float32)))
    ref.update(list(map(int, ids)), [float(s) for s in scores])
    return out


def slot_key(v: int) -> int:
    return v & 0xFFFFFFFF


def assert_same(sk, ref, exact, rtol=1e-5, out=None, probe=()):
    """Everything observable in ``sk`` equals the reference (scores within rtol unless exact)."""
    K, c = sk.num_buckets, sk.slots_per_bucket
    keys, state = sk.slot_keys[:K].tolist(), sk.slot_state[:K].tolist()
    real = (sk.slot_scores[:K].double() / sk.scale).tolist()
    for b in range(K):
        for i in range(c):
            r, where = ref.buckets[b][i], f"update {ref.t}, bucket {b}, slot {i}"
            if r is None:
                assert state[b][i] == EMPTY, where
                continue
            assert (slot_key(keys[b][i]), state[b][i]) == (r[0], r[2]), f"{where}: {keys[b][i], state[b][i]} vs {r}"
            if exact:
                assert real[b][i] == r[1], f"{where}: {real[b][i]} vs {r}"
            else:
                assert math.isclose(real[b][i], r[1], rel_tol=rtol, abs_tol=1e-30), f"{where}: {real[b][i]} vs {r}"
    assert sk.pool_state[: sk.pool_rows].tolist() == ref.pool
    assert sk.hot_keys().tolist() == ref.hot_keys()
    assert int(sk.step) == ref.t
    assert int(sk.promotions) == ref.promotions and int(sk.demotions) == ref.demotions
    assert int(sk.rejected) == ref.rejected
    assert float(sk.dropped_mass) == ref.dropped_q / Q
    assert float(sk.mass_since_decay) == ref.mass_since_decay_q / Q
    mass = float(sk.mass / sk.scale)
    assert mass == ref.mass if exact else math.isclose(mass, ref.mass, rel_tol=rtol)
    if len(probe):
        x = torch.tensor(sorted(set(map(int, probe))), dtype=torch.int64)
        row, hot, blocked = sk.lookup(x)
        assert list(zip(row.tolist(), hot.tolist(), blocked.tolist())) == [ref.reads(k) for k in key_of(x.tolist())]
        got, want = sk.query_scores(x).tolist(), [ref.score(k) for k in key_of(x.tolist())]
        assert got == want if exact else np.allclose(got, want, rtol=rtol, atol=1e-30)
    if out is not None:  # the SketchUpdate of the last update
        m = out.promoted
        got = list(zip(out.ids[m].tolist(), out.src[m].tolist(), out.src_blocked[m].tolist(), out.dst[m].tolist()))
        assert got == [(i, s, b, d) for _, i, s, b, d in ref.last_promoted]
        assert out.demoted.nonzero().flatten().tolist() == ref.last_demoted
        assert float(out.accepted_mass) == ref.last_mass_q / Q


def run_stream(cfg, dist, mode, steps, batch, seed, exact, pool_size):
    rng = np.random.default_rng(seed)
    pool = universe(rng, pool_size)
    sk, ref = make_pair(**cfg)
    for _ in range(steps):
        ids = draw_ids(rng, pool, batch, dist)
        out = feed(sk, ref, ids, draw_scores(rng, batch, mode))
        assert_same(sk, ref, exact=exact, out=out, probe=ids[:64])
    return sk, ref


# ----------------------------------------------------------------------------- vs reference

# Frequency mode with decay 0.5 (or 1) and power-of-two pools: every stored value and bar is a
# dyadic rational that fits float32's 24-bit mantissa over these runs, so *everything*, scores
# included, must be bit-equal.
FREQ_CASES = [
    # dist, K, c, P, threshold, decay, decay_mass, quarantine, steps, batch, id pool
    ("uniform", 32, 4, 64, None, 0.5, 4000.0, 0, 100, 256, 400),
    ("zipf", 16, 2, 32, None, 0.5, 3000.0, 2, 100, 256, 3000),
    ("zipf", 64, 4, 32, 5.0, 0.5, 4000.0, 1, 100, 256, 5000),
    ("zipf", 16, 4, 16, 0.0, 1.0, None, 0, 60, 128, 2000),  # threshold 0, no decay
    ("zipf", 32, 4, 8, 2.0, 1.0, None, 3, 100, 256, 3000),  # small pool, low threshold: blocked keys
]


def case_config(case):
    """(sketch kwargs, dist, steps, batch, id pool) of a FREQ_CASES / FLOAT_CASES row."""
    dist, K, c, P, thr, decay, dm, quar, steps, batch, pool = case
    cfg = dict(num_buckets=K, pool_rows=P, threshold=thr, slots_per_bucket=c, decay=decay, decay_mass=dm, quarantine=quar)
    if thr is None:  # adaptive bars near the hot/cold boundary of these small streams: demotions happen
        cfg.update(promote_load=0.5, demote_load=0.25)
    return cfg, dist, steps, batch, pool


def case_id(c):
    return f"{c[0]}-K{c[1]}-c{c[2]}-P{c[3]}-{'adaptive' if c[4] is None else 'fixed'}"


@pytest.mark.parametrize("case", FREQ_CASES, ids=case_id)
def test_frequency_mode_matches_reference_exactly(case):
    cfg, dist, steps, batch, pool = case_config(case)
    sk, ref = run_stream(cfg, dist, "freq", steps, batch, seed=cfg["num_buckets"] * 31 + cfg["slots_per_bucket"], exact=True, pool_size=pool)
    assert ref.promotions > 0
    if cfg["pool_rows"] < 16:  # every row owned: later keys were blocked
        assert all(r == 1 for r in ref.pool)
    elif cfg["decay"] < 1 or cfg["threshold"] is None:  # the run really exercised demotions
        assert ref.demotions > 0
    if cfg["decay"] < 1:
        assert ref.decays >= 2


FLOAT_CASES = [
    ("zipf", 32, 4, 64, None, 0.9, 2000.0, 0, 150, 256, 4000),
    ("zipf", 16, 2, 24, 10.0, 0.9, 1000.0, 3, 150, 256, 3000),
    ("uniform", 64, 4, 100, None, 0.9, 1500.0, 1, 120, 256, 1500),
]


@pytest.mark.parametrize("case", FLOAT_CASES, ids=case_id)
def test_float_scores_match_reference(case):
    cfg, dist, steps, batch, pool = case_config(case)
    _, ref = run_stream(cfg, dist, "float", steps, batch, seed=cfg["num_buckets"] * 17 + cfg["slots_per_bucket"], exact=False, pool_size=pool)
    assert ref.promotions > 0 and ref.decays >= 2 and ref.demotions > 0


def shifted_stream(cfg, mode, steps=160, batch=256, seed=5):
    """A Zipf stream whose popular keys change half-way (disjoint universes), fed to a sketch and
    the reference, compared after every update. Returns both and the new universe (head first)."""
    rng = np.random.default_rng(seed)
    old, new = universe(rng, 3000), universe(rng, 3000)
    sk, ref = make_pair(**cfg)
    for step in range(steps):
        ids = draw_ids(rng, old if step < steps // 2 else new, batch, "zipf")
        out = feed(sk, ref, ids, draw_scores(rng, batch, mode))
        assert_same(sk, ref, exact=mode == "freq", out=out, probe=ids[:64])
    return sk, ref, new


@pytest.mark.parametrize(
    "threshold, quarantine, ratio, mode",
    [(None, 0, 2.0, "freq"), (2.0, 1, 4.0, "freq"), (None, 1, 2.0, "float")],
    ids=["adaptive", "fixed-quarantine", "adaptive-float"],
)
def test_displacement_matches_reference_and_hands_the_pool_to_the_new_head(threshold, quarantine, ratio, mode):
    """Without decay, after a popularity shift the old head keeps its rows unless stronger
    candidates demote it (step 8); with displacement the new head holds more of the pool at the end."""
    cfg = dict(num_buckets=32, pool_rows=16, threshold=threshold, slots_per_bucket=4, decay=1.0, quarantine=quarantine,
               promote_load=0.1, demote_load=0.05)
    sk, ref, new = shifted_stream({**cfg, "displace_ratio": ratio}, mode)
    assert ref.displacements > 0
    _, still, _ = shifted_stream(cfg, mode)
    assert still.displacements == 0
    head = set(key_of(new[:40].tolist()))
    assert len(head & set(ref.hot_keys())) > len(head & set(still.hot_keys()))


@pytest.mark.parametrize("threshold, ratio", [(None, 0.0), (None, 2.0), (2.0, 0.0)], ids=["adaptive", "displace", "fixed"])
def test_max_promotions_matches_reference_and_bounds_every_update(threshold, ratio):
    """With max_promotions m, an update promotes at most m keys, the strongest m candidates claim
    rows first, the rest wait (and do not displace): state equal to the reference after every update."""
    cap = 3
    cfg = dict(num_buckets=32, pool_rows=64, threshold=threshold, slots_per_bucket=4, decay=0.5, decay_mass=800.0,
               quarantine=1, promote_load=0.2, demote_load=0.1, displace_ratio=ratio, max_promotions=cap)
    assert HotSketch(**cfg).promotion_capacity == cap and HotSketch(**{**cfg, "max_promotions": 0}).promotion_capacity is None
    rng = np.random.default_rng(11)
    old, new = universe(rng, 2000), universe(rng, 2000)
    sk, ref = make_pair(**cfg)
    free = HotSketch(**{**cfg, "max_promotions": 0})
    per_update, uncapped = [], []
    for step in range(120):
        ids = draw_ids(rng, old if step < 60 else new, 256, "zipf")
        scores = draw_scores(rng, 256, "freq")
        out = feed(sk, ref, ids, scores)
        assert_same(sk, ref, exact=False, out=out, probe=ids[:64])  # decayed scores: float rounding
        per_update.append(int(out.promoted.sum()))
        uncapped.append(int(free.update(torch.from_numpy(ids), torch.from_numpy(scores)).promoted.sum()))
    assert max(per_update) == cap and max(uncapped) > cap  # the cap bound some updates
    assert ref.promotions > 2 * cap and ref.demotions > 0


# ----------------------------------------------------------------------------- invariants


def owned_rows_match_hot_slots(sk: HotSketch) -> None:
    """Every owned pool row belongs to exactly one hot slot's chosen row, and vice versa."""
    for t in range(sk.num_tables):
        s = sk._table_slots(t)
        state, keys = sk.slot_state[s], sk.slot_keys[s].to(torch.int64) & 0xFFFFFFFF
        hot = state >= 0
        rows = pool_choices(keys[hot], torch.full((int(hot.sum()),), sk.pool_rows_per_table[t]))
        mine = rows.gather(1, state[hot].to(torch.int64).unsqueeze(1)).squeeze(1)
        p0 = sum(sk.pool_rows_per_table[:t])
        owned = (sk.pool_state[p0 : p0 + sk.pool_rows_per_table[t]] == 1).nonzero().flatten()
        assert sorted(mine.tolist()) == owned.tolist()


def test_order_and_split_independence():
    """Shuffled, split into duplicates, pre-aggregated: bit-identical buffers after every update."""
    cfg = dict(num_buckets=16, pool_rows=40, slots_per_bucket=2, decay=0.9, decay_mass=600.0, quarantine=1)
    rng = np.random.default_rng(7)
    pool = universe(rng, 2000)
    sketches = [HotSketch(**cfg) for _ in range(4)]
    bad = np.array([np.nan, np.inf, -1.0])
    for step in range(60):
        ids = draw_ids(rng, pool, 200, "zipf")
        k = rng.integers(0, 3 * Q, ids.size)  # scores k / Q: exact in float64, so sums are exact
        a = rng.integers(0, k + 1)
        bad_ids = rng.choice(pool, bad.size)
        variants = [(np.r_[ids, bad_ids], np.r_[k / Q, bad])]
        p = rng.permutation(ids.size + bad.size)
        variants.append((np.r_[ids, bad_ids][p], np.r_[k / Q, bad][p]))
        split_ids, split_s = np.r_[ids, ids, bad_ids], np.r_[a / Q, (k - a) / Q, bad]
        p = rng.permutation(split_ids.size)
        variants.append((split_ids[p], split_s[p]))
        uid, inv = np.unique(ids, return_inverse=True)
        agg = np.bincount(inv, weights=k).astype(np.int64)
        variants.append((np.r_[bad_ids, uid[::-1]], np.r_[bad, agg[::-1] / Q]))
        for sk, (x, s) in zip(sketches, variants):
            sk.update(torch.tensor(x, dtype=torch.int64), torch.tensor(s, dtype=torch.float64))
        base = sketches[0].state_dict()
        for sk in sketches[1:]:
            for name, v in sk.state_dict().items():
                assert torch.equal(v, base[name]), (step, name)
        owned_rows_match_hot_slots(sketches[0])
    assert int(sketches[0].promotions) > 0 and int(sketches[0].demotions) > 0
    assert int(sketches[0].rejected) == 60 * bad.size

    # Arbitrary (non-dyadic) float32 scores: shuffling alone is still bit-identical.
    s1, s2 = HotSketch(**cfg), HotSketch(**cfg)
    for _ in range(30):
        ids = draw_ids(rng, pool, 300, "zipf")
        scores = draw_scores(rng, ids.size, "float") * 3
        p = rng.permutation(ids.size)
        s1.update(torch.tensor(ids), torch.tensor(scores))
        s2.update(torch.tensor(ids[p]), torch.tensor(scores[p]))
    for name, v in s1.state_dict().items():
        assert torch.equal(v, s2.state_dict()[name]), name


@pytest.mark.parametrize("mode", ["freq", "float"])
def test_mass_conservation_without_decay(mode):
    # Few slots, a large pool and a low fixed threshold: buckets fill with hot slots and drop mass.
    sk, ref = make_pair(num_buckets=8, pool_rows=64, threshold=3.0, slots_per_bucket=2, decay=0.5, decay_mass=1e15)
    rng = np.random.default_rng(3)
    pool = universe(rng, 500)
    inserted_q = 0
    for _ in range(60):
        ids = draw_ids(rng, pool, 128, "zipf")
        scores = draw_scores(rng, ids.size, mode)
        feed(sk, ref, ids, scores)
        inserted_q += sum(round(float(s) * Q) for s in scores)
        want = inserted_q / Q - float(sk.dropped_mass)
        if mode == "freq":
            assert float(sk.total_mass()) == want
        else:
            assert math.isclose(float(sk.total_mass()), want, rel_tol=1e-6)
        assert float(sk.dropped_mass) == ref.dropped_q / Q
        assert math.isclose(float(sk.mass), inserted_q / Q, rel_tol=1e-12)  # accepted mass, dropped included
    assert float(sk.scale) == 1.0 and ref.decays == 0
    assert float(sk.dropped_mass) > 0  # the all-hot-bucket path really ran
    assert_same(sk, ref, exact=(mode == "freq"))


def same_bucket_ids(sk, n, start=0):
    cand = torch.arange(start, start + 200 * n * sk.num_buckets, dtype=torch.int64)
    b = sk.bucket_of(fingerprint32(cand), torch.zeros_like(cand))
    return cand[b == b[0]][:n].tolist()


def test_hot_slot_never_taken_over():
    # A fixed threshold: `victim` becomes hot; a flood of much heavier newcomers into its bucket
    # keeps taking over the cold slots but never the hot one, although it has the lowest score.
    sk, ref = make_pair(num_buckets=4, pool_rows=64, threshold=5.0, slots_per_bucket=4, decay=1.0)
    ids = same_bucket_ids(sk, 200)
    victim, flood = ids[0], ids[1:]
    feed(sk, ref, [victim], [5.0])
    assert sk.lookup(torch.tensor([victim]))[1].tolist() == [True]
    for t in range(20):
        new = flood[t * 9 : (t + 1) * 9]
        feed(sk, ref, new, [2.0 + 0.25 * i for i in range(len(new))])  # below the threshold: stay cold
        assert_same(sk, ref, exact=True, probe=[victim] + new)
        assert sk.lookup(torch.tensor([victim]))[1].tolist() == [True]
        assert sk.query_scores(torch.tensor([victim])).tolist() == [5.0]
    b = ref.where[key_of([victim])[0]][0]
    assert all(s[1] > 5.0 for s in ref.buckets[b] if s[2] < 0)  # takeovers did happen

    # c = 2, every slot hot: the newcomers' whole mass is dropped and nothing changes.
    sk, ref = make_pair(num_buckets=4, pool_rows=64, threshold=5.0, slots_per_bucket=2, decay=1.0)
    ids = same_bucket_ids(sk, 40)
    feed(sk, ref, ids[:1], [5.0])  # slot 0, hot
    feed(sk, ref, ids[1:11], [1.0] * 10)  # fills slot 1, then takeover 1 + 9 = 10 -> hot
    assert_same(sk, ref, exact=True)
    first, second = sorted(ids[1:11], key=lambda x: key_of([x])[0])[:2]  # equal scores: key order
    probe = torch.tensor([ids[0], first, second])
    assert sk.lookup(probe)[1].tolist() == [True, False, True]
    assert sk.query_scores(probe).tolist() == [5.0, 0.0, 10.0]
    before = {k: v.clone() for k, v in sk.state_dict().items()}
    feed(sk, ref, ids[11:21], [2.0] * 10)
    assert float(sk.dropped_mass) == 20.0
    for k, v in sk.state_dict().items():
        if k not in ("step", "dropped_mass", "mass_since_decay", "mass"):
            assert torch.equal(v, before[k]), k
    assert_same(sk, ref, exact=True)


def test_hot_rows_are_private_and_cold_keys_read_around_them():
    """A hot key owns one of its choices; every other key whose choice it was reads its next
    unowned choice (never the owned row); with every choice owned a key is 'blocked'."""
    P = 8
    sk, ref = make_pair(num_buckets=64, pool_rows=P, threshold=4.0, decay=1.0)
    ids = torch.arange(5000)
    rows = pool_choices(fingerprint32(ids), torch.full((5000,), P))
    hot_id = int(ids[0])
    partners = ids[(rows[:, 0] == rows[0, 0]) & (ids != hot_id)][:5]
    before = sk.lookup(partners)[0]
    assert (before == rows[0, 0]).all()  # they shared the hot key's first choice
    out = feed(sk, ref, [hot_id], [4.0])
    assert out.promoted[0] and int(out.dst[0]) == int(rows[0, 0]) == int(out.src[0])  # kept its own row
    row, hot, blocked = sk.lookup(partners)
    assert not hot.any() and not blocked.any() and (row != rows[0, 0]).all()
    assert (row == rows[partners, 1]).all() | ((rows[partners, 1] == rows[0, 0]) & (row == rows[partners, 2])).all()
    # Fill the pool: keys whose every choice is owned are blocked (they read their first choice).
    heavy = ids[1:200].tolist()
    feed(sk, ref, heavy, [4.0] * len(heavy))
    assert_same(sk, ref, exact=True, probe=ids[:300].tolist())
    owned_rows_match_hot_slots(sk)
    assert int((sk.pool_state[:P] == 1).sum()) == P
    row, hot, blocked = sk.lookup(ids[1000:1100])
    assert blocked[~hot].all() and (row[blocked] == rows[1000:1100][blocked, 0]).all()


def test_promotion_rounds_first_candidate_wins_a_contested_row():
    """Two candidates with the same first choice: the stronger one gets it, the other its second."""
    P = 16
    sk, ref = make_pair(num_buckets=64, pool_rows=P, threshold=1.0, decay=1.0)
    ids = torch.arange(20000)
    rows = pool_choices(fingerprint32(ids), torch.full((20000,), P))
    a = int(ids[0])
    b = int(ids[(rows[:, 0] == rows[0, 0]) & (rows[:, 1] != rows[0, 0]) & (ids != a)][0])
    out = feed(sk, ref, [a, b], [2.0, 3.0])
    assert_same(sk, ref, exact=True, out=out, probe=[a, b])
    assert out.dst[out.promoted].tolist() == [int(rows[b, 0]), int(rows[a, 1])]  # b (stronger) first: wins row 0
    assert out.src[out.promoted].tolist() == [int(rows[b, 0]), int(rows[a, 0])]  # both read their first choice before


def test_adaptive_bars_follow_the_load_with_hysteresis():
    """Adaptive: promoted at promote_load x the average pool-row load (at least MIN_LOAD), demoted
    below demote_load x it; a key carrying a constant share of the traffic keeps its row."""
    P = 16
    sk, ref = make_pair(num_buckets=64, pool_rows=P, promote_load=1.0, demote_load=0.5, decay=1.0)
    rng = np.random.default_rng(4)
    heavy, light = 7, 8  # heavy: 1/8 of the traffic (2x a row's share of 1/16); light: below it
    background = universe(rng, 4000)
    for step in range(30):
        ids = np.r_[[heavy] * 32, [light] * 4, rng.choice(background, 220)]
        out = feed(sk, ref, ids, np.ones(ids.size))
        assert_same(sk, ref, exact=True, out=out, probe=[heavy, light])
        if step == 0:  # load = max(256 / 16, 4) = 16: heavy (32) promoted, light (4) not
            assert sk.lookup(torch.tensor([heavy, light]))[1].tolist() == [True, False]
    assert sk.lookup(torch.tensor([heavy, light]))[1].tolist() == [True, False]
    assert int(sk.demotions) == 0 or key_of([heavy])[0] in ref.hot_keys()
    # The heavy key stops: it keeps its row until the load grows past 2x its score (hysteresis).
    score = float(sk.query_scores(torch.tensor([heavy])))
    for step in range(100):  # demoted once the load passes 2 x 960, after about 90 steps
        ids = rng.choice(background, 256)
        feed(sk, ref, ids, np.ones(ids.size))
        load = float(sk.mass / sk.scale) / P
        assert bool(sk.lookup(torch.tensor([heavy]))[1]) == (score >= 0.5 * load)
    assert not bool(sk.lookup(torch.tensor([heavy]))[1])
    assert_same(sk, ref, exact=True, probe=[heavy, light])


def test_demotion_frees_pool_row_with_quarantine():
    q = 2
    P = 64
    sk, ref = make_pair(num_buckets=64, pool_rows=P, threshold=10.0, slots_per_bucket=4, decay=0.5, decay_mass=50.0, quarantine=q)
    ids = torch.arange(20000)
    rows = pool_choices(fingerprint32(ids), torch.full((20000,), P))
    A = 0
    # B and C: first choice A's first choice; fillers: other buckets, no promotion.
    same = ids[(rows[:, 0] == rows[A, 0]) & (ids != A)].tolist()
    B, C = same[0], same[1]
    fillers = list(range(20000, 20005))
    out = feed(sk, ref, [A], [12.0])  # update 0: A owns its first choice
    assert int(out.dst[0]) == int(rows[A, 0])
    out = feed(sk, ref, fillers, [8.0] * 5)  # update 1: mass 52 > 50 -> decay, A 6 < 10 demoted
    assert out.demoted.nonzero().flatten().tolist() == [int(rows[A, 0])] and float(sk.scale) == 2.0
    assert int(sk.pool_state[rows[A, 0]]) == -q and sk.hot_keys().numel() == 0
    assert sk.query_scores(torch.tensor([A])).tolist() == [6.0]  # demoted, still tracked
    assert int(sk.lookup(torch.tensor([B]))[0]) == int(rows[B, 0])  # a quarantined row is readable
    out = feed(sk, ref, [B], [20.0])  # update 2: B cannot claim the quarantined row: takes its 2nd
    assert int(out.dst[0]) == int(rows[B, 1])
    out = feed(sk, ref, [C], [20.0])  # update 3: still quarantined (free from update 1 + q + 1 = 4)
    assert int(out.dst[0]) != int(rows[C, 0])
    assert_same(sk, ref, exact=True, out=out, probe=[A, B, C])
    sk2, ref2 = make_pair(num_buckets=64, pool_rows=P, threshold=10.0, decay=0.5, decay_mass=50.0, quarantine=q)
    for x, s in (([A], [12.0]), (fillers, [8.0] * 5), ([999999], [1.0]), ([999998], [1.0])):
        feed(sk2, ref2, x, s)
    out = feed(sk2, ref2, [B], [20.0])  # update 4: the row is free again
    assert int(out.dst[0]) == int(rows[B, 0])
    assert_same(sk2, ref2, exact=True, out=out, probe=[A, B, C])


def test_decay_fires_strictly_above_decay_mass():
    # Default decay_mass = 10 * K * max(threshold, 1) = 40 here; exactly 40 does not decay.
    sk, ref = make_pair(num_buckets=4, pool_rows=8, threshold=0.5, slots_per_bucket=2, decay=0.5)
    assert float(sk._decay_mass[0]) == 40.0
    feed(sk, ref, [1, 2, 3], [20.0, 15.0, 5.0])
    assert float(sk.scale) == 1.0 and float(sk.mass_since_decay) == 40.0
    out = feed(sk, ref, [1], [2.0**-16])  # one quantum more: 40 + 2**-16 > 40
    assert float(sk.scale) == 2.0 and float(sk.mass_since_decay) == 0.0 and ref.decays == 1
    assert sk.query_scores(torch.tensor([1, 2, 3])).tolist() == [10.0 + 2.0**-17, 7.5, 2.5]
    assert_same(sk, ref, exact=True, out=out, probe=[1, 2, 3])
    adaptive = HotSketch(num_buckets=4, pool_rows=8, slots_per_bucket=2)
    assert float(adaptive._decay_mass[0]) == 10 * 4 * 2  # adaptive: 10 * K * c


def test_bad_scores_rejected_and_harmless():
    sk, ref = make_pair(num_buckets=16, pool_rows=32, slots_per_bucket=4, decay=0.5, decay_mass=400.0)
    rng = np.random.default_rng(11)
    pool = universe(rng, 300)
    for _ in range(20):
        ids = draw_ids(rng, pool, 64, "zipf")
        feed(sk, ref, ids, draw_scores(rng, ids.size, "freq"))
    assert sk.hot_keys().numel() > 0
    fresh = [10**15 + i for i in range(4)]
    known = int(pool[0])
    ids = [fresh[0], fresh[1], fresh[2], fresh[3], known, fresh[0]]
    scores = [float("nan"), float("inf"), float("-inf"), -1.0, 2.0, 3.0]
    out = feed(sk, ref, ids, scores)
    assert int(sk.rejected) == 4 and float(out.accepted_mass) == 5.0
    # Only fresh[0] (one finite occurrence) was inserted; the others were never tracked.
    fk = key_of(fresh)
    assert fk[0] in ref.where and not any(x in ref.where for x in fk[1:])
    assert sk.query_scores(torch.tensor(fresh[1:])).tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(sk.slot_scores).all()
    assert_same(sk, ref, exact=True, out=out, probe=ids)

    before = {k: v.clone() for k, v in sk.state_dict().items()}
    bad = [float("nan"), float("inf"), float("-inf"), -0.5, -1e30]
    sk.update(torch.tensor([known, *fresh], dtype=torch.int64), torch.tensor(bad))
    for k, v in sk.state_dict().items():
        if k == "step":
            assert int(v) == int(before[k]) + 1
        elif k == "rejected":
            assert int(v) == int(before[k]) + len(bad)
        else:
            assert torch.equal(v, before[k]), k


def test_state_dict_round_trip():
    cfg = dict(num_buckets=16, pool_rows=48, slots_per_bucket=4, decay=0.9, decay_mass=500.0, quarantine=1)
    rng = np.random.default_rng(5)
    pool = universe(rng, 2000)
    batches = [(draw_ids(rng, pool, 128, "zipf"), draw_scores(rng, 128, "float")) for _ in range(60)]
    a, ref = make_pair(**cfg)
    for ids, s in batches[:30]:
        feed(a, ref, ids, s)
    b = HotSketch(**cfg)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for ids, s in batches[30:]:
        feed(a, ref, ids, s)
        b.update(torch.tensor(ids), torch.tensor(s))
        for name, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[name]), name
    assert_same(b, ref, exact=False)


def test_empty_batch():
    e_ids, e_s = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    sk, ref = make_pair(num_buckets=8, pool_rows=16, threshold=2.0, slots_per_bucket=2, decay=0.5, decay_mass=30.0)
    out = sk.update(e_ids, e_s)
    ref.update([], [])
    assert int(sk.step) == 1 and float(out.accepted_mass) == 0 and not out.promoted.any()
    assert_same(sk, ref, exact=True)
    for _ in range(10):
        feed(sk, ref, [1, 2, 3, 4, 5, 1, 1], [1.0] * 7)
    before = {k: v.clone() for k, v in sk.state_dict().items()}
    sk.update(e_ids, e_s)
    ref.update([], [])
    for k, v in sk.state_dict().items():
        assert torch.equal(v, before[k] + (1 if k == "step" else 0)), k
    assert_same(sk, ref, exact=True, probe=[1, 2, 3, 4, 5])


def test_invalid_input_raises():
    sk = HotSketch(num_buckets=8, pool_rows=16)
    with pytest.raises(ValueError, match="int64"):
        sk.update(torch.tensor([1, 2], dtype=torch.int32), torch.ones(2))
    with pytest.raises(ValueError, match="int64"):
        sk.update(torch.tensor([1.0, 2.0]), torch.ones(2))
    with pytest.raises(ValueError, match="1-D"):
        sk.update(torch.ones(2, 2, dtype=torch.int64), torch.ones(2, 2))
    with pytest.raises(ValueError, match="1-D"):
        sk.update(torch.ones(3, dtype=torch.int64), torch.ones(2))
    with pytest.raises(ValueError, match="1-D"):
        sk.update(torch.ones(2, dtype=torch.int64), torch.ones(2, 1))
    assert int(sk.step) == 0  # nothing applied
    for bad, field in (
        (dict(num_buckets=0), "num_buckets"), (dict(pool_rows=0), "pool_rows"), (dict(slots_per_bucket=0), "slots_per_bucket"),
        (dict(threshold=-1.0), "threshold"), (dict(decay=0.0), "decay"), (dict(decay=1.5), "decay"),
        (dict(quarantine=-1), "quarantine"), (dict(quarantine=128), "quarantine"),
        (dict(promote_load=0.5, demote_load=1.0), "demote_load"), (dict(demote_load=-1.0), "demote_load"),
    ):
        kw = dict(num_buckets=8, pool_rows=16)
        kw.update(bad)
        with pytest.raises(ValueError, match=field):
            HotSketch(**kw)


def test_keys_are_exact_for_32_bit_ids_and_extremes_go_through():
    assert fingerprint32(torch.arange(1 << 20)).unique().numel() == 1 << 20
    top = torch.arange((1 << 32) - (1 << 16), 1 << 32)
    assert fingerprint32(top).unique().numel() == 1 << 16
    sk, ref = make_pair(num_buckets=8, pool_rows=16, slots_per_bucket=2, decay=0.5, decay_mass=300.0)
    rng = np.random.default_rng(2)
    special = np.array([I64_MIN, I64_MAX, -1, 0, 1, I64_MIN + 1, I64_MAX - 1, -(1 << 40), 1 << 53], dtype=np.int64)
    pool = np.r_[special, universe(rng, 40)]
    for _ in range(40):
        ids = np.r_[special, pool[rng.integers(0, pool.size, 40)]]
        out = feed(sk, ref, ids, np.ones(ids.size, np.float32))
        assert_same(sk, ref, exact=True, out=out, probe=ids)
    assert ref.promotions > 0 and ref.demotions > 0
    tracked = set(slot_key(k) for k in sk.slot_keys[:-1][sk.slot_state[:-1] != EMPTY].tolist())
    assert set(key_of([I64_MIN, I64_MAX])) & tracked  # extremes really went through the sketch


def test_renormalisation_matches_reference():
    # decay 0.5 about every 5 updates: scale passes 2**40 long before the check at update 256.
    sk, ref = make_pair(num_buckets=16, pool_rows=32, slots_per_bucket=4, decay=0.5, decay_mass=600.0, quarantine=1)
    rng = np.random.default_rng(13)
    pool = universe(rng, 1500)
    scales = []
    for t in range(300):
        ids = draw_ids(rng, pool, 128, "zipf")
        out = feed(sk, ref, ids, draw_scores(rng, ids.size, "float"))
        scales.append(float(sk.scale))
        if t % 5 == 0 or t >= 250:
            assert_same(sk, ref, exact=False, out=out, probe=ids[:64])
    assert max(scales) > 2.0**40 and scales[-1] < 2.0**40  # it really renormalised
    assert ref.demotions > 0 and ref.promotions > 0
    assert torch.isfinite(sk.slot_scores).all() and torch.isfinite(sk.mass).all()


def test_fast_decay_does_not_overflow_stored_scores():
    # A decay at every update with decay=0.5 doubles `scale` each update; the renormalisation
    # check runs often enough (every 80 updates here) that float32 stored scores never overflow.
    sk, ref = make_pair(num_buckets=8, pool_rows=16, threshold=5.0, slots_per_bucket=4, decay=0.5, decay_mass=1.0)
    hot = list(range(4))
    for _ in range(150):
        feed(sk, ref, hot, [10.0] * 4)
    filler = [100 + i for i in range(40)]
    for t in range(4):  # the hot ids stop appearing: they must decay and be demoted
        feed(sk, ref, filler[t * 10 : (t + 1) * 10], [1.0] * 10)
    assert torch.isfinite(sk.slot_scores[:-1]).all()
    owned_rows_match_hot_slots(sk)
    got = sk.query_scores(torch.tensor(hot)).tolist()
    assert np.allclose(got, [ref.score(k) for k in key_of(hot)], rtol=1e-5)
    assert sk.hot_keys().tolist() == ref.hot_keys()


def test_round_trip_bit_identical_across_renormalisation():
    # The renormalisation cadence follows `step` (restored by load_state_dict), so a restored
    # sketch renormalises at the same updates as the original.
    cfg = dict(num_buckets=8, pool_rows=16, threshold=5.0, slots_per_bucket=4, decay=0.5, decay_mass=140.0)
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.integers(0, 40, 30)) for _ in range(270)]
    a = HotSketch(**cfg)
    for x in batches[:10]:
        a.update(x, torch.ones(30))
    b = HotSketch(**cfg)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for i, x in enumerate(batches[10:]):
        a.update(x, torch.ones(30))
        b.update(x, torch.ones(30))
        if i % 8 == 7 or i == len(batches) - 11:
            for name, v in a.state_dict().items():
                assert torch.equal(v, b.state_dict()[name]), (10 + i + 1, name)
    assert float(a.scale) < 2.0**40  # (sanity) a renormalised at update 256


def test_huge_scores_are_clamped_and_do_not_overflow():
    # Documented: one occurrence counts at most 2**24; sums of many such occurrences stay exact.
    sk, ref = make_pair(num_buckets=8, pool_rows=16, threshold=5.0, slots_per_bucket=4, decay=1.0)
    out = feed(sk, ref, [0] * 200 + [1], [1e12] * 200 + [3.0])
    assert sk.query_scores(torch.tensor([0])).item() == 200 * 2.0**24
    assert sk.query_scores(torch.tensor([1])).item() == 3.0
    assert float(out.accepted_mass) == 200 * 2.0**24 + 3.0


def test_memory_is_exact_and_lean():
    """nbytes() equals the accounting formulas; a bucket of 4 slots costs 36 bytes (the official
    sketch: 48 with 32-bit ids), plus one byte per pool row."""
    Ks, Ps = [100, 7, 30], [400, 11, 90]
    sk = HotSketch(Ks, Ps, slots_per_bucket=4)
    want = sum(HotSketch.table_state_bytes(k, p, 4) for k, p in zip(Ks, Ps)) + HotSketch.shared_state_bytes(4)
    assert sk.nbytes() == want
    assert HotSketch.table_state_bytes(1001, 0) - HotSketch.table_state_bytes(1000, 0) == 36
    assert HotSketch.table_state_bytes(0, 1001) - HotSketch.table_state_bytes(0, 1000) == 1


# ----------------------------------------------------------------------------- grouped tables


@pytest.mark.parametrize("caps", [[0, 0, 0], [2, 0, 3]], ids=["uncapped", "max-promotions"])
def test_grouped_tables_equal_independent_sketches(caps):
    Ks, Ps, c = [16, 32, 8], [40, 64, 24], 4
    thresholds, decays, masses = [None, 8.0, None], [0.5, 0.7, 0.6], [300.0, 600.0, 150.0]
    T = len(Ks)
    g = HotSketch(Ks, Ps, thresholds, slots_per_bucket=c, decay=decays, decay_mass=masses, quarantine=1, max_promotions=caps)
    singles = [
        HotSketch(Ks[t], Ps[t], thresholds[t], slots_per_bucket=c, decay=decays[t], decay_mass=masses[t], quarantine=1, max_promotions=caps[t])
        for t in range(T)
    ]
    bound = [False] * T  # whether a capped table's cap limited some update
    b0, p0 = np.r_[0, np.cumsum(Ks)], np.r_[0, np.cumsum(Ps)]
    rng = np.random.default_rng(7)
    pool = universe(rng, 3000)  # shared by the tables: ids occur in several of them

    def check_same(probe):
        assert int(g.step) == int(singles[0].step)
        for t, s in enumerate(singles):
            K, P, where = Ks[t], Ps[t], f"update {int(g.step)}, table {t}"
            bs = slice(b0[t], b0[t] + K)
            for name in ("slot_keys", "slot_scores", "slot_state"):
                assert torch.equal(getattr(g, name)[bs], getattr(s, name)[:K]), (where, name)
            assert torch.equal(g.pool_state[p0[t] : p0[t] + P], s.pool_state[:P]), where
            for name in ("scale", "mass", "mass_since_decay", "promotions", "demotions", "rejected", "dropped_mass"):
                assert torch.equal(getattr(g, name)[t], getattr(s, name)[0]), (where, name)
            assert torch.equal(g.hot_keys(t), s.hot_keys()), where
            assert g.stats(t) == s.stats() and torch.equal(g.total_mass(t), s.total_mass()), where
            tab = torch.full_like(probe, t)
            for got, want in zip(g.lookup(probe, tab), s.lookup(probe)):
                assert torch.equal(got, want), where
            assert torch.equal(g.query_scores(probe, tab), s.query_scores(probe)), where
        # A mixed-table lookup answers each (table, id) as its own table's sketch does.
        tab = torch.from_numpy(rng.integers(0, T, probe.numel()))
        want = torch.stack([s.lookup(probe)[0] for s in singles]).gather(0, tab.unsqueeze(0)).squeeze(0)
        assert torch.equal(g.lookup(probe, tab)[0], want)

    for step in range(40):
        n = 384
        ids = torch.from_numpy(draw_ids(rng, pool, n, "zipf"))
        tables = torch.from_numpy(rng.integers(0, T, n))
        scores = torch.from_numpy(draw_scores(rng, n, "float"))
        scores[torch.from_numpy(rng.random(n) < 0.02)] = float("nan")
        scores[torch.from_numpy(rng.random(n) < 0.01)] = -1.0
        out = g.update(ids, scores, tables)
        for t, s in enumerate(singles):
            mine = tables == t
            o = s.update(ids[mine], scores[mine])
            p = out.promoted & (out.tables == t)
            for name in ("ids", "src", "src_blocked", "dst"):
                assert torch.equal(getattr(out, name)[p], getattr(o, name)[o.promoted]), name
            assert caps[t] == 0 or int(p.sum()) <= caps[t]
            bound[t] |= caps[t] > 0 and int(p.sum()) == caps[t]
            assert torch.equal(out.demoted[p0[t] : p0[t] + Ps[t]], o.demoted)
        if step % 4 == 3:
            check_same(torch.cat([ids[:64], torch.from_numpy(universe(rng, 16))]))  # seen and unseen ids
    # The stream exercised promotions, decays, demotions, rejections.
    assert (g.promotions > 0).all() and (g.demotions > 0).all() and (g.rejected > 0).all()
    assert (g.scale > 1).all()
    assert all(b or cap == 0 for b, cap in zip(bound, caps))


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("minor_range", [(0, 50), (0, I64_MAX), (-5, 5)], ids=["packable", "too-wide", "negative"])
def test_lexsort_packed_and_two_sort_orders_agree(descending, minor_range):
    """The one-sort packed path (CPU) and the two-sort path (accelerators) give the same stable
    (major asc, minor asc/desc) order, including ties, wide and negative keys (which fall back)."""
    from torchrec_cafe.sketch.ops import lexsort

    g = torch.Generator().manual_seed(3)
    lo, hi = minor_range
    n = 500
    major = torch.randint(0, 7, (n,), generator=g)
    minor = torch.randint(lo, min(hi, 1 << 62), (n,), generator=g)
    minor[:50] = minor[50:100]  # ties
    if hi == I64_MAX:
        minor[100:110] = I64_MAX  # 63-bit keys cannot be packed at all
    expected = sorted(range(n), key=lambda i: (int(major[i]), -int(minor[i]) if descending else int(minor[i]), i))
    for may_sync in (False, True):
        assert lexsort(major, minor, descending, may_sync).tolist() == expected
