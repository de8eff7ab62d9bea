"""The machine a benchmark ran on: ``flamingo_jax.machine`` (the benchmarks import it as
``machine``, from this directory)."""

from flamingo_jax.machine import describe, isa_level, line, streaming_read_bandwidth

__all__ = ["describe", "isa_level", "line", "streaming_read_bandwidth"]
