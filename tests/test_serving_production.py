"""`kvexport serve` as a service others reach: API keys, bounded requests, chat completions with the real openai
client, a mixed concurrent load, and a dead engine, all over loopback against the real server."""

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import start_server

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["In Python, a list", "The dictionary", "def f(x):", "import os", "class A:", "Lambda", "A", "for i in"]


@pytest.fixture(scope="module")
def guarded(served_export, tmp_path_factory):
    """A server whose key comes from the environment, with room for 32 clients at once."""
    url, process = start_server(served_export, tmp_path_factory.mktemp("cwd"), "--max-slots", "16",
                                "--max-queue", "64", env={**os.environ, "KVEXPORT_API_KEY": KEY})
    yield url
    process.terminate()
    process.wait(timeout=60)


def submitted(url: str) -> int:
    return int(re.search(r"kvexport_requests_submitted (\d+)", httpx.get(f"{url}/metrics").text).group(1))


def test_without_the_api_key_nothing_is_served(guarded):
    before = submitted(guarded)
    completion = {"model": "tiny-neox", "prompt": "a", "max_tokens": 2}
    chat = {"model": "tiny-neox", "messages": [{"role": "user", "content": "a"}], "max_tokens": 2}
    refused = [
        httpx.post(f"{guarded}/v1/completions", json=completion),
        httpx.post(f"{guarded}/v1/chat/completions", json=chat),
        httpx.get(f"{guarded}/v1/models"),
        httpx.post(f"{guarded}/v1/completions", json=completion, headers={"Authorization": "Bearer wrong"}),
        httpx.post(f"{guarded}/v1/completions", json=completion, headers={"Authorization": f"Basic {KEY}"}),
        httpx.post(f"{guarded}/v1/completions", json=completion, headers={"Authorization": f"Bearer {KEY}x"}),
    ]
    assert [r.status_code for r in refused] == [401] * 6
    assert all(r.json()["error"]["type"] == "authentication_error" for r in refused)
    assert submitted(guarded) == before  # 0 of 6 reached the engine
    assert httpx.get(f"{guarded}/health").status_code == 200  # open to load balancers and scrapers
    assert httpx.post(f"{guarded}/v1/completions", json=completion, headers=AUTH).status_code == 200

    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{guarded}/v1", api_key="wrong").models.list()
    assert [m.id for m in OpenAI(base_url=f"{guarded}/v1", api_key=KEY).models.list()] == ["tiny-neox"]


def test_a_large_body_is_refused_at_once_and_never_holds_up_others(guarded):
    """A 20 MB body gets 413 from its length, before it is read; one sent without a length is read only up to the
    limit; a prompt under the limit that cannot fit the cache is refused from its length before tokenizing."""
    answers = {}

    def small():
        started = time.perf_counter()
        response = httpx.post(f"{guarded}/v1/completions", headers=AUTH,
                              json={"model": "tiny-neox", "prompt": "a", "max_tokens": 2})
        answers["small"] = (response.status_code, time.perf_counter() - started)

    big = json.dumps({"model": "tiny-neox", "prompt": "a" * 20_000_000}).encode()
    client = threading.Thread(target=small)
    started = time.perf_counter()
    client.start()
    response = httpx.post(f"{guarded}/v1/completions", content=big, timeout=30,
                          headers={**AUTH, "content-type": "application/json"})
    big_seconds = time.perf_counter() - started
    client.join()
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert big_seconds < 1.0 and answers["small"][0] == 200 and answers["small"][1] < 1.0

    def chunks():  # no content-length: the server counts what it reads
        for _ in range(80):
            yield b"a" * 2**16
    chunked = httpx.post(f"{guarded}/v1/completions", content=chunks(), headers=AUTH, timeout=30)
    assert chunked.status_code == 413

    started = time.perf_counter()
    long_prompt = httpx.post(f"{guarded}/v1/completions", headers=AUTH, timeout=30,
                             json={"model": "tiny-neox", "prompt": "word " * 600_000, "max_tokens": 1})
    assert long_prompt.status_code == 400 and "characters" in long_prompt.json()["error"]["message"]
    assert time.perf_counter() - started < 1.0


