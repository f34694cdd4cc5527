"""Small pieces the training recipes share: devices, precision, progress and logging, the NaN
guard, and stopping cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from .errors import Interrupted, NonFiniteLossError, SelfconsistError

#: What ``--device`` (and every config's ``device``) takes: one text for the help of every
#: command and for the error below.
DEVICES = "cpu, cuda, cuda:N, mps or auto"


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a device that is not there is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SelfconsistError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SelfconsistError("--device mps was asked for, but this machine has no MPS device; use --device cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise SelfconsistError(f"unknown device {name!r}; use {DEVICES}")
    try:
        return torch.device(name)
    except RuntimeError as e:  # e.g. cuda:x
        raise SelfconsistError(f"unknown device {name!r}; use {DEVICES}") from e


def _flags(cpuinfo: str) -> set[str]:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return flags


def cpu_bf16_flags(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text lists native bf16 arithmetic (AVX-512 BF16 or AMX-BF16)."""
    return bool(_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def cpu_bf16_faster_flags(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text names a CPU on which PyTorch's bf16 gemm beats its fp32 one:
    AMX tiles, or AVX-512 BF16 on an AMD CPU. Measured (docs/performance.md, single-thread
    1024³): AMD EPYCs with avx512_bf16 ran bf16 at 2–2.8× the best fp32 rate; an Intel Xeon with
    avx512_bf16 and no AMX at half its fp32 rate, which made ``tune`` 1.4–2× slower in bf16."""
    flags = _flags(cpuinfo)
    amd = _field(cpuinfo, "vendor_id") == "AuthenticAMD"
    return "amx_bf16" in flags or ("avx512_bf16" in flags and amd)


@functools.cache
def _cpuinfo() -> str | None:
    """The text of /proc/cpuinfo, or None where there is none (other systems than Linux); read
    once (start-up asks it for the vendor, the family and the flags)."""
    info = Path("/proc/cpuinfo")
    return info.read_text(errors="replace") if info.exists() else None


def cpu_has_bf16() -> bool:
    """bf16 units on this CPU: /proc/cpuinfo where there is one (Linux), else oneDNN's check."""
    info = _cpuinfo()
    if info is not None:
        return cpu_bf16_flags(info)
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def _field(cpuinfo: str, name: str) -> str:
    """The first value of ``name`` in a /proc/cpuinfo text, or ""."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cpuinfo_field(name: str) -> str:
    """The first value of ``name`` in /proc/cpuinfo, or "" where there is none."""
    return _field(_cpuinfo() or "", name)


def cpu_bf16_is_faster() -> bool:
    """bf16 gemm faster than fp32 on this CPU (:func:`cpu_bf16_faster_flags`); where there is no
    /proc/cpuinfo, that it has bf16 units at all."""
    info = _cpuinfo()
    return cpu_bf16_faster_flags(info) if info is not None else cpu_has_bf16()


def cpu_vendor() -> str:
    """The CPU's vendor as Linux reports it (``GenuineIntel``, ``AuthenticAMD``), or "" where
    there is no /proc/cpuinfo (other systems)."""
    return cpuinfo_field("vendor_id")


def cpu_family() -> int | None:
    """The CPU's family number as Linux reports it (AMD: 25 = Zen 3 and Zen 4, 26 = Zen 5), or
    None where there is no /proc/cpuinfo."""
    value = cpuinfo_field("cpu family")
    return int(value) if value.isdigit() else None


@contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """On CPU, flush denormal floats (|x| < 1.2e-38) to zero on this thread while the block runs,
    then restore PyTorch's default (no flushing). Arithmetic on denormals takes a slow microcode
    path on x86 CPUs; a decoder's sigmoid output far below 1 makes them in the backward pass
    (x̃(1 − x̃) times a small gradient). Measured on the built-in MLP's train step: 1.06–1.10×
    faster (docs/performance.md); the values flushed are below any loss's resolution. Only the
    calling thread's setting changes (x86's MXCSR is per thread)."""
    on = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


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

#: ``auto`` on CPU keeps fp32 for a built-in MLP with fewer encoder parameters than this: its
#: products are too small for bf16's ~2× gemm rate to repay the casts and bf16's higher
#: per-call cost. (Measured on MLPs only: a conv encoder's work per parameter grows with the
#: image, so other models are not held to it.)
#: Measured on a Zen 4 (``benchmarks/bf16_by_size.py``, two runs): a tune took 1.28–1.36× as
#: long in bf16 as in fp32 with a 37k-parameter encoder (the bundled digits MLP has 28k),
#: 0.69–0.97× with 140–185k, 0.71× with the ColorMNIST MLP's 617k.
CPU_BF16_MIN_ENCODER_PARAMS = 100_000


def resolve_precision(device: torch.device, precision: str, encoder_params: int | None = None) -> str:
    """``auto`` → bf16 where it runs faster than fp32: a CUDA GPU that supports it, or a CPU of
    :func:`cpu_bf16_is_faster` (AMX, or AVX-512 BF16 on AMD), if ``encoder_params`` is given
    (the caller's model is one the limit was measured on), with at least
    :data:`CPU_BF16_MIN_ENCODER_PARAMS` of them; else fp32. fp32 and bf16 are returned as
    given (``bf16`` runs on any CPU with bf16 units).

    bf16 is the faster choice there (≈2× the fp32 gemm/conv rate) and holds the tuned figures
    within seed noise (``benchmarks/bf16_vs_fp32.md``). A fixed property of the machine and the
    model, so a resumed ``auto`` run resolves to the same precision."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        big = encoder_params is None or encoder_params >= CPU_BF16_MIN_ENCODER_PARAMS
        return "bf16" if cpu_bf16_is_faster() and big else "fp32"
    return "fp32"


def adam(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel where PyTorch has one (CPU, CUDA): one pass over all
    parameters instead of a loop of small ops, measured faster in fp32 and bf16
    (``benchmarks/bench_cpu.py``). Elsewhere PyTorch's default (foreach)."""
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.Adam(params, lr=lr, fused=fused)


#: glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_FREED_MEMORY = False


def keep_freed_memory(device: torch.device) -> bool:
    """On CPU under glibc, serve tensors up to 32 MiB from the heap and keep freed memory in
    the process, instead of glibc's default of mapping each large block afresh and unmapping it
    on free. A training step frees and reallocates the same activation and gradient buffers
    every step; with the default each reallocation page-faults its memory back in (300–700
    minor faults, ~1–2 ms of kernel time per ColorMNIST MLP step, ~1.2× of the step on the dev
    machine: docs/performance.md). Process-wide and idempotent; a no-op off glibc or off CPU.
    Returns whether it is in effect."""
    global _KEPT_FREED_MEMORY
    if _KEPT_FREED_MEMORY or device.type != "cpu" or not sys.platform.startswith("linux"):
        return _KEPT_FREED_MEMORY
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):  # musl and others
            return False
        ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
        ok = mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok
    except (OSError, AttributeError):
        return False
    _KEPT_FREED_MEMORY = ok
    log.debug("runtime: glibc keeps freed memory (mmap threshold 32 MiB): %s", ok)
    return ok


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


LOGGER_NAME = "selfconsist"
log = logging.getLogger(LOGGER_NAME)


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (a bar) rather than a file or pipe (log lines)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of each record
    (so a redirected or captured stderr, as in tests, is honoured)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; ignore
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Route the ``selfconsist`` logger to stderr, for the CLI: rich's handler on a terminal,
    plain timestamped lines otherwise (a log file, SLURM, CI). Library users configure
    ``logging`` themselves; without that, only warnings reach stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in [h for h in logger.handlers if getattr(h, "_selfconsist_cli", False)]:
        logger.removeHandler(h)
    handler: logging.Handler
    if stderr_is_terminal():
        from rich.console import Console
        from rich.logging import RichHandler

        # Console(stderr=True) resolves sys.stderr per write, so lines land above a live bar.
        handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False,
                              show_level=False, markup=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler._selfconsist_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def ensure_logging() -> None:
    """For a run with ``progress=True`` in a Python session where logging was never configured
    (no handler on ``selfconsist`` nor on the root logger): show the progress lines on stderr
    as the CLI does, at the logger's own level (INFO when unset). Any configuration the user
    made, even later with a root handler first, takes precedence over this default."""
    logger = logging.getLogger(LOGGER_NAME)
    if logger.handlers or logging.getLogger().handlers:
        return
    setup_logging(logger.level if logger.level != logging.NOTSET else logging.INFO)


def silenced() -> bool:
    """Whether the ``selfconsist`` logger was set above INFO (``--quiet``, or a library user's
    ``logging.getLogger("selfconsist").setLevel(logging.WARNING)``): then no bar either."""
    return log.level > logging.INFO


def format_duration(seconds: float) -> str:
    """2.34 → ``2.3 s``; 42.4 → ``42 s``; 125 → ``2:05``; 3725 → ``1:02:05``; unknown → ``?``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def format_terms(terms: dict[str, float]) -> list[str]:
    return [f"{k} {v:.4g}" for k, v in terms.items()]


class Progress:
    """Progress of a loop of ``total`` steps, on stderr.

    On a terminal: a rich bar sized to the terminal, whose text always keeps step/total, it/s
    and the ETA (80 columns also hold the first two or three ``terms``; wider terminals show
    more). Elsewhere (a log file, a pipe, CI): plain lines through the ``selfconsist`` logger,
    for the first step, then every ``every`` steps (default 5% of the run) or ``seconds``
    (30 s), whichever comes first, and the last step; each line holds step, every loss term,
    it/s and ETA, and an end line gives the duration. ``enabled=False`` shows nothing; so does
    a logger set above INFO (``--quiet``).
    """

    MIN_BAR = 10

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0, *,
                 every: int | None = None, seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, console: Any = None,
                 terminal: bool | None = None) -> None:
        self.enabled = enabled and total > 0 and not silenced()
        self.total, self.start, self.description = total, start, description
        self.every = every if every is not None else max(1, math.ceil(0.05 * total))
        self.seconds, self.clock, self._console = seconds, clock, console
        self.terminal = (terminal if terminal is not None
                         else console is not None or stderr_is_terminal())
        self._bar: Any = None
        self.step = start
        self._logged_step: int | None = None
        self._logged_at = 0.0
        self._terms: dict[str, float] = {}

    # --- timing -------------------------------------------------------------------------------
    def rate(self, now: float | None = None) -> float:
        """Steps per second since the loop began (or resumed)."""
        elapsed = (self.clock() if now is None else now) - self._t0
        done = self.step - self.start
        return done / elapsed if elapsed > 0 and done > 0 else float("nan")

    def eta(self, now: float | None = None) -> float:
        r = self.rate(now)
        return (self.total - self.step) / r if r > 0 else float("nan")

    def core(self, now: float | None = None) -> str:
        """``step/total, it/s, ETA``: the part of the line that is never dropped."""
        r = self.rate(now)
        rate = f"{r:.3g} it/s" if math.isfinite(r) else "– it/s"
        return f"{self.step}/{self.total} {rate} ETA {format_duration(self.eta(now))}"

    def bar_text(self, width: int) -> tuple[str, int]:
        """The text right of the bar and the bar's width, for a terminal ``width`` wide:
        step/total, it/s and ETA always, then as many terms (in order) as still fit."""
        fixed = len(self.description) + 2  # the description and the two column gaps
        text = self.core()
        for t in format_terms(self._terms):
            if fixed + self.MIN_BAR + len(text) + 2 + len(t) > width - 1:
                break
            text += "  " + t
        bar = max(self.MIN_BAR // 2, min(40, width - 1 - fixed - len(text)))
        return text, bar

    # --- context --------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        if self.enabled:
            ensure_logging()
        self._t0 = self._logged_at = self.clock()
        if self.enabled and self.terminal:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn
            from rich.progress import Progress as RP

            console = self._console or Console(stderr=True)
            self._width = console.width
            self._barcol = BarColumn(bar_width=20)
            self._bar = RP(TextColumn("[bold]{task.description}"), self._barcol,
                           TextColumn("{task.fields[info]}", markup=False),
                           console=console, transient=False, expand=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total,
                                            completed=self.start, info=self.core())
        return self

    def update(self, step: int, terms: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.step, self._terms = step, dict(terms)
        if self._bar is not None:
            text, width = self.bar_text(self._width)
            self._barcol.bar_width = width
            self._bar.update(self._task, completed=step, info=text)
            return
        now = self.clock()
        if (self._logged_step is None or step >= self._logged_step + self.every
                or now - self._logged_at >= self.seconds or step >= self.total):
            self._logged_step, self._logged_at = step, now
            log.info("%s: step %s (%d%%)  %s", self.description, self.core(now),
                     100 * step // self.total, "  ".join(format_terms(self._terms)))

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, *exc)
        if not self.enabled:
            return
        elapsed = self.clock() - self._t0
        r = self.rate()
        speed = f", {r:.3g} it/s" if math.isfinite(r) else ""
        if exc_type is None:
            log.info("%s: %d steps done in %s%s", self.description, self.step - self.start,
                     format_duration(elapsed), speed)
        else:
            log.info("%s: stopped at step %d/%d after %s", self.description, self.step,
                     self.total, format_duration(elapsed))

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
def stage(message: str, enabled: bool = True, detail: str = "") -> Iterator[None]:
    """Log the start of a phase (with ``detail``) and, at its end, how long it took (INFO on
    the ``selfconsist`` logger)."""
    t0 = time.monotonic()
    if enabled:
        ensure_logging()
        log.info("%s%s …", message, f" ({detail})" if detail else "")
    yield
    if enabled:
        log.info("%s: done in %s", message, format_duration(time.monotonic() - t0))


class Stages:
    """Progress over a known number of stages (``eval``): a rich bar with the current stage on
    a terminal; otherwise one log line when a stage starts and one with its duration when it
    ends. Disabled (or under ``--quiet``) it shows nothing.

    ``stage()`` yields a ``tick(done, total)`` function for long stages: on a terminal it shows
    ``(done/total)`` beside the stage's name; in a log, one line with the ETA at most every
    ``seconds``.
    """

    def __init__(self, total: int, description: str, enabled: bool = True,
                 seconds: float = 30.0) -> None:
        self.total, self.description, self.seconds = total, description, seconds
        self.enabled = enabled and not silenced()
        self._bar: Any = None
        self.done = 0

    def __enter__(self) -> Stages:
        self._t0 = time.monotonic()
        if self.enabled:
            ensure_logging()
        if self.enabled and stderr_is_terminal():
            from rich import progress as rp
            from rich.console import Console

            self._bar = rp.Progress(rp.TextColumn(f"[bold]{self.description}"), rp.BarColumn(),
                                    rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                                    rp.TextColumn("{task.description}", markup=False),
                                    console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self.total)
        return self

    @contextmanager
    def stage(self, name: str) -> Iterator[Callable[[int, int], None]]:
        t0 = time.monotonic()
        where = f"{self.description} [{self.done + 1}/{self.total}] {name}"
        if self._bar is not None:
            self._bar.update(self._task, description=name)
        elif self.enabled:
            log.info("%s …", where)
        last = [t0]

        def tick(done: int, total: int) -> None:
            if self._bar is not None:
                self._bar.update(self._task, description=f"{name} ({done}/{total})")
                return
            now = time.monotonic()
            if not self.enabled or now - last[0] < self.seconds or done >= total:
                return
            last[0] = now
            eta = (total - done) * (now - t0) / done if done > 0 else float("nan")
            log.info("%s: %d/%d, ETA %s", where, done, total, format_duration(eta))

        yield tick
        self.done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        elif self.enabled:
            log.info("%s: done in %s", where, format_duration(time.monotonic() - t0))

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, *exc)
        if self.enabled and exc_type is None:
            log.info("%s: %d stages done in %s", self.description, self.done,
                     format_duration(time.monotonic() - self._t0))


# --- SIGINT/SIGTERM: stop at a step boundary with a resumable state ----------------------------

class StopSignal(BaseException):
    """Raised inside a run when SIGINT/SIGTERM arrives (a BaseException, so that no
    ``except Exception`` on the way swallows it). ``forced``: a second signal that did not
    wait for the step boundary, so the state of the step in progress must not be saved."""

    def __init__(self, signum: int, forced: bool = False) -> None:
        super().__init__(signum)
        self.signum, self.forced = signum, forced


class SignalStop:
    """The signal state of a run under :func:`stop_on_signals`.

    ``checkpoint`` (set by the run once it has something to save) writes the resumable state
    and returns ``(step, state file)``. Inside :meth:`deferred` (a training step) a signal is
    only noted, and :meth:`check` raises it at the next step boundary; elsewhere (measurements)
    it raises at once. A second signal always raises at once and is not checkpointed.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.checkpoint: Callable[[], tuple[int, Path | None]] | None = None
        self._defer = False

    def handle(self, signum: int, frame: object = None) -> None:
        again = self.signum is not None
        self.signum = signum
        if again:
            raise StopSignal(signum, forced=True)
        if not self._defer:
            raise StopSignal(signum)

    def check(self) -> None:
        """At a step boundary: stop now if a signal has arrived."""
        if self.signum is not None:
            raise StopSignal(self.signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer = True
        try:
            yield
        finally:
            self._defer = False


_ACTIVE: list[SignalStop] = []


def current_stop() -> SignalStop:
    """The :class:`SignalStop` of the innermost :func:`stop_on_signals` (a detached one when
    there is none, e.g. outside the main thread), so runs can call it unconditionally."""
    return _ACTIVE[-1] if _ACTIVE else SignalStop()


@contextmanager
def stop_on_signals(what: str = "the run") -> Iterator[SignalStop]:
    """Turn SIGINT and SIGTERM into a clean stop: the run saves its resumable state at the
    current step (through ``checkpoint``) and :class:`~selfconsist.errors.Interrupted` is
    raised (exit code 128 + signal: 130 for SIGINT, 143 for SIGTERM). The previous handlers
    are restored on exit. Outside the main thread (where handlers cannot be set) it does
    nothing."""
    stop = SignalStop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in signals}
    for s in signals:
        signal.signal(s, stop.handle)
    _ACTIVE.append(stop)
    try:
        yield stop
    except StopSignal as e:
        name = signal.Signals(e.signum).name
        saved = None
        if stop.checkpoint is not None and not e.forced:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the save itself must not be cut
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            saved = stop.checkpoint()
        if saved is not None:
            step, path = saved
            raise Interrupted(f"{what} stopped by {name} at step {step}; its state is saved in "
                              f"{path}", e.signum, step, path) from None
        raise Interrupted(f"{what} stopped by {name}; nothing new was saved (a previous "
                          "periodic state, if any, is kept)", e.signum) from None
    finally:
        _ACTIVE.remove(stop)
        for s, h in old.items():
            signal.signal(s, h)


def stoppable(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a run function so that it runs under :func:`stop_on_signals`."""
    import functools

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with stop_on_signals(what):
                return fn(*args, **kwargs)

        return wrapper

    return deco
