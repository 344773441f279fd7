// HotSketch update and lookup as serial CPU kernels (torch.library operators torchrec_cafe::*).
//
// They implement the batch semantics of torchrec_cafe/sketch/hot_sketch.py (its module docstring)
// on the same buffers, bit for bit: the same integer quanta, the same float32 / float64 operations
// in the same order, the same orderings and ties. The tensor implementation stays the reference
// and the path on other devices; tests compare both after every update.
//
// Orderings the tensor code gets from stable sorts, here total orders on unique pairs (aggregated
// with a hash table, then visited bucket by bucket in address order):
//   newcomers   per bucket by (quanta desc, key asc);
//   candidates  by (table asc, guaranteed stored score desc, key asc).
// Where the tensor code scans every slot for demotions, the kernel skips each run of kFloorRun slots
// of a table whose bar has not passed a lower bound on the run's hot scores (HotSketch.demotion_floor).

#include <torch/extension.h>

#include <cstring>
#include <numeric>
#include <vector>

#include "sketch_common.h"

namespace {

constexpr int64_t kFloorRun = 256;  // slots per demotion floor (hot_sketch.py: _FLOOR_RUN)

Sketch make_sketch(
    at::Tensor& slot_keys, at::Tensor& slot_scores, at::Tensor& slot_state, at::Tensor& pool_state,
    at::Tensor& scale, at::Tensor& mass, at::Tensor& mass_since_decay, at::Tensor& promotions,
    at::Tensor& demotions, at::Tensor& dropped_mass, const at::Tensor& bucket_offset, const at::Tensor& buckets,
    const at::Tensor& pool_offset, const at::Tensor& pool, const at::Tensor& threshold, const at::Tensor& decay,
    const at::Tensor& decay_mass, const at::Tensor& promote_load, const at::Tensor& demote_load,
    const at::Tensor& fixed, const at::Tensor& max_promotions, int64_t quarantine, int64_t bucket_seed_offset, int64_t pool_seed_offset,
    double min_load, double displace_ratio) {
  for (const at::Tensor* t : {&slot_keys, &slot_scores, &slot_state, &pool_state, &scale, &mass, &mass_since_decay,
                              &promotions, &demotions, &dropped_mass}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "sketch buffers must be contiguous CPU tensors");
  }
  Sketch s;
  s.keys = slot_keys.data_ptr<int32_t>();
  s.scores = slot_scores.data_ptr<float>();
  s.state = slot_state.data_ptr<int8_t>();
  s.pool_state = pool_state.data_ptr<int8_t>();
  s.scale = scale.data_ptr<double>();
  s.mass = mass.data_ptr<double>();
  s.mass_since_decay = mass_since_decay.data_ptr<double>();
  s.promotions = promotions.data_ptr<int64_t>();
  s.demotions = demotions.data_ptr<int64_t>();
  s.dropped_mass = dropped_mass.data_ptr<double>();
  s.bucket_offset = bucket_offset.data_ptr<int64_t>();
  s.buckets = buckets.data_ptr<int64_t>();
  s.pool_offset = pool_offset.data_ptr<int64_t>();
  s.pool = pool.data_ptr<int64_t>();
  s.threshold = threshold.data_ptr<double>();
  s.decay = decay.data_ptr<double>();
  s.decay_mass = decay_mass.data_ptr<double>();
  s.promote_load = promote_load.data_ptr<double>();
  s.demote_load = demote_load.data_ptr<double>();
  s.fixed = fixed.data_ptr<bool>();
  s.max_promotions = max_promotions.data_ptr<int64_t>();
  s.num_tables = scale.numel();
  s.c = slot_keys.size(1);
  s.num_buckets = slot_keys.size(0) - 1;  // the last bucket is the sentinel
  s.pool_rows = pool_state.numel() - 1;
  s.quarantine = quarantine;
  s.bucket_seed_offset = bucket_seed_offset;
  s.pool_seed_offset = pool_seed_offset;
  s.min_load = min_load;
  s.displace_ratio = displace_ratio;
  s.pool_mod = moduli<Modulus>(pool);
  s.bucket_mod = moduli<Modulus64>(buckets);
  return s;
}

