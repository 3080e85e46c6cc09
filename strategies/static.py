"""Static strategies that need no calibration: `none` and `every:K` (MLKV / cross-layer attention style)."""

from __future__ import annotations

from pathlib import Path

from .strategy import Strategy, StrategyError, load_strategy

SPEC_HELP = "'none', 'every:K' (groups of K adjacent layers share the first one's cache) or a strategy.json path"


def no_sharing(num_layers: int, model: str | None = None) -> Strategy:
    return Strategy(kv_source=tuple(range(num_layers)), method="none", model=model)


def every(group_size: int, num_layers: int, model: str | None = None) -> Strategy:
    """Layers [0..K-1] use layer 0's cache, [K..2K-1] layer K's, and so on."""
    if group_size < 1:
        raise StrategyError(f"every:{group_size} needs a group size of at least 1")
    kv_source = tuple(layer - layer % group_size for layer in range(num_layers))
    return Strategy(kv_source=kv_source, method="every", model=model, params={"group_size": group_size})


def make_strategy(spec: str, num_layers: int, model: str | None = None) -> Strategy:
    """Build a static strategy from its spec, or load a strategy file and check it against the model."""
    if spec == "none":
        return no_sharing(num_layers, model)
    if spec.startswith("every:"):
        size = spec.removeprefix("every:")
        if not size.isdigit():
            raise StrategyError(f"'{spec}': the group size after 'every:' must be a positive integer, e.g. every:2")
        return every(int(size), num_layers, model)
    if Path(spec).suffix == ".json" or Path(spec).exists():
        strategy = load_strategy(spec)
        strategy.check_model(num_layers, model)
        return strategy
    raise StrategyError(f"unknown strategy '{spec}': use {SPEC_HELP}")
