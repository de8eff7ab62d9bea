"""Decoder-only LMs with a KV cache: the Llama family (RMSNorm, RoPE, grouped-query attention,
SwiGLU) and, through ``LlamaConfig.family``, the two other families of the public Flamingo
checkpoints: MPT (ALiBi, LayerNorm without biases, GELU MLP; OpenFlamingo-3B and -9B) and
GPT-NeoX (partial rotary embeddings, biases, parallel residual; OpenFlamingo-4B).

The Flamingo model runs this LM frozen and inserts GATED XATTN-DENSE blocks *before* chosen
layers through the ``inserts`` of :meth:`LlamaLM.backbone`; the LM itself knows nothing about
images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from flamingo_jax import sharding
from flamingo_jax.models import layers, scan

_ACT = ("act_batch", "act_len", "act_embed")

# What each family fixes: its norm, its MLP and its positions. The rest are config fields.
FAMILIES = {
    "llama": {"norm": "rms", "mlp": "gated", "positions": "rope", "activation": "silu"},
    "mpt": {"norm": "layer_no_bias", "mlp": "plain", "positions": "alibi", "activation": "gelu"},
    "gpt_neox": {"norm": "layer", "mlp": "plain", "positions": "rope", "activation": "gelu"},
}


# The projections LoRA adapters can wrap (LlamaConfig.lora_targets).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a decoder LM (named for its first family, Llama).

    ``family`` (:data:`FAMILIES`) fixes the norm, the MLP and the positions: 'llama' (RMSNorm,
    SwiGLU, RoPE), 'mpt' (LayerNorm without bias, GELU MLP, ALiBi with slopes
    ``2 ** (-alibi_bias_max * h / H)``), 'gpt_neox' (LayerNorm, GELU MLP, RoPE). Beside it:
    ``attention_bias`` / ``mlp_bias`` (biases on the projections: GPT-NeoX), ``parallel_residual``
    (attention and MLP both read the layer's input, ``x + attn(ln1(x)) + mlp(ln2(x))``: GPT-NeoX),
    ``rotary_fraction`` (RoPE on the first fraction of each head's dimensions: GPT-NeoX's
    ``rotary_pct``), ``qk_norm`` (a LayerNorm over all heads' queries and keys before the heads
    split: MosaicGPT's ``attn_qk_ln``), ``clip_qkv`` (queries, keys and values clamped to
    ±clip_qkv: MPT's ``clip_qkv``) and ``activation`` (the MLP's; default the family's).
    ``param_dtype`` is the storage dtype of the (frozen) weights, ``dtype`` the activation dtype.
    ``scan_layers`` stores the layers' weights stacked (a leading ``layers`` axis) and runs them
    with one ``lax.scan`` (``flamingo_jax.models.scan``): one compiled layer instead of
    ``num_layers``, and under FSDP one period's weights gathered at a time. ``remat_policy``
    names what the backward pass keeps of each layer's forward pass (``scan.REMAT_POLICIES``).
    ``lora_rank`` > 0 gives the projections ``lora_targets`` low-rank adapters
    (:class:`layers.Dense`) scaled by ``lora_alpha / lora_rank``: fine-tuning the LM through them
    alone (the model's ``trainable`` then names 'lora').
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
    family: str = "llama"
    attention_bias: bool = False
    mlp_bias: bool = False
    parallel_residual: bool = False
    rotary_fraction: float = 1.0
    alibi_bias_max: float = 8.0
    qk_norm: bool = False
    clip_qkv: float | None = None
    activation: str | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        scan.check_policy(self.remat_policy, "LlamaConfig")
        if self.lora_rank < 0:
            raise ValueError(f"LlamaConfig.lora_rank must be >= 0, got {self.lora_rank}")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"LlamaConfig.lora_targets: {sorted(unknown)} are not among {LORA_TARGETS}")
        if self.family not in FAMILIES:
            raise ValueError(f"LlamaConfig.family={self.family!r} is not one of {sorted(FAMILIES)}")
        layers.activation(self.mlp_activation)  # raises naming the choices
        if self.positions == "rope" and not (0 < self.rotary_fraction <= 1 and self.rotary_dim % 2 == 0):
            raise ValueError(
                f"LlamaConfig: rotary_fraction={self.rotary_fraction} must be in (0, 1] and give an even "
                f"number of rotary dimensions (head dim {self.dim_per_head})"
            )
        if self.positions == "alibi" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"LlamaConfig: family={self.family!r} has no grouped-query attention")
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

    @property
    def norm(self) -> str:
        return FAMILIES[self.family]["norm"]

    @property
    def positions(self) -> str:
        return FAMILIES[self.family]["positions"]

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU (three matrices) rather than a plain two-matrix MLP."""
        return FAMILIES[self.family]["mlp"] == "gated"

    @property
    def mlp_activation(self) -> str:
        return self.activation or FAMILIES[self.family]["activation"]

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rotary_fraction)


