"""Chat template rendering with jinja2, from the checkpoint (`chat_template.jinja`, or the
`chat_template` field of `tokenizer_config.json`), in a sandbox like transformers' own renderer.

Thinking is off by default; `enable_thinking=True` is passed to the template, which (for Gemma 4) puts
`<|think|>` at the start of the system turn.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from dgemma.errors import CheckpointError, RequestError

ROLES = ("system", "user", "assistant", "model", "tool", "developer")


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "<bos>", eos_token: str = "<eos>"):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise RequestError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(
            value, indent=indent, ensure_ascii=False
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise CheckpointError(f"chat template does not compile: {exc}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_checkpoint(cls, directory: Path) -> ChatTemplate | None:
        directory = Path(directory)
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.exists():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
        tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        tokens = {k: v for k, v in tokens.items() if v}
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.exists():
            return cls(jinja_path.read_text(), **tokens)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        return cls(source, **tokens) if isinstance(source, str) else None

    def render(
        self, messages: list[dict], *, add_generation_prompt: bool = True, enable_thinking: bool = False
    ):
        from jinja2 import TemplateError

        check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise RequestError(f"chat template failed on these messages: {exc}") from None


def check_messages(messages: Any) -> None:
    """Chat messages as OpenAI shapes them; images are refused with a clear message."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise RequestError(f"messages[{i}].role {message['role']!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image", "image_url", "input_image", "video", "audio", "input_audio"):
                    raise RequestError(f"messages[{i}].content[{j}]: {kind} inputs are not supported yet")
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': ...}}")
        elif not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts")


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
