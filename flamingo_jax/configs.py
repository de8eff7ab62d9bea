"""gin at the edge: registers the plain config dataclasses and parses gin files into them.

Jitted code and data workers never read gin; they receive the resolved dataclasses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import gin

from flamingo_jax.data.mixture import DatasetConfig
from flamingo_jax.data.synthetic import SyntheticConfig
from flamingo_jax.evaluation.fewshot import EvalConfig
from flamingo_jax.models.connector import ConnectorConfig
from flamingo_jax.models.contrastive import ContrastiveConfig, TextEncoderConfig
from flamingo_jax.models.efficientnet import EfficientNetConfig
from flamingo_jax.models.flamingo import FlamingoConfig
from flamingo_jax.models.llama import LlamaConfig
from flamingo_jax.models.nfnet import NFNetConfig
from flamingo_jax.models.resampler import ResamplerConfig
from flamingo_jax.models.vit import ViTConfig
from flamingo_jax.models.xattn import XAttnConfig
from flamingo_jax.sharding import MeshConfig
from flamingo_jax.train.loop import RunConfig
from flamingo_jax.train.optimizer import OptimizerConfig

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
EXPERIMENTS_DIR = os.path.join(ROOT_DIR, "experiments")

_CONFIG_CLASSES = (
    FlamingoConfig,
    ContrastiveConfig,
    TextEncoderConfig,
    LlamaConfig,
    NFNetConfig,
    EfficientNetConfig,
    ResamplerConfig,
    ViTConfig,
    XAttnConfig,
    ConnectorConfig,
    MeshConfig,
    OptimizerConfig,
    RunConfig,
    DatasetConfig,
    SyntheticConfig,
    EvalConfig,
)
CONFIGURABLES = {cls.__name__: gin.external_configurable(cls, module="flamingo_jax") for cls in _CONFIG_CLASSES}


class _QuietSearchPathMisses(logging.Filter):
    """gin logs an ERROR for every search-path prefix that misses before one hits; hide those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found:")


logging.getLogger().addFilter(_QuietSearchPathMisses())


def resolve_gin_file(path: str) -> str:
    """``path`` as given if it exists, else under ``experiments/``, else under the checkout (e.g.
    ``flamingo_jax/demo/demo_cpu.gin`` from any directory); raises naming where it looked."""
    for candidate in (path, os.path.join(EXPERIMENTS_DIR, path), os.path.join(ROOT_DIR, path)):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"gin file {path!r} not found (also looked in {EXPERIMENTS_DIR} and {ROOT_DIR})")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turns t5x-style ``--gin.KEY=VALUE`` flags into ``--gin_bindings=KEY = VALUE`` for absl.

    Use as ``app.run(main, flags_parser=...)`` or on ``sys.argv`` before parsing flags.
    """
    rewritten = []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            key, value = arg[len("--gin.") :].split("=", 1)
            rewritten.append(f"--gin_bindings={key} = {value}")
        else:
            rewritten.append(arg)
    return rewritten


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str] = (), *, finalize: bool = True) -> None:
    """Clears gin and parses ``gin_files`` (relative paths are searched in ``experiments/`` too)
    followed by ``bindings``. A file's ``include`` lines are searched beside it, then in
    ``experiments/``; its ``import`` lines import Python packages (a project registering its data
    sources, tasks and weights). Unknown bindings or missing files raise with gin's message."""
    gin.clear_config()
    files = [resolve_gin_file(path) for path in gin_files]
    # gin keeps its search path globally: set it afresh for these files (no public setter).
    search = ["", *dict.fromkeys(os.path.dirname(os.path.abspath(path)) for path in files), EXPERIMENTS_DIR]
    gin.config._LOCATION_PREFIXES[:] = search  # noqa: SLF001
    try:
        gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=finalize)
    except TypeError as error:
        # gin also looks an include up as a Python package ('runs/x.gin': package 'runs'); a
        # plain directory of that name in the working directory is a namespace package without
        # a file, which gin 0.5 fails on (os.path.dirname(None)).
        shadowing = sorted(name for name in os.listdir(".") if name in os.listdir(EXPERIMENTS_DIR))
        if "NoneType" not in str(error) or not shadowing:
            raise
        raise ValueError(
            f"gin could not resolve an include: the working directory's {shadowing} shadow the folders of "
            f"{EXPERIMENTS_DIR} for gin's package lookup; run from another directory or rename them "
            f"(gin: {error})"
        ) from error


def flamingo_config() -> FlamingoConfig:
    """The FlamingoConfig the current gin bindings describe."""
    return CONFIGURABLES["FlamingoConfig"]()


def run_config() -> RunConfig:
    """The RunConfig the current gin bindings describe (lists become tuples: configs are hashable)."""
    config = CONFIGURABLES["RunConfig"]()
    return dataclasses.replace(config, datasets=tuple(config.datasets))


def eval_config() -> EvalConfig:
    """The EvalConfig the current gin bindings describe (lists become tuples)."""
    config = CONFIGURABLES["EvalConfig"]()
    return dataclasses.replace(config, tasks=tuple(config.tasks), shots=tuple(config.shots), seeds=tuple(config.seeds))


def operative_config(gin_files: Sequence[str], bindings: Sequence[str]) -> str:
    """The text written to ``workdir/config.gin``: the files and bindings used, then every
    binding gin applied."""
    header = [f"# gin_file: {path}" for path in gin_files] + [f"# binding: {b}" for b in bindings]
    return "\n".join(header) + "\n\n" + gin.operative_config_str()


def model_gin(config: FlamingoConfig, header: str = "") -> str:
    """Gin text that rebuilds ``config``: every field of its LM, vision, resampler and xattn
    configs (what ``tools.convert`` writes beside weights whose config came from their files)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    parts = {
        "lm": config.lm,
        "vision": config.vision,
        "resampler": config.resampler,
        "xattn": config.xattn,
        "connector": config.connector,
    }
    lines += [f"FlamingoConfig.{name} = @{type(part).__name__}()" for name, part in parts.items()]
    for name in ("trainable", "trainable_param_dtype", "new_tokens"):
        lines.append(f"FlamingoConfig.{name} = {getattr(config, name)!r}")
    for part in parts.values():
        lines.append("")
        lines += [f"{type(part).__name__}.{f.name} = {getattr(part, f.name)!r}" for f in dataclasses.fields(part)]
    return "\n".join(lines) + "\n"


def load_model_config(gin_file: str, bindings: Sequence[str] = ()) -> FlamingoConfig:
    """Parses one model gin file (e.g. ``models/flamingo_3b.gin``) into a FlamingoConfig."""
    parse_gin([gin_file], bindings, finalize=False)
    try:
        return flamingo_config()
    finally:
        gin.clear_config()
