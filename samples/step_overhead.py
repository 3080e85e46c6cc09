"""Where the host time of one ort-static decode step goes (CUDA graph replay): wall clock per step of the whole
call, of ONNX Runtime's run alone, of the two input copies alone, and of the run without ONNX Runtime's end-of-run
synchronisation (then a torch synchronise).

    python samples/step_overhead.py EXPORT_DIR BATCH CONTEXT
"""

import sys
import time

import onnxruntime as ort
import torch

from kvexport.runtime import ExportedModel
from kvexport.runtime.static_cache import StaticCacheDecoder

STEPS = 300


def per_step_ms(fn) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(STEPS):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1e3 / STEPS


if __name__ == "__main__":
    directory, batch, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    decoder = StaticCacheDecoder(ExportedModel.load(directory), "cuda", max_batch=batch, max_length=context,
                                 cuda_graph=True)
    decoder.random_cache(batch, context - 2, torch.Generator("cuda").manual_seed(0))
    tokens = torch.zeros(batch, dtype=torch.int64)
    lengths = torch.full((batch,), context - 2, dtype=torch.int32)
    decoder.decode_rows(tokens, lengths)
    binding, options = decoder._decode_binding(batch), decoder._run_options[batch]
    no_sync = ort.RunOptions()
    no_sync.add_run_config_entry("gpu_graph_id", str(batch))
    no_sync.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def copies():
        decoder.input_ids[:batch, 0].copy_(tokens)
        decoder.seqlens[:batch].copy_(lengths)

    def unsynced():
        decoder.session.run_with_iobinding(binding, no_sync)
        torch.cuda.synchronize()

    results = {
        "decode_rows": per_step_ms(lambda: decoder.decode_rows(tokens, lengths)),
        "run only": per_step_ms(lambda: decoder.session.run_with_iobinding(binding, options)),
        "copies only": per_step_ms(copies),
        "run, no ORT sync, then torch sync": per_step_ms(unsynced),
    }
    for name, ms in results.items():
        print(f"{directory} batch {batch} context {context}: {name:36s} {ms:.3f} ms/step")
