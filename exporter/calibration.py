"""Calibration text through the PyTorch reference: per-layer K/V and the scores a strategy search needs."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from kvexport.models import DEFAULT_MODEL, HELDOUT_FILE, shipped_directory
from kvexport.strategies import KvexportError, Strategy, no_sharing

from .loading import LoadedModel
from .reference import CPU, LayerInputs, ReferenceDecoder, tensor_float32_on


def read_text(path: str | Path | None) -> str:
    """A text file, or by default the held-out text shipped with the default model."""
    file = Path(path) if path else shipped_directory(DEFAULT_MODEL) / HELDOUT_FILE
    if not file.is_file():
        raise KvexportError(f"text file {file} does not exist: pass --calib/--text with a UTF-8 text file")
    return file.read_text(encoding="utf-8")


def token_windows(tokenizer, text: str, count: int, length: int, from_end: bool = False) -> torch.Tensor:
    """`count` consecutive windows of `length` tokens: all the same length, so no padding is involved.

    Calibration takes them from the start of the text and evaluation from the end, so the two never overlap
    on the shipped held-out text.
    """
    ids = tokenizer(text, verbose=False)["input_ids"]  # a long text is the point, not a mistake
    needed = count * length
    if len(ids) < needed:
        raise KvexportError(f"the text has {len(ids)} tokens but {count} windows of {length} need {needed}: "
                            "give a longer text or fewer/shorter windows")
    chosen = ids[len(ids) - needed:] if from_end else ids[:needed]
    return torch.tensor(chosen, dtype=torch.long).view(count, length)


def next_token_stats(logits: torch.Tensor, windows: torch.Tensor) -> tuple[float, float]:
    """(mean negative log-likelihood, next-token accuracy) of logits [n, s, vocab] for windows [n, s]."""
    predicted, targets = logits[:, :-1].double(), windows[:, 1:]
    nll = F.cross_entropy(predicted.flatten(0, 1), targets.flatten()).item()
    accuracy = (predicted.argmax(-1) == targets).double().mean().item()
    return nll, accuracy


class Calibration:
    """Runs windows through the reference once without sharing, then scores candidate strategies.

    The input of layer i depends only on the sources of layers 0..i-1, so a candidate is run from the deepest layer
    whose input an earlier run with the same sources before it has left in a cache: a search's candidates differ
    from the strategy they extend in one layer and its users, and run from there. On a GPU the passes use
    TensorFloat-32 products: the scores compare runs made alike."""

    def __init__(self, loaded: LoadedModel, windows: torch.Tensor, dtype: torch.dtype = torch.float32,
                 device: torch.device = CPU):
        self.description = loaded.description_on(device)
        self.device = device
        self.windows, self.dtype = windows.to(device), dtype
        # sources of layers 0..i-1 -> (input of layer i, the caches of the owners before i); least recent first
        self._layer_inputs: OrderedDict[tuple[int, ...], tuple[torch.Tensor, dict]] = OrderedDict()
        self._inputs: LayerInputs | None = None
        self.layer_kv: list = []
        full = self._run(no_sharing(self.description.num_layers), collect_layer_kv=True)
        self.full_hidden = full[0].flatten(1)
        self.full_nll = next_token_stats(full[1], self.windows)[0]

    def _run(self, strategy: Strategy, collect_layer_kv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden state, logits) of the windows under the strategy."""
        reference = ReferenceDecoder(self.description, strategy, self.dtype, self.device)
        layers, sources = self.description.num_layers, strategy.kv_source
        if self._inputs is None:
            ones = torch.ones_like(self.windows)
            self._inputs = reference.prepare(self.windows, ones, torch.arange(self.windows.shape[1]).expand_as(ones))
            self._layer_inputs[()] = (self._inputs.x, {})
        start = next(i for i in range(layers, -1, -1) if sources[:i] in self._layer_inputs)
        for i in range(start + 1):  # the run reused these; its shallower inputs (those kept) serve the next ones
            if sources[:i] in self._layer_inputs:
                self._layer_inputs.move_to_end(sources[:i])
        x, present = self._layer_inputs[sources[:start]]
        present = dict(present)
        layer_kv = {} if collect_layer_kv else None
        with tensor_float32_on(self.device):
            for i in range(start, layers):
                layer = self.description.layers[i]
                context = reference.attention(i, layer, x, self._inputs, present, None, layer_kv)
                x = reference.residual(layer, x, reference.output(layer, context))
                self._layer_inputs[sources[:i + 1]] = (x, dict(present))
            out = reference.finish(x)
        self.description.release()
        while len(self._layer_inputs) > 2 * (layers + 1):  # about two strategies' worth of layer inputs
            self._layer_inputs.popitem(last=False)
        if layer_kv is not None:
            self.layer_kv = [layer_kv[i] for i in range(layers)]
        return out

    def cosine(self, strategy: Strategy) -> float:
        """KVSharer's criterion: cosine similarity of the final hidden states (flattened per sample) with
        and without sharing, averaged over samples."""
        hidden = self._run(strategy)[0].flatten(1)
        return F.cosine_similarity(hidden.double(), self.full_hidden.double(), dim=-1).mean().item()

    def perplexity_retention(self, strategy: Strategy) -> float:
        """full perplexity / candidate perplexity: 1.0 means no loss, 0.8 means 25% higher perplexity."""
        nll = next_token_stats(self._run(strategy)[1], self.windows)[0]
        return math.exp(self.full_nll - nll)
