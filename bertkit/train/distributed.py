"""Process groups, data sharding and model wrapping for ``torchrun`` (DDP by default, FSDP2 as an option).

Multi-node use (the same command on every node; ``--nnodes``/``--node_rank`` differ)::

    # node 0 (its address is reachable by the others as $MASTER)
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr $MASTER --master_port 29500 \\
        -m bertkit.train finetune --task classify --train train.csv --eval dev.csv --out /shared/run1
    # node 1: the same with --node_rank 1

``--out`` must be on a filesystem every node sees (checkpoints are written by global rank 0 and
read by every rank on ``--resume``). NCCL is used on GPUs, gloo on CPUs.

How a global batch is split: an optimizer step consumes ``batch_size * grad_accum * world_size``
examples, the next slice of one permutation of the dataset that depends only on (seed, epoch).
Position ``k`` of that slice goes to rank ``k % world_size``, micro-batch ``(k // world_size) //
batch_size``: this is what ``DistributedSampler(shuffle=True, drop_last=False)`` followed by a
``DataLoader`` gives, except that nothing is padded or dropped. So every step sees the same
examples whatever the number of processes, which is what makes a 2-process run reproduce a
1-process run with the same global batch, and a resumed run continue the same trajectory.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Joins the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1) and picks the device.

    Args:
        device: ``auto`` (this rank's GPU if there is one, else CPU), ``cpu`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: use auto, cpu or cuda")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda but no GPU is visible; use --device cpu")
    dev = torch.device("cuda", local % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60),
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local, dev)


def teardown(info: DistInfo) -> None:
    """Leaves the process group joined by :func:`setup`."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Waits for every rank (no-op in one process)."""
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sums a tensor over ranks; returns the total on the CPU."""
    if not info.enabled:
        return values.cpu()
    on = values.to(info.device)  # nccl reduces GPU tensors only
    dist.all_reduce(on)
    return on.cpu()


def gather_to_main(obj, info: DistInfo) -> list | None:
    """Every rank's ``obj`` as a list on rank 0 (None elsewhere)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Optimizer steps per epoch; the last one may be short (nothing is dropped)."""
    return math.ceil(num_examples / global_batch)


@functools.lru_cache(maxsize=2)
def _permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    # Cached: drawn once per epoch, not once per step (it is O(dataset) for pre-training corpora).
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def step_micro_batches(num_examples: int, seed: int, epoch: int, step: int, batch_size: int, grad_accum: int,
                       info: DistInfo) -> list[list[int]]:
    """Example indices of this rank's ``grad_accum`` micro-batches for one optimizer step.

    The last step of an epoch may be short; a micro-batch can then be empty (the loop runs it on a
    placeholder example with zero weight, so that every rank still joins the collectives).
    """
    global_batch = batch_size * grad_accum * info.world_size
    permutation = _permutation(num_examples, seed, epoch)
    mine = permutation[step * global_batch:(step + 1) * global_batch][info.rank::info.world_size]
    return [mine[i * batch_size:(i + 1) * batch_size].tolist() for i in range(grad_accum)]


def wrap(module: nn.Module, info: DistInfo, fsdp: bool, layers: list[nn.Module] | None = None) -> nn.Module:
    """DDP, FSDP2 (``fully_shard`` on each encoder layer, then on the root) or nothing for one process."""
    if not info.enabled:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # Each layer is its own unit so only one layer's full weights exist at a time; the root
        # unit keeps embeddings and heads together (the MLM decoder shares the embedding matrix).
        for layer in layers or []:
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[info.device.index] if info.device.type == "cuda" else None)


def no_sync(module: nn.Module, sync: bool):
    """Context that skips the gradient all-reduce on all but the last micro-batch of a step."""
    if sync:
        return nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
