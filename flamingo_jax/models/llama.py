"""Llama-family decoder LM (RMSNorm, RoPE, grouped-query attention, SwiGLU) with a KV cache.

The Flamingo model runs this LM frozen and inserts GATED XATTN-DENSE blocks *before* chosen
layers through the ``before_layer`` hook of :meth:`LlamaLM.backbone`; the LM itself knows
nothing about images.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flamingo_jax import sharding
from flamingo_jax.models import layers

_ACT = ("act_batch", "act_len", "act_embed")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder.

    ``param_dtype`` is the storage dtype of the (frozen) weights, ``dtype`` the activation dtype.
    """

    vocab_size: int = 32000
    width: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int | None = None
    mlp_dim: int = 5632
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.width % self.num_heads:
            raise ValueError(
                f"LlamaConfig: width={self.width} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.width // self.num_heads


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Fixed-size text KV cache, passed in and returned explicitly (never hidden layer state).

    Attributes:
      keys, values: one float[B, S, K, D] per layer.
      valid: bool[B, S], slots that hold a real (non-padding) token.
      end: int32[], number of slots written so far (the same for every example; left padding
        is expressed through ``valid``).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    valid: jax.Array
    end: jax.Array

    @classmethod
    def create(cls, config: LlamaConfig, batch_size: int, max_length: int) -> KVCache:
        shape = (batch_size, max_length, config.num_kv_heads, config.dim_per_head)
        dtype = jnp.dtype(config.dtype)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(
            keys=zeros,
            values=zeros,
            valid=jnp.zeros((batch_size, max_length), bool),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        head_dim = config.dim_per_head
        dense = lambda i, o, names: layers.Dense(
            i, o, names, param_dtype=config.param_dtype, dtype=config.dtype, rngs=rngs
        )
        self.q_proj = dense(config.width, config.num_heads * head_dim, ("embed", "heads"))
        self.k_proj = dense(config.width, config.num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.v_proj = dense(config.width, config.num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.o_proj = dense(config.num_heads * head_dim, config.width, ("heads", "embed"))

    def __call__(self, x, positions, key_valid, query_slots, layer_cache, cache_end):
        """x: float[B, T, W]; positions, query_slots: int32[B, T] / int32[T]; key_valid: bool[B, S]."""
        config = self.config
        batch, length, _ = x.shape
        head_dim = config.dim_per_head
        query = self.q_proj(x).reshape(batch, length, config.num_heads, head_dim)
        key = self.k_proj(x).reshape(batch, length, config.num_kv_heads, head_dim)
        value = self.v_proj(x).reshape(batch, length, config.num_kv_heads, head_dim)
        query = layers.apply_rope(query, positions, config.rope_theta)
        key = layers.apply_rope(key, positions, config.rope_theta)
        if layer_cache is not None:
            cached_keys, cached_values = layer_cache
            key = jax.lax.dynamic_update_slice(cached_keys, key.astype(cached_keys.dtype), (0, cache_end, 0, 0))
            value = jax.lax.dynamic_update_slice(cached_values, value.astype(cached_values.dtype), (0, cache_end, 0, 0))
        key_slots = jnp.arange(key.shape[1])
        mask = (key_slots[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]
        out = layers.dot_product_attention(query, key, value, mask)
        return self.o_proj(out.reshape(batch, length, -1)), (key, value)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        dense = lambda i, o, names: layers.Dense(
            i, o, names, param_dtype=config.param_dtype, dtype=config.dtype, rngs=rngs
        )
        self.gate_proj = dense(config.width, config.mlp_dim, ("embed", "mlp"))
        self.up_proj = dense(config.width, config.mlp_dim, ("embed", "mlp"))
        self.down_proj = dense(config.mlp_dim, config.width, ("mlp", "embed"))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_norm = layers.RMSNorm(config.width, eps=config.norm_eps, param_dtype=config.param_dtype)
        self.attention = Attention(config, rngs=rngs)
        self.post_attention_norm = layers.RMSNorm(config.width, eps=config.norm_eps, param_dtype=config.param_dtype)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, key_valid, query_slots, layer_cache, cache_end):
        with jax.named_scope("attention"):
            attended, new_cache = self.attention(
                self.input_norm(x), positions, key_valid, query_slots, layer_cache, cache_end
            )
            x = x + attended
        with jax.named_scope("mlp"):
            return x + self.mlp(self.post_attention_norm(x)), new_cache


def _run_layer(layer, x, positions, key_valid, query_slots):
    return layer(x, positions, key_valid, query_slots, None, None)[0]


_run_layer_remat = nnx.remat(_run_layer)


class LlamaLM(nnx.Module):
    """Decoder-only LM: int32[B, T] tokens -> float32[B, T, vocab_size] logits."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (config.vocab_size, config.width), config.param_dtype),
            out_sharding=("vocab", "embed"),
        )
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = layers.RMSNorm(config.width, eps=config.norm_eps, param_dtype=config.param_dtype)
        if not config.tie_embeddings:
            self.lm_head = layers.Dense(
                config.width,
                config.vocab_size,
                ("embed", "vocab"),
                param_dtype=config.param_dtype,
                dtype=config.dtype,
                rngs=rngs,
            )

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """int32[B, T] -> float[B, T, W]; ids must lie in the base vocabulary."""
        return jnp.take(self.embed[...], tokens, axis=0).astype(self.config.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden float[B, T, W] -> float32[B, T, vocab_size]."""
        if self.config.tie_embeddings:
            kernel = self.embed[...].astype(hidden.dtype)
            return jnp.einsum("btw,vw->btv", hidden, kernel, preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def backbone(
        self,
        hidden: jax.Array,
        *,
        input_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        before_layer=None,
        layer_range: tuple[int, int] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder layers and the final norm.

        Args:
          hidden: float[B, T, W] input embeddings.
          input_mask: bool[B, T], False for padding tokens (never attended to). Default all True.
          positions: int32[B, T] RoPE positions. Default: count of real tokens before each one
            (so left padding and cached decoding get the right positions).
          cache: a KVCache to append these T tokens to, or None for a plain causal pass.
          before_layer: optional ``f(layer_index, hidden) -> hidden`` applied before each layer
            (how Flamingo inserts its cross-attention blocks).
          layer_range: ``(start, stop)``: run only these layers (no cache); the final norm only
            when ``stop`` is the last layer. ``hidden`` is then the input of layer ``start``.

        Returns:
          (float[B, T, W] hidden states, final-normed when the last layer ran; updated cache or None).
        """
        start_layer, stop_layer = layer_range or (0, self.config.num_layers)
        if layer_range is not None and cache is not None:
            raise ValueError("LlamaLM.backbone: layer_range does not work with a KV cache")
        batch, length, _ = hidden.shape
        if input_mask is None:
            input_mask = jnp.ones((batch, length), bool)
        if cache is None:
            start = jnp.zeros((), jnp.int32)
            past_tokens = jnp.zeros((batch,), jnp.int32)
            key_valid = input_mask
        else:
            start = cache.end
            past_tokens = cache.valid.sum(axis=1).astype(jnp.int32)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, input_mask, (0, start))
        if positions is None:
            positions = past_tokens[:, None] + jnp.cumsum(input_mask, axis=1, dtype=jnp.int32) - 1
            positions = jnp.maximum(positions, 0)
        query_slots = start + jnp.arange(length, dtype=jnp.int32)

        hidden = sharding.constrain(hidden, _ACT)
        new_keys, new_values = [], []
        for index in range(start_layer, stop_layer):
            layer = self.layers[index]
            if before_layer is not None:
                hidden = before_layer(index, hidden)
            if cache is None and self.config.remat:
                hidden = sharding.constrain(_run_layer_remat(layer, hidden, positions, key_valid, query_slots), _ACT)
                continue
            layer_cache = None if cache is None else (cache.keys[index], cache.values[index])
            hidden, (keys, values) = layer(hidden, positions, key_valid, query_slots, layer_cache, start)
            hidden = sharding.constrain(hidden, _ACT)
            new_keys.append(keys)
            new_values.append(values)
        if stop_layer == self.config.num_layers:
            hidden = self.final_norm(hidden)
        if cache is None:
            return hidden, None
        new_cache = KVCache(tuple(new_keys), tuple(new_values), key_valid, start + length)
        return hidden, new_cache

    def __call__(
        self,
        tokens: jax.Array,
        *,
        input_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """int32[B, T] -> (float32[B, T, vocab_size] logits, updated cache or None)."""
        hidden, cache = self.backbone(
            self.embed_tokens(tokens), input_mask=input_mask, positions=positions, cache=cache
        )
        return self.logits(hidden), cache
