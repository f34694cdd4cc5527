"""selfconsist against the authors' JAX code, side by side: steps/s, start-up and whole runs.

Both train the paper's ColorMNIST MLP VAE (4×200 ReLU, latent 64, v 0.05, Adam 1e-3, batch 64)
from scratch, as a plain VAE and as an AVAE (ρ 0.975), on the same arrays: ColorMNIST built by
selfconsist's own data code from the MNIST test set (the first 8000 images train, the last 2000
are the official code's test split), written once as ``train.npy``/``test.npy``. Each round runs
the official ``python -m avae.train_main`` and ``selfconsist train`` with the same settings, both
pinned to one core with ``taskset -c CORE`` and ``OMP_NUM_THREADS=1``, in alternating order
(official first in even rounds). Reported, per round and as paired medians of the ratio
selfconsist/official:

* steady-state steps/s between two timing marks (default after steps 200 and 1200), by the wall
  clock and by process CPU time (the CPU time is less sensitive to a shared machine);
* start-up: from launching the command to the end of step 0 (imports, data, model build, and
  the official code's jit compile);
* the whole command's wall time.

``--precisions fp32,bf16`` runs ``selfconsist train`` once per precision in each round (``train
--precision``; bf16 needs a CPU with bf16 units), each compared with the same round's official
run; the official code runs fp32 (JAX's default). The order of the sides rotates each round.

The official code prints ``TIMING step perf_counter`` / ``CPUTIME step process_time`` after the
steps in ``$AVAE_TIME_MARKS`` (the patch in ``../shared/peer``; see its README). selfconsist runs
as its real command (``selfconsist.cli.main``) in a child of this script that prints the same
marks from a global optimiser post-step hook; ``time.perf_counter`` is the system-wide monotonic
clock on Linux, so launch and marks compare across processes.

Not part of CI: it needs jax. The official code runs in a venv of its own, made by ``--make-venv``
(or by hand: ``python -m venv /tmp/jaxvenv && /tmp/jaxvenv/bin/pip install jax==0.10.2
jaxlib==0.10.2 dm-haiku==0.0.17 optax==0.2.8 numpy dill absl-py``, the versions that ran here).

    python benchmarks/bench_vs_official.py --peer ../shared/peer --mnist /work/shared/data/mnist \\
        --rounds 5 --core 1 --md benchmarks/vs_official.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JAX_PINS = ["jax==0.10.2", "jaxlib==0.10.2", "dm-haiku==0.0.17", "optax==0.2.8", "numpy", "dill",
            "absl-py"]
REPO = Path(__file__).resolve().parent.parent


def make_venv(path: Path) -> Path:
    """The official code's venv at ``path`` (created and installed when missing)."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *JAX_PINS], check=True)
    return python


def write_arrays(mnist: Path, folder: Path, n_train: int = 8000) -> None:
    """ColorMNIST from the MNIST test set by selfconsist's data code: train.npy, test.npy."""
    import numpy as np

    from selfconsist.data import load_dataset

    x = load_dataset(f"colormnist:{mnist}", seed=0).x.numpy().astype("float32")
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train.npy", x[:n_train])
    np.save(folder / "test.npy", x[n_train:])


def parse_marks(text: str) -> dict[str, dict[int, float]]:
    marks: dict[str, dict[int, float]] = {"TIMING": {}, "CPUTIME": {}}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in marks:
            marks[parts[0]][int(parts[1])] = float(parts[2])
    return marks


def run_one(cmd: list[str], env: dict[str, str], cwd: Path, marks: tuple[int, int]) -> dict[str, float]:
    t_launch = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    t_end = time.perf_counter()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    m = parse_marks(p.stderr)
    a, b = marks
    wall, cpu = m["TIMING"], m["CPUTIME"]
    return {"steps_per_s": (b - a) / (wall[b] - wall[a]), "steps_per_cpu_s": (b - a) / (cpu[b] - cpu[a]),
            "startup_s": wall[0] - t_launch, "whole_s": t_end - t_launch}


def official_cmd(python: Path, objective: str, steps: int, core: int, ckpt: str) -> list[str]:
    return ["taskset", "-c", str(core), str(python), "-m", "avae.train_main", f"--model={objective}",
            "--latent_dim=64", "--obs_var=0.05", "--rho=0.975", "--learning_rate=1e-3",
            "--train_batch_size=64", f"--iterations={steps}", f"--checkpoint_dir={ckpt}",
            "--checkpoint_every=100000000", "--test_every=100000000"]


def selfconsist_cmd(objective: str, steps: int, core: int, data: Path, out: str,
                    precision: str = "fp32") -> list[str]:
    return ["taskset", "-c", str(core), sys.executable, str(Path(__file__).resolve()), "--child", "--",
            "train", "--out", out, "--data", str(data / "train.npy"), "--objective", objective,
            "--steps", str(steps), "--batch-size", "64", "--lr", "1e-3", "--obs-var", "0.05",
            "--rho", "0.975", "--latent-dim", "64", "--hidden", "200", "--depth", "4",
            "--device", "cpu", "--save-every", "100000000", "--precision", precision]


