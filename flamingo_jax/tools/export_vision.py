"""Exports the vision tower of a trained stage-1 contrastive run as a parameter checkpoint that a
Flamingo config loads as its frozen vision encoder through ``RunConfig.init_from``.

  python -m flamingo_jax.tools.export_vision --gin_file=runs/contrastive_X.gin \\
      --workdir=/tmp/contrastive --output=/tmp/contrastive_vision [--step=N]

The tower keeps its parameter paths (``vision/...``, the same as in a Flamingo model), so the
Flamingo config only needs the same vision config (e.g. ``FlamingoConfig.vision =
@ViTConfig()`` with the same bindings) and ``RunConfig.init_from = '/tmp/contrastive_vision'``.
"""

from __future__ import annotations

import sys

from absl import app, flags
from flax import nnx

from flamingo_jax import checkpointing, configs
from flamingo_jax.evaluation.checkpoints import load_model
from flamingo_jax.models.kinds import kind_of
from flamingo_jax.train.params import path_key


def define_flags() -> None:
    """Command-line flags, defined only when run as a script (importing stays flag-free)."""
    flags.DEFINE_multi_string("gin_file", [], "The contrastive run's gin file(s).")
    flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings; also spelled --gin.KEY=VALUE.")
    flags.DEFINE_string("workdir", None, "The contrastive run's directory.")
    flags.DEFINE_string("output", None, "Where to write the vision parameter checkpoint.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def export_vision(run_config, workdir: str, output: str, step: int | None = None) -> tuple[int, int]:
    """Writes the ``vision/...`` parameters of ``step`` (None: latest) to ``output``; returns
    (step, number of arrays)."""
    if kind_of(run_config.model).name != "contrastive":
        raise ValueError("export_vision needs a contrastive run (RunConfig.model = @ContrastiveConfig())")
    model, step, _, _ = load_model(run_config, workdir, step)
    flat = {path_key(path): value for path, value in nnx.to_flat_state(nnx.state(model.vision, nnx.Param))}
    params = {f"vision/{key}": value[...] for key, value in flat.items()}
    checkpointing.save_params(output, params)
    return step, len(params)


def main(argv) -> None:
    args = flags.FLAGS
    if len(argv) > 1:
        sys.exit(f"export_vision: unexpected arguments {argv[1:]}")
    if not (args.gin_file and args.workdir and args.output):
        sys.exit("export_vision: --gin_file, --workdir and --output are required")
    configs.parse_gin(args.gin_file, args.gin_bindings)
    try:
        step, count = export_vision(configs.run_config(), args.workdir, args.output, args.step)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"export_vision: {error}")
    print(f"wrote {count} vision arrays of step {step} to {args.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main, argv=configs.rewrite_gin_args(sys.argv))
