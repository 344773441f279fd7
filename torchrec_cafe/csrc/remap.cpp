// The training remap (torchrec_cafe/remap.py: KJTRemapper.forward) and the frozen serving lookup
// (modules/frozen.py: frozen_physical_features) as serial CPU passes: raw ids of a KJT -> physical
// rows, lengths and weights (training: plus the hook context of the sketched values).
// Bit for bit what the tensor code computes (tested); the tensor code stays the reference and the
// path on other devices.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "sketch_common.h"

// A feature's block rows: P + (id mod N) / block size, the remainder Python's (sign of N) and both
// divisions by multiplications (Modulus64, Divider64) for non-negative ids.
struct BlockRows {
  int64_t pool, num_rows;
  Modulus64 rows;
  Divider64 block;
  BlockRows(int64_t pool_rows, int64_t n, int64_t block_size) : pool(pool_rows), num_rows(n), rows(n), block(block_size) {}
  int64_t remainder(int64_t id) const { return id >= 0 ? rows.of(static_cast<uint64_t>(id)) : py_remainder(id, num_rows); }
  int64_t of(int64_t id) const { return pool + static_cast<int64_t>(block.of(static_cast<uint64_t>(remainder(id)))); }
};
inline std::vector<BlockRows> block_rows(int64_t F, const int64_t* pool, const int64_t* num_rows, const int64_t* block_size) {
  std::vector<BlockRows> out;
  out.reserve(F);
  for (int64_t f = 0; f < F; ++f) out.emplace_back(pool[f], std::max<int64_t>(num_rows[f], 1), std::max<int64_t>(block_size[f], 1));
  return out;
}

// Writes the entries one ID reads at output position o, in order — its pool row (``reads_pool``),
// then its block row (``reads_block``), each with weight ``wt`` when the output is weighted — and
// returns the next position. Shared by the training and serving remaps.
inline int64_t emit(int64_t* ov, float* ow, int64_t o, int64_t id, float wt, int64_t row, bool reads_pool,
                    bool reads_block, const BlockRows& blocks) {
  if (reads_pool) {
    ov[o] = row;
    if (ow) ow[o] = wt;
    ++o;
  }
  if (reads_block) {
    ov[o] = blocks.of(id);
    if (ow) ow[o] = wt;
    ++o;
  }
  return o;
}

