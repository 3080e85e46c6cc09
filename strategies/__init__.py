"""Which layers own a KV cache and which reuse an earlier layer's: the strategy and its contract."""

from .contract import (
    CacheLayout,
    ContractMismatchError,
    ExportDirectoryError,
    InputError,
    IntegrityError,
    KvexportError,
    ModelFacts,
)
from .static import SPEC_HELP, every, make_strategy, no_sharing
from .strategy import Strategy, StrategyError, load_strategy

__all__ = [
    "SPEC_HELP", "CacheLayout", "ContractMismatchError", "ExportDirectoryError", "InputError", "IntegrityError",
    "KvexportError", "ModelFacts", "Strategy", "StrategyError",
    "every", "load_strategy", "make_strategy", "no_sharing",
]
