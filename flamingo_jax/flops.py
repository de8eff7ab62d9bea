"""Analytic FLOPs of a Flamingo train step and peak FLOP/s by device, for MFU.

Counted: matrix multiplies (2 FLOPs per multiply-add), including attention scores. Per the work
each part really does in a step: the frozen vision encoder runs forward only; the trainable
resampler and xattn blocks run forward + backward (3x); frozen LM layers that the gradient passes
through (from the first xattn block up) run forward + activation gradients (2x for weight
matmuls, 3x for the attention-score matmuls whose both operands are activations); frozen LM
layers below the first xattn block run forward only.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from flamingo_jax.models.efficientnet import LITE_BLOCKS, EfficientNetConfig
from flamingo_jax.models.flamingo import FlamingoConfig
from flamingo_jax.models.nfnet import NFNetConfig
from flamingo_jax.models.vit import ViTConfig

# Peak dense bf16 FLOP/s per chip (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


def vit_forward_flops(config: ViTConfig) -> float:
    tokens = config.num_patches + 1
    width = config.width
    patch = 2 * config.num_patches * config.patch_size**2 * config.channels * width
    per_layer = 2 * tokens * (4 * width * width + 2 * width * config.mlp_dim) + 2 * 2 * tokens * tokens * width
    return patch + config.depth * per_layer


def nfnet_forward_flops(config: NFNetConfig) -> float:
    size = config.image_size
    total = 0.0

    def conv(in_ch, out_ch, kernel, stride=1, groups=1):
        nonlocal size, total
        size = -(-size // stride)
        total += 2 * size * size * kernel * kernel * (in_ch // groups) * out_ch

    stem = config.widths[0] // 2
    for in_ch, out_ch, stride in ((config.channels, 16, 2), (16, 32, 1), (32, 64, 1), (64, stem, 2)):
        conv(in_ch, out_ch, 3, stride)
    in_ch = stem
    for stage, (width, depth) in enumerate(zip(config.widths, config.depths, strict=True)):
        for index in range(depth):
            stride = 2 if (index == 0 and stage > 0) else 1
            mid = int(width * config.bottleneck_ratio)
            groups = mid // config.group_size
            if stride > 1 or in_ch != width:
                before = size
                size = -(-size // stride)
                total += 2 * size * size * in_ch * width  # shortcut 1x1 after pooling
                size = before
            conv(in_ch, mid, 1)
            conv(mid, mid, 3, stride, groups)
            conv(mid, mid, 3, 1, groups)
            conv(mid, width, 1)
            in_ch = width
    conv(in_ch, config.output_dim, 1)
    return total


def efficientnet_forward_flops(config) -> float:
    """Matmul FLOPs of one EfficientNet-Lite image (convolutions; batch norm and ReLU6 left out)."""
    size, total = config.image_size, 0.0

    def conv(in_ch, out_ch, kernel, stride=1, groups=1):
        nonlocal size, total
        size = -(-size // stride)
        total += 2 * size * size * kernel * kernel * (in_ch // groups) * out_ch

    conv(config.channels, 32, 3, 2)
    for repeats, kernel, stride, expand, in_ch, out_ch in LITE_BLOCKS[: config.stages]:
        for index in range(repeats):
            channels = in_ch if index == 0 else out_ch
            mid = channels * expand
            if expand != 1:
                conv(channels, mid, 1)
            conv(mid, mid, kernel, stride if index == 0 else 1, mid)
            conv(mid, out_ch, 1)
    if config.output_stage is None:
        conv(LITE_BLOCKS[-1][-1], config.head_width, 1)
    return total


def vision_forward_flops(config) -> float:
    count = {
        ViTConfig: vit_forward_flops,
        NFNetConfig: nfnet_forward_flops,
        EfficientNetConfig: efficientnet_forward_flops,
    }.get(type(config))
    if count is None:
        raise TypeError(f"no FLOP count for {type(config).__name__}")
    return count(config)


def train_step_flops(
    config: FlamingoConfig, batch_size: int, length: int, num_media: int, num_frames: int = 1
) -> float:
    """FLOPs of one train step on one batch of [batch_size, length] tokens with num_media media."""
    if config.connector.token_level:
        return token_fusion_step_flops(config, batch_size, length, num_media, num_frames)
    lm, resampler, xattn = config.lm, config.resampler, config.xattn
    media = batch_size * num_media
    vision = media * num_frames * vision_forward_flops(config.vision)

    # Perceiver Resampler (or the ablation's MLP / Transformer), per media item.
    source = num_frames * config.vision.num_output_tokens
    latents = resampler.tokens_per_medium(config.vision.num_output_tokens, num_frames)
    inner = resampler.num_heads * resampler.head_dim
    width = resampler.width
    ffw = 2 * 2 * latents * width * width * resampler.ffw_mult
    if resampler.kind == "perceiver":
        per_layer = (
            2 * latents * width * inner  # q
            + 2 * 2 * (source + latents) * width * inner  # k, v
            + 2 * 2 * latents * (source + latents) * inner  # scores and weighted sum
            + 2 * latents * inner * width  # out
            + ffw
        )
    elif resampler.kind == "transformer":  # self-attention over the features
        per_layer = 4 * 2 * latents * width * inner + 2 * 2 * latents * latents * inner + ffw
    else:
        per_layer = ffw
    projection = 2 * source * config.vision.output_dim * width if config.vision.output_dim != width else 0
    resampler_flops = media * (projection + resampler.depth * per_layer)

    # Gated xattn blocks, per example.
    tokens = batch_size * length
    xattn_inner = xattn.num_heads * (xattn.head_dim or lm.width // xattn.num_heads)
    visual_tokens = num_media * latents
    ffw_hidden = xattn.ffw_dim or lm.width * xattn.ffw_mult
    ffw_matrices = (3 if xattn.ffw == "swiglu" else 2) if xattn.dense else 0  # VANILLA XATTN: none
    block = (
        tokens * (2 * lm.width * xattn_inner * 2 + ffw_matrices * 2 * lm.width * ffw_hidden)
        + media * latents * 2 * 2 * width * xattn_inner
        + tokens * 2 * 2 * visual_tokens * xattn_inner
    )
    xattn_flops = len(config.xattn_layer_indices) * block

    # The backward pass reaches down to the first block, or to the first layer when anything
    # below it trains: the LM, a LoRA adapter in every layer, or the new tokens' input rows.
    below = "lm" in config.trainable or lm.lora_rank or "new_tokens" in config.trainable
    first = 0 if below else min(config.xattn_layer_indices)
    return vision + 3 * (resampler_flops + xattn_flops) + _lm_train_flops(config, batch_size, length, first)


def _lm_train_flops(config: FlamingoConfig, batch_size: int, length: int, first_backward_layer: int) -> float:
    """The LM's FLOPs in a train step on [batch_size, length] positions: every layer forward, the
    layers from ``first_backward_layer`` on backward (a trained LM's weights get gradients too),
    LoRA adapters, the head and the new tokens' rows."""
    lm = config.lm
    tokens = batch_size * length
    head_dim = lm.dim_per_head
    weight_matmuls = (
        2
        * tokens
        * (
            lm.width * lm.num_heads * head_dim * 2
            + lm.width * lm.num_kv_heads * head_dim * 2
            + (3 if lm.gated_mlp else 2) * lm.width * lm.mlp_dim
        )
    )
    scores = 2 * 2 * batch_size * length * length * lm.num_heads * head_dim
    lm_trains = "lm" in config.trainable
    backward_layers = lm.num_layers - first_backward_layer
    lm_flops = lm.num_layers * (weight_matmuls + scores) + backward_layers * (
        (2 if lm_trains else 1) * weight_matmuls + 2 * scores
    )
    if lm.lora_rank:  # forward, the input's gradient and the adapters' own
        shapes = _projection_shapes(lm)
        adapters = sum(shapes[name][0] + shapes[name][1] for name in lm.lora_targets if name in shapes)
        lm_flops += lm.num_layers * 3 * 2 * tokens * lm.lora_rank * adapters
    head = 2 * tokens * lm.width * lm.vocab_size
    new_rows = 2 * tokens * lm.width * 2
    return lm_flops + (3 if lm_trains else 2) * head + 3 * new_rows


def token_fusion_step_flops(
    config: FlamingoConfig, batch_size: int, length: int, num_media: int, num_frames: int = 1
) -> float:
    """FLOPs of one train step of a token-level model (``config.connector`` 'mlp' or 'qformer'):
    the connector forward and backward per medium, and the LM over the expanded sequence
    (``length`` + the media's visual tokens), backward down to its first layer (the visual
    tokens enter there)."""
    connector, vision_dim = config.connector, config.vision.output_dim
    media = batch_size * num_media
    source = num_frames * config.vision.num_output_tokens
    tokens = connector.tokens_per_medium(config.vision.num_output_tokens, num_frames)
    if connector.kind == "mlp":
        per_medium = 2 * source * (vision_dim * config.lm.width + config.lm.width * config.lm.width)
    else:
        width, inner = connector.width, connector.num_heads * connector.head_dim
        self_attention = 4 * 2 * tokens * width * inner + 2 * 2 * tokens * tokens * inner
        cross = 2 * tokens * width * inner * 2 + 2 * 2 * source * vision_dim * inner + 2 * 2 * tokens * source * inner
        ffw = 2 * 2 * tokens * width * width * connector.ffw_mult
        crossing = len(range(0, connector.depth, connector.cross_attention_every))
        per_medium = connector.depth * (self_attention + ffw) + crossing * cross + 2 * tokens * width * config.lm.width
    vision = media * num_frames * vision_forward_flops(config.vision)
    expanded = length + num_media * tokens
    return vision + 3 * media * per_medium + _lm_train_flops(config, batch_size, expanded, 0)


def _projection_shapes(lm) -> dict[str, tuple[int, int]]:
    """{projection name: (in, out) features} of one LM layer."""
    heads, kv = lm.num_heads * lm.dim_per_head, lm.num_kv_heads * lm.dim_per_head
    shapes = {
        "q_proj": (lm.width, heads),
        "k_proj": (lm.width, kv),
        "v_proj": (lm.width, kv),
        "o_proj": (heads, lm.width),
        "up_proj": (lm.width, lm.mlp_dim),
        "down_proj": (lm.mlp_dim, lm.width),
    }
    if lm.gated_mlp:
        shapes["gate_proj"] = (lm.width, lm.mlp_dim)
    return shapes


def contrastive_step_flops(config, batch_size: int, length: int) -> float:
    """FLOPs of one stage-1 contrastive step on ``batch_size`` pairs of ``length`` text tokens:
    both towers forward + backward (3x) when trainable, forward only when frozen."""
    text = config.text
    tokens = batch_size * length
    per_layer = tokens * 2 * (4 * text.width * text.width + 2 * text.width * text.mlp_dim)
    per_layer += 2 * 2 * batch_size * length * length * text.width
    text_flops = text.depth * per_layer + 2 * batch_size * config.embed_dim * (text.width + config.vision.output_dim)
    vision = batch_size * vision_forward_flops(config.vision)
    similarity = 2 * batch_size * batch_size * config.embed_dim
    vision_factor = 3 if "vision" in config.trainable else 1
    text_factor = 3 if "text" in config.trainable else 1
    return vision_factor * vision + text_factor * text_flops + 3 * similarity


def measured_matmul_peak(size: int = 1024, repeats: int = 10, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted square matmul on the default device (the CPU 'peak' for MFU)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_step_second(devices) -> tuple[float | None, str]:
    """(total peak FLOP/s of ``devices``, where the figure came from); (None, why) for a device
    kind missing from ``PEAK_FLOPS``: a run then logs no MFU, and says so once."""
    kind = devices[0].device_kind
    for prefix, peak in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return peak * len(devices), f"{kind} table"
    if devices[0].platform == "cpu":
        # Fake CPU devices share the host's cores: the host's measured peak is the total.
        return measured_matmul_peak(), "measured CPU matmul"
    return None, f"no peak FLOP/s known for device kind {kind!r} (flamingo_jax.flops.PEAK_FLOPS): no MFU reported"
