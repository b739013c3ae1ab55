"""A character-level Hugging Face tokenizer for the demo task.

One token per character of the task's alphabet, plus the special tokens every part of the
mesh expects from a Hugging Face tokenizer: an EOS (`<|endoftext|>`, which ends every SFT
answer, so sampling stops there) and a pad token. It is built with the `tokenizers` library
and saved with `save_pretrained`, so `AutoTokenizer.from_pretrained(dir)` loads it like any
downloaded checkpoint's tokenizer, without network access.

The decoder fuses tokens with no separator, so `decode(encode(text)) == text` for any text
over the alphabet (a word-level model would otherwise join characters with spaces).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slipstream.demo.task import ALPHABET

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"


def build_char_tokenizer(out_dir: str | Path, alphabet: str = ALPHABET) -> Any:
    """Build, save into `out_dir` and return a `PreTrainedTokenizerFast` over `alphabet`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
    # Characters first (ids 0..len-1), then the special tokens.
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in (EOS_TOKEN, PAD_TOKEN, UNK_TOKEN):
        vocab[tok] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return tokenizer
