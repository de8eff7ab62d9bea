"""Converts pretrained weights into a parameter checkpoint that ``RunConfig.init_from`` loads.

  python -m flamingo_jax.tools.convert --gin_file=models/smollm2_135m.gin \\
      --lm=path/to/SmolLM2-135M-Instruct.Q4_1.gguf --output=/tmp/smollm2_init

Sources (any subset): ``--lm`` a Hugging Face Llama directory or a ``.gguf`` file;
``--vision_hf`` a ``CLIPVisionModel`` directory (safetensors); ``--vision_open_clip`` an
open_clip state dict (``.safetensors``, or ``.pt`` read with ``weights_only=True``);
``--openflamingo`` an OpenFlamingo ``checkpoint.pt``. Every converted array is checked against
the model config's parameter shapes before anything is written.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from flamingo_jax import configs

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "Model gin file(s) the weights are for.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings; also spelled --gin.KEY=VALUE.")
_LM = flags.DEFINE_string("lm", None, "Hugging Face Llama directory or .gguf file.")
_VISION_HF = flags.DEFINE_string("vision_hf", None, "Hugging Face CLIPVisionModel directory.")
_VISION_OPEN_CLIP = flags.DEFINE_string("vision_open_clip", None, "open_clip state dict file.")
_OPENFLAMINGO = flags.DEFINE_string("openflamingo", None, "OpenFlamingo checkpoint.pt.")
_MEDIA_INDEX = flags.DEFINE_integer("openflamingo_media_token", None, "<image> id in the OpenFlamingo tokenizer.")
_EOC_INDEX = flags.DEFINE_integer("openflamingo_endofchunk_token", None, "<|endofchunk|> id there.")
_EMBED_KEY = flags.DEFINE_string("openflamingo_embeddings_key", None, "Input-embedding key in the checkpoint.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the parameter checkpoint to.")


def _read_state(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.float().numpy() for key, value in state.items()}


def convert(config, *, lm=None, vision_hf=None, vision_open_clip=None, openflamingo=None, **openflamingo_tokens):
    """{Flamingo parameter path: array} from the given sources, checked against ``config``."""
    from flamingo_jax.importers import clip, llama
    from flamingo_jax.importers import openflamingo as of_importer
    from flamingo_jax.models.flamingo import abstract_flamingo
    from flamingo_jax.train import flatten_state

    params = {}
    if lm:
        loader = llama.load_gguf_llama if lm.endswith(".gguf") else llama.load_hf_llama
        lm_config, lm_params = loader(lm)
        for field in ("vocab_size", "width", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "tie_embeddings"):
            if getattr(lm_config, field) != getattr(config.lm, field):
                raise ValueError(
                    f"{lm}: LlamaConfig.{field} is {getattr(lm_config, field)} in the weights but "
                    f"{getattr(config.lm, field)} in the model config"
                )
        params.update({f"lm/{key}": value for key, value in lm_params.items()})
    if vision_hf:
        from safetensors.numpy import load_file

        files = [os.path.join(vision_hf, n) for n in sorted(os.listdir(vision_hf)) if n.endswith(".safetensors")]
        state = {k: v for path in files for k, v in load_file(path).items()}
        params.update({f"vision/{k}": v for k, v in clip.from_hf_clip_vision(state, config.vision).items()})
    if vision_open_clip:
        state = _read_state(vision_open_clip)
        params.update({f"vision/{k}": v for k, v in clip.from_open_clip_visual(state, config.vision).items()})
    if openflamingo:
        params.update(
            of_importer.flamingo_params(of_importer.load_checkpoint(openflamingo), config, **openflamingo_tokens)
        )
    if not params:
        raise ValueError("nothing to convert: give --lm, --vision_hf, --vision_open_clip or --openflamingo")
    abstract = flatten_state(nnx.state(abstract_flamingo(config)))
    for key, value in params.items():
        if key not in abstract:
            raise ValueError(f"converted weight {key!r} has no parameter in the configured model")
        if tuple(abstract[key].shape) != tuple(value.shape):
            raise ValueError(
                f"converted weight {key!r} has shape {value.shape}, the model expects {abstract[key].shape}"
            )
    return params


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not _GIN_FILE.value or not _OUTPUT.value:
        sys.exit("flamingo_jax.tools.convert: --gin_file and --output are required")
    configs.parse_gin(_GIN_FILE.value, _GIN_BINDINGS.value, finalize=False)
    config = configs.flamingo_config()
    tokens = {}
    if _EMBED_KEY.value:
        tokens = dict(
            input_embeddings_key=_EMBED_KEY.value,
            media_token_index=_MEDIA_INDEX.value,
            endofchunk_token_index=_EOC_INDEX.value,
        )
    try:
        params = convert(
            config,
            lm=_LM.value,
            vision_hf=_VISION_HF.value,
            vision_open_clip=_VISION_OPEN_CLIP.value,
            openflamingo=_OPENFLAMINGO.value,
            **tokens,
        )
    except (ValueError, FileNotFoundError, KeyError) as error:
        sys.exit(f"flamingo_jax.tools.convert: {error}")
    from flamingo_jax.checkpointing import save_params

    save_params(_OUTPUT.value, params)
    print(f"wrote {len(params)} arrays ({sum(v.size for v in params.values()):,} parameters) to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main, argv=configs.rewrite_gin_args(sys.argv))
