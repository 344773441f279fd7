from torchrec_cafe.sketch.hashing import hash_mod, mix64
from torchrec_cafe.sketch.hot_sketch import HotSketch, SketchUpdate

__all__ = ["HotSketch", "SketchUpdate", "hash_mod", "mix64"]
