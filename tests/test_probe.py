"""The visual-pathway probe tool: the probe itself, the resampler's trace, and the tool on
Fashion-MNIST (it must see the class information a collapsed resampler throws away)."""

from __future__ import annotations

import json
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flamingo_jax.demo  # noqa: F401  (registers the fashion_mnist task the probes read)
from flamingo_jax import configs
from flamingo_jax.data.images import image_config_for
from flamingo_jax.models.flamingo import create_flamingo
from flamingo_jax.tools import probe


def test_linear_probe_reads_separable_classes_and_not_shuffled_labels():
    rng = np.random.default_rng(0)
    means = 3.0 * rng.normal(size=(10, 20))
    labels = rng.integers(0, 10, 600)
    features = means[labels] + rng.normal(size=(600, 20))
    separable = probe.linear_probe_accuracy(features[:500], labels[:500], features[500:], labels[500:], num_classes=10)
    shuffled = rng.permutation(labels)
    chance = probe.linear_probe_accuracy(features[:500], shuffled[:500], features[500:], shuffled[500:], num_classes=10)
    assert separable > 0.95
    assert chance < 0.3


def test_resampler_trace_ends_in_its_output(tiny_config):
    model = create_flamingo(tiny_config)
    features = jax.random.normal(jax.random.key(0), (2, 1, 1, 5, tiny_config.vision.output_dim))
    values = model.resampler.trace(features)
    depth = tiny_config.resampler.depth
    assert list(values) == ["input", *(f"layer{k}" for k in range(depth)), "output"]
    np.testing.assert_array_equal(np.asarray(values["output"]), np.asarray(model.resampler(features)))
    assert values["input"].shape == (2, 5, tiny_config.resampler.width)


def test_probe_sees_what_a_collapsed_resampler_discards():
    """On Fashion-MNIST a random tiny ViT's features and the resampler over them carry the class
    well above chance; with the resampler's input projection zeroed (every image gives the same
    visual tokens) its stages fall to chance while the encoder's stay."""
    configs.parse_gin(["runs/smoke_cpu.gin"])
    try:
        run_config = configs.run_config()
    finally:
        gin.clear_config()
    data = probe.probe_data(
        "fashion_mnist", image_config_for(run_config.model.vision), train_images=400, test_images=200
    )
    model = create_flamingo(run_config.model)
    intact = probe.probe_model(model, data)
    assert list(intact) == ["vision", "resampler/input", "resampler/layer0", "resampler/layer1", "resampler/output"]
    assert intact["vision"] > 0.4 and intact["resampler/output"] > 0.4, intact
    kernel = model.resampler.input_proj.linear.kernel
    kernel[...] = jnp.zeros_like(kernel[...])
    collapsed = probe.probe_model(model, data)
    assert collapsed["vision"] == intact["vision"]
    for stage in ("resampler/input", "resampler/output"):
        assert collapsed[stage] < 0.2, collapsed


@pytest.mark.slow
def test_probe_cli_writes_its_table(tmp_path):
    command = [sys.executable, "-m", "flamingo_jax.tools.probe", "--gin_file=runs/smoke_cpu.gin"]
    command += ["--gin_file=flamingo_jax/demo/demo_eval.gin", "--task=fashion_mnist"]
    result = subprocess.run(
        [*command, f"--workdir={tmp_path}", "--steps=0", "--train_images=200", "--test_images=100"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resampler/output" in result.stdout and "step 0" in result.stdout
    written = json.loads((tmp_path / "eval" / "probe.json").read_text())
    assert set(written) == {"0"} and 0.0 <= written["0"]["vision"] <= 1.0
    # The default steps include the latest checkpoint, which this directory does not have.
    configs.parse_gin(["runs/smoke_cpu.gin"])
    with pytest.raises(FileNotFoundError, match="no checkpoint at all"):
        probe.probe_run(
            configs.run_config(), str(tmp_path), [None], task="fashion_mnist", train_images=20, test_images=10
        )
