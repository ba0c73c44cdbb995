"""Where an AU-Net splits a text (``strata eval RUN --boundaries FILE``): statistics per stage and a
self-contained HTML page that marks every stage's segments on the text.

Reading. The text is read as ``strata eval`` reads documents for an AU-Net: its bytes are cut into
windows of ``context_length - 1`` bytes, and each window is one forward of ``[BOS] + bytes``, so
a window's BOS opens a segment at every stage and the split rule starts afresh after it. The
levels come from ``model.boundary_levels`` alone (a split rule, or the splits a learned router
places), level k >= 1 at a byte meaning a split for stages 2..k+1.

Conventions. A split at byte i means that the stage-k vector there summarises the bytes up to and
including byte i, so a stage-k *segment* is the bytes after the previous stage-k split up to and
including the split byte: the word rule's segments end on the whitespace after each word. Per
stage k = 2..n_stages:

* ``positions``: the text bytes that carry a stage-k split (level >= k - 1). Each window's BOS,
  a split at every stage but not a byte of the text, is not counted.
* ``bytes_per_position``: the text's bytes / ``positions`` (the mean segment length in bytes;
  bytes after a window's last split count too). None when there is no split.
* ``space``, ``punctuation``, ``elsewhere``: the shares of the splits by the byte *at* the split
  (the segment's last byte): ``space`` when it ends a whitespace character (Unicode White_Space:
  space, tab, newline, ...), ``punctuation`` when it ends a punctuation or symbol character
  (Unicode categories P and S), ``elsewhere`` otherwise (letters, digits, marks, controls, an
  undecodable byte, or a byte inside a multi-byte character). None when there is no split.

Page. ``<div id="boundary-text">`` holds the text and nothing else as text: every stage-k segment
is a ``<span class="seg sK" data-stage="K" data-byte="I">`` (I: its split byte), nested inside the
stage-(k+1) segment that holds it; the bytes after a window's last stage-k split, which no stage-k
vector summarises, are a ``<span class="seg sK tail" data-tail="K">``; an empty
``<span class="bos">`` (its label drawn by CSS) starts each window. Newlines stay newlines (a ↵
drawn by CSS, not part of the text). A control character shows in caret form (``^M``, ``^@``;
``<85>`` for C1) and an undecodable byte as U+FFFD (its hex drawn by CSS), each in a span whose
``data-bytes`` holds its bytes in hex. ``<table id="boundary-stats">`` has one ``<tr
id="stage-K">`` per stage, its cells classed by column, each number exact in ``data-value``. No
scripts, no network resources.
"""

from __future__ import annotations

import html
import unicodedata
from pathlib import Path

import numpy as np
import regex
import torch

from strata.config import AUNetConfig
from strata.files import write_atomically

PAGE = "boundaries.html"
CLASSES = ("space", "punctuation", "elsewhere")
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_SPACE = regex.compile(r"\s")
_PUNCTUATION = regex.compile(r"[\p{P}\p{S}]")


def read_boundary_text(run: str | Path, file: str | Path) -> bytes:
    """The bytes of ``file``, after checking, without loading any weights, that ``run`` is an AU-Net
    (``ValueError`` with one line otherwise, or when the file cannot be read or is empty)."""
    from strata.cost.info import runs
    from strata.train.runs import pretrained_config

    model = pretrained_config(run).model
    if not isinstance(model, AUNetConfig):
        raise ValueError(f"--boundaries needs an AU-Net model: {run} is a language model (model.kind {model.kind}, "
                         f"layout {runs(model.layout)})")
    try:
        text = Path(file).read_bytes()
    except OSError as error:
        raise ValueError(f"{file}: cannot read the --boundaries text ({error.strerror or error})") from None
    if not text:
        raise ValueError(f"{file}: the --boundaries text is empty")
    return text


