"""Process-group setup for torchrun or Slurm (DDP): NCCL on GPU, gloo on CPU; rank-0 helpers.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A Slurm job step (`srun`, and the
submitit launcher's tasks) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead; then the group is formed
from those, with the master address from MASTER_ADDR or the first host of SLURM_JOB_NODELIST (SLURM_LAUNCH_NODE_IPADDR
as a fallback) and the port from MASTER_PORT or one derived from the job id, so N tasks are one DDP run, not N
separate runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" in head:
        prefix, ranges = head.split("[", 1)
        first = ranges.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def slurm_env(environ=None) -> dict[str, str]:
    """torchrun-style variables from a Slurm task's environment ({} when not a multi-task Slurm step)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return {}
    addr = env.get("MASTER_ADDR") or (_first_host(env["SLURM_JOB_NODELIST"]) if env.get("SLURM_JOB_NODELIST")
                                      else env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": addr, "MASTER_PORT": port}


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun or a Slurm task), before any process group exists."""
    return int({**os.environ, **slurm_env()}.get("RANK", "0"))


def init_distributed(device_type: str) -> DistInfo:
    """Initialise the default process group when launched by torchrun or as several Slurm tasks."""
    os.environ.update(slurm_env())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor of counters over ranks (in place on a copy)."""
    if not info.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
