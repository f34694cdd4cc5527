"""CPU step speed of ``tune``: time, achieved GFLOP/s and share of the measured gemm peak.

Also a minimal hand-written loop with the same passes (the overhead floor), and the ``train``
step of the MLP at batch 64.
For the ColorMNIST MLP VAE (3×28×28, 4×200, 64 latents; batch 128) and a conv VAE (built-in
conv, 3×64×64, channels 64/128/128; batch 8), times the tune step (``posthoc_terms`` + backward
+ Adam, as ``selfconsist tune`` runs it) under

* ``fp32-unfused``: eager fp32 with PyTorch's default (foreach) Adam, as tune ran before;
* ``fp32``: eager fp32 (autograd), fused Adam, as ``tune`` runs the conv VAE;
* ``fp32-hand`` (MLP only): the hand-derived step (``mlp_step.MLPTuneStep``), as ``tune`` runs
  the built-in MLP in fp32 on CPU;
* ``fast``: bf16 autocast (CPUs with bf16 units only), fused Adam, channels_last for the conv,
  as ``tune --precision bf16`` runs the conv VAE;
* ``fast-hand`` (MLP only): the hand-derived step in bf16 (``MLPTuneStep(..., "bf16")``), as
  ``tune --precision bf16`` runs the built-in MLP on CPU.

``--linear default`` runs the built-in models' fp32 linear layers on PyTorch's default gemm
(MKL), ``--linear onednn`` on oneDNN (``models.Linear``); ``--malloc default`` leaves glibc's
allocator as it is (how tune and train ran before issue 22). By default the benchmark runs as
they do now: oneDNN on AMD CPUs with full-width AVX-512 (Zen 5), MKL elsewhere, and
``runtime.keep_freed_memory`` first. The ``train`` rows run the step with autograd (three Adam
variants) and the built-in MLP's hand-derived step (``selfconsist/mlp_step.py``).

FLOPs per step come from ``torch.utils.flop_counter`` (matmuls and convs); the peak is the best
single-thread 1024² sgemm (and bf16 gemm) rate of PyTorch's default gemm, and oneDNN's fp32 rate
(``of_best_fp32_gemm_peak`` divides by the faster of the two), measured in the same process so the ratio is
robust to the machine's load.

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def gemm_peak(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """Best GFLOP/s of an n×n×n matmul over ``reps`` tries (2n³ FLOPs each)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def onednn_gemm_peak(n: int = 1024, reps: int = 10) -> float | None:
    """Best GFLOP/s of oneDNN's fp32 n×n×n product (what ``models.Linear`` runs), or None."""
    from selfconsist.models import _ONEDNN_LINEAR as op

    if op is None:
        return None
    a, b = torch.randn(n, n), torch.randn(n, n)
    op(a, b, None, "none", [], "")
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        op(a, b, None, "none", [], "")
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def count_flops(step, onednn: bool) -> int:
    """FLOPs of one step, counted on PyTorch's default gemm (the counter does not see oneDNN's
    op; the products are the same), then the chosen path restored."""
    from selfconsist.models import use_onednn_linear

    use_onednn_linear(False)
    try:
        with FlopCounterMode(display=False) as fc:
            step()
    finally:
        use_onednn_linear(onednn)
    return fc.get_total_flops()


