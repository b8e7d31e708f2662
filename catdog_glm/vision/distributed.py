"""torchrun's process group, for the trainer (after timm's utils/distributed.py): join it, pick each rank's device,
add up what each rank measured, leave it. A run without torchrun is a world of one and never imports
torch.distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass

from catdog_glm.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place among torchrun's: rank 0 of a world of 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The one process that logs, prints and writes files."""
        return self.rank == 0


def setup_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local_rank)


def leave_distributed(d: DistInfo) -> None:
    if d.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(device_name: str, d: DistInfo):
    """The device this rank trains on: its own GPU under torchrun, else what --device resolves to."""
    import torch

    if d.world > 1 and torch.cuda.is_available() and device_name in ("auto", "cuda"):
        return torch.device("cuda", d.local_rank)
    return resolve_device(device_name)


def all_reduce_sum(tensor, device):
    """The sum of `tensor` over every rank (on the CPU), moved through `device` as the backend needs."""
    import torch.distributed as dist

    summed = tensor.to(device)
    dist.all_reduce(summed)
    return summed.cpu()


def barrier(d: DistInfo) -> None:
    """Wait for every rank (no-op without torchrun)."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
