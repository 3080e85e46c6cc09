"""Plot the uptraining results: held-out perplexity vs KV bytes per token, before and after uptraining.

    python samples/plot_uptrain.py docs/uptrain     # reads eval-before.json and NAME/{eval,kvexport_uptrain}.json
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

folder = Path(sys.argv[1])
before = {row["name"]: row for row in json.loads((folder / "eval-before.json").read_text())["rows"]}
fig, ax = plt.subplots(figsize=(7, 4.5))
for name in sorted(p.name for p in folder.iterdir() if (p / "eval.json").is_file()):
    after = json.loads((folder / name / "eval.json").read_text())["rows"][0]
    start = before["none" if name == "none" else name.replace("every", "every:")]
    x = after["kv_bytes_per_token"]
    ax.annotate("", (x, after["perplexity"]), (x, start["perplexity"]), arrowprops={"arrowstyle": "->", "alpha": 0.5})
    ax.plot([x], [start["perplexity"]], "o", color="tab:red")
    ax.plot([x], [after["perplexity"]], "o", color="tab:green")
    ax.annotate(name, (x, after["perplexity"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
ax.plot([], [], "o", color="tab:red", label="before (training-free sharing)")
ax.plot([], [], "o", color="tab:green", label="after uptraining")
ax.set_xlabel("KV bytes per token (float32 export)")
ax.set_ylabel("held-out perplexity")
ax.set_yscale("log")
ax.set_title("tiny-neox: uptraining with the strategy in force")
ax.legend()
fig.tight_layout()
fig.savefig(folder / "uptrain.png")
print(f"wrote {folder / 'uptrain.png'}")