struct Pair {
  int64_t table, key, id, quanta;
};

// Step 1: the unique (table, key) pairs with at least one valid score, with their summed quanta
// and smallest id, in no particular order: later steps order what they need with total orders.
std::vector<Pair> aggregate(const at::Tensor& keys, const at::Tensor& ids, const at::Tensor& quanta,
                            const at::Tensor& ok, const at::Tensor& tables) {
  const int64_t n = keys.numel();
  auto k = keys.data_ptr<int64_t>();
  auto i = ids.data_ptr<int64_t>();
  auto q = quanta.data_ptr<int64_t>();
  auto v = ok.data_ptr<bool>();
  auto t = tables.data_ptr<int64_t>();
  // Open addressing on the packed (table, key), one 16-byte entry per slot (the packed pair and
  // its index), each occurrence's home slot requested kAhead occurrences ahead.
  struct Entry {
    uint64_t packed;
    int64_t pair;
  };
  constexpr uint64_t kNone = ~0ULL;  // packed values have 47 bits
  constexpr int64_t kAhead = 8;
  size_t cap = 16;
  while (cap < 2 * static_cast<size_t>(n)) cap <<= 1;
  std::vector<Entry> slots(cap, Entry{kNone, 0});
  auto packed_at = [&](int64_t j) { return (static_cast<uint64_t>(t[j]) << 32) | static_cast<uint64_t>(k[j]); };
  auto home = [&](uint64_t packed) { return static_cast<size_t>(finalise64(packed)) & (cap - 1); };
  size_t ahead[kAhead];
  for (int64_t j = 0; j < std::min(n, kAhead); ++j) ahead[j] = home(packed_at(j));
  std::vector<Pair> pairs;
  std::vector<char> valid;
  pairs.reserve(n);
  valid.reserve(n);
  for (int64_t j = 0; j < n; ++j) {
    const uint64_t packed = packed_at(j);
    size_t h = ahead[j % kAhead];
    if (j + kAhead < n) {
      ahead[j % kAhead] = home(packed_at(j + kAhead));
      __builtin_prefetch(&slots[ahead[j % kAhead]]);
    }
    while (slots[h].packed != kNone && slots[h].packed != packed) h = (h + 1) & (cap - 1);
    if (slots[h].packed == kNone) {
      slots[h] = {packed, static_cast<int64_t>(pairs.size())};
      pairs.push_back({t[j], k[j], i[j], 0});
      valid.push_back(0);
    }
    Pair& p = pairs[slots[h].pair];
    p.quanta += q[j];
    p.id = std::min(p.id, i[j]);
    valid[slots[h].pair] |= v[j];
  }
  size_t kept = 0;  // pairs with at least one valid score
  for (size_t x = 0; x < pairs.size(); ++x)
    if (valid[x]) pairs[kept++] = pairs[x];
  pairs.resize(kept);
  return pairs;
}

// Step 3 for one bucket's newcomers (pair positions, in (quanta desc, key asc) order): sets the
// slot each was written to (``written``, -1 if none) and counts the quanta a full bucket lost.
void insert_bucket(Sketch& s, int64_t b, const std::vector<Pair>& pairs, const std::vector<int64_t>& newcomers,
                   std::vector<int64_t>& written, std::vector<int64_t>& lost) {
  const int64_t c = s.c;
  size_t r = 0;
  for (int64_t j = 0; j < c && r < newcomers.size(); ++j) {
    int64_t f = b * c + j;
    if (s.state[f] != kEmpty) continue;
    const Pair& p = pairs[newcomers[r]];
    s.keys[f] = as_int32_bits(p.key);
    s.scores[f] = s.to_stored(p.quanta, p.table);
    s.state[f] = kCold;
    written[newcomers[r]] = f;
    ++r;
  }
  if (r == newcomers.size()) return;
  const Pair& winner = pairs[newcomers[r]];
  int64_t rest = 0;
  for (size_t x = r; x < newcomers.size(); ++x) rest += pairs[newcomers[x]].quanta;
  int64_t low_slot = -1;
  for (int64_t j = 0; j < c; ++j) {
    int64_t f = b * c + j;
    if (s.state[f] == kCold && (low_slot < 0 || s.scores[f] < s.scores[low_slot])) low_slot = f;
  }
  if (low_slot < 0) {
    lost[winner.table] += rest;
    return;
  }
  s.keys[low_slot] = as_int32_bits(winner.key);
  s.scores[low_slot] = s.scores[low_slot] + s.to_stored(rest, winner.table);
  s.state[low_slot] = kCold;
  written[newcomers[r]] = low_slot;
}