def make_step(vae, batch: int, precision: str, fused: bool, hand: bool = False):
    """tune's step by autograd on ``posthoc_terms``, or (``hand``) the built-in MLP's
    hand-derived ``mlp_step.MLPTuneStep``, which ``tune`` runs for that model on CPU."""
    from selfconsist import mlp_step
    from selfconsist import objective as obj
    from selfconsist.posthoc import posthoc_terms
    from selfconsist.runtime import autocast
    from selfconsist.tune import TuneConfig, resolve_config

    # the generic settings (not a family's), filled in as tune() would
    cfg = resolve_config(None, TuneConfig(batch_size=batch, device="cpu", precision=precision)).config
    vae.freeze_decoder()
    vae.set_encoder_mode(False)
    params = [p for p in vae.encoder_parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5, fused=fused or None)
    gen = torch.Generator().manual_seed(0)
    ctx = torch.device("cpu")

    hand_step = mlp_step.MLPTuneStep(vae, cfg, precision) if hand else None

    def step() -> None:
        z0 = vae.sample_prior(batch, gen)
        if hand_step is not None:
            hand_step(z0, vae.obs_var, gen)
            opt.step()
            return
        with autocast(ctx, precision):
            terms = posthoc_terms(vae, z0, cfg, vae.obs_var, gen)
        loss = -obj.avae_objective(terms["log_lik"], terms["kl"], terms["coupling"],
                                   cfg.lambda_rec).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_train_step(adam: dict, hand: bool = False, precision: str = "fp32"):
    """The ``selfconsist train`` step of the ColorMNIST MLP VAE at batch 64 (plain VAE term):
    by autograd, or the built-in MLP's hand-derived step (``hand``, what ``train`` runs), in
    ``precision`` (``train --precision``)."""
    from selfconsist.models import ModelConfig
    from selfconsist.train import new_model, train_step

    vae = new_model(ModelConfig(data_shape=(3, 28, 28), latent_dim=64, hidden=200), seed=0)
    params = list(vae.encoder_parameters()) + list(vae.decoder_parameters())
    opt = torch.optim.Adam(params, lr=1e-3, **adam)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.rand(1000, 3, 28, 28, generator=gen)
    step_fn = train_step(vae, None, hand=hand, precision=precision)

    def step() -> None:
        idx = torch.randint(1000, (64,), generator=gen)
        loss, _ = step_fn(x_all.index_select(0, idx), gen)
        loss.item()  # train's per-step NaN check
        opt.step()

    return step


