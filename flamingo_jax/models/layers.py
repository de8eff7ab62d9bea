"""Building blocks shared by every model: annotated dense layers, norms, attention, RoPE.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv_heads``,
``vocab``, ...). ``flamingo_jax.sharding`` maps them to mesh axes; model code never names
mesh axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding

Dtype = jnp.dtype | type

_DEFAULT_KERNEL_INIT = nnx.initializers.normal(stddev=0.02)


def annotated(init, names: Sequence[str | None]):
    """Wraps an initializer so the created parameter carries logical axis ``names``."""
    return nnx.with_partitioning(init, tuple(names))


class Dense(nnx.Module):
    """``x @ kernel (+ bias)`` with logical names on the kernel: float[..., in] -> float[..., out].

    ``lora_rank`` > 0 adds a low-rank adapter (LoRA, Hu et al. 2021): ``+ (x @ lora_a @ lora_b)
    * lora_alpha / lora_rank``, ``lora_a`` float32[in, rank] random, ``lora_b`` float32[rank, out]
    zero, so the layer starts as it was; the kernel keeps its path (``linear/kernel``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        names: tuple[str | None, str | None],
        *,
        use_bias: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init=_DEFAULT_KERNEL_INIT,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        rngs: nnx.Rngs,
    ):
        if lora_rank:
            init = nnx.initializers.normal(stddev=in_features**-0.5)
            self.lora_a = nnx.Param(
                init(rngs.lora(), (in_features, lora_rank), jnp.float32), out_sharding=(names[0], None)
            )
            self.lora_b = nnx.Param(jnp.zeros((lora_rank, out_features), jnp.float32), out_sharding=(None, names[1]))
            self.lora_scale = lora_alpha / lora_rank
        else:
            self.lora_a = self.lora_b = None
        self.linear = nnx.Linear(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=annotated(kernel_init, names),
            bias_init=annotated(nnx.initializers.zeros, (names[1],)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.linear(x)
        if self.lora_a is None:
            return out
        low = jnp.dot(x, self.lora_a[...].astype(x.dtype))
        return out + (jnp.dot(low, self.lora_b[...].astype(x.dtype)) * self.lora_scale).astype(out.dtype)


class RMSNorm(nnx.Module):
    """Llama RMSNorm, computed in fp32 and scaled after casting back (as Hugging Face does)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: Dtype = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.scale[...].astype(x.dtype)


def layer_norm(
    dim: int, *, eps: float = 1e-5, bias: bool = True, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
) -> nnx.LayerNorm:
    """A LayerNorm, by default with bias (CLIP, the Perceiver Resampler, the xattn blocks, GPT-NeoX;
    MPT's has none), statistics in fp32."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_bias=bias,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=annotated(nnx.initializers.ones, ("norm",)),
        bias_init=annotated(nnx.initializers.zeros, ("norm",)),
        rngs=rngs,
    )


def make_norm(kind: str, dim: int, *, eps: float, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """A norm by name: 'layer' (LayerNorm with bias) or 'rms' (RMSNorm)."""
    if kind == "rms":
        return RMSNorm(dim, eps=eps, param_dtype=param_dtype)
    if kind != "layer":
        raise ValueError(f"unknown norm {kind!r}: 'layer' or 'rms'")
    return layer_norm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)


def apply_norm(norm: nnx.Module, x: jax.Array) -> jax.Array:
    """Applies a norm in its own precision and returns the input dtype."""
    return norm(x).astype(x.dtype)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, groups: int = 1) -> jax.Array:
    """'SAME'-padded NHWC convolution: float[B, H, W, C] x float[k, k, C / groups, O] -> float[B, H', W', O].

    Grouped convolutions run per batch shard: given a batch-sharded input, XLA's SPMD partitioner
    all-gathers the whole batch for them and computes them replicated (found with
    ``flamingo_jax.tools.plan``: 2.8x the FLOPs per device for NFNet under data parallelism).
    On the CPU backend depthwise convolutions (one input channel per group) are written as k*k
    shifted multiply-adds: XLA's CPU convolution is 10-40x slower for them (an EfficientNet-Lite
    image at 64 px went from 6.8 to 1.1 ms, ``bench/depthwise.py``).
    """
    if groups > 1 and groups == x.shape[-1] == kernel.shape[-1] and jax.default_backend() == "cpu":
        return depthwise_conv2d(x, kernel, stride)
    return xla_conv2d(x, kernel, stride, groups)


def xla_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, groups: int = 1) -> jax.Array:
    """:func:`conv2d` as XLA's convolution on every backend (grouped ones per batch shard)."""

    def conv(inputs, weights):
        return jax.lax.conv_general_dilated(
            inputs,
            weights,
            window_strides=(stride, stride),
            padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )

    # Convolutions are the vision encoders': their batch is the images, split over every axis.
    return sharding.map_over_batch(conv, x, kernel, batch="media_batch") if groups > 1 else conv(x, kernel)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """'SAME'-padded depthwise convolution as a sum of k*k strided slices times per-channel
    weights: float[B, H, W, C] x float[k, k, 1, C] -> float[B, ceil(H/s), ceil(W/s), C]."""
    batch, height, width, channels = x.shape
    size_h, size_w = kernel.shape[:2]
    out_h, out_w = -(-height // stride), -(-width // stride)
    pad_h = max((out_h - 1) * stride + size_h - height, 0)
    pad_w = max((out_w - 1) * stride + size_w - width, 0)
    padded = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    out = jnp.zeros((batch, out_h, out_w, channels), jnp.result_type(x, kernel))
    for i in range(size_h):
        for j in range(size_w):
            window = jax.lax.slice(
                padded,
                (0, i, j, 0),
                (batch, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, channels),
                (1, stride, stride, 1),
            )
            out = out + window * kernel[i, j, 0]
    return out


def activation(name: str):
    """Looks up an activation by name; raises naming the valid choices."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """float32[head_dim // 2] inverse frequencies of rotary embeddings."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding in the Hugging Face (rotate-half) layout.

    Args:
      x: float[B, T, H, D].
      positions: int32[B, T].
    """
    inv_freq = rope_frequencies(x.shape[-1], theta)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    *,
    bias: jax.Array | None = None,
    return_weights: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention with grouped key/value heads, softmax in fp32.

    Args:
      query: float[B, T, H, D] (already scaled or not: the 1/sqrt(D) scale is applied here).
      key, value: float[B, S, K, D] with H a multiple of K (grouped-query attention).
      mask: bool broadcastable to [B, T, S]; True where a query may attend to a key. Rows with
        no allowed key give an all-zero output rather than NaN.

    Returns:
      float[B, T, H, D] in the query dtype; with ``return_weights`` also the attention weights
      float32[B, K, H // K, T, S].
    """
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    query = query.reshape(batch, length, num_kv_heads, groups, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", query, key, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(head_dim))
    if bias is not None:
        logits = logits + bias.reshape(batch, num_kv_heads, groups, length, key.shape[1])
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, length, key.shape[1]))[:, None, None]
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(value.dtype), value)
    out = out.reshape(batch, length, num_heads, head_dim)
    return (out, weights) if return_weights else out


