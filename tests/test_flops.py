"""The analytic FLOP count of a train step against XLA's cost analysis of the compiled step."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from flax import nnx
from test_train import local_batches, smoke_config

from flamingo_jax import configs, flops, sharding
from flamingo_jax.data.synthetic import SyntheticConfig
from flamingo_jax.models.nfnet import NFNet, NFNetConfig
from flamingo_jax.train.loop import build_training, global_batches


def _matmul_heavy_config(placement, family="llama"):
    config = smoke_config()
    # GPT-NeoX: two MLP matrices instead of SwiGLU's three, biases, no grouped-query attention.
    family_bindings = {
        "llama": [],
        "gpt_neox": ["LlamaConfig.family = 'gpt_neox'", "LlamaConfig.mlp_bias = True"],
        # IDEFICS's blocks: a SwiGLU feed-forward of the LM's hidden width (three matrices).
        "idefics": ["XAttnConfig.ffw = 'swiglu'", "XAttnConfig.ffw_dim = 768", "XAttnConfig.norm = 'rms'"],
        # The paper's ablations (Table 3): a Transformer in place of the resampler with vanilla
        # cross-attention blocks; an MLP resampler (with 'graft': the blocks on top of the LM).
        "transformer_vanilla": ["ResamplerConfig.kind = 'transformer'", "XAttnConfig.dense = False"],
        "mlp": ["ResamplerConfig.kind = 'mlp'"],
        # LoRA adapters on every projection (backward through every layer, the adapters' own
        # gradients); the whole LM trained (its weights' gradients and the head's).
        "lora": [
            "LlamaConfig.lora_rank = 16",
            "LlamaConfig.lora_targets = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')",
            "FlamingoConfig.trainable = ('resampler', 'xattn_layers', 'new_tokens', 'lora')",
        ],
        "lm_trained": ["FlamingoConfig.trainable = ('resampler', 'xattn_layers', 'new_tokens', 'lm')"],
    }
    model = configs.load_model_config(
        "models/tiny.gin",
        [
            "LlamaConfig.width = 256",
            "LlamaConfig.mlp_dim = 768",
            "LlamaConfig.num_heads = 8",
            f"LlamaConfig.num_kv_heads = {8 if family == 'gpt_neox' else 4}",
            "LlamaConfig.vocab_size = 1024",
            "ViTConfig.width = 128",
            "ViTConfig.mlp_dim = 512",
            "ViTConfig.image_size = 32",
            "ResamplerConfig.width = 128",
            "ResamplerConfig.head_dim = 64",
            f"XAttnConfig.placement = '{placement}'",
            *family_bindings[family],
        ],
    )
    synthetic = SyntheticConfig(num_media=2, image_size=32, length=64)
    dataset = dataclasses.replace(config.datasets[0], batch_size=4, synthetic=synthetic)
    return dataclasses.replace(config, model=model, datasets=(dataset,), mesh=sharding.MeshConfig(data=1))


@pytest.mark.parametrize(
    "placement, family",
    [
        ("openflamingo", "llama"),
        # The paper's placement, the other LM families and the ablations' variants (tools.ablate):
        # in the slow step.
        *(
            pytest.param(placement, variant, marks=pytest.mark.slow)
            for placement, variant in [
                ("paper", "llama"),
                ("paper", "gpt_neox"),
                ("paper", "idefics"),
                ("paper", "transformer_vanilla"),
                ("graft", "mlp"),
                ("paper", "lora"),
                ("paper", "lm_trained"),
            ]
        ),
    ],
)
def test_analytic_flops_match_xla(placement, family):
    config = _matmul_heavy_config(placement, family)
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    training = build_training(config, mesh)
    batches = global_batches(local_batches(config, 0), mesh, training.rules)
    with sharding.activation_sharding(mesh, training.rules):
        compiled = training.step_fn.lower(training.state, training.frozen, batches).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    analytic = flops.train_step_flops(config.model, 4, 64, num_media=2)
    # XLA also counts elementwise work (softmax, norms, AdamW); matmuls dominate here.
    assert 0.9 < xla_flops / analytic < 1.15, (xla_flops, analytic)


def test_nfnet_flops_match_the_paper_and_xla():
    # Brock et al. 2021, Table 1: NFNet-F0 at its 256 px test resolution is 12.38B multiply-adds.
    f0 = flops.nfnet_forward_flops(NFNetConfig(variant="F0", image_size=256))
    assert f0 / 2 == pytest.approx(12.38e9, rel=0.03)
    config = NFNetConfig(variant="F0", image_size=64, widths=(64, 128, 128, 128), group_size=32)
    with nnx.use_eager_sharding(False):
        model = NFNet(config, rngs=nnx.Rngs(0))
    images = jax.ShapeDtypeStruct((2, 64, 64, 3), jax.numpy.float32)
    cost = jax.jit(lambda x: model(x)).lower(images).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert 0.95 < xla_flops / (2 * flops.nfnet_forward_flops(config)) < 1.15


def test_peak_flops_table_and_cpu_measurement():
    peak, source = flops.peak_flops_per_step_second(jax.devices())
    assert peak > 1e9 and source == "measured CPU matmul"


class _Device:
    def __init__(self, kind, platform="tpu"):
        self.device_kind, self.platform = kind, platform


def test_peak_flops_of_accelerators_and_of_an_unknown_kind():
    """Per-chip dense bf16 peaks for the accelerators a run may land on, summed over the chips; a
    kind missing from the table gives no peak (the run reports no MFU) instead of stopping."""
    for kind, per_chip in [
        ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
        ("NVIDIA B200", 2250e12),
    ]:  # fmt: skip
        peak, source = flops.peak_flops_per_step_second([_Device(kind)] * 4)
        assert peak == 4 * per_chip and source == f"{kind} table"
    peak, source = flops.peak_flops_per_step_second([_Device("TPU v9 imaginary")])
    assert peak is None and "TPU v9 imaginary" in source
