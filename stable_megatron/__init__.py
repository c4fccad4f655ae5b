"""stable_megatron: stable LLM pre-training on megatron-core + DeepSpeed."""

from importlib import metadata as _metadata

# The oldest torch the project has run on: CI runs torch 2.13 (pyproject.toml's pin); 2.11, the
# version of the GPU machines' images, was rehearsed on CPU (docs/gpu.md). Older releases are
# refused here, in one line, rather than failing somewhere inside a step. Read from the
# installed distribution, so that importing the package does not import torch.
MIN_TORCH = (2, 11)


def _torch_version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)


try:
    _TORCH = _metadata.version("torch")
except _metadata.PackageNotFoundError:  # importing torch will say so
    _TORCH = None
if _TORCH is not None and _torch_version(_TORCH) < MIN_TORCH:
    raise ImportError(f"stable_megatron needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}; this "
                      f"Python has torch {_TORCH}")
