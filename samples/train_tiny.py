"""Train the small models kvexport ships as offline defaults: tiny-neox (GPT-NeoX) and tiny-llama (Llama).

Two steps, because the text lives in a Debian package on the CPU machine and training wants a GPU:

  python samples/train_tiny.py extract --out .train/corpus.jsonl.gz
      Extracts the reStructuredText sources of the Python 3.11 documentation (Debian package
      python3.11-doc, PSF licence) into one gzipped JSON-lines file, one document per line, with the
      train / held-out split fixed here (every 20th document, by sorted path, is held out).

  python samples/train_tiny.py train --corpus .train/corpus.jsonl.gz --out kvexport/models/tiny-neox-pydoc
  python samples/train_tiny.py train --architecture llama --corpus .train/corpus.jsonl.gz \
      --out kvexport/models/tiny-llama-pydoc
      Trains a byte-level BPE tokenizer (8192 tokens) on the training split, then the model (see make_model)
      for a fixed time budget, keeps the checkpoint with the best held-out loss, and writes it in Hugging Face
      format (fp16 safetensors) with the tokenizer and a held-out text sample into --out (the package data
      kvexport ships), and the training log and a loss-curve PNG into --provenance (default
      samples/models/NAME, which stays out of the wheel)."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import subprocess
import tempfile
import time
from pathlib import Path

DOC_PACKAGE = "python3.11-doc"
DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
HELDOUT_EVERY = 20
EOS = "<|endoftext|>"
HELDOUT_SAMPLE_CHARS = 120_000


def extract(out: Path) -> None:
    """Download the documentation package with apt and write the corpus with its split."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", DOC_PACKAGE], cwd=tmp, check=True)
        deb = next(Path(tmp).glob(f"{DOC_PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/root"], check=True)
        sources = sorted(Path(tmp, "root", DOC_SOURCES).rglob("*.rst.txt"))
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        with gzip.open(partial, "wt", encoding="utf-8") as sink:
            for index, path in enumerate(sources):
                split = "heldout" if index % HELDOUT_EVERY == 0 else "train"
                text = path.read_text(encoding="utf-8", errors="replace").strip()
                record = {"path": str(path.relative_to(Path(tmp, "root", DOC_SOURCES))), "split": split, "text": text}
                sink.write(json.dumps(record) + "\n")
        partial.rename(out)
    print(f"wrote {len(sources)} documents to {out}")


