"""The OpenAI completions protocol over an engine: request checking, responses, streaming, errors.

Shared by the single-process server (serving/app.py) and the Ray Serve deployment (serving/ray_app.py). Every
refusal is an OpenAI-style JSON error with a 4xx status: 400 for a request that cannot run (malformed JSON, wrong
types, max_tokens < 1, a prompt that does not fit), 404 for an unknown model, 429 when the queue is full, 503 while
the server drains.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvexport.runtime.engine import EngineClosedError, QueueFullError, RequestHandle
from kvexport.runtime.engine_process import EngineClient
from kvexport.runtime.sampling import SamplingConfig
from kvexport.strategies import InputError

MAX_PROMPTS = 64  # prompts per request (a list prompt is a batch)


class CompletionRequest(BaseModel):
    # strict: a string where a number belongs is refused, as the OpenAI API does, not converted
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past an end-of-sequence token


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def validation_error(problem: ValidationError | Exception) -> JSONResponse:
    if isinstance(problem, ValidationError):
        first = problem.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return error(400, f"{where or 'body'}: {first['msg']}", param=where or None)
    return error(400, f"the request body is not valid JSON ({problem}): send a JSON object")


class Completions:
    """POST /v1/completions for one engine serving one model name."""

    def __init__(self, engine: EngineClient, model_name: str, stream_interval: int = 1):
        self.engine, self.model_name, self.stream_interval = engine, model_name, stream_interval

    async def __call__(self, request: Request):
        try:
            body = CompletionRequest.model_validate(json.loads(await request.body()))
        except (ValidationError, ValueError) as problem:
            return validation_error(problem)
        if body.model != self.model_name:
            return error(404, f"the model '{body.model}' does not exist: this server serves '{self.model_name}'",
                         param="model", code="model_not_found")
        prompts = [body.prompt] if isinstance(body.prompt, str) or (
            body.prompt and isinstance(body.prompt[0], int)) else body.prompt
        if not prompts or len(prompts) > MAX_PROMPTS:
            return error(400, f"prompt must hold 1 to {MAX_PROMPTS} prompts", param="prompt")
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        try:
            config = SamplingConfig(max_new_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                                    seed=body.seed,
                                    stop_token_ids=[] if body.ignore_eos else self.engine.model.facts.eos_token_ids)
            handles = self.submit_all(prompts, config)
        except QueueFullError as refusal:
            return error(429, str(refusal), kind="rate_limit_error", code="queue_full")
        except EngineClosedError as refusal:
            return error(503, str(refusal), kind="server_error", code="shutting_down")
        except InputError as refusal:
            return error(400, str(refusal), param="prompt")
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.stream(handles, stops, completion_id, created, include_usage),
                                     media_type="text/event-stream")
        choices = [await collect(handle, stops) for handle in handles]
        return JSONResponse({
            "id": completion_id, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                        for i, (text, reason) in enumerate(choices)],
            "usage": usage(handles)})

    def submit_all(self, prompts: list, config: SamplingConfig) -> list[RequestHandle]:
        """All prompts of a request, or none: on a refusal the ones already queued are cancelled."""
        handles: list[RequestHandle] = []
        try:
            for prompt in prompts:
                handles.append(self.engine.submit(prompt, config))
        except Exception:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    async def stream(self, handles: list[RequestHandle], stops: list[str], completion_id: str, created: int,
                     include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events, one per text delta (the tokens that arrived together form one, at least
        stream_interval of them), a last one per choice with its finish reason, then [DONE]. A client that goes
        away cancels its requests (the slots are freed at the next step)."""
        def chunk(index: int, text: str, reason: str | None, extra: dict | None = None) -> str:
            choices = [] if index < 0 else [{"index": index, "text": text, "finish_reason": reason, "logprobs": None}]
            payload = {"id": completion_id, "object": "text_completion", "created": created,
                       "model": self.model_name, "choices": choices, **(extra or {})}
            return f"data: {json.dumps(payload)}\n\n"

        try:
            for index, handle in enumerate(handles):
                async for text, reason in stream_text(handle, stops, self.stream_interval):
                    yield chunk(index, text, reason)
            if include_usage:
                yield chunk(-1, "", None, {"usage": usage(handles)})
            yield "data: [DONE]\n\n"
        finally:
            for handle in handles:
                handle.cancel()


async def stream_text(handle: RequestHandle, stops: list[str], interval: int = 1
                      ) -> AsyncIterator[tuple[str, str | None]]:
    """(text delta, finish reason) pairs, each delta from at least `interval` tokens but the last (fewer events
    for the server and its clients to handle per token). A stop string ends the request where it starts (it is
    not part of the text); the last characters that could begin one are held back until the next token shows
    whether they do."""
    hold = max((len(stop) - 1 for stop in stops), default=0)
    pending, unsent = "", 0
    async for events in handle.batches():
        pending += "".join(event.text for event in events)
        unsent += len(events)
        cut = min((i for i in (pending.find(stop) for stop in stops) if i >= 0), default=-1)
        if cut >= 0:
            handle.cancel()
            yield pending[:cut], "stop"
            return
        if events[-1].finish_reason:
            yield pending, events[-1].finish_reason
            return
        if unsent >= interval and len(pending) > hold:
            yield pending[:len(pending) - hold], None
            pending, unsent = pending[len(pending) - hold:], 0


async def collect(handle: RequestHandle, stops: list[str]) -> tuple[str, str]:
    text, reason = "", "length"
    async for delta, finish in stream_text(handle, stops):
        text += delta
        reason = finish or reason
    return text, reason


def usage(handles: list[RequestHandle]) -> dict:
    prompt = sum(len(h.prompt_ids) for h in handles)
    completion = sum(len(h.tokens) for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def prometheus(metrics: dict) -> str:
    """The engine's metrics in Prometheus' text format (counters by reason get a label)."""
    lines = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            lines.append(f"# TYPE kvexport_{name} counter")
            lines += [f'kvexport_{name}{{reason="{key}"}} {count}' for key, count in value.items()]
        else:
            lines += [f"# TYPE kvexport_{name} gauge", f"kvexport_{name} {value}"]
    return "\n".join(lines) + "\n"
