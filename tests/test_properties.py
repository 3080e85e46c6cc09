"""Property-based tests (Hypothesis): generated strategies, damaged exports and requests either work correctly or
raise a KvexportError subclass, never another exception or a silently different result. Reproducible
(derandomized: the same examples every run; Hypothesis prints the failing one) and bounded (fixed counts)."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvexport.runtime import Generator, SamplingConfig
from kvexport.strategies import InputError, KvexportError, Strategy


def bounded(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=True) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)


# -- strategies --------------------------------------------------------------------------------------------------
@bounded(400)
@given(st.fixed_dictionaries({}, optional={"version": st.sampled_from([1, 1, 1, 2, "1", None]),
                                           "num_layers": st.integers(-1, 8) | JSON_VALUES,
                                           "kv_source": st.lists(st.integers(-1, 8), max_size=9) | JSON_VALUES,
                                           "share": st.dictionaries(st.text("0123456789x", max_size=2),
                                                                    st.integers(-1, 8)) | JSON_VALUES,
                                           "method": st.text(max_size=5)}))
def test_generated_strategies_validate_or_raise_strategy_errors(data):
    try:
        strategy = Strategy.from_dict(data)
    except KvexportError:
        event("refused")
        return
    event("valid")
    # A strategy that validates satisfies every rule of docs/design.md.
    assert len(strategy.kv_source) == data["num_layers"]
    for layer, source in enumerate(strategy.kv_source):
        assert 0 <= source <= layer and strategy.kv_source[source] == source


# -- damaged exports ---------------------------------------------------------------------------------------------
FILES = ["model.onnx", "kvexport.json", "strategy.json", "tokenizer.json", "tokenizer_config.json", "config.json"]
JSON_FILES = ["kvexport.json", "strategy.json", "tokenizer_config.json", "config.json"]
DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.sampled_from(FILES), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("delete"), st.sampled_from(FILES)),
    st.tuples(st.just("append"), st.sampled_from(FILES), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("swap"), st.sampled_from(FILES)),
    st.tuples(st.just("edit"), st.sampled_from(JSON_FILES), st.lists(st.text(max_size=12), min_size=1, max_size=2),
              JSON_VALUES),
)
PROMPT = [[5, 6, 7, 8], [9, 10]]


@pytest.fixture(scope="module")
def exports(tiny_neox, export_cache):
    good, other = export_cache(tiny_neox, "every:2"), export_cache(tiny_neox, "none")
    expected = Generator(good).generate(PROMPT, SamplingConfig(max_new_tokens=3)).token_ids
    return good, other, expected


def damaged_copy(good: Path, target: Path, file: str) -> Path:
    """The export as hard links (cheap), but the file to damage as a real copy."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in good.iterdir():
        (shutil.copy2 if path.name == file else os.link)(path, target / path.name)
    return target / file


def edit_json(path: Path, keys: list[str], value) -> None:
    data = json.loads(path.read_text())
    node = data
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node[keys[-1]] = value
    path.write_text(json.dumps(data))


def apply(damage, good: Path, other: Path, target: Path) -> None:
    kind, file = damage[0], damage[1]
    path = damaged_copy(good, target, file)
    data = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(data[:int(len(data) * damage[2])])
    elif kind == "flip" and data:
        position = min(len(data) - 1, int(len(data) * damage[2]))
        path.write_bytes(data[:position] + bytes([data[position] ^ (1 << damage[3])]) + data[position + 1:])
    elif kind == "delete":
        path.unlink()
    elif kind == "append":
        path.write_bytes(data + damage[2])
    elif kind == "swap":
        shutil.copy2(other / file, path)
    elif kind == "edit":
        edit_json(path, damage[2], damage[3])


@bounded(500)
@given(damage=DAMAGE)
def test_damaged_exports_are_refused_or_give_the_same_tokens(exports, tmp_path_factory, damage):
    good, other, expected = exports
    target = tmp_path_factory.getbasetemp() / "damaged"
    apply(damage, good, other, target)
    try:
        got = Generator(target, verify=True).generate(PROMPT, SamplingConfig(max_new_tokens=3)).token_ids
    except KvexportError as error:
        event(f"refused: {type(error).__name__}")
        return
    event("ran")
    assert got == expected, damage  # a damage that changed nothing that matters (e.g. an identical file swapped in)


# -- requests ----------------------------------------------------------------------------------------------------
TOKEN = st.one_of(st.integers(0, 8191), st.integers(0, 8191), st.integers(-10, 20000), st.floats(-1, 9000),
                  st.booleans(), st.none(), st.text(max_size=2), st.builds(np.int64, st.integers(0, 8191)))
PROMPTS = st.one_of(
    st.lists(st.lists(TOKEN, max_size=6), max_size=3),
    st.lists(st.lists(st.integers(0, 8191), min_size=1, max_size=6), min_size=1, max_size=3),
    st.lists(st.text(max_size=12), max_size=3),
    st.text(max_size=8), st.none(), st.integers(), st.lists(st.none() | st.integers(), max_size=2),
)
NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 50), st.none(), st.text(max_size=2))
SETTINGS = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(-1, 4) | NUMBER, "temperature": st.floats(0, 2) | NUMBER,
    "top_k": st.integers(-1, 10) | NUMBER, "top_p": st.floats(0, 1) | NUMBER,
    "seed": st.integers(0, 2**31) | NUMBER,
    "stop_token_ids": st.lists(st.integers(-2, 9000), max_size=2) | st.text(max_size=2)})


@pytest.fixture(scope="module")
def generator(tiny_neox, export_cache):
    return Generator(export_cache(tiny_neox, "every:2"))


@bounded(2000)
@given(prompts=PROMPTS, options=SETTINGS)
def test_requests_work_or_raise_input_errors(generator, prompts, options):
    options.setdefault("max_new_tokens", 2)
    try:
        config = SamplingConfig(**options)
        result = generator.generate(prompts, config)
    except InputError:
        event("refused")
        return
    event("ran")
    assert len(result.token_ids) == len(prompts)
    for tokens in result.token_ids:
        assert 1 <= len(tokens) <= config.max_new_tokens and all(0 <= t < 8192 for t in tokens)
    if config.greedy and all(not isinstance(p, str) for p in prompts):
        # A request's greedy tokens do not depend on the others in its batch (stop tokens end rows early).
        for prompt, tokens in zip(prompts, result.token_ids):
            alone = generator.generate([prompt], config).token_ids[0]
            assert tokens == alone[:len(tokens)] or alone == tokens[:len(alone)]
    assert not math.isnan(result.stats.prefill_ms)
