"""Putting imported weights into our modules, and the ``from_pretrained`` entry points."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flamingo_jax.models.flamingo import CountingRngs
from flamingo_jax.models.llama import LlamaConfig, LlamaLM


def assign(module: nnx.Module, params: dict[str, np.ndarray], *, prefix: str = "") -> None:
    """Overwrites ``module``'s parameters at '/'-joined paths (optionally under ``prefix``) with
    ``params``, casting to each parameter's dtype. Raises naming unknown paths or bad shapes."""
    variables = {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    for name, value in params.items():
        key = prefix + name
        if key not in variables:
            raise KeyError(f"imported weight {key!r} has no parameter in {type(module).__name__}")
        variable = variables[key]
        if tuple(variable.shape) != tuple(np.shape(value)):
            raise ValueError(f"imported weight {key!r} has shape {np.shape(value)}, the model expects {variable.shape}")
        variable[...] = jnp.asarray(value, variable.dtype)


def llama_from_pretrained(path: str, **config_overrides) -> tuple[LlamaConfig, LlamaLM]:
    """A LlamaLM from a Hugging Face checkpoint directory or a ``.gguf`` file."""
    from flamingo_jax.importers import llama

    loader = llama.load_gguf_llama if path.endswith(".gguf") else llama.load_hf_llama
    config, params = loader(path, **config_overrides)
    with nnx.use_eager_sharding(False):
        model = LlamaLM(config, rngs=CountingRngs(0))
    assign(model, params)
    return config, model
