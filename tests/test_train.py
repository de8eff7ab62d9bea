"""The train step: identical on 1 and 8 devices under every rule set; frozen weights untouched."""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax import configs, sharding
from flamingo_jax.batch import Batch
from flamingo_jax.data import mixture
from flamingo_jax.models.flamingo import token_loss
from flamingo_jax.train.loop import RunConfig, build_training, global_batches
from flamingo_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer


def smoke_config(*bindings) -> RunConfig:
    configs.parse_gin(["runs/smoke_cpu.gin"], bindings)
    try:
        return configs.run_config()
    finally:
        gin.clear_config()


def local_batches(config: RunConfig, step: int) -> dict:
    model = config.model
    token_ids = mixture.TokenIds(model.lm.vocab_size, model.media_token_id, model.endofchunk_token_id)
    return mixture.split_skipped(mixture.mixture_dataset(config.datasets, token_ids, seed=config.seed)[step])[0]


def run_steps(config, mesh, steps=2):
    training = build_training(config, mesh)
    losses = []
    for step in range(steps):
        batches = global_batches(local_batches(config, step), mesh, training.rules)
        losses.append(float(training.step(batches)["loss"]))
    return training, losses


MESHES = {
    "data_parallel": sharding.MeshConfig(data=8, rules="data_parallel"),
    "fsdp": sharding.MeshConfig(data=1, fsdp=8, rules="fsdp"),
    "fsdp_tensor": sharding.MeshConfig(data=1, fsdp=4, tensor=2, rules="fsdp_tensor"),
}


@pytest.fixture(scope="module")
def one_device_run():
    """Two steps of the smoke run on one device, the reference of every sharded run below (on one
    device the rule sets place nothing: they give the same program up to its annotations)."""
    config = smoke_config()
    return run_steps(config, sharding.create_mesh(sharding.MeshConfig(data=1), jax.devices()[:1]))


# data_parallel and fsdp_tensor (one compile on eight devices each) run in the slow step.
@pytest.mark.parametrize(
    "rules", [pytest.param(r, marks=pytest.mark.slow) if r != "fsdp" else r for r in sorted(MESHES)]
)
def test_same_step_on_one_and_eight_devices(rules, one_device_run):
    """fp32; tolerance 1e-5 relative on losses, 2e-6 absolute on updated parameters (the only
    difference is the order of cross-device reductions)."""
    config = dataclasses.replace(smoke_config(), mesh=MESHES[rules])
    single, single_losses = one_device_run
    sharded, sharded_losses = run_steps(config, sharding.create_mesh(MESHES[rules]))
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    assert sharded_losses[1] < sharded_losses[0] + 1  # it trained
    specs = {key: value.sharding.spec for key, value in sharded.state.params.items()}
    if rules == "fsdp_tensor":
        assert any("tensor" in str(spec) for spec in specs.values())
    if rules != "data_parallel":
        assert any("fsdp" in str(spec) for spec in specs.values())
    for key, value in single.state.params.items():
        np.testing.assert_allclose(np.asarray(sharded.state.params[key]), np.asarray(value), atol=2e-6, err_msg=key)


