"""Scanned layers (``LlamaConfig.scan_layers``): the same weights, losses, gradients and generated
tokens as the per-layer model, on 8 devices under FSDP; one period's gathered weights held at a
time; parameter dicts and checkpoints convert between the two layouts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from flamingo_jax import checkpointing, sharding
from flamingo_jax.evaluation.generate import GenerateConfig, generate
from flamingo_jax.models import scan
from flamingo_jax.models.flamingo import create_flamingo
from flamingo_jax.train.params import flatten_state, init_params, merge_model

from conftest import make_batch, set_gates, with_lm_family

FSDP = sharding.MeshConfig(data=1, fsdp=8, rules="fsdp")


def variant(config, *, layers, first_layer=0, placement="paper", scanned=False, policy="none", **lm):
    return dataclasses.replace(
        config,
        lm=dataclasses.replace(config.lm, num_layers=layers, scan_layers=scanned, remat_policy=policy, **lm),
        xattn=dataclasses.replace(config.xattn, first_layer=first_layer, placement=placement),
    )


def sharded_batch(batch, mesh, rules):
    return jax.tree.map(lambda a: jax.device_put(a, sharding.batch_sharding(mesh, rules, a.ndim)), batch)


def fsdp_loss_and_grads(config, batch, *, unique_rows=0):
    """Loss and gradients of the trainable parameters (per-layer paths), FSDP over 8 devices,
    the xattn gates opened so that the images and every block count."""
    mesh, rules = sharding.create_mesh(FSDP), sharding.RULE_SETS["fsdp"]
    with sharding.activation_sharding(mesh, rules):
        graphdef, trainable, frozen = init_params(config, mesh, rules, seed=0)
    trainable = {k: v + 0.5 if k.endswith("_gate") else v for k, v in trainable.items()}

    def loss(trainable, frozen, batch):
        with sharding.activation_sharding(mesh, rules):
            return merge_model(graphdef, trainable, frozen).train_loss(batch, unique_rows=unique_rows)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(trainable, frozen, sharded_batch(batch, mesh, rules))
    specs = {key: value.sharding.spec for key, value in frozen.items()}
    return float(value), scan.unstack_params({k: np.asarray(v) for k, v in grads.items()}, config), specs


@pytest.mark.slow
@pytest.mark.parametrize(
    "layers, first_layer, placement, policy, unique_rows",
    [
        # Blocks before layers 1, 3, 5: layer 0 below the scan, two periods, block 5 + layer 5 above.
        (6, 1, "paper", "save_dot_except_mlp", 0),
        # OpenFlamingo's offset: blocks before 1, 3, 5 of 7 layers (three whole periods), the
        # layers below the first block run once per distinct row, remat keeps nothing.
        (7, 0, "openflamingo", "full", 4),
    ],
)
def test_scanned_model_matches_per_layer_model_under_fsdp(
    tiny_config, layers, first_layer, placement, policy, unique_rows
):
    batch = make_batch(tiny_config, batch_size=8, length=12)
    plain = variant(tiny_config, layers=layers, first_layer=first_layer, placement=placement)
    scanned = variant(
        tiny_config, layers=layers, first_layer=first_layer, placement=placement, scanned=True, policy=policy
    )
    loss, grads, _ = fsdp_loss_and_grads(plain, batch, unique_rows=unique_rows)
    scanned_loss, scanned_grads, specs = fsdp_loss_and_grads(scanned, batch, unique_rows=unique_rows)
    assert specs["lm/layers/mlp/up_proj/linear/kernel"] == jax.sharding.PartitionSpec(None, "fsdp", None)
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
    assert sorted(scanned_grads) == sorted(grads)
    assert any(key.startswith("xattn_layers/0/") for key in grads)
    for key, value in grads.items():
        # Relative to each array's largest entry: a scalar gate's gradient, a sum over every
        # token, differs by up to 6e-5 of itself between the two summation orders (AMD EPYC).
        scale = np.abs(value).max() + 1e-12
        np.testing.assert_allclose(scanned_grads[key] / scale, value / scale, atol=2e-4, err_msg=key)


@pytest.mark.slow
def test_scanned_gpt_neox_matches_per_layer_model_under_fsdp(tiny_config):
    """Another family's layers (LayerNorms with biases, biased projections, parallel residual)
    stack and scan the same way."""
    config = with_lm_family(tiny_config, "gpt_neox")
    batch = make_batch(config, batch_size=8, length=12)
    loss, grads, _ = fsdp_loss_and_grads(variant(config, layers=4), batch)
    scanned_loss, scanned_grads, specs = fsdp_loss_and_grads(variant(config, layers=4, scanned=True), batch)
    assert specs["lm/layers/attention/q_proj/linear/bias"] == jax.sharding.PartitionSpec(None, None)
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
    assert sorted(scanned_grads) == sorted(grads)
    for key, value in grads.items():
        scale = np.abs(value).max() + 1e-12
        np.testing.assert_allclose(scanned_grads[key] / scale, value / scale, atol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("scanned", [False, True])
def test_one_pass_over_several_datasets_gives_each_datasets_loss(tiny_config, scanned):
    """``Flamingo.train_losses``: batches of other shapes and media counts, as streams through the
    same layers, each get their own ``train_loss`` (with ``unique_rows`` below the first block and
    ``target_capacity`` at the head), and the same gradients of the weighted sum."""
    config = variant(tiny_config, layers=6, first_layer=1, scanned=scanned, policy="full" if scanned else "none")
    model = create_flamingo(config, seed=0)
    set_gates(model, 0.5)
    batches = {
        "documents": make_batch(config, batch_size=4, length=12, num_media=3, seed=1),
        "pairs": make_batch(config, batch_size=2, length=8, num_media=1, seed=2),
    }
    options = {"documents": {"unique_rows": 4}, "pairs": {"target_capacity": 3}}
    weights = {"documents": 1.0, "pairs": 0.2}
    graphdef, state = nnx.split(model)

    def joint(state):
        losses = nnx.merge(graphdef, state).train_losses(batches, options)
        return sum(weights[name] * loss for name, (loss, _) in losses.items()), losses

    def one_by_one(state):
        losses = {name: nnx.merge(graphdef, state).train_loss(b, **options[name]) for name, b in batches.items()}
        return sum(weights[name] * loss for name, (loss, _) in losses.items()), losses

    (_, joint_losses), joint_grads = jax.jit(jax.value_and_grad(joint, has_aux=True))(state)
    (_, losses), grads = jax.jit(jax.value_and_grad(one_by_one, has_aux=True))(state)
    assert list(joint_losses) == list(batches)
    for name, (loss, count) in losses.items():
        np.testing.assert_allclose(joint_losses[name][0], loss, rtol=1e-6, err_msg=name)
        assert int(joint_losses[name][1]) == int(count) > 0
    flat, joint_flat = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(joint_grads))
    trained = [path for path in flat if path[0] in ("xattn_layers", "resampler", "new_tokens")]
    assert trained
    for path in trained:
        value = np.asarray(flat[path].get_value())
        scale = np.abs(value).max() + 1e-12
        np.testing.assert_allclose(np.asarray(joint_flat[path].get_value()) / scale, value / scale, atol=1e-5)


def test_scanned_model_generates_the_same_tokens(tiny_config):
    """Beam search: the cached media keys/values are repeated per beam and reordered with them."""
    config = variant(tiny_config, layers=6, first_layer=1)
    batch = make_batch(tiny_config, batch_size=2, length=12, seed=5)
    generated = []
    for model_config in (config, dataclasses.replace(config, lm=dataclasses.replace(config.lm, scan_layers=True))):
        model = create_flamingo(model_config, seed=3)
        set_gates(model, 0.7)
        out = generate(
            model,
            np.asarray(batch.tokens),
            np.asarray(batch.image_index),
            np.asarray(batch.image_mask),
            np.asarray(batch.images),
            config=GenerateConfig(max_new_tokens=8, num_beams=2),
        )
        generated.append(np.asarray(out.tokens))
    np.testing.assert_array_equal(generated[1], generated[0])
    assert len(set(generated[0].ravel().tolist())) > 1


def test_layouts_convert_both_ways_and_checkpoints_say_which(tiny_config, tmp_path):
    plain_config = variant(tiny_config, layers=5)
    scanned_config = variant(tiny_config, layers=5, scanned=True)
    plain = flatten_state(nnx.state(create_flamingo(plain_config, seed=1), nnx.Param))
    scanned = flatten_state(nnx.state(create_flamingo(scanned_config, seed=1), nnx.Param))
    # The same seed builds the same weights in both layouts.
    stacked = scan.stack_params(plain, scanned_config)
    assert sorted(stacked) == sorted(scanned)
    for key, value in scanned.items():
        np.testing.assert_array_equal(np.asarray(stacked[key]), np.asarray(value), err_msg=key)
    assert stacked["lm/layers/attention/q_proj/linear/kernel"].shape[0] == 5
    back = scan.unstack_params(stacked, scanned_config)
    assert sorted(back) == sorted(plain)
    key = "lm/layers/4/mlp/down_proj/linear/kernel"
    np.testing.assert_array_equal(back[key], plain[key])
    incomplete = {k: v for k, v in plain.items() if not k.startswith("lm/layers/3/")}
    with pytest.raises(ValueError, match=r"missing for layers \[3\]"):
        scan.stack_params(incomplete, scanned_config)

    # A per-layer checkpoint loaded into the scanned model is refused with the converter's name,
    # and the converter rewrites it into a checkpoint the scanned model loads.
    per_layer_dir = str(tmp_path / "per_layer")
    checkpointing.save_params(per_layer_dir, plain)
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in scanned.items()}
    shardings = {k: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for k in scanned}
    with pytest.raises(ValueError, match="flamingo_jax.tools.convert"):
        checkpointing.load_params(per_layer_dir, shardings, shapes, scanned_config)
    converted_dir = str(tmp_path / "stacked")
    command = [
        sys.executable, "-m", "flamingo_jax.tools.convert", "--gin_file=models/tiny.gin",
        "--gin.LlamaConfig.num_layers=5", "--gin.LlamaConfig.scan_layers=True",
        f"--params={per_layer_dir}", f"--output={converted_dir}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = checkpointing.load_params(converted_dir, shardings, shapes, scanned_config)
    assert sorted(loaded) == sorted(scanned)
    for key, value in scanned.items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value), err_msg=key)


def _step_temporaries(config, batch) -> int:
    """Bytes of XLA temporaries per device of the trainable-gradient computation, FSDP over 8."""
    mesh, rules = sharding.create_mesh(FSDP), sharding.RULE_SETS["fsdp"]
    with sharding.activation_sharding(mesh, rules):
        graphdef, trainable, frozen = init_params(config, mesh, rules, seed=0)

    def loss(trainable, frozen, batch):
        with sharding.activation_sharding(mesh, rules):
            return merge_model(graphdef, trainable, frozen).train_loss(batch)[0]

    compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen, sharded_batch(batch, mesh, rules)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_fsdp_holds_one_periods_gathered_weights(tiny_config):
    """Doubling the depth of a scanned FSDP model adds the activations the added periods save,
    not their gathered weights (which the per-layer model does hold: the control)."""
    shape = dict(width=128, mlp_dim=512)
    batch = make_batch(tiny_config, batch_size=8, length=16)
    depth = {
        scanned: [
            _step_temporaries(variant(tiny_config, layers=layers, scanned=scanned, policy="full", **shape), batch)
            for layers in (2, 4)
        ]
        for scanned in (False, True)
    }
    lm = dataclasses.replace(tiny_config.lm, **shape)
    period = 2  # models/tiny.gin: a block before every other layer
    gathered_per_period = (
        4
        * period
        * (
            2 * lm.width * lm.num_heads * lm.dim_per_head  # q, o
            + 2 * lm.width * lm.num_kv_heads * lm.dim_per_head  # k, v
            + 3 * lm.width * lm.mlp_dim  # gate, up, down
        )
    )
    # What a period keeps for the backward pass, per device (batch 8 over 8 devices): its input
    # hidden states, and its block's media keys and values with their gradients.
    xattn = tiny_config.xattn
    media = tiny_config.resampler.num_latents * 3 * xattn.num_heads * (lm.width // xattn.num_heads)
    saved_per_period = 4 * (16 * lm.width + 4 * media)
    scanned_growth = depth[True][1] - depth[True][0]
    plain_growth = depth[False][1] - depth[False][0]
    assert plain_growth > gathered_per_period  # the per-layer model holds every gathered layer
    assert scanned_growth <= 2 * saved_per_period, (scanned_growth, saved_per_period)
    assert scanned_growth < gathered_per_period / 4


@pytest.mark.slow
def test_scanned_train_step_matches_per_layer_step():
    """Two steps of the smoke run (AdamW, gate learning-rate multipliers, gate metrics), FSDP over
    8 devices: the same losses, metrics and updated parameters in both layouts."""
    from test_train import run_steps, smoke_config

    mesh = sharding.create_mesh(FSDP)
    runs = {}
    for scanned in (False, True):
        config = smoke_config(f"LlamaConfig.scan_layers = {scanned}", "MeshConfig.fsdp = 8", "MeshConfig.data = 1")
        training, losses = run_steps(config, mesh)
        params = scan.unstack_params({k: np.asarray(v) for k, v in training.state.params.items()}, config.model)
        runs[scanned] = losses, params, config.model
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    assert sorted(runs[True][1]) == sorted(runs[False][1])
    for key, value in runs[False][1].items():
        np.testing.assert_allclose(runs[True][1][key], value, atol=2e-6, err_msg=key)
    from flamingo_jax.train.step import gate_values

    stacked_gates = gate_values(scan.stack_params(runs[True][1], runs[True][2]))
    assert stacked_gates.keys() == gate_values(runs[False][1]).keys() and "gate/1/ffw" in stacked_gates
