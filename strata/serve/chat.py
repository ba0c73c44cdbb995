"""Chat templates: how a checkpoint turns a conversation into the text its model was tuned on.

A Hugging Face checkpoint keeps its template in ``chat_template.jinja`` or under ``chat_template``
in ``tokenizer_config.json`` (a string, or a list of named templates of which "default" is used),
beside the tokenizer. It is a Jinja template, rendered here in Jinja's immutable sandbox, since
a template is code that came with a download. The special tokens it spells (``<|im_start|>``,
``<|eot_id|>``, ...) become those tokens. A checkpoint without a template has no chat endpoint:
the server says so rather than invent a format the model never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from strata.data.tokenizer import HFTokenizer, Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


class TemplateError(ValueError):
    """A template that fails to render the conversation (its own ``raise_exception`` included)."""


class ChatTemplate:
    def __init__(self, source: str, tokenizer: HFTokenizer, end_tokens: frozenset[int], where: Path):
        from jinja2 import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = raise_exception
        try:
            self._template = environment.from_string(source)
        except JinjaError as error:
            raise ValueError(f"{where}: the chat template does not parse: {error}") from None
        self.tokenizer, self.end_tokens, self.where = tokenizer, end_tokens, where

    def encode(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids for ``messages`` (dicts with role and content), ready for the
        assistant's turn; BOS first, as every strata sequence starts."""
        from jinja2 import TemplateError as JinjaError

        bos, eos = (self.tokenizer.specials[0], self.tokenizer.specials[1])
        try:
            text = self._template.render(messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
        except JinjaError as error:
            raise TemplateError(f"the chat template failed on these messages: {error}") from None
        ids = self.tokenizer.encode_with_specials(text)
        if not len(ids) or ids[0] != self.tokenizer.bos_id:
            ids = np.concatenate([[self.tokenizer.bos_id], ids])
        return [int(token) for token in ids]


def load_chat_template(folder: Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The template stored beside the tokenizer in ``folder``, or None when there is none."""
    folder = Path(folder)
    source = None
    if (folder / TEMPLATE_FILE).is_file():
        source = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    elif (folder / TOKENIZER_CONFIG).is_file():
        source = _template_in_config(folder / TOKENIZER_CONFIG)
    if source is None:
        return None
    if not isinstance(tokenizer, HFTokenizer):
        raise ValueError(f"{folder}: has a chat template but a byte tokenizer, which has no special tokens to spell it with")
    return ChatTemplate(source, tokenizer, _end_tokens(folder, tokenizer), folder)


def _template_in_config(path: Path) -> str | None:
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: is not a JSON object") from None
    if isinstance(template, list):  # named templates
        template = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: chat_template must be a string or a list of named templates")
    return template


def _end_tokens(folder: Path, tokenizer: HFTokenizer) -> frozenset[int]:
    """Tokens that end the assistant's turn besides EOS: generation_config.json's eos_token_id
    (Llama 3's <|eot_id|>, Qwen's <|im_end|>)."""
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return frozenset()
    try:
        ends = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: is not a JSON object") from None
    ends = [ends] if isinstance(ends, int) else ends or []
    return frozenset(int(token) for token in ends if isinstance(token, int) and 0 <= token < tokenizer.vocab_size)
