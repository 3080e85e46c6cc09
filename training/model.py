"""The model that uptraining trains: the checkpoint's tensors in one module per layer, run by the reference decoder.

Each layer's module runs that layer of the reference decoder in its own forward, over the description of the
tensors as the module holds them at that moment. That is what lets FSDP2 shard the model: it gathers a module's
tensors just before its forward and frees them after, so only the layer being computed is whole on a GPU.

Two ways to train:
- full: every floating-point tensor of the checkpoint is a float32 parameter (16 bytes a parameter with AdamW);
- LoRA (`LoraSettings`): the checkpoint's tensors stay frozen in `base_dtype` (bfloat16 on a GPU) and each
  projection the strategy uses gets a trained low-rank update, added beside it in the reference's linear
  (Linear.adapter), and merged into the weights when the model is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kvexport.exporter.models import DecoderDescription, Layer, LowRank, describe
from kvexport.exporter.reference import KV, ReferenceDecoder
from kvexport.strategies import Strategy

LAYER_TENSOR = re.compile(r"\.layers\.(\d+)\.")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # the Linear fields of a Layer


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float  # the update is scaled by alpha / rank, as peft does

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def module_key(name: str) -> str:
    """A checkpoint tensor's name as a module attribute (which cannot hold dots)."""
    return name.replace(".", "__")


class LayerTensors(nn.Module):
    """One layer's checkpoint tensors (or, for the root, the embeddings, final norm and head), and the adapters of
    the layer's projections under LoRA."""

    def __init__(self, tensors: dict[str, torch.Tensor], trained: bool, base_dtype: torch.dtype):
        super().__init__()
        self.names = list(tensors)
        for name, tensor in tensors.items():
            if trained:
                self.register_parameter(module_key(name), nn.Parameter(tensor.to(torch.float32)))
            else:  # not in the state dict: checkpoints and the best snapshot hold the adapters alone
                self.register_buffer(module_key(name), tensor.to(base_dtype), persistent=False)

    def tensor(self, name: str) -> torch.Tensor:
        return getattr(self, module_key(name))


class LayerModule(LayerTensors):
    def __init__(self, index: int, tensors: dict[str, torch.Tensor], trained: bool, base_dtype: torch.dtype):
        super().__init__(tensors, trained, base_dtype)
        self.index = index
        self.adapters = nn.ParameterDict()
        self.lora: LoraSettings | None = None
        self.checkpointed = False

    def add_adapters(self, layer: Layer, strategy: Strategy, lora: LoraSettings, generator: torch.Generator) -> None:
        """A (A, B) pair per projection the strategy uses (a shared layer's K and V are not): A as peft starts it,
        B zero, so training starts from the model as it is."""
        self.lora = lora
        for field in PROJECTIONS:
            linear = getattr(layer, field)
            if linear is None or (field in ("k", "v") and not strategy.is_owner(self.index)):
                continue
            fan_in, fan_out = linear.weight.shape
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) over [rank, fan_in], as nn.Linear's
            self.adapters[f"{field}_a"] = nn.Parameter(
                (torch.rand(fan_in, lora.rank, generator=generator) * 2 - 1) * bound)
            self.adapters[f"{field}_b"] = nn.Parameter(torch.zeros(lora.rank, fan_out))

    def with_adapters(self, layer: Layer) -> Layer:
        if self.lora is None:
            return layer
        return replace(layer, **{field: replace(getattr(layer, field), adapter=LowRank(
            self.adapters[f"{field}_a"], self.adapters[f"{field}_b"], self.lora.scale))
            for field in PROJECTIONS if f"{field}_a" in self.adapters})

    def forward(self, reference: ReferenceDecoder, x: torch.Tensor, inputs, source_kv: KV | None
                ) -> tuple[torch.Tensor, KV | None]:
        """The residual stream after this layer, and the layer's own K/V if it owns a cache. source_kv: the K/V of
        the owner it reads, when that is another layer (no dict goes in or out: FSDP copies containers passed
        through a module's call)."""
        def run(x: torch.Tensor) -> tuple[torch.Tensor, KV | None]:
            source = reference.strategy.kv_source[self.index]
            present = {} if source_kv is None else {source: source_kv}
            layer = self.with_adapters(reference.d.layers[self.index])  # read from this module's tensors
            context = reference.attention(self.index, layer, x, inputs, present)
            return reference.residual(layer, x, reference.output(layer, context)), present.get(self.index)

        # recomputed in the backward pass instead of kept: memory for one layer's activations, not every layer's
        return checkpoint(run, x, use_reentrant=False) if self.checkpointed else run(x)


