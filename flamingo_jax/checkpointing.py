"""Orbax checkpoints of the whole run state: trainable parameters, optimizer state, step and the
data-iterator position; plus plain parameter checkpoints for ``init_from``.

Saves are asynchronous and atomic (orbax writes into a temporary directory and renames it when
complete, so a save killed half-way is never restored). The frozen weights are not saved with
every step: they are rebuilt bit-identically from the seed or from ``init_from``.
"""

from __future__ import annotations

import logging
import signal
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flamingo_jax import storage
from flamingo_jax.models import scan

log = logging.getLogger(__name__)


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run in ``directory``."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = storage.path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores onto the shardings held by ``abstract_state`` (ShapeDtypeStruct leaves), which
        may describe another mesh than the one that saved."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
        )
        return self.manager.restore(step, args=args)["state"]

    def restore_state(self, step: int, abstract_state):
        """Restores only the run state (no data iterator): what evaluation needs."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args)["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(directory: str, params: dict[str, jax.Array]) -> None:
    """Writes a flat {path: array} parameter dict (e.g. converted pretrained weights)."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(storage.path(directory), params, force=True)


def read_params(directory: str) -> dict[str, np.ndarray]:
    """Every entry of a parameter checkpoint, as host arrays."""
    directory = storage.path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no parameter checkpoint directory at {directory}")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(directory)
    return {key: np.asarray(value) for key, value in restored.items()}


def load_params(
    directory: str,
    shardings: dict[str, jax.sharding.Sharding],
    shapes: dict[str, jax.ShapeDtypeStruct],
    model_config=None,
):
    """Loads the entries of a parameter checkpoint that the model has, onto ``shardings``.

    Returns {path: array} for the keys present in both; raises naming the first key whose shape
    differs, or (given the ``model_config``) when its layers are stored in the other layout
    (per layer / stacked, ``LlamaConfig.scan_layers``) than the model's.
    """
    directory = storage.path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"init_from: no checkpoint directory at {directory}")
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(directory)
        tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
        stored = dict(tree.tree if hasattr(tree, "tree") else tree)
        mismatch = model_config is not None and scan.layout_mismatch(stored, model_config)
        if mismatch:
            raise ValueError(f"init_from {directory}: {mismatch}")
        wanted = {}
        for key, meta in stored.items():
            if key not in shapes:
                continue
            if tuple(meta.shape) != tuple(shapes[key].shape):
                raise ValueError(
                    f"init_from {directory}: {key} has shape {tuple(meta.shape)}, the model expects {shapes[key].shape}"
                )
            wanted[key] = jax.ShapeDtypeStruct(shapes[key].shape, shapes[key].dtype, sharding=shardings[key])
        if not wanted:
            raise ValueError(f"init_from {directory}: none of its {len(stored)} entries matches a model parameter")
        target = {key: wanted.get(key, ocp.PLACEHOLDER) for key in stored}
        restored = checkpointer.restore(directory, target)
    return {key: value for key, value in restored.items() if key in wanted}


class PreemptionWatcher:
    """Tells the train loop, at each step, whether to save and stop for a preemption notice.

    One process: SIGTERM sets a flag. Several processes: JAX's preemption sync point
    (``multihost_utils.reached_preemption_sync_point``, the mechanism orbax's checkpoint manager
    uses): the first SIGTERM any process receives reaches every process through the distributed
    runtime's coordination service, and all of them return True at the same step. No collective
    runs per step.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def install(self) -> PreemptionWatcher:
        # With several processes JAX's own SIGTERM handler (installed by jax.distributed) is the
        # notice; a Python handler would replace it.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint after this step and stopping")
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """Call after every step with its number (every process, the same numbers)."""
        if jax.process_count() > 1:
            if multihost_utils.reached_preemption_sync_point(step):
                log.warning("preemption notice: saving a checkpoint at step %d and stopping", step)
                return True
            return False
        return self._event.is_set()

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
