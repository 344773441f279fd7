// Shared by the HotSketch and remap kernels: the sketch's hashing and its buffers as raw pointers.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

constexpr int8_t kEmpty = -2;
constexpr int8_t kCold = -1;
constexpr int8_t kFree = 0;
constexpr int8_t kOwned = 1;
constexpr int kChoices = 4;
constexpr double kQuantum = 65536.0;

// splitmix64's finaliser masked to 63 bits (hashing.py: finalise64), on uint64 bits.
inline int64_t finalise64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z = z ^ (z >> 31);
  return static_cast<int64_t>(z & 0x7FFFFFFFFFFFFFFFULL);
}

// hashing.py: fingerprint32 (fmix32(low ^ fmix32(high))).
inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6BU;
  x ^= x >> 13;
  x *= 0xC2B2AE35U;
  return x ^ (x >> 16);
}
inline int64_t fingerprint32(int64_t id) {
  uint64_t u = static_cast<uint64_t>(id);
  return static_cast<int64_t>(fmix32(static_cast<uint32_t>(u) ^ fmix32(static_cast<uint32_t>(u >> 32))));
}
inline int64_t py_remainder(int64_t a, int64_t n) {  // torch.remainder / Python %: sign of n
  int64_t r = a % n;
  return (r != 0 && ((r < 0) != (n < 0))) ? r + n : r;
}


inline int32_t as_int32_bits(int64_t key) { return static_cast<int32_t>(static_cast<uint32_t>(key)); }

// x mod d for 32-bit x, without a division when d fits 32 bits (Lemire, Kaser & Kurz, "Faster
// remainder by direct computation", 2019: exact for every 32-bit x and d): a key's pool choices
// take two remainders by its table's pool size.
struct Modulus {
  int64_t d = 1;
  uint64_t magic = 0;  // 0: the plain remainder (d of more than 32 bits, or 1)
  Modulus() = default;
  explicit Modulus(int64_t divisor) : d(divisor), magic(divisor > 1 && divisor <= 0xFFFFFFFFLL ? ~0ULL / divisor + 1 : 0) {}
  int64_t of(uint32_t x) const {
    if (magic == 0) return static_cast<int64_t>(x) % d;
    const uint64_t low = magic * x;
    return static_cast<int64_t>((static_cast<unsigned __int128>(low) * static_cast<uint64_t>(d)) >> 64);
  }
};

// floor(a * b / 2**128) for a 128-bit a and a 64-bit b: the step the paper's 128-bit forms of the
// 64-bit remainder and quotient share.
inline uint64_t mul_high(unsigned __int128 a, uint64_t b) {
  const unsigned __int128 bottom = (static_cast<unsigned __int128>(static_cast<uint64_t>(a)) * b) >> 64;
  return static_cast<uint64_t>((bottom + (a >> 64) * b) >> 64);
}

// x mod d for 64-bit x and d (the same paper's 128-bit form, exact for all of them): a key's bucket
// is its 63-bit hash modulo its table's bucket count. d = 1 wraps the magic to 0, giving 0.
struct Modulus64 {
  uint64_t d = 1;
  unsigned __int128 magic = 0;
  Modulus64() = default;
  explicit Modulus64(int64_t divisor)
      : d(static_cast<uint64_t>(divisor)), magic(~static_cast<unsigned __int128>(0) / static_cast<uint64_t>(divisor) + 1) {}
  int64_t of(uint64_t x) const { return static_cast<int64_t>(mul_high(magic * x, d)); }
};

// floor(x / d) for 64-bit x and d >= 1 (the same paper's 128-bit form, exact for all of them).
struct Divider64 {
  unsigned __int128 magic = 0;  // 0: d = 1
  Divider64() = default;
  explicit Divider64(int64_t divisor)
      : magic(divisor > 1 ? ~static_cast<unsigned __int128>(0) / static_cast<uint64_t>(divisor) + 1 : 0) {}
  uint64_t of(uint64_t x) const { return magic == 0 ? x : mul_high(magic, x); }
};

// The candidate rows of one key, and its bucket, computed (and their cache lines requested) ahead
// of the probe that reads them.
struct Pending {
  int64_t bucket;
  int64_t rows[kChoices];
};

// Each table's size (pool rows, buckets) as a Modulus or Modulus64 (Sketch::pool_mod, bucket_mod).
template <typename M>
inline std::vector<M> moduli(const at::Tensor& sizes) {
  const at::Tensor p = sizes.contiguous();
  std::vector<M> out;
  out.reserve(p.numel());
  for (int64_t t = 0; t < p.numel(); ++t) out.emplace_back(p.data_ptr<int64_t>()[t]);
  return out;
}

struct Lookup {
  int64_t row;
  bool hot, blocked;
};

