"""The OpenAI API's answers: what a request's engine events add up to, as one JSON object
(``whole``) or as the chunks of a server-sent event stream (``opening``, ``chunks``), for text
completions and for chat completions."""

from __future__ import annotations

import time
import uuid

from strata.data.tokenizer import Tokenizer
from strata.serve.api import ChatRequest, CompletionRequest
from strata.serve.engine import Done, Finish, Token


class Choices:
    """What the events of a request add up to, and the JSON of its answer (whole or in chunks)."""

    object_name = chunk_name = ""
    id_prefix = ""

    def __init__(self, model_name: str, tokenizer: Tokenizer, body, prompt_count: int):
        self.model_name, self.tokenizer, self.body = model_name, tokenizer, body
        self.id, self.created = f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time())
        count = prompt_count * body.n
        self.texts = [""] * count
        self.tokens: list[list[tuple[Token, str]]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.usage_parts: dict[int, Done] = {}

    def index(self, prompt: int, event) -> int:
        return prompt * self.body.n + getattr(event, "choice", 0)

    def take(self, prompt: int, event) -> None:
        index = self.index(prompt, event)
        if isinstance(event, Token):
            self.texts[index] += event.text
            if event.token is not None:
                self.tokens[index].append((event, self.token_text(event.token)))
        elif isinstance(event, Finish):
            self.finish[index] = event.reason
        elif isinstance(event, Done):
            self.usage_parts[prompt] = event

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token]).decode("utf-8", errors="replace")

    def usage(self) -> dict:
        parts = self.usage_parts.values()
        prompt, generated = sum(part.prompt_tokens for part in parts), sum(part.completion_tokens for part in parts)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
                "prompt_tokens_details": {"cached_tokens": sum(part.cached_tokens for part in parts)}}

    def envelope(self, choices: list, usage: dict | None = None, chunk: bool = True) -> dict:
        data = {"id": self.id, "object": self.chunk_name if chunk else self.object_name, "created": self.created,
                "model": self.model_name, "choices": choices}
        if usage is not None or not chunk:
            data["usage"] = usage
        return data

    def whole(self) -> dict:
        choices = [self.choice(index) for index in range(len(self.texts))]
        return self.envelope(choices, usage=self.usage(), chunk=False)

    def opening(self) -> list[dict]:
        return []

    def chunks(self, prompt: int, event) -> list[dict]:
        """The stream's chunks for one event: a choice's new text (``delta``) or its end (``ending``)."""
        index = self.index(prompt, event)
        before = len(self.tokens[index])
        self.take(prompt, event)
        if isinstance(event, Token):
            return [self.envelope([self.delta(index, event, self.tokens[index][before:])])]
        if isinstance(event, Finish):
            return [self.envelope([self.ending(index, event.reason)])]
        return []


class CompletionChoices(Choices):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model_name: str, tokenizer: Tokenizer, body: CompletionRequest, prompts: list[list[int]]):
        super().__init__(model_name, tokenizer, body, len(prompts))

    def logprobs(self, tokens: list[tuple[Token, str]], offset: int) -> dict | None:
        if self.body.logprobs is None:
            return None
        offsets = []
        for _event, text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": [text for _event, text in tokens],
                "token_logprobs": [event.logprob for event, _text in tokens],
                "top_logprobs": [{self.token_text(t): lp for t, lp in event.top_logprobs or []} for event, _text in tokens]
                if self.body.logprobs else None,
                "text_offset": offsets}

    def choice(self, index: int) -> dict:
        return {"index": index, "text": self.texts[index], "logprobs": self.logprobs(self.tokens[index], 0),
                "finish_reason": self.finish[index]}

    def delta(self, index: int, event: Token, new: list[tuple[Token, str]]) -> dict:
        offset = len(self.texts[index]) - len(event.text)
        return {"index": index, "text": event.text, "logprobs": self.logprobs(new, offset), "finish_reason": None}

    def ending(self, index: int, reason: str) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}


class ChatChoices(Choices):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, model_name: str, tokenizer: Tokenizer, body: ChatRequest):
        super().__init__(model_name, tokenizer, body, 1)

    def logprobs(self, tokens: list[tuple[Token, str]]) -> dict | None:
        if not self.body.logprobs:
            return None

        def entry(token: int, logprob: float, text: str) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(self.tokenizer.decode([token]))}

        return {"content": [
            {**entry(event.token, event.logprob, text),
             "top_logprobs": [entry(t, lp, self.token_text(t)) for t, lp in event.top_logprobs or []]}
            for event, text in tokens
        ]}

    def choice(self, index: int) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": self.texts[index]},
                "logprobs": self.logprobs(self.tokens[index]), "finish_reason": self.finish[index]}

    def opening(self) -> list[dict]:
        return [self.envelope([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]) for index in range(len(self.texts))]

    def delta(self, index: int, event: Token, new: list[tuple[Token, str]]) -> dict:
        return {"index": index, "delta": {"content": event.text}, "logprobs": self.logprobs(new), "finish_reason": None}

    def ending(self, index: int, reason: str) -> dict:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
