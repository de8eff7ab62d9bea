"""Putting converted weights (``{parameter path: array}``) into a module's parameters."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx


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
