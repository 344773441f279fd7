"""Export the CAFE modules of a training checkpoint for serving, as TorchScript files.

Reads a checkpoint written by ``torchrec_cafe.checkpoint.save`` (e.g. by ``examples.train_dlrm
--checkpoint-dir``; any world size), verifies it, rebuilds each CAFE module from the manifest and
writes ``<out-dir>/<module path>.pt``: a scripted plain ``EmbeddingBagCollection`` of the physical
rows plus the frozen id -> row map (``torchrec_cafe.inference.CafeInferenceEBC``); with
``--weight-dtype fp16|int8|int4``, TorchRec's quantized EmbeddingBagCollection of those rows
instead. Load one with ``torch.jit.load(path)`` and call it on a raw-ID ``KeyedJaggedTensor``.

    python -m examples.export_model runs/cafe/step-00000400 --out-dir served [--weight-dtype int8]
"""

import argparse
import json
import os
from typing import Dict, Optional, Sequence

import torch

from torchrec_cafe.checkpoint import latest
from torchrec_cafe.inference import WEIGHT_DTYPES, load_for_inference, quantize_for_inference


def export(checkpoint: str, out_dir: str, weight_dtype: str = "fp32") -> Dict[str, Dict[str, int]]:
    """Writes one TorchScript file per CAFE module; returns their sizes by module path."""
    os.makedirs(out_dir, exist_ok=True)
    sizes = {}
    for prefix, served in load_for_inference(checkpoint).items():
        module = served if weight_dtype == "fp32" else quantize_for_inference(served, weight_dtype)
        name = prefix or "cafe"
        path = os.path.join(out_dir, f"{name}.pt")
        torch.jit.save(torch.jit.script(module), path)
        sizes[name] = {**module.nbytes(), "file_bytes": os.path.getsize(path)}
    return sizes


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint directory, or a --checkpoint-dir root (its latest)")
    p.add_argument("--out-dir", default="served")
    p.add_argument("--weight-dtype", default="fp32", choices=["fp32", *WEIGHT_DTYPES], help="row type of the served tables")
    args = p.parse_args(argv)
    checkpoint = latest(args.checkpoint) or args.checkpoint
    sizes = export(checkpoint, args.out_dir, args.weight_dtype)
    print(f"exported {checkpoint} -> {args.out_dir}")
    print(f"{'module':<45} {'tables':>12} {'id map':>10} {'file':>12}")
    for name, s in sizes.items():
        print(f"{name:<45} {s['table_bytes']:>12,} {s['map_bytes']:>10,} {s['file_bytes']:>12,}")
    with open(os.path.join(args.out_dir, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=2)


if __name__ == "__main__":
    main()
