"""The OpenAI-compatible HTTP API (Starlette): /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics, over one `EngineWorker`.

Request bodies are checked field by field (an error names the field, OpenAI error JSON, status 400);
diffusion settings ride along as extra body fields. `stream: true` answers with server-sent events: one
chunk per committed piece of text, a last chunk with `finish_reason`, then `data: [DONE]`. With the
extension field `drafts: true`, chunks of `"object": "dgemma.draft"` carry the canvas while it
denoises (ordinary clients never ask for them, so never see them). A client that disconnects has its
request cancelled.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from dgemma.api import LLM
from dgemma.errors import CapacityError, DgemmaError, EngineDeadError, QueueFullError, RequestError
from dgemma.outputs import Draft, GenerationOutput, TextDelta
from dgemma.params import SamplingParams
from dgemma.serve.openapi import openapi_schema
from dgemma.serve.worker import LATENCY_BUCKETS, EngineWorker

# extension body fields -> SamplingParams fields (validated there)
DIFFUSION_FIELDS = {
    "max_denoising_steps": int,
    "entropy_bound": float,
    "t_min": float,
    "t_max": float,
    "stability_threshold": int,
    "confidence_threshold": float,
    "confidence": float,
    "sampler": str,
    "ignore_eos": bool,  # keep going past EOS to max_tokens (benchmarks, load tests)
}
# OpenAI fields accepted and ignored when they are null or hold their neutral value (OpenAI's default:
# clients often send it explicitly); Ellipsis: any value
NEUTRAL = {
    "n": 1,
    "temperature": 1,
    "top_p": 1,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "echo": False,
    "best_of": 1,
    "user": Ellipsis,
    "stream_options": Ellipsis,
}
WHY_NOT = {
    "temperature": "the diffusion sampler anneals its temperature over each canvas's steps: send t_max and "
    "t_min (extra body fields) instead",
}


def is_neutral(key: str, value) -> bool:
    """Whether an OpenAI field's value asks for nothing: null, or its neutral value (1 and 1.0 alike,
    but a boolean never stands for a number nor a number for a boolean)."""
    want = NEUTRAL[key]
    if want is Ellipsis or value is None:
        return True
    return (
        isinstance(value, bool) == isinstance(want, bool)
        and isinstance(value, (int, float))
        and value == want
    )


class TimedOut(Exception):
    """A request ran past the server's --request-timeout (an event, not raised)."""


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.param, self.kind, self.headers = status, param, kind, headers


def _client_names(message: str) -> tuple[str, bool]:
    """An engine error as the client should read it: the engine calls the token cap max_new_tokens, the
    client sent max_tokens. Returns (the message in the client's names, whether it is about the cap)."""
    return message.replace("max_new_tokens", "max_tokens"), "max_new_tokens" in message


