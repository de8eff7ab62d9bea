"""The machine a measurement ran on, measured in the same run: CPU model, cores, instruction-set
level, fp32 matmul peak (JAX) and streaming-read bandwidth. Every benchmark result and every
ablation run (``tools.ablate``) carries it, so that figures from different machines can sit side
by side (docs/benchmarks.md)."""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def isa_level(flags: set[str]) -> str:
    """The widest x86 vector extension the CPU reports: 'avx512', 'avx2', 'avx' or 'sse'
    (or the architecture's name elsewhere)."""
    if not flags:
        return platform.machine()
    for level, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")):
        if flag in flags:
            return level
    return "sse"


def streaming_read_bandwidth(threads: int = 2, size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of one pass summing a large fp32 array split over ``threads`` threads (numpy
    releases the GIL): the memory side of a decode roofline."""
    parts = np.array_split(np.ones(size_bytes // 4, np.float32), threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - started)
    return size_bytes / best


def describe(*, threads: int = 2) -> dict:
    """The machine, with its fp32 matmul peak (a 2048^3 JAX matmul, best of 10) and streaming
    bandwidth measured now."""
    from flamingo_jax import flops

    info = _cpuinfo()
    return {
        "cpu": info.get("model name", platform.processor() or platform.machine()),
        "cores": os.cpu_count(),
        "isa": isa_level(set(info.get("flags", "").split())),
        "matmul_peak_flops": flops.measured_matmul_peak(size=2048),
        "stream_bytes_per_s": streaming_read_bandwidth(threads),
        "platform": platform.platform(),
    }


def short(machine: dict) -> str:
    """'AMD EPYC, 377 GFLOP/s': the CPU model's first two words and the measured matmul peak."""
    return f"{' '.join(machine['cpu'].split()[:2])}, {machine['matmul_peak_flops'] / 1e9:.0f} GFLOP/s"


def line(machine: dict) -> str:
    """One line naming the machine, for a result's markdown."""
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['isa']}; fp32 matmul peak "
        f"{machine['matmul_peak_flops'] / 1e9:.0f} GFLOP/s, streaming read "
        f"{machine['stream_bytes_per_s'] / 1e9:.1f} GB/s (measured in this run)."
    )
