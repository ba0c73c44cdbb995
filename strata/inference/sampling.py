"""Plain autoregressive sampling: a full forward pass per new token (caches come later)."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the ``top_k`` most likely tokens and the smallest set whose probability reaches ``top_p``."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first one always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt: list[int],
    max_new: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    context_length: int | None = None,
    stop_ids: set[int] | None = None,
) -> list[int]:
    """New token ids after ``prompt``; temperature 0 is greedy. The model sees at most
    ``context_length`` trailing tokens."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    tokens = list(prompt)
    new: list[int] = []
    for _ in range(max_new):
        window = tokens[-context_length:] if context_length else tokens
        logits = model(torch.tensor([window], device=device))[0, -1].float()
        if temperature <= 0:
            next_id = int(logits.argmax())
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            next_id = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if stop_ids and next_id in stop_ids:
            break
        tokens.append(next_id)
        new.append(next_id)
    model.train(was_training)
    return new
