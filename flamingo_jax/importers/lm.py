"""One entry point for LM weights of every family: ``load_lm(path)`` picks the importer from the
file (a ``.gguf`` file: Llama) or from ``config.json``'s ``model_type`` (``llama`` / ``mistral``,
``mpt``, ``mosaic_gpt``, ``gpt_neox``)."""

from __future__ import annotations

import os

import numpy as np

from flamingo_jax.importers import gpt_neox, llama, mpt
from flamingo_jax.models.llama import LlamaConfig

# model_type in config.json -> the importer of that layout.
HF_LOADERS = {
    "llama": llama.load_hf_llama,
    "mistral": llama.load_hf_llama,
    "mpt": mpt.load_hf_mpt,
    "mosaic_gpt": mpt.load_mosaic_gpt,
    "gpt_neox": gpt_neox.load_hf_gpt_neox,
}


def load_lm(path: str, **config_overrides) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """``(LlamaConfig, {LlamaLM parameter path: float32 array})`` from a GGUF file or a Hugging
    Face checkpoint directory of any supported family."""
    if path.endswith(".gguf"):
        return llama.load_gguf_llama(path, **config_overrides)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: neither a .gguf file nor a checkpoint directory")
    model_type = llama.read_hf_config(path).get("model_type", "llama")
    if model_type not in HF_LOADERS:
        raise ValueError(f"{path}: model_type {model_type!r} has no importer; known: {sorted(HF_LOADERS)}")
    return HF_LOADERS[model_type](path, **config_overrides)
