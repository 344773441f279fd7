// A migration's row copies within one row group (rows.py: migrate_by_table) as one serial CPU
// pass over the promoted entries: bit for bit the tensor code's writes (tested), without its
// few dozen small operators per group.

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace {

// Rows of a contiguous float32 CPU tensor of one or two dimensions, bounds-checked.
struct Rows {
  float* data;
  int64_t width, num_rows;
  Rows(at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() >= 1 && t.dim() <= 2,
                what, " must be a contiguous float32 CPU tensor of one or two dimensions");
    data = t.data_ptr<float>(), width = t.dim() == 2 ? t.size(1) : 1, num_rows = t.size(0);
  }
  float* row(int64_t r) const {
    TORCH_CHECK(r >= 0 && r < num_rows, "a migration row lies outside its table's storage");
    return data + r * width;
  }
};

}  // namespace

// Entry i (where mask[i] and member[tables[i]]) writes row dst[i] + base of its table of every
// tensor: the weight gets (keep_weights[i] ? w[src] : 0) + (composed[i] ? 1 : 0) * w[block], a
// state gets (reset_state[i] ? 0 : s[src]); all rows are read before any is written.
void cafe_migrate_rows(at::Tensor weight, std::vector<at::Tensor> states, const std::vector<at::Tensor>& bases,
                       const at::Tensor& member, const at::Tensor& tables, const at::Tensor& src, const at::Tensor& dst,
                       const at::Tensor& mask, const at::Tensor& keep_weights, const at::Tensor& block,
                       const at::Tensor& composed, const at::Tensor& reset_state) {
  std::vector<Rows> tensors{Rows(weight, "weight")};
  for (at::Tensor& st : states) tensors.emplace_back(st, "an optimizer state");
  TORCH_CHECK(bases.size() == states.size() + 1, "one row base per tensor");
  const at::Tensor t_t = tables.to(at::kLong).contiguous(), src_t = src.to(at::kLong).contiguous();
  const at::Tensor dst_t = dst.to(at::kLong).contiguous(), blk_t = block.to(at::kLong).contiguous();
  const at::Tensor mask_t = mask.to(at::kBool).contiguous(), keep_t = keep_weights.to(at::kBool).contiguous();
  const at::Tensor comp_t = composed.to(at::kBool).contiguous(), reset_t = reset_state.to(at::kBool).contiguous();
  const at::Tensor member_t = member.to(at::kBool).contiguous();
  std::vector<at::Tensor> base_t;
  for (const at::Tensor& b : bases) base_t.push_back(b.to(at::kLong).contiguous());
  const int64_t n = t_t.numel(), T = member_t.numel();
  const int64_t *tab = t_t.data_ptr<int64_t>(), *s = src_t.data_ptr<int64_t>(), *d = dst_t.data_ptr<int64_t>();
  const int64_t* b2 = blk_t.data_ptr<int64_t>();
  const bool *mk = mask_t.data_ptr<bool>(), *keep = keep_t.data_ptr<bool>(), *comp = comp_t.data_ptr<bool>();
  const bool *reset = reset_t.data_ptr<bool>(), *mem = member_t.data_ptr<bool>();
  std::vector<int64_t> entries;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(tab[i] >= 0 && tab[i] < T, "a migration entry names a table out of range");
    if (mk[i] && mem[tab[i]]) entries.push_back(i);
  }
  if (entries.empty()) return;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const Rows& r = tensors[k];
    const int64_t* base = base_t[k].data_ptr<int64_t>();
    std::vector<float> staged(entries.size() * r.width);
    for (size_t e = 0; e < entries.size(); ++e) {
      const int64_t i = entries[e], off = base[tab[i]];
      float* out = staged.data() + e * r.width;
      const float* from = r.row(s[i] + off);
      if (k == 0) {
        const float* second = r.row(b2[i] + off);
        const float use = comp[i] ? 1.0f : 0.0f;
        for (int64_t c = 0; c < r.width; ++c) out[c] = (keep[i] ? from[c] : 0.0f) + use * second[c];
      } else {
        for (int64_t c = 0; c < r.width; ++c) out[c] = reset[i] ? 0.0f : from[c];
      }
    }
    for (size_t e = 0; e < entries.size(); ++e) {
      const int64_t i = entries[e];
      float* to = r.row(d[i] + base[tab[i]]);
      std::copy(staged.data() + e * r.width, staged.data() + (e + 1) * r.width, to);
    }
  }
}

TORCH_LIBRARY_FRAGMENT(torchrec_cafe, m) {
  m.def(
      "migrate_rows(Tensor(a!) weight, Tensor(b!)[] states, Tensor[] bases, Tensor member, Tensor tables, Tensor src, "
      "Tensor dst, Tensor mask, Tensor keep_weights, Tensor block, Tensor composed, Tensor reset_state) -> ()");
}

TORCH_LIBRARY_IMPL(torchrec_cafe, CPU, m) { m.impl("migrate_rows", &cafe_migrate_rows); }
