"""Train TorchRec's DLRM with a chosen embedding method under a memory budget.

Methods (same logical tables; every compressed table gets the same budget, logical bytes / CR):
  full      - plain EmbeddingBagCollection (the reference; needs the full memory);
  hash      - the hashing trick: N / CR rows per table;
  qr        - the quotient-remainder trick (sum of a quotient and a remainder row);
  mch_lfu   - TorchRec's ManagedCollisionEmbeddingBagCollection, MCH with LFU eviction;
  mch_dlfu  - the same with DistanceLFU eviction;
  cafe       - CafeEmbeddingBagCollection at its defaults (grad-norm importance, adaptive bars,
               composed cold rows);
  cafe_paper - CAFE with the paper's settings (fixed threshold schedule, one hashed row per cold ID);
  cafe_freq  - CAFE with frequency importance.

Data: the bundled synthetic generator, raw Criteo TSV (label, 13 counts, 26 categories) or libFM
files with one-hot fields (e.g. Frappe); real data is read from the given paths, never copied.
The model runs under DistributedModelParallel (gloo on CPU, nccl on CUDA, picked at run time) with
fused TBE optimizers for the embeddings. Under torchrun every rank trains on its own share of each
global batch; rank 0 prints and writes the JSON.

    python -m examples.train_dlrm --method cafe --compression-ratio 100
    python -m examples.train_dlrm --data libfm --preset paper --epochs 10 --compression-ratio 5 \\
        --train ../shared/data/frappe_ctr/frappe.validation.libfm.gz \\
        --test ../shared/data/frappe_ctr/frappe.test.libfm.gz --out results/frappe_cafe_cr5.json
    torchrun --nproc_per_node 2 -m examples.train_dlrm --method hash --batch-size 1024
"""

from examples.harness.cli import main

if __name__ == "__main__":
    main()
