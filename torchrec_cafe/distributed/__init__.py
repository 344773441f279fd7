"""Multi-rank pieces of CAFE (sketch synchronisation); the custom sharder is not built yet."""

from torchrec_cafe.distributed.sketch_sync import all_gather_occurrences

__all__ = ["all_gather_occurrences"]
