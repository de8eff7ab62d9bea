"""EfficientNet-Lite weights in the ``efficientnet_pytorch`` state-dict layout (``_conv_stem``,
``_bn0``, ``_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}``,
``_conv_head``, ``_bn1``, ``_fc``) for :class:`flamingo_jax.models.efficientnet.EfficientNet`. Read without PyTorch
and without running pickled code (``torch_pickle``)."""

from __future__ import annotations

import numpy as np

from flamingo_jax.importers.assign import assign
from flamingo_jax.importers.torch_pickle import load_state_dict
from flamingo_jax.importers.weights import weights_path
from flamingo_jax.models.efficientnet import LITE_BLOCKS


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The float tensors of the .pth, read without PyTorch (see ``torch_pickle``)."""
    state = load_state_dict(path)
    return {
        key: np.asarray(value, np.float32) for key, value in state.items() if not key.endswith("num_batches_tracked")
    }


def _conv_bn(state, conv: str, bn: str, target: str) -> dict[str, np.ndarray]:
    weight = state[f"{conv}.weight"]  # [out, in / groups, kh, kw]
    return {
        f"{target}/kernel": weight.transpose(2, 3, 1, 0),
        f"{target}/scale": state[f"{bn}.weight"],
        f"{target}/bias": state[f"{bn}.bias"],
        f"{target}/mean": state[f"{bn}.running_mean"],
        f"{target}/var": state[f"{bn}.running_var"],
    }


def convert_lite0(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """State dict -> {our parameter path: array}."""
    params = _conv_bn(state, "_conv_stem", "_bn0", "stem")
    index = 0
    for repeats, _, _, expand, _, _ in LITE_BLOCKS:
        for _ in range(repeats):
            prefix = f"_blocks.{index}"
            if expand != 1:
                params.update(_conv_bn(state, f"{prefix}._expand_conv", f"{prefix}._bn0", f"blocks/{index}/expand"))
            params.update(_conv_bn(state, f"{prefix}._depthwise_conv", f"{prefix}._bn1", f"blocks/{index}/depthwise"))
            params.update(_conv_bn(state, f"{prefix}._project_conv", f"{prefix}._bn2", f"blocks/{index}/project"))
            index += 1
    params.update(_conv_bn(state, "_conv_head", "_bn1", "head"))
    params["classifier_kernel"] = state["_fc.weight"].T
    params["classifier_bias"] = state["_fc.bias"]
    if f"_blocks.{index}._project_conv.weight" in state:
        raise ValueError(f"the state dict has more than the {index} blocks of the lite0 variant")
    return params


def load_lite0(model, path: str) -> None:
    """Loads lite0-variant weights (a .pth, or a registered weights name) into ``model``."""
    assign(model, convert_lite0(read_state_dict(weights_path(path))))
