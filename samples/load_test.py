"""Load generator for `kvexport serve`: concurrent streaming clients (closed loop) or Poisson arrivals (open loop).

    python samples/load_test.py --url http://127.0.0.1:8000 --requests 1000 --concurrency 32 \\
        --check-greedy EXPORT_DIR --server-pid PID --output load.json
    python samples/load_test.py --url ... --requests 2000 --rate 200 --output open.json      # open loop, req/s

Every request streams; it records time to first token and time per output token (TPOT: from the first streamed
piece to the last, over the completion's tokens after the first, counted by the usage the stream ends with; a piece
holds the tokens that reached the server together, and the last one the finish reason), errors
by status, and with --check-greedy whether every greedy answer equals the same prompt run alone (kvexport's
Generator on the export, batch 1). With --server-pid it samples the resident memory of the server and its child
processes (its engine's) every half second; the engine's metrics (tokens, requests, active rows, queue) are sampled
as often into a timeline, which shows when the engine starts and stops working. --processes N sends the load from N
processes (one Python process reads about 20k server-sent events a second), whose clients take requests from one
queue as they arrive: each request waits for the first free client of any process, so that no process runs out of
work while another still holds a backlog (when each sent a fixed share, the load's last seconds held too few
requests to fill a server's rows, docs/results.md).
"""

import argparse
import asyncio
import json
import math
import multiprocessing
import queue
import random
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import httpx

from kvexport.models import DEFAULT_MODEL, HELDOUT_FILE, shipped_directory

LENGTH_SPREADS = ("uniform", "log-uniform")