def test_frozen_weights_unchanged_and_without_optimizer_state():
    config = smoke_config()
    mesh = sharding.create_mesh(config.mesh)
    training = build_training(config, mesh)
    frozen_before = {key: np.asarray(value) for key, value in training.frozen.items()}
    params_before = {key: np.asarray(value) for key, value in training.state.params.items()}
    for step in range(3):
        training.step(global_batches(local_batches(config, step), mesh, training.rules))
    for key, value in training.frozen.items():
        np.testing.assert_array_equal(np.asarray(value), frozen_before[key], err_msg=key)
    changed = [
        key for key, value in training.state.params.items() if not np.array_equal(np.asarray(value), params_before[key])
    ]
    assert len(changed) == len(params_before)
    moments = [x for x in jax.tree.leaves(training.state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert sum(x.size for x in moments) == 2 * sum(v.size for v in training.state.params.values())
    assert not set(training.frozen) & set(training.state.params)
    assert any(key.startswith("lm/") for key in training.frozen)
    assert all(key.split("/")[0] in ("resampler", "xattn_layers", "new_tokens") for key in training.state.params)


def test_loss_with_no_counted_target_is_zero_not_nan():
    logits = jnp.zeros((2, 5, 11))
    batch = Batch(
        tokens=jnp.zeros((2, 5), jnp.int32),
        images=jnp.zeros((2, 1, 1, 4, 4, 3)),
        image_mask=jnp.ones((2, 1), bool),
        image_index=jnp.zeros((2, 5), jnp.int32),
        loss_mask=jnp.zeros((2, 5)),
    )
    loss, count = token_loss(logits, batch)
    assert float(loss) == 0.0 and float(count) == 0.0
    loss, count = token_loss(logits, dataclasses.replace(batch, loss_mask=jnp.ones((2, 5))))
    np.testing.assert_allclose(float(loss), np.log(11), rtol=1e-6)
    assert float(count) == 8  # the last position predicts nothing


def test_weight_decay_skips_the_resampler_and_schedule_warms_up():
    optimizer = OptimizerConfig(learning_rate=1.0, warmup_steps=4, weight_decay=0.5, clip_norm=1e9)
    tx = make_optimizer(optimizer)
    params = {"resampler/w": jnp.ones(3), "xattn_layers/0/w": jnp.ones(3)}
    state = tx.init(params)
    updates, _ = tx.update({k: jnp.zeros(3) for k in params}, state, params)
    assert float(jnp.abs(updates["resampler/w"]).max()) == 0.0  # zero gradient, no decay
    assert float(updates["xattn_layers/0/w"][0]) == pytest.approx(-0.25 * 0.5)  # lr(0) = 1/4
    schedule = learning_rate_schedule(optimizer)
    assert [float(schedule(s)) for s in (0, 3, 100)] == [0.25, 1.0, 1.0]


@pytest.fixture(scope="module")
def eight_device_run():
    """Two steps of the smoke run on its 8-device mesh: the reference of the settings that must
    not change the numbers."""
    config = smoke_config()
    return run_steps(config, sharding.create_mesh(config.mesh))


@pytest.mark.slow
def test_target_capacity_gives_the_same_steps(eight_device_run):
    """The head and loss at the target positions only (DatasetConfig.target_capacity), with the
    batch sharded over 8 devices: the same losses and parameters as at every position."""
    config = smoke_config("interleaved/DatasetConfig.target_capacity = 20", "pairs/DatasetConfig.target_capacity = 9")
    assert [d.target_capacity for d in config.datasets] == [20, 9]
    training, losses = run_steps(config, sharding.create_mesh(config.mesh))
    reference, reference_losses = eight_device_run
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    for key, value in reference.state.params.items():
        np.testing.assert_allclose(np.asarray(training.state.params[key]), np.asarray(value), atol=2e-6, err_msg=key)


@pytest.mark.slow
def test_remat_and_bf16_settings(eight_device_run):
    """Rematerialised LM layers give the same step; bf16 frozen weights and activations with fp32
    trainables train to a finite loss."""
    config = smoke_config()
    mesh = sharding.create_mesh(config.mesh)
    plain = eight_device_run[1][:1]
    remat = dataclasses.replace(
        config, model=dataclasses.replace(config.model, lm=dataclasses.replace(config.model.lm, remat_policy="full"))
    )
    _, rematerialised = run_steps(remat, mesh, steps=1)
    np.testing.assert_allclose(rematerialised, plain, rtol=1e-6)

    bf16 = smoke_config("LlamaConfig.param_dtype = 'bfloat16'", "LlamaConfig.dtype = 'bfloat16'")
    training, losses = run_steps(bf16, mesh, steps=2)
    assert np.isfinite(losses).all()
    assert {value.dtype for key, value in training.frozen.items() if key.startswith("lm/")} == {jnp.dtype("bfloat16")}
    assert {value.dtype for value in training.state.params.values()} == {jnp.dtype("float32")}
    assert abs(losses[0] - plain[0]) < 0.05  # bf16 changes the numbers only a little


def test_cosine_schedule_after_warmup():
    config = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, schedule="cosine", decay_steps=110)
    schedule = learning_rate_schedule(config)
    rates = [float(schedule(step)) for step in (0, 9, 10, 60, 110, 200)]
    assert rates[0] == pytest.approx(1e-4) and rates[1] == pytest.approx(1e-3)
    assert rates[2] == pytest.approx(1e-3) and rates[3] == pytest.approx(5e-4, rel=1e-3)
    assert rates[4] == pytest.approx(0.0, abs=1e-9) and rates[5] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="decay_steps=5 must exceed warmup_steps=10"):
        OptimizerConfig(warmup_steps=10, schedule="cosine", decay_steps=5)


def test_learning_rate_multipliers_scale_matching_parameters():
    params = {"xattn_layers/0/attn_gate": jnp.zeros(()), "xattn_layers/0/to_q/kernel": jnp.zeros(2)}
    grads = {"xattn_layers/0/attn_gate": jnp.ones(()), "xattn_layers/0/to_q/kernel": jnp.ones(2)}

    def first_update(**options):
        config = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, weight_decay=0.0, **options)
        tx = make_optimizer(config)
        updates, _ = tx.update(grads, tx.init(params), params)
        return {key: np.asarray(value) for key, value in updates.items()}

    plain = first_update()
    scaled = first_update(lr_multipliers={"attn_gate": 10.0})
    np.testing.assert_allclose(scaled["xattn_layers/0/attn_gate"], 10 * plain["xattn_layers/0/attn_gate"], rtol=1e-6)
    np.testing.assert_array_equal(scaled["xattn_layers/0/to_q/kernel"], plain["xattn_layers/0/to_q/kernel"])
    with pytest.raises(ValueError, match="lr_multipliers"):
        OptimizerConfig(lr_multipliers={"attn_gate": -1.0})
