"""The chat template that comes with a Hugging Face tokenizer, and the tokens that end a turn.

A checkpoint keeps its template in ``chat_template.jinja`` or under ``chat_template`` in
``tokenizer_config.json`` (a string, or a list of named templates of which "default" is used),
and the tokens that end the assistant's turn besides EOS as ``eos_token_id`` in
``generation_config.json`` (Llama 3's <|eot_id|>, Qwen's <|im_end|>). They travel with the
tokenizer (``HFTokenizer.chat``): every directory it is saved to (a run, a checkpoint converted
either way, a fine-tuned run) serves chat as the original did. Rendering is the server's business
(``strata.serve.chat``); here they are only read and written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from strata.data.errors import DataError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class ChatFiles:
    template: str  # the Jinja source
    end_tokens: tuple[int, ...]  # ids that end a turn besides EOS
    where: Path  # the file the template came from, for errors


def read_chat_files(folder: Path, vocab_size: int) -> ChatFiles | None:
    """The template and end tokens beside a tokenizer in ``folder``; None without a template."""
    folder = Path(folder)
    if (folder / TEMPLATE_FILE).is_file():
        where = folder / TEMPLATE_FILE
        template = where.read_text(encoding="utf-8")
    else:
        where = folder / TOKENIZER_CONFIG
        template = _template_in_config(where) if where.is_file() else None
    if template is None:
        return None
    return ChatFiles(template, _end_tokens(folder / GENERATION_CONFIG, vocab_size), where)


def write_chat_files(folder: Path, chat: ChatFiles) -> None:
    """``chat_template.jinja`` and, when there are end tokens, ``generation_config.json``'s
    ``eos_token_id`` (transformers reads both)."""
    (Path(folder) / TEMPLATE_FILE).write_text(chat.template, encoding="utf-8")
    if chat.end_tokens:
        (Path(folder) / GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": list(chat.end_tokens)}) + "\n")


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: is not a JSON object")
    return data


def _template_in_config(path: Path) -> str | None:
    template = _json_object(path).get("chat_template")
    if isinstance(template, list):  # named templates
        template = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}.get("default")
    if template is not None and not isinstance(template, str):
        raise DataError(f"{path}: chat_template must be a string or a list of named templates")
    return template


def _end_tokens(path: Path, vocab_size: int) -> tuple[int, ...]:
    if not path.is_file():
        return ()
    ends = _json_object(path).get("eos_token_id")
    ends = [ends] if isinstance(ends, int) else ends or []
    return tuple(int(token) for token in ends if isinstance(token, int) and 0 <= token < vocab_size)
