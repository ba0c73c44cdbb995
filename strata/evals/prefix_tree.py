"""Scoring continuations through a prefix tree: every distinct prefix of the scored texts runs once.

Multiple-choice items repeat themselves: an item's choices follow the same prompt, and the items
of a task often share a first sentence (winowhy's reasons all follow one of a few hundred schema
sentences). The sequences ``prompt + continuation`` are put in a radix tree (a node's edge is a
run of tokens on which no two sequences part), and each edge runs once, on a fork of its parent's
cache row, so the tokens run are the tree's, not the sequences' sum.

The tree is walked depth first. The children of a batch of nodes run together as one batch: a
fork of the parent rows (``StackCache.fork``) continued by the child edges, shortest first, with
trailing padding where edges differ in length (``lengths=``), so the rows that continue go on from
their own last token. A cache that cannot hold trailing padding (sliding-window attention, AU-Net)
gets batches whose continuing rows have equal lengths; rows that end a sequence and continue
nothing take any length, since their cache is dropped.

Logits are computed only where a continuation token is predicted: a sequence's prompt tokens are
run for the cache, never scored. A leaf's last token predicts nothing and is not run, so a
one-token continuation costs no forward of its own: its parent's last logits score it.
"""

from __future__ import annotations

import numpy as np
import torch

from strata.inference import model_cache

# An edge this short (in tokens) runs in its children's rows rather than in its own.
SHORT_EDGE = 24
# A batch closes before padding would make it this many times its real tokens, plus this many
# tokens of slack: a forward's fixed cost (about a millisecond on a CPU) is worth some padding.
PADDING_ALLOWANCE = 1.1
SMALL_BATCH_TOKENS = 128


class _Node:
    """An edge of the tree: tokens at positions ``start .. end−1`` of the sequences through it."""

    __slots__ = ("parent", "start", "tokens", "children", "ends_sequence", "scored_from", "log_probs", "greedy")

    def __init__(self, parent: _Node | None, start: int, tokens: list[int]):
        self.parent, self.start, self.tokens = parent, start, tokens
        self.children: list[_Node] = []
        self.ends_sequence = False

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def split(self, position: int) -> _Node:
        """Cut the edge before ``position``; the upper part becomes a new parent of this node."""
        cut = position - self.start
        upper = _Node(self.parent, self.start, self.tokens[:cut])
        upper.children = [self]
        self.parent.children[self.parent.children.index(self)] = upper
        self.parent, self.start, self.tokens = upper, position, self.tokens[cut:]
        return upper

    def merge_into_children(self) -> None:
        """Give each child this edge's tokens and take this node out of the tree."""
        for child in self.children:
            child.parent, child.start, child.tokens = self.parent, self.start, self.tokens + child.tokens
        siblings = self.parent.children
        at = siblings.index(self)
        siblings[at : at + 1] = self.children

    @property
    def fed(self) -> int:
        """Tokens of the edge that run: all when something continues it, else all but the last,
        which predicts nothing."""
        return len(self.tokens) if self.children else len(self.tokens) - 1

    @property
    def runs(self) -> bool:
        """Whether the edge needs a forward: something continues it, or it holds log-probabilities
        past its first token (a parent's last logits score that one)."""
        return self.fed > 0 and (bool(self.children) or self.scored_from < self.end)

    @property
    def needs_last_logits(self) -> bool:
        return any(child.scored_from == child.start for child in self.children)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _build_tree(sequences: list[list[int]]) -> tuple[_Node, list[_Node]]:
    """The radix tree of the sequences (from their sorted order and common prefixes), and the node
    each sequence ends at."""
    root = _Node(None, 0, [])
    ends: list[_Node] = [root] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda index: sequences[index])
    path = [root]  # the nodes from the root to where the previous sequence ended
    previous = np.zeros(0, dtype=np.int64)
    for index in order:
        tokens = np.asarray(sequences[index], dtype=np.int64)
        shared = _common_prefix(previous, tokens)
        while path[-1].start >= shared and len(path) > 1:  # nodes below the branch point
            path.pop()
        node = path[-1]
        if node.end > shared:  # the branch point is inside this edge
            path[-1] = node.split(shared)
            node = path[-1]
        if len(tokens) > shared:
            leaf = _Node(node, shared, sequences[index][shared:])
            node.children.append(leaf)
            path.append(leaf)
            node = leaf
        ends[index] = node
        node.ends_sequence = True
        previous = tokens
    return root, ends


def _merge_short_edges(node: _Node) -> None:
    """Below ``node``, run an edge of at most ``SHORT_EDGE`` tokens in each of its children's rows
    instead of on its own: a level of forks costs more than a few tokens more a row."""
    for child in list(node.children):
        _merge_short_edges(child)
        if child.children and not child.ends_sequence and len(child.tokens) <= SHORT_EDGE:
            child.merge_into_children()


def _mark_scored(root: _Node, ends: list[_Node], prompt_lengths: list[int]) -> None:
    """Room for each node's log-probabilities, and its ``scored_from``: the first position whose
    log-probability a sequence through it reads (its continuation's first token)."""
    pending = [root]
    while pending:
        node = pending.pop()
        node.scored_from = node.end
        node.log_probs, node.greedy = np.zeros(len(node.tokens)), np.ones(len(node.tokens), dtype=bool)
        pending.extend(node.children)
    for node, first in zip(ends, prompt_lengths, strict=True):
        while node is not None and node.end > first:
            node.scored_from = min(node.scored_from, max(first, node.start))
            node = node.parent


