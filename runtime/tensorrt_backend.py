"""The TensorRT backend: the same Decoder interface and owner-only cache as ONNX Runtime, on an engine.

Inputs and cache buffers are torch CUDA tensors; each step selects the prefill or decode profile, sets the
input shapes, binds device addresses and runs execute_async_v3 on the runtime's stream.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from kvexport.strategies import KvexportError
from kvexport.strategies import contract as c

from .decoder import Decoder
from .exported import ExportedModel
from .kv_cache import TORCH_DTYPES, KVCache
from .tensorrt_support import import_tensorrt, logger


class TensorRTDecoder(Decoder):
    def __init__(self, model: ExportedModel, device_id: int = 0):
        engine_path, info_path = model.directory / c.ENGINE_FILE, model.directory / c.ENGINE_INFO_FILE
        if not engine_path.is_file() or not info_path.is_file():
            raise KvexportError(f"{model.directory} has no TensorRT engine: run 'kvexport build-engine {model.directory}'")
        self.info = json.loads(info_path.read_text())
        trt = import_tensorrt((self.info["tensorrt_module"],))
        self.model, self.device = model, torch.device("cuda", device_id)
        self.engine = trt.Runtime(logger(trt)).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise KvexportError(f"TensorRT could not load {engine_path} on this GPU (it refuses engines built for "
                                "another GPU or version; TensorRT-RTX needs an RTX GPU): rebuild it here")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        self.kv_dtype = TORCH_DTYPES[model.dtype]
        self._placeholder = torch.empty(1, device=self.device)  # an address for zero-size tensors

    def wrap_past(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, self.kv_dtype).contiguous()

    def _address(self, tensor: torch.Tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()

    def forward(self, input_ids, attention_mask, position_ids, cache: KVCache, logits_to_keep: int = 0) -> np.ndarray:
        profile = "prefill" if cache.length == 0 else "decode"
        if profile not in self.info["profile_index"]:
            raise KvexportError(f"the engine has no {profile} profile: rebuild with --profiles prefill,decode")
        self.context.set_optimization_profile_async(self.info["profile_index"][profile], self.stream.cuda_stream)
        inputs = {c.INPUT_IDS: input_ids, c.ATTENTION_MASK: attention_mask, c.POSITION_IDS: position_ids}
        inputs = {name: torch.as_tensor(array, device=self.device) for name, array in inputs.items()}
        inputs.update(cache.values)
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, self._address(tensor))
        keep = np.array([logits_to_keep], dtype=np.int64)  # a shape tensor: TensorRT reads it on the host
        self.context.set_input_shape(c.LOGITS_TO_KEEP, keep.shape)
        self.context.set_tensor_address(c.LOGITS_TO_KEEP, keep.ctypes.data)
        outputs = {}
        for name in [c.LOGITS] + [present for _, present in self.model.layout.names()]:
            dtype = torch.float32 if name == c.LOGITS else self.kv_dtype
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, self._address(outputs[name]))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise KvexportError("TensorRT failed to run the engine (see its messages above)")
        self.stream.synchronize()
        cache.update(outputs, input_ids.shape[1])
        return outputs[c.LOGITS].cpu().numpy()