// Sorts (bucket << 32 | position) values by bucket, stably (LSD radix sort, 11 bits a pass); every
// bucket is at most ``num_buckets``.
void sort_by_bucket(std::vector<uint64_t>& a, int64_t num_buckets) {
  std::vector<uint64_t> b(a.size());
  int bits = 1;
  while ((int64_t{1} << bits) <= num_buckets) ++bits;
  for (int shift = 32; shift < 32 + bits; shift += 11) {
    std::vector<size_t> start(2049, 0);
    for (const uint64_t x : a) ++start[((x >> shift) & 2047) + 1];
    for (size_t d = 1; d < start.size(); ++d) start[d] += start[d - 1];
    for (const uint64_t x : a) b[start[(x >> shift) & 2047]++] = x;
    a.swap(b);
  }
}

// Step 4 (mass and decay) depends only on the accepted mass: computed before steps 2 and 3, so
// that their pass can test step 5's candidates against the new bars, and written after them
// (they store scores in the old scale).
struct MassStep {
  std::vector<double> mass, since, scale;
  std::vector<float> promote_bar;
  at::Tensor accepted;  // real mass accepted per table [T] float64
};
MassStep mass_step(const Sketch& s, const std::vector<Pair>& pairs) {
  const int64_t T = s.num_tables;
  std::vector<int64_t> accepted_q(T, 0);
  for (const Pair& p : pairs) accepted_q[p.table] += p.quanta;
  MassStep m{std::vector<double>(T), std::vector<double>(T), std::vector<double>(T), std::vector<float>(T),
             at::empty({T}, at::kDouble)};
  double* acc = m.accepted.data_ptr<double>();
  for (int64_t t = 0; t < T; ++t) {
    acc[t] = static_cast<double>(accepted_q[t]) / kQuantum;
    m.mass[t] = s.mass[t] + acc[t] * s.scale[t];
    m.since[t] = s.mass_since_decay[t] + acc[t];
    m.scale[t] = s.scale[t];
    if (m.since[t] > s.decay_mass[t]) {
      m.scale[t] = s.scale[t] / s.decay[t];
      m.since[t] = 0.0;
    }
    m.promote_bar[t] = s.bars_at(t, m.mass[t], m.scale[t]).first;
  }
  return m;
}