def error_response(exc: HttpError) -> JSONResponse:
    body = {"error": {"message": str(exc), "type": exc.kind, "param": exc.param, "code": None}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def build_app(
    llm: LLM,
    worker: EngineWorker,
    *,
    model_id: str,
    api_key: str | None = None,
    request_timeout: float | None = None,
) -> Starlette:
    """`request_timeout`: seconds a request may run (queueing included); past it, it is cancelled."""
    created = int(time.time())

    def timed_out() -> TimedOut:
        return TimedOut(f"the request did not finish within {request_timeout or 0:g} s and was cancelled")

    async def next_event(events: asyncio.Queue, deadline: float | None):
        if deadline is None:
            return await events.get()
        try:
            return await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            return timed_out()

    def check_auth(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise HttpError(
                401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error"
            )

    async def read_body(request: HttpRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise HttpError(400, "'model' is required and must be a string", param="model")
        if model != model_id:
            raise HttpError(
                404,
                f"the model '{model}' does not exist; this server has '{model_id}'",
                param="model",
                kind="not_found_error",
            )
        return body

    def sampling_params(body: dict, allowed: set[str]) -> tuple[SamplingParams, bool, bool]:
        for key, value in body.items():
            if key in allowed or key in DIFFUSION_FIELDS:
                continue
            if key in NEUTRAL and is_neutral(key, value):
                continue
            only = f" (only {json.dumps(NEUTRAL[key])} or null)" if key in NEUTRAL else ""
            why = f": {WHY_NOT[key]}" if key in WHY_NOT else ""
            raise HttpError(400, f"'{key}' is not supported{only}{why}", param=key)
        stream, drafts = body.get("stream", False), body.get("drafts", False)
        for name, value in (("stream", stream), ("drafts", drafts)):
            if not isinstance(value, bool):
                raise HttpError(400, f"'{name}' must be a boolean", param=name)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        stop = body.get("stop")
        if stop is not None and not (
            isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        ):
            raise HttpError(400, "'stop' must be a string or a list of strings", param="stop")
        extra = {k: body[k] for k in DIFFUSION_FIELDS if body.get(k) is not None}
        for key, kind in DIFFUSION_FIELDS.items():
            if key in extra and (
                isinstance(extra[key], bool) != (kind is bool)
                or not isinstance(extra[key], (kind, int) if kind is float else kind)
            ):
                raise HttpError(400, f"'{key}' must be a {kind.__name__}", param=key)
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens,
                seed=body.get("seed"),
                stop=() if stop is None else stop,
                **extra,
            )
        except RequestError as exc:
            field = next(
                (f for f in ("max_tokens", "seed", "stop", *DIFFUSION_FIELDS) if f in str(exc)), None
            )
            message, about_the_cap = _client_names(str(exc))
            if field is None and about_the_cap:
                field = "max_tokens"
            raise HttpError(400, message, param=field) from None
        return params, stream, drafts

    async def start(prompt: Any, params: SamplingParams, drafts: bool):
        try:
            requests, _ = llm._requests(prompt, params, drafts=drafts, enable_thinking=False)
            return await worker.submit(requests[0])
        except QueueFullError as exc:
            raise HttpError(503, str(exc), kind="server_overloaded", headers={"Retry-After": "1"}) from None
        except EngineDeadError as exc:
            raise HttpError(503, str(exc), kind="server_error") from None
        except CapacityError as exc:
            message, about_the_cap = _client_names(str(exc))
            raise HttpError(400, message, param="max_tokens" if about_the_cap else "prompt") from None
        except RequestError as exc:
            raise HttpError(
                400, str(exc), param="messages" if isinstance(prompt, list) else "prompt"
            ) from None

    def usage(output: GenerationOutput) -> dict:
        s = output.stats
        return {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
            "denoise_steps": s.denoise_steps,
            "tokens_per_forward": round(s.tokens_per_forward, 4),
        }

    async def handle(request: HttpRequest, chat: bool) -> Response:
        check_auth(request)
        body = await read_body(request)
        if chat:
            params, stream, drafts = sampling_params(
                body,
                {
                    "model",
                    "messages",
                    "stream",
                    "drafts",
                    "seed",
                    "stop",
                    "max_tokens",
                    "max_completion_tokens",
                },
            )
            prompt = body.get("messages")
            if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
                raise HttpError(
                    400,
                    "'messages' must be a non-empty list of {role, content} objects",
                    param="messages",
                )
        else:
            params, stream, drafts = sampling_params(
                body, {"model", "prompt", "stream", "drafts", "seed", "stop", "max_tokens"}
            )
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise HttpError(400, "'prompt' must be a non-empty string", param="prompt")
        if drafts and not stream:
            raise HttpError(400, "'drafts' needs 'stream': true", param="drafts")
        deadline = None if request_timeout is None else time.monotonic() + request_timeout
        index, events = await start(prompt, params, drafts)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        if stream:
            return StreamingResponse(
                sse(events, index, rid, chat, deadline),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            output = await final(events, deadline, request)
        finally:
            worker.cancel(index)  # a no-op once finished; frees the row if the client went away
        if output is None:  # nobody to answer; the row is already being freed
            return Response(status_code=499)
        if isinstance(output, EngineDeadError):
            return error_response(HttpError(503, str(output), kind="server_error"))
        if isinstance(output, TimedOut):
            return error_response(HttpError(504, str(output), kind="timeout"))
        choice = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": output.text},
                "finish_reason": output.finish_reason,
            }
            if chat
            else {"index": 0, "text": output.text, "finish_reason": output.finish_reason, "logprobs": None}
        )
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": [choice],
                "usage": usage(output),
            }
        )

    async def final(
        events, deadline, http: HttpRequest
    ) -> GenerationOutput | EngineDeadError | TimedOut | None:
        """The request's last event; None when the client hung up first. The hang-up is checked twice a
        second by the clock, however often the engine reports progress (a canvas may commit faster)."""
        check = time.monotonic() + 0.5
        while True:
            event = await next_event(events, check if deadline is None else min(check, deadline))
            if isinstance(event, (GenerationOutput, EngineDeadError)):
                return event
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return timed_out()
            if now >= check:
                if await http.is_disconnected():
                    return None
                check = now + 0.5

    async def sse(events, index: int, rid: str, chat: bool, deadline) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        now = int(time.time())

        def chunk(
            delta: str | None, finish: str | None = None, extra: dict | None = None, first: bool = False
        ) -> str:
            if chat:
                d = {} if delta is None else {"content": delta}
                if first:
                    d = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            body = {
                "id": rid,
                "object": kind,
                "created": now,
                "model": model_id,
                "choices": [choice],
                **(extra or {}),
            }
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk(None, first=True)
            while True:
                event = await next_event(events, deadline)
                if isinstance(event, TextDelta):
                    if event.text:
                        yield chunk(event.text)
                elif isinstance(event, Draft):
                    draft = {
                        "id": rid,
                        "object": "dgemma.draft",
                        "created": now,
                        "model": model_id,
                        "canvas": event.canvas,
                        "step": event.step,
                        "text": event.text,
                    }
                    yield f"data: {json.dumps(draft)}\n\n"
                elif isinstance(event, GenerationOutput):
                    yield chunk(None, finish=event.finish_reason, extra={"usage": usage(event)})
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(event, (EngineDeadError, TimedOut)):
                    kind = "timeout" if isinstance(event, TimedOut) else "server_error"
                    error = {"error": {"message": str(event), "type": kind, "param": None, "code": None}}
                    yield f"data: {json.dumps(error)}\n\n"
                    return
        finally:
            worker.cancel(index)  # the client went away (or we are done: then a no-op)

    async def completions(request: HttpRequest) -> Response:
        return await handle(request, chat=False)

    async def chat_completions(request: HttpRequest) -> Response:
        return await handle(request, chat=True)

    async def models(request: HttpRequest) -> Response:
        check_auth(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "dgemma"}],
            }
        )

    async def openapi(request: HttpRequest) -> Response:
        return JSONResponse(openapi_schema(model_id))

    async def health(request: HttpRequest) -> Response:
        if worker.dead is not None:
            return JSONResponse({"status": "dead", "reason": worker.dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: HttpRequest) -> Response:
        check_auth(request)
        return PlainTextResponse(render_metrics(worker), media_type="text/plain; version=0.0.4")

    async def not_found(request: HttpRequest, exc) -> Response:
        return error_response(
            HttpError(404, f"no route {request.method} {request.url.path}", kind="not_found_error")
        )

    async def refused(request: HttpRequest, exc: HttpError) -> Response:
        return error_response(exc)

    async def bad_method(request: HttpRequest, exc) -> Response:
        return error_response(HttpError(405, f"{request.method} is not allowed on {request.url.path}"))

    async def crash(request: HttpRequest, exc: Exception) -> Response:
        if isinstance(exc, DgemmaError):
            return error_response(HttpError(400, str(exc)))
        return error_response(HttpError(500, f"internal error ({type(exc).__name__})", kind="server_error"))

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HttpError: refused, 404: not_found, 405: bad_method, Exception: crash},
    )