def find_levels(model, tokenizer, text: bytes, batch_size: int = 8) -> np.ndarray:
    """The level of every byte of ``text`` [len(text)], by ``model.boundary_levels`` on windows of
    ``[BOS] + context_length - 1`` bytes (the module docstring)."""
    if not hasattr(model, "boundary_levels"):
        raise ValueError("boundaries need an AU-Net model")
    width = window_bytes(model)
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(text), width):
        ids = tokenizer.encode(text[start : start + width])
        if len(ids) != len(text[start : start + width]):
            raise ValueError("boundaries need a byte-level tokenizer (one id per byte), as AU-Net reads")
        rows.append([tokenizer.bos_id, *np.asarray(ids).tolist()])
    levels = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first = 0
            while first < len(rows):  # batches of windows of one length (only the last window is shorter)
                last = first + 1
                while last < min(len(rows), first + batch_size) and len(rows[last]) == len(rows[first]):
                    last += 1
                tokens = torch.tensor(rows[first:last], dtype=torch.long, device=device)
                levels.extend(model.boundary_levels(tokens)[:, 1:].cpu().numpy())
                first = last
    finally:
        model.train(was_training)
    return np.concatenate(levels).astype(np.int64) if levels else np.zeros(0, np.int64)


def window_bytes(model) -> int:
    return model.config.context_length - 1


def units(text: bytes) -> list[tuple[int, int, str]]:
    """``text`` as (first byte, end byte, character) per character, an undecodable byte being one
    lone surrogate (U+DC80..U+DCFF, Python's ``surrogateescape``)."""
    found, at = [], 0
    for char in text.decode("utf-8", "surrogateescape"):
        size = 1 if 0xDC80 <= ord(char) <= 0xDCFF else len(char.encode("utf-8"))
        found.append((at, at + size, char))
        at += size
    return found


def split_class(byte: int, pieces: list[tuple[int, int, str]], unit_of: np.ndarray) -> str:
    """``space``, ``punctuation`` or ``elsewhere`` for a split at ``byte`` (the module docstring)."""
    _, end, char = pieces[unit_of[byte]]
    if end - 1 != byte:
        return "elsewhere"
    if _SPACE.match(char):
        return "space"
    return "punctuation" if _PUNCTUATION.match(char) else "elsewhere"


def boundary_stats(text: bytes, levels: np.ndarray, n_stages: int) -> list[dict]:
    """Per stage k = 2..n_stages: {"stage", "positions", "bytes_per_position", "space",
    "punctuation", "elsewhere"} (the module docstring)."""
    pieces = units(text)
    unit_of = _unit_of(pieces, len(text))
    stats = []
    for stage in range(2, n_stages + 1):
        splits = np.flatnonzero(levels >= stage - 1)
        counts = dict.fromkeys(CLASSES, 0)
        for byte in splits:
            counts[split_class(int(byte), pieces, unit_of)] += 1
        n = len(splits)
        stats.append({"stage": stage, "positions": n, "bytes_per_position": len(text) / n if n else None,
                      **{name: count / n if n else None for name, count in counts.items()}})
    return stats


def _unit_of(pieces, size: int) -> np.ndarray:
    unit_of = np.zeros(size, dtype=np.int64)
    for index, (first, end, _) in enumerate(pieces):
        unit_of[first:end] = index
    return unit_of


def boundary_html(text: bytes, levels: np.ndarray, n_stages: int, window: int, stats: list[dict],
                  title: str = "") -> str:
    """The page (the module docstring) for ``text`` read in windows of ``window`` bytes."""
    return _PAGE.format(
        title=_escape(title), css=_css(n_stages), legend=_legend(n_stages), rows=_rows(stats),
        summary=_escape(f"{len(text):,} bytes, {-(-len(text) // window):,} window(s) of BOS + {window:,} bytes, "
                        f"{n_stages} stages"),
        text=_text_spans(text, levels, n_stages, window), line=1.6 + 0.3 * (n_stages - 1),
    )