// Returns (values, lengths, weights or empty, context ids, tables, bag, feature, factor, hot_hits,
// entries per feature [F]: the physical KJT's length per key).
// ``weights`` is an empty tensor for an unweighted input; the output weights are empty unless
// ``weighted_out``. The context tensors are empty unless ``with_sketch``.
std::vector<at::Tensor> cafe_remap(
    const at::Tensor& values, const at::Tensor& lengths, const at::Tensor& weights, const at::Tensor& bags_per_feature,
    const at::Tensor& sketch_table, const at::Tensor& num_rows, const at::Tensor& pool, const at::Tensor& block_size,
    const at::Tensor& composed, const at::Tensor& mean, const at::Tensor& mean_as_weights, const at::Tensor& is_static,
    bool weighted_out, bool with_sketch, int64_t num_sketch_tables, const at::Tensor& slot_keys,
    const at::Tensor& slot_state, const at::Tensor& pool_state, const at::Tensor& bucket_offset,
    const at::Tensor& buckets, const at::Tensor& pool_offset, const at::Tensor& table_pool, int64_t bucket_seed_offset,
    int64_t pool_seed_offset) {
  const at::Tensor ids_t = values.to(at::kLong).contiguous();
  const at::Tensor len_t = lengths.contiguous();
  const at::Tensor len64 = len_t.to(at::kLong);
  const bool has_weights = weights.numel() > 0;
  const int64_t n = ids_t.numel(), num_bags = len_t.numel(), F = bags_per_feature.numel();
  const int64_t* ids = ids_t.data_ptr<int64_t>();
  const int64_t* len = len64.data_ptr<int64_t>();
  const float* w = has_weights ? weights.data_ptr<float>() : nullptr;
  const int64_t *st = sketch_table.data_ptr<int64_t>(), *nr = num_rows.data_ptr<int64_t>(), *pl = pool.data_ptr<int64_t>();
  const int64_t *bs = block_size.data_ptr<int64_t>(), *bpf = bags_per_feature.data_ptr<int64_t>();
  const std::vector<BlockRows> blocks = block_rows(F, pl, nr, bs);
  const bool *comp = composed.data_ptr<bool>(), *mn = mean.data_ptr<bool>(), *maw = mean_as_weights.data_ptr<bool>();
  const bool* stat = is_static.data_ptr<bool>();

  const Sketch s = with_sketch ? lookup_view(slot_keys, slot_state, pool_state, bucket_offset, buckets, pool_offset,
                                             table_pool, bucket_seed_offset, pool_seed_offset)
                               : Sketch{};
  // Output sizes: at most two entries per value of a composed feature, one of any other.
  int64_t total = 0, sketched = 0;
  {
    int64_t bag = 0, pos = 0;
    for (int64_t f = 0; f < F; ++f) {
      TORCH_CHECK(bag + bpf[f] <= num_bags, "lengths do not match the bags per feature");
      int64_t count = 0;
      for (int64_t b = 0; b < bpf[f]; ++b, ++bag) count += len[bag];
      total += comp[f] ? 2 * count : count;
      if (with_sketch && st[f] >= 0) sketched += count;
      pos += count;
    }
    TORCH_CHECK(bag == num_bags && pos == n, "lengths do not match the bags per feature and values");
  }
  at::Tensor out_values = at::empty({total}, at::kLong);
  at::Tensor out_len = at::empty({num_bags}, at::kLong);
  at::Tensor out_weights = weighted_out ? at::empty({total}, at::kFloat) : at::empty({0}, at::kFloat);
  at::Tensor c_ids = at::empty({sketched}, at::kLong), c_tab = at::empty({sketched}, at::kLong);
  at::Tensor c_bag = at::empty({sketched}, at::kLong), c_feat = at::empty({sketched}, at::kLong);
  at::Tensor c_factor = at::empty({sketched}, at::kFloat);
  const int64_t T = std::max<int64_t>(num_sketch_tables, 1);
  std::vector<float> hits(T, 0.0f), seen(T, 0.0f);
  int64_t *ov = out_values.data_ptr<int64_t>(), *ol = out_len.data_ptr<int64_t>();
  float* ow = weighted_out ? out_weights.data_ptr<float>() : nullptr;
  int64_t *ci = c_ids.data_ptr<int64_t>(), *ct = c_tab.data_ptr<int64_t>(), *cb = c_bag.data_ptr<int64_t>();
  int64_t* cf = c_feat.data_ptr<int64_t>();
  float* cfa = c_factor.data_ptr<float>();

  at::Tensor per_key = at::empty({F}, at::kLong);
  int64_t* pk = per_key.data_ptr<int64_t>();
  int64_t bag = 0, j = 0, o = 0, k = 0;
  for (int64_t f = 0; f < F; ++f) {
    const bool sk = with_sketch && st[f] >= 0, two = comp[f];
    const int64_t feature_start = o;
    for (int64_t b = 0; b < bpf[f]; ++b, ++bag) {
      const int64_t L = len[bag], start = o;
      const float inv_len = 1.0f / static_cast<float>(std::max<int64_t>(L, 1));
      for (int64_t e = 0; e < L; ++e, ++j) {
        const int64_t x = ids[j];
        int64_t row;
        int code = 0;  // 1: reads its pool row alone (hot, composed); 2: no pool row (blocked)
        if (sk) {
          const int64_t key = fingerprint32(x), t = st[f];
          const Lookup r = s.lookup(key, t);
          row = r.row;
          code = (r.hot && two) ? 1 : (r.blocked ? 2 : 0);
          hits[t] += r.hot ? 1.0f : 0.0f;
          seen[t] += 1.0f;
          const float a = w ? std::abs(w[j]) : 1.0f;
          ci[k] = x, ct[k] = t, cb[k] = bag, cf[k] = f, cfa[k] = mn[f] ? a * inv_len : a;
          ++k;
        } else if (stat[f]) {
          row = Sketch::first_choice(fingerprint32(x), pl[f], pool_seed_offset);
        } else {
          row = blocks[f].remainder(x);
        }
        float wt = 0.0f;
        if (weighted_out) {
          const float base = w ? w[j] : 1.0f;
          wt = maw[f] ? base * inv_len : base;
        }
        o = emit(ov, ow, o, x, wt, row, code != 2, two && code != 1, blocks[f]);
      }
      ol[bag] = o - start;
    }
    pk[f] = o - feature_start;
  }
  const at::Tensor out_lengths = out_len.to(len_t.scalar_type());
  at::Tensor hot_hits = at::empty({T}, at::kFloat);
  for (int64_t t = 0; t < T; ++t) hot_hits.data_ptr<float>()[t] = hits[t] / std::max(seen[t], 1.0f);
  return {out_values.narrow(0, 0, o), out_lengths, weighted_out ? out_weights.narrow(0, 0, o) : out_weights, c_ids, c_tab, c_bag, c_feat, c_factor, hot_hits, per_key};
}


