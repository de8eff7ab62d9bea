"""The benchmarks' own tools: the step profiler maps a real trace's operations back to the named
scopes of the model code, and the machine description names the instruction-set level."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import machine  # noqa: E402
import profile_step  # noqa: E402


def test_profiler_maps_a_traced_program_to_its_scopes(tmp_path):
    def loss(w, x):
        with jax.named_scope("mlp"):
            h = jnp.tanh(x @ w)
        with jax.named_scope("loss"):
            return (h @ w.T).sum()

    step = jax.jit(jax.grad(loss))
    w = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)), jnp.float32)
    compiled = step.lower(w, w).compile()
    compiled(w, w).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        compiled(w, w).block_until_ready()
    result = profile_step.analyse(compiled.as_text(), str(tmp_path))
    assert result["operations"] > 0 and result["op_time_ms"] > 0
    assert sum(result["by_scope"].values()) == pytest.approx(1.0)
    assert sum(result["by_opcode"].values()) == pytest.approx(1.0)
    assert {"mlp", "mlp bwd"} & set(result["by_scope"]), result["by_scope"]
    assert all(row["op"] and row["ms"] >= 0 for row in result["top_ops"])
    with pytest.raises(FileNotFoundError, match="perfetto_trace"):
        profile_step.analyse(compiled.as_text(), str(tmp_path / "nothing"))


def test_scope_names_and_isa_levels():
    assert profile_step.scope_of("jit(step)/jvp(loss)/xattn/dot_general") == "xattn"
    assert profile_step.scope_of("jit(step)/transpose(jvp(loss))/xattn/attention/dot_general") == "attention bwd"
    assert profile_step.scope_of("jit(step)/mul") == "optimizer+other"
    assert machine.isa_level({"sse2", "avx", "avx2", "fma"}) == "avx2"
    assert machine.isa_level({"avx2", "avx512f"}) == "avx512"
    assert machine.isa_level({"sse2"}) == "sse"
