"""Run once in the twelfth session (docs/results.md, docs/serving/h200-tail/r1.sh): device time of one decode step at the long-tailed load's ragged row lengths against
all rows at the same mean length. python ragged.py EXPORT BATCH"""
import json
import math
import random
import sys

import torch

from kvexport.runtime import ExportedModel
from kvexport.runtime.static_cache import StaticCacheDecoder

directory, batch = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
def request():
    return rng.randint(8, 124), round(math.exp(rng.uniform(math.log(16), math.log(896))))
rows = [[p, 0, n] for p, n in (request() for _ in range(batch))]
snapshots = []
for step in range(6000):
    for r in rows:
        r[1] += 1
        if r[1] >= r[2]:
            p, n = request(); r[:] = [p, 0, n]
    if step >= 2000 and step % 200 == 0:
        snapshots.append([r[0] + r[1] for r in rows])
decoder = StaticCacheDecoder(ExportedModel.load(directory), "cuda", max_batch=batch, max_length=1024, cuda_graph=True)
decoder.random_cache(batch, 1024, torch.Generator("cuda").manual_seed(0))
token = torch.zeros(batch, dtype=torch.int64, device="cuda")
def step_ms(lengths):
    lengths = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    for _ in range(10):
        decoder.decode_rows(token, lengths)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            decoder.decode_rows(token, lengths)
        end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 50)
    return sorted(times)[2]
ragged, uniform, maxed = [], [], []
for s in snapshots:
    mean = round(sum(s) / len(s))
    ragged.append(step_ms(s)); uniform.append(step_ms([mean] * batch)); maxed.append(max(s))
means = [sum(s) / len(s) for s in snapshots]
med = lambda xs: sorted(xs)[len(xs) // 2]
out = {"export": directory, "batch": batch, "snapshots": len(snapshots), "mean_length": sum(means) / len(means),
       "mean_max_length": sum(maxed) / len(maxed), "ragged_ms": med(ragged), "uniform_at_mean_ms": med(uniform),
       "ragged_over_uniform": med([r / u for r, u in zip(ragged, uniform)])}
print(json.dumps(out))