// The frozen serving lookup (modules/frozen.py: frozen_physical_features after the key reordering):
// per pool row of the sketched tables the owner's key and an owned flag, no sketch. Returns
// (values, lengths, weights or empty).
std::vector<at::Tensor> cafe_frozen_remap(
    const at::Tensor& values, const at::Tensor& lengths, const at::Tensor& weights, const at::Tensor& bags_per_feature,
    const at::Tensor& num_rows, const at::Tensor& sketch_table, const at::Tensor& compressed, const at::Tensor& pool,
    const at::Tensor& pool_offset, const at::Tensor& block_size, const at::Tensor& composed,
    const at::Tensor& mean_as_weights, const at::Tensor& owner_keys, const at::Tensor& owned, bool weighted_out,
    int64_t pool_seed_offset) {
  const at::Tensor ids_t = values.to(at::kLong).contiguous(), len_t = lengths.contiguous();
  const at::Tensor len64 = len_t.to(at::kLong);
  const int64_t F = bags_per_feature.numel(), n = ids_t.numel(), last = owned.numel() - 1;
  const int64_t *ids = ids_t.data_ptr<int64_t>(), *len = len64.data_ptr<int64_t>();
  const float* w = weights.numel() > 0 ? weights.data_ptr<float>() : nullptr;
  const int64_t *bpf = bags_per_feature.data_ptr<int64_t>(), *nr = num_rows.data_ptr<int64_t>();
  const int64_t *st = sketch_table.data_ptr<int64_t>(), *pl = pool.data_ptr<int64_t>();
  const int64_t *po = pool_offset.data_ptr<int64_t>(), *bs = block_size.data_ptr<int64_t>();
  const std::vector<BlockRows> blocks = block_rows(F, pl, nr, bs);
  const bool *cmp = compressed.data_ptr<bool>(), *two = composed.data_ptr<bool>(), *maw = mean_as_weights.data_ptr<bool>();
  const int32_t* okeys = owner_keys.data_ptr<int32_t>();
  const int8_t* own = owned.data_ptr<int8_t>();
  int64_t total = 0;
  std::vector<int64_t> first_value(F + 1, 0);  // feature f's values: [first_value[f], first_value[f + 1])
  {
    int64_t bag = 0;
    for (int64_t f = 0; f < F; ++f) {
      TORCH_CHECK(bag + bpf[f] <= len_t.numel(), "lengths do not match the bags per feature");
      int64_t count = 0;
      for (int64_t b = 0; b < bpf[f]; ++b, ++bag) count += len[bag];
      total += two[f] ? 2 * count : count;
      first_value[f + 1] = first_value[f] + count;
    }
    TORCH_CHECK(bag == len_t.numel(), "lengths do not match the bags per feature");
  }
  // At most ``total`` entries: a hot ID's block row and a blocked ID's pool row are not read.
  at::Tensor out_values = at::empty({total}, at::kLong), out_len = at::empty({len_t.numel()}, at::kLong);
  at::Tensor out_weights = weighted_out ? at::empty({total}, at::kFloat) : at::empty({0}, at::kFloat);
  int64_t *ov = out_values.data_ptr<int64_t>(), *ol = out_len.data_ptr<int64_t>();
  float* ow = weighted_out ? out_weights.data_ptr<float>() : nullptr;
  at::Tensor per_key = at::empty({F}, at::kLong);
  int64_t* pk = per_key.data_ptr<int64_t>();
  // A compressed feature's keys and pool choices are computed kAhead values ahead of their owner
  // checks, and the owner entries' lines requested then: the hashing of later IDs overlaps the
  // current one's loads and branches, and the owner arrays (every pool row's, MBs) miss in
  // parallel. Serving benchmark, interleaved runs: CAFE / hashed EBC 1.25 -> 1.11 at batch 64,
  // 1.81 -> 1.58 at 512, 2.15 -> 1.98 at 4096; without the requests 1.27 / 1.79 / 2.05.
  struct Ahead {
    int64_t key, rows[kChoices];
  };
  Ahead ring[kAhead];
  auto prepare = [&](int64_t f, const Modulus& P, int64_t i) {
    Ahead& a = ring[i % kAhead];
    a.key = fingerprint32(ids[i]);
    Sketch::choices_mod(a.key, P, pool_seed_offset, a.rows);
    for (int q = 0; q < kChoices; ++q) {
      const int64_t at = std::min(po[f] + a.rows[q], last);
      __builtin_prefetch(own + at);
      __builtin_prefetch(okeys + at);
    }
  };
  int64_t bag = 0, j = 0, o = 0;
  for (int64_t f = 0; f < F; ++f) {
    const int64_t feature_start = o, end = first_value[f + 1];
    const Modulus P(std::max<int64_t>(pl[f], 1));  // choices_in's rows, without its two divisions
    if (cmp[f])
      for (int64_t i = j; i < std::min(end, j + kAhead); ++i) prepare(f, P, i);
    for (int64_t b = 0; b < bpf[f]; ++b, ++bag) {
      const int64_t L = len[bag], start = o;
      for (int64_t e = 0; e < L; ++e, ++j) {
        const int64_t x = ids[j];
        bool hot = false, blocked = false;
        int64_t row;
        if (cmp[f]) {
          const Ahead& a = ring[j % kAhead];
          const int64_t key = a.key;
          int64_t rows[kChoices];
          std::copy(a.rows, a.rows + kChoices, rows);
          if (j + kAhead < end) prepare(f, P, j + kAhead);  // into the slot just read
          int first_free = -1, first_mine = -1;
          for (int q = 0; q < kChoices; ++q) {
            const int64_t at = std::min(po[f] + rows[q], last);
            const bool is_owned = st[f] >= 0 && own[at] == kOwned;
            if (is_owned && okeys[at] == as_int32_bits(key) && first_mine < 0) first_mine = q;
            if (!is_owned && first_free < 0) first_free = q;
          }
          hot = first_mine >= 0;
          blocked = first_free < 0 && !hot;
          row = rows[hot ? first_mine : std::max(first_free, 0)];
        } else {
          row = blocks[f].remainder(x);
        }
        float wt = 1.0f;
        if (weighted_out) {
          wt = w ? w[j] : 1.0f;
          if (maw[f]) wt = wt / static_cast<float>(std::max<int64_t>(L, 1));
        }
        o = emit(ov, ow, o, x, wt, row, !blocked, two[f] && !hot, blocks[f]);
      }
      ol[bag] = o - start;
    }
    pk[f] = o - feature_start;
  }
  TORCH_CHECK(j == n, "lengths do not sum to the number of values");
  return {out_values.narrow(0, 0, o), out_len.to(len_t.scalar_type()),
          weighted_out ? out_weights.narrow(0, 0, o) : out_weights, per_key};
}

TORCH_LIBRARY_FRAGMENT(torchrec_cafe, m) {
  m.def(
      "remap(Tensor values, Tensor lengths, Tensor weights, Tensor bags_per_feature, Tensor sketch_table, "
      "Tensor num_rows, Tensor pool, Tensor block_size, Tensor composed, Tensor mean, Tensor mean_as_weights, "
      "Tensor is_static, bool weighted_out, bool with_sketch, int num_sketch_tables, Tensor slot_keys, "
      "Tensor slot_state, Tensor pool_state, Tensor bucket_offset, Tensor buckets, Tensor pool_offset, "
      "Tensor table_pool, int bucket_seed_offset, int pool_seed_offset) -> Tensor[]");
  m.def(
      "frozen_remap(Tensor values, Tensor lengths, Tensor weights, Tensor bags_per_feature, Tensor num_rows, "
      "Tensor sketch_table, Tensor compressed, Tensor pool, Tensor pool_offset, Tensor block_size, Tensor composed, "
      "Tensor mean_as_weights, Tensor owner_keys, Tensor owned, bool weighted_out, int pool_seed_offset) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(torchrec_cafe, CPU, m) {
  m.impl("remap", &cafe_remap);
  m.impl("frozen_remap", &cafe_frozen_remap);
}
