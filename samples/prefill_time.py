"""Device time of a batch of first prompts (StaticCacheDecoder.prefill_first, captured as the engine runs it) by batch
and padded width, and of one decode step of 64 rows, for a static export of the pythia-160m shape (docs/results.md,
Serving): what a continuous-batching engine pauses its decoding for when it admits new prompts.

    python samples/prefill_time.py EXPORT_DIR
"""
import statistics
import sys

import torch

from kvexport.runtime.bench import Clock
from kvexport.runtime.exported import ExportedModel
from kvexport.runtime.static_cache import StaticCacheDecoder

decoder = StaticCacheDecoder(ExportedModel.load(sys.argv[1]), provider="cuda", max_batch=64, cuda_graph=True,
                             max_length=1024, prefill_chunk=256)
decoder.warm_up()
clock = Clock(decoder.device)


def median_ms(work, *args) -> float:
    return statistics.median(clock.time(work, *args)[0] for _ in range(25))


for batch in (1, 4, 8):
    row = []
    for width in range(32, 257, 32):
        prompts = [torch.randint(0, 50000, (width,))] * batch
        row.append(f"{width}:{median_ms(decoder.prefill_first, list(range(batch)), prompts):.3f}")
    print("prefill ms, batch", batch, *row, flush=True)
step = median_ms(decoder.decode_rows, torch.zeros(64, dtype=torch.int64), torch.full((64,), 300, dtype=torch.int32))
print(f"decode step ms, 64 rows at 300 tokens: {step:.3f}")
