"""In-process A/B of the ``selfconsist train`` (or ``tune``) step's variants on ColorMNIST: which
gemm, which way the gradients are computed, and whether denormals are flushed.

Each variant is a string ``STEP-GEMM-DENORMALS``:

* STEP ``hand`` (the built-in MLP's hand-derived step, ``selfconsist/mlp_step.py``) or
  ``autograd`` (``train.AutogradStep``; with ``--recipe tune``, ``posthoc_terms`` and backward);
  with ``--recipe tune`` also ``hand16`` (the hand-derived step in bf16, as ``tune --precision
  bf16`` runs the built-in MLP on CPU) and ``autocast`` (``posthoc_terms`` under bf16 autocast,
  as it ran before); the GEMM part concerns fp32 products only;
* GEMM ``mkl`` (PyTorch's default fp32 gemm) or ``onednn`` (``models.Linear`` on oneDNN);
* DENORMALS ``ftz`` (flushed to zero, as ``train`` runs on CPU) or ``keep``.

One VAE (MLP 4×200, latent 64, v 0.05, batch 64, Adam 1e-3; the side-by-side comparison's
model) is trained ``--warmup`` steps first, so that the weights and activations are those of a
run in progress (a fresh model makes no denormals); every variant then continues from a copy
of it, and the variants run in alternated blocks of ``--block`` steps, ``--blocks`` times. The
report is each variant's median steps/s and its paired-median ratio to the first variant: on a
shared machine whose speed drifts, only the ratios within one run mean anything.

``--recipe tune`` times ``tune``'s step instead, at the built-in family's resolved defaults
(batch 128, λ_rec 5, sample noise, the model's v), on the same warmed-up VAE as base model.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/train_step_ab.py --objective avae \\
        --variants autograd-onednn-keep,autograd-mkl-keep,hand-mkl-keep,hand-mkl-ftz
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def variant_step(base, base_opt, rho: float | None, step: str, x_all: torch.Tensor, seed: int
                 ) -> Callable[[], float]:
    """One train step of a copy of ``base`` (model and Adam state) by the ``step`` kind."""
    from selfconsist.runtime import adam
    from selfconsist.train import train_step

    vae = copy.deepcopy(base)
    params = list(vae.encoder_parameters()) + list(vae.decoder_parameters())
    opt = adam(params, 1e-3, torch.device("cpu"))
    opt.load_state_dict(base_opt.state_dict())
    gen = torch.Generator().manual_seed(seed)
    if step == "hand16":
        from selfconsist.mlp_step import MLPTrainStep
        step_fn = MLPTrainStep(vae, rho, dtype=torch.bfloat16)
    else:
        step_fn = train_step(vae, rho, hand=step == "hand")

    def run() -> float:
        idx = torch.randint(x_all.shape[0], (64,), generator=gen)
        loss, _ = step_fn(x_all.index_select(0, idx), gen)
        opt.step()
        return loss.item()  # train's per-step finite check

    return run


def tune_variant_step(base, step: str, seed: int) -> Callable[[], float]:
    """``tune``'s step on a copy of ``base`` at the built-in family's defaults, by ``step``."""
    from selfconsist import mlp_step
    from selfconsist.posthoc import avae_loss, posthoc_terms
    from selfconsist.runtime import adam, autocast
    from selfconsist.tune import TuneConfig, resolve_config

    vae = copy.deepcopy(base)
    cfg = resolve_config(vae, TuneConfig(device="cpu")).config
    vae.freeze_decoder()
    params = [p for p in vae.encoder_parameters() if p.requires_grad]
    opt = adam(params, cfg.lr, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    precision = "bf16" if step in ("hand16", "autocast") else "fp32"
    hand = mlp_step.MLPTuneStep(vae, cfg, precision) if step.startswith("hand") else None

    def run() -> float:
        z0 = vae.sample_prior(cfg.batch_size, gen)
        if hand is not None:
            loss, _ = hand(z0, vae.obs_var, gen)
        else:
            with autocast(torch.device("cpu"), precision):
                loss = avae_loss(posthoc_terms(vae, z0, cfg, vae.obs_var, gen), cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        return loss.item()

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", type=Path, default=Path("/work/shared/data/mnist"))
    p.add_argument("--recipe", choices=("train", "tune"), default="train")
    p.add_argument("--objective", choices=("vae", "avae"), default="avae", help="train's objective")
    p.add_argument("--variants", default="autograd-mkl-keep,hand-mkl-keep,hand-mkl-ftz")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--block", type=int, default=30)
    args = p.parse_args(argv)

    from selfconsist import models
    from selfconsist.data import load_dataset
    from selfconsist.models import ModelConfig
    from selfconsist.runtime import adam, keep_freed_memory
    from selfconsist.train import AutogradStep, new_model

    keep_freed_memory(torch.device("cpu"))
    x_all = load_dataset(f"colormnist:{args.mnist}", seed=0).x[:8000]
    rho = 0.975 if args.objective == "avae" else None
    base = new_model(ModelConfig(data_shape=tuple(x_all.shape[1:]), latent_dim=64, hidden=200,
                                 depth=4, obs_var=0.05), seed=0)
    opt = adam(list(base.encoder_parameters()) + list(base.decoder_parameters()), 1e-3,
               torch.device("cpu"))
    warm, gen = AutogradStep(base, rho), torch.Generator().manual_seed(0)
    for _ in range(args.warmup):
        warm(x_all.index_select(0, torch.randint(x_all.shape[0], (64,), generator=gen)), gen)
        opt.step()

    names = args.variants.split(",")
    runs = {}
    for name in names:
        step, gemm, denormals = name.split("-")
        steps = ("hand", "autograd", "hand16") + (("autocast",) if args.recipe == "tune" else ())
        if step not in steps or gemm not in ("mkl", "onednn") or denormals not in ("ftz", "keep"):
            p.error(f"bad variant {name!r}: STEP-GEMM-DENORMALS, e.g. hand-mkl-ftz")
        run = (variant_step(base, opt, rho, step, x_all, 1) if args.recipe == "train"
               else tune_variant_step(base, step, 1))
        runs[name] = (gemm == "onednn", denormals == "ftz", run, [])
    was = models.ONEDNN_LINEAR["on"]
    try:
        for _ in range(args.blocks):
            for onednn, ftz, run, rates in runs.values():
                models.use_onednn_linear(onednn)
                torch.set_flush_denormal(ftz)
                for _ in range(3):
                    run()
                t0 = time.perf_counter()
                for _ in range(args.block):
                    run()
                rates.append(args.block / (time.perf_counter() - t0))
    finally:
        torch.set_flush_denormal(False)
        models.use_onednn_linear(was)
    ref = runs[names[0]][3]
    print(json.dumps({"recipe": args.recipe, "objective": args.objective, "threads": torch.get_num_threads(),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
    for name, (_, _, _, rates) in runs.items():
        print(json.dumps({"variant": name, "steps_per_s": round(statistics.median(rates), 1),
                          f"ratio_to_{names[0]}": round(statistics.median(
                              [a / b for a, b in zip(rates, ref, strict=True)]), 3)}))


if __name__ == "__main__":
    main()
