"""Distributed data parallel plumbing: torchrun detection, process groups, samplers, metric reduction, and the
FSDP2 sharding of a layered model (:func:`fully_shard_model`, its units from :func:`shard_units`).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the trainer joins a process group, NCCL on GPUs and
gloo on CPUs, shards the data per rank and reduces metrics across ranks; only rank 0 writes files. A single
process is the same code with a world of one.

The training sampler is torch's ``DistributedSampler`` (the same permutation of the dataset per epoch on every
rank, each rank taking its stride) extended in two ways the resume guarantee needs: it can start part-way
through an epoch, and it yields ``(index, sample_seed)`` so per-image augmentation depends only on
(seed, epoch, index).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from parameternet.errors import ParameterNetError

__all__ = [
    "DistInfo",
    "ResumableSampler",
    "ShardSampler",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_buffers",
    "cleanup",
    "data_parallel",
    "fully_shard_model",
    "mix_seed",
    "pick_device",
    "setup",
    "shard_units",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The torch device a recipe's ``device`` (auto, cpu, cuda or cuda:N) names: auto is CUDA when torch sees a GPU;
    plain ``cuda`` is GPU ``local_rank``. Raises ParameterNetError for CUDA when torch sees none."""
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ParameterNetError(f"device={device!r} but no CUDA device is visible; use device=cpu")
    return torch.device("cuda", int(device.split(":")[1]) if ":" in device else local_rank)


def setup(device: str = "auto", group: bool = False) -> DistInfo:
    """Pick the device and, under torchrun, join the process group (nccl on CUDA, gloo on CPU); with ``group`` a
    single process makes a group of one too (FSDP and ``torch.distributed.checkpoint`` need one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if (world > 1 or group) and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if world > 1:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        else:  # no torchrun: a store in this process, no port
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        log.info("rank %d/%d joined the %s process group on %s", rank, world, backend, dev)
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel under torchrun (on ``info.device``), else ``model`` itself."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def fully_shard_model(
    model: torch.nn.Module,
    blocks: list[torch.nn.Module],
    info: DistInfo,
    param_dtype: torch.dtype | None = None,
    float32_modules: tuple[type, ...] = (),
) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2 (``fully_shard``) over all ``info.world_size`` processes: each of
    ``blocks`` (a transformer's layers) is one unit, gathered for its forward and backward and freed after, and the
    root ``model`` holds what is left (embeddings, final norm, head). Every parameter, expert banks included, is
    split along its first dimension; gradients are reduce-scattered in float32.

    ``param_dtype`` (e.g. bfloat16): the blocks' weights are gathered in that dtype; their inputs are not cast, so
    the residual stream keeps the root's float32 and the caller's autocast decides each op's precision. Modules of
    the ``float32_modules`` types inside the blocks (routers) are units of their own gathered in float32, and so is
    the root. Returns ``model`` (FSDP2 changes its class, not its names).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    full = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks:
        if param_dtype is not None:
            for module in block.modules():
                if isinstance(module, float32_modules):
                    fully_shard(module, mesh=mesh, mp_policy=full)
        fully_shard(block, mesh=mesh, mp_policy=low)
    fully_shard(model, mesh=mesh, mp_policy=full)
    return model


_CONTAINERS = ("blocks", "stages", "layers")  # timm's names for a network's sequence of stages / blocks


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units of a timm image model, in order: the entries of its ``blocks``, ``stages`` or ``layers``
    container (GhostNet / ParameterNet and EfficientNet stages, ViT blocks, Swin stages), else its top-level
    children that hold parameters (ResNet's ``conv1``, ``layer1`` ... ``fc``). Whatever they leave (stem, head)
    stays with the root unit.

    Raises ParameterNetError for a model with fewer than two such units, which FSDP would gather whole anyway.
    """
    for name in _CONTAINERS:
        container = getattr(model, name, None)
        if isinstance(container, (torch.nn.Sequential, torch.nn.ModuleList)) and len(container) > 1:
            return [m for m in container if any(True for _ in m.parameters())]
    units = [m for m in model.children() if any(True for _ in m.parameters())]
    if len(units) < 2:
        raise ParameterNetError(
            f"{type(model).__name__} has no sequence of blocks to shard (no {', '.join(_CONTAINERS)} container and "
            f"fewer than two children with parameters); train it with parallel=ddp"
        )
    return units


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """The largest value of a tensor over ranks (itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy the main process's buffers (BatchNorm running statistics) to every process, one broadcast per dtype; a
    no-op in a single process. Each process updates them from its own share of a batch, and a checkpoint keeps the
    main process's: after this every process holds what a checkpoint would, so a resumed run continues each
    process's state exactly. Sharded (DTensor) buffers are left alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        if type(buf) is torch.Tensor and buf.numel():
            groups.setdefault(buf.dtype, []).append(buf)
    for tensors in groups.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        for t, new in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(new.view_as(t))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so (seed, epoch, step) give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start at ``start`` within an epoch and yields ``(index, sample_seed)``."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start :]
        for i in indices:
            yield i, mix_seed(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Evaluation sampler: rank r takes indices r, r + world, ...; no padding, so reduced metrics are exact."""

    def __init__(self, length: int, num_replicas: int, rank: int):
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
