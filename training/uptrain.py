"""`kvexport uptrain`: continue training a model with a KV-sharing strategy in force (MLKV-style uptraining).

The model trains through the architecture-neutral description the exporter reads (training/model.py): the
forward pass is the reference decoder's under the strategy. Shared layers attend over their owner's K/V and never
run their own K/V projections: those get no gradient and are unused under the strategy (they stay in the
checkpoint, unchanged, so that it remains a standard Hugging Face model); owners start from the original weights.
With `lora_rank`, the checkpoint stays frozen and low-rank adapters train (merged into the output); with
`gradient_checkpointing`, each layer's activations are recomputed in the backward pass instead of kept.

Under torchrun (`torchrun --nproc-per-node N -m kvexport uptrain ...`) each process takes an equal share of every
batch and FSDP2 shards the model over the processes (training/distributed.py); the losses, gradients and updates
are those of one process with the whole batch, up to the order of floating-point sums.

A run is reproducible from its settings: batch `step` depends only on (seed, step), and the state (the trained
tensors and optimizer, sharded by process, with the schedule and history) is written atomically to a sibling
folder `.NAME.uptrain`, so `--resume` after an interruption gives the result an uninterrupted run gives. The output
directory is written under a temporary name and renamed when complete; it records the strategy
(kvexport_uptrain.json, strategy.json), and exporting it with another strategy is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvexport.exporter.loading import SIDE_FILES, UPTRAIN_RECORD, bind_strategy, check_trained_strategy, load_model
from kvexport.strategies import KvexportError, Strategy, make_strategy
from kvexport.strategies.atomic import atomic_path, write_text_atomic

from .data import held_out_windows, split_tail, text_files, token_stream, train_batch
from .distributed import Ranks, shard, start
from .model import LoraSettings, TrainableDecoder, merged_checkpoint

STATE_DIR = "state"  # trained tensors and optimizer (one shard per process) and progress.json
BEST_DIR = "best"  # the trained tensors of the best held-out evaluation so far
PROGRESS_FILE = "progress.json"


@dataclass
class UptrainSettings:
    steps: int
    batch_size: int = 16  # windows per optimizer step and micro-batch, over all processes
    length: int = 256  # tokens per training window
    accumulate: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of the steps with a linear warm-up; then cosine down to 10%
    clip: float = 1.0  # gradient norm
    eval_every: int = 0  # steps between held-out evaluations; 0: a tenth of the steps
    eval_windows: int = 64
    patience: int = 0  # evaluations without improvement before stopping early; 0: never
    held_out_fraction: float = 0.02  # of the --data tokens, when no --eval-data is given
    seed: int = 0
    lora_rank: int = 0  # 0: train every tensor; R: freeze them and train rank-R adapters
    lora_alpha: float = 0.0  # the adapters' scale is alpha / rank; 0: 2 x rank
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "length", "accumulate", "eval_windows"):
            if getattr(self, name) < 1:
                raise KvexportError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 < self.lr < 1 or not 0 <= self.warmup < 1 or self.clip <= 0:
            raise KvexportError("--lr must be in (0, 1), --warmup in [0, 1) and --clip positive")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise KvexportError("--lora and --lora-alpha must be positive")
        if self.eval_every == 0:
            self.eval_every = max(1, self.steps // 10)
        if self.lora_rank and not self.lora_alpha:
            self.lora_alpha = 2.0 * self.lora_rank

    @property
    def lora(self) -> LoraSettings | None:
        return LoraSettings(self.lora_rank, self.lora_alpha) if self.lora_rank else None

    def lr_factor(self, step: int) -> float:
        warmup = max(1, int(self.warmup * self.steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def run_uptrain(model: str, share: str, data: list[str], output: Path, settings: UptrainSettings,
                eval_data: list[str] | None = None, resume: bool = False, device: str | None = None,
                show_progress: bool = True, log=print) -> dict:
    """Train, evaluate, checkpoint, and write the best model (by held-out perplexity) to `output`; returns the
    record written there. Everything a user can get wrong is refused before training starts."""
    output = Path(output)
    state_dir = output.with_name(f".{output.name}.uptrain")
    if output.exists():
        raise KvexportError(f"{output} exists: choose another -o")
    if resume and not (state_dir / STATE_DIR / PROGRESS_FILE).is_file():
        raise KvexportError(f"there is no interrupted run of {output} to resume ({state_dir / STATE_DIR} is "
                            "missing): run without --resume")
    if state_dir.exists() and not resume:
        raise KvexportError(f"an interrupted run of {output} is in {state_dir}: pass --resume to continue it, or "
                            "remove that folder to start again")
    loaded = load_model(model)
    strategy = make_strategy(share, loaded.config.num_hidden_layers, loaded.reference)
    check_trained_strategy(loaded.directory, strategy)
    ranks = start(device)
    try:
        if settings.batch_size % ranks.size:
            raise KvexportError(f"--batch-size {settings.batch_size} is shared by {ranks.size} processes: give a "
                                "multiple of their number")
        log = log if ranks.main else (lambda _: None)
        record = train_and_write(loaded, strategy, data, output, state_dir, settings, eval_data, resume, ranks,
                                 show_progress and ranks.main, log)
        ranks.barrier()  # the output is complete for every process
        return record
    finally:
        ranks.close()


def train_and_write(loaded, strategy: Strategy, data: list[str], output: Path, state_dir: Path,
                    settings: UptrainSettings, eval_data: list[str] | None, resume: bool, ranks: Ranks,
                    show_progress: bool, log) -> dict:
    tokenizer = loaded.tokenizer()
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (loaded.config.eos_token_id or 0)
    train_files = text_files(data)
    train_ids = token_stream(tokenizer, train_files, eos)
    if eval_data:
        held_ids = token_stream(tokenizer, text_files(eval_data), eos)
    else:
        train_ids, held_ids = split_tail(train_ids, settings.held_out_fraction, settings.length)
    windows = held_out_windows(held_ids, settings.length, settings.eval_windows)
    run_key = {"model": loaded.reference, "kv_source": list(strategy.kv_source),
               "data": [str(f) for f in train_files], "settings": asdict(settings)}
    # not the number of processes: the state is resharded on load, and the global batch is the same

    torch.manual_seed(settings.seed)
    # one process builds the model where it trains; several build it on the host and shard it before moving it
    built_on = ranks.device if ranks.size == 1 else torch.device("cpu")
    base_dtype = torch.bfloat16 if ranks.device.type == "cuda" else torch.float32
    model = TrainableDecoder(loaded.config, {name: t.to(built_on) for name, t in loaded.checkpoint.tensors.items()
                                             if t.is_floating_point()},
                             strategy, settings.lora, base_dtype, settings.gradient_checkpointing, settings.seed)
    shard(model, model.blocks, ranks)
    model.to(ranks.device)
    trainer = Trainer(model, settings, ranks)
    progress = {"step": 0, "history": [], "best_ppl": math.inf, "since_best": 0, "seconds": 0.0}
    if resume:
        progress = trainer.load(state_dir / STATE_DIR, run_key)
        log(f"resuming at step {progress['step']} of {settings.steps}")
    else:
        ranks.barrier()  # every process has checked that there is no state folder
        if ranks.main:
            state_dir.mkdir(parents=True)
        before = trainer.evaluate(windows)
        progress["history"].append({"step": 0, "heldout_ppl": before[0], "heldout_accuracy": before[1]})
        progress["best_ppl"] = before[0]  # if training never does better, the output is the model as it was
        trainer.save(state_dir / BEST_DIR)
        trained = sum(p.numel() for p in model.parameters())
        log(f"held-out perplexity before: {before[0]:.2f} (accuracy {before[1]:.3f}); {len(train_ids)} training "
            f"tokens; {trained:,} trained parameters on {ranks.size} process{'es' if ranks.size > 1 else ''}")
    trainer.train(train_ids, windows, progress, state_dir, run_key, show_progress, log)
    record = {"source": loaded.reference, "strategy": strategy.to_dict(), "settings": asdict(settings),
              "data": [str(f) for f in train_files], "eval_data": eval_data or "the last "
              f"{settings.held_out_fraction:.0%} of --data", "train_tokens": len(train_ids),
              "device": str(ranks.device.type), "processes": ranks.size, "seconds": round(progress["seconds"], 1),
              "tokens_per_second": round(progress.get("tokens", 0) / max(progress["seconds"], 1e-9)),
              "peak_device_bytes": (torch.cuda.max_memory_allocated(ranks.device) if ranks.device.type == "cuda"
                                    else None),
              "steps_run": progress["step"], "before": progress["history"][0],
              "best": min((h for h in progress["history"] if "heldout_ppl" in h), key=lambda h: h["heldout_ppl"]),
              "history": progress["history"]}
    trainer.restore(state_dir / BEST_DIR)
    state = trainer.full_state()  # a collective: every process takes part
    if ranks.main:
        write_output(loaded, strategy, merged_checkpoint(model, state, loaded.checkpoint.tensors), output, record)
        shutil.rmtree(state_dir)
    return record


class Trainer:
    def __init__(self, model: TrainableDecoder, settings: UptrainSettings, ranks: Ranks):
        self.model, self.settings, self.ranks, self.device = model, settings, ranks, ranks.device
        params = list(model.parameters())
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # norms and biases
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr,
                                           betas=(0.9, 0.95))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, settings.lr_factor)
        # bfloat16 matmuls on the GPU; float32 on the CPU, where a run is also bitwise reproducible.
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def logits(self, windows: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.model(windows.to(self.device)).float()

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        logits = self.logits(windows)
        targets = windows[:, 1:].to(self.device)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def evaluate(self, windows: torch.Tensor) -> tuple[float, float]:
        """(perplexity, next-token accuracy) on the held-out windows (every process runs them all: the sharded
        model's forward is a collective)."""
        nll, correct, count = 0.0, 0, 0
        for chunk in windows.split(self.settings.batch_size):
            logits = self.logits(chunk)[:, :-1]
            targets = chunk[:, 1:].to(self.device)
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            correct += int((logits.argmax(-1) == targets).sum())
            count += targets.numel()
        return math.exp(nll / count), correct / count

    def train(self, train_ids: torch.Tensor, windows: torch.Tensor, progress: dict, state_dir: Path, run_key: dict,
              show_progress: bool, log) -> None:
        from tqdm import tqdm

        s = self.settings
        bar = tqdm(total=s.steps, initial=progress["step"], disable=not show_progress, unit="step", desc="uptrain")
        while progress["step"] < s.steps:
            step, started = progress["step"], time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for micro in range(s.accumulate):
                batch = train_batch(train_ids, step * s.accumulate + micro, s.batch_size, s.length, s.seed)
                scaled = self.loss(self.ranks.share(batch)) / s.accumulate
                scaled.backward()
                loss += scaled.item()
            torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), s.clip)
            self.optimizer.step()
            self.schedule.step()
            loss = self.ranks.mean(loss)  # also waits for every process's step
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - started
            progress["seconds"] += seconds
            progress["tokens"] = progress.get("tokens", 0) + s.batch_size * s.accumulate * s.length
            progress["step"] = step + 1
            entry = {"step": step + 1, "loss": loss, "lr": self.schedule.get_last_lr()[0]}
            tokens_per_s = s.batch_size * s.accumulate * s.length / seconds
            bar.set_postfix(loss=f"{loss:.3f}", tokens_per_s=f"{tokens_per_s:,.0f}")
            bar.update()
            evaluated = (step + 1) % s.eval_every == 0 or step + 1 == s.steps
            if evaluated:
                ppl, accuracy = self.evaluate(windows)
                entry.update(heldout_ppl=ppl, heldout_accuracy=accuracy)
                if ppl < progress["best_ppl"]:
                    progress["best_ppl"], progress["since_best"] = ppl, 0
                    self.save(state_dir / BEST_DIR)
                else:
                    progress["since_best"] += 1
                log(f"step {step + 1}: held-out perplexity {ppl:.2f}, accuracy {accuracy:.3f}")
            progress["history"].append(entry)
            stop = s.patience and progress["since_best"] >= s.patience
            if evaluated or stop:
                self.save(state_dir / STATE_DIR, progress, run_key)
            if stop:
                log(f"stopping early: {s.patience} evaluations without a better held-out perplexity")
                break
        bar.close()

    def save(self, folder: Path, progress: dict | None = None, run_key: dict | None = None) -> None:
        """The trained tensors (with progress: also the optimizer and schedule), each process its shard, replacing
        `folder` whole once every shard and the progress file are written."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        partial = folder.with_name(folder.name + ".partial")
        if self.ranks.main:
            shutil.rmtree(partial, ignore_errors=True)
        self.ranks.barrier()
        if progress is None:
            state = {"model": get_model_state_dict(self.model)}
        else:
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            state = {"model": model_state, "optimizer": optimizer_state}
        with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=partial)
        self.ranks.barrier()
        if self.ranks.main:
            if progress is not None:
                (partial / PROGRESS_FILE).write_text(json.dumps({"progress": progress, "run_key": run_key,
                                                                 "schedule": self.schedule.state_dict()}))
            old = folder.with_name(folder.name + ".old")
            if folder.exists():
                folder.rename(old)
            partial.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        self.ranks.barrier()

    def load(self, folder: Path, run_key: dict) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        saved = json.loads((folder / PROGRESS_FILE).read_text())
        if saved["run_key"] != run_key:
            changed = sorted(k for k in run_key if saved["run_key"].get(k) != run_key[k])
            raise KvexportError(f"--resume continues the same run, but {', '.join(changed)} differ from the "
                                f"interrupted one in {folder.parent}: repeat its command, or remove that folder")
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=folder)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        return saved["progress"]

    def restore(self, folder: Path) -> None:
        """The trained tensors saved in `folder` (save without progress)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(self.model)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=folder)
        set_model_state_dict(self.model, state["model"])

    def full_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors whole, on the host (the main process's; the others get an empty dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=self.ranks.size > 1, cpu_offload=True))


def write_output(loaded, strategy: Strategy, tensors: dict[str, torch.Tensor], output: Path, record: dict) -> None:
    """The trained checkpoint (merged_checkpoint) as a Hugging Face model directory, with the source's config and
    tokenizer, the strategy, the record, the log and a loss-curve PNG; written under a temporary name."""
    from safetensors.torch import save_file

    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
        for name in SIDE_FILES:
            if (loaded.directory / name).is_file():
                shutil.copy2(loaded.directory / name, partial / name)
        recorded = bind_strategy(strategy, partial, output, {"uptrained_from": loaded.reference})
        write_text_atomic(partial / UPTRAIN_RECORD, json.dumps({**record, "strategy": recorded}, indent=2) + "\n")
        plot_history(record["history"], partial / "loss.png")
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    held = [(h["step"], math.log(h["heldout_ppl"])) for h in history if "heldout_ppl" in h]
    if train:
        ax.plot(*zip(*train), label="training loss", alpha=0.6)
    ax.plot(*zip(*held), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.set_title("kvexport uptrain")
    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, format="png")
    plt.close(fig)
