"""Does bf16 change what tuning achieves? fp32 vs bf16 on the bundled example model.

Tunes ``examples/digits_mlp_vae.safetensors`` (or ``--model``) on the CPU with ``--precision
fp32`` (seeds 0 and 1: the seed-to-seed spread is the noise) and ``--precision bf16`` (seed 0),
with the same steps, and prints a markdown table of the after-figures (measured in fp32) and the
wall time of each run (after a short warm-up run of each precision). bf16 holds quality when
its distance from fp32 seed 0 is within the seed-to-seed spread plus the standard errors.

    python benchmarks/bf16_vs_fp32.py --steps 1000  # the tables of benchmarks/bf16_vs_fp32.md
    python benchmarks/bf16_vs_fp32.py --steps 1000 --model runs/cm/vae.safetensors  # ColorMNIST
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import selfconsist
from selfconsist.runtime import cpu_has_bf16
from selfconsist.tune import TuneConfig

MODEL = Path(__file__).resolve().parents[1] / "examples" / "digits_mlp_vae.safetensors"
FIGURES = ("sample_roundtrip_mse", "latent_roundtrip_corr", "consistency_kl")


def run(model: Path, precision: str, seed: int, steps: int) -> tuple[dict, float]:
    vae = selfconsist.load(model)
    t0 = time.perf_counter()
    res = selfconsist.tune(vae, TuneConfig(steps=steps, device="cpu", precision=precision, seed=seed,
                                           eval_samples=1024), progress=False)
    return res.after, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--model", type=Path, default=MODEL, help="a built-in VAE (.safetensors)")
    args = p.parse_args(argv)
    if not cpu_has_bf16():
        raise SystemExit("this CPU has no bf16 units; nothing to compare")
    rows = [("fp32", 0), ("fp32", 1), ("bf16", 0)]
    for prec in ("fp32", "bf16"):  # warm up: the first run of each would pay the kernels' start-up
        run(args.model, prec, 0, 20)
    results = {r: run(args.model, *r, args.steps) for r in rows}
    print(f"Tuned {args.model.name}, {args.steps} steps, batch 128, CPU; after-figures on 1024 prior "
          "samples (± stderr).\n")
    print("| run | " + " | ".join(FIGURES) + " | tune wall time (s) |")
    print("|---" * (len(FIGURES) + 2) + "|")
    for (prec, seed), (after, secs) in results.items():
        cells = [f"{after[f]['value']:.5g} ± {after[f]['stderr']:.2g}" for f in FIGURES]
        print(f"| {prec} seed {seed} | " + " | ".join(cells) + f" | {secs:.1f} |")


if __name__ == "__main__":
    main()