def prompts(count: int, seed: int = 0, new_tokens: tuple[int, int] = (8, 64),
            spread: str = "uniform") -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs: pieces of the shipped held-out text of 1 to 60 words, and a number of new
    tokens drawn from the range `new_tokens`, uniformly or log-uniformly (many short answers and a long tail, as
    chat services see: the load where static batching waits longest for a batch's last request)."""
    words = (shipped_directory(DEFAULT_MODEL) / HELDOUT_FILE).read_text().split()
    rng = random.Random(seed)
    low, high = new_tokens
    pairs = []
    for _ in range(count):
        start, length = rng.randrange(len(words) - 60), rng.randint(1, 60)
        tokens = (rng.randint(low, high) if spread == "uniform"
                  else round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        pairs.append((" ".join(words[start:start + length]), tokens))
    return pairs


def add_length_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--new-tokens LO HI and --spread: what `prompts` draws each request's `what` from."""
    parser.add_argument("--new-tokens", type=int, nargs=2, default=(8, 64), metavar=("LO", "HI"),
                        help=f"{what} per request, drawn from LO..HI as --spread says")
    parser.add_argument("--spread", choices=LENGTH_SPREADS, default="uniform",
                        help=f"the spread of {what} over LO..HI")


def percentile(values: list[float], q: float) -> float | None:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else None


def saturated(timeline: list[list[float]]) -> dict:
    """Tokens/s from the load's start to the last timeline sample (every half second) at which requests still
    waited for rows: until then every row that freed was refilled; after it the rows drain, which a finite load ends
    with and a sustained one never reaches (engine_bench.py's saturated figure, there from each token's time). The
    drain lasts about as long as the longest answers whatever the server's speed, so it weighs more in a faster
    server's shorter run."""
    waiting = [row for row in timeline if row[0] > 0 and row[4] > 0]  # s, generated_tokens, ..., queue_depth
    return {"saturated_s": waiting[-1][0], "saturated_tokens_per_s": waiting[-1][1] / waiting[-1][0]} if waiting else {}


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) * 1024


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
              arrived: float | None, ignore_eos: bool = False) -> dict:
    """One streamed request; its times from `arrived` (time.monotonic(), the same clock in every process), or from
    now."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    started, times, text, tokens = time.monotonic() if arrived is None else arrived, [], "", 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return {"status": response.status_code, "prompt": prompt, "max_tokens": max_tokens}
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:  # a text delta, or the last piece with the finish reason
                        times.append(time.monotonic())
                        text += chunk["choices"][0]["text"]
                    tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    except httpx.HTTPError as error:
        return {"status": type(error).__name__, "prompt": prompt, "max_tokens": max_tokens}
    return {"status": 200, "prompt": prompt, "max_tokens": max_tokens, "text": text,
            "ttft_s": times[0] - started if times else None,
            "tpot_s": (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None,
            "pieces": len(times), "tokens": tokens, "seconds": time.monotonic() - started}


async def run_clients(args, start_at: float, arrivals) -> tuple[list[dict], float, float]:
    """One load process's clients (its share of --concurrency), each taking the next (request index, arrival time)
    from the queue `arrivals` as soon as it is free, until it takes None. Returns their results and the wall-clock
    times (time.time()) the process started and ended."""
    work = prompts(args.distinct, new_tokens=tuple(args.new_tokens), spread=args.spread)
    concurrency = clients_per_process(args)
    results = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        started, loop = time.time(), asyncio.get_running_loop()
        with ThreadPoolExecutor(concurrency) as takers:  # a blocking get each, off the event loop

            async def client_loop():
                while (arrival := await loop.run_in_executor(takers, arrivals.get)) is not None:
                    index, arrived = arrival
                    results.append(await one(client, args.url, args.model, *work[index % len(work)], arrived,
                                             args.ignore_eos))
            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results, started, time.time()


def clients_per_process(args) -> int:
    return -(-args.concurrency // args.processes)


def run_clients_sync(args, start_at: float, arrivals) -> tuple[list[dict], float, float]:
    return asyncio.run(run_clients(args, start_at, arrivals))


def send_arrivals(args, arrivals, start_at: float) -> None:
    """Put each request into the queue when it arrives: all at start_at (closed loop: each client sends its next
    request when its last one ends), or at Poisson arrivals of --rate a second (open loop: arrivals do not wait for
    answers); then one None for each client."""
    time.sleep(max(0.0, start_at - time.time()))
    rng, due = random.Random(1), time.monotonic()
    for index in range(args.requests):
        if args.rate:
            time.sleep(max(0.0, due - time.monotonic()))
            due += rng.expovariate(args.rate)
        arrivals.put((index, time.monotonic() if args.rate else None))
    for _ in range(args.processes * clients_per_process(args)):
        arrivals.put(None)


def run(args) -> dict:
    """The load from --processes processes (one Python process reads about 20k server-sent events a second),
    the server's memory sampled meanwhile."""
    memory, timeline, stop = [], [], threading.Event()
    watched = ("generated_tokens", "requests_submitted", "active_slots", "queue_depth")

    start_at = time.time() + (5.0 if args.processes > 1 else 0.0)  # after the load processes have started

    def sample():  # the server's memory, and what its engine is doing, every half second from start_at
        while not stop.is_set():
            if args.server_pid:
                memory.append(sum(map(resident_bytes, [args.server_pid, *children(args.server_pid)])))
            try:
                text = httpx.get(f"{args.url}/metrics", timeout=30).text
            except httpx.HTTPError:  # a server too busy to answer in time: a gap in the timeline
                text = ""
            lines = dict(line.split()[:2] for line in text.splitlines() if line and not line.startswith("#"))
            if lines:
                timeline.append([round(time.time() - start_at, 2), *(float(lines.get(f"kvexport_{k}", 0))
                                                                    for k in watched)])
            stop.wait(0.5)

    sampler = threading.Thread(target=sample)
    sampler.start()
    if args.processes == 1:
        arrivals = queue.Queue()
        threading.Thread(target=send_arrivals, args=(args, arrivals, start_at), daemon=True).start()
        runs = [run_clients_sync(args, start_at, arrivals)]
    else:
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(args.processes, mp_context=context) as pool:
            arrivals = manager.Queue()
            threading.Thread(target=send_arrivals, args=(args, arrivals, start_at), daemon=True).start()
            runs = list(pool.map(run_clients_sync, [args] * args.processes, [start_at] * args.processes,
                                 [arrivals] * args.processes))
    stop.set()
    sampler.join()
    results = [result for clients, _, _ in runs for result in clients]
    wall = max(end for _, _, end in runs) - min(start for _, start, _ in runs)
    metrics = httpx.get(f"{args.url}/metrics").text
    work = prompts(args.distinct, new_tokens=tuple(args.new_tokens), spread=args.spread)
    ok = [r for r in results if r["status"] == 200]
    report = {
        "url": args.url, "requests": len(results), "concurrency": args.concurrency, "rate": args.rate,
        "processes": args.processes, "new_tokens": args.new_tokens, "spread": args.spread,
        "wall_s": wall, "errors": {str(s): sum(r["status"] == s for r in results) for s in
                                   {r["status"] for r in results} if s != 200},
        "output_pieces_per_s": sum(r["pieces"] for r in ok) / wall,
        "ttft_p50_s": percentile([r["ttft_s"] for r in ok if r["ttft_s"]], 50),
        "ttft_p99_s": percentile([r["ttft_s"] for r in ok if r["ttft_s"]], 99),
        "tpot_p50_s": percentile([r["tpot_s"] for r in ok if r["tpot_s"]], 50),
        "tpot_p99_s": percentile([r["tpot_s"] for r in ok if r["tpot_s"]], 99),
        "server_metrics": {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                           if line and not line.startswith("#")},
    }
    report["served_tokens_per_s"] = report["server_metrics"].get("kvexport_generated_tokens", 0) / wall
    report["timeline"] = {"columns": ["s", *watched], "rows": timeline}
    report.update(saturated(timeline))
    if memory:
        tail = memory[len(memory) // 5:]
        report["server_rss_mib"] = {"first": memory[0] / 2**20, "min_last_80pct": min(tail) / 2**20,
                                    "max_last_80pct": max(tail) / 2**20,
                                    "spread_last_80pct": (max(tail) - min(tail)) / min(tail)}
    if args.check_greedy:
        from kvexport.runtime import Generator, SamplingConfig

        generator = Generator(args.check_greedy, backend="ort-static", max_batch=1)
        alone = {}
        for prompt, max_tokens in work:
            config = SamplingConfig(max_new_tokens=max_tokens, stop_token_ids=generator.model.facts.eos_token_ids)
            alone[prompt, max_tokens] = generator.generate([prompt], config).texts[0]
        report["greedy_mismatches"] = sum(r["text"] != alone[r["prompt"], r["max_tokens"]] for r in ok)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32, help="clients: requests in flight at most")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: Poisson arrivals per second")
    parser.add_argument("--processes", type=int, default=1,
                        help="load processes, each with its share of the clients")
    parser.add_argument("--distinct", type=int, default=40, help="distinct (prompt, max_tokens) pairs")
    add_length_arguments(parser, "max_tokens")
    parser.add_argument("--check-greedy", help="export directory: compare every answer with the prompt run alone")
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="every request generates its max_tokens (random weights end early on their EOS)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
