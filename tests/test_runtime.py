"""Progress lines off a terminal, the 80-column bar, and stopping on SIGINT/SIGTERM."""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from selfconsist.errors import Interrupted
from selfconsist.runtime import Progress, format_duration, stop_on_signals

from .conftest import run_cli

TERMS = {"loss": -143.8, "cons/elem": 1.058, "log_lik": 36.26, "kl": 20.58, "C": -16.95}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def records():
    """Everything the ``selfconsist`` logger emits at INFO, as formatted lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("selfconsist")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: stream.getvalue().splitlines()
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_log_lines_first_every_5_percent_and_last(records) -> None:
    clock = Clock()
    with Progress(100, "tune", clock=clock, terminal=False) as bar:
        for step in range(1, 101):
            clock.t += 0.1  # 10 it/s
            bar.update(step, TERMS)
    lines = records()
    steps = [int(re.search(r"step (\d+)/100", ln).group(1)) for ln in lines if " step " in ln]
    assert steps[0] == 1 and steps[-1] == 100
    assert all(b - a <= 5 for a, b in zip(steps, steps[1:], strict=False))  # at least every 5% of the run
    assert len(steps) == 21  # 1, 6, …, 96, 100: not every step
    first = lines[0]
    # step, rate, ETA (99 steps at 10 it/s) and every loss term
    assert "tune: step 1/100 10 it/s ETA 9.9 s (1%)" in first
    for k in TERMS:
        assert f"{k} " in first
    assert lines[-1] == "tune: 100 steps done in 10 s, 10 it/s"


def test_log_lines_every_30_seconds_when_steps_are_slow(records) -> None:
    clock = Clock()
    with Progress(10_000, "train vae", clock=clock, terminal=False, start=200) as bar:
        for step in range(201, 211):
            clock.t += 20.0  # 0.05 it/s: 5% of the run would take 8 hours
            bar.update(step, {"loss": 1.0})
    steps = [int(re.search(r"step (\d+)/", ln).group(1)) for ln in records() if " step " in ln]
    assert steps == [201, 203, 205, 207, 209]  # the first, then each 30 s (every 2nd step)
    assert re.search(r"ETA 54:26:\d\d", records()[0])  # 9799 steps at 0.05 it/s


def test_quiet_logger_prints_nothing(records) -> None:
    logging.getLogger("selfconsist").setLevel(logging.WARNING)
    with Progress(10, "tune", terminal=False) as bar:
        bar.update(1, TERMS)
    assert records() == []


@pytest.mark.parametrize("width", [80, 120])
def test_bar_fits_the_terminal_and_keeps_step_rate_and_eta(width: int) -> None:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    clock = Clock()
    with Progress(5000, "tune", clock=clock, console=console) as bar:
        clock.t += 10.0
        bar.update(150, TERMS)
        out = Console(file=io.StringIO(), width=width, color_system=None)
        out.print(bar._bar.get_renderable())
        text = out.file.getvalue()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0]) <= width, text
    line = lines[0]
    assert "150/5000" in line and "15 it/s" in line and "ETA 5:23" in line and "…" not in line
    shown = [k for k in TERMS if f" {k} " in line]
    assert shown[:2] == ["loss", "cons/elem"]  # the most telling terms come first
    if width == 120:
        assert len(shown) == len(TERMS)


def test_format_duration() -> None:
    assert format_duration(2.34) == "2.3 s"
    assert format_duration(42.4) == "42 s"
    assert format_duration(125) == "2:05"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"


def test_stop_on_signals_defers_to_the_step_boundary_and_saves() -> None:
    saved = []
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as err:
        with stop_on_signals("tune") as stop:
            stop.checkpoint = lambda: (saved.append(7) or 7, Path("x.state.pt"))
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGTERM)  # noted, not raised, mid-step
                assert stop.signum == signal.SIGTERM
                stop.check()  # the step boundary
    assert saved == [7] and err.value.step == 7 and err.value.exit_code == 143
    assert "SIGTERM" in str(err.value) and "x.state.pt" in str(err.value)
    assert signal.getsignal(signal.SIGTERM) is old  # handlers restored


def test_a_second_signal_stops_at_once_without_saving() -> None:
    saved = []
    with pytest.raises(Interrupted) as err:
        with stop_on_signals("train") as stop:
            stop.checkpoint = lambda: (saved.append(1) or 1, None)
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
    assert saved == [] and err.value.step is None and err.value.exit_code == 130


def _tensors(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def _run_until_progress(args: list[str], sig: int) -> tuple[int, list[str]]:
    """Start the CLI with stderr piped (not a terminal), send ``sig`` once its first progress
    line appears, and return (exit code, stderr lines)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "selfconsist", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if " step " in line:
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, lines + rest.splitlines()


def test_sigterm_saves_the_state_says_how_to_resume_and_resumes_exactly(tmp_path, digits_model):
    args = ["--steps", "300", "--batch-size", "32", "--eval-samples", "128", "--device", "cpu",
            "--seed", "5", "--save-every", "100000"]  # no periodic state: only the signal's
    full = tmp_path / "full.safetensors"
    r = run_cli("tune", str(digits_model), "--out", str(full), *args)
    assert r.returncode == 0, r.stderr
    # Off a terminal, progress is plain log lines: stage start/end, step lines, the end.
    assert re.search(r"tune: step 1/300 [\d.]+ it/s ETA \S+ .*loss .*cons/elem", r.stderr)
    assert "tune: step 300/300" in r.stderr and "steps done in" in r.stderr
    assert re.search(r"tune: measuring before: decoder responses \(round trip n=128.* …", r.stderr)
    assert re.search(r"tune: measuring before: round trip: done in [\d.]+ s", r.stderr)

    out = tmp_path / "stopped.safetensors"
    code, err = _run_until_progress(["tune", str(digits_model), "--out", str(out), *args],
                                    signal.SIGTERM)
    assert code == 143, "\n".join(err)
    stopped = [ln for ln in err if ln.startswith("Stopped:")]
    assert len(stopped) == 1 and "SIGTERM" in stopped[0], err
    assert not out.exists() and Path(f"{out}.state.pt").exists()
    step = int(re.search(r"at step (\d+)", stopped[0]).group(1))
    assert 1 <= step < 300
    command = shlex.split(stopped[0].split("resume with: ", 1)[1])
    assert command[0] == "selfconsist" and command[-1] == "--resume"
    r = run_cli(*command[1:])
    assert r.returncode == 0, r.stderr
    a, b = _tensors(full), _tensors(out)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)  # as if never stopped


