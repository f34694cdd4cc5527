"""Throughput and memory of post-hoc tuning on a full-size Stable Diffusion VAE.

Builds the SD 1.x/2.x VAE architecture (``AutoencoderKL``, block widths 128-256-512-512,
2 layers per block, 4 latent channels, 8× downsampling; random weights: speed and memory
do not depend on the values), wraps it in selfconsist's diffusers adapter and times the
tuning step that ``selfconsist tune`` runs (``selfconsist.posthoc.posthoc_terms``: decode a
prior sample, encode, decode the reparameterised sample, re-encode; backward into the
encoder only; Adam), in bf16 autocast on CUDA.

    python benchmarks/bench_sd_vae.py                       # cuda, 256×256, bf16
    python benchmarks/bench_sd_vae.py --checkpointing off   # compare memory and speed
    python benchmarks/bench_sd_vae.py --device cpu --size 32 --steps 2   # smoke test

Prints one JSON line: images/s (prior samples per second through the whole step), seconds
per step, peak GPU memory (``torch.cuda.max_memory_allocated``), the step's FLOPs
(``torch.utils.flop_counter``), MFU against the GPU's dense bf16 peak (a datasheet table,
``--peak-tflops`` to override) and against a bf16 gemm measured in the same process, and the
settings. The issue's goal: ≥ 120 img/s at 256² on an H100 (≥ 35% MFU).

    python benchmarks/bench_sd_vae.py --size 256 && python benchmarks/bench_sd_vae.py --size 512
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, matched on the device name.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.0))


def datasheet_peak(name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def measured_gemm_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """Best bf16 n×n×n matmul rate in TFLOP/s on ``device``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (multiple of 8)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotune etc.)")
    p.add_argument("--precision", default=None, help="bf16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--checkpointing", default="auto", choices=["auto", "all", "encoder", "off"],
                   help="gradient checkpointing (auto: on for CUDA)")
    p.add_argument("--lambda-rec", type=float, default=1.0,
                   help="1 backpropagates through the frozen decoder; 0 skips that")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense bf16 peak for MFU (default: datasheet table by name)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from diffusers import AutoencoderKL

    from selfconsist import objective as obj
    from selfconsist.adapters.diffusers import DiffusersVAE
    from selfconsist.posthoc import posthoc_terms
    from selfconsist.runtime import adam, autocast, resolve_device
    from selfconsist.tune import TuneConfig, resolve_config

    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    model = AutoencoderKL(**SD_VAE)
    ckpt = {"auto": None, "all": True, "encoder": "encoder", "off": False}[args.checkpointing]
    vae = DiffusersVAE.from_model(model, image_size=args.size, gradient_checkpointing=ckpt)
    cfg = TuneConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, lr=args.lr,
                     lambda_rec=args.lambda_rec, device=str(device), precision=precision,
                     seed=args.seed, prior_refine=0, anchor=0.0)
    cfg = resolve_config(vae, cfg).config  # the rest as tune() would fill it
    vae.to(device)
    vae.freeze_decoder()
    vae.set_encoder_mode(False)
    params = [p for p in vae.encoder_parameters() if p.requires_grad]
    opt = adam(params, cfg.lr, device)  # as tune builds it
    gen = torch.Generator().manual_seed(args.seed)

    def step() -> float:
        z0 = vae.sample_prior(cfg.batch_size, gen)
        with autocast(device, precision):
            terms = posthoc_terms(vae, z0, cfg, vae.obs_var, gen)
        loss = -obj.avae_objective(terms["log_lik"], terms["kl"], terms["coupling"],
                                   cfg.lambda_rec).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = float("nan")
    for _ in range(args.steps):
        loss = step()
    sync()
    elapsed = time.perf_counter() - t0
    enc, dec = vae.num_parameters()
    achieved = flops * args.steps / elapsed / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or datasheet_peak(name)
    gemm = measured_gemm_peak(device) if device.type == "cuda" else None
    result = {
        "device": name,
        "image_size": args.size, "latent_shape": list(vae.latent_shape),
        "batch_size": args.batch_size, "steps": args.steps, "precision": precision,
        "checkpointing": vae.checkpointing, "lambda_rec": args.lambda_rec,
        "encoder_parameters": enc, "decoder_parameters": dec,
        "seconds_per_step": elapsed / args.steps,
        "images_per_second": args.batch_size * args.steps / elapsed,
        "tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
        "peak_bf16_tflops": peak, "mfu": achieved / peak if peak else None,
        "gemm_bf16_tflops": gemm, "of_gemm_peak": achieved / gemm if gemm else None,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                            if device.type == "cuda" else None),
        "last_loss": loss,
    }
    if not math.isfinite(loss):
        print("warning: the loss is not finite", file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
