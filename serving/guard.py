"""What every request passes before a route runs: the API key, and the size of its body.

An ASGI middleware, so that it acts on the headers before any of the body is read: a wrong key or a body over the
limit is refused without reading it, and a body sent without a length is read only up to the limit.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

PROTECTED_PREFIX = "/v1/"  # /health and /metrics stay open, for load balancers and scrapers


@dataclass(frozen=True)
class Limits:
    api_key: str | None = None
    max_request_bytes: int = 4 * 2**20


def error_payload(message: str, kind: str = "invalid_request_error", param: str | None = None,
                  code: str | None = None) -> dict:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def refusal(status: int, message: str, kind: str, code: str) -> tuple[dict, bytes]:
    body = json.dumps(error_payload(message, kind, code=code)).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    return start, body


class Guard:
    """ASGI middleware: 401 for a /v1/ request without the API key (when the server has one), 413 for a body past
    max_request_bytes."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits
        self._key = limits.api_key.encode() if limits.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self._key is not None and scope["path"].startswith(PROTECTED_PREFIX) and not self._authorized(headers):
            return await self._refuse(send, 401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                      "authentication_error", "invalid_api_key")
        limit = self.limits.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await self._refuse(send, 413, f"the request body has {length.decode(errors='replace')} "
                                          f"bytes, more than this server's limit of {limit}: send a shorter request",
                                          "invalid_request_error", "request_too_large")
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        # No length given (chunked): read at most the limit, then hand the body on as one message.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._refuse(send, 413, f"the request body is longer than this server's limit of "
                                          f"{limit} bytes: send a shorter request", "invalid_request_error",
                                          "request_too_large")
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest takes as long whatever the token's content: no key is guessed from the timing
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)

    @staticmethod
    async def _refuse(send, status: int, message: str, kind: str, code: str) -> None:
        start, body = refusal(status, message, kind, code)
        await send(start)
        await send({"type": "http.response.body", "body": body})
