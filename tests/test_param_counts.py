"""Paper configs reproduce the parameter counts of Flamingo Table 5 (Appendix B.1.1), computed
with jax.eval_shape: nothing is allocated."""

from __future__ import annotations

import pytest

from flamingo_jax import configs
from flamingo_jax.models.kinds import abstract_model, count_params, trainable_filter

# (frozen LM, GATED XATTN-DENSE, total) in billions; vision 435M and resampler 194M for all.
PAPER = {
    "flamingo_3b": (1.4, 1.2, 3.2),
    "flamingo_9b": (7.0, 1.6, 9.3),
    "flamingo_80b": (70.0, 10.0, 80.0),
}


def _within(value, reference, tolerance=0.10):
    return abs(value - reference) <= tolerance * reference


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_parameter_counts(name):
    config = configs.load_model_config(f"models/{name}.gin")
    model = abstract_model(config)
    lm, xattn, total = PAPER[name]
    billions = lambda module: count_params(module) / 1e9
    counts = {
        "lm": billions(model.lm),
        "xattn": billions(model.xattn_layers),
        "total": billions(model),
        "vision": billions(model.vision),
        "resampler": billions(model.resampler),
        "trainable": count_params(model, trainable_filter(config)) / 1e9,
    }
    assert _within(counts["lm"], lm), counts
    assert _within(counts["xattn"], xattn), counts
    assert _within(counts["total"], total), counts
    assert _within(counts["vision"], 0.435), counts
    assert _within(counts["resampler"], 0.194), counts
    # Trainable = resampler + xattn blocks + the two new-token rows.
    new_rows = count_params(model.new_tokens) / 1e9
    assert counts["trainable"] == pytest.approx(counts["xattn"] + counts["resampler"] + new_rows)
    assert len(config.xattn_layer_indices) == {"flamingo_3b": 24, "flamingo_9b": 10, "flamingo_80b": 12}[name]
