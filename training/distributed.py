"""Uptraining over several processes: started by torchrun, one process per GPU, the model sharded with FSDP2.

A single process (no WORLD_SIZE in the environment) runs the same code with a group of one: nothing is sharded and
no collective runs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvexport.exporter.reference import compute_device
from kvexport.strategies import KvexportError


@dataclass(frozen=True)
class Ranks:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """The process that logs and writes the output."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a number over the processes."""
        if self.size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.size

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (the batch size is a multiple of the processes)."""
        return batch.chunk(self.size)[self.rank]

    def close(self) -> None:
        if self.size > 1:
            dist.destroy_process_group()


def start(requested_device: str | None) -> Ranks:
    """This process's place: under torchrun, the process group over gloo (CPU) or NCCL (one GPU a process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = compute_device(requested_device)
    if size == 1:
        return Ranks(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        if device.index >= torch.cuda.device_count():
            raise KvexportError(f"torchrun started {size} processes but this machine has {torch.cuda.device_count()} "
                                "GPUs: pass --nproc-per-node at most that")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def shard(model: torch.nn.Module, blocks: torch.nn.ModuleList, ranks: Ranks) -> None:
    """FSDP2 over the processes: each layer a unit (gathered for its forward and backward, freed after), the root
    the rest. On GPUs the gathered copies are bfloat16 and gradients are reduced in float32."""
    if ranks.size == 1:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # A layer hands on its K/V as views of its projections; nothing writes into them in place, which is the case
    # the warning is about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if ranks.device.type == "cuda" else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
