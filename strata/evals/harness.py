"""lm-evaluation-harness adapter: any strata model (AU-Net included) as lm_eval's model type ``strata``.

Install the extra (``pip install -e ".[eval]"``), then run lm_eval's own command line through this
module, which registers ``strata`` before handing over::

    python -m strata.evals.harness --model strata --model_args checkpoint=RUN_OR_CKPT \\
        --tasks TASK --include_path DIR [any other lm_eval option]

The wrapper exists because lm_eval 0.4.13 finds models only in its own table: it scans no entry
points, and nothing outside lm_eval runs before ``--model`` is looked up, so the plain ``lm_eval``
command cannot know ``strata``. In Python, importing this module registers it
(``lm_eval.simple_evaluate(model="strata", model_args={"checkpoint": ...}, ...)``), or pass an
instance: ``simple_evaluate(model=StrataLM(model=..., tokenizer=...), ...)``.

The three request types are scored as strata scores them elsewhere:

- ``loglikelihood(context, continuation)``: ``encode(continuation)``, tokenised on its own, is
  scored after ``[BOS] + encode(context)``, exactly as ``strata.evals.multiple_choice`` scores
  ``" " + choice``: all requests go through one prefix tree (``strata.evals.prefix_tree``), so
  every distinct prefix of the (context, continuation) sequences runs once, ``batch_size`` rows a
  forward. A task that asks strata's questions (tests/test_harness.py has winowhy's YAML) with
  ``--batch_size 64`` (strata eval's) gets its log-likelihoods bit for bit, other batch sizes the
  same to rounding. No context is truncated: a model is scored on what it is given, as by strata eval.
- ``loglikelihood_rolling(text)``: ``[BOS] + encode(text)`` cut into windows of the model's context
  (the training ``seq_len``, else ``context_length``) that predict every text token once, as
  lm_eval's own models cut them: the last window, with fewer targets, reads back over text already
  scored so that it too sees a full context. AU-Net levels come from the whole text, as in training.
- ``generate_until(context, gen_kwargs)``: ``strata.generate`` from ``[BOS] + encode(context)``
  with ``until`` as stop strings (cut from the text, as lm_eval expects), ``max_gen_toks``, and
  greedy decoding unless ``do_sample`` asks for ``temperature``/``top_k``/``top_p`` sampling.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# lm_eval registers its own models when it first looks one up in an empty table; strata registered
# first would hide them, so they are registered here first.
import lm_eval.models  # noqa: F401
import numpy as np
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from strata.data.levels import model_levels
from strata.data.tokenizer import Tokenizer
from strata.evals.prefix_tree import score_continuations
from strata.inference.generate import generate
from strata.train.runs import from_pretrained

# Sampling settings of a request's gen_kwargs that strata.generate takes under the same name.
SAMPLING_SETTINGS = ("top_k", "top_p", "repetition_penalty", "seed")


class StrataLM(LM):
    """A strata run, checkpoint or in-memory model behind lm_eval's ``LM`` interface."""

    def __init__(self, checkpoint: str | Path | None = None, device: str | None = None, batch_size: int | str = 8,
                 max_batch_size: int | None = None, max_gen_toks: int = 256, *, model: torch.nn.Module | None = None,
                 tokenizer: Tokenizer | None = None):
        """``checkpoint``: a run directory (its newest checkpoint), a checkpoint directory or a Hugging
        Face model directory (``strata.from_pretrained``), loaded on
        ``device`` (by default, or when CUDA is asked for on a machine without it: CUDA if there is
        one, else the CPU). From Python, ``model`` and its ``tokenizer`` instead, used on the device
        they are on and put in eval mode. ``batch_size``: contexts (loglikelihood), windows
        (rolling) or prompts (generation) per forward. ``max_batch_size`` is taken because lm_eval
        passes it to every model; strata does not search for a batch size, so it is not used.
        """
        super().__init__()
        if checkpoint is not None and model is not None:
            raise ValueError("give the strata model checkpoint= or model=, not both")
        if checkpoint is not None:
            trained = from_pretrained(checkpoint, device=_device(device))
            if trained.tokenizer is None:
                raise ValueError(f"{checkpoint}: has no tokenizer.json; lm_eval needs the model's tokenizer beside it")
            model, tokenizer = trained.model, trained.tokenizer
            self.checkpoint: Path | None = trained.checkpoint
            self.max_length = trained.config.train.seq_len or trained.config.model.context_length
        elif model is None:
            raise ValueError("the strata model needs model_args checkpoint=RUN_DIR_OR_CHECKPOINT")
        elif tokenizer is None:
            raise ValueError("model= needs its tokenizer=")
        else:
            self.checkpoint = None
            self.max_length = model.config.context_length
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = _whole_number(batch_size, "batch_size")
        self.max_gen_toks = _whole_number(max_gen_toks, "max_gen_toks")

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding would produce the continuation)."""
        groups: dict[str, list[int]] = {}  # context -> the requests that continue it, in order
        for index, request in enumerate(requests):
            groups.setdefault(request.args[0], []).append(index)
        contexts = list(groups)
        prompts = [[self.tokenizer.bos_id, *self._encode(context)] for context in contexts]
        continuations = [[self._encode(requests[index].args[1]) for index in groups[context]] for context in contexts]
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        with torch.inference_mode():
            scores = score_continuations(self.model, prompts, continuations, self.tokenizer.pad_id, self._device,
                                         max_rows=self.batch_size)
        for context, group_scores in zip(contexts, scores, strict=True):
            for index, score in zip(groups[context], group_scores, strict=True):
                results[index] = score
                self.cache_hook.add_partial("loglikelihood", requests[index].args, score)
        return results

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """log p(text) of each whole text given BOS, in windows of ``max_length`` (module docstring)."""
        windows = []  # (request, the window's ids, their levels or None, how many of its last ids are targets)
        for index, request in enumerate(requests):
            tokens = np.array([self.tokenizer.bos_id, *self._encode(request.args[0])], dtype=np.int64)
            levels = model_levels(self.model, tokens)
            for start in range(1, len(tokens), self.max_length):
                end = min(start + self.max_length, len(tokens))
                window = slice(max(0, end - 1 - self.max_length), end)
                windows.append((index, tokens[window], None if levels is None else levels[window], end - start))
        totals = [0.0] * len(requests)
        with torch.inference_mode():
            for first in range(0, len(windows), self.batch_size):
                chunk = windows[first : first + self.batch_size]
                for (index, *_), value in zip(chunk, self._score_windows(chunk), strict=True):
                    totals[index] += value
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each context's continuation, cut before the first stop string of its ``until``."""
        groups: dict[str, list[int]] = {}  # requests with the same settings generate together
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        texts = [""] * len(requests)
        for indices in groups.values():
            settings = self._generation_settings(requests[indices[0]].args[1])
            for first in range(0, len(indices), self.batch_size):
                chunk = indices[first : first + self.batch_size]
                prompts = [requests[index].args[0].encode() for index in chunk]
                for index, output in zip(chunk, generate(self.model, prompts, tokenizer=self.tokenizer, **settings),
                                         strict=True):
                    texts[index] = output.text
                    self.cache_hook.add_partial("generate_until", requests[index].args, output.text)
        return texts

    def get_model_info(self) -> dict:
        """What lm_eval records beside the results: which checkpoint made them, and its size."""
        return {"checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "parameters": sum(parameter.numel() for parameter in self.model.parameters())}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text.encode()).tolist()

    def _score_windows(self, windows) -> list[float]:
        """Summed log p of the last ``n`` ids of each (request, ids, levels, n) window, right-padded."""
        width = max(len(ids) for _, ids, _, _ in windows)
        tokens = torch.full((len(windows), width), self.tokenizer.pad_id, dtype=torch.long)
        levels = torch.zeros((len(windows), width), dtype=torch.long)
        for row, (_, ids, window_levels, _) in enumerate(windows):
            tokens[row, : len(ids)] = torch.from_numpy(ids)
            if window_levels is not None:
                levels[row, : len(ids)] = torch.from_numpy(window_levels.astype(np.int64))
        tokens = tokens.to(self._device)
        extra = {"levels": levels[:, :-1].to(self._device)} if windows[0][2] is not None else {}
        log_probs = self.model(tokens[:, :-1], **extra).float().log_softmax(-1)
        log_probs = log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1).double().cpu()
        # Right padding: a causal model's outputs at real positions never see the pads.
        return [log_probs[row, len(ids) - 1 - targets : len(ids) - 1].sum().item()
                for row, (_, ids, _, targets) in enumerate(windows)]

    def _generation_settings(self, gen_kwargs: dict) -> dict:
        """``strata.generate`` keywords for one request's gen_kwargs, normalised as lm_eval's own models do."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0))
        settings = {
            "max_new_tokens": kwargs.pop("max_gen_toks"),
            # The tokenizer's EOS ends generation as a token, so only the task's strings are stops here.
            "stop": handle_stop_sequences(kwargs.pop("until"), eos=None),
            "temperature": temperature if kwargs.pop("do_sample") else 0.0,
        }
        settings.update({name: kwargs.pop(name) for name in SAMPLING_SETTINGS if name in kwargs})
        if kwargs:
            raise ValueError(f"strata cannot generate with {', '.join(sorted(kwargs))}; it takes until, max_gen_toks, "
                             f"do_sample, temperature and {', '.join(SAMPLING_SETTINGS)}")
        return settings


def _whole_number(value: int | str, name: str) -> int:
    """A positive int from an lm_eval argument (the command line passes strings such as "8")."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (number.is_integer() and number >= 1):
        raise ValueError(f"{name} must be a whole number >= 1 for the strata model, got {value!r}"
                         + (" (strata does not search for a batch size)" if str(value).startswith("auto") else ""))
    return int(number)


def _device(name: str | None) -> str:
    """The device to load on. lm_eval's command line asks for cuda:0 unless told otherwise, so a
    CUDA request on a machine without CUDA means the CPU, as for lm_eval's own models."""
    if name is None or (name.startswith("cuda") and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def main() -> None:
    """lm_eval's command line with ``strata`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


# Registered by name rather than by class, so ``python -m strata.evals.harness`` (this file run as
# __main__) and an ordinary import register the same thing instead of two clashing classes.
model_registry.register("strata", target="strata.evals.harness:StrataLM")

if __name__ == "__main__":
    main()