def alibi_slopes(num_heads: int, bias_max: float) -> jax.Array:
    """float32[num_heads] ALiBi slopes as MPT computes them: ``2 ** (-bias_max * i / n)`` for
    ``i = 1..n``, ``n`` the next power of two, interleaved (odd i first) when heads are fewer."""
    padded = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / 2.0 ** (jnp.arange(1, padded + 1, dtype=jnp.float32) * (bias_max / padded))
    if padded != num_heads:
        slopes = jnp.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def make_norm(config: LlamaConfig, dim: int | None = None) -> nnx.Module:
    """The family's norm over ``dim`` (default the width); applied with ``layers.apply_norm``."""
    dim = dim or config.width
    if config.norm == "rms":
        return layers.RMSNorm(dim, eps=config.norm_eps, param_dtype=config.param_dtype)
    # A LayerNorm draws no random numbers: a fresh counter leaves the LM's other draws as they are.
    return layers.layer_norm(
        dim,
        eps=config.norm_eps,
        bias=config.norm == "layer",
        param_dtype=config.param_dtype,
        rngs=layers.CountingRngs(0),
    )


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


def _dense_options(config: LlamaConfig, name: str) -> dict:
    """The dtypes and (for a ``lora_targets`` projection) the LoRA adapter of projection ``name``."""
    lora = config.lora_rank if name in config.lora_targets else 0
    return dict(param_dtype=config.param_dtype, dtype=config.dtype, lora_rank=lora, lora_alpha=config.lora_alpha)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        head_dim = config.dim_per_head
        dense = lambda name, i, o, names: layers.Dense(
            i, o, names, use_bias=config.attention_bias, **_dense_options(config, name), rngs=rngs
        )
        self.q_proj = dense("q_proj", config.width, config.num_heads * head_dim, ("embed", "heads"))
        self.k_proj = dense("k_proj", config.width, config.num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.v_proj = dense("v_proj", config.width, config.num_kv_heads * head_dim, ("embed", "kv_heads"))
        self.o_proj = dense("o_proj", config.num_heads * head_dim, config.width, ("heads", "embed"))
        if config.qk_norm:
            self.q_norm = make_norm(config, config.num_heads * head_dim)
            self.k_norm = make_norm(config, config.num_kv_heads * head_dim)
        # Diagnostics (tools/binding.py): when set, each call sows the last position's attention
        # weights, float32[B, kv heads, heads per kv head, S], as nnx.Intermediate 'last_attention'.
        self.capture_attention = False

    def __call__(self, x, positions, key_valid, query_slots, layer_cache, cache_end):
        """x: float[B, T, W]; positions, query_slots: int32[B, T] / int32[T]; key_valid: bool[B, S]."""
        config = self.config
        batch, length, _ = x.shape
        head_dim = config.dim_per_head
        query, key, value = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if config.clip_qkv is not None:
            query, key, value = (jnp.clip(t, -config.clip_qkv, config.clip_qkv) for t in (query, key, value))
        if config.qk_norm:
            query, key = layers.apply_norm(self.q_norm, query), layers.apply_norm(self.k_norm, key)
        query = checkpoint_name(query, scan.QUERY).reshape(batch, length, config.num_heads, head_dim)
        key = checkpoint_name(key, scan.KEY).reshape(batch, length, config.num_kv_heads, head_dim)
        value = checkpoint_name(value, scan.VALUE).reshape(batch, length, config.num_kv_heads, head_dim)
        if config.positions == "rope":
            query = rotate(query, positions, config)
            key = rotate(key, positions, config)
        if layer_cache is not None:
            cached_keys, cached_values = layer_cache
            key = jax.lax.dynamic_update_slice(cached_keys, key.astype(cached_keys.dtype), (0, cache_end, 0, 0))
            value = jax.lax.dynamic_update_slice(cached_values, value.astype(cached_values.dtype), (0, cache_end, 0, 0))
        key_slots = jnp.arange(key.shape[1])
        mask = (key_slots[None, :] <= query_slots[:, None])[None] & key_valid[:, None, :]
        bias = None
        if config.positions == "alibi":
            # A key's position: the real tokens before it (the cache's valid slots), as the queries'.
            key_positions = positions if layer_cache is None else jnp.cumsum(key_valid, axis=1, dtype=jnp.int32) - 1
            distance = (key_positions[:, None, :] - positions[:, :, None]).astype(jnp.float32)  # [B, T, S]
            bias = alibi_slopes(config.num_heads, config.alibi_bias_max)[None, :, None, None] * distance[:, None]
        if self.capture_attention:
            out, weights = layers.dot_product_attention(query, key, value, mask, bias=bias, return_weights=True)
            self.sow(nnx.Intermediate, "last_attention", weights[:, :, :, -1])
        else:
            out = layers.dot_product_attention(query, key, value, mask, bias=bias)
        return checkpoint_name(self.o_proj(out.reshape(batch, length, -1)), scan.OUT), (key, value)


def rotate(x: jax.Array, positions: jax.Array, config: LlamaConfig) -> jax.Array:
    """RoPE on the first ``config.rotary_dim`` dimensions of each head of float[B, T, H, D]."""
    if config.rotary_dim == x.shape[-1]:
        return layers.apply_rope(x, positions, config.rope_theta)
    rotary, rest = x[..., : config.rotary_dim], x[..., config.rotary_dim :]
    return jnp.concatenate([layers.apply_rope(rotary, positions, config.rope_theta), rest], axis=-1)


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        dense = lambda name, i, o, names: layers.Dense(
            i, o, names, use_bias=config.mlp_bias, **_dense_options(config, name), rngs=rngs
        )
        self.activation = config.mlp_activation
        self.gated = config.gated_mlp
        if config.gated_mlp:
            self.gate_proj = dense("gate_proj", config.width, config.mlp_dim, ("embed", "mlp"))
        self.up_proj = dense("up_proj", config.width, config.mlp_dim, ("embed", "mlp"))
        self.down_proj = dense("down_proj", config.mlp_dim, config.width, ("mlp", "embed"))

    def __call__(self, x):
        activation = layers.activation(self.activation)
        if self.gated:
            return self.down_proj(activation(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(activation(self.up_proj(x)))


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.parallel_residual = config.parallel_residual
        self.input_norm = make_norm(config)
        self.attention = Attention(config, rngs=rngs)
        self.post_attention_norm = make_norm(config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, key_valid, query_slots, layer_cache, cache_end):
        with jax.named_scope("attention"):
            attended, new_cache = self.attention(
                layers.apply_norm(self.input_norm, x), positions, key_valid, query_slots, layer_cache, cache_end
            )
        with jax.named_scope("mlp"):
            if self.parallel_residual:  # GPT-NeoX: the MLP reads the layer's input too
                return x + attended + self.mlp(layers.apply_norm(self.post_attention_norm, x)), new_cache
            x = x + attended
            return x + self.mlp(layers.apply_norm(self.post_attention_norm, x)), new_cache


@dataclasses.dataclass(frozen=True)
class Inserts:
    """Modules run before chosen LM layers: how Flamingo inserts its cross-attention blocks.

    Attributes:
      layers: ascending LM layer indices; ``apply(module, hidden, inputs[slot])`` runs before
        layer ``layers[slot]``.
      every: their spacing from the first one on (the repeating period a scanned LM runs).
      modules: one module per index, or (``scan_layers``) one stacked module.
      inputs: per-insert inputs: a tuple with one entry per index, or (``scan_layers``) a pytree
        whose leaves are stacked on a leading axis.
      apply: ``f(module, hidden, input) -> hidden``.

    With several streams (:meth:`LlamaLM.backbone` given a tuple of hidden states), ``inputs``
    and ``apply`` are tuples with one entry per stream, each as above.
    """

    layers: tuple[int, ...]
    every: int
    modules: Any
    inputs: Any
    apply: Callable[[nnx.Module, jax.Array, Any], jax.Array]


class LlamaLM(nnx.Module):
    """Decoder-only LM: int32[B, T] tokens -> float32[B, T, vocab_size] logits."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (config.vocab_size, config.width), config.param_dtype),
            out_sharding=("vocab", "embed"),
        )
        decoder_layers = [DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)]
        self.layers = scan.stack(decoder_layers) if config.scan_layers else nnx.List(decoder_layers)
        self.final_norm = make_norm(config)
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
        inserts: Inserts | None = None,
        layer_range: tuple[int, int] | None = None,
        final_norm: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder layers and the final norm.

        Args:
          hidden: float[B, T, W] input embeddings; or a tuple of streams float[B_s, T_s, W] of
            any shapes (one per dataset of a mixture step), run through the same layers one
            after the other inside each layer (each period of a scanned LM): the layers' weights
            are read, under FSDP gathered, once for all of them. Streams take no ``input_mask``,
            ``positions`` or ``cache``, and the result is a tuple too.
          input_mask: bool[B, T], False for padding tokens (never attended to). Default all True.
          positions: int32[B, T] RoPE positions. Default: count of real tokens before each one
            (so left padding and cached decoding get the right positions).
          cache: a KVCache to append these T tokens to, or None for a plain causal pass.
          inserts: modules to run before chosen layers (:class:`Inserts`); those at index
            ``num_layers`` run after the last layer, before the final norm.
          layer_range: ``(start, stop)``: run only these layers (no cache); the final norm only
            when ``stop`` is the last layer. ``hidden`` is then the input of layer ``start``.
          final_norm: False: stop after the last layer's output, without the inserts on top of
            it and the final norm (the input of "layer ``num_layers``").

        Returns:
          (float[B, T, W] hidden states, final-normed when the last layer ran; updated cache or None).
        """
        config = self.config
        start_layer, stop_layer = layer_range or (0, config.num_layers)
        if layer_range is not None and cache is not None:
            raise ValueError("LlamaLM.backbone: layer_range does not work with a KV cache")
        streams = isinstance(hidden, tuple)
        if streams and not (input_mask is None and positions is None and cache is None):
            raise ValueError("LlamaLM.backbone: several streams take no input_mask, positions or cache")
        start = jnp.zeros((), jnp.int32) if cache is None else cache.end
        # Per stream: (RoPE positions, valid keys, the query rows' cache slots).
        contexts = []
        for stream in hidden if streams else (hidden,):
            batch, length, _ = stream.shape
            stream_mask = jnp.ones((batch, length), bool) if input_mask is None else input_mask
            if cache is None:
                past_tokens = jnp.zeros((batch,), jnp.int32)
                key_valid = stream_mask
            else:
                past_tokens = cache.valid.sum(axis=1).astype(jnp.int32)
                key_valid = jax.lax.dynamic_update_slice(cache.valid, stream_mask, (0, start))
            stream_positions = positions
            if stream_positions is None:
                stream_positions = past_tokens[:, None] + jnp.cumsum(stream_mask, axis=1, dtype=jnp.int32) - 1
                stream_positions = jnp.maximum(stream_positions, 0)
            contexts.append((stream_positions, key_valid, start + jnp.arange(length, dtype=jnp.int32)))
        # The backward pass needs no remat when decoding (no cache -> a training or scoring pass).
        policy = config.remat_policy if cache is None else "none"
        hiddens = hidden if streams else (hidden,)
        if inserts and not streams:  # one stream: the single-stream form of the inserts
            inserts = dataclasses.replace(inserts, inputs=(inserts.inputs,), apply=(inserts.apply,))

        def run_layer(layer, hiddens, layer_cache):
            """The layer on every stream (one layer cache: one stream)."""
            outputs, new_cache = [], None
            for hidden, (stream_positions, key_valid, query_slots) in zip(hiddens, contexts, strict=True):
                hidden, new_cache = layer(hidden, stream_positions, key_valid, query_slots, layer_cache, start)
                outputs.append(sharding.constrain(hidden, _ACT))
            return tuple(outputs), new_cache

        def run_insert(module, hiddens, inputs):
            """The insert on every stream, with its inputs for that stream."""
            return tuple(
                apply(module, hidden, stream_inputs)
                for apply, hidden, stream_inputs in zip(inserts.apply, hiddens, inputs, strict=True)
            )

        if config.scan_layers:
            layer_graph, layer_state = nnx.split(self.layers)
            layer_at = lambda index: scan.take(layer_graph, layer_state, index)
        else:
            layer_at = lambda index: self.layers[index]
        # {layer: the slots of the inserts before it}; at ``num_layers``: after the last layer.
        insert_slots: dict[int, list[int]] = {}
        for slot, layer in enumerate(inserts.layers if inserts else ()):
            insert_slots.setdefault(layer, []).append(slot)
        insert_slot = {layer: slots[0] for layer, slots in insert_slots.items()}  # the scan's: one per layer
        if inserts and config.scan_layers:
            insert_graph, insert_state = nnx.split(inserts.modules)
            insert_at = lambda slot: scan.take(insert_graph, insert_state, slot)
            insert_input = lambda slot: jax.tree.map(lambda value: value[slot], inserts.inputs)
        elif inserts:
            insert_at = lambda slot: inserts.modules[slot]
            insert_input = lambda slot: tuple(stream_inputs[slot] for stream_inputs in inserts.inputs)

        new_caches: dict[int, tuple[jax.Array, jax.Array]] = {}

        def run_inserts(index, hiddens):
            for slot in insert_slots.get(index, ()):
                hiddens = run_insert(insert_at(slot), hiddens, insert_input(slot))
            return hiddens

        def unscanned(index, hiddens):
            hiddens = run_inserts(index, hiddens)
            layer_cache = None if cache is None else (cache.keys[index], cache.values[index])
            graph, state = nnx.split(layer_at(index))

            def layer_fn(state, hiddens):
                layer = nnx.merge(graph, state)
                return run_layer(layer, hiddens, layer_cache), nnx.pop(layer, nnx.Intermediate)

            (hiddens, new_caches[index]), sown = scan.remat(layer_fn, policy)(state, hiddens)
            if len(sown):  # diagnostics (Attention.capture_attention): kept on the layer for the caller
                nnx.update(layer_at(index), sown)
            return hiddens

        hiddens = tuple(sharding.constrain(stream, _ACT) for stream in hiddens)
        first, periods, period = self._scanned_span(start_layer, stop_layer, inserts)
        for index in range(start_layer, first):
            hiddens = unscanned(index, hiddens)
        if periods:
            hiddens = self._scan_periods(
                hiddens, first, periods, period, inserts, insert_slot, cache, new_caches, run_layer, run_insert, policy
            )
        for index in range(first + periods * period, stop_layer):
            hiddens = unscanned(index, hiddens)

        if stop_layer == config.num_layers and final_norm:
            hiddens = run_inserts(stop_layer, hiddens)  # on top of the last layer (XAttnConfig 'graft')
            hiddens = tuple(layers.apply_norm(self.final_norm, stream) for stream in hiddens)
        hidden = hiddens if streams else hiddens[0]
        if cache is None:
            return hidden, None
        keys = tuple(new_caches[index][0] for index in range(config.num_layers))
        values = tuple(new_caches[index][1] for index in range(config.num_layers))
        return hidden, KVCache(keys, values, key_valid, start + length)

    def _scanned_span(self, start: int, stop: int, inserts: Inserts | None) -> tuple[int, int, int]:
        """(first layer, number of periods, period length) of the layers in ``[start, stop)`` a
        scanned LM runs in its scan: whole periods from the first insert on (from ``start``
        without inserts); the layers below and above run one by one. No periods unscanned."""
        if not self.config.scan_layers:
            return stop, 0, 1
        if not inserts:
            return start, stop - start, 1
        inside = [layer for layer in inserts.layers if start <= layer < stop]
        if not inside:  # every insert below or above the span (XAttnConfig 'graft'): a plain scan
            return start, stop - start, 1
        first, period = inside[0], inserts.every
        periods = 0
        while (
            periods < len(inside)
            and inside[periods] == first + periods * period
            and first + (periods + 1) * period <= stop
        ):
            periods += 1
        return first, periods, period

    def _scan_periods(
        self, hiddens, first, periods, period, inserts, insert_slot, cache, new_caches, run_layer, run_insert, policy
    ):
        """The scan over ``periods`` periods of ``period`` layers from layer ``first`` (each
        period: its insert, then its layers, on every stream of ``hiddens``); the periods' new KV
        caches go into ``new_caches``."""
        layer_graph, layer_state = nnx.split(self.layers)
        xs = {"layers": scan.segment(layer_state, first, periods, period)}
        inserts = inserts if first in insert_slot else None  # none inside the scanned span
        if inserts:
            insert_graph, insert_state = nnx.split(inserts.modules)
            slot = insert_slot[first]
            take = lambda value: value[slot : slot + periods]
            xs["insert"] = jax.tree.map(take, insert_state)
            xs["input"] = jax.tree.map(take, inserts.inputs)
        if cache is not None:
            span = slice(first, first + periods * period)
            fold = lambda arrays: jnp.stack(arrays[span]).reshape(periods, period, *arrays[0].shape)
            xs["cache"] = (fold(cache.keys), fold(cache.values))

        def body(hiddens, xs):
            if inserts:
                hiddens = run_insert(nnx.merge(insert_graph, xs["insert"]), hiddens, xs["input"])
            keys, values = [], []
            for offset in range(period):
                layer = scan.take(layer_graph, xs["layers"], offset)
                layer_cache = None if cache is None else (xs["cache"][0][offset], xs["cache"][1][offset])
                hiddens, new_cache = run_layer(layer, hiddens, layer_cache)
                if cache is not None:
                    keys.append(new_cache[0])
                    values.append(new_cache[1])
            return hiddens, (jnp.stack(keys), jnp.stack(values)) if cache is not None else None

        hiddens, stacked = jax.lax.scan(scan.remat(body, policy), hiddens, xs)
        if cache is not None:
            keys, values = stacked
            for number in range(periods):
                for offset in range(period):
                    new_caches[first + number * period + offset] = (keys[number, offset], values[number, offset])
        return hiddens

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
