"""The lm-evaluation-harness adapter: lm_eval's real command line with ``--model strata`` gets the
accuracy ``strata eval`` gets on the same task file, and each request type equals a direct
computation on tiny models, a Transformer and an AU-Net (random weights) alike."""

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from cli_runner import strata, train_tiny
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from strata import build_model, load_config
from strata.data import ByteTokenizer
from strata.data.levels import model_inputs, model_levels
from strata.evals.harness import StrataLM
from strata.evals.multiple_choice import load_task, score_choices

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["transformer", "aunet2"]
LIMIT = 40
# strata's multiple-choice format as an lm_eval task, written as lm_eval's own tasks are: the
# prompt is the input, the choices as listed, and lm_eval's default target_delimiter " " before
# each, so lm_eval scores " " + choice, as strata does, and normalises by the choice alone.
TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: input
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""
# Items where the normalisations pick differently with the tiny run below: symbols and words in
# other scripts, few characters of many bytes each, against ASCII (per character the ASCII choice
# wins, per byte the other); pairs of a short and a long ASCII word, which dividing by the choice
# alone (as lm_eval does) or by the scored text with its space would rank differently; and accents.
WORLD = [
    ("A happy face is", ["🙂", ":)"], 0),
    ("A star is drawn as", ["★", "*"], 0),
    ("A musical note is", ["♪", "#"], 0),
    ("Japan in Japanese is", ["日本", "JP"], 0),
    ("Approval is", ["👍", "+1"], 0),
    ("Love is", ["❤", "<3"], 0),
    ("The cat is", ["on", "under"], 1),
    ("He went", ["up", "upstairs"], 1),
    ("She is", ["in", "inside"], 1),
    ("We go", ["to", "towards"], 1),
    ("The king is", ["old", "ancient"], 1),
    ("The capital of France is", ["Paris", "París", "Парыж"], 0),
    ("The German word for street is", ["Strasse", "Straße", "улица"], 1),
    ("Cafe in French is written", ["cafe", "café", "кафе"], 1),
]


@cache
def tiny(family: str, context_length: int) -> StrataLM:
    torch.manual_seed(0)
    config = load_config(ROOT / f"configs/tiny/{family}.yaml", ["model.init_std=0.1", f"model.context_length={context_length}"])
    return StrataLM(model=build_model(config), tokenizer=ByteTokenizer(), batch_size=3)


def requests(kind: str, *arguments: tuple) -> list[Instance]:
    return [Instance(kind, doc={}, arguments=args, idx=0) for args in arguments]


def full_logits(model, ids: list[int], levels=None) -> torch.Tensor:
    """Logits [T, V] of one plain forward: the reference every cached or batched path must equal."""
    tokens = torch.tensor([ids])
    extra = {"levels": torch.from_numpy(levels[None].astype(np.int64))} if levels is not None else model_inputs(model, tokens)
    with torch.no_grad():
        return model(tokens, **extra)[0].float()


def test_strata_is_a_registered_lm_eval_model():
    assert get_model("strata") is StrataLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm_eval's own models stay known beside it


def test_a_checkpoint_or_a_model_is_required():
    with pytest.raises(ValueError, match="checkpoint="):
        StrataLM()
    with pytest.raises(ValueError, match="batch_size"):
        StrataLM(model=tiny("transformer", 64).model, tokenizer=ByteTokenizer(), batch_size="auto")


@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihood_is_strata_multiple_choice_scoring(family, tasks_dir):
    lm = tiny(family, 1024)
    items = load_task(tasks_dir / "sotu-word-order.jsonl")[:5]  # choices that share a long prefix
    results = lm.loglikelihood(requests("loglikelihood", *[(item.input, " " + choice) for item in items
                                                           for choice in item.choices]))
    expected = score_choices(lm.model, lm.tokenizer, [item.input for item in items], items, max_rows=lm.batch_size)
    assert [ll for ll, _ in results] == [ll for scores in expected for ll in scores]  # bit for bit

    # Against one plain forward per request, with greedy flags: a one-byte continuation that is the
    # argmax after its context is greedy, any other byte is not.
    cases = []
    for context in ["", "The cat", "Once upon", "d", "e", "i"]:
        ids = [lm.tokenizer.bos_id, *context.encode()]
        log_probs = full_logits(lm.model, ids)[-1].log_softmax(-1)
        ascii_order = [token for token in log_probs.argsort(descending=True).tolist() if token < 128]
        cases += [(context, chr(token), log_probs[token].item(), token == log_probs.argmax().item())
                  for token in ascii_order[:2]]
    cases.append(("Two words", " and more", None, False))
    results = lm.loglikelihood(requests("loglikelihood", *[(context, continuation) for context, continuation, _, _ in cases]))
    assert any(greedy for _, _, _, greedy in cases)
    for (context, continuation, log_likelihood, greedy), (got, got_greedy) in zip(cases, results, strict=True):
        prompt = [lm.tokenizer.bos_id, *context.encode()]
        ids = prompt + list(continuation.encode())
        log_probs = full_logits(lm.model, ids)[len(prompt) - 1 : -1].log_softmax(-1)
        targets = torch.tensor(ids[len(prompt) :])
        assert got == pytest.approx(log_probs[torch.arange(len(targets)), targets].sum().item(), abs=1e-4)
        assert got_greedy == bool((log_probs.argmax(-1) == targets).all())
        if log_likelihood is not None:
            assert got == pytest.approx(log_likelihood, abs=1e-4) and got_greedy == greedy