def _text_spans(text: bytes, levels: np.ndarray, n_stages: int, window: int) -> str:
    """The text as nested segment spans: open every stage before each character, close stages
    2..k after a split of level k - 1 (opening them first if two splits fall in one character),
    and close what is open as tails at a window's end."""
    pieces = units(text)
    unit_of = _unit_of(pieces, len(text))
    closes: dict[int, list[int]] = {}
    for byte in np.flatnonzero(levels > 0):
        closes.setdefault(int(unit_of[byte]), []).append(int(byte))
    # The character that ends each window but the last -> the number of the window after it.
    window_ends = {int(unit_of[end - 1]): end // window + 1 for end in range(window, len(text), window)}
    parts: list[str | None] = []
    stack: list[tuple[int, int]] = []  # (stage, index of its opening tag in parts), outermost first

    def open_all() -> None:
        for stage in range(stack[-1][0] - 1 if stack else n_stages, 1, -1):
            parts.append(None)
            stack.append((stage, len(parts) - 1))

    def close(stages: int, byte: int | None) -> None:
        while stack and (byte is None or stack[-1][0] <= stages):
            stage, index = stack.pop()
            parts[index] = (f'<span class="seg s{stage} tail" data-tail="{stage}">' if byte is None else
                            f'<span class="seg s{stage}" data-stage="{stage}" data-byte="{byte}">')
            parts.append("</span>")

    parts.append('<span class="bos" title="window 1: BOS, then its bytes"></span>')
    for index, (_, _, char) in enumerate(pieces):
        open_all()
        parts.append(_char(char))
        for byte in closes.get(index, []):
            open_all()
            close(int(levels[byte]) + 1, byte)
        if index in window_ends:
            close(n_stages, None)
            parts.append(f'<span class="bos" title="window {window_ends[index]}: a new forward, BOS first"></span>')
    close(n_stages, None)
    return "".join(part or "" for part in parts)


def _char(char: str) -> str:
    """One character of the text as HTML (the module docstring)."""
    code = ord(char)
    if char == "\n":
        return '<span class="nl">\n</span>'
    if 0xDC80 <= code <= 0xDCFF:
        byte = code - 0xDC00
        return f'<span class="raw" data-bytes="{byte:02x}" title="undecodable byte 0x{byte:02X}">\ufffd</span>'
    if char != "\t" and unicodedata.category(char) == "Cc":
        shown = f"^{chr(code ^ 0x40)}" if code < 0x20 or code == 0x7F else f"<{code:02X}>"  # ^M, ^?, <85>
        return (f'<span class="ctl" data-bytes="{char.encode().hex()}" title="control character U+{code:04X}">'
                f"{html.escape(shown)}</span>")
    return html.escape(char, quote=False)


def _escape(value: str) -> str:
    """Text for the page from a path or name that may hold undecodable bytes (as surrogates)."""
    return html.escape(value.encode("utf-8", "replace").decode("utf-8"))


def _css(n_stages: int) -> str:
    rules = []
    for stage in range(2, n_stages + 1):
        colour = COLOURS[(stage - 2) % len(COLOURS)]
        rules.append(f".seg.s{stage} {{ border-color: {colour}; padding-bottom: {1 + 5 * (stage - 2)}px; }}")
        rules.append(f".swatch.s{stage} {{ background: {colour}; }}")
    return "\n".join(rules)


def _legend(n_stages: int) -> str:
    items = [f'<li><span class="swatch s{stage}"></span>stage {stage}: a split of level &ge; {stage - 1}</li>'
             for stage in range(2, n_stages + 1)]
    return "".join(items)


def _rows(stats: list[dict]) -> str:
    def cell(name: str, value, shown: str) -> str:
        return f'<td class="{name}" data-value="{"" if value is None else value}">{shown}</td>'

    rows = []
    for row in stats:
        mean = row["bytes_per_position"]
        cells = [f'<th class="stage"><span class="swatch s{row["stage"]}"></span>{row["stage"]}</th>',
                 cell("positions", row["positions"], f"{row['positions']:,}"),
                 cell("bytes-per-position", mean, "&ndash;" if mean is None else f"{mean:.2f}")]
        cells += [cell(name, row[name], "&ndash;" if row[name] is None else f"{100 * row[name]:.1f}&nbsp;%")
                  for name in CLASSES]
        rows.append(f'<tr id="stage-{row["stage"]}">{"".join(cells)}</tr>')
    return "\n".join(rows)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>AU-Net boundaries &ndash; {title}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.3em; margin-bottom: 0.2em; }}
