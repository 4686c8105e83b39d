"""Training a byte-level BPE tokenizer (`tokenizers`) for a model trained from scratch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    special_tokens: Sequence[str],
    bos_token: str = "<bos>",
    isolate_newlines: bool = True,
):
    """A byte-level BPE tokenizer whose special tokens take the first ids in the order given, and whose
    post-processor puts `bos_token` before every encoded text.

    `isolate_newlines` makes every newline a token of its own. Byte-level BPE would otherwise merge it
    with the next line's indentation ("\\n    "), and a bare "\\n" token would then only appear at the end
    of a file: a prompt ending in a newline would read as "end of file" to a code model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"), byte_level])
        if isolate_newlines
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = list(special_tokens).index(bos_token)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A", special_tokens=[(bos_token, bos_id)]
    )
    return tokenizer