@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihood_rolling_windows_are_lm_eval_windows(family):
    """Text longer than the context: lm_eval's own window helper says which tokens each window
    reads and scores; one plain forward per window (AU-Net levels from the whole document) is the
    reference. Short text is one window: [BOS] + text."""
    lm = tiny(family, 16)
    texts = ["To be, or not to be, that is the question: whether 'tis nobler in the mind", "Short one.", ""]
    results = lm.loglikelihood_rolling(requests("loglikelihood_rolling", *[(text,) for text in texts]))
    for text, got in zip(texts, results, strict=True):
        ids = [lm.tokenizer.bos_id, *text.encode()]
        levels = model_levels(lm.model.config, np.array(ids))
        expected, end = 0.0, 1
        for context, targets in map(make_disjoint_window, get_rolling_token_windows(ids[1:], ids[0], 16, 1)):
            window = context + targets
            end += len(targets)
            start = end - len(window)
            assert ids[start:end] == window
            logits = full_logits(lm.model, window[:-1], None if levels is None else levels[start : end - 1])
            log_probs = logits[-len(targets) :].log_softmax(-1)
            expected += log_probs[torch.arange(len(targets)), torch.tensor(targets)].sum().item()
        assert end == len(ids)  # every text token scored once
        assert got == pytest.approx(expected, abs=1e-3)
    assert results[-1] == 0.0


def greedy_reference(model, context: str, steps: int) -> bytes:
    """Greedy bytes after [BOS] + context, one plain forward per step, up to an EOS."""
    tokenizer = ByteTokenizer()
    ids = [tokenizer.bos_id, *context.encode()]
    new = []
    for _ in range(steps):
        token = int(full_logits(model, ids + new)[-1].argmax())
        if token == tokenizer.eos_id:
            break
        new.append(token)
    return tokenizer.decode(new)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_until_is_greedy_decoding_cut_at_stop_strings(family):
    lm = tiny(family, 1024)
    contexts = ["The quick brown fox", "A", "Hello there, general"]
    references = [greedy_reference(lm.model, context, 12) for context in contexts]
    # A stop string that the greedy text contains: its first ASCII letter after the first byte.
    stops = [next((chr(b) for b in reference[1:] if chr(b).isascii() and chr(b).isalpha()), "\x00")
             for reference in references]
    assert any(stop != "\x00" for stop in stops)
    plain = lm.generate_until(requests("generate_until", *[(context, {"max_gen_toks": 12, "until": []})
                                                           for context in contexts]))
    stopped = lm.generate_until(requests("generate_until", *[(context, {"max_gen_toks": 12, "until": [stop, "\x01"],
                                                                       "do_sample": False})
                                                             for context, stop in zip(contexts, stops, strict=True)]))
    for reference, stop, text, cut in zip(references, stops, plain, stopped, strict=True):
        assert text == reference.decode(errors="replace")
        assert cut == reference.split(stop.encode())[0].decode(errors="replace")
    short = lm.generate_until(requests("generate_until", (contexts[0], {"max_gen_toks": 3})))
    assert short == [references[0][:3].decode(errors="replace")]
    with pytest.raises(ValueError, match="min_p"):
        lm.generate_until(requests("generate_until", (contexts[0], {"min_p": 0.1})))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return train_tiny("transformer", tmp_path_factory.mktemp("harness") / "run")


def test_lm_eval_command_line_matches_strata_eval(run, tasks_dir, tmp_path):
    """The real lm_eval command line (through ``python -m strata.evals.harness``, which registers
    ``strata`` first) on local task YAMLs: the same n, acc, acc_norm (per character) and acc_bytes
    (per byte) as ``strata eval``, on sotu-next-sentence (English prose, four choices of different
    lengths) and on choices in other scripts, where the two normalisations differ. ``--batch_size
    64`` is strata eval's, so the log-likelihoods are the same bit for bit."""
    world = tmp_path / "world.jsonl"
    world.write_text("".join(json.dumps({"input": text, "choices": choices, "gold": gold}, ensure_ascii=False) + "\n"
                             for text, choices, gold in WORLD), encoding="utf-8")
    files = {"sotu-next-sentence": tasks_dir / "sotu-next-sentence.jsonl", "world": world}
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, path in files.items():
        (tasks / f"strata_{name}.yaml").write_text(TASK_YAML.format(name=f"strata_{name}",
                                                                    path=json.dumps(str(path.resolve()))))
    # Offline: datasets' json builder reads the local file; nothing may reach for the hub.
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "strata.evals.harness", "--model", "strata", "--model_args", f"checkpoint={run}",
         "--tasks", "strata_sotu-next-sentence,strata_world", "--include_path", str(tasks), "--limit", str(LIMIT),
         "--batch_size", "64", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    harness = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    ours = json.loads(strata("eval", run, "--tasks", *files.values(), "--limit", LIMIT, "--json").stdout)
    for name, n in (("sotu-next-sentence", LIMIT), ("world", len(WORLD))):
        scores = harness["results"][f"strata_{name}"]
        assert harness["n-samples"][f"strata_{name}"]["effective"] == ours[name]["n"] == n
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert ours[name][metric] == pytest.approx(scores[f"{metric},none"], abs=1e-6), (name, metric)
    # The items tell the two normalisations apart, so a strata acc_norm per byte would fail above.
    assert harness["results"]["strata_world"]["acc_norm,none"] != harness["results"]["strata_world"]["acc_bytes,none"]
