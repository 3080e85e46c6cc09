"""The engine without HTTP: N requests submitted at once to an Engine, all streamed (with their text, to one
asyncio event loop, as the server consumes them); tokens/s, time per output token, and the scheduler's share of a
decode step. Used beside samples/load_test.py (which goes through the server) to tell the engine's throughput
from the HTTP layer's. --process runs the engine in a process of its own, as the server does (EngineProcess).

    python samples/engine_bench.py EXPORT --provider cuda --cuda-graph --max-slots 64 --max-length 512 \\
        --requests 512 [--batching static] [--process] --output engine.json
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from kvexport.runtime import SamplingConfig
from kvexport.runtime.engine import Engine
from kvexport.runtime.engine_process import EngineProcess

sys.path.insert(0, str(Path(__file__).parent))
from load_test import add_length_arguments, percentile, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--max-slots", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--batching", default="continuous")
    add_length_arguments(parser, "new tokens")
    parser.add_argument("--switch-interval", type=float, metavar="MS",
                        help="Python's GIL switch interval (default 5 ms): how long the scheduler thread may wait "
                             "for the thread that streams")
    parser.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per scheduler iteration")
    parser.add_argument("--prefill-batch", type=int, help="first prompts per prefill run (default: 8 on CUDA)")
    parser.add_argument("--steps-in-flight", type=int, help="decode steps left queued (default: 2 on CUDA)")
    parser.add_argument("--process", action="store_true", help="the engine in a process of its own")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval / 1e3)
    engine = (EngineProcess if args.process else Engine)(
        args.export, provider=args.provider, max_slots=args.max_slots, max_length=args.max_length,
        max_queue=args.requests, cuda_graph=args.cuda_graph, batching=args.batching, prefill_chunk=args.prefill_chunk,
        prefill_batch=args.prefill_batch, steps_in_flight=args.steps_in_flight)
    warm = engine.submit("warm up", SamplingConfig(max_new_tokens=4))
    list(warm)
    work = prompts(args.requests, new_tokens=tuple(args.new_tokens), spread=args.spread)
    times: dict[int, list[float]] = {}

    async def consume(index, handle):
        times[index] = [time.perf_counter() async for event in handle if event.token_id is not None]

    async def consume_all(handles):  # one event loop for every stream, as the server has
        await asyncio.gather(*(consume(i, h) for i, h in enumerate(handles)))

    started = time.perf_counter()
    handles = [engine.submit(p, SamplingConfig(max_new_tokens=n, stop_token_ids=[])) for p, n in work]
    asyncio.run(consume_all(handles))
    wall = time.perf_counter() - started
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    # Until the last request's first token every row that freed had a request waiting; after it the rows drain,
    # which a finite load ends with and a sustained one never reaches: tokens/s over the saturated part.
    saturated_s = max(t[0] for t in times.values()) - started
    saturated_tokens = sum(arrival - started <= saturated_s for t in times.values() for arrival in t)
    metrics = engine.metrics()
    engine.close()
    report = {"export": args.export, "max_slots": args.max_slots, "max_length": args.max_length,
              "switch_interval_s": sys.getswitchinterval(), "batching": args.batching, "process": args.process,
              "prefill_chunk": args.prefill_chunk, "prefill_batch": args.prefill_batch,
              "steps_in_flight": args.steps_in_flight, "requests": args.requests,
              "new_tokens": args.new_tokens, "spread": args.spread, "wall_s": wall,
              "generated_tokens": sum(len(t) for t in times.values()),
              "tokens_per_s": sum(len(t) for t in times.values()) / wall,
              "saturated_s": saturated_s, "saturated_tokens_per_s": saturated_tokens / saturated_s,
              "tpot_p50_ms": 1e3 * percentile(tpot, 50), "tpot_p99_ms": 1e3 * percentile(tpot, 99),
              "mean_tpot_ms": 1e3 * statistics.mean(tpot), "engine": metrics}
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
