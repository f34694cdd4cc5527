"""Data-parallel tuning across processes: ``torchrun --nproc-per-node N -m selfconsist tune …``.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process; :func:`setup` reads
them and joins the process group (nccl for CUDA devices, gloo on CPU). Without them (a plain
``selfconsist tune``) it returns a one-process context whose collectives are no-ops, so the
single-process path runs exactly as before.

The scheme, per step:

    rank r draws its own z₀ batch of --batch-size (generator seed + r·2³²)
    g_r = ∇ mean_r(loss)                       local backward
    g   = (1/N) Σ_r g_r                         all-reduce over the encoder's parameters
    every rank takes the same Adam step with g  → identical encoders on every rank

so N processes at batch B optimise the same objective as one process at batch N·B.

Why an explicit gradient average and not ``DistributedDataParallel``: the adapter wraps the
encoder (a diffusers encoder plus its quant conv, a pythae encoder, a user's module) and the
objective runs it twice per step (q(z|x) and the re-encoding q(z′|sg[x̃])) before one backward.
DDP hooks a single module and expects one forward per backward; the second forward would need
``static_graph``/unused-parameter handling that differs per adapter. Averaging the gradients of
``encoder_parameters()`` after ``backward`` is the same arithmetic, works for every adapter, and
costs one flat all-reduce per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .errors import SelfconsistError
from .runtime import log

#: Rank r's generator seed is ``seed + r · RANK_SEED_STRIDE``: streams far apart, rank 0 = seed.
RANK_SEED_STRIDE = 2**32
#: Other ranks wait in a collective while rank 0 measures before/after (≤10% of a run, but a
#: long run's 10% can exceed the backends' default 10–30 min timeouts).
TIMEOUT = timedelta(hours=6)


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise SelfconsistError("RANK, WORLD_SIZE and LOCAL_RANK must be integers "
                               "(start multi-process runs with torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise SelfconsistError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return rank, world, local


def is_main_process() -> bool:
    """Whether this process is rank 0 (or not part of a multi-process run)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s generator: ``seed + rank · 2³²`` (rank 0 keeps ``seed``)."""
    return seed + rank * RANK_SEED_STRIDE


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run (``world_size == 1``: alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def place(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process run."""
        if self.active and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values into ``tensors`` on every rank (same start everywhere)."""
        if self.active:
            with torch.no_grad():
                for t in tensors:
                    torch.distributed.broadcast(t.data, src=0)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """g ← (1/N) Σ_r g_r for every parameter with a gradient, in one flat all-reduce.

        Every rank runs the same graph, so the same parameters have gradients everywhere.
        """
        if not self.active:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over ranks (the NaN guard sees every rank's loss)."""
        if not self.active:
            return value
        v = value.detach().float().reshape(1).clone()
        torch.distributed.all_reduce(v)
        return v[0] / self.world_size

    def agree_stop(self, signum: int | None) -> int | None:
        """The signal any rank has received (the largest number), so that every rank stops at
        the same step boundary and the checkpoint's collectives line up; ``signum`` alone."""
        if not self.active:
            return signum
        v = torch.tensor([signum or 0], dtype=torch.int64)
        if self.backend == "nccl":
            v = v.cuda()
        torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX)
        return int(v.item()) or None

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (e.g. the generators' states for the resumable
        state); ``[obj]`` alone."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out


def setup(device: torch.device) -> DistContext:
    """Join torchrun's process group if the environment names one (nccl for CUDA, gloo else).

    Idempotent: an already initialised group (e.g. by the caller) is used as it is.
    """
    rank, world, local = env_world()
    if world == 1:
        return DistContext()
    import torch.distributed as dist

    if not dist.is_available():
        raise SelfconsistError("this PyTorch build has no torch.distributed; run one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise SelfconsistError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} "
                                   "GPU(s) visible; use --nproc-per-node ≤ the GPU count")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
    elif dist.get_world_size() != world:
        raise SelfconsistError("the initialised process group does not match WORLD_SIZE")
    return DistContext(rank=rank, world_size=world, local_rank=local,
                       backend=dist.get_backend())


def teardown(wait_for_peers: bool = False) -> None:
    """Leave the process group if one was joined (gloo processes can hang at exit otherwise).

    ``wait_for_peers`` (a run that ended normally, gloo): first wait, up to a minute, until every
    rank has got here, so that no rank closes its end of a connection a peer is still using; a gloo
    process whose peer left first can abort at exit ("terminate called without an active
    exception", exit −6) after a run that succeeded. A rank that failed does not wait."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    # Only gloo: its monitored_barrier has a timeout of its own, where nccl's barrier would wait
    # for the group's (TIMEOUT) if a peer failed after the last collective.
    if wait_for_peers and torch.distributed.get_backend() == "gloo":
        try:
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=60))
        except RuntimeError as e:  # a peer that failed or left: leave anyway
            log.warning("distributed: a peer did not reach the end of the run: %s", e)
    torch.distributed.destroy_process_group()
