"""The pod-scale planner: topologies, the HLO collective count, and its memory / FLOP figures
against a real compile (full depth vs the extrapolation from two short depths)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from flamingo_jax import configs, sharding
from flamingo_jax.tools import plan


def test_topologies():
    chip, chips = plan.parse_topology("v5p-256")
    assert (chip.name, chips, chip.hbm_bytes) == ("TPU v5p", 128, 95 * plan.GIB)
    assert plan.parse_topology("v5e-8")[1] == 8
    assert plan.parse_topology("v4-128")[1] == 64
    with pytest.raises(ValueError, match="unknown topology 'v9-8'"):
        plan.parse_topology("v9-8")
    with pytest.raises(ValueError, match="not a whole number"):
        plan.parse_topology("v5p-3")


def test_collectives_in_hlo_text():
    hlo = """
      %all-gather.1 = bf16[16,1024]{1,0} all-gather(bf16[2,1024]{1,0} %p), dimensions={0}
      %ars = (f32[8]{0}, f32[4,4]{1,0}) all-reduce-start(%a, %b), to_apply=%add
      %ar = f32[10]{0} all-reduce(f32[10]{0} %c), to_apply=%add
      %not = f32[10]{0} add(%x, %y)
    """
    found = plan.collectives_in(hlo)
    gathered = 16 * 1024 * 2
    assert found["all-gather"] == {"count": 1, "bytes": gathered, "compiled_bytes": gathered, "sent": gathered}
    all_reduced = (8 + 16) * 4 + 10 * 4
    assert found["all-reduce"]["count"] == 2
    assert found["all-reduce"]["bytes"] == found["all-reduce"]["compiled_bytes"] == all_reduced
    assert set(found) == {"all-gather", "all-reduce"}


def test_a_combined_collective_counts_every_array():
    """XLA prints long tuple shapes with /*index=N*/ comments; they must not cut the shape short."""
    shape = "(f32[4]{0}, f32[2,8]{1,0}, f32[8]{0}, f32[16]{0}, f32[3]{0}, /*index=5*/f32[10]{0})"
    hlo = f"  %ar = {shape} all-reduce(%a, %b, %c, %d, %e, %f), to_apply=%add\n"
    assert plan.collectives_in(hlo)["all-reduce"]["bytes"] == (4 + 16 + 8 + 16 + 3 + 10) * 4


def test_bytes_sent_by_group_size():
    """The group size in each of XLA's replica-group spellings, and what a device sends by ring."""
    mesh = "all-gather(%a), replica_groups=mesh['axis_0'=16,'axis_1'=1,'axis_2'=4], device_ids=([4,16]T(1,0))"
    assert plan.group_size(mesh + " {'axis_0'}, dimensions={0}") == 16
    assert plan.group_size("replica_groups=mesh['axis_0'=4,'axis_1'=16,'axis_2'=2] {'axis_1','axis_2'}") == 32
    assert plan.group_size("all-reduce(%a), replica_groups=[4,16]<=[64], to_apply=%add") == 16
    assert plan.group_size("all-reduce(%a), replica_groups={{0,1},{2,3}}, to_apply=%add") == 2
    assert plan.group_size("collective-permute(%a), source_target_pairs={{0,1}}") is None
    assert plan.sent_per_device("all-gather", 160.0, 16) == 150.0
    assert plan.sent_per_device("all-reduce", 160.0, 16) == 300.0
    assert plan.sent_per_device("reduce-scatter", 10.0, 16) == 150.0
    assert plan.sent_per_device("all-gather", 160.0, 1) == 0.0
    assert plan.sent_per_device("collective-permute", 160.0, None) == 160.0


def _smoke(bindings):
    configs.parse_gin(["runs/smoke_cpu.gin"], bindings)
    return configs.run_config()


