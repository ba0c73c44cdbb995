"""Hugging Face tokenizer files made by the tests themselves, the way users get theirs: trained with
the ``tokenizers`` library (a Llama-3 style byte-level BPE) and saved with a tokenizer_config.json,
or saved through transformers' ``PreTrainedTokenizerFast.save_pretrained``."""

import json
from pathlib import Path

# Llama 3's pre-tokenizer pattern (its tokenizer.json): unlike GPT-2's it keeps "\n\n" whole.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def llama_like(text: str, vocab_size: int = 1000):
    """A ``tokenizers.Tokenizer`` built as Llama 3's is (split by its pattern, then byte-level BPE),
    with Llama 3's BOS and EOS as special tokens, trained on ``text``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def save_with_config(tokenizer, folder: Path, **names) -> Path:
    """``folder``/tokenizer.json, and a tokenizer_config.json with ``names`` (bos_token=...) if any."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if names:
        (folder / "tokenizer_config.json").write_text(json.dumps(names))
    return folder


def save_with_transformers(tokenizer_file: Path, folder: Path):
    """The file loaded and saved again by transformers, as a Hugging Face model folder holds it;
    returns the transformers tokenizer (an independent reference for ids and specials)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(str(folder))
    return fast
