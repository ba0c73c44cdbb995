"""Chat templates: how a checkpoint turns a conversation into the text its model was tuned on.

The template comes with the tokenizer (``strata.data.chat_files``: ``chat_template.jinja``, or
``chat_template`` in ``tokenizer_config.json``; the turn's end tokens from
``generation_config.json``). It is a Jinja template, rendered here in Jinja's immutable sandbox,
since a template is code that came with a download. The special tokens it spells
(``<|im_start|>``, ``<|eot_id|>``, ...) become those tokens. A checkpoint without a template has
no chat endpoint: the server says so rather than invent a format the model never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from strata.data.tokenizer import HFTokenizer, Tokenizer


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


def chat_template(tokenizer: Tokenizer) -> ChatTemplate | None:
    """The template that came with ``tokenizer`` (``strata.data.chat_files``), or None when none did."""
    chat = getattr(tokenizer, "chat", None)
    if chat is None:
        return None
    return ChatTemplate(chat.template, tokenizer, frozenset(chat.end_tokens), chat.where)