def test_sigint_stops_train_with_130_and_quiet_silences_progress(tmp_path):
    out = tmp_path / "t.safetensors"
    args = ["train", "--out", str(out), "--steps", "3000", "--latent-dim", "4", "--device", "cpu",
            "--save-every", "100000"]
    code, err = _run_until_progress(args, signal.SIGINT)
    assert code == 130, "\n".join(err)
    assert sum(ln.startswith("Stopped:") for ln in err) == 1
    assert Path(f"{out}.state.pt").exists() and not out.exists()
    r = run_cli("-q", *args, "--resume")
    assert r.returncode == 0 and out.exists(), r.stderr
    assert r.stderr == ""  # --quiet: no progress, no log lines


def test_python_api_logs_progress_when_logging_is_not_configured(tmp_path, digits_model):
    # A script under nohup/SLURM that calls selfconsist.tune(progress=True) and configures no
    # logging still gets the plain progress lines on stderr; a configured logger wins.
    code = ("import sys, selfconsist; from selfconsist import TuneConfig; "
            "selfconsist.tune(sys.argv[1], TuneConfig(steps=20, batch_size=8, eval_samples=16, "
            "device='cpu'))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(digits_model)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tune: step 1/20" in r.stderr and "tune: step 20/20" in r.stderr
    # ERROR: the digits model's latents may move past the shift warning's threshold here
    quiet = ("import logging; logging.getLogger('selfconsist').setLevel(logging.ERROR); "
             + code)
    r = subprocess.run([sys.executable, "-c", quiet, str(digits_model)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_long_stages_report_their_own_progress(records) -> None:
    from selfconsist.runtime import Stages

    with Stages(2, "eval", seconds=0.0) as stages:
        with stages.stage("model: PGD shift (samples)") as tick:
            for done in range(1, 5):
                tick(done, 4)
        with stages.stage("report"):
            pass
    lines = records()
    assert lines[0] == "eval [1/2] model: PGD shift (samples) …"
    ticks = [ln for ln in lines if re.search(r"\d/4, ETA", ln)]
    assert [ln.split(": ")[-1].split(",")[0] for ln in ticks] == ["1/4", "2/4", "3/4"]
    assert re.match(r"eval \[1/2\] model: PGD shift \(samples\): done in [\d.]+ s$", lines[4])
    assert lines[-1].startswith("eval: 2 stages done in")


def test_keep_freed_memory_stops_the_per_step_page_faults() -> None:
    """On glibc, after keep_freed_memory a train-sized alloc/free cycle faults no pages back in."""
    import resource

    import torch

    from selfconsist.runtime import keep_freed_memory

    assert keep_freed_memory(torch.device("meta")) in (False, True)  # off CPU: nothing changes
    kept = keep_freed_memory(torch.device("cpu"))
    assert keep_freed_memory(torch.device("cpu")) == kept  # idempotent
    if not (sys.platform.startswith("linux") and kept):
        pytest.skip("not glibc")

    def cycle() -> None:
        for _ in range(5):
            t = torch.empty(2352 * 200)  # the ColorMNIST MLP's largest gradient, 1.9 MB
            t.fill_(1.0)
            del t

    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 50


def test_load_state_checks_settings_added_later_and_the_precision_that_ran(tmp_path):
    from selfconsist.errors import SelfconsistError
    from selfconsist.io import atomic_torch_save, json_meta, load_state

    path = tmp_path / "s.state.pt"
    atomic_torch_save({"config": json_meta({"lr": 1e-3}), "precision": "bf16"}, path)
    # a setting added since the state was written counts as the value older runs had
    assert load_state(path, config=json_meta({"lr": 1e-3, "precision": "fp32"}), added={"precision": "fp32"})
    with pytest.raises(SelfconsistError, match="other settings"):
        load_state(path, config=json_meta({"lr": 1e-3, "precision": "bf16"}), added={"precision": "fp32"})
    with pytest.raises(SelfconsistError, match="other settings"):
        load_state(path, config=json_meta({"lr": 1e-3, "precision": "fp32"}))
    # the precision that ran must be the one this run resolves to
    with pytest.raises(SelfconsistError, match="run in bf16.*--precision bf16"):
        load_state(path, precision="fp32")
    assert load_state(path, precision="bf16")["precision"] == "bf16"
    atomic_torch_save({"config": json_meta({"lr": 1e-3})}, path)  # older: precision not recorded
    assert "precision" not in load_state(path, precision="fp32")


def test_resolve_device_names_what_it_takes():
    import torch

    from selfconsist.errors import SelfconsistError
    from selfconsist.runtime import DEVICES, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SelfconsistError, match=f"unknown device 'gpu'; use {DEVICES}"):
        resolve_device("gpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(SelfconsistError, match="no MPS device"):
            resolve_device("mps")