class CountingRngs:
    """A stand-in for ``nnx.Rngs`` whose draws are ``fold_in(key(seed), n)`` for n = 0, 1, ...

    The draw counter is a Python int, not nnx state: with ``nnx.Rngs`` every traced counter
    update makes flax probe ``tracer.sharding``, whose error message walks the whole jaxpr, so
    tracing an init is quadratic in the number of parameters (~1 min for 80B, ~10 s even for the
    tiny test model). Deterministic: the same seed gives the same parameters on any mesh.
    ``params`` (and any stream not in :data:`SEPARATE_STREAMS`) share one counter; a separate
    stream (``lora``) counts on its own key, so optional parameters leave the others' draws as
    they were.
    """

    SEPARATE_STREAMS = ("lora",)

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)
        self._draws = {}

    def __call__(self, stream: str = "params"):
        stream = stream if stream in self.SEPARATE_STREAMS else "params"
        self._draws[stream] = self._draws.get(stream, 0) + 1
        key = self._key
        if stream != "params":
            key = jax.random.fold_in(key, 2**32 - 1 - self.SEPARATE_STREAMS.index(stream))
        return jax.random.fold_in(key, self._draws[stream])

    def __getattr__(self, stream: str):
        if stream.startswith("_"):
            raise AttributeError(stream)
        return lambda: self(stream)
