"""TorchX components for torchrec_cafe (registered as ``cafe.*``; see ``launch.components``)."""
