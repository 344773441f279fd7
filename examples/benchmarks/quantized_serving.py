"""Quantized serving: size and test AUC of a trained CAFE DLRM served with float, fp16, int8 and
int4 rows under the same frozen ID map.

Trains one CAFE DLRM per suite with the example trainer (its defaults and the suite's data, as
``quality_sweep``), saves it (``torchrec_cafe.checkpoint``), loads it into an unsharded DLRM, and
evaluates the test split with the embedding module replaced by ``export_for_inference`` (float) and
``quantize_for_inference`` (TorchRec's quantized EmbeddingBagCollection), each scripted through
``torch.jit.script`` (``torchrec.fx`` first) as a server would run it.

    python -m examples.benchmarks.quantized_serving --out results/quantized_serving
"""

import argparse
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRMTrain

from examples.benchmarks.quality_sweep import SUITES
from examples.benchmarks.report import markdown_table, write_json
from examples.harness.cli import parse_args
from examples.harness.data import data_shape, embedding_tables, load
from examples.harness.loop import evaluate, fit
from examples.harness.model import build_ebc, build_model, ensure_process_group, quiet_logs
from torchrec_cafe import CafeEmbeddingBagCollection, checkpoint
from torchrec_cafe.inference import WEIGHT_DTYPES, export_bag_module, quantize_for_inference

DEFAULT_CR = {"frappe": 5, "ciao": 100, "synthetic": 100}


def served_variants(cafe: CafeEmbeddingBagCollection) -> Dict[str, nn.Module]:
    """The scripted serving forms of a trained module: float32 rows, then each quantized dtype."""
    served = export_bag_module(cafe)
    variants: Dict[str, nn.Module] = {"fp32": served}
    variants.update({dtype: quantize_for_inference(served, dtype) for dtype in WEIGHT_DTYPES})
    return variants


def run_suite(suite: str, compression_ratio: float, seed: int) -> List[Dict[str, object]]:
    """Trains, saves, reloads unsharded and evaluates every serving form; one row per form."""
    args, cfg = parse_args(
        [*SUITES[suite]["train_args"], "--method", "cafe", "--compression-ratio", str(compression_ratio), "--seed", str(seed), "--no-progress"]
    )
    data, train, test = load(args, cfg)
    device = ensure_process_group()
    cardinalities, num_dense = data_shape(data)
    tables = embedding_tables(cardinalities, cfg.embedding_dim)
    model, optimizer, _ = build_model(cfg, tables, num_dense, device)
    trained = fit(cfg, model, optimizer, train, test, device)["history"][-1]
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(os.path.join(tmp, "ckpt"), model)
        dlrm = DLRM(
            embedding_bag_collection=build_ebc(cfg, tables, torch.device("cpu")),
            dense_in_features=num_dense,
            dense_arch_layer_sizes=cfg.dense_arch,
            over_arch_layer_sizes=cfg.over_arch,
        )
        unsharded_model = DLRMTrain(dlrm)  # the trainer's module tree, unsharded
        checkpoint.load(path, unsharded_model)
    cafe = dlrm.sparse_arch.embedding_bag_collection
    assert isinstance(cafe, CafeEmbeddingBagCollection)
    test_batches = test(0) if callable(test) else test
    rows = []
    unsharded = evaluate(unsharded_model, test_batches, torch.device("cpu"))
    for name, module in served_variants(cafe.eval()).items():
        dlrm.sparse_arch.embedding_bag_collection = torch.jit.script(module)
        metrics = evaluate(unsharded_model, test_batches, torch.device("cpu"))
        rows.append(
            {
                "suite": suite,
                "compression_ratio": compression_ratio,
                "seed": seed,
                "rows": name,
                **module.nbytes(),
                "auc": metrics["auc"],
                "logloss": metrics["logloss"],
                "trained_auc": trained["auc"],
                "reloaded_auc": unsharded["auc"],
            }
        )
    for r in rows:
        r["auc_vs_fp32"] = r["auc"] - rows[0]["auc"]
        r["table_bytes_vs_fp32"] = r["table_bytes"] / rows[0]["table_bytes"]
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", default=["frappe", "ciao"], choices=sorted(SUITES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/quantized_serving")
    args = p.parse_args(argv)
    quiet_logs()
    rows = [r for suite in args.suites for r in run_suite(suite, DEFAULT_CR[suite], args.seed)]
    header = ["data", "CR", "rows", "table bytes", "x fp32", "ID map bytes", "test AUC", "vs fp32", "unsharded float AUC"]
    table = markdown_table(
        header,
        [
            [r["suite"], r["compression_ratio"], r["rows"], f"{r['table_bytes']:,}", f"{r['table_bytes_vs_fp32']:.3f}",
             f"{r['map_bytes']:,}", f"{r['auc']:.4f}", f"{r['auc_vs_fp32']:+.4f}", f"{r['reloaded_auc']:.4f}"]
            for r in rows
        ],
    )
    print(table)
    write_json(args.out + ".json", {"runs": rows})
    with open(args.out + ".md", "w") as f:
        f.write(f"# Quantized serving\n\n`python -m examples.benchmarks.quantized_serving --out {args.out}`\n\n{table}\n")


if __name__ == "__main__":
    main()