@pytest.mark.slow
def test_plan_matches_a_real_compile():
    """8 LM layers (4 xattn blocks), FSDP over 4 devices: exact input bytes equal XLA's argument
    size; temporaries and FLOPs extrapolated from 2- and 4-layer compiles match the full compile."""
    run_config = _smoke(["LlamaConfig.num_layers=8", "MeshConfig.data=2", "MeshConfig.fsdp=4"])
    mesh = sharding.create_mesh(run_config.mesh)
    real = plan.compile_step(run_config, mesh)
    exact = plan.abstract_inputs(run_config, mesh).device_bytes()
    assert sum(exact.values()) == real.argument_bytes
    assert exact["optimizer_state"] > 1.9 * exact["trainable_params"]  # Adam's two moments

    extrapolated = plan.plan(run_config, "v5e-8", depth="extrapolate")
    assert extrapolated["depth"].startswith("extrapolated")
    assert extrapolated["memory_bytes"]["temporaries"] == pytest.approx(real.temp_bytes, rel=0.1)
    assert extrapolated["xla_flops_per_device"] == pytest.approx(real.flops, rel=0.02)
    assert extrapolated["collectives"]["all-gather"]["bytes"] > 0  # FSDP gathers weights
    assert extrapolated["fits"] and extrapolated["total_bytes"] < 16 * plan.GIB

    # Model FLOPs split over 8 devices account for XLA's per-device count (no replicated work).
    assert real.flops == pytest.approx(extrapolated["model_flops_per_step"] / 8, rel=0.15)
    assert extrapolated["xla_over_model_flops"] == pytest.approx(
        extrapolated["xla_flops_per_device"] * 8 / extrapolated["model_flops_per_step"]
    )
    compute, comm = extrapolated["compute_s"], extrapolated["communication_s"]
    assert extrapolated["overlapped_step_s"] == max(compute, comm) < extrapolated["step_s"] == compute + comm
    assert extrapolated["overlapped_mfu"] > extrapolated["mfu"]
    text = plan.format_plan(extrapolated)
    assert "fits in 16.00" in text and "MFU" in text and "overlapped with compute" in text


def test_collectives_in_a_loop_count_once_per_trip():
    hlo = """HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[8]{0} all-gather(f32[2]{0} %x), dimensions={0}
  %f = f32[8]{0} fusion(%ag), kind=kLoop, calls=%fused
}

%fused (q: f32[8]) -> f32[8] {
  %rs = f32[2]{0} reduce-scatter(f32[8]{0} %q), to_apply=%add
  %param_0 = f32[4,3]{1,0} parameter(0)
  %param_1 = f32[3,5]{1,0} parameter(1)
  ROOT %dot.7 = f32[4,5]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"10"}}
  %ar = f32[10]{0} all-reduce(f32[10]{0} %c), to_apply=%add
}
"""
    runs = plan.computation_runs(hlo)
    assert runs["main"] == 1 and runs["body"] == 10 and runs["fused"] == 10
    found = plan.collectives_in(hlo)
    assert found["all-gather"]["count"] == 10 and found["all-gather"]["bytes"] == 10 * 8 * 4
    assert found["reduce-scatter"]["count"] == 10 and found["reduce-scatter"]["bytes"] == 10 * 2 * 4
    assert found["all-reduce"]["count"] == 1 and found["all-reduce"]["bytes"] == 10 * 4
    # XLA's cost analysis counts the body's matmul once; it runs 10 times.
    assert plan.uncounted_loop_flops(hlo) == 9 * 2 * 4 * 5 * 3


def test_collectives_of_bf16_values_count_at_bf16():
    """XLA's CPU backend runs bf16 matmuls in fp32, so under FSDP it gathers an fp32 copy of a
    weight the model casts to bf16, and under tensor parallelism it all-reduces the fp32 result
    of a bf16 matmul: the planner counts both at 2 bytes per element, as a TPU moves them; an
    fp32 matmul's all-reduce stays at 4."""
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), devices=jax.devices()[:4], axis_types=(auto, auto))
    spec = lambda *names: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*names))

    def loss(weight, frozen, x, x32, w32):
        hidden = x @ weight.astype(jnp.bfloat16)  # FSDP: the weight gathered over fsdp
        hidden = hidden @ frozen  # contracted over tensor: the bf16 result all-reduced
        exact = x32 @ w32  # contracted over tensor in fp32: an fp32 all-reduce
        return jnp.sum(hidden.astype(jnp.float32) ** 2) + jnp.sum(exact**2)

    args = [
        jax.ShapeDtypeStruct((256, 512), jnp.float32, sharding=spec("fsdp", None)),
        jax.ShapeDtypeStruct((512, 128), jnp.bfloat16, sharding=spec("tensor", None)),
        jax.ShapeDtypeStruct((64, 256), jnp.bfloat16, sharding=spec("fsdp", None)),
        jax.ShapeDtypeStruct((64, 384), jnp.float32, sharding=spec(None, "tensor")),
        jax.ShapeDtypeStruct((384, 96), jnp.float32, sharding=spec("tensor", None)),
    ]
    hlo = jax.jit(loss).lower(*args).compile().as_text()
    found = plan.collectives_in(hlo)
    gathered, reduced = found["all-gather"], found["all-reduce"]
    assert gathered["compiled_bytes"] > 0 and gathered["bytes"] == gathered["compiled_bytes"] / 2
    # XLA combines the two matmuls' all-reduces into one of a tuple: judged array by array.
    assert 0 < reduced["compiled_bytes"] - reduced["bytes"] < reduced["compiled_bytes"] / 2


