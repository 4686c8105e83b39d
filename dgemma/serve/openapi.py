"""The server's OpenAPI 3.0 description (GET /openapi.json): what clients and fuzzers may send."""

from __future__ import annotations

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"nullable": True},
            },
        }
    },
}
_DIFFUSION = {
    "max_denoising_steps": {"type": "integer", "minimum": 1},
    "entropy_bound": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
    "t_min": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
    "t_max": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
    "stability_threshold": {"type": "integer", "minimum": 1},
    "confidence_threshold": {"type": "number", "minimum": 0},
    "confidence": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
    "sampler": {"type": "string", "enum": ["entropy_bound", "confidence"]},
    "ignore_eos": {"type": "boolean"},
    "drafts": {"type": "boolean", "description": "with stream: also send dgemma.draft events"},
}
_COMMON = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
    "seed": {"type": "integer", "minimum": 0, "nullable": True},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}], "nullable": True},
    "stream": {"type": "boolean"},
    **_DIFFUSION,
}


def _post(summary: str, body: dict) -> dict:
    errors = {
        str(code): {"description": text, "content": {"application/json": {"schema": _ERROR}}}
        for code, text in (
            (400, "invalid request (names the field)"),
            (401, "missing or wrong API key"),
            (404, "unknown model"),
            (503, "queue full (Retry-After) or engine stopped"),
            (504, "past --request-timeout"),
        )
    }
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "200": {
                    "description": "the answer, or server-sent events with stream: true",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **errors,
            },
        }
    }


def openapi_schema(model_id: str) -> dict:
    completion = {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            **_COMMON,
            "model": {"type": "string", "example": model_id},
            "prompt": {"type": "string"},
        },
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": {"type": "string"},
        },
    }
    chat = {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            **_COMMON,
            "model": {"type": "string", "example": model_id},
            "messages": {"type": "array", "items": message, "minItems": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        },
    }
    plain = {"200": {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "dgemma",
            "version": "0.1.0",
            "description": "OpenAI-compatible DiffusionGemma server",
        },
        "paths": {
            "/v1/completions": _post("complete a prompt", completion),
            "/v1/chat/completions": _post("answer a conversation", chat),
            "/v1/models": {"get": {"summary": "the served model", "responses": plain}},
            "/health": {
                "get": {"summary": "liveness", "responses": {**plain, "503": {"description": "dead"}}}
            },
        },
    }
