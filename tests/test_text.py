"""Incremental detokenization and stop strings."""

from __future__ import annotations

from dgemma.text.stream import TextStream


def byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_never_split():
    data = "né 日本 🙂!".encode()
    stream = TextStream(byte_decode)
    pieces = [stream.add([b]) for b in data]
    pieces.append(stream.finish())
    assert "".join(pieces) == "né 日本 🙂!"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_across_commits_is_cut_and_never_emitted():
    stream = TextStream(byte_decode, stop=("END",))
    out = stream.add(list(b"hello E"))
    out += stream.add(list(b"ND tail"))
    assert out == "hello "
    assert stream.stopped and stream.text == "hello "
    assert byte_decode(stream.token_ids).startswith("hello E")  # tokens reach the stop string
    assert stream.add(list(b"more")) == "" and stream.finish() == ""


def test_holdback_is_released_at_finish():
    stream = TextStream(byte_decode, stop=("STOP",))
    assert stream.add(list(b"abcdef")) == "abc"
    assert stream.finish() == "def"
    assert stream.text == "abcdef" and not stream.stopped


def test_earliest_of_several_stop_strings_wins():
    stream = TextStream(byte_decode, stop=("zz", "b"))
    assert stream.add(list(b"a b zz")) == "a "