// Steps 2, 3 and 5's test, bucket by bucket in address order, so that each bucket's lines are read
// once: tracked keys add their score, newcomers are inserted in (quanta desc, key asc) order, then
// the bucket's keys of this update still there and cold whose guaranteed score reaches the bar
// become candidates (``cand``, their guaranteed scores in ``g``). Buckets are independent, so this
// is the order-free definition's result. Reorders ``pairs`` by bucket; ``written``, ``g`` [n].
void bucket_pass(Sketch& s, std::vector<Pair>& pairs, const std::vector<float>& promote_bar,
                 std::vector<int64_t>& written, std::vector<float>& g, std::vector<int64_t>& cand,
                 std::vector<int64_t>& lost) {
  const int64_t n = static_cast<int64_t>(pairs.size());
  std::vector<int64_t> bucket(n), newcomers;
  for (int64_t j = 0; j < n; ++j) bucket[j] = s.bucket_of(pairs[j].key, pairs[j].table);
  {  // the pairs themselves in bucket order: the pass reads them in sequence
    std::vector<uint64_t> order(n);
    for (int64_t j = 0; j < n; ++j) order[j] = (static_cast<uint64_t>(bucket[j]) << 32) | static_cast<uint64_t>(j);
    sort_by_bucket(order, s.num_buckets);
    std::vector<Pair> sorted(n);
    std::vector<int64_t> sorted_bucket(n);
    for (int64_t x = 0; x < n; ++x) {
      const int64_t j = static_cast<int64_t>(order[x] & 0xFFFFFFFFULL);
      sorted[x] = pairs[j], sorted_bucket[x] = bucket[j];
    }
    pairs.swap(sorted);
    bucket.swap(sorted_bucket);
  }
  constexpr int64_t kAhead = 16;  // the next buckets' lines requested while probing
  for (int64_t a = 0; a < n;) {
    const int64_t b = bucket[a];
    int64_t e = a;
    newcomers.clear();
    for (; e < n && bucket[e] == b; ++e) {
      if (e + kAhead < n) s.prefetch(bucket[e + kAhead] * s.c);
      const int64_t f = s.probe(pairs[e].key, b);
      if (f >= 0) {
        s.scores[f] = s.scores[f] + s.to_stored(pairs[e].quanta, pairs[e].table);
        written[e] = f;
      } else {
        newcomers.push_back(e);
      }
    }
    if (!newcomers.empty()) {
      std::sort(newcomers.begin(), newcomers.end(), [&](int64_t x, int64_t y) {
        if (pairs[x].quanta != pairs[y].quanta) return pairs[x].quanta > pairs[y].quanta;
        return pairs[x].key < pairs[y].key;
      });
      insert_bucket(s, b, pairs, newcomers, written, lost);
    }
    for (int64_t j = a; j < e; ++j) {
      const int64_t f = written[j];
      if (f < 0 || s.keys[f] != as_int32_bits(pairs[j].key) || s.state[f] != kCold) continue;
      g[j] = s.guaranteed(f);
      if (g[j] >= promote_bar[pairs[j].table]) cand.push_back(j);
    }
    a = e;
  }
}

// Step 7 for table t's slots [lo, end): demotes the hot ones scoring below ``bar``; returns the
// lowest score of the hot slots left there (infinity if none).
float demote_below(Sketch& s, int64_t t, int64_t lo, int64_t end, float bar, bool* freed) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float floor = kInf;
  int64_t row4[kChoices];
  for (; lo < end; lo += 8) {
    const int64_t hi = std::min<int64_t>(lo + 8, end);
    int below = 0;
    for (int64_t f = lo; f < hi; ++f) {  // branch-free over eight slots: any hot below the bar, lowest one left
      const bool hot = s.state[f] >= 0;
      below |= hot & (s.scores[f] < bar);
      floor = std::min(floor, hot && s.scores[f] >= bar ? s.scores[f] : kInf);
    }
    if (!below) continue;
    for (int64_t f = lo; f < hi; ++f) {
      if (s.state[f] >= 0 && s.scores[f] < bar) {
        s.choices(static_cast<uint32_t>(s.keys[f]), t, row4);
        s.demote(f, row4[s.state[f]], t, freed);
      }
    }
  }
  return floor;
}

// The demotion floors (HotSketch.demotion_floor): one lower bound on the hot scores of each run of
// kFloorRun slots of a table (a table's last run may be shorter; runs never span tables), so a
// bar that passes one bound scans that run alone.
struct FloorRuns {
  std::vector<int64_t> first;  // per table, its first run [T + 1]
  int64_t of(const Sketch& s, int64_t t, int64_t slot) const { return first[t] + (slot - s.bucket_offset[t] * s.c) / kFloorRun; }
};
FloorRuns floor_runs(const Sketch& s) {
  FloorRuns runs{std::vector<int64_t>(s.num_tables + 1, 0)};
  for (int64_t t = 0; t < s.num_tables; ++t) {
    const int64_t slots = (s.bucket_offset[t + 1] - s.bucket_offset[t]) * s.c;
    runs.first[t + 1] = runs.first[t] + (slots + kFloorRun - 1) / kFloorRun;
  }
  return runs;
}

}  // namespace