def test_chat_completions_with_the_openai_client(guarded, served_export):
    """The model's chat template renders the messages; the reply is the greedy continuation of that text."""
    from openai import OpenAI

    from kvexport.runtime import Generator, SamplingConfig

    client = OpenAI(base_url=f"{guarded}/v1", api_key=KEY)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a list?"}]
    generator = Generator(served_export, backend="ort-static", max_batch=1)
    rendered = generator.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("User: What is a list?\n\nAssistant:")
    ids = generator.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    expected = generator.tokenizer.decode(
        generator.generate([ids], SamplingConfig(max_new_tokens=10, stop_token_ids=[])).token_ids[0])

    done = client.chat.completions.create(model="tiny-neox", messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == expected and done.choices[0].finish_reason == "length"
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(model="tiny-neox", messages=messages, max_completion_tokens=10,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True}))
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == expected
    assert chunks[-1].usage.completion_tokens == 10

    refused = httpx.post(f"{guarded}/v1/chat/completions", headers=AUTH, json={
        "model": "tiny-neox", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert refused.status_code == 400 and "image_url" in refused.json()["error"]["message"]
    assert httpx.post(f"{guarded}/v1/chat/completions", headers=AUTH,
                      json={"model": "tiny-neox", "messages": []}).status_code == 400


def test_a_model_without_a_chat_template_gets_a_400_naming_the_fix(served_export, tmp_path):
    """And --chat-template supplies one (a file the command line reads; a missing file is one line)."""
    from fastapi.testclient import TestClient

    from kvexport.exporter.cli import main
    from kvexport.runtime.engine import Engine
    from kvexport.serving.app import create_app
    from kvexport.serving.openai_api import ApiSettings

    engine = Engine(served_export, max_slots=1)
    engine.requests.tokenizer.chat_template = None
    body = {"model": "tiny-neox", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    with TestClient(create_app(engine, ApiSettings("tiny-neox"))) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and "--chat-template FILE" in response.json()["error"]["message"]
    engine = Engine(served_export, max_slots=1)
    with TestClient(create_app(engine, ApiSettings("tiny-neox", chat_template="Q: {{ messages[-1]['content'] }}\nA:"))
                    ) as client:
        answer = client.post("/v1/chat/completions", json=body).json()
    assert answer["usage"]["prompt_tokens"] == len(engine.requests.tokenizer("Q: hello\nA:")["input_ids"])
    assert main(["serve", str(served_export), "--chat-template", str(tmp_path / "missing.jinja")]) == 2


def request_text(url: str, client: httpx.Client, route: str, prompt: str, stream: bool) -> str:
    """One greedy request's text, streamed or not."""
    if route == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body.update(model="tiny-neox", max_tokens=6, temperature=0, stream=stream, ignore_eos=True)
    if not stream:
        response = client.post(url + path, json=body, headers=AUTH)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return choice["message"]["content"] if route == "chat" else choice["text"]
    text = ""
    with client.stream("POST", url + path, json=body, headers=AUTH) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                if choices:
                    text += choices[0]["delta"].get("content") or "" if route == "chat" else choices[0]["text"]
    return text


@pytest.mark.slow
def test_32_clients_mixing_routes_and_streaming_get_what_each_gets_alone(guarded):
    """1,000 requests from 32 concurrent clients, completions and chat, streamed and not: no errors, and each
    greedy answer equal to the same request sent alone."""
    cases = [(route, prompt, stream) for route in ("completions", "chat") for prompt in PROMPTS
             for stream in (False, True)]
    with httpx.Client(timeout=120) as client:
        alone = {(route, prompt): request_text(guarded, client, route, prompt, False)
                 for route, prompt, _ in cases}
    local = threading.local()

    def one(index: int) -> bool:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        route, prompt, stream = cases[index % len(cases)]
        return request_text(guarded, local.client, route, prompt, stream) == alone[(route, prompt)]

    with ThreadPoolExecutor(32) as pool:
        matches = list(pool.map(one, range(1000)))  # an error raises here
    assert sum(matches) == 1000


def test_a_dead_engine_fails_health_answers_503_and_the_server_exits(served_export, tmp_path):
    url, process = start_server(served_export, tmp_path)
    try:
        engine_pid = int(re.search(r"engine process (\d+)", process.stdout.readline()).group(1))
        answer = {}

        def long_request():
            body = {"model": "tiny-neox", "prompt": "a", "max_tokens": 100, "ignore_eos": True}
            answer["status"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code

        client = threading.Thread(target=long_request)
        client.start()
        while "kvexport_active_slots 1" not in httpx.get(f"{url}/metrics").text:
            time.sleep(0.01)
        os.kill(engine_pid, signal.SIGKILL)
        killed = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/health").status_code != 200:
                    break
            except httpx.TransportError:  # already gone
                break
            assert time.monotonic() - killed < 5, "/health still answers 200"
            time.sleep(0.05)
        client.join(timeout=30)
        assert answer["status"] == 503
        assert process.wait(timeout=30) != 0
        assert "the engine process exited" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
