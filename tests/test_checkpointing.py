"""Checkpoints restore onto another mesh; init_from loads pretrained parts."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from test_train import local_batches, smoke_config

from flamingo_jax import checkpointing, sharding
from flamingo_jax.data import mixture
from flamingo_jax.train.loop import build_training, global_batches


def _iterator(config):
    model = config.model
    token_ids = mixture.TokenIds(model.lm.vocab_size, model.media_token_id, model.endofchunk_token_id)
    return mixture.mixture_iterator(mixture.mixture_dataset(config.datasets, token_ids, seed=config.seed))


@pytest.mark.slow
def test_checkpoint_from_data_parallel_restores_onto_fsdp_tensor(tmp_path):
    source_config = dataclasses.replace(smoke_config(), mesh=sharding.MeshConfig(data=8, rules="data_parallel"))
    source_mesh = sharding.create_mesh(source_config.mesh)
    source = build_training(source_config, source_mesh)
    iterator = _iterator(source_config)
    for _ in range(2):
        source.step(global_batches(next(iterator), source_mesh, source.rules))
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(2, source.state, iterator)
    checkpointer.close()
    expected_next = next(iterator)

    target_config = dataclasses.replace(
        source_config, mesh=sharding.MeshConfig(data=1, fsdp=4, tensor=2, rules="fsdp_tensor")
    )
    target_mesh = sharding.create_mesh(target_config.mesh)
    target = build_training(target_config, target_mesh)
    restored_iterator = _iterator(target_config)
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
    assert checkpointer.latest_step() == 2
    target.state = checkpointer.restore(2, target.abstract_state(), restored_iterator)
    checkpointer.close()

    assert int(target.state.step) == 2
    for key, value in source.state.params.items():
        restored = target.state.params[key]
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(value), err_msg=key)
        assert restored.sharding == target.state_shardings.params[key]
    assert any("tensor" in str(s.spec) for s in target.state_shardings.params.values())
    # The data iterator continues where it was saved.
    resumed_next = next(restored_iterator)
    np.testing.assert_array_equal(resumed_next["interleaved"]["tokens"], expected_next["interleaved"]["tokens"])
    # And training continues with the same loss on both meshes (fp32 reduction order only).
    batches = global_batches(local_batches(source_config, 2), source_mesh, source.rules)
    loss_source = float(source.step(batches)["loss"])
    batches = global_batches(local_batches(source_config, 2), target_mesh, target.rules)
    loss_target = float(target.step(batches)["loss"])
    np.testing.assert_allclose(loss_target, loss_source, rtol=1e-5)


def test_init_from_loads_pretrained_parameters(tmp_path):
    config = smoke_config()
    mesh = sharding.create_mesh(config.mesh)
    reference = build_training(config, mesh)
    pretrained = {
        key: np.full(value.shape, 0.125, value.dtype)
        for key, value in reference.frozen.items()
        if key.startswith("lm/")
    }
    checkpointing.save_params(str(tmp_path / "pretrained"), pretrained)
    loaded = build_training(dataclasses.replace(config, init_from=str(tmp_path / "pretrained")), mesh)
    for key, value in pretrained.items():
        np.testing.assert_array_equal(np.asarray(loaded.frozen[key]), value, err_msg=key)
    vision_key = next(key for key in reference.frozen if key.startswith("vision/"))
    np.testing.assert_array_equal(np.asarray(loaded.frozen[vision_key]), np.asarray(reference.frozen[vision_key]))


def test_init_from_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="RunConfig.init_from.*nowhere"):
        dataclasses.replace(smoke_config(), init_from=str(tmp_path / "nowhere"))
    checkpointing.save_params(str(tmp_path / "wrong"), {"lm/embed": np.zeros((3, 3), np.float32)})
    shapes = {"lm/embed": jax.ShapeDtypeStruct((128, 64), np.float32)}
    shardings = {"lm/embed": sharding.replicated(sharding.create_mesh(sharding.MeshConfig()))}
    with pytest.raises(ValueError, match="lm/embed has shape \\(3, 3\\), the model expects \\(128, 64\\)"):
        checkpointing.load_params(str(tmp_path / "wrong"), shardings, shapes)
