"""Where a decode step's time goes on the GPU (docs/results.md): kernels per step, their summed device time
against the step's wall time, and the heaviest kernels, for the ort-static backend.

    python samples/profile_decode.py EXPORT_DIR [EXPORT_DIR ...] [--points 1x128 64x2048]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from kvexport.runtime import ExportedModel
from kvexport.runtime.static_cache import StaticCacheDecoder

STEPS = 5
TOP_KERNELS = 40


def profile_point(directory: str, batch: int, context: int) -> None:
    decoder = StaticCacheDecoder(ExportedModel.load(directory), "cuda", max_batch=batch, max_length=context)
    cache = decoder.random_cache(batch, context - STEPS - 3, torch.Generator("cuda").manual_seed(0))
    token = np.zeros((batch, 1), dtype=np.int64)
    mask = np.ones((batch, 1), dtype=np.int64)

    def step():
        decoder.step(token, mask, np.full((batch, 1), cache.length, dtype=np.int64), cache)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3 / STEPS
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1e3 / STEPS
    by_name, launches = Counter(), Counter()
    for e in kernels:
        by_name[e.name[:70]] += e.device_time / STEPS
        launches[e.name[:70]] += 1 / STEPS
    print(f"{directory} batch {batch} context {context}: {len(kernels) / STEPS:.0f} kernels/step, "
          f"device busy {busy_ms:.3f} ms of {wall_ms:.3f} ms wall per step")
    for name, us in by_name.most_common(TOP_KERNELS):
        print(f"    {us / 1e3:7.3f} ms  {launches[name]:4.0f}x  {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--points", nargs="+", default=["1x128", "64x2048"], help="batch x context (default: %(default)s)")
    args = parser.parse_args()
    for export_dir in args.exports:
        for point in args.points:
            batch, context = map(int, point.split("x"))
            profile_point(export_dir, batch, context)