def _prepared_tree(prompts: list[list[int]], continuations: list[list[list[int]]]) -> tuple[_Node, list[_Node]]:
    if any(not prompt for prompt in prompts):
        raise ValueError("every prompt needs a token (BOS) to predict its continuation's first token from")
    sequences, prompt_lengths = [], []
    for prompt, group in zip(prompts, continuations, strict=True):
        for continuation in group:
            sequences.append(prompt + continuation)
            prompt_lengths.append(len(prompt))
    root, ends = _build_tree(sequences)
    _merge_short_edges(root)
    _mark_scored(root, ends, prompt_lengths)
    return root, ends


def tokens_run(prompts: list[list[int]], continuations: list[list[list[int]]]) -> int:
    """How many tokens ``score_continuations`` runs (padding aside) for these sequences."""
    root, _ = _prepared_tree(prompts, continuations)
    total, pending = 0, list(root.children)
    while pending:
        node = pending.pop()
        total += node.fed if node.runs else 0
        pending.extend(node.children)
    return total


def score_continuations(model, prompts: list[list[int]], continuations: list[list[list[int]]], pad_id: int,
                        device, max_rows: int = 64, max_tokens: int = 8192) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, greedy) of each continuation of each prompt, through one prefix tree of
    all the sequences; ``greedy`` says whether every continuation token is the model's argmax (lm_eval
    asks for it). A batch holds at most ``max_rows`` rows and ``max_tokens`` tokens (a longer edge
    runs alone). Call under ``torch.inference_mode`` with the model in eval mode.
    """
    root, ends = _prepared_tree(prompts, continuations)
    runner = _Runner(model, pad_id, device, max_rows, max_tokens)
    runner.run(model_cache(model, 1, 0), [(child, 0) for child in root.children])

    scores, taken = [], 0
    for prompt, group in zip(prompts, continuations, strict=True):
        group_scores = []
        for end in ends[taken : taken + len(group)]:
            log_likelihood, greedy, node = 0.0, True, end
            while node is not None and node.end > len(prompt):
                part = slice(max(len(prompt), node.start) - node.start, None)
                log_likelihood += float(node.log_probs[part].sum())
                greedy = greedy and bool(node.greedy[part].all())
                node = node.parent
            group_scores.append((log_likelihood, greedy))
        scores.append(group_scores)
        taken += len(group)
    return scores


class _Runner:
    def __init__(self, model, pad_id: int, device, max_rows: int, max_tokens: int):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.max_rows, self.max_tokens = max_rows, max_tokens

    def run(self, cache, nodes: list[tuple[_Node, int]]) -> None:
        """Run these nodes' edges on forks of their parents' rows of ``cache``, then their children."""
        nodes = sorted((entry for entry in nodes if entry[0].runs), key=lambda entry: entry[0].fed)
        for batch in self._batches(nodes, cache.holds_trailing_padding):
            fork = self._forward(cache, batch)
            self.run(fork, [(child, row) for row, (node, _) in enumerate(batch) for child in node.children])

    def _batches(self, nodes: list[tuple[_Node, int]], ragged: bool):
        """Consecutive runs of ``nodes`` (sorted by length) within the size limits and with little
        padding; without ``ragged`` the rows that continue in a batch all have its length."""
        batch: list[tuple[_Node, int]] = []
        real = 0
        for entry in nodes:
            node = entry[0]
            if batch:
                padded = (len(batch) + 1) * node.fed  # the widest row is the newest (sorted)
                continues = any(member.children for member, _ in batch)
                uneven = not ragged and node.fed != batch[-1][0].fed and continues
                wasteful = padded > PADDING_ALLOWANCE * (real + node.fed) + SMALL_BATCH_TOKENS
                if len(batch) == self.max_rows or padded > self.max_tokens or uneven or wasteful:
                    yield batch
                    batch, real = [], 0
            batch.append(entry)
            real += node.fed
        if batch:
            yield batch

    def _forward(self, cache, batch: list[tuple[_Node, int]]):
        """One forward of the batch's edges; fills their log-probabilities and their children's first."""
        width = batch[-1][0].fed
        tokens = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        logits_at = torch.zeros(len(batch), width, dtype=torch.bool)
        # (node, index in its edge, token, which logits row predicts it); the logits rows come in
        # row-major order of ``logits_at``.
        targets: list[tuple[_Node, int, int, int]] = []
        predicting = 0
        for row, (node, _) in enumerate(batch):
            tokens[row, : node.fed] = torch.tensor(node.tokens[: node.fed])
            # Step k of the edge predicts its token k+1; the last step of a continued edge predicts
            # the children's first tokens.
            for step in range(max(node.scored_from - node.start, 1) - 1, len(node.tokens) - 1):
                logits_at[row, step] = True
                targets.append((node, step + 1, node.tokens[step + 1], predicting))
                predicting += 1
            if node.needs_last_logits:
                logits_at[row, node.fed - 1] = True
                targets.extend((child, 0, child.tokens[0], predicting) for child in node.children)
                predicting += 1
        lengths = None
        if any(node.children and node.fed < width for node, _ in batch):
            lengths = torch.tensor([node.fed for node, _ in batch], device=self.device)
        fork = cache.fork(torch.tensor([row for _, row in batch], device=self.device), room=width)
        logits = self.model(tokens.to(self.device), fork, lengths=lengths, logits_at=logits_at.to(self.device))
        if targets:
            log_probs = logits.float().log_softmax(-1).cpu()
            rows = torch.tensor([target[3] for target in targets])
            wanted = torch.tensor([target[2] for target in targets])
            picked = log_probs[rows, wanted].double().tolist()
            greedy = (log_probs.argmax(-1)[rows] == wanted).tolist()
            for (node, index, _, _), value, is_greedy in zip(targets, picked, greedy, strict=True):
                node.log_probs[index], node.greedy[index] = value, is_greedy
        return fork
