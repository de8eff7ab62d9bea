"""The mixture gin files of experiments/mixtures: the paper's and OpenFlamingo's weights (the
offline demo mixture trains on real images in tests/test_demo.py)."""

from __future__ import annotations

import json

import gin
import pytest
from test_sources import video_dir  # noqa: F401 (a fixture)

from flamingo_jax import configs


@pytest.fixture(scope="module")
def mmc4_dir(tmp_path_factory):
    from conftest import encoded_image

    root = tmp_path_factory.mktemp("mmc4")
    (root / "a.jpg").write_bytes(encoded_image((200, 10, 10)))
    document = {
        "text_list": ["A red square.", "More text."],
        "image_info": [{"image_name": "a.jpg", "matched_text_index": 0}],
    }
    (root / "docs.jsonl").write_text(json.dumps(document) + "\n")
    return root


def _run_config(mixture: str, bindings: list[str]):
    configs.parse_gin(["runs/smoke_cpu.gin", mixture], bindings)
    try:
        return configs.run_config()
    finally:
        gin.clear_config()


def test_paper_mixture_weights(mmc4_dir, pairs_dir, video_dir):  # noqa: F811
    config = _run_config(
        "mixtures/paper.gin",
        [f"M3W_PATH='{mmc4_dir}'", f"ALIGN_PATH='{pairs_dir}'", f"LTIP_PATH='{pairs_dir}'", f"VTP_PATH='{video_dir}'"],
    )
    datasets = {d.name: d for d in config.datasets}
    # Flamingo, Section 3: lambda_M3W = 1, lambda_ALIGN = lambda_LTIP = 0.2, lambda_VTP = 0.03.
    assert {name: d.loss_weight for name, d in datasets.items()} == {"m3w": 1.0, "align": 0.2, "ltip": 0.2, "vtp": 0.03}
    assert config.mixture_strategy == "accumulate"
    m3w, vtp = datasets["m3w"], datasets["vtp"]
    assert (m3w.length, m3w.max_images, m3w.p_next) == (256, 5, 0.5)  # L = 256, N = 5, p_next = 0.5
    assert (vtp.source, vtp.num_frames, vtp.fps) == ("video", 8, 1.0)  # 8 frames at 1 FPS
    assert [datasets[n].source for n in ("align", "ltip")] == ["webdataset", "webdataset"]


def test_openflamingo_mixture_weights(mmc4_dir, pairs_dir):
    config = _run_config("mixtures/openflamingo.gin", [f"MMC4_PATH='{mmc4_dir}'", f"LAION_PATH='{pairs_dir}'"])
    datasets = {d.name: d for d in config.datasets}
    assert {name: d.loss_weight for name, d in datasets.items()} == {"mmc4": 1.0, "laion": 0.2}
    mmc4 = datasets["mmc4"]
    assert (mmc4.length, mmc4.max_images, mmc4.p_next) == (256, 6, 1.0)
    assert datasets["laion"].length == 32


def test_missing_required_path_is_a_clear_error():
    config = _run_config("mixtures/openflamingo.gin", [])  # parses without data (for planning)
    with pytest.raises(FileNotFoundError, match="'mmc4': source 'mmc4' needs an existing path, got None"):
        config.datasets[0].check_path()


@pytest.mark.parametrize("size", ["3b", "9b"])
def test_openflamingo_run_configs(size, mmc4_dir, pairs_dir):
    """OpenFlamingo's recipe: MMC4 + LAION 0.2, AdamW lr 1e-4 after 1875 warmup steps."""
    configs.parse_gin([f"runs/openflamingo_{size}.gin"], [f"MMC4_PATH='{mmc4_dir}'", f"LAION_PATH='{pairs_dir}'"])
    try:
        config = configs.run_config()
    finally:
        gin.clear_config()
    assert {d.name: d.loss_weight for d in config.datasets} == {"mmc4": 1.0, "laion": 0.2}
    assert (config.optimizer.learning_rate, config.optimizer.warmup_steps) == (1e-4, 1875)
    assert config.model.xattn.placement == "openflamingo" and config.model.resampler.num_latents == 64