def render_metrics(worker: EngineWorker) -> str:
    """Prometheus text exposition, series prefixed dgemma_."""
    s = worker.stats
    lines = [
        "# HELP dgemma_requests_total Requests accepted by the engine.",
        "# TYPE dgemma_requests_total counter",
        f"dgemma_requests_total {s.requests}",
        "# HELP dgemma_requests_finished_total Requests finished, by reason (stop, length, cancelled).",
        "# TYPE dgemma_requests_finished_total counter",
        *(f'dgemma_requests_finished_total{{reason="{k}"}} {v}' for k, v in sorted(s.finished.items())),
        "# TYPE dgemma_prompt_tokens_total counter",
        f"dgemma_prompt_tokens_total {s.prompt_tokens}",
        "# TYPE dgemma_completion_tokens_total counter",
        f"dgemma_completion_tokens_total {s.completion_tokens}",
        "# HELP dgemma_queue_depth Requests waiting for a cache row.",
        "# TYPE dgemma_queue_depth gauge",
        f"dgemma_queue_depth {worker.queue_depth}",
        "# TYPE dgemma_running_requests gauge",
        f"dgemma_running_requests {worker.running}",
        "# TYPE dgemma_engine_steps_total counter",
        f"dgemma_engine_steps_total {s.engine_steps}",
        "# HELP dgemma_canvases_per_step Mean canvases denoised per engine step.",
        "# TYPE dgemma_canvases_per_step gauge",
        f"dgemma_canvases_per_step {_ratio(s.canvases_denoised, s.engine_steps):.4f}",
        "# HELP dgemma_steps_per_canvas Mean denoise steps per committed canvas.",
        "# TYPE dgemma_steps_per_canvas gauge",
        f"dgemma_steps_per_canvas {_ratio(s.denoise_steps, s.committed_canvases):.4f}",
        "# HELP dgemma_request_latency_seconds Time from submission to the last token.",
        "# TYPE dgemma_request_latency_seconds histogram",
    ]
    for bound, count in zip(LATENCY_BUCKETS, s.latency_buckets):
        lines.append(f'dgemma_request_latency_seconds_bucket{{le="{bound}"}} {count}')
    lines += [
        f'dgemma_request_latency_seconds_bucket{{le="+Inf"}} {s.latency_count}',
        f"dgemma_request_latency_seconds_sum {s.latency_sum:.6f}",
        f"dgemma_request_latency_seconds_count {s.latency_count}",
    ]
    return "\n".join(lines) + "\n"


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0
