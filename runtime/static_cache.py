"""Decoding over preallocated owner-only cache buffers, updated in place: no per-step allocation or cache copy.

All owners' K and V live in one tensor [2 * owners, max_batch, kv_heads, max_length, head_dim], allocated once.
Rows are compact: row b's tokens fill slots 0..n_b - 1, so a row's length is its next token's slot and position,
and rows of different lengths (or requests that joined at different times) share the buffers. One graph and one
session (the weights are on the device once) serve both phases of model_static.onnx. Prefill: the first chunk
(at most prefill_chunk tokens) of up to prefill_batch new prompts runs as one batch, right-padded (on CUDA to a
multiple of 32 tokens, so ONNX Runtime meets few shapes, each of which costs it a kernel plan, and each (batch,
length) shape can be captured as a CUDA graph like a decode step) into staging rows, whose K/V are then copied
into the prompts' own rows; a prompt's further chunks are appended to its row one row at a time.
GroupQueryAttention writes the K/V in place without materializing attention scores, and only each row's last
token's logits are computed. Each decode step runs one token for every row; all its inputs and outputs are bound
to fixed addresses, so the step can be captured as a CUDA graph and replayed. Logits stay on the device.

On CUDA the decoder works on a stream of its own, ordered after the caller's work and before the caller's next
(stream waits, not host waits), and ONNX Runtime does not synchronise at the end of a run. A step's inputs may be
device tensors (a token just sampled on the device), so the host can queue step n+1 while the device runs step n.
With cuda_graph the decoder captures the ONNX Runtime run of each batch size into a torch CUDA graph itself, rather
than using ONNX Runtime's capture, whose replay waits for the graph to finish.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import onnxruntime as ort
import torch

from kvexport.strategies import InputError, KvexportError
from kvexport.strategies import contract as c

from .decoder import Decoder
from .exported import ExportedModel
from .kv_cache import ONNX_ELEMENT_TYPES, TORCH_DTYPES, KVCache
from .ort_session import open_graph


def bind(binding: ort.IOBinding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
    """Bind a contiguous torch tensor by address (no copy)."""
    assert tensor.is_contiguous(), name
    device = "cuda" if tensor.is_cuda else "cpu"
    method = binding.bind_output if output else binding.bind_input
    method(name, device, tensor.device.index or 0, ONNX_ELEMENT_TYPES[tensor.dtype], tuple(tensor.shape),
           tensor.data_ptr())


class StaticKVCache(KVCache):
    """A view of `batch` rows of the decoder's buffers; `values` name the views the graphs read."""

    def __init__(self, decoder: StaticCacheDecoder, batch: int):
        super().__init__(decoder.model.layout)
        self.storage = decoder.storage[:, :batch]  # [2 * owners, batch, kv_heads, max_length, head_dim]
        views = {past: self.storage[j] for j, (past, _) in enumerate(decoder.model.layout.names())}
        self.reset(batch, views)


