"""Multi-query associative recall (MQAR): the synthetic task that separates attention from
state-space mixers (Zoology, Arora et al. 2023).

A sequence shows ``n_pairs`` key-value pairs, then asks for some of the keys again, in a random
order; after each asked key the model must predict the value that was paired with it. Attention
can look the key up at any distance; a recurrent mixer must have stored every pair in its fixed
state, so its recall falls as pairs outnumber what the state holds.

Layout of one example of length T (``k``/``v`` a key and its value, ``_`` the filler id 0)::

    k1 v1 k2 v2 ... kn vn | _ _ k3 v3 _ _ _ _ k1 v1 _ _ ...
    <---- the pairs ----> | <- queries at random even offsets, the rest filler ->

The query region is cut into two-token slots; each query takes a slot chosen uniformly (Zoology
draws the gaps from a power law instead, crowding queries to the front) and is followed by its
value (Zoology leaves filler there), so the query region reads like the pairs repeated, as a text
that mentions a pair again would. The target at a queried key's position is its value; every
other target is ``IGNORE`` (-100, cross-entropy's ignore index).

Ids: 0 is the filler, keys and values come from two disjoint ranges of equal size above it
(``mqar_ids``), so a vocabulary of 256 ids fits a byte-level model (259) unchanged. Keys within an
example are distinct, and so are values (as in Zoology), so each value names one key.

**Recall** is judged among the value ids only: a query counts when the right value has the highest
logit of all values; when t values tie for the highest, it counts 1/t (the expected score of a
random tie-break). So a model with constant logits scores exactly ``chance`` = 1 / (number of value
ids), and a model that has learnt the answer is a value but not which one scores chance too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from strata.data.levels import model_inputs

IGNORE = -100
FILLER = 0
MQAR_VOCAB = 256  # ids the task uses by default: byte ids, which every byte-level model reads


def mqar_ids(vocab_size: int = MQAR_VOCAB) -> tuple[range, range]:
    """(keys, values): two disjoint ranges of equal size above the filler id 0."""
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be at least 3 (filler, one key, one value), got {vocab_size}")
    half = (vocab_size - 1) // 2
    return range(1, 1 + half), range(1 + half, 1 + 2 * half)


def check_mqar(seq_len: int, n_pairs: int, vocab_size: int = MQAR_VOCAB, n_queries: int | None = None) -> None:
    """Raise ValueError, saying what to change, when an MQAR example of these sizes cannot exist."""
    keys, _ = mqar_ids(vocab_size)
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1, got {n_pairs}")
    if n_pairs > len(keys):
        raise ValueError(f"n_pairs ({n_pairs}) exceeds the {len(keys)} distinct keys (and values) that "
                         f"vocab_size {vocab_size} offers; use a larger vocab_size")
    queries = n_pairs if n_queries is None else n_queries
    if not 1 <= queries <= n_pairs:
        raise ValueError(f"n_queries must be between 1 and n_pairs ({n_pairs}), got {queries}")
    slots = (seq_len - 2 * n_pairs) // 2
    if slots < queries:
        raise ValueError(f"seq_len {seq_len} is too short for {n_pairs} pairs and {queries} queries: "
                         f"it needs at least {2 * n_pairs + 2 * queries} tokens")


def make_mqar(n_examples: int, seq_len: int, n_pairs: int, vocab_size: int = MQAR_VOCAB, seed: int = 0,
              n_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_examples`` MQAR sequences: (inputs, targets), both int64 [n_examples, seq_len].

    ``n_queries`` keys (default: all ``n_pairs``) are asked, each once. The same arguments always
    give the same tensors.
    """
    return draw_mqar(np.random.default_rng(seed), n_examples, seq_len, n_pairs, vocab_size, n_queries)