def make_minimal_step(vae, batch: int):
    """The overhead floor: the same networks and passes as the tune step, in the fewest ops
    (standard-normal prior, no whitening or adapter layers): decode z₀, encode, decode the
    reparameterised sample, re-encode the stopped reconstruction, a Gaussian-KL loss, Adam."""
    enc, dec = vae.encoder, vae.decoder
    for p in dec.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-5)
    d = vae.latent_shape[0]

    def step() -> None:
        z0 = torch.randn(batch, d)
        with torch.no_grad():
            x = dec(z0)
        mu, lv = enc(x)
        z = mu + torch.exp(0.5 * lv) * torch.randn_like(mu)
        xr = dec(z)
        mu2, lv2 = enc(xr.detach())
        kl = 0.5 * (mu.pow(2) + lv.exp() - 1 - lv).sum(1)
        coup = 0.5 * ((mu2 - mu).pow(2) + (lv2 - lv).pow(2)).sum(1)
        loss = ((xr - x).pow(2).flatten(1).sum(1) + kl + coup).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_step(step, reps: int) -> float:
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed memory, as tune and train set it "
                   "(runtime.keep_freed_memory); default: glibc's own behaviour (train and tune "
                   "before issue 22)")
    p.add_argument("--linear", choices=("auto", "onednn", "default"), default="auto",
                   help="auto: as tune and train run them (oneDNN on full-width AVX-512 AMD CPUs, else MKL); "
                   "onednn: built-in models' fp32 CPU linear layers on oneDNN; default: "
                   "PyTorch's default gemm (MKL; before issue 22)")
    args = p.parse_args(argv)
    from selfconsist.adapters.builtin import BuiltinVAE
    from selfconsist.models import ONEDNN_LINEAR, ModelConfig, use_onednn_linear
    from selfconsist.runtime import cpu_has_bf16, keep_freed_memory

    kept = keep_freed_memory(torch.device("cpu")) if args.malloc == "keep" else False
    onednn = (ONEDNN_LINEAR["on"] if args.linear == "auto"
              else use_onednn_linear(args.linear == "onednn"))
    from selfconsist.runtime import cpu_family, cpu_vendor, cpuinfo_field

    print(json.dumps({"malloc": args.malloc, "kept_freed_memory": kept, "onednn_linear": onednn,
                      "cpu": [cpu_vendor(), cpu_family(), cpuinfo_field("model")]}),
          flush=True)

    torch.manual_seed(0)
    peak32 = gemm_peak(torch.float32)
    peak16 = gemm_peak(torch.bfloat16) if cpu_has_bf16() else None
    peak_dnnl = onednn_gemm_peak()
    best32 = max(peak32, peak_dnnl or 0.0)
    print(json.dumps({"gemm_peak_fp32_default": round(peak32, 1),
                      "gemm_peak_fp32_onednn": round(peak_dnnl, 1) if peak_dnnl else None,
                      "gemm_peak_bf16": round(peak16, 1) if peak16 else None}), flush=True)
    models = {
        "mlp": (ModelConfig(data_shape=(3, 28, 28), latent_dim=64, hidden=200), 128),
        "conv": (ModelConfig(arch="conv", data_shape=(3, 64, 64), latent_dim=64,
                             channels=(64, 128, 128)), 8),
    }
    rows = []
    for name, (mcfg, batch) in models.items():
        for path in ("fp32-unfused", "fp32", "fp32-hand", "fast", "fast-hand"):
            if path.endswith("-hand") and mcfg.arch != "mlp":
                continue
            precision = "bf16" if path.startswith("fast") and peak16 else "fp32"
            vae = BuiltinVAE(mcfg)
            if path == "fast" and mcfg.arch == "conv":
                vae.encoder.to(memory_format=torch.channels_last)
                vae.decoder.to(memory_format=torch.channels_last)
            step = make_step(vae, batch, precision, fused=path != "fp32-unfused", hand=path.endswith("-hand"))
            flops = count_flops(step, onednn)
            secs = time_step(step, args.reps)
            gflops = flops / secs / 1e9
            rows.append({"model": name, "path": path, "precision": precision, "batch": batch,
                         "ms_per_step": round(1e3 * secs, 2), "gflops": round(gflops, 1),
                         "of_fp32_gemm_peak": round(gflops / peak32, 3),
                         "of_best_fp32_gemm_peak": round(gflops / best32, 3),
                         "of_bf16_gemm_peak": round(gflops / peak16, 3) if peak16 else None,
                         "gemm_peak_fp32": round(peak32, 1),
                         "gemm_peak_bf16": round(peak16, 1) if peak16 else None,
                         "threads": torch.get_num_threads()})
            print(json.dumps(rows[-1]), flush=True)
    step = make_minimal_step(BuiltinVAE(models["mlp"][0]), 128)
    flops = count_flops(step, onednn)
    secs = time_step(step, args.reps)
    rows.append({"model": "mlp", "path": "tune floor: minimal hand-written loop, fp32", "batch": 128,
                 "ms_per_step": round(1e3 * secs, 2), "gflops": round(flops / secs / 1e9, 1),
                 "of_fp32_gemm_peak": round(flops / secs / 1e9 / peak32, 3),
                 "of_best_fp32_gemm_peak": round(flops / secs / 1e9 / best32, 3)})
    print(json.dumps(rows[-1]), flush=True)
    trains = [("train fp32, autograd, default Adam (train before issue 22)", {}, False, "fp32"),
              ("train fp32, autograd, foreach Adam", {"foreach": True}, False, "fp32"),
              ("train fp32, autograd, fused Adam", {"fused": True}, False, "fp32"),
              ("train fp32, hand-derived step, fused Adam (as train runs the MLP)", {"fused": True}, True,
               "fp32")]
    if peak16:
        trains.append(("train bf16, hand-derived step, fused Adam (train --precision bf16)",
                       {"fused": True}, True, "bf16"))
    for name, adam, hand, precision in trains:
        step = make_train_step(adam, hand, precision)
        flops = count_flops(step, onednn)
        secs = time_step(step, args.reps)
        rows.append({"model": "mlp", "path": name, "batch": 64, "ms_per_step": round(1e3 * secs, 2),
                     "gflops": round(flops / secs / 1e9, 1),
                     "of_fp32_gemm_peak": round(flops / secs / 1e9 / peak32, 3),
                     "of_best_fp32_gemm_peak": round(flops / secs / 1e9 / best32, 3),
                     "of_bf16_gemm_peak": round(flops / secs / 1e9 / peak16, 3) if peak16 else None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
