"""The engine (continuous batching over cache slots) and `kvexport serve` over loopback, with the real openai
client: concurrent requests, streaming, every bad request's status, disconnects, backpressure and shutdown."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import REPO_ROOT, start_server

from kvexport.runtime import Generator, SamplingConfig
from kvexport.runtime.engine import Engine, EngineClosedError, QueueFullError, deliver
from kvexport.runtime.engine_process import EngineClient, EngineProcess, launch_engine
from kvexport.strategies import InputError, KvexportError

PROMPTS = ["In Python, a list", "The dictionary", "def f(x):", "import os", "class A:", "Lambda", "A", "for i in"]
GREEDY = SamplingConfig(max_new_tokens=12, stop_token_ids=[])


@pytest.fixture(scope="module")
def alone(served_export):
    generator = Generator(served_export, backend="ort-static", max_batch=1)
    return {p: generator.generate([p], GREEDY).token_ids[0] for p in PROMPTS}


@pytest.mark.parametrize("steps_in_flight", [1, 2])
def test_concurrent_requests_get_what_each_gets_alone(served_export, alone, steps_in_flight):
    """With one step or two left queued while the host takes tokens (CUDA's default is two): the same tokens."""
    engine = Engine(served_export, max_slots=3, prefill_chunk=2,  # more requests than slots; chunked prompts
                    steps_in_flight=steps_in_flight)
    handles = {}
    threads = [threading.Thread(target=lambda p=p: handles.update({p: engine.submit(p, GREEDY)})) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    texts = {p: "".join(event.text for event in handle) for p, handle in handles.items()}
    for prompt, handle in handles.items():
        assert handle.tokens == alone[prompt] and handle.finish_reason == "length"
        assert texts[prompt] == engine.generator.tokenizer.decode(alone[prompt])
    metrics = engine.metrics()
    assert metrics["active_slots"] == 0 and metrics["generated_tokens"] == 12 * len(PROMPTS)
    # the scheduler's time split into its parts: prompts ran and steps were queued, all within its loop
    parts = [metrics[f"{part}_seconds"] for part in ("prefill", "queue", "device_wait", "delivery")]
    assert parts[0] > 0 and parts[1] > 0 and sum(parts) <= metrics["loop_seconds"]
    # the model's runs (on the CPU: as they were queued) within the prefill and the queueing
    assert 0 < metrics["prefill_device_seconds"] <= parts[0] and 0 < metrics["decode_device_seconds"] <= parts[1]
    engine.close()


def test_cancel_deadline_backpressure_and_static_batching(served_export, alone):
    engine = Engine(served_export, max_slots=1, max_queue=1, batching="static")
    long = SamplingConfig(max_new_tokens=100, stop_token_ids=[])
    first = engine.submit(PROMPTS[0], long)
    while engine.metrics()["active_slots"] == 0:  # admitted: the queue is empty again
        time.sleep(0.001)
    queued = engine.submit(PROMPTS[1], GREEDY)
    with pytest.raises(QueueFullError):
        engine.submit(PROMPTS[2], GREEDY)
    first.cancel()
    assert [e.finish_reason for e in first][-1] == "cancelled"
    assert list(queued)[-1].finish_reason == "length" and queued.tokens == alone[PROMPTS[1]]
    late = engine.submit(PROMPTS[3], long, timeout_s=1e-3)
    assert list(late)[-1].finish_reason == "deadline"
    with pytest.raises(InputError, match="exceeds"):
        engine.submit("x", SamplingConfig(max_new_tokens=10_000))
    assert engine.metrics()["active_slots"] == 0
    engine.close()


def test_static_batching_prefills_its_whole_batch_while_the_first_rows_decode(served_export):
    """Static batching with batched first prompts (as on CUDA): 17 rows take 9 iterations of two prompts each to
    prefill while the first rows decode; the last prompt must not wait for the batch to end (it did, when the
    rule that batches continuous batching's new prompts also held back static batching's last one)."""
    order = []

    def record(items):
        order.extend(items)
        deliver(items)

    engine = Engine(served_export, max_slots=17, batching="static", prefill_batch=8, prefill_chunk=16,
                    on_events=record)
    config = SamplingConfig(max_new_tokens=24, stop_token_ids=[])
    first = engine.submit([99] * 6, config)
    while engine.metrics()["active_slots"] == 0:  # the engine is busy: the next 17 are admitted as one batch
        time.sleep(0.001)
    handles = [engine.submit([100 + i] * 6, config) for i in range(20)]  # 6 tokens: two prompts per 16
    for handle in [first, *handles]:
        assert list(handle)[-1].finish_reason == "length"
    engine.close()
    batch = set(handles[:17])
    first_tokens = {}
    for index, (handle, _) in enumerate(order):
        first_tokens.setdefault(handle, index)
    first_finish = min(i for i, (handle, event) in enumerate(order) if handle in batch and event.finish_reason)
    assert max(first_tokens[handle] for handle in batch) < first_finish


def test_first_prompts_past_the_token_budget_still_run_as_one_batch(served_export, alone):
    """32 rows wait for 2 new prompts before batching them while others decode (a sixteenth). Two prompts over the
    token budget together must still run in one batch: the second, left over, used to idle in its row until one more
    row was free."""
    engine = Engine(served_export, max_slots=32, prefill_batch=8, prefill_chunk=6)
    batches = []
    prefill_first = engine.decoder.prefill_first
    engine.decoder.prefill_first = lambda rows, prompts: (batches.append(len(rows)), prefill_first(rows, prompts))
    busy = engine.submit(PROMPTS[0], SamplingConfig(max_new_tokens=40, stop_token_ids=[]))
    while engine.metrics()["active_slots"] == 0:
        time.sleep(0.001)
    with engine._wake:  # both are admitted in one scheduler iteration
        handles = {p: engine.submit(p, GREEDY) for p in PROMPTS[1:3]}  # 2 and 5 tokens
    for prompt, handle in handles.items():
        assert list(handle)[-1].finish_reason == "length" and handle.tokens == alone[prompt]
    list(busy)
    engine.close()
    assert batches == [1, 2]


def test_requests_left_in_high_rows_move_down_and_steps_run_smaller(served_export, alone):
    """Two long requests (one greedy, one sampled) in rows 2 and 3 outlive two short ones in rows 0 and 1: they move
    to rows 0 and 1, with two steps in flight, and the steps after run 2 rows, not 4 (on the CPU one prompt is
    prefilled per iteration, so row 3 starts decoding after rows 0 and 1 end); each long request gets what it gets
    alone."""
    sampled = SamplingConfig(max_new_tokens=12, temperature=0.9, seed=7, stop_token_ids=[])
    solo = Engine(served_export, max_slots=1)
    expected = solo.submit(PROMPTS[3], sampled)
    list(expected)
    solo.close()
    engine = Engine(served_export, max_slots=4, steps_in_flight=2)
    sizes = []
    decode_rows = engine.decoder.decode_rows
    engine.decoder.decode_rows = lambda tokens, lengths: (sizes.append(len(tokens)), decode_rows(tokens, lengths))[1]
    short = SamplingConfig(max_new_tokens=2, stop_token_ids=[])
    with engine._wake:  # admitted in one iteration, into rows 0..3 in this order
        handles = [engine.submit(PROMPTS[0], short), engine.submit(PROMPTS[1], short),
                   engine.submit(PROMPTS[2], GREEDY), engine.submit(PROMPTS[3], sampled)]
    for handle in handles:
        assert list(handle)[-1].finish_reason == "length"
    assert handles[2].tokens == alone[PROMPTS[2]] and handles[3].tokens == expected.tokens
    assert engine.metrics()["rows_moved"] == 2
    assert max(sizes) == 3 and sizes.count(2) >= 8  # without the moves, row 3 kept every step of it at 4 rows
    engine.close()


def test_a_request_that_fills_the_cache_gets_all_its_tokens(served_export):
    """A prompt plus max_new_tokens exactly as long as the cache: every token asked for comes, although the engine
    queues each row's next step before it has seen the row's last token."""
    engine = Engine(served_export, max_slots=2, max_length=32)
    prompt = [417, 1203, 33, 998, 4000]
    handle = engine.submit(prompt, SamplingConfig(max_new_tokens=32 - len(prompt), stop_token_ids=[]))
    assert list(handle)[-1].finish_reason == "length" and len(handle.tokens) == 32 - len(prompt)
    engine.close()


def test_async_iteration(served_export, alone):
    import asyncio

    engine = Engine(served_export, max_slots=2)

    async def run():
        return [e async for e in engine.submit(PROMPTS[2], GREEDY)]

    events = asyncio.run(run())
    assert [e.token_id for e in events] == alone[PROMPTS[2]]
    engine.close()


def test_the_tokenizer_loads_with_the_engine_not_with_its_first_request(served_export):
    """Loading it in the first submit held the scheduler's lock meanwhile (12 s on the H100's first request). An
    engine whose events go to another process (a server's) never needs it: text is made there."""
    engine = Engine(served_export, max_slots=1)
    assert engine.generator.requests._tokenizer is not None
    engine.close()
    sent = []
    remote = Engine(served_export, max_slots=1, on_events=sent.extend)
    remote.submit([1, 2, 3], GREEDY)
    remote.close()
    assert remote.generator.requests._tokenizer is None and sent[-1][1].finish_reason == "length"


def test_engine_in_a_process_of_its_own(served_export, alone):
    """The server's engine: a child process behind a front end with the Engine's API. The same answers as alone,
    backpressure counted on the front end, cancel, metrics, an engine that cannot start raising its error, and a
    dead engine process ending its requests with 'error'."""
    with pytest.raises(InputError, match="exceeds the model's"):
        EngineProcess(served_export, max_length=10**6)
    engine = EngineProcess(served_export, max_slots=2, max_queue=1)
    handles = [engine.submit(prompt, GREEDY) for prompt in PROMPTS[:3]]  # two rows and one waiting
    with pytest.raises(QueueFullError):
        engine.submit(PROMPTS[3], GREEDY)
    tokenizer = engine.requests.tokenizer
    for prompt, handle in zip(PROMPTS, handles):
        assert "".join(event.text for event in handle) == tokenizer.decode(alone[prompt])
        assert handle.tokens == alone[prompt] and handle.finish_reason == "length"
    metrics = engine.metrics()
    assert metrics["generated_tokens"] == 36 and metrics["active_slots"] == 0 and metrics["refused_queue_full"] == 1
    with pytest.raises(InputError, match="exceeds"):
        engine.submit("x", SamplingConfig(max_new_tokens=10_000))
    long = SamplingConfig(max_new_tokens=200, stop_token_ids=[])
    cancelled = engine.submit(PROMPTS[0], long)
    next(iter(cancelled))
    cancelled.cancel()
    assert [event.finish_reason for event in cancelled][-1] == "cancelled"
    stranded = engine.submit(PROMPTS[0], long)
    next(iter(stranded))
    engine._process.kill()
    assert [event.finish_reason for event in stranded][-1] == "error"
    with pytest.raises(EngineClosedError):
        engine.submit(PROMPTS[0], GREEDY)
    engine.close()


def test_a_front_end_that_receives_on_its_event_loop(served_export, alone):
    """An API server's front end: no receiver thread, the engine's messages read on the loop that streams them.
    The same answers as alone, metrics and close answered while the loop receives (asked from other threads), and
    a dead engine process ending a stream with 'error'."""
    import asyncio

    process, (connection,), in_flight = launch_engine(served_export, max_slots=2)
    engine = EngineClient(served_export, connection, in_flight, max_slots=2, max_queue=4, receiver_thread=False)
    assert "kvexport-engine-receiver" not in [thread.name for thread in threading.enumerate()]

    async def tokens(prompt: str, config: SamplingConfig) -> list:
        return [event async for event in engine.submit(prompt, config)]

    async def run():
        engine.receive_on(asyncio.get_running_loop())
        answers = await asyncio.gather(*(tokens(prompt, GREEDY) for prompt in PROMPTS[:3]))
        metrics = await asyncio.to_thread(engine.metrics)
        stranded = engine.submit(PROMPTS[0], SamplingConfig(max_new_tokens=200, stop_token_ids=[]))
        events = []
        async for event in stranded:
            events.append(event)
            if len(events) == 1:
                process.kill()
        await asyncio.to_thread(engine.close)
        return answers, metrics, events

    answers, metrics, stranded = asyncio.run(run())
    assert [[event.token_id for event in events] for events in answers] == [alone[p] for p in PROMPTS[:3]]
    assert metrics["generated_tokens"] == 36 and stranded[-1].finish_reason == "error"


@pytest.fixture(scope="module")
def server(served_export, tmp_path_factory):
    # prompts of more than 3 tokens are prefilled over several iterations: the answers must not change
    url, process = start_server(served_export, tmp_path_factory.mktemp("cwd"), "--stream-interval", "3",
                                "--prefill-chunk", "3")
    yield url, process
    if process.poll() is None:
        process.kill()


def test_with_two_steps_in_flight_a_stopped_request_gets_no_token_past_its_stop(served_export, alone):
    """The steps queued after a request's stop token still feed its row; their tokens never reach it, and the
    row's next request gets only its own."""
    engine = Engine(served_export, max_slots=1, steps_in_flight=2)
    stop = alone[PROMPTS[0]][2]
    stopped = engine.submit(PROMPTS[0], SamplingConfig(max_new_tokens=12, stop_token_ids=[stop]))
    after = engine.submit(PROMPTS[1], GREEDY)  # waits for the row
    assert [event.token_id for event in stopped] == alone[PROMPTS[0]][:3] and stopped.finish_reason == "stop"
    assert [event.token_id for event in after] == alone[PROMPTS[1]] and after.finish_reason == "length"
    with pytest.raises(KvexportError, match="at least 1"):
        Engine(served_export, steps_in_flight=0)
    with pytest.raises(InputError, match="prefill_chunk must be at least 1"):
        Engine(served_export, prefill_chunk=0)
    engine.close()


@pytest.mark.parametrize("option", ["--stream-interval", "--api-servers", "--steps-in-flight", "--prefill-chunk"])
def test_a_bad_serve_option_is_one_line(served_export, option):
    command = [sys.executable, "-m", "kvexport", "serve", str(served_export), option, "0"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"{option} 0" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_taken_port_is_one_line(served_export):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        command = [sys.executable, "-m", "kvexport", "serve", str(served_export), "--port",
                   str(taken.getsockname()[1])]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "cannot listen" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_api_servers_share_one_engine(served_export, alone, tmp_path):
    """--api-servers 2: two front-end processes on one port over one engine. Connections reach both, each
    request gets what it gets alone, metrics and the queue bound are the whole server's, and SIGTERM drains the
    requests in flight and exits 0."""
    url, process = start_server(served_export, tmp_path, "--api-servers", "2")
    try:
        pids = {httpx.get(f"{url}/health").json()["api_server"] for _ in range(40)}  # a new connection each
        assert len(pids) == 2
        answers: dict[str, list[int]] = {}

        def complete(prompt: str, max_tokens: int = 12) -> None:
            body = {"model": "tiny-neox", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            answers[prompt] = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()

        threads = [threading.Thread(target=complete, args=(prompt,)) for prompt in PROMPTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        tokenizer = Generator(served_export).tokenizer
        assert {p: a["choices"][0]["text"] for p, a in answers.items()} == {
            p: tokenizer.decode(alone[p]) for p in PROMPTS}
        assert f"kvexport_generated_tokens {12 * len(PROMPTS)}" in httpx.get(f"{url}/metrics").text
        full = {"model": "tiny-neox", "prompt": ["a"] * 13, "max_tokens": 200}  # 4 slots + 8 queued in all
        assert httpx.post(f"{url}/v1/completions", json=full, timeout=60).status_code == 429
        assert all("kvexport_refused_queue_full 1" in httpx.get(f"{url}/metrics").text for _ in range(6))
        client = threading.Thread(target=complete, args=("for i in range(10):", 400))
        client.start()
        while "kvexport_active_slots 1" not in httpx.get(f"{url}/metrics").text:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        client.join()
        assert answers["for i in range(10):"]["usage"]["completion_tokens"] == 400
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_openai_client_against_the_server(server, alone, served_export):
    from openai import OpenAI

    url, _ = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny-neox"]
    tokenizer = Generator(served_export).tokenizer
    done = client.completions.create(model="tiny-neox", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert done.choices[0].text == tokenizer.decode(alone[PROMPTS[0]])
    assert done.usage.completion_tokens == 12 and done.choices[0].finish_reason == "length"
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny-neox", prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == tokenizer.decode(alone[PROMPTS[1]])
    assert len(pieces) <= 12 // 3 + 1  # --stream-interval 3: at least 3 tokens per event (one each by default)
    both = client.completions.create(model="tiny-neox", prompt=PROMPTS[:2], max_tokens=12, temperature=0)
    assert [c.text for c in both.choices] == [tokenizer.decode(alone[p]) for p in PROMPTS[:2]]
    expected = tokenizer.decode(alone[PROMPTS[0]])
    stop = expected.split()[2]
    stopped = client.completions.create(model="tiny-neox", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop)
    assert stopped.choices[0].text == expected[:expected.index(stop)] and stopped.choices[0].finish_reason == "stop"
    seeded = [client.completions.create(model="tiny-neox", prompt="A", max_tokens=8, temperature=1.0, seed=7)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_the_load_generator_over_two_processes(server, served_export, tmp_path):
    """samples/load_test.py, which measures the server for docs/results.md: Poisson arrivals taken from one queue by
    the clients of two processes; every request answered, each greedy answer the prompt's alone."""
    url, _ = server
    output = tmp_path / "load.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "samples/load_test.py"), "--url", url, "--requests", "24",
                    "--rate", "40", "--concurrency", "4", "--processes", "2", "--new-tokens", "4", "12",
                    "--check-greedy", str(served_export), "--output", str(output)],
                   check=True, capture_output=True, timeout=300)
    report = json.loads(output.read_text())
    assert report["requests"] == 24 and report["errors"] == {} and report["greedy_mismatches"] == 0
    assert 0 < report["ttft_p50_s"] <= report["ttft_p99_s"] < report["wall_s"]


BAD_REQUESTS = [
    ("malformed JSON", b"{not json", 400),
    ("not an object", b"[1, 2]", 400),
    ("no prompt", {"model": "tiny-neox"}, 400),
    ("prompt of the wrong type", {"model": "tiny-neox", "prompt": 42}, 400),
    ("max_tokens a string", {"model": "tiny-neox", "prompt": "a", "max_tokens": "ten"}, 400),
    ("max_tokens 0", {"model": "tiny-neox", "prompt": "a", "max_tokens": 0}, 400),
    ("max_tokens past the cache", {"model": "tiny-neox", "prompt": "a", "max_tokens": 100_000}, 400),
    ("prompt longer than the model", {"model": "tiny-neox", "prompt": "word " * 5000, "max_tokens": 1}, 400),
    ("token id outside the vocabulary", {"model": "tiny-neox", "prompt": [10**9], "max_tokens": 1}, 400),
    ("temperature negative", {"model": "tiny-neox", "prompt": "a", "temperature": -1}, 400),
    ("top_p 0", {"model": "tiny-neox", "prompt": "a", "top_p": 0}, 400),
    ("n 2", {"model": "tiny-neox", "prompt": "a", "n": 2}, 400),
    ("empty prompt list", {"model": "tiny-neox", "prompt": []}, 400),
    ("unknown model", {"model": "gpt-4", "prompt": "a"}, 404),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, 400),
    ("logprobs", {"model": "tiny-neox", "prompt": "a", "logprobs": 2}, 400),
]


@pytest.mark.parametrize(("case", "body", "status"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, case, body, status):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_client_that_disconnects_frees_its_slot(server):
    url, _ = server
    body = {"model": "tiny-neox", "prompt": "a", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        next(response.iter_lines())  # one event, then hang up
    deadline = time.monotonic() + 10
    while "kvexport_active_slots 0" not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)


def test_a_full_queue_gets_429(server):
    url, _ = server
    body = {"model": "tiny-neox", "prompt": ["a"] * 13, "max_tokens": 200, "temperature": 0}  # 4 slots + 8 queued
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"
    assert httpx.get(f"{url}/health").status_code == 200


def test_sigterm_drains_in_flight_requests_and_exits_0(server):
    url, process = server
    result = {}

    def long_request():
        body = {"model": "tiny-neox", "prompt": "a", "max_tokens": 400, "temperature": 0}
        result["response"] = httpx.post(f"{url}/v1/completions", json=body, timeout=120)

    client = threading.Thread(target=long_request)
    client.start()
    while "kvexport_active_slots 1" not in httpx.get(f"{url}/metrics").text:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    client.join()
    assert result["response"].status_code == 200
    assert result["response"].json()["usage"]["completion_tokens"] == 400
    assert process.wait(timeout=60) == 0


def test_ignore_eos_generates_past_an_end_of_sequence_token(served_export, alone):
    """vLLM's `ignore_eos` extension: with the engine's end-of-sequence token set to one the prompt's greedy answer
    reaches at its third token, a request stops there, and with ignore_eos goes on to max_tokens."""
    from fastapi.testclient import TestClient

    from kvexport.serving.app import create_app
    from kvexport.serving.openai_api import ApiSettings

    engine = Engine(served_export, max_slots=2)
    engine.model.facts.eos_token_ids = [alone[PROMPTS[0]][2]]
    with TestClient(create_app(engine, ApiSettings("tiny-neox"))) as client:
        body = {"model": "tiny-neox", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
        stopped = client.post("/v1/completions", json=body).json()
        going_on = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()
    assert stopped["usage"]["completion_tokens"] == 3 and stopped["choices"][0]["finish_reason"] == "stop"
    assert going_on["usage"]["completion_tokens"] == 8 and going_on["choices"][0]["finish_reason"] == "length"
