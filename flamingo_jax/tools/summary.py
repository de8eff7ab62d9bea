"""Prints a model config's parameter counts per component, frozen vs trainable, without
allocating anything (jax.eval_shape).

  python -m flamingo_jax.tools.summary --gin_file=models/flamingo_80b.gin [--gin.KEY=VALUE ...]
"""

from __future__ import annotations

import sys

from absl import app, flags

from flamingo_jax import configs
from flamingo_jax.models.kinds import abstract_model, count_params

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "Model gin file(s), searched in experiments/ too.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings; also spelled --gin.KEY=VALUE")

COMPONENTS = ("vision", "resampler", "connector", "lm", "xattn_layers", "new_tokens")


def summary_rows(config) -> list[tuple[str, int, bool]]:
    """(component, parameter count, trainable) for each top-level component."""
    model = abstract_model(config)
    return [
        (name, count_params(getattr(model, name)), name in config.trainable)
        for name in COMPONENTS
        if hasattr(model, name)  # a token-level model has a connector, no resampler or xattn blocks
    ]


def format_summary(rows) -> str:
    lines = [f"{'component':<14}{'parameters':>16}  {'status'}"]
    for name, count, trainable in rows:
        lines.append(f"{name:<14}{count:>16,}  {'trainable' if trainable else 'frozen'}")
    total = sum(count for _, count, _ in rows)
    trainable = sum(count for _, count, is_trainable in rows if is_trainable)
    lines.append(f"{'total':<14}{total:>16,}  ({trainable / 1e9:.3f}B trainable, {total / 1e9:.3f}B total)")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    if not _GIN_FILE.value:
        sys.exit("--gin_file is required, e.g. --gin_file=models/flamingo_3b.gin")
    configs.parse_gin(_GIN_FILE.value, _GIN_BINDINGS.value, finalize=False)
    print(format_summary(summary_rows(configs.flamingo_config())))


if __name__ == "__main__":
    app.run(main, argv=configs.rewrite_gin_args(sys.argv))
