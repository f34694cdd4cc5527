"""Wall time of a short ``selfconsist tune`` on an SD-1.x-sized VAE: the fixed costs' benchmark.

Builds the SD 1.x VAE architecture (``AutoencoderKL`` with the configuration of
``bench_sd_vae.py``, random weights: time does not depend on the values), saves it as a
diffusers folder, and times the CLI end to end, model load included:

    python benchmarks/bench_fixed_cost.py                 # tune --image-size 64 --steps 2 --batch-size 1
    python benchmarks/bench_fixed_cost.py --steps 20

Target (issue 13): ≤ 2 minutes on the 2-core dev machine. Before the measurement was sized to
the run, this command spent > 14 minutes probing 256 latent elements × 64 samples.
Prints one JSON line: seconds, the command, and the before/after measurement tune chose.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sd_vae import SD_VAE  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "sd-vae"
        AutoencoderKL(**SD_VAE).save_pretrained(model_dir)
        cmd = [sys.executable, "-m", "selfconsist", "tune", str(model_dir),
               "--image-size", str(args.image_size), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--device", "cpu",
               "--out", str(Path(tmp) / "tuned")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(proc.returncode)
    plan = [ln for ln in proc.stderr.splitlines() if "measuring before" in ln]
    result = {"seconds": round(seconds, 1), "command": " ".join(["selfconsist", *cmd[3:-2]]),
              "measurement": plan[0] if plan else None, "threads": torch.get_num_threads()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
