"""The parameter-summary CLI runs as a subprocess with t5x-style flags."""

from __future__ import annotations

import subprocess
import sys

from flamingo_jax import configs


def test_rewrite_gin_args():
    argv = ["prog", "--gin_file=a.gin", "--gin.XAttnConfig.every=2", "--workdir=/tmp/x"]
    assert configs.rewrite_gin_args(argv) == [
        "prog",
        "--gin_file=a.gin",
        "--gin_bindings=XAttnConfig.every = 2",
        "--workdir=/tmp/x",
    ]


def test_summary_cli_prints_counts():
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_jax.tools.summary", "--gin_file=models/tiny.gin", "--gin.XAttnConfig.every=1"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    # every=1 puts a block before each of the 4 layers: 4 blocks.
    assert lines["xattn_layers"][2] == "trainable"
    assert lines["lm"][2] == "frozen"
    assert int(lines["xattn_layers"][1].replace(",", "")) == 4 * int(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "flamingo_jax.tools.summary",
                "--gin_file=models/tiny.gin",
                "--gin.XAttnConfig.every=4",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.split("xattn_layers")[1]
        .split()[0]
        .replace(",", "")
    )


def test_summary_cli_unknown_binding_fails_with_its_name():
    result = subprocess.run(
        [sys.executable, "-m", "flamingo_jax.tools.summary", "--gin_file=models/tiny.gin", "--gin.XAttnConfig.evry=1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "evry" in result.stderr
