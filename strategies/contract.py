"""The contract shared by exporter and runtime: ONNX I/O names, cache layout, artifact file names.

docs/design.md explains it; this module is its single implementation. Anything that names a graph
input or output, or lays out a cache buffer, goes through here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FORMAT_NAME = "kvexport"
FORMAT_VERSION = 5  # 2: GroupQueryAttention static graph, integrity; 3: one weights file, prefill in the static graph;
# 4: the static graph's logits at min(seqlens_k, seq - 1), so first prompts can be batched right-padded;
# 5: the static graph takes those positions as an input (logits_index), one Gather instead of four kernels

MODEL_FILE = "model.onnx"
STATIC_MODEL_FILE = "model_static.onnx"  # optional decode-only graph over fixed-size cache buffers
WEIGHTS_FILE = "model.onnx.data"  # the weights of both graphs (ONNX external data)
MANIFEST_FILE = "kvexport.json"
STRATEGY_FILE = "strategy.json"
ENGINE_FILE = "model.engine"  # TensorRT engine, built next to the ONNX
ENGINE_INFO_FILE = "model.engine.json"  # what the engine was built for (cache key, profiles)

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"  # int64 [1]: logits of the last N positions only; 0: all (as transformers' own)
# Static graph: each row's cache is compact (row b's tokens fill slots 0..n_b - 1), so a row's length is also its
# next token's slot and position. It decodes one token per row, or prefills a chunk of tokens for one row.
SEQLENS_K = "seqlens_k"  # int32 [batch]: tokens cached per row after this step, minus one (as in ORT's GQA)
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 [1], on the host: the buffers' length
LOGITS_INDEX = "logits_index"  # int32 [batch]: each row's logits token, flat in the step's batch * sequence tokens

# Symbolic dimension names used in the graph and in docs/design.md.
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
KEPT = "kept_sequence_length"  # logits' positions: logits_to_keep, or sequence_length when it is 0
CACHE = "cache_length"  # static graph: length of the preallocated buffers


def positions_from_mask(attention_mask):
    """position_ids for a (left-padded) attention mask: count of real tokens before each one, pads at 0.

    Works on numpy arrays and torch tensors alike.
    """
    return (attention_mask.cumsum(-1) - 1).clip(min=0)


def logits_index(seqlens_k, sequence_length: int) -> list[int]:
    """The static graph's logits_index: row b's position min(seqlens_k[b], s - 1) (the last new token, or a
    right-padded first prompt's last real one), as a flat index into the step's batch x s tokens."""
    return [row * sequence_length + min(int(n), sequence_length - 1) for row, n in enumerate(seqlens_k)]


class KvexportError(Exception):
    """An error kvexport reports as one line: what is wrong and how to fix it. The CLI prints it and exits 2;
    the Python API raises one of its subclasses for anything a user can cause."""


class ExportDirectoryError(KvexportError):
    """An export directory that cannot be used as it is: missing, damaged, or from another kvexport version."""


class IntegrityError(ExportDirectoryError):
    """A file of an export differs from what its manifest records (missing, another size, another hash)."""


class ContractMismatchError(ExportDirectoryError):
    """An export whose parts disagree: a graph whose inputs and outputs are not the ones its strategy needs, or a
    strategy.json that is not the manifest's strategy."""


class InputError(KvexportError, ValueError):
    """A request the runtime refuses before running anything: bad prompts, token ids, sampling settings or sizes.
    Also a ValueError, as Python code expects for a bad argument."""


def past_name(layer: int, kind: str) -> str:
    """Graph input holding owner `layer`'s cached keys or values (kind: 'key' | 'value')."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Graph output holding owner `layer`'s keys or values after this step (past + new). The static decode graph
    has one for every layer: a shared layer's is its owner's buffer too (the runtime binds both there)."""
    return f"present.{layer}.{kind}"


KV_KINDS = ("key", "value")


def static_presents(kv_source: tuple[int, ...] | list[int]) -> list[tuple[str, str]]:
    """The static decode graph's (present output, past input it updates) pairs: every layer's present is its
    owner's buffer, which the runtime binds to both."""
    return [(present_name(layer, kind), past_name(owner, kind)) for layer, owner in enumerate(kv_source)
            for kind in KV_KINDS]


def graph_io_names(kv_source: tuple[int, ...], static: bool) -> tuple[list[str], list[str]]:
    """(input names, output names) that the dynamic graph, or the static decode graph, of a strategy has."""
    owners = [i for i, source in enumerate(kv_source) if source == i]
    pasts = [past_name(i, kind) for i in owners for kind in KV_KINDS]
    present_layers = range(len(kv_source)) if static else owners
    presents = [present_name(i, kind) for i in present_layers for kind in KV_KINDS]
    step_inputs = [SEQLENS_K, TOTAL_SEQUENCE_LENGTH, LOGITS_INDEX] if static else [ATTENTION_MASK, POSITION_IDS, LOGITS_TO_KEEP]
    return [INPUT_IDS, *step_inputs, *pasts], [LOGITS, *presents]


CACHE_ELEMENT_BYTES = {"float32": 4, "float16": 2, "int8": 1, "float8_e4m3fn": 1}
# A quantized cache's element types and the range its codes are clipped to: an element is x / scale rounded to the
# type (int8: half to even; float8 E4M3: to nearest), as ONNX Runtime's GroupQueryAttention quantizes.
QUANTIZED_CACHE_LIMITS = {"int8": (-128.0, 127.0), "float8_e4m3fn": (-448.0, 448.0)}
KV_CACHE_ELEMENTS = {"int8": "int8", "fp8": "float8_e4m3fn"}  # --kv-cache's choices and the type each names
# Cache element types whose static graph runs on CUDA only: ONNX Runtime's CPU GroupQueryAttention has no kernel.
CUDA_ONLY_STATIC_CACHES = frozenset({"float8_e4m3fn"})


@dataclass(frozen=True)
class CacheLayout:
    """Shape and size of the cache that one export needs: one K and one V buffer per owner layer.

    Each buffer is [batch, num_kv_heads, sequence, head_dim] in the export's dtype, as in Optimum, or quantized (an
    export made with --kv-cache int8 or fp8: int8 codes of k / scale with one scale per owner, K or V, KV head and
    channel, or float8_e4m3fn codes with one scale per owner for K and V, which the graphs hold; see
    docs/design.md).
    """

    owners: tuple[int, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "float16" | "int8" | "float8_e4m3fn"

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED_CACHE_LIMITS

    @property
    def bytes_per_element(self) -> int:
        return CACHE_ELEMENT_BYTES[self.dtype]

    def bytes_per_token(self, layers: int | None = None) -> int:
        """Cache bytes one token occupies across `layers` cached layers (default: the owners)."""
        count = len(self.owners) if layers is None else layers
        return 2 * count * self.num_kv_heads * self.head_dim * self.bytes_per_element

    @property
    def full_bytes_per_token(self) -> int:
        """What the same model would need with every layer caching its own K/V."""
        return self.bytes_per_token(self.num_layers)

    def buffer_shape(self, batch: int, sequence: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, sequence, self.head_dim)

    def names(self) -> list[tuple[str, str]]:
        """(past input, present output) name pairs, in graph order."""
        return [(past_name(i, k), present_name(i, k)) for i in self.owners for k in KV_KINDS]


@dataclass
class ModelFacts:
    """What the runtime needs to know about an exported model, recorded in kvexport.json."""

    architecture: str
    source: str  # hub id or local directory the export was made from
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)
