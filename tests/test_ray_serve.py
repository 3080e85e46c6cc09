"""`kvexport serve --replicas 2` on a local Ray instance: both replicas answer the OpenAI route."""

import socket

import httpx
import pytest

from kvexport.exporter import export

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'kvexport[ray]')")


@pytest.mark.slow
def test_two_replicas_behind_the_ray_proxy(tmp_path):
    from ray import serve

    from kvexport.serving.guard import Limits
    from kvexport.serving.openai_api import ApiSettings
    from kvexport.serving.ray_app import serve_on_ray

    directory = export("tiny-neox", "every:2", tmp_path / "export", static=True, log=lambda _: None).directory
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        serve_on_ray(directory, "127.0.0.1", port, ApiSettings(limits=Limits(api_key="k")), replicas=2, block=False,
                     max_slots=2)
        body = {"model": "tiny-neox", "prompt": "In Python, a list", "max_tokens": 8, "temperature": 0}
        replicas, texts = set(), set()
        with httpx.Client(timeout=60, headers={"Authorization": "Bearer k"}) as client:
            for _ in range(40):
                response = client.post(f"http://127.0.0.1:{port}/v1/completions", json=body)
                assert response.status_code == 200, response.text
                replicas.add(response.headers["x-kvexport-replica"])
                texts.add(response.json()["choices"][0]["text"])
                if len(replicas) == 2:
                    break
            bad = client.post(f"http://127.0.0.1:{port}/v1/completions", json={**body, "max_tokens": 0})
            chat = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
                "model": "tiny-neox", "messages": [{"role": "user", "content": "a list"}], "max_tokens": 4})
        unauthenticated = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert len(replicas) == 2, "the proxy sent every request to one replica"
        assert len(texts) == 1  # the same greedy answer from both
        assert bad.status_code == 400
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 4
        assert unauthenticated.status_code == 401
    finally:
        serve.shutdown()
        ray.shutdown()
