"""``lipkern certify`` under torchrun: the ranks torchrun describes in the environment, the process group (gloo
on the CPU, NCCL on CUDA devices) and the gather of per-point results on rank 0. One process (no torchrun, or
WORLD_SIZE=1) needs none of it."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share: every world-th item from its rank (points by index: the same seeds as one
        process)."""
        return items[self.rank::self.world]


def ranks_from_env() -> Ranks:
    """The ranks torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); one process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(ranks: Ranks, device_type: str) -> None:
    import torch
    import torch.distributed as dist

    if ranks.world > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def gather(value, ranks: Ranks) -> list | None:
    """Every rank's ``value`` on rank 0, in rank order (None elsewhere); [value] in one process."""
    if ranks.world == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * ranks.world if ranks.main else None
    dist.gather_object(value, values, dst=0)
    return values


def broadcast(value, ranks: Ranks):
    """Rank 0's ``value`` on every rank (``value`` unused elsewhere)."""
    if ranks.world == 1:
        return value
    import torch.distributed as dist

    box = [value if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        dist.barrier()


def stop(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
