"""One device with no launcher, or many under ``torchrun`` (env:// rendezvous, DDP)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError
from .ranks import env_rank  # the one place that reads the rank (torch-free: see .ranks)


@dataclass
class DistInfo:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Pick the device; when ``WORLD_SIZE`` > 1 (torchrun), join the process group (NCCL on CUDA, else gloo)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = env_rank(), env_rank(local=True)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) here: "
                            f"--nproc_per_node must not exceed the GPU count")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://",
                                timeout=timedelta(minutes=30), **({"device_id": dev} if use_cuda else {}))
    return DistInfo(world_size, rank, local_rank, dev)


# what a gloo collective raises when another process of the job has ended (its socket closed)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def peer_gone(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process of the job ended first (it told its own
    error): torch.distributed's network error, or gloo's closed connection (a plain ``RuntimeError``)."""
    network = getattr(torch.distributed, "DistNetworkError", ())
    return isinstance(err, network) or (isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_GONE))


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
