"""Where bf16 starts to pay on CPU: tune's wall time in fp32 and bf16 for built-in MLPs of
growing size.

For each MLP (random weights: only the time matters), runs ``selfconsist.tune`` for ``--steps``
steps at batch 128 in fp32 and in bf16, alternated, ``--rounds`` times, and prints the encoder's
parameter count and the best wall time of each precision. ``--precision auto`` keeps fp32 on CPU
below ``runtime.CPU_BF16_MIN_ENCODER_PARAMS`` encoder parameters, a limit taken from this table.
Needs a CPU with bf16 units.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bf16_by_size.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import selfconsist
from selfconsist.adapters.builtin import BuiltinVAE
from selfconsist.models import ModelConfig
from selfconsist.runtime import cpu_has_bf16
from selfconsist.tune import TuneConfig

SIZES = [  # (data shape, hidden width, latent): the bundled digits MLP's size up to ColorMNIST's
    ((1, 8, 8), 96, 16), ((1, 8, 8), 200, 16), ((1, 16, 16), 200, 32), ((1, 28, 28), 200, 64),
    ((3, 28, 28), 200, 64),
]


def tune_seconds(cfg: ModelConfig, precision: str, steps: int) -> float:
    torch.manual_seed(0)
    vae = BuiltinVAE(cfg)
    t0 = time.perf_counter()
    selfconsist.tune(vae, TuneConfig(steps=steps, device="cpu", precision=precision, seed=0,
                                     eval_samples=64), progress=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if not cpu_has_bf16():
        raise SystemExit("this CPU has no bf16 units; nothing to compare")
    warm = ModelConfig(data_shape=SIZES[0][0], hidden=SIZES[0][1], latent_dim=SIZES[0][2])
    for precision in ("fp32", "bf16"):  # the first run of each pays the kernels' start-up
        tune_seconds(warm, precision, 20)
    for shape, hidden, latent in SIZES:
        cfg = ModelConfig(data_shape=shape, hidden=hidden, latent_dim=latent)
        secs: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            for precision in secs:
                secs[precision].append(tune_seconds(cfg, precision, args.steps))
        best = {k: min(v) for k, v in secs.items()}
        print(json.dumps({"data_shape": shape, "hidden": hidden, "latent": latent,
                          "encoder_params": BuiltinVAE(cfg).num_parameters()[0],
                          "fp32_s": round(best["fp32"], 2), "bf16_s": round(best["bf16"], 2),
                          "bf16_over_fp32": round(best["bf16"] / best["fp32"], 2)}), flush=True)


if __name__ == "__main__":
    main()