def read_split(corpus: Path, split: str) -> list[str]:
    with gzip.open(corpus, "rt", encoding="utf-8") as source:
        return [r["text"] for r in map(json.loads, source) if r["split"] == split]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def encode(tokenizer, texts: list[str]):
    import torch

    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def unigram_perplexity(train_ids, heldout_ids, vocab_size: int) -> float:
    """Perplexity of an add-one unigram model fitted on the training tokens: the baseline to beat."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return math.exp(-log_probs[heldout_ids].mean().item())


def heldout_loss(model, ids, context: int, device: str) -> float:
    import torch

    usable = (len(ids) - 1) // context * context
    inputs = ids[:usable].view(-1, context)
    targets = ids[1 : usable + 1].view(-1, context)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        for start in range(0, len(inputs), 32):
            x, y = inputs[start : start + 32].to(device), targets[start : start + 32].to(device)
            logits = model(input_ids=x).logits.float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count


def make_model(args: argparse.Namespace, tokenizer):
    """neox: the Pythia architecture (parallel residual, 25% rotary, LayerNorm, GELU); llama: the Llama
    architecture with full multi-head attention (so there are KV heads to compress), RMSNorm, SwiGLU, full rotary."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    shared = {"vocab_size": len(tokenizer), "hidden_size": args.hidden, "num_hidden_layers": args.layers,
              "num_attention_heads": args.heads, "max_position_embeddings": args.context,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "tie_word_embeddings": False, "attention_dropout": args.dropout}  # the corpus is small: regularise
    if args.architecture == "neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(
            **shared, intermediate_size=4 * args.hidden, rotary_pct=0.25, rotary_emb_base=10000,
            use_parallel_residual=True, hidden_act="gelu", hidden_dropout=args.dropout))
    # SwiGLU's three matrices at 8/3 of the hidden size hold as many weights as a 4x GELU MLP's two.
    intermediate = -(-8 * args.hidden // 3 // 64) * 64
    return LlamaForCausalLM(LlamaConfig(
        **shared, num_key_value_heads=args.heads, intermediate_size=intermediate, hidden_act="silu",
        rms_norm_eps=1e-5, rope_theta=10000.0))


def train(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_texts, heldout_texts = read_split(args.corpus, "train"), read_split(args.corpus, "heldout")
    tokenizer = train_tokenizer(train_texts, args.vocab)
    train_ids, heldout_ids = encode(tokenizer, train_texts), encode(tokenizer, heldout_texts)
    unigram_ppl = unigram_perplexity(train_ids, heldout_ids, len(tokenizer))
    print(f"tokens: train {len(train_ids)}, held-out {len(heldout_ids)}; unigram held-out ppl {unigram_ppl:.1f}")

    model = make_model(args, tokenizer).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    windows = len(train_ids) // (args.context + 1)
    generator = torch.Generator().manual_seed(args.seed)

    log: list[dict] = []
    best_loss, best_state = math.inf, None
    start, step = time.time(), 0
    budget = args.minutes * 60
    while time.time() - start < budget:
        progress = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        # A random offset per window so that each pass sees different token boundaries.
        rows = torch.randint(0, windows - 1, (args.batch,), generator=generator)
        shift = int(torch.randint(0, args.context, (1,), generator=generator))
        flat = train_ids[shift:]
        batch = torch.stack([flat[r * (args.context + 1) : r * (args.context + 1) + args.context + 1] for r in rows])
        batch = batch.to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            # HF shifts labels internally: labels equal to the inputs train next-token prediction.
            loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % args.eval_every == 0:
            eval_loss = heldout_loss(model, heldout_ids, args.context, device)
            entry = {"step": step, "seconds": round(time.time() - start, 1), "train_loss": loss.item(),
                     "heldout_loss": eval_loss, "lr": lr}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if eval_loss < best_loss:
                best_loss = eval_loss
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.config.attention_dropout = 0.0  # inference has no dropout
    if args.architecture == "neox":
        model.config.hidden_dropout = 0.0
    write_model(args, model, tokenizer, heldout_texts, log,
                {"unigram_heldout_ppl": unigram_ppl, "best_heldout_ppl": math.exp(best_loss), "steps": step,
                 "train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids), "device": device,
                 "gpu": torch.cuda.get_device_name() if device == "cuda" else None})


def write_model(args, model, tokenizer, heldout_texts, log, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    out: Path = args.out
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(partial, max_shard_size="12MB")
    tokenizer.model_max_length = args.context
    tokenizer.save_pretrained(partial)
    # transformers 5 names its fast tokenizer class differently; the 4.x name loads in both lines.
    tokenizer_config = json.loads((partial / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (partial / "heldout.txt").write_text("\n\n".join(heldout_texts)[:HELDOUT_SAMPLE_CHARS], encoding="utf-8")
    provenance: Path = args.provenance or Path(__file__).parent / "models" / out.name
    provenance.mkdir(parents=True, exist_ok=True)
    (provenance / "training_log.json").write_text(json.dumps({"summary": summary, "args": {
        k: str(v) for k, v in vars(args).items() if k != "func"}, "log": log}, indent=1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["step"] for e in log], [e["train_loss"] for e in log], label="train (batch)")
    ax.plot([e["step"] for e in log], [e["heldout_loss"] for e in log], label="held-out")
    ax.axhline(math.log(summary["unigram_heldout_ppl"]), color="grey", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step"), ax.set_ylabel("cross-entropy (nats/token)"), ax.legend(), ax.grid(alpha=0.3)
    ax.set_title(f"{out.name}: held-out ppl {summary['best_heldout_ppl']:.1f}")
    fig.tight_layout()
    fig.savefig(provenance / "loss.png", dpi=100)
    partial.rename(out)
    print(json.dumps(summary))


def write_texts(args) -> None:
    """train.txt and heldout.txt (each split whole), and select.txt: the held-out text after the sample shipped
    with the models (see write_model), for choosing checkpoints without touching the text they are evaluated on."""
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        (args.out / f"{split}.txt").write_text(EOS.join(read_split(args.corpus, split)), encoding="utf-8")
    heldout = "\n\n".join(read_split(args.corpus, "heldout"))
    (args.out / "select.txt").write_text(heldout[HELDOUT_SAMPLE_CHARS:], encoding="utf-8")
    print(f"wrote train.txt, heldout.txt and select.txt in {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    ext = sub.add_parser("extract", help="extract the training text from the Debian documentation package")
    ext.add_argument("--out", type=Path, required=True)
    ext.set_defaults(func=lambda a: extract(a.out))
    texts = sub.add_parser("texts", help="write each split as one text file (documents separated by the EOS "
                           "token), as `kvexport uptrain --data` reads them")
    texts.add_argument("--corpus", type=Path, required=True)
    texts.add_argument("--out", type=Path, required=True, help="folder for train.txt and heldout.txt")
    texts.set_defaults(func=write_texts)
    tr = sub.add_parser("train", help="train the tokenizer and the model")
    tr.add_argument("--corpus", type=Path, required=True)
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--architecture", choices=["neox", "llama"], default="neox")
    tr.add_argument("--provenance", type=Path, help="where the log and loss curve go (default samples/models/NAME)")
    tr.add_argument("--minutes", type=float, default=5.0)
    tr.add_argument("--layers", type=int, default=8)
    tr.add_argument("--hidden", type=int, default=256)
    tr.add_argument("--heads", type=int, default=4)
    tr.add_argument("--context", type=int, default=512)
    tr.add_argument("--vocab", type=int, default=8192)
    tr.add_argument("--batch", type=int, default=64)
    tr.add_argument("--lr", type=float, default=1.5e-3)
    tr.add_argument("--eval-every", type=int, default=250)
    tr.add_argument("--dropout", type=float, default=0.1)
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=train)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
