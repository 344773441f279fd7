"""Serving a trained CAFE model without the training machinery: ``export_for_inference`` (the
frozen ``CafeInferenceEBC``, see ``torchrec_cafe.modules.frozen``), ``load_for_inference``, which
builds the served modules of a checkpoint from its manifest alone, and ``quantize_for_inference``
(TorchRec's quantized tables under the same frozen ID map)."""

from typing import Any, Dict, List, TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torchrec.inference.modules import quantize_embeddings
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from torchrec_cafe.checkpoint import CheckpointLoadPlanner, verified_manifest
from torchrec_cafe.config import CafeConfig
from torchrec_cafe.modules.cafe_embedding_bag import CafeEmbeddingBagCollection
from torchrec_cafe.modules.frozen import CafeInferenceEBC, CafeInferenceEC, export_bag_module, export_for_inference

__all__ = ["CafeInferenceEBC", "CafeInferenceEC", "export_for_inference", "load_for_inference", "quantize_for_inference"]

WEIGHT_DTYPES = {"fp16": torch.float16, "int8": torch.qint8, "int4": torch.quint4x2}


ServedT = TypeVar("ServedT", CafeInferenceEBC, CafeInferenceEC)


def quantize_for_inference(served: ServedT, weight_dtype: str) -> ServedT:
    """A copy of ``served`` whose physical tables are TorchRec's quantized ``EmbeddingBagCollection``
    (``torchrec.quant``, FBGEMM's int-N TBE kernels) with rows of ``weight_dtype``: ``"fp16"``,
    ``"int8"`` or ``"int4"`` (row-wise scale and bias); outputs stay float32. The frozen ID map is
    unchanged. Script it with ``torch.jit.script`` (through ``torchrec.fx``, as TorchRec serves).
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    quantized = quantize_embeddings(served, dtype=WEIGHT_DTYPES[weight_dtype], inplace=False, output_dtype=torch.float)
    assert isinstance(quantized, type(served))  # a copy whose inner EBC was swapped
    return quantized


def load_for_inference(path: str) -> Dict[str, CafeInferenceEBC]:
    """Serving forms of every CAFE module of a checkpoint (``checkpoint.save``), keyed by state-dict
    prefix, built from the manifest alone: no model code, no process group, any saved world size.

    The checkpoint is verified first (``ValueError`` when incomplete or damaged).
    """
    manifest = verified_manifest(path)
    served = {}
    for prefix, description in zip(manifest["prefixes"], manifest["modules"]):
        module = _module_from_description(description)
        state = {f"model.{prefix}{k}": v for k, v in module.state_dict().items()}
        dcp.load(state, checkpoint_id=path, planner=CheckpointLoadPlanner(), no_dist=True)
        module.load_state_dict({k[len(f"model.{prefix}") :]: v for k, v in state.items()})
        served[prefix.rstrip(".")] = export_bag_module(module.eval())
    return served


def _module_from_description(tables: List[Dict[str, Any]]) -> CafeEmbeddingBagCollection:
    """An untrained module with the tables and CAFE settings of a manifest entry."""
    configs = [
        EmbeddingBagConfig(
            name=t["name"],
            num_embeddings=t["num_embeddings"],
            embedding_dim=t["embedding_dim"],
            feature_names=list(t["feature_names"]),
            data_type=DataType[str(t["data_type"]).split(".")[-1]],
            pooling=PoolingType[str(t["pooling"]).split(".")[-1]],
        )
        for t in tables
    ]
    cafe = {t["name"]: CafeConfig(**t["cafe"]) for t in tables if t["cafe"] is not None}
    return CafeEmbeddingBagCollection(configs, cafe=cafe, is_weighted=bool(tables[0].get("is_weighted", False)))
