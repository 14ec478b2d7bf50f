"""Process-group setup from any launcher, and the collectives the objectives use.

Launchers set different variables; ``env_info`` reads them in this order:
torchrun/deepspeed/accelerate (RANK, LOCAL_RANK, WORLD_SIZE), SLURM (SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS), OpenMPI (OMPI_COMM_WORLD_*). No launcher: one process.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    env = os.environ
    for r, lr, w in (
        ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ):
        if r in env and w in env:
            return DistInfo(int(env[r]), int(env.get(lr, 0)), int(env[w]))
    return DistInfo()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise torch.distributed for this process (idempotent); returns its DistInfo.

    A single process with no launcher still gets a 1-rank group, because DeepSpeed is
    the engine of every run. Variables are normalised to RANK/LOCAL_RANK/WORLD_SIZE so
    that DeepSpeed sees the same rank whichever launcher started us.
    """
    info = env_info()
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), info.local_rank, dist.get_world_size())
        # DeepSpeed reads these at engine build even when the group exists already
        for key, value in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", info.world_size)):
            os.environ.setdefault(key, str(value))
        return info
    os.environ.update(RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size))
    if info.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif "MASTER_ADDR" not in os.environ:
        raise ValueError("MASTER_ADDR is not set; launch with torchrun, deepspeed or srun (see launch/)")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        _skip_deepspeed_shm_op()
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(
        backend=backend,
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return info


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce op at init on CPU (10-100 s, a
    compiler on every machine); it serves inference all-reduce only, training uses
    torch.distributed. Marking it incompatible makes DeepSpeed skip the build."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except ImportError:  # pragma: no cover
        pass


def device_for(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


_local = 0  # > 0 inside ``local()``


def world_size() -> int:
    if _local:
        return 1
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    if _local:
        return 0
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def local():
    """Inside, this module's collectives act on this process alone (world 1, rank 0): an
    objective evaluated by one rank (the ``val_loss`` evaluator) gathers nothing from peers."""
    global _local
    _local += 1
    try:
        yield
    finally:
        _local -= 1


# torch >= 2.14 names the single-tensor collectives *_single; older releases *_into_tensor / *_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((grad.shape[0] // world_size(), *grad.shape[1:]))
            _reduce_scatter_single(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        return grad.chunk(world_size())[rank()].clone()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank into (W*B, ...), rank-major.

    Differentiable: the backward sums each rank's gradient of the gathered tensor and
    returns this rank's slice (a reduce-scatter), so a loss over local rows of the
    global batch gets the full gradient once the engine averages parameter grads.
    Every rank must pass the same B.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together: a barrier, then destroy it.

    Without this a rank that finishes first tears its gloo pairs down while a peer is
    still in its last collective or its own teardown, and that peer aborts
    ("terminate called without an active exception") although all work is done.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals (deepspeed.utils.groups); after the group
    is destroyed they are dead handles, and the next engine built in this process (a second run
    in one Python session, or tests) would use them. Drop them so DeepSpeed makes new ones."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(groups, name, None)
        elif isinstance(value, dict) and value and all(isinstance(v, dist.ProcessGroup) for v in value.values()):
            setattr(groups, name, {})