// One update (hot_sketch.py: HotSketch._aggregate + _update_pairs, without the step counter and
// the renormalisation). Returns (tables, ids, src, src_blocked, dst, promoted) per candidate in
// promotion order, the freed pool rows [sum P] and the accepted real mass per table [T].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sketch_update(
    const at::Tensor& keys, const at::Tensor& ids, const at::Tensor& quanta, const at::Tensor& ok,
    const at::Tensor& tables, at::Tensor slot_keys, at::Tensor slot_scores, at::Tensor slot_state,
    at::Tensor pool_state, at::Tensor scale, at::Tensor mass, at::Tensor mass_since_decay, at::Tensor promotions,
    at::Tensor demotions, at::Tensor dropped_mass, at::Tensor hot_floor_t, const at::Tensor& bucket_offset,
    const at::Tensor& buckets, const at::Tensor& pool_offset, const at::Tensor& pool, const at::Tensor& threshold,
    const at::Tensor& decay, const at::Tensor& decay_mass, const at::Tensor& promote_load, const at::Tensor& demote_load,
    const at::Tensor& fixed, const at::Tensor& max_promotions, int64_t quarantine, int64_t bucket_seed_offset, int64_t pool_seed_offset,
    double min_load, double displace_ratio) {
  TORCH_CHECK(keys.numel() < (int64_t{1} << 32), "sketch_update: at most 2**32 occurrences at once");  // sort_by_bucket
  Sketch s = make_sketch(slot_keys, slot_scores, slot_state, pool_state, scale, mass, mass_since_decay, promotions,
                         demotions, dropped_mass, bucket_offset, buckets, pool_offset, pool, threshold, decay,
                         decay_mass, promote_load, demote_load, fixed, max_promotions, quarantine, bucket_seed_offset,
                         pool_seed_offset, min_load, displace_ratio);
  const int64_t T = s.num_tables;
  const FloorRuns runs = floor_runs(s);
  TORCH_CHECK(hot_floor_t.is_contiguous() && hot_floor_t.scalar_type() == at::kFloat &&
                  hot_floor_t.numel() == runs.first[T], "hot_floor must be a contiguous float32 tensor, one per run of slots");
  float* hot_floor = hot_floor_t.data_ptr<float>();
  std::vector<Pair> pairs = aggregate(keys.contiguous(), ids.contiguous(), quanta.contiguous(), ok.contiguous(),
                                      tables.contiguous());
  const int64_t n = static_cast<int64_t>(pairs.size());

  MassStep step4 = mass_step(s, pairs);
  std::vector<int64_t> written(n, -1), lost(T, 0), cand;
  std::vector<float> g(n, 0.0f);
  bucket_pass(s, pairs, step4.promote_bar, written, g, cand, lost);
  for (int64_t t = 0; t < T; ++t) {
    s.dropped_mass[t] += static_cast<double>(lost[t]) / kQuantum;
    s.mass[t] = step4.mass[t], s.mass_since_decay[t] = step4.since[t], s.scale[t] = step4.scale[t];
  }
  at::Tensor accepted = step4.accepted;
  // Step 5: candidates in (table, guaranteed desc, key) order claim rows in rounds.
  std::sort(cand.begin(), cand.end(), [&](int64_t a, int64_t b) {
    if (pairs[a].table != pairs[b].table) return pairs[a].table < pairs[b].table;
    if (g[a] != g[b]) return g[a] > g[b];
    return pairs[a].key < pairs[b].key;
  });
  {  // max_promotions: a table's candidates past its cap wait for a later update
    std::vector<int64_t> taken(T, 0);
    size_t kept = 0;
    for (const int64_t j : cand) {
      const int64_t t = pairs[j].table, cap = s.max_promotions[t];
      if (cap == 0 || taken[t]++ < cap) cand[kept++] = j;
    }
    cand.resize(kept);
  }
  const int64_t m = static_cast<int64_t>(cand.size());
  auto out_tab = at::empty({m}, at::kLong), out_id = at::empty({m}, at::kLong), out_src = at::empty({m}, at::kLong),
       out_blocked = at::empty({m}, at::kBool), out_dst = at::empty({m}, at::kLong),
       out_promoted = at::empty({m}, at::kBool);
  int64_t *tab_p = out_tab.data_ptr<int64_t>(), *id_p = out_id.data_ptr<int64_t>(), *src_p = out_src.data_ptr<int64_t>();
  int64_t* dst_p = out_dst.data_ptr<int64_t>();
  bool *blocked_p = out_blocked.data_ptr<bool>(), *promoted_p = out_promoted.data_ptr<bool>();
  std::vector<int64_t> rows(m * kChoices), chosen(m, -1);
  for (int64_t x = 0; x < m; ++x) {
    const Pair& p = pairs[cand[x]];
    s.choices(p.key, p.table, &rows[x * kChoices]);
    int src = -1;
    for (int q = 0; q < kChoices && src < 0; ++q)
      if (s.pool_state[rows[x * kChoices + q]] != kOwned) src = q;
    blocked_p[x] = src < 0;
    src_p[x] = rows[x * kChoices + std::max(src, 0)] - s.pool_offset[p.table];
    tab_p[x] = p.table;
    id_p[x] = p.id;
  }
  for (int q = 0; q < kChoices; ++q) {
    for (int64_t x = 0; x < m; ++x) {
      int64_t row = rows[x * kChoices + q];
      if (chosen[x] < 0 && s.pool_state[row] == kFree) {
        s.pool_state[row] = kOwned;
        chosen[x] = q;
      }
    }
  }
  for (int64_t x = 0; x < m; ++x) {
    const Pair& p = pairs[cand[x]];
    bool won = chosen[x] >= 0;
    if (won) {
      s.state[written[cand[x]]] = static_cast<int8_t>(chosen[x]);
      s.promotions[p.table] += 1;
      const int64_t run = runs.of(s, p.table, written[cand[x]]);
      hot_floor[run] = std::min(hot_floor[run], s.scores[written[cand[x]]]);
    }
    promoted_p[x] = won;
    dst_p[x] = rows[x * kChoices + std::max<int64_t>(chosen[x], 0)] - s.pool_offset[p.table];
  }
  // Steps 6 and 7: quarantine countdown, demotion below the bar.
  auto freed_t = at::zeros({s.pool_rows}, at::kBool);
  bool* freed = freed_t.data_ptr<bool>();
  if (s.quarantine)
    for (int64_t r = 0; r < s.pool_rows; ++r)
      if (s.pool_state[r] < 0) s.pool_state[r] += 1;
  // Step 7 where a hot slot may score below the bar: runs of slots whose bar has not passed the
  // lowest hot score known there (hot_floor) are skipped, exactly (scores only grow, promotions
  // lower it).
  for (int64_t t = 0; t < T; ++t) {
    const float bar = s.bars(t).second;
    const int64_t begin = s.bucket_offset[t] * s.c, end = s.bucket_offset[t + 1] * s.c;
    for (int64_t run = runs.first[t]; run < runs.first[t + 1]; ++run) {
      const int64_t lo = begin + (run - runs.first[t]) * kFloorRun;
      if (bar > hot_floor[run]) hot_floor[run] = demote_below(s, t, lo, std::min(lo + kFloorRun, end), bar, freed);
    }
  }
  // Step 8: displacement, against the owners as they stand after step 7.
  if (displace_ratio > 0 && m > 0) {
    std::vector<float> owner_score(s.pool_rows, std::numeric_limits<float>::infinity());
    std::vector<int64_t> owner_slot(s.pool_rows, -1);
    int64_t row4[kChoices];
    for (int64_t t = 0; t < T; ++t)
      for (int64_t f = s.bucket_offset[t] * s.c; f < s.bucket_offset[t + 1] * s.c; ++f)
        if (s.state[f] >= 0) {
          s.choices(static_cast<uint32_t>(s.keys[f]), t, row4);
          owner_score[row4[s.state[f]]] = s.scores[f];
          owner_slot[row4[s.state[f]]] = f;
        }
    const float ratio = static_cast<float>(displace_ratio);
    std::vector<int64_t> target(m, -1);
    std::vector<bool> named(s.pool_rows, false);
    for (int64_t x = 0; x < m; ++x) {
      if (chosen[x] >= 0) continue;
      float weakest = std::numeric_limits<float>::infinity();
      int64_t row = -1;
      for (int q = 0; q < kChoices; ++q) {
        int64_t r = rows[x * kChoices + q];
        if (owner_score[r] < weakest) weakest = owner_score[r], row = r;
      }
      if (row >= 0 && std::isfinite(weakest) && g[cand[x]] > ratio * weakest && !named[row]) {
        named[row] = true;
        target[x] = row;
      }
    }
    for (int64_t x = 0; x < m; ++x)
      if (target[x] >= 0) s.demote(owner_slot[target[x]], target[x], pairs[cand[x]].table, freed);
  }
  return {out_tab, out_id, out_src, out_blocked, out_dst, out_promoted, freed_t, accepted};
}

