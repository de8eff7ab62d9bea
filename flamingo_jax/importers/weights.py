"""Pretrained weight files by name. Wherever a weights path is asked for (``RunConfig.pretrained``,
``RunConfig.tokenizer='gguf:...'``, ``tools.convert``), a registered name may stand instead:
its entry returns the file's path. A project registers the files it ships::

    from flamingo_jax.importers.weights import WEIGHTS

    @WEIGHTS.register("my_lm")
    def my_lm() -> str:
        return "/data/models/my_lm.gguf"
"""

from __future__ import annotations

from collections.abc import Callable

from flamingo_jax.registry import Registry

WEIGHTS: Registry[Callable[[], str]] = Registry("pretrained weights")


def weights_path(spec: str) -> str:
    """The path a registered weights name stands for, or ``spec`` itself (a path)."""
    return WEIGHTS[spec]() if spec in WEIGHTS else spec
