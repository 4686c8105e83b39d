"""Incremental detokenization with stop strings: turns committed tokens into text deltas that are never
revised. Holds back a trailing incomplete UTF-8 character (decoded as U+FFFD) and, when stop strings
are set, the last len(longest stop) - 1 characters, until more text or the end proves them final."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the new final text (may be ""). Sets `stopped` when a stop string hits."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        full = self._decode(self.token_ids)
        hit = self._find_stop(full)
        if hit is not None:
            self.stopped = True
            self._trim_tokens_to(hit)
            return self._emit(full[:hit])
        end = len(full)
        while end > 0 and full[end - 1] == REPLACEMENT:
            end -= 1  # trailing bytes of an incomplete character: wait for the rest (finish() flushes)
        return self._emit(full[: max(min(end, len(full) - self._holdback), len(self.text))])

    def finish(self) -> str:
        """No more tokens: release whatever was held back."""
        if self.stopped:
            return ""
        return self._emit(self._decode(self.token_ids))

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text):  # decoding changed earlier text: never revise, emit only growth
            return ""
        delta = upto[len(self.text) :]
        self.text = upto
        return delta

    def _find_stop(self, full: str) -> int | None:
        start = max(0, len(self.text) - self._holdback)
        hits = [i for i in (full.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _trim_tokens_to(self, cut: int) -> None:
        """Keep the fewest tokens whose text reaches the stop string (so token_ids cover the answer)."""
        lo, hi = 0, len(self.token_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(self.token_ids[:mid])) > cut:
                hi = mid
            else:
                lo = mid + 1
        del self.token_ids[lo:]
