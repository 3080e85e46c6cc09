"""The OpenAI completions and chat completions protocols over an engine: request checking, responses, streaming,
errors.

Shared by the single-process server (serving/app.py) and the Ray Serve deployment (serving/ray_app.py). Every
refusal is an OpenAI-style JSON error with a 4xx status: 400 for a request that cannot run (malformed or too deeply
nested JSON, wrong types, max_tokens < 1, a prompt that does not fit, a model without a chat template), 404 for an
unknown model, 429 when the queue is full, 503 when the engine is shutting down or has stopped (also for a request
it dropped). Parsing, chat templates and tokenization run in a worker thread, off the event loop that streams
everyone's tokens, so that one large request never holds up the others.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvexport.runtime.engine import EngineClosedError, QueueFullError, RequestHandle
from kvexport.runtime.engine_process import EngineClient
from kvexport.runtime.sampling import SamplingConfig
from kvexport.strategies import InputError

from .guard import Limits, error_payload

MAX_PROMPTS = 64  # prompts per request (a list prompt is a batch)


@dataclass(frozen=True)
class ApiSettings:
    """What the HTTP API serves and how: the model's name (empty: the export's source, filled in by the server),
    tokens per streamed event, the chat template that overrides the model's own (its text), and the guard's
    limits."""
    model_name: str = ""
    stream_interval: int = 1
    chat_template: str | None = None
    limits: Limits = field(default_factory=Limits)


class SamplingFields(BaseModel):
    # strict: a string where a number belongs is refused, as the OpenAI API does, not converted
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past an end-of-sequence token


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(error_payload(message, kind, param, code), status)


def validation_error(problem: Exception) -> JSONResponse:
    if isinstance(problem, ValidationError):
        first = problem.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return error(400, f"{where or 'body'}: {first['msg']}", param=where or None)
    if isinstance(problem, RecursionError):
        return error(400, "the request body is nested too deeply: send a JSON object of the API's fields")
    return error(400, f"the request body is not valid JSON ({problem}): send a JSON object")


ENGINE_STOPPED = "the engine stopped before the request finished: retry once the server is back"


class Route:
    """One POST route of the OpenAI API for one engine serving one model name: parse, check, submit off the event
    loop, then answer in one response or as server-sent events. Subclasses say how a request becomes prompts and
    how a choice looks."""

    request_type: type[SamplingFields]
    object_name: str  # of a whole response; its stream's chunks add ".chunk" (chat) or keep it (completions)
    id_prefix: str
    prompt_field = "prompt"  # the field a refused prompt is blamed on

    def __init__(self, engine: EngineClient, settings: ApiSettings):
        self.engine, self.settings = engine, settings

    async def __call__(self, request: Request):
        raw = await request.body()
        try:  # parsing a few MB of JSON takes milliseconds: not on the loop
            body = await asyncio.to_thread(lambda: self.request_type.model_validate(json.loads(raw)))
        except (ValidationError, ValueError, RecursionError) as problem:
            return validation_error(problem)
        if body.model != self.settings.model_name:
            return error(404, f"the model '{body.model}' does not exist: this server serves "
                              f"'{self.settings.model_name}'", param="model", code="model_not_found")
        if body.logprobs:
            return error(400, "logprobs are not supported: the static graph samples on the device and returns "
                              "token ids only", param="logprobs", code="unsupported")
        try:
            handles = await asyncio.to_thread(self.submit, body)
        except QueueFullError as refusal:
            return error(429, str(refusal), kind="rate_limit_error", code="queue_full")
        except EngineClosedError as refusal:
            return error(503, str(refusal), kind="server_error", code="engine_unavailable")
        except InputError as refusal:
            return error(400, str(refusal), param=self.prompt_field)
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        response_id, created = f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.stream(handles, stops, response_id, created, include_usage),
                                     media_type="text/event-stream")
        choices = [await collect(handle, stops) for handle in handles]
        if any(reason == "error" for _, reason in choices):
            return error(503, ENGINE_STOPPED, kind="server_error", code="engine_unavailable")
        return JSONResponse({"id": response_id, "object": self.object_name, "created": created,
                             "model": self.settings.model_name,
                             "choices": [self.choice(i, text, reason) for i, (text, reason) in enumerate(choices)],
                             "usage": usage(handles)})

    def prompts(self, body) -> list:
        """The request's prompts, text or token ids (in the worker thread)."""
        raise NotImplementedError

    def max_new_tokens(self, body, prompt_ids: list[int]) -> int:
        raise NotImplementedError

    def choice(self, index: int, text: str, reason: str) -> dict:
        raise NotImplementedError

    def delta(self, index: int, text: str, reason: str | None, first: bool) -> dict:
        raise NotImplementedError

    def submit(self, body) -> list[RequestHandle]:
        """All prompts of a request, or none: on a refusal the ones already queued are cancelled."""
        requests = self.engine.requests
        stop_ids = [] if body.ignore_eos else self.engine.model.facts.eos_token_ids
        handles: list[RequestHandle] = []
        try:
            for prompt in self.prompts(body):
                ids = requests.encode([prompt])[0]
                config = SamplingConfig(max_new_tokens=self.max_new_tokens(body, ids), temperature=body.temperature,
                                        top_p=body.top_p, seed=body.seed, stop_token_ids=stop_ids)
                handles.append(self.engine.submit(ids, config))
        except Exception:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    async def stream(self, handles: list[RequestHandle], stops: list[str], response_id: str, created: int,
                     include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events, one per text delta (the tokens that arrived together form one, at least
        stream_interval of them), a last one per choice with its finish reason, then [DONE]. A client that goes
        away cancels its requests (the slots are freed at the next step); a request the engine dropped ends the
        stream with an error event."""
        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        def chunk(choices: list[dict], extra: dict | None = None) -> str:
            name = self.object_name + (".chunk" if self.object_name == "chat.completion" else "")
            return event({"id": response_id, "object": name, "created": created, "model": self.settings.model_name,
                          "choices": choices, **(extra or {})})

        try:
            for index, handle in enumerate(handles):
                first = True
                async for text, reason in stream_text(handle, stops, self.settings.stream_interval):
                    if reason == "error":
                        yield event(error_payload(ENGINE_STOPPED, "server_error", code="engine_unavailable"))
                        yield "data: [DONE]\n\n"
                        return
                    yield chunk([self.delta(index, text, reason, first)])
                    first = False
            if include_usage:
                yield chunk([], {"usage": usage(handles)})
            yield "data: [DONE]\n\n"
        finally:
            for handle in handles:
                handle.cancel()


class Completions(Route):
    """POST /v1/completions."""

    request_type, object_name, id_prefix = CompletionRequest, "text_completion", "cmpl"

    def prompts(self, body: CompletionRequest) -> list:
        prompts = [body.prompt] if isinstance(body.prompt, str) or (
            body.prompt and isinstance(body.prompt[0], int)) else body.prompt
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise InputError(f"prompt must hold 1 to {MAX_PROMPTS} prompts")
        return prompts

    def max_new_tokens(self, body: CompletionRequest, prompt_ids: list[int]) -> int:
        return body.max_tokens

    def choice(self, index: int, text: str, reason: str) -> dict:
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}

    def delta(self, index: int, text: str, reason: str | None, first: bool) -> dict:
        return self.choice(index, text, reason)


class ChatCompletions(Route):
    """POST /v1/chat/completions: the messages rendered by the model's chat template (or --chat-template), with
    add_generation_prompt, as vLLM does; without max_tokens a reply may fill the rest of the cache."""

    request_type, object_name, id_prefix, prompt_field = ChatRequest, "chat.completion", "chatcmpl", "messages"

    def prompts(self, body: ChatRequest) -> list:
        from jinja2 import TemplateError

        tokenizer = self.engine.requests.tokenizer
        template = self.settings.chat_template or tokenizer.chat_template
        if not template:
            raise InputError("this model has no chat template: start the server with --chat-template FILE (a Jinja "
                             "template of the messages), or use /v1/completions")
        messages = [{"role": message.role, "content": message_text(message)} for message in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 chat_template=template)
        except TemplateError as problem:
            raise InputError(f"the chat template refused the messages ({problem})") from None
        # the template writes the special tokens it wants (a begin-of-text token, for one): none are added again
        return [self.engine.requests.encode_text(text, special_tokens=False)]

    def max_new_tokens(self, body: ChatRequest, prompt_ids: list[int]) -> int:
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None:
            return asked
        requests = self.engine.requests
        limit = min(limit for limit in (self.engine.model.facts.max_positions, requests.max_length) if limit)
        return max(1, limit - len(prompt_ids))  # a prompt that fills the cache is refused with its length

    def choice(self, index: int, text: str, reason: str) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                "logprobs": None}

    def delta(self, index: int, text: str, reason: str | None, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta if text or first else {}, "finish_reason": reason, "logprobs": None}


def message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    kinds = {part.type for part in message.content} - {"text"}
    if kinds:
        raise InputError(f"message content of type {min(kinds)!r} is not supported: send text")
    return "".join(part.text or "" for part in message.content)


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
