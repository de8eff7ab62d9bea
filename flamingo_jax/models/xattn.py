"""GATED XATTN-DENSE (Flamingo Section 2.2, Figure 4).

``y = y + tanh(alpha_xattn) * xattn(y, visual)`` then ``y = y + tanh(alpha_dense) * ffw(y)``, with
both alphas initialised to 0 so that at initialisation the model is exactly the frozen LM.
``XAttnConfig.init='zero_output'`` gets the same start from the other factor: the alphas start at
``gate_init`` and the two output projections at 0 (the zero-initialised-output trick of adapters),
so the gates' sign is fixed from the first step instead of drifting while the output projections
are still random.
Conditioning (which image each token sees) is an explicit argument, never layer state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from flamingo_jax.models import layers, scan
from flamingo_jax.models.resampler import FeedForward

PLACEMENTS = ("paper", "openflamingo", "graft")
ATTEND_MODES = ("last", "all_previous")
INITS = ("paper", "zero_output")
NORMS = ("layer", "rms")
FFWS = ("mlp", "swiglu")
GATE_SHAPES = ("scalar", "vector")
GATINGS = ("tanh", "none")


@dataclasses.dataclass(frozen=True)
class XAttnConfig:
    """Cross-attention block shape and placement.

    Attributes:
      every: insert a block before every ``every``-th LM layer (3B: 1, 9B: 4, 80B: 7).
      placement: 'paper' inserts before layers i with ``i % every == 0`` (from the first layer);
        'openflamingo' before layers with ``(i + 1) % every == 0``; 'graft' runs as many blocks
        as 'paper' would, one after the other on top of the frozen LM's last layer (before its
        final norm): the Flamingo paper's GRAFTING row (Table 3 (iv)), where no frozen layer
        sees an image and training backpropagates through none of them.
      num_heads, head_dim: attention shape; ``head_dim=None`` means LM width / num_heads (paper),
        OpenFlamingo uses 8 x 64.
      attend: 'last' (each token sees only the last preceding image, the paper's default) or
        'all_previous'.
      first_layer: no block before LM layers below this one (blocks only in the upper layers:
        training then backpropagates through those layers only, when the new-token rows are
        frozen too).
      init: 'paper' (alphas 0, output projections random) or 'zero_output' (alphas ``gate_init``,
        the attention's and the feed-forward's output projections 0). Both start as the frozen LM.
      gate_init: the alphas' start under 'zero_output'.
      norm: the blocks' norms, 'layer' (LayerNorm: the paper, OpenFlamingo) or 'rms' (IDEFICS).
      ffw: 'mlp' (norm -> Linear(x ffw_mult) -> activation -> Linear) or 'swiglu' (IDEFICS:
        norm -> down(activation(gate(x)) * up(x)), hidden ``ffw_dim``, activation 'silu').
      ffw_dim: the feed-forward's hidden width; None: LM width x ``ffw_mult``.
      qk_norm: an RMSNorm over each head's queries and keys (IDEFICS's ``qk_layer_norms``).
      gate_shape: 'scalar' alphas (the paper) or one per channel, 'vector' (IDEFICS's option).
      gating: 'tanh' (``y + tanh(alpha) * f(y)``) or 'none': the outputs added to the residual
        directly, no alphas (the paper's "w/o tanh gating", Table 3 (iii)); with ``init='paper'``
        the random output projections then make the initial model differ from the frozen LM.
      dense: False drops the gated feed-forward (the paper's VANILLA XATTN row, Table 3 (iv)):
        each block is a (gated) cross-attention alone.
    """

    every: int = 1
    placement: str = "paper"
    num_heads: int = 16
    head_dim: int | None = None
    ffw_mult: int = 4
    activation: str = "squared_relu"
    attend: str = "last"
    norm_eps: float = 1e-5
    first_layer: int = 0
    init: str = "paper"
    gate_init: float = 1.0
    norm: str = "layer"
    ffw: str = "mlp"
    ffw_dim: int | None = None
    qk_norm: bool = False
    gate_shape: str = "scalar"
    gating: str = "tanh"
    dense: bool = True

    def __post_init__(self):
        for name, allowed in (("norm", NORMS), ("ffw", FFWS), ("gate_shape", GATE_SHAPES), ("gating", GATINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"XAttnConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise ValueError(f"XAttnConfig.init must be one of {INITS}, got {self.init!r}")
        if self.first_layer < 0:
            raise ValueError(f"XAttnConfig.first_layer must be >= 0, got {self.first_layer}")
        if self.every < 1:
            raise ValueError(f"XAttnConfig.every must be >= 1, got {self.every}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"XAttnConfig.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.attend not in ATTEND_MODES:
            raise ValueError(f"XAttnConfig.attend must be one of {ATTEND_MODES}, got {self.attend!r}")
        layers.activation(self.activation)

    def layer_indices(self, num_lm_layers: int) -> tuple[int, ...]:
        """LM layer indices that get a cross-attention block inserted before them, one per block
        (with 'graft', ``num_lm_layers`` for each: after the last layer)."""
        offset = 1 if self.placement == "openflamingo" else 0
        indices = tuple(
            i for i in range(self.first_layer, num_lm_layers) if (i - self.first_layer + offset) % self.every == 0
        )
        if not indices:
            raise ValueError(
                f"XAttnConfig places no block in a {num_lm_layers}-layer LM (first_layer={self.first_layer})"
            )
        return (num_lm_layers,) * len(indices) if self.placement == "graft" else indices


def media_attention_mask(image_index: jax.Array, image_mask: jax.Array, num_latents: int, attend: str) -> jax.Array:
    """bool[B, T, N * num_latents]: which visual tokens each text token may attend to.

    Args:
      image_index: int32[B, T], media slot of the last image before each token, -1 for none.
      image_mask: bool[B, N], real media slots.
    """
    slots = jnp.arange(image_mask.shape[1])
    index = image_index[:, :, None]
    if attend == "last":
        allowed = index == slots
    else:
        allowed = (slots <= index) & (index >= 0)
    allowed = allowed & image_mask[:, None, :]
    return jnp.repeat(allowed, num_latents, axis=2)


class GatedCrossAttentionBlock(nnx.Module):
    def __init__(
        self, config: XAttnConfig, lm_width: int, media_width: int, *, param_dtype: str, dtype: str, rngs: nnx.Rngs
    ):
        self.config = config
        self.head_dim = config.head_dim or lm_width // config.num_heads
        inner = config.num_heads * self.head_dim
        dense = lambda i, o, names: layers.Dense(i, o, names, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.norm = layers.make_norm(config.norm, lm_width, eps=config.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.to_q = dense(lm_width, inner, ("embed", "heads"))
        self.to_k = dense(media_width, inner, ("media_embed", "heads"))
        self.to_v = dense(media_width, inner, ("media_embed", "heads"))
        self.to_out = dense(inner, lm_width, ("heads", "embed"))
        if config.qk_norm:
            self.q_norm = layers.RMSNorm(self.head_dim, eps=config.norm_eps, param_dtype=param_dtype)
            self.k_norm = layers.RMSNorm(self.head_dim, eps=config.norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        gate = config.gate_init if config.init == "zero_output" else 0.0
        gate_shape, gate_names = ((), ()) if config.gate_shape == "scalar" else ((lm_width,), ("norm",))
        make_gate = lambda: (
            nnx.Param(jnp.full(gate_shape, gate, jnp.float32), out_sharding=gate_names)
            if config.gating == "tanh"
            else None
        )
        self.attn_gate = make_gate()
        hidden = config.ffw_dim or lm_width * config.ffw_mult
        if not config.dense:
            self.ffw = None
        elif config.ffw == "mlp":
            self.ffw = FeedForward(
                lm_width,
                config.ffw_mult,
                config.activation,
                hidden=config.ffw_dim,
                norm=config.norm,
                norm_eps=config.norm_eps,
                param_dtype=param_dtype,
                dtype=dtype,
                rngs=rngs,
            )
        else:
            self.ffw = GatedFeedForward(lm_width, hidden, config, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.ffw_gate = make_gate() if config.dense else None
        if config.init == "zero_output":
            outputs = (self.to_out,) + ((self.ffw.output,) if self.ffw is not None else ())
            for kernel in (dense.linear.kernel for dense in outputs):
                kernel[...] = jnp.zeros_like(kernel[...])
        # Diagnostics (tools/binding.py): when set, each call sows what the block adds to the
        # residual stream, float[B, T, W], as nnx.Intermediate 'delta'.
        self.capture_output = False

    def media_kv(self, visual: jax.Array) -> tuple[jax.Array, jax.Array]:
        """float[B, N, L, media_width] -> keys, values float[B, N * L, heads, head_dim].

        Computed once per prompt when decoding (the visual tokens do not change).
        """
        flat = visual.reshape(visual.shape[0], -1, visual.shape[-1])
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.config.num_heads, self.head_dim)
        keys = split(self.to_k(flat))
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        return keys, split(self.to_v(flat))

    def __call__(self, x: jax.Array, media_kv: tuple[jax.Array, jax.Array], mask: jax.Array) -> jax.Array:
        """x: float[B, T, W]; mask: bool[B, T, N * L] from :func:`media_attention_mask`."""
        batch, length, _ = x.shape
        query = checkpoint_name(self.to_q(layers.apply_norm(self.norm, x)), scan.QUERY)
        query = query.reshape(batch, length, self.config.num_heads, self.head_dim)
        if self.q_norm is not None:
            query = self.q_norm(query)
        # Rows of a token with no visible image have no allowed key: dot_product_attention returns
        # exact zeros for them, so tokens before the first image get zero cross-attention output.
        attended = layers.dot_product_attention(query, media_kv[0], media_kv[1], mask)
        attended = checkpoint_name(self.to_out(attended.reshape(batch, length, -1)), scan.OUT)
        out = x + self._gated(self.attn_gate, attended)
        if self.ffw is not None:
            out = out + self._gated(self.ffw_gate, self.ffw(out))
        if self.capture_output:
            self.sow(nnx.Intermediate, "delta", out - x)
        return out

    @staticmethod
    def _gated(gate: nnx.Param | None, update: jax.Array) -> jax.Array:
        """``tanh(alpha) * update``; the update itself without a gate (``gating='none'``)."""
        return update if gate is None else jnp.tanh(gate[...]).astype(update.dtype) * update


class GatedFeedForward(nnx.Module):
    """norm -> down(activation(gate(x)) * up(x)), no biases (IDEFICS's xattn feed-forward)."""

    def __init__(self, width: int, hidden: int, config: XAttnConfig, *, param_dtype, dtype, rngs: nnx.Rngs):
        dense = lambda i, o, names: layers.Dense(i, o, names, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.activation = config.activation
        self.norm = layers.make_norm(config.norm, width, eps=config.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.gate = dense(width, hidden, ("embed", "mlp"))
        self.up = dense(width, hidden, ("embed", "mlp"))
        self.down = dense(hidden, width, ("mlp", "embed"))

    @property
    def output(self) -> layers.Dense:
        return self.down

    def __call__(self, x):
        x = layers.apply_norm(self.norm, x)
        return self.down(layers.activation(self.activation)(self.gate(x)) * self.up(x))
