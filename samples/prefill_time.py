"""Device time of a batch of first prompts (StaticCacheDecoder.prefill_first, captured as the engine runs it) by batch
and padded width, and of one decode step of 64 rows, for a static export of the pythia-160m shape (docs/results.md,
issue 13): what a continuous-batching engine pauses its decoding for when it admits new prompts.

    python samples/prefill_time.py EXPORT_DIR
"""
import sys

import torch

from kvexport.runtime.exported import ExportedModel
from kvexport.runtime.static_cache import StaticCacheDecoder

decoder = StaticCacheDecoder(ExportedModel.load(sys.argv[1]), provider="cuda", max_batch=64, cuda_graph=True,
                             max_length=1024, prefill_chunk=256)
decoder.warm_up()
for batch in (1, 4, 8):
    row = []
    for width in range(32, 257, 32):
        prompts = [torch.randint(0, 50000, (width,))] * batch
        times = []
        for _ in range(25):  # the median of 25 runs
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            decoder.prefill_first(list(range(batch)), prompts)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        row.append(f"{width}:{sorted(times)[12]:.3f}")
    print("prefill ms, batch", batch, *row, flush=True)
steps = []
for _ in range(25):
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    decoder.decode_rows(torch.zeros(64, dtype=torch.int64), torch.full((64,), 300, dtype=torch.int32))
    end.record()
    end.synchronize()
    steps.append(begin.elapsed_time(end))
print(f"decode step ms, 64 rows at 300 tokens: {sorted(steps)[12]:.3f}")
