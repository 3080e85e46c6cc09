"""The strategy: which layer's K/V each layer attends over. File format v1 is defined in docs/design.md."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic
from .contract import KvexportError

STRATEGY_VERSION = 1


class StrategyError(KvexportError):
    """A strategy that cannot be used, with the rule it breaks."""


@dataclass(frozen=True)
class Strategy:
    """`kv_source[i]` is the layer whose keys/values layer i attends over; `kv_source[i] == i` owns a cache."""

    kv_source: tuple[int, ...]
    method: str = "explicit"
    model: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_kv_source(self.kv_source)

    @property
    def num_layers(self) -> int:
        return len(self.kv_source)

    @property
    def owners(self) -> tuple[int, ...]:
        return tuple(i for i, source in enumerate(self.kv_source) if source == i)

    @property
    def shared(self) -> tuple[int, ...]:
        return tuple(i for i, source in enumerate(self.kv_source) if source != i)

    def is_owner(self, layer: int) -> bool:
        return self.kv_source[layer] == layer

    def describe(self) -> str:
        """One line per group: an owner and the layers that reuse its cache."""
        groups = {owner: [i for i, s in enumerate(self.kv_source) if s == owner and i != owner] for owner in self.owners}
        return "\n".join(
            f"layer {owner:>3} owns" + (f", shared by {', '.join(map(str, users))}" if users else "")
            for owner, users in groups.items()
        )

    def check_model(self, num_layers: int, model: str | None = None) -> None:
        """Reject a strategy made for another model."""
        if self.num_layers != num_layers:
            raise StrategyError(
                f"strategy has {self.num_layers} layers but the model has {num_layers}: "
                f"make one for this model with 'kvexport strategy make SPEC --model MODEL -o strategy.json'"
            )
        if self.model and model and model_key(self.model) != model_key(model):
            raise StrategyError(
                f"strategy was made for model '{self.model}', not '{model}': "
                "make one for this model, or delete the strategy's 'model' field to use it anyway"
            )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": STRATEGY_VERSION, "num_layers": self.num_layers,
                                "kv_source": list(self.kv_source), "method": self.method}
        if self.model:
            data["model"] = self.model
        if self.params:
            data["params"] = dict(self.params)
        if self.provenance:
            data["provenance"] = dict(self.provenance)
        return data

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Strategy:
        if not isinstance(data, Mapping):
            raise StrategyError("strategy must be a JSON object with 'version', 'num_layers' and 'kv_source'")
        version = data.get("version")
        if version != STRATEGY_VERSION:
            raise StrategyError(
                f"strategy version {version!r} is not supported: this kvexport reads version {STRATEGY_VERSION}; "
                "set \"version\": 1 or regenerate the file with this kvexport"
            )
        num_layers = data.get("num_layers")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise StrategyError("strategy needs 'num_layers', a positive integer (the model's layer count)")
        has_dense, has_sparse = "kv_source" in data, "share" in data
        if has_dense == has_sparse:
            raise StrategyError("strategy needs exactly one of 'kv_source' (a list, one entry per layer) or 'share'")
        kv_source = data["kv_source"] if has_dense else sparse_to_kv_source(data["share"], num_layers)
        if not isinstance(kv_source, list) or not all(_is_int(s) for s in kv_source):
            raise StrategyError("'kv_source' must be a list of layer indices, one per layer")
        if len(kv_source) != num_layers:
            raise StrategyError(
                f"'kv_source' has {len(kv_source)} entries but 'num_layers' is {num_layers}: give one entry per layer"
            )
        return cls(
            kv_source=tuple(kv_source),
            method=str(data.get("method", "explicit")),
            model=data.get("model"),
            params=dict(data.get("params", {})),
            provenance=dict(data.get("provenance", {})),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sparse_to_kv_source(share: Any, num_layers: int) -> list[int]:
    """Normalise {"5": 2, ...} (layer 5 reuses layer 2) into the dense kv_source list."""
    if not isinstance(share, Mapping):
        raise StrategyError("'share' must be an object mapping a shared layer to its owner, e.g. {\"5\": 2}")
    kv_source = list(range(num_layers))
    for key, source in share.items():
        try:
            layer = int(key)
        except ValueError:
            raise StrategyError(f"'share' key {key!r} is not a layer index") from None
        if not 0 <= layer < num_layers:
            raise StrategyError(f"'share' names layer {layer}, outside 0..{num_layers - 1}")
        if not _is_int(source):
            raise StrategyError(f"'share' value for layer {layer} must be a layer index, got {source!r}")
        kv_source[layer] = source
    return kv_source


def check_kv_source(kv_source: tuple[int, ...]) -> None:
    """The rules a kv_source must satisfy to be exportable in one forward pass."""
    num_layers = len(kv_source)
    if num_layers == 0:
        raise StrategyError("strategy has no layers")
    for layer, source in enumerate(kv_source):
        if not 0 <= source < num_layers:
            raise StrategyError(f"layer {layer} takes K/V from layer {source}, outside 0..{num_layers - 1}")
        if source > layer:
            raise StrategyError(
                f"layer {layer} takes K/V from later layer {source}, which has not computed them yet in the same "
                f"forward pass: a layer may only reuse an earlier layer's cache"
            )
        if kv_source[source] != source:
            raise StrategyError(
                f"layer {layer} takes K/V from layer {source}, which itself reuses layer {kv_source[source]}: "
                f"point layer {layer} at the owner {kv_source[source]} directly (chains are not allowed)"
            )


def model_key(model: str) -> str:
    """A comparable name for a model reference: 'EleutherAI/pythia-160m', a local dir, or an alias."""
    return Path(model.rstrip("/")).name.lower()


def load_strategy(path: str | os.PathLike[str]) -> Strategy:
    file = Path(path)
    if not file.is_file():
        raise StrategyError(f"strategy file {file} does not exist: pass a strategy.json or a spec such as every:2")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise StrategyError(f"strategy file {file} is not valid JSON ({error.msg} at line {error.lineno})") from None
    except UnicodeDecodeError:
        raise StrategyError(f"strategy file {file} is not UTF-8 text: pass a strategy.json") from None
    try:
        return Strategy.from_dict(data)
    except StrategyError as error:
        raise StrategyError(f"{file}: {error}") from None