def test_dot_flops_of_batched_and_tuple_shaped_lines():
    lines = """
  %a = bf16[2,32,24]{2,1,0} parameter(0)
  %b = (f32[2,24,16]{2,1,0}, s32[]) parameter(1)
  %c = f32[2,24,16]{2,1,0} get-tuple-element(%b), index=0
  %d = f32[2,32,16]{2,1,0} dot(%a, %c), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}
  %e = f32[2,32,16]{2,1,0} add(%d, %d)
""".splitlines()
    assert plan.dot_flops(lines) == 2 * (2 * 32 * 16) * 24


@pytest.mark.slow
def test_plan_of_a_scanned_model():
    """Scanned layers under FSDP: the loop's matmul FLOPs and collectives counted once per period
    (the per-layer model's FLOPs, and the remat recompute on top), fewer temporaries than the
    per-layer model holds."""
    bindings = ["LlamaConfig.num_layers=8", "MeshConfig.data=2", "MeshConfig.fsdp=4", "LlamaConfig.width=128"]
    per_layer = plan.plan(_smoke(bindings), "v5e-8", depth="full")
    scanned = plan.plan(_smoke([*bindings, "LlamaConfig.scan_layers=True"]), "v5e-8", depth="full")
    assert scanned["depth"].startswith("full, scanned")
    # XLA counts the loop body once; the planner adds its matmuls' other trips (the body's
    # elementwise FLOPs, a few percent, stay counted once).
    assert scanned["xla_flops_per_device"] == pytest.approx(per_layer["xla_flops_per_device"], rel=0.03)
    assert scanned["compiles"][0]["flops"] == scanned["xla_flops_per_device"]
    # The per-layer step gathers each weight once for the whole mixture (and holds it); the scanned
    # one gathers a period's weights in each of its two loops, forward and backward, which carry
    # both of the smoke run's datasets (one loop pair per dataset measured 2.5x-4.5x). Counting
    # each loop body once would give about the per-layer figure.
    gathered, gathered_per_layer = (p["collectives"]["all-gather"]["bytes"] for p in (scanned, per_layer))
    assert 1.5 * gathered_per_layer < gathered < 2.5 * gathered_per_layer
    assert scanned["memory_bytes"]["temporaries"] < per_layer["memory_bytes"]["temporaries"]

    # remat 'full' recomputes each period's forward pass in the backward one: a third more FLOPs
    # (forward 2, backward 4, recompute 2 per weight and token), which XLA merges away in the
    # per-layer model but not across the scan's two loops.
    full = plan.plan(_smoke([*bindings, "LlamaConfig.scan_layers=True", "LlamaConfig.remat_policy='full'"]), "v5e-8")
    assert 1.25 < full["xla_flops_per_device"] / scanned["xla_flops_per_device"] < 1.4
    assert "(duplicated compute or remat)" in plan.format_plan(full)


def test_plan_needs_the_topologys_devices():
    with pytest.raises(ValueError, match="v5p-64 has 32 chips but only 8 devices"):
        plan.plan(_smoke([]), "v5p-64")


@pytest.mark.slow
def test_plan_command_line(tmp_path):
    import json
    import subprocess
    import sys

    output = tmp_path / "plan.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flamingo_jax.tools.plan",
            "--gin_file=runs/smoke_cpu.gin",
            "--topology=v5e-4",
            f"--output={output}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "v5e-4: 4 x TPU v5e" in result.stdout and "depth: full" in result.stdout
    saved = json.loads(output.read_text())
    assert saved["chips"] == 4 and saved["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}


def test_grouped_convolution_stays_batch_sharded():
    """XLA all-gathers a batch-sharded input of a grouped convolution; layers.conv2d keeps it
    local (shard_map) and computes the same result."""
    import jax.numpy as jnp
    import numpy as np

    from flamingo_jax.models import layers

    mesh = sharding.create_mesh(sharding.MeshConfig(data=-1))
    rules = sharding.RULE_SETS["fsdp"]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(16, 8, 8, 32)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 32)), jnp.float32)

    def conv(x, w):
        with sharding.activation_sharding(mesh, rules):
            return layers.conv2d(x, w, stride=2, groups=4)

    placed = jax.device_put(images, sharding.batch_sharding(mesh, rules, 4))
    compiled = jax.jit(conv).lower(placed, kernel).compile()
    assert "all-gather" not in compiled.as_text()
    expected = jax.lax.conv_general_dilated(
        images, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4
    )
    np.testing.assert_allclose(np.asarray(compiled(placed, kernel)), np.asarray(expected), rtol=1e-5, atol=1e-5)