struct Sketch {
  // state
  int32_t* keys;
  float* scores;
  int8_t* state;
  int8_t* pool_state;
  double* scale;
  double* mass;
  double* mass_since_decay;
  int64_t* promotions;
  int64_t* demotions;
  double* dropped_mass;
  // constants
  const int64_t* bucket_offset;
  const int64_t* buckets;
  const int64_t* pool_offset;
  const int64_t* pool;
  const double* threshold;
  const double* decay;
  const double* decay_mass;
  const double* promote_load;
  const double* demote_load;
  const bool* fixed;
  const int64_t* max_promotions;  // per table, 0: no cap
  std::vector<Modulus> pool_mod;  // per table: pool[t] as a Modulus (moduli)
  std::vector<Modulus64> bucket_mod;  // per table: buckets[t] as a Modulus64
  int64_t num_tables, num_buckets, c, pool_rows;
  int64_t quarantine, bucket_seed_offset, pool_seed_offset;
  double min_load, displace_ratio;

  int64_t bucket_of(int64_t key, int64_t t) const {
    uint64_t z = static_cast<uint64_t>(key) + static_cast<uint64_t>(bucket_seed_offset);
    return bucket_offset[t] + bucket_mod[t].of(static_cast<uint64_t>(finalise64(z)));
  }
  // The two 32-bit hashes of a key's choices: h1 = the low half of its 63-bit hash, h2 = the high
  // half made odd.
  static void choice_hashes(int64_t key, int64_t seed_offset, uint32_t& h1, uint32_t& h2) {
    const int64_t h = finalise64(static_cast<uint64_t>(key) + static_cast<uint64_t>(seed_offset));
    h1 = static_cast<uint32_t>(h & 0xFFFFFFFFLL), h2 = static_cast<uint32_t>((h >> 32) | 1);
  }
  // The key's choices in a pool of P rows (hot_sketch.py: pool_choices).
  // (h1 + p * h2) % P for p = 0..3, all non-negative: two 32-bit divisions (none when P exceeds
  // 32 bits: both hashes are below it), then steps of h2 % P reduced by one subtraction each.
  static void choices_in(int64_t key, int64_t P, int64_t seed_offset, int64_t* rows) {
    uint32_t h1, h2;
    choice_hashes(key, seed_offset, h1, h2);
    if (P <= 0xFFFFFFFFLL) {
      const uint32_t p32 = static_cast<uint32_t>(P);
      steps_from(h1 % p32, h2 % p32, P, rows);
    } else {
      steps_from(h1, h2, P, rows);
    }
  }
  // choices_in with P as a Modulus (multiplications instead of the divisions): the same rows.
  static void choices_mod(int64_t key, const Modulus& P, int64_t seed_offset, int64_t* rows) {
    uint32_t h1, h2;
    choice_hashes(key, seed_offset, h1, h2);
    steps_from(P.of(h1), P.of(h2), P.d, rows);
  }
  static void steps_from(int64_t r, int64_t step, int64_t P, int64_t* rows) {
    rows[0] = r;
    for (int p = 1; p < kChoices; ++p) {
      // r + step - P when that is not negative, branch-free (r, step < P: unsigned wrap-around)
      const uint64_t sum = static_cast<uint64_t>(r + step);
      r = static_cast<int64_t>(std::min(sum, sum - static_cast<uint64_t>(P)));
      rows[p] = r;
    }
  }
  // The first of choices_in's rows alone.
  static int64_t first_choice(int64_t key, int64_t P, int64_t seed_offset) {
    uint32_t h1, h2;
    choice_hashes(key, seed_offset, h1, h2);
    return P <= 0xFFFFFFFFLL ? static_cast<int64_t>(h1 % static_cast<uint32_t>(P)) : static_cast<int64_t>(h1);
  }
  // Global pool row of each of the key's choices (pool_choices + the table's pool offset).
  void choices(int64_t key, int64_t t, int64_t* rows) const {
    choices_mod(key, pool_mod[t], pool_seed_offset, rows);
    for (int p = 0; p < kChoices; ++p) rows[p] += pool_offset[t];
  }
  // Starts loading the cache lines of a slot (or a bucket's first slot): keys, states, scores.
  void prefetch(int64_t slot) const {
    __builtin_prefetch(keys + slot);
    __builtin_prefetch(state + slot);
    __builtin_prefetch(scores + slot);
  }
  // Flat slot holding (t, key), or -1.
  int64_t probe(int64_t key, int64_t bucket) const {
    int32_t k32 = as_int32_bits(key);
    for (int64_t j = 0; j < c; ++j) {
      int64_t f = bucket * c + j;
      if (keys[f] == k32 && state[f] != kEmpty) return f;
    }
    return -1;
  }
  // hot_sketch.py: lookup_keys: the row (within the table's pool) a key reads, hot, blocked.
  Lookup lookup(int64_t key, int64_t t) const {
    Pending p;
    p.bucket = bucket_of(key, t);
    choices(key, t, p.rows);
    return resolve(key, t, p);
  }
  // The first half of a lookup: bucket and choices, their cache lines requested.
  void prepare(int64_t key, int64_t t, Pending& p) const {
    p.bucket = bucket_of(key, t);
    __builtin_prefetch(keys + p.bucket * c);
    __builtin_prefetch(state + p.bucket * c);
    choices(key, t, p.rows);
    for (int q = 0; q < kChoices; ++q) __builtin_prefetch(pool_state + p.rows[q]);
  }
  // The second half: the lookup of a prepared key.
  Lookup resolve(int64_t key, int64_t t, const Pending& pending) const {
    const int64_t* rows = pending.rows;
    int64_t f = probe(key, pending.bucket);
    int8_t st = f >= 0 ? state[f] : kCold;
    int p = st >= 0 ? st : -1;
    bool all_owned = p < 0;
    if (p < 0) {
      for (int q = 0; q < kChoices && p < 0; ++q)
        if (pool_state[rows[q]] != kOwned) p = q, all_owned = false;
      if (p < 0) p = 0;
    }
    return {rows[p] - pool_offset[t], st >= 0, all_owned && st < 0};
  }
  float to_stored(int64_t q, int64_t t) const {
    return static_cast<float>(static_cast<double>(q) / kQuantum * scale[t]);
  }
  // (promotion bar, demotion bar) of table t in stored units (hot_sketch.py: bars).
  std::pair<float, float> bars(int64_t t) const { return bars_at(t, mass[t], scale[t]); }
  // The bars table t would have at this mass and scale.
  std::pair<float, float> bars_at(int64_t t, double mass_t, double scale_t) const {
    if (fixed[t]) {
      float f = static_cast<float>(threshold[t] * scale_t);
      return {f, f};
    }
    double load = std::max(mass_t / static_cast<double>(pool[t]), min_load * scale_t);
    return {static_cast<float>(promote_load[t] * load), static_cast<float>(demote_load[t] * load)};
  }
  // Score minus the lowest other score of the bucket (0 if the bucket has an empty slot).
  float guaranteed(int64_t slot) const {
    int64_t b = slot / c;
    bool has_empty = false, has_other = false;
    float floor = std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < c; ++j) {
      int64_t f = b * c + j;
      if (state[f] == kEmpty) has_empty = true;
      if (f != slot && state[f] != kEmpty) {
        has_other = true;
        floor = std::min(floor, scores[f]);
      }
    }
    if (has_empty || !has_other) floor = 0.0f;
    return scores[slot] - floor;
  }
  void demote(int64_t slot, int64_t row, int64_t t, bool* freed) {
    pool_state[row] = static_cast<int8_t>(-quarantine);
    state[slot] = kCold;
    demotions[t] += 1;
    freed[row] = true;
  }
};


