"""Putting imported weights into our modules, and the ``from_pretrained`` entry points."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from flamingo_jax.checkpointing import read_params
from flamingo_jax.importers import clip, efficientnet
from flamingo_jax.importers import openflamingo as of_importer
from flamingo_jax.importers.assign import assign
from flamingo_jax.importers.lm import load_lm
from flamingo_jax.importers.weights import weights_path
from flamingo_jax.models import scan
from flamingo_jax.models.flamingo import Flamingo, FlamingoConfig
from flamingo_jax.models.kinds import abstract_model
from flamingo_jax.models.layers import CountingRngs
from flamingo_jax.models.llama import LlamaConfig, LlamaLM
from flamingo_jax.tokenizer import load_tokenizer


def lm_from_pretrained(path: str, **config_overrides) -> tuple[LlamaConfig, LlamaLM]:
    """A LlamaLM of any family (``importers.lm``) from a Hugging Face checkpoint directory or a
    ``.gguf`` file (or a registered weights name)."""
    config, params = load_lm(weights_path(path), **config_overrides)
    with nnx.use_eager_sharding(False):
        model = LlamaLM(config, rngs=CountingRngs(0))
    assign(model, scan.to_layout(params, config))
    return config, model


def _read_state(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        return load_file(path)
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.float().numpy() for key, value in state.items()}


def pretrained_params(
    config,
    *,
    lm=None,
    vision_hf=None,
    vision_open_clip=None,
    vision_efficientnet=None,
    openflamingo=None,
    params=None,
    **openflamingo_tokens,
):
    """{Flamingo parameter path: array} from the given sources, checked against ``config``.

    Each source is a path or a name registered in ``importers.weights.WEIGHTS``: ``lm`` (a
    Hugging Face directory of a family ``importers.lm`` reads, or a GGUF file), ``vision_hf``
    (CLIPVisionModel safetensors directory), ``vision_open_clip`` (open_clip ``visual`` state
    dict), ``vision_efficientnet`` (``efficientnet_pytorch``-layout .pth), ``openflamingo``
    (OpenFlamingo ``checkpoint.pt``), ``params`` (a parameter checkpoint of this project, in either layer layout)."""
    checkpoint = params
    lm, vision_hf, vision_open_clip, vision_efficientnet, openflamingo = (
        None if spec is None else weights_path(spec)
        for spec in (lm, vision_hf, vision_open_clip, vision_efficientnet, openflamingo)
    )
    params = {}
    if checkpoint:
        params.update(read_params(checkpoint))
    if lm:
        lm_config, lm_params = load_lm(lm)
        if lm_config.vocab_size > config.lm.vocab_size:
            # Embeddings padded beyond the tokenizer (MPT's and GPT-NeoX's 50432 rows for 50277
            # tokens): the rows no token id reaches are dropped, as OpenFlamingo's resize does.
            lm_params = _keep_vocab_rows(lm_params, config.lm.vocab_size)
            lm_config = dataclasses.replace(lm_config, vocab_size=config.lm.vocab_size)
        for field in (
            "family",
            "vocab_size",
            "width",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "mlp_dim",
            "tie_embeddings",
            "parallel_residual",
            "rotary_fraction",
            "qk_norm",
        ):
            if getattr(lm_config, field) != getattr(config.lm, field):
                raise ValueError(
                    f"{lm}: LlamaConfig.{field} is {getattr(lm_config, field)} in the weights but "
                    f"{getattr(config.lm, field)} in the model config"
                )
        params.update({f"lm/{key}": value for key, value in lm_params.items()})
        params.update(new_token_rows(lm_params, _eos_id(lm), tied=config.lm.tie_embeddings))
    if vision_hf:
        files = [os.path.join(vision_hf, n) for n in sorted(os.listdir(vision_hf)) if n.endswith(".safetensors")]
        state = {k: v for path in files for k, v in load_file(path).items()}
        params.update({f"vision/{k}": v for k, v in clip.from_hf_clip_vision(state, config.vision).items()})
    if vision_open_clip:
        state = _read_state(vision_open_clip)
        params.update({f"vision/{k}": v for k, v in clip.from_open_clip_visual(state, config.vision).items()})
    if vision_efficientnet:
        converted = efficientnet.convert_lite0(efficientnet.read_state_dict(vision_efficientnet))
        params.update({f"vision/{k}": v for k, v in converted.items()})
    if openflamingo:
        params.update(
            of_importer.flamingo_params(of_importer.load_checkpoint(openflamingo), config, **openflamingo_tokens)
        )
    if not params:
        raise ValueError(
            "nothing to convert: give lm, vision_hf, vision_open_clip, vision_efficientnet, openflamingo or params"
        )
    params = scan.to_layout(params, config)
    check_params(params, config)
    return params


def check_params(params: dict[str, np.ndarray], config) -> None:
    """Raises naming the first converted weight the configured model has no parameter for, or
    whose shape differs from the model's."""
    abstract = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(abstract_model(config)))}
    for key, value in params.items():
        if key not in abstract:
            raise ValueError(f"converted weight {key!r} has no parameter in the configured model")
        if tuple(abstract[key].shape) != tuple(value.shape):
            raise ValueError(
                f"converted weight {key!r} has shape {value.shape}, the model expects {abstract[key].shape}"
            )


def _keep_vocab_rows(lm_params: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The LM's parameters with its input and output embeddings cut to their first ``rows`` ids."""
    kept = dict(lm_params, embed=lm_params["embed"][:rows])
    if "lm_head/linear/kernel" in kept:
        kept["lm_head/linear/kernel"] = kept["lm_head/linear/kernel"][:, :rows]
    return kept


def _eos_id(lm: str) -> int | None:
    if lm.endswith(".gguf"):
        return load_tokenizer(f"gguf:{lm}").eos_id  # read once per process, as the run's tokenizer
    config_path = os.path.join(lm, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            eos = json.load(f).get("eos_token_id")
        return eos[0] if isinstance(eos, list) else eos
    return None


def new_token_rows(lm_params: dict[str, np.ndarray], eos_id: int | None, *, tied: bool) -> dict[str, np.ndarray]:
    """Initial rows for ``<image>`` and ``<|endofchunk|>`` from the pretrained LM: ``<image>``
    reads as the mean input embedding, ``<|endofchunk|>`` as the LM's end-of-sequence token (so
    a chunk ends the way the LM ends a text). Random rows would feed the frozen LM inputs it has
    never seen; OpenFlamingo trains them from random, which costs a full backward pass."""
    embed = lm_params["embed"]
    eos = embed[eos_id] if eos_id is not None else embed.mean(axis=0)
    rows = {"new_tokens/embed": np.stack([embed.mean(axis=0), eos])}
    head = lm_params.get("lm_head/linear/kernel")
    if not tied and head is not None:
        eos_column = head[:, eos_id] if eos_id is not None else head.mean(axis=1)
        rows["new_tokens/head"] = np.stack([head.mean(axis=1), eos_column], axis=1)
    return rows


def flamingo_from_pretrained(config: FlamingoConfig, *, seed: int = 0, **sources) -> Flamingo:
    """A Flamingo model whose frozen (and, with ``openflamingo=``, trainable) parts come from
    pretrained files; the rest is initialised from ``seed``. ``sources`` as in
    :func:`pretrained_params` (``lm=``, ``vision_hf=``, ``vision_open_clip=``, ``openflamingo=``)."""
    with nnx.use_eager_sharding(False):
        model = Flamingo(config, rngs=CountingRngs(seed))
    assign(model, pretrained_params(config, **sources))
    return model
