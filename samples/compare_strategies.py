"""Compare KV-sharing strategies at equal shared-layer counts on the default model (docs/results.md).

KVSharer (dissimilar-first, cosine and perplexity criteria) against the most-similar-first order, every:K and
random strategies, all evaluated on the exported ONNX over held-out windows that calibration never sees.

    python samples/compare_strategies.py --model tiny-neox --output docs/strategy-comparison
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from kvexport.exporter.calibration import Calibration, read_text, token_windows
from kvexport.exporter.evaluate import evaluate, table, write_report
from kvexport.exporter.loading import load_model
from kvexport.exporter.search import SearchSettings, run_search
from kvexport.strategies import every
from kvexport.strategies.kvsharer import random_strategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-neox")
    parser.add_argument("--random", type=int, default=5, help="random strategies per shared-layer count")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--output", type=Path, default=Path("docs/strategy-comparison"))
    args = parser.parse_args()

    loaded = load_model(args.model)
    layers = loaded.config.num_hidden_layers
    text = read_text(None)
    tokenizer = loaded.tokenizer()
    calibration = Calibration(loaded, token_windows(tokenizer, text, 30, 64))
    eval_windows = token_windows(tokenizer, text, args.windows, args.length, from_end=True)

    strategies = {}
    for count in (layers // 4, layers // 2):
        for label, settings in (
            ("kvsharer-cosine", SearchSettings(count, "cosine")),
            ("kvsharer-ppl", SearchSettings(count, "ppl")),
            ("similar-cosine", SearchSettings(count, "cosine", order="similar")),
            ("similar-ppl", SearchSettings(count, "ppl", order="similar")),
        ):
            strategies[f"{label}@{count}"] = run_search(loaded, text, settings, calibration, show_progress=False)
        for group in range(2, layers + 1):  # every:K shares all but one layer of each group of K
            if len(every(group, layers).shared) == count:
                strategies[f"every:{group}@{count}"] = every(group, layers)
        for seed in range(args.random):
            strategies[f"random{seed}@{count}"] = random_strategy(layers, count, seed)

    rows = evaluate(loaded, strategies, eval_windows)
    meta = {"model": loaded.reference, "windows": args.windows, "length": args.length,
            "calibration": "30 x 64 tokens from the start of heldout.txt",
            "strategies": {name: list(s.kv_source) for name, s in strategies.items()}}
    write_report(rows, args.output, meta)
    print(table(rows))
    for count in (layers // 4, layers // 2):
        randoms = [r.perplexity for r in rows if r.name.startswith("random") and r.name.endswith(f"@{count}")]
        print(f"random @{count}: mean perplexity {statistics.mean(randoms):.2f}, "
              f"best {min(randoms):.2f}, worst {max(randoms):.2f}")
    print(json.dumps(meta["strategies"]))


if __name__ == "__main__":
    main()
