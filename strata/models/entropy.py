"""The entropy model of AU-Net's ``split: {rule: entropy}`` (BLT's entropy patching, "Byte Latent
Transformer: Patches Scale Better Than Tokens", Pagnoni et al., 2024): a small byte-level language
model whose next-byte entropies place the splits (``strata.data.splitter.EntropySplitter``).

The AU-Net holds it as a frozen submodule, ``model.entropy``: its weights are in the AU-Net's
state dict, so every checkpoint of an AU-Net run carries them, but they take no gradient and no
optimiser state (``requires_grad`` off), and neither the AU-Net's initialisation nor a cast of
its dtype touches them. Until the trainer copies a trained byte model in (``strata.train.entropy``)
or a checkpoint loads, the weights are zeros: every byte scores log2(vocab) bits.

Scoring. The levels are part of the data: the trainer computes them once for the training stream,
generation one byte at a time, and both must agree bit for bit. So every window is scored the same
way, whoever asks and on whatever device the AU-Net is: one forward of shape [1, 1 + window] (BOS,
the window's bytes, padding after them, which a causal model cannot let reach them), on the CPU,
in one thread, in float64, by a copy of the weights that is refreshed whenever they change.
"""

from __future__ import annotations

import hashlib
import math
import threading

import numpy as np
import torch
from torch import nn

from strata.config import AUNetConfig, ModelConfig
from strata.data.splitter import Splitter, make_splitter
from strata.data.tokenizer import ByteTokenizer
from strata.models.lm import LanguageModel

PAD_BYTE = 0  # after a window's bytes: never read by them
_ONE_THREAD = threading.Lock()  # scorers in several threads do not undo each other's one-thread setting


class EntropyModel(nn.Module):
    """A frozen byte-level ``LanguageModel`` (``lm``) that scores windows of ``window`` bytes."""

    def __init__(self, config: ModelConfig, window: int):
        super().__init__()
        self.window = window
        with torch.random.fork_rng(devices=_cuda_devices()):  # draws nothing the AU-Net would have drawn
            self.lm = LanguageModel(config)
        self.lm.requires_grad_(False)
        self.reset_parameters()
        # (the weights' key, their CPU float64 copy): a plain dict, so the copy is no submodule.
        self._scoring: dict = {}

    def reset_parameters(self) -> None:
        """Zeros: a placeholder until trained weights come (runs last in ``init_weights``'s order,
        after the language model's own initialisation)."""
        with torch.no_grad():
            for parameter in self.lm.parameters():
                parameter.zero_()

    def _apply(self, fn, recurse=True):
        """Device moves apply, dtype casts do not: the weights stay as trained (float32), so the
        float64 copy that scores is the same whatever dtype the AU-Net runs in."""

        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(device=moved.device)

        return super()._apply(keep_dtype, recurse)

    def splitter(self, config: AUNetConfig) -> Splitter:
        """The entropy rule's splitter for ``config`` (``split.thresholds``, ``margin``, ``window``),
        scoring with this model."""
        return make_splitter(**config.splitter_settings(), score=self.score, identity=self.fingerprint)

    def fingerprint(self) -> str:
        """A digest of the scorer: the byte model's architecture and its weights as they are now
        (the entropies of large texts are kept on disk under it, ``strata.data.entropy_store``)."""
        return self._scoring_copy_and_digest()[1]

    @torch.no_grad()
    def score(self, window: bytes) -> np.ndarray:
        """H_i, in bits, of every byte of ``window`` (at most ``self.window`` of them): the entropy
        of the model's distribution of the token after byte i, given BOS and the window's bytes up
        to i. Float64, one fixed-shape forward (module docstring)."""
        if len(window) > self.window:
            raise ValueError(f"a window holds at most {self.window} bytes; got {len(window)}")
        tokens = torch.full((1, self.window + 1), PAD_BYTE, dtype=torch.long)
        tokens[0, 0] = ByteTokenizer.bos_id
        tokens[0, 1 : len(window) + 1] = torch.tensor(list(window), dtype=torch.long)
        scorer = self._scoring_copy_and_digest()[0]
        with _ONE_THREAD:  # the same sums whatever threads the process runs (and faster at this size)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                log_p = torch.log_softmax(scorer(tokens)[0, 1 : len(window) + 1], dim=-1)
                entropies = -(log_p.exp() * log_p).sum(-1) / math.log(2)
            finally:
                torch.set_num_threads(threads)
        return entropies.numpy()

    def _scoring_copy_and_digest(self) -> tuple[LanguageModel, str]:
        """A CPU float64 copy of ``lm`` and ``fingerprint``, both made again when the weights were
        replaced or changed."""
        state = self.lm.state_dict()
        # Inference tensors (weights loaded under torch.inference_mode) count no versions.
        key = tuple((tensor.device, tensor.data_ptr(), -1 if tensor.is_inference() else tensor._version)
                    for tensor in state.values())
        if self._scoring.get("key") != key:
            with torch.inference_mode(False), torch.device("cpu"), torch.random.fork_rng(devices=[]):
                scorer = LanguageModel(self.lm.config).double().eval()
                weights = {name: tensor.detach().to("cpu", torch.float64) for name, tensor in state.items()}
                scorer.load_state_dict(weights)
            # torch's version too: another one may round the float64 sums differently.
            digest = hashlib.sha256(f"torch {torch.__version__} {self.lm.config.model_dump_json()}".encode())
            for name, tensor in weights.items():
                digest.update(name.encode())
                digest.update(tensor.contiguous().numpy().tobytes())
            self._scoring.update(key=key, scorer=scorer, digest=digest.hexdigest())
        return self._scoring["scorer"], self._scoring["digest"]


def _cuda_devices() -> list[int]:
    """The CUDA device a module built now would draw on, for ``fork_rng``."""
    device = torch.empty(0).device
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