class StaticCacheDecoder(Decoder):
    def __init__(self, model: ExportedModel, provider: str = "cpu", device_id: int = 0, max_batch: int = 8,
                 cuda_graph: bool = False, max_length: int | None = None, prefill_chunk: int = 512,
                 prefill_batch: int | None = None):
        static = model.manifest["files"].get("static_decode")
        if not static:
            raise KvexportError(f"{model.directory} has no static decode graph (it was exported with --no-static): "
                                "export it again without --no-static")
        if cuda_graph and provider != "cuda":
            raise KvexportError("CUDA graphs need the cuda provider")
        if provider == "cuda" and model.dtype != "float16":
            raise KvexportError(f"the static decode graph runs on CUDA in float16 only (ONNX Runtime's "
                                f"GroupQueryAttention has no {model.dtype} CUDA kernel): export with --dtype float16")
        self.model, self.max_batch = model, max_batch
        self.max_length = max_length or model.facts.max_positions
        if prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        if self.max_length > model.facts.max_positions:
            raise InputError(f"max_length {self.max_length} exceeds the model's {model.facts.max_positions} positions: "
                             f"use at most {model.facts.max_positions}")
        # Batching first prompts pays on CUDA (one launch-bound run instead of several); on the CPU, compute-bound,
        # the padding would cost more than it saves, so they run one at a time there by default.
        prefill_batch = min(prefill_batch or (8 if provider == "cuda" else 1), max_batch)
        if model.layout.dtype in c.CUDA_ONLY_STATIC_CACHES and provider != "cuda":
            raise KvexportError("a float8 cache's static graph runs on CUDA only (ONNX Runtime's CPU "
                                "GroupQueryAttention has no float8 kernel): use --provider cuda on a GPU, the ort "
                                "backend, or an export with --kv-cache int8")
        # A quantized cache's first prompts run after an empty past (total_sequence_length the staging row's length,
        # one slot more than any chunk), not as GroupQueryAttention's "first prompt" (total_sequence_length their
        # width), for which ONNX Runtime's CUDA kernel attends over the new K/V unquantized, where its CPU kernel,
        # the dynamic graph and the reference attend over the codes. ONNX Runtime runs such a prompt for one row at
        # a time.
        self.prompts_after_past = model.layout.quantized
        if self.prompts_after_past:
            prefill_batch = 1
        self.prefill_chunk = min(prefill_chunk, self.max_length - self.prompts_after_past)
        self.prefill_batch = prefill_batch
        self.device = torch.device("cuda", device_id) if provider == "cuda" else torch.device("cpu")
        self.stream = torch.cuda.Stream(self.device) if provider == "cuda" else None
        with self._on_stream():  # the session is made on the decoder's stream, which it keeps
            self.session = open_graph(model, static, provider, device_id)
        layout, owners_kv = model.layout, len(model.layout.names())
        self.kv_dtype = TORCH_DTYPES[layout.dtype]
        self.storage = torch.zeros((owners_kv, max_batch, layout.num_kv_heads, self.max_length, layout.head_dim),
                                   dtype=self.kv_dtype, device=self.device)
        # First prompts are prefilled here, prefill_batch at a time, then copied into their rows.
        self.staging = torch.zeros((owners_kv, prefill_batch, layout.num_kv_heads,
                                    self.prefill_chunk + self.prompts_after_past, layout.head_dim),
                                   dtype=self.kv_dtype, device=self.device)
        # Decode inputs and outputs at fixed addresses. total_sequence_length is read on the host when a step is
        # captured, so it is the constant buffer length; the rows' lengths come from seqlens_k.
        self.input_ids = torch.zeros((max_batch, 1), dtype=torch.int64, device=self.device)
        self.seqlens = torch.zeros(max_batch, dtype=torch.int32, device=self.device)
        # A decode step's logits_index never changes: row b's one token is the step's token b.
        self.decode_index = torch.tensor(c.logits_index([0] * max_batch, 1), dtype=torch.int32, device=self.device)
        self.total_length = torch.tensor([self.max_length], dtype=torch.int32)
        self.logits = torch.zeros((max_batch, 1, model.facts.vocab_size), dtype=torch.float32, device=self.device)
        self.staging_logits = torch.zeros((prefill_batch, 1, model.facts.vocab_size), dtype=torch.float32,
                                          device=self.device)
        self._bindings: dict[int, ort.IOBinding] = {}  # decode, by batch
        self._prefill_bindings: dict[tuple[int, int], tuple] = {}  # first prompts, by (batch, width)
        self._graphs: dict[int | tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._run_options = ort.RunOptions()
        if provider == "cuda":  # the caller's stream waits for the decoder's instead (_on_stream)
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.cuda_graph = cuda_graph

    @contextmanager
    def _on_stream(self) -> Iterator[None]:
        """Work queued inside runs on the decoder's stream, after the caller's work queued before (its inputs) and
        before the caller's work queued after (reading the logits); no host synchronisation."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)

    def bucket(self, size: int) -> int:
        """The run size for `size` rows: on CUDA the power of two at or above it, so that ONNX Runtime, which plans
        attention kernels per shape (80 ms each for cuDNN's on the H100), and the captured graphs meet few shapes;
        on the CPU `size` itself (padding would cost compute there)."""
        return 1 << (size - 1).bit_length() if self.device.type == "cuda" else size

    def prompt_width(self, tokens: int) -> int:
        """The padded length of a batch of first prompts whose longest has `tokens`: on CUDA the multiple of 32 at
        or above it (a power of two would pad a 70-token prompt to 128, and the batch's compute with it), on the
        CPU `tokens` itself."""
        return -(-tokens // 32) * 32 if self.device.type == "cuda" else tokens

    def warm_up(self, max_rows: int | None = None) -> None:
        """Meet every bucketed shape once before serving (CUDA): capture the decode step of each batch size up to
        max_rows and plan each batch of first prompts, so that no request pays for it. Writes the rows' buffers,
        so call it while they are empty."""
        if self.device.type != "cuda":
            return
        for batch in self._buckets(max_rows or self.max_batch, self.bucket):
            self.decode_rows(torch.zeros(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int32))
        for batch in self._buckets(self.prefill_batch, self.bucket):
            for width in self._buckets(self.prefill_chunk, self.prompt_width):
                self.prefill_first(list(range(batch)), [torch.zeros(width, dtype=torch.int64)] * batch)
        torch.cuda.synchronize(self.device)

    @staticmethod
    def _buckets(limit: int, run_size: Callable[[int], int]) -> list[int]:
        """Every run size that sizes 1..limit are padded to."""
        return sorted({min(limit, run_size(size)) for size in range(1, limit + 1)})

    def new_cache(self, batch: int) -> StaticKVCache:
        if batch > self.max_batch:
            raise InputError(f"batch {batch} exceeds the decoder's max_batch {self.max_batch}")
        return StaticKVCache(self, batch)

    def wrap_past(self, tensor: torch.Tensor):
        raise NotImplementedError("the static cache is filled in place, see random_cache")

    def random_cache(self, batch: int, length: int, generator: torch.Generator) -> StaticKVCache:
        cache = self.new_cache(batch)
        written = cache.storage[:, :, :, :length]
        if written.dtype == torch.int8:
            written.random_(-127, 128, generator=generator)
        elif written.dtype == torch.float8_e4m3fn:  # torch draws no float8: float16 draws, one buffer at a time
            for buffer in written:
                buffer.copy_(torch.randn(buffer.shape, generator=generator, device=buffer.device, dtype=torch.float16))
        else:
            written.normal_(generator=generator)
        cache.length = length
        return cache

    def _decode_binding(self, batch: int) -> ort.IOBinding:
        """One binding per batch size, made once: the addresses never change, as CUDA graph replay needs."""
        if batch not in self._bindings:
            self._bindings[batch] = self._binding(self.input_ids[:batch], self.seqlens[:batch],
                                                  self.decode_index[:batch], slice(0, batch), self.logits[:batch])
        return self._bindings[batch]

    def _run_decode(self, batch: int) -> None:
        """One decode run of rows 0..batch-1 on the decoder's stream."""
        self._run(batch, self._decode_binding(batch))

    def _prefill_binding(self, batch: int, width: int) -> tuple[ort.IOBinding, torch.Tensor, torch.Tensor]:
        """The binding of a batch of first prompts of one bucketed shape, made once, with its token buffer and its
        [seqlens_k; logits_index] buffer (one copy fills both) at fixed addresses, so that the run can be captured
        too."""
        if (batch, width) not in self._prefill_bindings:
            ids = torch.zeros((batch, width), dtype=torch.int64, device=self.device)
            rows = torch.zeros((2, batch), dtype=torch.int32, device=self.device)
            # read on the host during the run: kept alive here
            total = torch.tensor([self.staging.shape[3] if self.prompts_after_past else width], dtype=torch.int32)
            binding = self._binding(ids, rows[0], rows[1], slice(0, batch), self.staging_logits[:batch],
                                    self.staging, total)
            self._prefill_bindings[batch, width] = binding, ids, rows, total
        return self._prefill_bindings[batch, width][:3]

    def _run(self, key: int | tuple[int, int], binding: ort.IOBinding) -> None:
        """One run of a binding made once (a decode step's or a prefill shape's) on the decoder's stream: with
        cuda_graph its captured graph (captured at its first run, after two plain runs have sized ONNX Runtime's
        arena and chosen its GEMM algorithms; one launch instead of ONNX Runtime's per-node launches: an uncaptured
        prefill run held the host 6.9 ms on the H100), else a plain run."""
        if not self.cuda_graph:
            self.session.run_with_iobinding(binding, self._run_options)
            return
        if key not in self._graphs:
            for _ in range(2):  # each writes the same K/V at the same slots: the replay below rewrites them
                self.session.run_with_iobinding(binding, self._run_options)
            graph = torch.cuda.CUDAGraph()
            # relaxed: ONNX Runtime may still allocate (from its arena) while capturing; nothing it queues runs yet
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="relaxed"):
                self.session.run_with_iobinding(binding, self._run_options)
            self._graphs[key] = graph
        self._graphs[key].replay()

    def _binding(self, input_ids: torch.Tensor, seqlens: torch.Tensor, logits_index: torch.Tensor, rows: slice,
                 logits: torch.Tensor, storage: torch.Tensor | None = None,
                 total_length: torch.Tensor | None = None) -> ort.IOBinding:
        """rows of `storage` (the decoder's buffers unless given); total_sequence_length is the buffers' length,
        or for a batch of first prompts their padded length (GroupQueryAttention then writes slots 0..)."""
        binding = self.session.io_binding()
        bind(binding, c.INPUT_IDS, input_ids)
        bind(binding, c.SEQLENS_K, seqlens)
        bind(binding, c.LOGITS_INDEX, logits_index)
        bind(binding, c.TOTAL_SEQUENCE_LENGTH, self.total_length if total_length is None else total_length)
        storage = self.storage if storage is None else storage
        buffer = {past: storage[j, rows] for j, (past, _) in enumerate(self.model.layout.names())}
        for past, tensor in buffer.items():
            bind(binding, past, tensor)
        # Every layer's present is its owner's buffer: the attention op writes the new K/V there in place.
        for present, past in c.static_presents(self.model.strategy.kv_source):
            bind(binding, present, buffer[past], output=True)
        bind(binding, c.LOGITS, logits, output=True)
        return binding

    def forward(self, input_ids, attention_mask, position_ids, cache: StaticKVCache,
                logits_to_keep: int = 1) -> torch.Tensor:
        """The last position's logits [batch, 1, vocab] (the static graph computes no others)."""
        seq = input_ids.shape[1]
        if cache.length + seq > self.max_length:
            raise KvexportError(f"the static cache holds {self.max_length} tokens; this step needs "
                                f"{cache.length + seq}: create the decoder with a larger max_length")
        if cache.length == 0:
            return self._prefill(input_ids, attention_mask, cache)
        if seq != 1:
            raise KvexportError("the static graph decodes one token per row after the prefill")
        logits = self.decode_rows(torch.as_tensor(input_ids)[:, 0], torch.as_tensor(position_ids)[:, 0])
        cache.length += 1
        return logits

    def decode_rows(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One token for each of rows 0..batch-1, row b holding lengths[b] tokens (compact rows: its position and
        slot); the logits [batch, 1, vocab], a view valid until the next step. tokens and lengths may be on the
        host or the device (then nothing waits for the host)."""
        batch = len(tokens)
        with self._on_stream():
            self.input_ids[:batch, 0].copy_(tokens, non_blocking=True)
            self.seqlens[:batch].copy_(lengths, non_blocking=True)
            self._run_decode(batch)
        return self.logits[:batch]

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` slots of row `source` into row `target`, after the work queued before."""
        with self._on_stream():
            self.storage[:, target, :, :length].copy_(self.storage[:, source, :, :length])

    def prefill_rows(self, rows: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        """Prefill empty rows with their prompts: each prompt's first chunk batched with others' (prefill_first),
        the rest appended per row. The logits buffer [max_batch, 1, vocab] (each row's last prompt token's)."""
        chunk = self.prefill_chunk
        for begin in range(0, len(rows), self.prefill_batch):
            self.prefill_first(rows[begin:begin + self.prefill_batch],
                               [prompt[:chunk] for prompt in prompts[begin:begin + self.prefill_batch]])
        for row, prompt in zip(rows, prompts):
            if len(prompt) > chunk:
                self.prefill_row(row, prompt[chunk:], cached=chunk)
        return self.logits

    def prefill_first(self, rows: list[int], prompts: list[torch.Tensor]) -> torch.Tensor:
        """The whole prompts (each at most prefill_chunk tokens, at most prefill_batch of them) of empty rows, in
        one run: right-padded (to a bucketed length on CUDA) in the staging rows, whose K/V are then copied into
        the rows; a row's slots past its prompt are never read before its own steps write them. The logits
        buffer, rows' entries set."""
        lengths = [len(prompt) for prompt in prompts]
        if not 0 < len(rows) <= self.prefill_batch or not 0 < min(lengths) <= max(lengths) <= self.prefill_chunk:
            raise KvexportError(f"prefill_first takes 1..{self.prefill_batch} prompts of 1..{self.prefill_chunk} "
                                f"tokens, got {len(rows)} of {lengths} tokens")
        width = min(self.prefill_chunk, self.prompt_width(max(lengths)))
        batch = self.bucket(len(rows))  # unused staging rows run padding
        ids = torch.zeros((batch, width), dtype=torch.int64)
        for index, prompt in enumerate(prompts):
            ids[index, :lengths[index]] = torch.as_tensor(prompt, dtype=torch.int64)
        seqlens = [length - 1 for length in lengths] + [0] * (batch - len(rows))
        # GroupQueryAttention writes and attends over slots 0..seqlens_k of a row: a first prompt's own length; a
        # prompt after an empty past, its whole padded width (causal attention keeps the padding, which follows the
        # prompt, out of its tokens, and the padding's slots are not copied)
        written = [width - 1] * batch if self.prompts_after_past else seqlens
        binding, ids_buffer, rows_buffer = self._prefill_binding(batch, width)
        with self._on_stream():
            ids_buffer.copy_(ids, non_blocking=True)
            rows_buffer.copy_(torch.tensor([written, c.logits_index(seqlens, width)], dtype=torch.int32),
                              non_blocking=True)
            self._run((batch, width), binding)
            for index, (row, length) in enumerate(zip(rows, lengths)):
                self.storage[:, row, :, :length].copy_(self.staging[:, index, :, :length])
                self.logits[row].copy_(self.staging_logits[index])
        return self.logits

    def prefill_row(self, row: int, tokens: torch.Tensor, cached: int = 0) -> torch.Tensor:
        """Append `tokens` to row `row`, which holds `cached` tokens, in chunks; the last token's logits [1, 1,
        vocab] (a view of the decoder's logits buffer, valid until the next step)."""
        with self._on_stream():
            tokens = torch.as_tensor(tokens, dtype=torch.int64).to(self.device, non_blocking=True)
            for begin in range(0, len(tokens), self.prefill_chunk):
                chunk = tokens[begin:begin + self.prefill_chunk].view(1, -1)
                seqlens = [cached + begin + chunk.shape[1] - 1]
                lengths = torch.tensor([seqlens, c.logits_index(seqlens, chunk.shape[1])], dtype=torch.int32).to(
                    self.device, non_blocking=True)
                binding = self._binding(chunk, lengths[0], lengths[1], slice(row, row + 1), self.logits[row:row + 1])
                self.session.run_with_iobinding(binding, self._run_options)
        return self.logits[row:row + 1]

    def _prefill(self, input_ids, attention_mask, cache: StaticKVCache) -> torch.Tensor:
        ids, mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
        rows = list(range(ids.shape[0]))  # compact rows: the left padding is not fed
        self.prefill_rows(rows, [ids[row][mask[row] == 1] for row in rows])
        cache.length = ids.shape[1]
        return self.logits[:ids.shape[0]]
