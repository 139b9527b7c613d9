"""torchrun / DistributedDataParallel helpers.

Every function works without a process group too (one process: rank 0 of world size 1), so the trainer calls them
unconditionally. Only rank 0 writes files; the other ranks train and wait at barriers.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from maskrcnn.config import ConfigError


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that writes files, logs and evaluates (rank 0)."""
    return get_rank() == 0


def barrier() -> None:
    """Waits for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def init_distributed() -> torch.device | None:
    """Joins the process group described by torchrun's environment variables.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. NCCL is used when CUDA is available
    (each rank on GPU LOCAL_RANK), gloo otherwise.

    Returns:
        The device of this rank when a process group was joined (world size > 1), else None (single process).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or is_distributed():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group(backend="gloo")
    return torch.device("cpu")


def reduce_loss_dict(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Averages each scalar loss over all ranks (for logging; the gradients are already averaged by DDP).

    Args:
        losses: name -> scalar tensor, the same names on every rank.
    Returns:
        name -> detached scalar tensor, the mean over ranks.
    """
    names = sorted(losses)
    if not names:
        return {}
    stacked = torch.stack([losses[name].detach().float() for name in names])  # (L,)
    if is_distributed():
        dist.all_reduce(stacked)
        stacked = stacked / get_world_size()
    return dict(zip(names, stacked))


def shard(count: int) -> range:
    """This rank's share of `count` items for sharded evaluation: items rank, rank + world_size, ..."""
    return range(get_rank(), count, get_world_size())


def gather_shards(items: list) -> list | None:
    """Collects every rank's `shard` results on rank 0, in the order of the whole sequence.

    Args:
        items: this rank's results, one per item of `shard(count)`, in order; picklable.
    Returns:
        On rank 0 the results of all `count` items in order (item k * world_size + r is rank r's k-th); None on
        the other ranks. In a single process: `items` itself.
    """
    if not is_distributed():
        return items
    parts = [None] * get_world_size() if is_main() else None
    dist.gather_object(items, parts, dst=0)
    if not is_main():
        return None
    return [part[k] for k in range(max(map(len, parts))) for part in parts if k < len(part)]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def sync_batchnorm(model: torch.nn.Module, *, enabled: bool, world_size: int,
                   device: torch.device) -> torch.nn.Module:
    """The model with its trainable BatchNorm layers turned into SyncBatchNorm when `enabled` in a distributed run
    (statistics over every process's images; FrozenBatchNorm and GroupNorm are left as they are).

    Raises:
        ConfigError: enabled on a CPU run with several processes (SyncBatchNorm synchronises GPU tensors only).
    """
    if not enabled or world_size == 1:
        return model
    if device.type != "cuda":
        raise ConfigError("train.sync_batchnorm: true needs CUDA (SyncBatchNorm synchronises GPU tensors); set it "
                          "false for CPU runs")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