.meta, .note {{ color: #555; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }}
thead th {{ border-bottom: 2px solid #888; }}
th.stage {{ text-align: left; }}
#boundary-legend {{ list-style: none; padding: 0; display: flex; gap: 1.5em; flex-wrap: wrap; }}
.swatch {{ display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: -0.1em; }}
#boundary-text {{ font: 15px/{line:.2f} ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre-wrap;
  overflow-wrap: anywhere; border: 1px solid #ccc; border-radius: 4px; padding: 0.8em 1em; background: #fcfcfa; }}
.seg {{ border-bottom: 2px solid; border-right: 2px solid; margin-right: 1px; }}
.seg.tail {{ border-right: none; border-bottom-style: dashed; margin-right: 0; }}
.seg.s2:hover {{ background: #fff1b8; }}
.nl::before {{ content: "\\21B5"; color: #aaa; }}
.ctl, .raw {{ color: #b00; background: #fde8e8; border-radius: 2px; }}
.raw::after {{ content: attr(data-bytes); font-size: 0.75em; }}
.bos::before {{ content: "BOS"; font: 9px/1 system-ui, sans-serif; color: #fff; background: #999; border-radius: 2px;
  padding: 1px 3px; margin: 0 3px 0 1px; vertical-align: 0.3em; }}
{css}
</style>
</head>
<body>
<h1>Where the AU-Net splits the text</h1>
<p class="meta">{title}<br>{summary}</p>
<table id="boundary-stats">
<thead><tr><th class="stage">stage</th><th>positions</th><th>bytes per position</th><th>on space</th>\
<th>on punctuation</th><th>elsewhere</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>
<p class="note">A stage-k position is a byte where the model pools into stage k; its vector summarises the bytes up
to and including that byte. Each segment is underlined in its stage's colour and ends with a mark after its split byte;
a dashed underline is the end of a window after its last split, which that stage never pools. Positions and bytes
count the text only, not the BOS that opens every window. &ldquo;On space&rdquo; and &ldquo;on punctuation&rdquo;: the
split byte ends a whitespace character, or a punctuation or symbol character; &ldquo;elsewhere&rdquo;: any other
byte.</p>
<ul id="boundary-legend">{legend}</ul>
<div id="boundary-text">{text}</div>
</body>
</html>
"""


def write_boundary_page(trained, text: bytes, out: str | Path, name: str = "") -> dict:
    """Levels, statistics and the page ``out/boundaries.html`` for ``text`` read by ``trained``
    (``strata.train.runs.TrainedModel``); returns {"text", "bytes", "windows", "context_length",
    "stages": boundary_stats(...), "page"}."""
    model = trained.model
    if not isinstance(getattr(model, "config", None), AUNetConfig):
        raise ValueError(f"--boundaries needs an AU-Net model: {trained.checkpoint} is not one")
    levels = find_levels(model, trained.tokenizer, text)
    n_stages, window = model.config.n_stages, window_bytes(model)
    stats = boundary_stats(text, levels, n_stages)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    page = folder / PAGE
    title = f"{name} read by {trained.checkpoint}" if name else str(trained.checkpoint)
    write_atomically(page, boundary_html(text, levels, n_stages, window, stats, title))
    return {"text": name, "bytes": len(text), "windows": -(-len(text) // window),
            "context_length": window + 1, "stages": stats, "page": str(page)}


def print_boundaries(console, result: dict) -> None:
    """The statistics as a terminal table (rich), and where the page is."""
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]boundaries of {escape(result['text'])}: {result['bytes']:,} bytes, {result['windows']:,} "
                  f"window(s) of {result['context_length']:,} tokens[/bold]", highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("stage")
    for column in ("positions", "bytes/position", *(f"on {name}" if name != "elsewhere" else name for name in CLASSES)):
        table.add_column(column, justify="right")
    for row in result["stages"]:
        mean = row["bytes_per_position"]
        table.add_row(str(row["stage"]), f"{row['positions']:,}", "-" if mean is None else f"{mean:.2f}",
                      *("-" if row[name] is None else f"{100 * row[name]:.1f} %" for name in CLASSES))
    console.print(table)
    console.print(f"page: {result['page']}", markup=False, highlight=False, soft_wrap=True)