// The part of a sketch that lookups read (keys, states, pool states, layout, seeds), as a Sketch.
inline Sketch lookup_view(const at::Tensor& slot_keys, const at::Tensor& slot_state, const at::Tensor& pool_state,
                          const at::Tensor& bucket_offset, const at::Tensor& buckets, const at::Tensor& pool_offset,
                          const at::Tensor& pool, int64_t bucket_seed_offset, int64_t pool_seed_offset) {
  Sketch s{};
  s.keys = const_cast<int32_t*>(slot_keys.data_ptr<int32_t>());
  s.state = const_cast<int8_t*>(slot_state.data_ptr<int8_t>());
  s.pool_state = const_cast<int8_t*>(pool_state.data_ptr<int8_t>());
  s.bucket_offset = bucket_offset.data_ptr<int64_t>();
  s.buckets = buckets.data_ptr<int64_t>();
  s.pool_offset = pool_offset.data_ptr<int64_t>();
  s.pool = pool.data_ptr<int64_t>();
  s.c = slot_keys.size(1);
  s.bucket_seed_offset = bucket_seed_offset;
  s.pool_seed_offset = pool_seed_offset;
  s.pool_mod = moduli<Modulus>(pool);
  s.bucket_mod = moduli<Modulus64>(buckets);
  return s;
}

// Keys looked up kAhead positions ahead of their probe, so that their cache lines arrive while
// earlier keys are resolved: lookup(i) for i in [begin, end), via prepare/resolve, in order.
constexpr int64_t kAhead = 8;
template <typename KeyAt, typename Emit>
inline void lookup_ahead(const Sketch& s, int64_t begin, int64_t end, KeyAt key_at, Emit emit) {
  Pending ring[kAhead];
  int64_t key[kAhead], table[kAhead];
  auto prepare = [&](int64_t i) {
    const int64_t slot = i % kAhead;
    key_at(i, key[slot], table[slot]);
    s.prepare(key[slot], table[slot], ring[slot]);
  };
  for (int64_t i = begin; i < std::min(end, begin + kAhead); ++i) prepare(i);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t slot = i % kAhead;
    emit(i, s.resolve(key[slot], table[slot], ring[slot]));
    if (i + kAhead < end) prepare(i + kAhead);
  }
}
