"""EfficientNet-Lite0 forward on the CPU backend: depthwise convolutions as XLA's grouped
convolution vs as shifted multiply-adds (``layers.depthwise_conv2d``, what ``layers.conv2d`` uses
on CPU), measured in the same run, with the outputs compared.

Batch 64 (the demo's Fashion-MNIST images per step), the real ImageNet weights, fp32, 64 and 128 px.

    python bench/depthwise.py           # writes bench/results/depthwise_<date>.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from unittest import mock

import numpy as np
from results_io import write_results  # bench/ is on sys.path when run as a script


def time_forward(size: int, *, xla: bool, repeats: int) -> tuple[float, np.ndarray]:
    import jax
    from flax import nnx

    from flamingo_jax.demo.weights import lite0_pth
    from flamingo_jax.importers.efficientnet import load_lite0
    from flamingo_jax.models import layers
    from flamingo_jax.models.efficientnet import EfficientNet, EfficientNetConfig

    with nnx.use_eager_sharding(False):
        model = EfficientNet(EfficientNetConfig(image_size=size), rngs=nnx.Rngs(0))
    load_lite0(model, lite0_pth())  # the real ImageNet weights: outputs of realistic size to compare
    images = np.random.default_rng(0).normal(size=(64, size, size, 3)).astype(np.float32)
    # xla=True: the depthwise layers go through XLA's grouped convolution, as before the CPU path.
    xla_depthwise = lambda x, kernel, stride: layers.xla_conv2d(x, kernel, stride, groups=x.shape[-1])
    with mock.patch.object(layers, "depthwise_conv2d", xla_depthwise) if xla else contextlib.nullcontext():
        forward = nnx.jit(lambda m, x: m(x))
        out = np.asarray(forward(model, images))
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            jax.block_until_ready(forward(model, images))
            times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for size in (64, 128):
        xla_s, xla_out = time_forward(size, xla=True, repeats=args.repeats)
        ours_s, ours_out = time_forward(size, xla=False, repeats=args.repeats)
        rows.append(
            {
                "image_size": size,
                "xla_grouped_conv_s": xla_s,
                "shifted_multiply_add_s": ours_s,
                "speedup": xla_s / ours_s,
                "ms_per_image_before": 1000 * xla_s / 64,
                "ms_per_image_after": 1000 * ours_s / 64,
                "max_abs_difference": float(np.abs(xla_out - ours_out).max()),
                "max_abs_output": float(np.abs(xla_out).max()),
            }
        )
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "batch": 64,
        "repeats": args.repeats,
        "rows": rows,
    }
    lines = [
        "| image size | XLA grouped conv (s / 64 images) | shifted multiply-adds | speed-up | max abs difference |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['image_size']} | {row['xla_grouped_conv_s']:.3f} | {row['shifted_multiply_add_s']:.3f} | "
            f"{row['speedup']:.1f}x | {row['max_abs_difference']:.1e} (outputs up to {row['max_abs_output']:.1f}) |"
        )
    write_results(args.out, "depthwise", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
