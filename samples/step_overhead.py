"""Where the host time of an ort-static decode step goes on CUDA (docs/results.md): wall clock per step,
over many steps, of the captured graph's replay alone; of a greedy loop that takes each step's token to the host
(a loop that streams without overlap); of the same loop with the token fed back on the device, the host never
waiting (as `kvexport bench` and the engine run it), from the caller's stream and from the decoder's own; and of
two ways to put the argmax next to the replay (on the decoder's stream, and inside the captured graph).

    python samples/step_overhead.py EXPORT_DIR BATCH CONTEXT
"""

import sys
import time

import torch

from kvexport.runtime import ExportedModel
from kvexport.runtime.static_cache import StaticCacheDecoder

STEPS = 300


def per_step_ms(step) -> float:
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1e3 / STEPS


if __name__ == "__main__":
    directory, batch, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    decoder = StaticCacheDecoder(ExportedModel.load(directory), "cuda", max_batch=batch, max_length=context,
                                 cuda_graph=True)
    decoder.random_cache(batch, context - 2, torch.Generator("cuda").manual_seed(0))
    lengths = torch.full((batch,), context - 2, dtype=torch.int32, device="cuda")
    token = torch.zeros(batch, dtype=torch.int64, device="cuda")
    decoder.decode_rows(token, lengths)  # captures the graph of this batch size

    def replay_only():
        with decoder._on_stream():
            decoder._run_decode(batch)

    def host_waits():
        decoder.decode_rows(token.cpu(), lengths).argmax(-1).cpu()

    def device_fed():
        token.copy_(decoder.decode_rows(token, lengths)[:, -1].argmax(-1))

    def device_fed_same_stream():
        with torch.cuda.stream(decoder.stream):
            device_fed()

    def replay_same_stream():
        with torch.cuda.stream(decoder.stream):
            decoder._graphs[batch].replay()

    def replay_argmax_same_stream():
        with torch.cuda.stream(decoder.stream):
            decoder._graphs[batch].replay()
            torch.argmax(decoder.logits[:batch, 0], -1, out=decoder.input_ids[:batch, 0])
            decoder.seqlens[:batch].add_(0)

    greedy = torch.cuda.CUDAGraph()
    with torch.cuda.graph(greedy, stream=decoder.stream, capture_error_mode="relaxed"):
        decoder.session.run_with_iobinding(decoder._decode_binding(batch), decoder._run_options)
        torch.argmax(decoder.logits[:batch, 0], -1, out=decoder.input_ids[:batch, 0])

    def greedy_graph():
        with torch.cuda.stream(decoder.stream):
            greedy.replay()

    results = {"graph replay only": per_step_ms(replay_only),
               "token to the host every step": per_step_ms(host_waits),
               "token fed back on the device": per_step_ms(device_fed),
               "fed back, caller on decoder stream": per_step_ms(device_fed_same_stream),
               "replay, on decoder stream": per_step_ms(replay_same_stream),
               "replay+argmax+add, decoder stream": per_step_ms(replay_argmax_same_stream),
               "graph with argmax inside": per_step_ms(greedy_graph)}
    for name, ms in results.items():
        print(f"{directory} batch {batch} context {context}: {name:36s} {ms:.3f} ms/step")
