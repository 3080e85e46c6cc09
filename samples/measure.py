"""Run a command and report its wall time, peak host memory (resident, the command and its children) and peak
device memory (the GPU's memory in use, sampled every 0.2 s through nvidia-smi; absent without one), as one JSON
line appended to --log and printed.

    python samples/measure.py --label search-7b --log $OUT/measure.jsonl -- kvexport search --model DIR ...
"""

import argparse
import json
import resource
import subprocess
import sys
import threading
import time


def device_memory_sampler(stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=5, check=False).stdout.split()
            peak[0] = max(peak[0], *(int(value) for value in used))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return
        stop.wait(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=device_memory_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    started = time.perf_counter()
    status = subprocess.run(command, check=False).returncode
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    record = {"label": args.label, "command": " ".join(command), "status": status, "seconds": round(seconds, 1),
              "peak_host_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
              "peak_device_mib": peak[0] or None}
    with open(args.log, "a") as log:
        log.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