def child(argv: list[str]) -> None:
    """Run ``selfconsist ARGV`` and print the official code's TIMING/CPUTIME marks after the
    optimiser steps listed in $AVAE_TIME_MARKS (0-based, as the official loop counts)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from selfconsist.cli import main

    wanted = {int(m) for m in os.environ.get("AVAE_TIME_MARKS", "").split(",") if m}
    count = [0]

    def hook(opt, args, kwargs) -> None:
        step = count[0]
        count[0] += 1
        if step in wanted:
            print(f"TIMING {step} {time.perf_counter():.6f}", file=sys.stderr, flush=True)
            print(f"CPUTIME {step} {time.process_time():.6f}", file=sys.stderr, flush=True)

    register_optimizer_step_post_hook(hook)
    sys.argv = ["selfconsist", *argv]
    main()


def table(results: dict[str, list[dict[str, dict[str, float]]]]) -> list[str]:
    """One row per objective, selfconsist precision (side ``selfconsist-PRECISION``) and measure."""
    rows = ["| objective | precision | measure | selfconsist | official "
            "| ratio sc/official, paired median (min–max) |",
            "|---|---|---|---|---|---|"]
    labels = {"steps_per_s": "steady steps/s (wall)", "steps_per_cpu_s": "steady steps/s (CPU time)",
              "startup_s": "start-up s (launch → end of step 0)", "whole_s": "whole command s"}
    for objective, rounds in results.items():
        for side in sorted((k for k in rounds[0] if k != "official"), reverse=True):  # fp32 first
            for key, label in labels.items():
                sc = [r[side][key] for r in rounds]
                of = [r["official"][key] for r in rounds]
                ratios = [s / o for s, o in zip(sc, of, strict=True)]
                if key in ("startup_s", "whole_s"):  # time: official/selfconsist is the speed-up
                    ratios = [o / s for s, o in zip(sc, of, strict=True)]
                rows.append(f"| {objective} | {side.partition('-')[2]} | {label} | {statistics.median(sc):.3g} | "
                            f"{statistics.median(of):.3g} | **{statistics.median(ratios):.2f}×** "
                            f"({min(ratios):.2f}–{max(ratios):.2f}) |")
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", type=Path, default=REPO.parent / "shared" / "peer",
                   help="the patched official code (a folder holding avae/)")
    p.add_argument("--jax-venv", type=Path, default=Path("/tmp/jaxvenv"))
    p.add_argument("--make-venv", action="store_true", help="create --jax-venv if it is missing")
    p.add_argument("--mnist", type=Path, default=Path("/work/shared/data/mnist"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--core", type=int, default=1)
    p.add_argument("--steps", type=int, default=1201)
    p.add_argument("--marks", default="200,1200")
    p.add_argument("--objectives", default="vae,avae")
    p.add_argument("--precisions", default="fp32", help="selfconsist train --precision, one run each")
    p.add_argument("--md", type=Path, default=None, help="write the results table here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    python = make_venv(args.jax_venv) if args.make_venv else args.jax_venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"{python} not found: pass --make-venv or --jax-venv")
    a, b = (int(m) for m in args.marks.split(","))
    work = Path(tempfile.mkdtemp(prefix="vs_official_"))
    write_arrays(args.mnist, work / "data")
    env = {**os.environ, "AVAE_DATA": str(work / "data"), "AVAE_TIME_MARKS": f"0,{a},{b}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    results: dict[str, list[dict[str, dict[str, float]]]] = {}
    for r in range(args.rounds):
        for objective in args.objectives.split(","):
            precisions = args.precisions.split(",")
            sides = ["official", *(f"selfconsist-{q}" for q in precisions)]
            sides = sides[r % len(sides):] + sides[:r % len(sides)]  # rotate the order
            row = {}
            for side in sides:
                run_dir = Path(tempfile.mkdtemp(dir=work))
                if side == "official":
                    cmd, cwd = official_cmd(python, objective, args.steps, args.core, str(run_dir)), args.peer
                else:
                    cmd, cwd = selfconsist_cmd(objective, args.steps, args.core, work / "data",
                                               str(run_dir / "m.safetensors"), side.partition("-")[2]), REPO
                row[side] = run_one(cmd, env, cwd, (a, b))
            results.setdefault(objective, []).append(row)
            print(json.dumps({"round": r, "objective": objective, **row}), flush=True)
    rows = table(results)
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.md:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        cmdline = "python benchmarks/bench_vs_official.py " + " ".join(argv)
        args.md.write_text(
            "# selfconsist against the official AVAE code\n\n"
            f"{datetime.date.today().isoformat()}, commit {commit}, {args.rounds} rounds, "
            f"both `taskset -c {args.core}` with `OMP_NUM_THREADS=1`, alternated; steady state "
            f"between steps {a} and {b} of {args.steps}; ColorMNIST MLP 4×200, latent 64, batch 64, "
            f"v 0.05, ρ 0.975, Adam 1e-3. CPU: {cpu_description()}. On the shared 2-core dev "
            "machine (other jobs running), so compare the paired ratios, not the absolute rates.\n\n"
            f"    {cmdline}\n\n" + "\n".join(rows) + "\n")


def cpu_description() -> str:
    """Vendor, family and model as /proc/cpuinfo gives them, and PyTorch's vector capability:
    which gemm is faster depends on them (``models._onednn_is_faster``)."""
    import torch

    from selfconsist import runtime

    return (f"{runtime.cpu_vendor() or 'unknown vendor'}, family {runtime.cpu_family()}, model "
            f"{runtime.cpuinfo_field('model') or '?'}, {torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
