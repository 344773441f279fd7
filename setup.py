"""Builds torchrec_cafe._C, the HotSketch CPU kernels (torchrec_cafe/csrc), with torch's own
headers: install with ``pip install --no-build-isolation`` so the build uses the installed torch
(scripts/setup_env.sh does). The package works without it (the tensor implementation), so a
failed build is a warning, not an error. Metadata: setup.cfg."""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension("torchrec_cafe._C", ["torchrec_cafe/csrc/hot_sketch.cpp", "torchrec_cafe/csrc/remap.cpp"], extra_compile_args=["-O3"], optional=True)
    ],
    cmdclass={"build_ext": BuildExtension},
)