class LiveTensors(Mapping):
    """The checkpoint's names, each read from its module when asked: inside a module's forward, that is the tensor
    FSDP has gathered for it."""

    def __init__(self, owners: dict[str, LayerTensors]):
        self._owners = owners

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._owners[name].tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owners)

    def __len__(self) -> int:
        return len(self._owners)


class TrainableDecoder(LayerTensors):
    """The root module: the tensors outside the layers, the layer modules, and the forward pass to logits."""

    def __init__(self, config, tensors: dict[str, torch.Tensor], strategy: Strategy, lora: LoraSettings | None,
                 base_dtype: torch.dtype, gradient_checkpointing: bool = False, seed: int = 0):
        per_layer: dict[int, dict[str, torch.Tensor]] = {}
        rest = {}
        for name, tensor in tensors.items():
            found = LAYER_TENSOR.search(name)
            (per_layer.setdefault(int(found.group(1)), {}) if found else rest)[name] = tensor
        trained = lora is None
        super().__init__(rest, trained, base_dtype)
        self.config, self.strategy = config, strategy
        self.blocks = nn.ModuleList(LayerModule(i, per_layer[i], trained, base_dtype)
                                    for i in range(config.num_hidden_layers))
        owners: dict[str, LayerTensors] = {name: self for name in rest}
        for block in self.blocks:
            owners.update(dict.fromkeys(block.names, block))
            block.checkpointed = gradient_checkpointing
        self.weights = LiveTensors(owners)
        if lora is not None:
            generator = torch.Generator().manual_seed(seed)
            description = self.description()
            for block in self.blocks:
                block.add_adapters(description.layers[block.index], strategy, lora, generator)

    def description(self) -> DecoderDescription:
        return describe(self.config, self.weights)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] of full windows, in float32 arithmetic (bfloat16 matrix products under the
        caller's autocast)."""
        device = windows.device
        reference = ReferenceDecoder(self.description(), self.strategy, torch.float32, device)
        ones = torch.ones_like(windows)
        inputs = reference.prepare(windows, ones, torch.arange(windows.shape[1], device=device).expand_as(windows))
        x, present = inputs.x, {}
        for block in self.blocks:
            source = self.strategy.kv_source[block.index]
            x, own = block(reference, x, inputs, None if source == block.index else present[source])
            if own is not None:
                present[block.index] = own
        return reference.finish(x)[1]

    def named_checkpoint_tensors(self) -> dict[str, str]:
        """State-dict key -> checkpoint name, for the tensors training changes (all of them, or none under LoRA)."""
        keys = {module_key(name): name for name in self.names}
        keys.update({f"blocks.{block.index}.{module_key(name)}": name for block in self.blocks for name in block.names})
        state = self.state_dict()
        return {key: name for key, name in keys.items() if key in state}


def merged_checkpoint(model: TrainableDecoder, state: dict[str, torch.Tensor], stored: Mapping[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """The checkpoint to write: a full run's trained tensors, or the stored tensors with each layer's adapters
    merged into its projections (W + A B scale, through the description, so a fused projection is merged where
    the description splits it), in the stored dtypes, on the host."""
    from kvexport.exporter.models import state_dict

    names = model.named_checkpoint_tensors()
    if not any(block.lora for block in model.blocks):
        return {names[key]: tensor.to(stored[names[key]].dtype).contiguous() for key, tensor in state.items()}
    description = describe(model.config, stored)
    layers = []
    for block, layer in zip(model.blocks, description.layers, strict=True):
        merged = {}
        for field in PROJECTIONS:
            if f"{field}_a" in block.adapters:
                a, b = (state[f"blocks.{block.index}.adapters.{field}_{part}"].double() for part in "ab")
                linear = getattr(layer, field)
                weight = linear.weight.double() + a @ b * block.lora.scale
                merged[field] = replace(linear, weight=weight.to(linear.weight.dtype))
        layers.append(replace(layer, **merged))
    description.layers = layers
    merged_layers = {name: tensor for name, tensor in state_dict(description).items() if LAYER_TENSOR.search(name)}
    return {name: merged_layers.get(name, tensor).to(tensor.dtype).contiguous() for name, tensor in stored.items()}
