"""One decoder step on ONNX Runtime, CPU or CUDA; on CUDA the cache stays on the device (I/O binding)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from kvexport.strategies import KvexportError
from kvexport.strategies import contract as c

from .decoder import Decoder
from .exported import ExportedModel
from .kv_cache import KVCache

NUMPY_KV = {"float32": np.float32, "float16": np.float16}


class OrtDecoder(Decoder):
    def __init__(self, model: ExportedModel, provider: str = "cpu", device_id: int = 0, threads: int = 0):
        if provider not in ("cpu", "cuda"):
            raise KvexportError(f"provider '{provider}' is not supported: use cpu or cuda")
        if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise KvexportError("ONNX Runtime has no CUDA provider here: pip install 'kvexport[gpu]' "
                                "(onnxruntime-gpu, replacing onnxruntime) on a machine with an NVIDIA GPU")
        self.model, self.provider, self.device_id = model, provider, device_id
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = (["CPUExecutionProvider"] if provider == "cpu"
                     else [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"])
        self.session = ort.InferenceSession(str(model.onnx_path), options, providers=providers)
        self.kv_dtype = NUMPY_KV[model.dtype]

    def new_cache(self, batch: int) -> KVCache:
        cache = KVCache(self.model.layout)
        shape = self.model.layout.buffer_shape(batch, 0)
        empty = {}
        for past, _ in self.model.layout.names():
            array = np.zeros(shape, dtype=self.kv_dtype)
            empty[past] = array if self.provider == "cpu" else ort.OrtValue.ortvalue_from_numpy(
                array, "cuda", self.device_id)
        cache.reset(batch, empty)
        return cache

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: KVCache) -> np.ndarray:
        if self.provider == "cpu":
            feeds = {c.INPUT_IDS: input_ids, c.ATTENTION_MASK: attention_mask, c.POSITION_IDS: position_ids,
                     **cache.values}
            names = [o.name for o in self.session.get_outputs()]
            outputs = dict(zip(names, self.session.run(None, feeds)))
        else:
            outputs = self._step_bound(input_ids, attention_mask, position_ids, cache)
        cache.update(outputs, input_ids.shape[1])
        return outputs[c.LOGITS]

    def _step_bound(self, input_ids, attention_mask, position_ids, cache: KVCache) -> dict:
        binding = self.session.io_binding()
        for name, array in ((c.INPUT_IDS, input_ids), (c.ATTENTION_MASK, attention_mask),
                            (c.POSITION_IDS, position_ids)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for past, value in cache.values.items():
            binding.bind_ortvalue_input(past, value)
        binding.bind_output(c.LOGITS, "cpu")
        presents = [present for _, present in self.model.layout.names()]
        for present in presents:  # ORT allocates them on the device; they become the next pasts as they are
            binding.bind_output(present, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {c.LOGITS: values[0].numpy(), **dict(zip(presents, values[1:]))}
