"""The checkpoint's tokenizer (`tokenizer.json`, through the `tokenizers` library)."""

from __future__ import annotations

from pathlib import Path

from dgemma.errors import CheckpointError


class Tokenizer:
    def __init__(self, backend):
        self._backend = backend

    @classmethod
    def from_checkpoint(cls, directory: Path) -> Tokenizer | None:
        """The tokenizer of a checkpoint, or None when it ships none (token-id prompts still work)."""
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            return None
        from tokenizers import Tokenizer as Backend

        try:
            return cls(Backend.from_file(str(path)))
        except Exception as exc:  # the Rust side raises bare Exceptions
            raise CheckpointError(f"{path}: cannot load tokenizer ({exc})") from None

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """Many texts at once (in parallel threads)."""
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int] | tuple[int, ...], *, skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)