// ``sketch_update`` from raw occurrences (hot_sketch.py: HotSketch.update after its argument
// checks): fingerprints, quantisation (scores clamped to 2**24, rounded half to even to 2**-16)
// and the count of bad scores per table (``rejected``, updated in place) done here too.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sketch_update_scores(
    const at::Tensor& ids, const at::Tensor& scores, const at::Tensor& tables, at::Tensor rejected, at::Tensor slot_keys,
    at::Tensor slot_scores, at::Tensor slot_state, at::Tensor pool_state, at::Tensor scale, at::Tensor mass,
    at::Tensor mass_since_decay, at::Tensor promotions, at::Tensor demotions, at::Tensor dropped_mass,
    at::Tensor hot_floor, const at::Tensor& bucket_offset, const at::Tensor& buckets, const at::Tensor& pool_offset, const at::Tensor& pool,
    const at::Tensor& threshold, const at::Tensor& decay, const at::Tensor& decay_mass, const at::Tensor& promote_load,
    const at::Tensor& demote_load, const at::Tensor& fixed, const at::Tensor& max_promotions, int64_t quarantine, int64_t bucket_seed_offset,
    int64_t pool_seed_offset, double min_load, double displace_ratio) {
  const at::Tensor id_t = ids.contiguous(), score_t = scores.to(at::kDouble).contiguous(), tab_t = tables.contiguous();
  const int64_t n = id_t.numel();
  at::Tensor keys = at::empty({n}, at::kLong), quanta = at::empty({n}, at::kLong), ok = at::empty({n}, at::kBool);
  const int64_t *id = id_t.data_ptr<int64_t>(), *tab = tab_t.data_ptr<int64_t>();
  const double* sc = score_t.data_ptr<double>();
  int64_t *k = keys.data_ptr<int64_t>(), *q = quanta.data_ptr<int64_t>(), *bad = rejected.data_ptr<int64_t>();
  bool* good = ok.data_ptr<bool>();
  constexpr double kMaxScore = 16777216.0;  // 2**24
  for (int64_t j = 0; j < n; ++j) {
    k[j] = fingerprint32(id[j]);
    const double x = sc[j];
    good[j] = std::isfinite(x) && x >= 0;
    q[j] = good[j] ? static_cast<int64_t>(std::nearbyint(std::min(x, kMaxScore) * kQuantum)) : 0;
    bad[tab[j]] += good[j] ? 0 : 1;
  }
  return sketch_update(keys, id_t, quanta, ok, tab_t, slot_keys, slot_scores, slot_state, pool_state, scale, mass,
                       mass_since_decay, promotions, demotions, dropped_mass, hot_floor, bucket_offset, buckets, pool_offset, pool,
                       threshold, decay, decay_mass, promote_load, demote_load, fixed, max_promotions, quarantine, bucket_seed_offset,
                       pool_seed_offset, min_load, displace_ratio);
}

