"""Does ``train``'s hand-derived MLP step train as well as the autograd step, and in bf16 as well
as in fp32?

Trains the ColorMNIST MLP VAE (the side-by-side comparison's model: 4×200, latent 64, v 0.05,
batch 64, Adam 1e-3) with each step for ``--steps`` on the first 8000 images of the MNIST test
set, for each seed and objective, and prints the held-out ELBO (one posterior sample per image,
generator seeded 5), the reconstruction error at the posterior mean and the latent round trip
(‖μ(g(μ(x))) − μ(x)‖² per latent unit: what the AVAE makes small) on the last 2000. Each
variant is ``STEP-PRECISION``: ``hand`` or ``autograd``, ``fp32`` or ``bf16`` (``train
--precision``). Variants round differently, so their runs part over time like two seeds' runs;
what counts is that the gap between variants is inside the gap between seeds.

    python benchmarks/train_step_quality.py --mnist ../shared/data/mnist --steps 3000 --seeds 0,1
    python benchmarks/train_step_quality.py --variants hand-fp32,hand-bf16 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", type=Path, default=Path("/work/shared/data/mnist"))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--objectives", default="vae,avae")
    p.add_argument("--variants", default="hand-fp32,autograd-fp32")
    args = p.parse_args(argv)

    from selfconsist import mlp_step
    from selfconsist.data import Dataset, load_dataset
    from selfconsist.train import TrainConfig, avae_step_terms, train

    x = load_dataset(f"colormnist:{args.mnist}", seed=0).x
    data, held_out = Dataset(x=x[:8000], name="colormnist"), x[8000:]
    out = Path(tempfile.mkdtemp(prefix="step_quality_"))
    was = mlp_step.ENABLED["on"]
    try:
        for objective in args.objectives.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                for variant in args.variants.split(","):
                    step, precision = variant.split("-")
                    mlp_step.ENABLED["on"] = step == "hand"
                    cfg = TrainConfig(objective=objective, seed=seed, steps=args.steps, lr=1e-3,
                                      obs_var=0.05, save_every=10**9, precision=precision, device="cpu")
                    t0 = time.perf_counter()
                    vae = train(cfg, out / f"{objective}_{seed}_{variant}.safetensors", progress=False,
                                data=data)
                    seconds = time.perf_counter() - t0
                    with torch.no_grad():
                        t = avae_step_terms(vae, held_out, torch.Generator().manual_seed(5), None)
                        mu = vae.encode(held_out).mean
                        recon = vae.decode(mu) - held_out
                        latent_rt = (vae.encode(vae.decode(mu)).mean - mu).pow(2).mean()
                    print(json.dumps({"objective": objective, "seed": seed, "variant": variant,
                                      "held_out_elbo": round(float((t["log_lik"] - t["kl"]).mean()), 2),
                                      "recon_sq_err": round(float(recon.pow(2).sum((1, 2, 3)).mean()), 3),
                                      "latent_roundtrip": round(float(latent_rt), 4),
                                      "seconds": round(seconds, 1)}),
                          flush=True)
    finally:
        mlp_step.ENABLED["on"] = was


if __name__ == "__main__":
    main()
