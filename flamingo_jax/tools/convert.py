"""Converts pretrained weights into a parameter checkpoint that ``RunConfig.init_from`` loads.

  python -m flamingo_jax.tools.convert --gin_file=models/X.gin --lm=path/to/model.gguf --output=/tmp/init

Sources (any subset; each a path or a registered weights name): ``--lm`` a Hugging Face LM
directory or a ``.gguf`` file; ``--vision_hf`` a ``CLIPVisionModel`` directory (safetensors);
``--vision_open_clip`` an open_clip state dict (``.safetensors``, or ``.pt`` read with
``weights_only=True``); ``--vision_efficientnet`` an ``efficientnet_pytorch``-layout ``.pth``;
``--openflamingo`` an OpenFlamingo ``checkpoint.pt``; ``--params`` a parameter checkpoint of
this project (one written by this tool, or a run's), rewritten in the layout the model config
builds: per layer, or stacked with ``LlamaConfig.scan_layers=True``. Every converted array is
checked against the model config's parameter shapes before anything is written.

``--idefics=DIR`` converts a whole IDEFICS model (the directory transformers' ``save_pretrained``
writes) and needs no gin file: the model config comes from its ``config.json`` and is written
beside the weights as ``OUTPUT/model.gin``, the ``--gin_file`` to evaluate it with:

  python -m flamingo_jax.tools.convert --idefics=/weights/idefics-9b --output=/weights/idefics9b
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging

from flamingo_jax import configs
from flamingo_jax.checkpointing import save_params
from flamingo_jax.importers.pretrained import pretrained_params

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "Model gin file(s) the weights are for.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings; also spelled --gin.KEY=VALUE.")
_LM = flags.DEFINE_string("lm", None, "Hugging Face LM directory (Llama, MPT, MosaicGPT, GPT-NeoX) or .gguf file.")
_VISION_HF = flags.DEFINE_string("vision_hf", None, "Hugging Face CLIPVisionModel directory.")
_VISION_OPEN_CLIP = flags.DEFINE_string("vision_open_clip", None, "open_clip state dict file.")
_VISION_EFFICIENTNET = flags.DEFINE_string("vision_efficientnet", None, "efficientnet_pytorch-layout .pth file.")
_OPENFLAMINGO = flags.DEFINE_string("openflamingo", None, "OpenFlamingo checkpoint.pt.")
_IDEFICS = flags.DEFINE_string("idefics", None, "An IDEFICS directory (config.json and safetensors).")
_PARAMS = flags.DEFINE_string("params", None, "A parameter checkpoint of this project, in either layer layout.")
_MEDIA_INDEX = flags.DEFINE_integer("openflamingo_media_token", None, "<image> id in the OpenFlamingo tokenizer.")
_EOC_INDEX = flags.DEFINE_integer("openflamingo_endofchunk_token", None, "<|endofchunk|> id there.")
_EMBED_KEY = flags.DEFINE_string(
    "openflamingo_embeddings_key",
    None,
    "Input-embedding key in the checkpoint, e.g. lang_encoder.transformer.wte.weight.",
)
_OUT_EMBED_KEY = flags.DEFINE_string(
    "openflamingo_output_embeddings_key", None, "Untied output-embedding key there (lang_encoder.embed_out.weight)."
)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the parameter checkpoint to.")


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    if not _OUTPUT.value:
        sys.exit("flamingo_jax.tools.convert: --output is required")
    if _IDEFICS.value:
        convert_idefics(_IDEFICS.value, _OUTPUT.value)
        return
    if not _GIN_FILE.value:
        sys.exit("flamingo_jax.tools.convert: --gin_file is required (or --idefics=DIR)")
    configs.parse_gin(_GIN_FILE.value, _GIN_BINDINGS.value, finalize=False)
    config = configs.flamingo_config()
    tokens = {}
    if _EMBED_KEY.value:
        tokens = dict(
            input_embeddings_key=_EMBED_KEY.value,
            output_embeddings_key=_OUT_EMBED_KEY.value,
            media_token_index=_MEDIA_INDEX.value,
            endofchunk_token_index=_EOC_INDEX.value,
        )
    try:
        params = pretrained_params(
            config,
            lm=_LM.value,
            vision_hf=_VISION_HF.value,
            vision_open_clip=_VISION_OPEN_CLIP.value,
            vision_efficientnet=_VISION_EFFICIENTNET.value,
            openflamingo=_OPENFLAMINGO.value,
            params=_PARAMS.value,
            **tokens,
        )
    except (ValueError, FileNotFoundError, KeyError) as error:
        sys.exit(f"flamingo_jax.tools.convert: {error}")
    save_params(_OUTPUT.value, params)
    print(f"wrote {len(params)} arrays ({sum(v.size for v in params.values()):,} parameters) to {_OUTPUT.value}")


def convert_idefics(directory: str, output: str) -> None:
    """An IDEFICS directory -> our parameters and OUTPUT/model.gin."""
    from flamingo_jax import storage
    from flamingo_jax.importers import idefics

    try:
        config, params = idefics.load_idefics(directory)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"flamingo_jax.tools.convert: {error}")
    save_params(output, params)
    header = f"IDEFICS from {directory} (flamingo_jax.tools.convert --idefics); its config.json, as our model config."
    storage.write_text(storage.path(output) / "model.gin", configs.model_gin(config, header))
    print(f"wrote {len(params)} arrays ({sum(v.size for v in params.values()):,} parameters) and model.gin to {output}")


if __name__ == "__main__":
    app.run(main, argv=configs.rewrite_gin_args(sys.argv))