// The pool row each (table, key) reads (hot_sketch.py: lookup_keys): (row within the table's pool,
// hot, blocked), [N] each. ``from_ids``: ``keys`` holds int64 ids, fingerprinted here
// (hot_sketch.py: lookup), else their keys; no ``tables``: every entry is in table 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sketch_lookup(
    const at::Tensor& keys, const std::optional<at::Tensor>& tables, bool from_ids, const at::Tensor& slot_keys,
    const at::Tensor& slot_state, const at::Tensor& pool_state, const at::Tensor& bucket_offset,
    const at::Tensor& buckets, const at::Tensor& pool_offset, const at::Tensor& pool, int64_t bucket_seed_offset,
    int64_t pool_seed_offset) {
  at::Tensor k = keys.contiguous(), t = tables.has_value() ? tables->contiguous() : at::Tensor();
  const int64_t n = k.numel();
  TORCH_CHECK(!t.defined() || t.numel() == n, "sketch_lookup: tables must have one entry per key");
  const Sketch s = lookup_view(slot_keys, slot_state, pool_state, bucket_offset, buckets, pool_offset, pool,
                               bucket_seed_offset, pool_seed_offset);
  auto row = at::empty({n}, at::kLong), hot = at::empty({n}, at::kBool), blocked = at::empty({n}, at::kBool);
  const int64_t *kp = k.data_ptr<int64_t>(), *tp = t.defined() ? t.data_ptr<int64_t>() : nullptr;
  auto rp = row.data_ptr<int64_t>();
  auto hp = hot.data_ptr<bool>(), bp = blocked.data_ptr<bool>();
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    lookup_ahead(
        s, begin, end,
        [&](int64_t j, int64_t& key, int64_t& table) {
          key = from_ids ? fingerprint32(kp[j]) : kp[j], table = tp ? tp[j] : 0;
        },
        [&](int64_t j, const Lookup& r) { rp[j] = r.row, hp[j] = r.hot, bp[j] = r.blocked; });
  });
  return {row, hot, blocked};
}

