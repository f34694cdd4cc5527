"""Small pieces the training recipes share: devices, precision, progress, the NaN guard."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from .errors import NonFiniteLossError, SelfconsistError


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SelfconsistError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda") and name != "mps":
        raise SelfconsistError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    return torch.device(name)


def cpu_bf16_flags(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text lists native bf16 arithmetic (AVX-512 BF16 or AMX-BF16)."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_has_bf16() -> bool:
    """bf16 units on this CPU: /proc/cpuinfo where there is one (Linux), else oneDNN's check."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        return cpu_bf16_flags(info.read_text(errors="replace"))
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def autocast(device: torch.device, precision: str):
    """bf16 autocast on GPU, and on CPUs with bf16 units (AVX-512 BF16/AMX: gemm and conv run
    ~2× the fp32 rate there); without them bf16 is emulated and slower, so it is refused.
    fp32 is a no-op."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        if device.type == "cpu":
            if not cpu_has_bf16():
                raise SelfconsistError("--precision bf16 needs a CUDA device or a CPU with bf16 "
                                       "units (avx512_bf16/amx_bf16); use fp32 on this CPU")
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if device.type != "cuda":
            raise SelfconsistError(f"--precision bf16 is not supported on {device.type}; use fp32")
        return torch.autocast("cuda", dtype=torch.bfloat16)
    raise SelfconsistError(f"unknown precision {precision!r}; use fp32 or bf16")


PRECISIONS = ("fp32", "bf16", "auto")


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` → bf16 where the hardware has bf16 units (a CUDA GPU that supports it, or a CPU
    with avx512_bf16/amx_bf16), else fp32; fp32 and bf16 are returned as given.

    bf16 is the faster choice there (≈2× the fp32 gemm/conv rate) and holds the tuned figures
    within seed noise (``benchmarks/bf16_vs_fp32.md``)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


def adam(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel where PyTorch has one (CPU, CUDA): one pass over all
    parameters instead of a loop of small ops, measured faster in fp32 and bf16
    (``benchmarks/bench_cpu.py``). Elsewhere PyTorch's default (foreach)."""
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.Adam(params, lr=lr, fused=fused)


def cpu_fast_path(device: torch.device, precision: str) -> bool:
    """The fast CPU path is bf16 autocast on CPU: channels_last goes with it (fp32 keeps the
    contiguous layout)."""
    return device.type == "cpu" and precision == "bf16"


def set_channels_last(modules: list[torch.nn.Module], on: bool) -> None:
    """channels_last weights for modules that hold 2-D convolutions (oneDNN's fast layout on
    CPU); ``on=False`` restores the contiguous layout that saving expects."""
    fmt = torch.channels_last if on else torch.contiguous_format
    for m in modules:
        if any(isinstance(c, torch.nn.Conv2d) for c in m.modules()):
            m.to(memory_format=fmt)


def check_finite(step: int, loss: torch.Tensor) -> None:
    """Raise :class:`NonFiniteLossError` when the loss is NaN or Inf (before any update)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"loss became {value} at step {step}")


class Progress:
    """A rich progress bar on stderr showing step and the latest loss terms (or nothing)."""

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0) -> None:
        self.enabled = enabled and total > 0
        self._bar: Any = None
        self.total, self.start, self.description = total, start, description

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RP

            self._bar = RP(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[terms]}"),
                console=Console(stderr=True), transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total,
                                             completed=self.start, terms="")
        return self

    def update(self, step: int, terms: dict[str, float]) -> None:
        if self._bar is not None:
            text = "  ".join(f"{k} {v:.4g}" for k, v in terms.items())
            self._bar.update(self._task, completed=step, terms=text)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def nonfinite_stop(error: NonFiniteLossError, out: Path | None, state_file: Path | None) -> NonFiniteLossError:
    """The error a recipe raises after a NaN/Inf loss, saying what was (not) kept.

    The periodic state is left as it was: the weights at the failing step are the ones that
    produced the NaN, and resuming with the same settings would replay it exactly.
    """
    kept = (f"the last periodic state {state_file} was kept"
            if state_file is not None and state_file.exists() else "no resumable state was written yet")
    where = f"{out} was not written; " if out is not None else ""
    return NonFiniteLossError(f"{error}; {where}{kept}; lower --lr (or raise --obs-var) and start afresh")


@contextmanager
def stage(message: str, enabled: bool = True) -> Iterator[None]:
    """Print a one-line stage note on stderr (progress goes to stderr, results to stdout)."""
    if enabled:
        print(message, file=sys.stderr, flush=True)
    yield