def draw_mqar(rng: np.random.Generator, n_examples: int, seq_len: int, n_pairs: int, vocab_size: int = MQAR_VOCAB,
              n_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_mqar`` drawing from a generator the caller holds (a training stream of batches)."""
    if n_examples < 1:
        raise ValueError(f"n_examples must be at least 1, got {n_examples}")
    check_mqar(seq_len, n_pairs, vocab_size, n_queries)
    queries = n_pairs if n_queries is None else n_queries
    key_ids, value_ids = mqar_ids(vocab_size)
    rows = np.arange(n_examples)[:, None]

    def distinct(count: int, choices: int) -> np.ndarray:
        """[n_examples, count] distinct indices below ``choices`` per row, in random order."""
        return rng.random((n_examples, choices)).argsort(axis=1)[:, :count]

    keys = key_ids.start + distinct(n_pairs, len(key_ids))
    values = value_ids.start + distinct(n_pairs, len(value_ids))
    inputs = np.full((n_examples, seq_len), FILLER, dtype=np.int64)
    inputs[:, 0 : 2 * n_pairs : 2] = keys
    inputs[:, 1 : 2 * n_pairs : 2] = values
    asked = distinct(queries, n_pairs)
    positions = 2 * n_pairs + 2 * distinct(queries, (seq_len - 2 * n_pairs) // 2)
    inputs[rows, positions] = keys[rows, asked]
    inputs[rows, positions + 1] = values[rows, asked]
    targets = np.full_like(inputs, IGNORE)
    targets[rows, positions] = values[rows, asked]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def query_scores(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int = MQAR_VOCAB) -> torch.Tensor:
    """Per query position (``targets != IGNORE``) its recall score in [0, 1] (module docstring):
    1 / t when the right value is among t values tied for the highest logit, else 0."""
    _, value_ids = mqar_ids(vocab_size)
    asked = targets != IGNORE
    values = logits[asked][:, value_ids.start : value_ids.stop].float()
    right = values.gather(1, (targets[asked] - value_ids.start)[:, None])[:, 0]
    best = values.max(dim=1).values
    ties = (values == best[:, None]).sum(dim=1)
    return (right == best).float() / ties


@torch.no_grad()
def score_recall(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 64,
                 vocab_size: int = MQAR_VOCAB) -> torch.Tensor:
    """``query_scores`` of ``model`` on given sequences, all queries in one tensor; in eval mode,
    restoring the training mode afterwards."""
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if model_vocab is not None and model_vocab < vocab_size:
        raise ValueError(f"the task uses ids below {vocab_size} but the model's vocabulary has {model_vocab}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    scores = []
    try:
        for first in range(0, len(inputs), batch_size):
            tokens = inputs[first : first + batch_size].to(device)
            logits = model(tokens, **model_inputs(model, tokens))
            scores.append(query_scores(logits.cpu(), targets[first : first + batch_size], vocab_size))
    finally:
        model.train(was_training)
    return torch.cat(scores)


def asked_pairs(inputs: torch.Tensor, targets: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """For each query (in ``query_scores``' order) the place of its pair among the ``n_pairs``
    pairs at the start of its sequence: 0 for the first pair."""
    rows, positions = torch.nonzero(targets != IGNORE, as_tuple=True)
    keys = inputs[rows, positions]
    return (inputs[rows, 0 : 2 * n_pairs : 2] == keys[:, None]).int().argmax(dim=1)


def evaluate_mqar(model: torch.nn.Module, seq_len: int, n_pairs: int, n_examples: int = 512, seed: int = 1,
                  batch_size: int = 64, vocab_size: int = MQAR_VOCAB) -> dict:
    """``recall`` of ``model`` on ``n_examples`` fresh sequences, ``n`` (queries scored) and
    ``chance`` (1 / number of value ids), with the ``seq_len`` and ``n_pairs`` asked.

    ``recall_by_place`` splits the recall by where the asked pair stands: the queries whose pair is
    in the first, second, third and last quarter of the pairs (None for a quarter that holds no
    pair, with fewer than 4). A model trained with fewer pairs than it is asked about has never
    seen a key in the later places, and may not look there (docs/results.md).

    ``train_mqar`` draws its batches from numpy streams that no integer seed below 2**32 gives,
    so these sequences are new to a model it trained.
    """
    inputs, targets = make_mqar(n_examples, seq_len, n_pairs, vocab_size, seed)
    scores = score_recall(model, inputs, targets, batch_size, vocab_size)
    quarters = asked_pairs(inputs, targets, n_pairs) * 4 // n_pairs
    by_place = [scores[quarters == quarter].mean().item() if (quarters == quarter).any() else None for quarter in range(4)]
    _, value_ids = mqar_ids(vocab_size)
    return {"seq_len": seq_len, "n_pairs": n_pairs, "recall": scores.mean().item(), "n": len(scores),
            "chance": 1 / len(value_ids), "recall_by_place": by_place}


def mqar_grid(model: torch.nn.Module, seq_lens: list[int], pair_counts: list[int], n_examples: int = 512,
              seed: int = 1, batch_size: int = 64, vocab_size: int = MQAR_VOCAB) -> list[dict]:
    """``evaluate_mqar`` at every (sequence length, pair count); combinations that cannot exist
    (too many pairs for the length or the ids, ``check_mqar``) are left out."""
    results = []
    for seq_len in seq_lens:
        for n_pairs in pair_counts:
            try:
                check_mqar(seq_len, n_pairs, vocab_size)
            except ValueError:
                continue
            results.append(evaluate_mqar(model, seq_len, n_pairs, n_examples, seed, batch_size, vocab_size))
    return results


def _series(results: list[dict]) -> dict[tuple[str, int], dict[int, float]]:
    """(family, seq_len) -> {n_pairs: recall}, in the order the rows come."""
    series: dict[tuple[str, int], dict[int, float]] = {}
    for row in results:
        series.setdefault((row.get("family", "model"), row["seq_len"]), {})[row["n_pairs"]] = row["recall"]
    return series


def mqar_markdown(results: list[dict]) -> str:
    """A Markdown table: one row per family and sequence length, one column per pair count,
    recall in percent ('–' where the combination was not evaluated); chance under it; then, for
    rows that have ``recall_by_place``, that split at each family and length's largest pair count."""
    series = _series(results)
    pairs = sorted({row["n_pairs"] for row in results})
    lines = ["| family | seq len | " + " | ".join(f"{n} pairs" for n in pairs) + " |",
             "|---|---:|" + "---:|" * len(pairs)]
    for (family, seq_len), recall in series.items():
        cells = [f"{100 * recall[n]:.1f}" if n in recall else "–" for n in pairs]
        lines.append(f"| {family} | {seq_len} | " + " | ".join(cells) + " |")
    chances = sorted({row["chance"] for row in results})
    if chances:
        lines.append("")
        lines.append("Recall in % of queries; chance " + ", ".join(f"{100 * c:.2f} %" for c in chances) + ".")
    return "\n".join(lines + _place_table(results)) + "\n"


def _place_table(results: list[dict]) -> list[str]:
    """Lines of a table of ``recall_by_place`` at the largest pair count of each family and length
    (none when the results do not have it)."""
    largest: dict[tuple[str, int], dict] = {}
    for row in results:
        key = (row.get("family", "model"), row["seq_len"])
        has_split = row.get("recall_by_place") and row["n_pairs"] >= 4
        if has_split and (key not in largest or row["n_pairs"] >= largest[key]["n_pairs"]):
            largest[key] = row
    if not largest:
        return []
    lines = ["", "By where the asked pair stands (quarters of the pairs, first to last):", "",
             "| family | seq len | pairs | 1st quarter | 2nd | 3rd | 4th |", "|---|---:|---:|---:|---:|---:|---:|"]
    for (family, seq_len), row in largest.items():
        cells = ["–" if recall is None else f"{100 * recall:.1f}" for recall in row["recall_by_place"]]
        lines.append(f"| {family} | {seq_len} | {row['n_pairs']} | " + " | ".join(cells) + " |")
    return lines


def plot_mqar(results: list[dict], path: str | Path) -> Path:
    """A PNG of recall against the number of pairs, one line per family and sequence length
    (solid at the shortest length, dashed beyond it), chance as a dotted line.

    Drawn on a bare ``Figure`` (Agg), not through pyplot, so it needs no display and leaves the
    caller's matplotlib backend alone."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    series = _series(results)
    shortest = min(seq_len for _, seq_len in series)
    families = list(dict.fromkeys(family for family, _ in series))
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.subplots()
    for (family, seq_len), recall in series.items():
        pairs = sorted(recall)
        axes.plot(pairs, [100 * recall[n] for n in pairs], marker="o",
                  linestyle="-" if seq_len == shortest else "--",
                  color=colours[families.index(family) % len(colours)], label=f"{family}, length {seq_len}")
    for chance in sorted({row["chance"] for row in results}):
        axes.axhline(100 * chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({100 * chance:.2g} %)")
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted({row["n_pairs"] for row in results}))
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.set_xlabel("key-value pairs")
    axes.set_ylabel("recall (%)")
    axes.set_ylim(-2, 102)
    axes.set_title("Multi-query associative recall")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path
