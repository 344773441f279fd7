"""Builds torchrec_cafe._C, the compiled CPU kernels (torchrec_cafe/csrc), with torch's own headers:
install with ``pip install --no-build-isolation`` so the build uses the installed torch
(scripts/setup_env.sh does). The package works without it (the tensor implementation), so a failed
build is a warning, and a build environment without torch (an isolated build) installs the package
without the kernels. Metadata: setup.cfg."""

import warnings

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # isolated build: no torch to compile against
    warnings.warn("torch is not importable while building: torchrec_cafe._C (the CPU kernels) is skipped; "
                  "install with --no-build-isolation to build it")
    setup()
else:
    sources = ["torchrec_cafe/csrc/hot_sketch.cpp", "torchrec_cafe/csrc/remap.cpp", "torchrec_cafe/csrc/rows.cpp",
               "torchrec_cafe/csrc/importance.cpp"]
    setup(
        ext_modules=[CppExtension("torchrec_cafe._C", sources, extra_compile_args=["-O3"], optional=True)],
        cmdclass={"build_ext": BuildExtension},
    )