// The sketch buffers (mutated), constants and scalars both update operators take, and their outputs.
#define SKETCH_STATE_SCHEMA                                                                                    \
  "Tensor(a!) slot_keys, Tensor(b!) slot_scores, Tensor(c!) slot_state, Tensor(d!) pool_state, "                 \
  "Tensor(e!) scale, Tensor(f!) mass, Tensor(g!) mass_since_decay, Tensor(h!) promotions, Tensor(i!) demotions, " \
  "Tensor(j!) dropped_mass, Tensor(l!) hot_floor, Tensor bucket_offset, Tensor buckets, Tensor pool_offset, Tensor pool, "              \
  "Tensor threshold, Tensor decay, Tensor decay_mass, Tensor promote_load, Tensor demote_load, Tensor fixed, "    \
  "Tensor max_promotions, int quarantine, int bucket_seed_offset, int pool_seed_offset, float min_load, float displace_ratio) "          \
  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

TORCH_LIBRARY(torchrec_cafe, m) {
  m.def("sketch_update(Tensor keys, Tensor ids, Tensor quanta, Tensor ok, Tensor tables, " SKETCH_STATE_SCHEMA);
  m.def("sketch_update_scores(Tensor ids, Tensor scores, Tensor tables, Tensor(k!) rejected, " SKETCH_STATE_SCHEMA);
  m.def(
      "sketch_lookup(Tensor keys, Tensor? tables, bool from_ids, Tensor slot_keys, Tensor slot_state, Tensor pool_state, "
      "Tensor bucket_offset, Tensor buckets, Tensor pool_offset, Tensor pool, int bucket_seed_offset, "
      "int pool_seed_offset) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(torchrec_cafe, CPU, m) {
  m.impl("sketch_update", &sketch_update);
  m.impl("sketch_update_scores", &sketch_update_scores);
  m.impl("sketch_lookup", &sketch_lookup);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}  // importing the module registers the operators
