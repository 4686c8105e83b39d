"""Training data: JSONL records -> canvas-aligned `Example`s.

A line is `{"text": ...}` (continuation: BOS + text + EOS, cut into windows of `max_length`; the target
canvas may start anywhere) or `{"messages": [...]}` (chat SFT: the last message is the assistant's
answer; the conversation before it, rendered by the model's chat template with the generation prompt,
is the prompt and is masked out of the loss) or `{"prompt": ..., "completion": ...}` (plain-text
completion SFT: BOS + prompt + completion + EOS, the prompt masked out of the loss and the canvases
tiling the completion from the prompt's end, as inference places them). Malformed lines are reported
with their line number and skipped, so one bad line does not lose a run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dgemma.errors import DataError, RequestError
from dgemma.text.chat import ChatTemplate
from dgemma.text.tokenizer import Tokenizer
from dgemma.train.objective import Example

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TokenIds:
    bos: int
    eos: int
    stop: tuple[int, ...]  # ids that end an answer (generation_config's EOS list)


def record_examples(
    record: dict,
    *,
    tokenizer: Tokenizer,
    template: ChatTemplate | None,
    ids: TokenIds,
    max_length: int,
    text_ids: list[int] | None = None,
) -> list[Example]:
    """The examples of one record; raises ValueError naming what is wrong with it.

    `text_ids`: the record's text already tokenized (load_examples encodes texts in batches)."""
    if "text" in record:
        text = record["text"]
        if not _is_text(record):
            raise ValueError("'text' must be a non-empty string")
        if text_ids is None:
            text_ids = tokenizer.encode(text, add_special_tokens=False)
        body = [*text_ids, ids.eos]
        window = max_length - 1
        return [
            Example(
                token_ids=(ids.bos, *body[i : i + window]), response_start=1, loss_start=1, random_start=True
            )
            for i in range(0, len(body), window)
        ]
    if "messages" in record:
        return [_chat_example(record["messages"], tokenizer, template, ids, max_length)]
    if "prompt" in record or "completion" in record:
        return [_completion_example(record, tokenizer, ids, max_length)]
    raise ValueError(
        "a record needs a 'text' string, a 'messages' list, or 'prompt' and 'completion' strings"
    )


def _completion_example(record: dict, tokenizer: Tokenizer, ids: TokenIds, max_length: int) -> Example:
    """BOS + prompt + completion + EOS, tokenized as inference sees them (the prompt alone, as
    `LLM.generate` encodes a text prompt; the completion as the tokens that follow it). The canvases tile
    the completion from the prompt's end and both losses skip the prompt."""
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise ValueError(f"'{key}' must be a non-empty string")
    prompt_ids = [ids.bos, *tokenizer.encode(record["prompt"], add_special_tokens=False)]
    completion_ids = tokenizer.encode(record["completion"], add_special_tokens=False)
    token_ids = (*prompt_ids, *completion_ids, ids.eos)
    if len(token_ids) > max_length:
        raise ValueError(f"{len(token_ids)} tokens, longer than max_length {max_length}")
    return Example(token_ids=token_ids, response_start=len(prompt_ids), loss_start=len(prompt_ids))


def _chat_example(messages, tokenizer, template, ids: TokenIds, max_length: int) -> Example:
    if template is None:
        raise ValueError("'messages' records need a chat template, and the model has none")
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("'messages' must list at least one message before the assistant's answer")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") not in ("assistant", "model"):
        raise ValueError("the last message must be the assistant's answer (role 'assistant')")
    try:
        prompt = template.render(messages[:-1], add_generation_prompt=True)
        full = template.render(messages, add_generation_prompt=False)
    except RequestError as exc:
        raise ValueError(str(exc)) from None
    content = last.get("content")
    if not isinstance(content, str) or not content:
        raise ValueError("the assistant's answer must be a non-empty string")
    # The prompt is what the model sees at inference (the generation prompt, e.g. with an empty thought
    # channel); the answer is its text as the template renders it, through the end of the turn.
    at = full.rfind(content)
    if at < 0:
        raise ValueError("the chat template does not render the answer's text")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(full[at:], add_special_tokens=False)
    cut = next((i for i, t in enumerate(answer_ids) if t in ids.stop), None)
    answer_ids = answer_ids[: cut + 1] if cut is not None else [*answer_ids, ids.eos]
    token_ids = (*prompt_ids, *answer_ids)
    if len(token_ids) > max_length:
        raise ValueError(f"{len(token_ids)} tokens, longer than max_length {max_length}")
    start = len(prompt_ids)
    return Example(token_ids=token_ids, response_start=start, loss_start=start)


def load_examples(
    paths: Sequence[Path],
    *,
    tokenizer: Tokenizer,
    template: ChatTemplate | None,
    ids: TokenIds,
    max_length: int,
) -> list[Example]:
    """All examples of the files; bad records are logged with file:line and skipped."""
    examples: list[Example] = []
    bad: list[str] = []
    for path in paths:
        records = list(_read_jsonl(Path(path), bad))
        texts = [i for i, (_, record) in enumerate(records) if _is_text(record)]
        encoded = tokenizer.encode_batch([records[i][1]["text"] for i in texts], add_special_tokens=False)
        text_ids = dict(zip(texts, encoded))
        for i, (number, record) in enumerate(records):
            try:
                examples.extend(
                    record_examples(
                        record,
                        tokenizer=tokenizer,
                        template=template,
                        ids=ids,
                        max_length=max_length,
                        text_ids=text_ids.get(i),
                    )
                )
            except ValueError as exc:
                bad.append(f"{path}:{number}: {exc}")
    for line in bad[:20]:
        logger.warning("skipped %s", line)
    if len(bad) > 20:
        logger.warning("skipped %d more malformed records", len(bad) - 20)
    if not examples:
        detail = f" ({len(bad)} malformed records, first: {bad[0]})" if bad else ""
        raise DataError(f"no usable training examples{detail}")
    return examples


def _is_text(record: dict) -> bool:
    return isinstance(record.get("text"), str) and bool(record["text"])


def _read_jsonl(path: Path, bad: list[str]) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-empty line; a malformed line is noted in `bad`, reading goes on."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror})") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(record, dict):
                bad.append(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                continue
            yield number, record
