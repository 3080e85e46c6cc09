"""Find a model (alias, hub id, or local directory) and load its config, weights and tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from kvexport.models import SHIPPED, shipped_directory
from kvexport.strategies import KvexportError, Strategy

from .checkpoint import Checkpoint
from .models import DecoderDescription

# Short names users type for hub models; the shipped models' aliases are kvexport.models.SHIPPED.
HUB_ALIASES = {f"pythia-{size}": f"EleutherAI/pythia-{size}" for size in
               ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")}
ALIASES = (*SHIPPED, *HUB_ALIASES)
# Files an export needs besides the weights; copied next to the ONNX model as optimum-cli does.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
              "chat_template.jinja", "chat_template.json")  # where newer checkpoints keep their chat template


UPTRAIN_RECORD = "kvexport_uptrain.json"  # in a model directory written by `kvexport uptrain`: its strategy
# in a model directory written by `kvexport compress-heads`: its method, and its strategy when fitted for one
COMPRESSION_RECORD = "kvexport_compression.json"


class ModelNotFoundError(KvexportError):
    pass


def model_record(directory: Path) -> dict | None:
    """What kvexport uptrain or compress-heads recorded in a model directory it wrote (source, method, strategy),
    or None for any other model."""
    for name in (UPTRAIN_RECORD, COMPRESSION_RECORD):
        path = directory / name
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise KvexportError(f"{path} is not valid JSON ({error}): restore it from the command that wrote "
                                    "the model, or run that command again") from None
            if not isinstance(record, dict):
                raise KvexportError(f"{path} holds a {type(record).__name__}, not kvexport's record: restore it "
                                    "from the command that wrote the model, or run that command again")
            return record
    return None


def fitted_strategy(directory: Path) -> list[int] | None:
    """The kv_source of the strategy a model directory's weights were trained or fitted for (kvexport uptrain,
    compress-heads --share), or None where they work under any strategy."""
    strategy = (model_record(directory) or {}).get("strategy")
    return None if strategy is None else strategy["kv_source"]


def original_model(directory: Path) -> str | None:
    """The model a uptrain or compress-heads output was made from, followed back through such outputs (an uptrained
    compressed model's is the model that was compressed); None for a model kvexport did not write."""
    source, seen = None, set()
    record = model_record(directory)
    while record is not None and record.get("source") is not None and record["source"] not in seen:
        source = record["source"]
        seen.add(source)
        record = model_record(Path(source)) if Path(source).is_dir() else None
    return source


def bind_strategy(strategy: Strategy, directory: Path, output: Path, provenance: dict) -> dict:
    """Record in `directory` (a model directory being written, to be renamed to `output`) that its weights were
    trained or fitted for `strategy`: strategy.json, to pass to --share; returns the strategy's dict for the
    record (UPTRAIN_RECORD or COMPRESSION_RECORD) that binds it."""
    recorded = Strategy.from_dict({**strategy.to_dict(), "model": str(output.resolve()), "provenance": provenance})
    recorded.save(directory / "strategy.json")
    return recorded.to_dict()


def check_trained_strategy(directory: Path, strategy: Strategy) -> None:
    """A model uptrained or fitted for one strategy runs under that strategy only: under another, layers would read
    K/V that their projections were not trained to produce (or that no longer track the other layers)."""
    fitted = fitted_strategy(directory)
    if fitted is not None and tuple(fitted) != strategy.kv_source:
        raise KvexportError(f"{directory} was trained or fitted for the strategy in {directory / 'strategy.json'} "
                            f"(kv_source {fitted}), not this one: pass --share {directory / 'strategy.json'} "
                            "(or its spec)")


@dataclass
class LoadedModel:
    """A model's config and memory-mapped checkpoint; the Hugging Face model is loaded only when it is asked for."""

    reference: str  # what the user asked for, normalised (shipped model's alias, hub id or absolute path)
    directory: Path
    config: object
    checkpoint: Checkpoint = field(repr=False)

    @cached_property
    def description(self) -> DecoderDescription:
        """The architecture-neutral description over the checkpoint's tensors, in their stored dtype."""
        from .models import describe

        return describe(self.config, self.checkpoint.tensors, self.checkpoint.release)

    def description_on(self, device: torch.device) -> DecoderDescription:
        """The description over the checkpoint's tensors on `device`, still in their stored dtype (a GPU holds the
        weights once and the reference casts one layer at a time); on the CPU, the memory-mapped one."""
        if device.type == "cpu":
            return self.description
        from .models import describe

        return describe(self.config, {name: tensor.to(device) for name, tensor in self.checkpoint.tensors.items()})

    @cached_property
    def hf_model(self) -> torch.nn.Module:
        """The Hugging Face model in float32, eval mode: the ground truth for the `none` strategy (4 bytes per
        parameter: only loaded where it is needed)."""
        import transformers
        from transformers import AutoModelForCausalLM

        # transformers 5 renamed torch_dtype to dtype.
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        transformers.utils.logging.disable_progress_bar()
        return AutoModelForCausalLM.from_pretrained(self.directory, **{dtype_arg: torch.float32}).eval()

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.directory)


def resolve_model(reference: str) -> tuple[str, Path]:
    """(canonical reference, local directory) for an alias, a hub id, or a directory.

    A shipped model is named by its alias, so that strategies and manifests that record it stay valid on any
    installation.
    """
    if reference in SHIPPED:
        directory = shipped_directory(reference)
        if not (directory / "config.json").is_file():
            raise ModelNotFoundError(f"the shipped model '{reference}' is missing from this installation "
                                     f"({directory}): reinstall kvexport")
        return reference, directory
    target = HUB_ALIASES.get(reference, reference)
    local = Path(target).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"{local} has no config.json: pass a Hugging Face model directory")
        return str(local.resolve()), local.resolve()
    if target.count("/") != 1 or target.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model '{reference}' is neither a directory nor a hub id (org/name) nor an alias "
            f"({', '.join(ALIASES)}): pass a model directory with config.json, a hub id, or one of those aliases"
        )
    return target, _download(target)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "tokenizer.model"]
    # The hub client raises many unrelated types (cache misses, HTTP and connection errors): any failure
    # means "not available this way", and the user gets one line either way.
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001, S110 - not cached: fall through to the network
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if not offline:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
        except Exception as error:  # noqa: BLE001 - reported in the one-line error below
            reason = type(error).__name__
        else:  # pragma: no cover - the loop above returns
            reason = ""
    else:
        reason = "HF_HUB_OFFLINE is set"
    raise ModelNotFoundError(
        f"model '{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached ({reason}): "
        f"run 'huggingface-cli download {repo_id}' on a connected machine, or pass a local directory with --model DIR"
    )


def load_config(reference: str) -> tuple[str, object]:
    """(canonical reference, Hugging Face config) of a supported model, without reading its weights."""
    from transformers import AutoConfig

    from .models import READERS, UnsupportedModelError

    canonical, directory = resolve_model(reference)
    config = AutoConfig.from_pretrained(directory)
    if config.model_type not in READERS:
        raise UnsupportedModelError(
            f"architecture '{config.model_type}' of {reference} is not supported: "
            f"kvexport exports {', '.join(sorted(READERS))}"
        )
    return canonical, config


def load_model(reference: str) -> LoadedModel:
    """Config and memory-mapped weights; an unsupported architecture is refused before the weights are mapped."""
    canonical, config = load_config(reference)
    directory = resolve_model(reference)[1]
    return LoadedModel(canonical, directory, config, Checkpoint(directory))
