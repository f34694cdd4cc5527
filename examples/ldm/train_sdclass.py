"""Train the SD-class testbed: an SD-style ``AutoencoderKL`` on photographs, from scratch, offline.

SD-like where it matters for cycles: 4 latent channels, f = 4, a KL weight of 1e-6 against a
reconstruction loss summed over pixels (so the posterior is nearly a point, as in SD's), and
``scaling_factor`` / ``shift_factor`` set from the latents of its training crops (1/std and mean,
as SD and SD3/FLUX did). It trains on random multi-scale crops of the TRAIN photos of
``wallpapers.py`` (Debian's wallpaper photographs plus scikit-image's); USER, TEST and UNRELATED
photos are never seen. SD's VAE also used LPIPS and a patch GAN; we have no LPIPS offline, and
on a budget of an hour of one CPU core an adversarial loss costs more than it gives, so the loss
is L1 + L2.

    python examples/ldm/wallpapers.py prepare            # once; see its docstring
    python examples/ldm/train_sdclass.py --out examples/ldm/sdclass-vae

bf16 autocast with channels_last on CPUs with bf16 units (about 2× fp32 here); weights and Adam
stay fp32, the committed weights are fp16. ``training.json`` records the command and timings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wallpapers  # noqa: E402


def build_model(widths: tuple[int, ...], layers: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=wallpapers.SIZE,
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=layers, norm_num_groups=32)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR for images in [−1, 1] (data range 2)."""
    mse = (x.clamp(-1, 1) - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


@torch.no_grad()
def heldout_psnr(model, photos: dict[str, torch.Tensor]) -> float:
    held = torch.stack([x for _, x in wallpapers.grid_crops(photos, 20, seed=0)]) * 2 - 1
    return psnr(model.decode(model.encode(held).latent_dist.mode()).sample.float(), held).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="examples/ldm/sdclass-vae")
    ap.add_argument("--photos", default="runs/ldm/photos.pt")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--crop", type=int, default=32, help="training crop size (px)")
    ap.add_argument("--widths", default="32,64,64")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--snapshots", default="", help="also save the model here at every evaluation")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    photos = wallpapers.load(args.photos)
    imgs = list(photos["train"].values())
    widths = tuple(int(w) for w in args.widths.split(","))
    model = build_model(widths, args.layers).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    t0 = time.time()
    history = []
    model.train()
    for step in range(args.steps):
        x = wallpapers.random_crops(imgs, args.batch_size, g, args.crop).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            post = model.encode(x).latent_dist
            xr = model.decode(post.sample()).sample.float()
        d = xr - x
        # L1 + L2 summed over pixels; KL summed over latent elements at 1e-6, as SD's.
        rec = (d.abs() + d.pow(2)).flatten(1).sum(1).mean()
        kl = post.kl().mean()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}  rec {rec.item():.1f}  kl {kl.item():.0f}  "
                  f"batch psnr {psnr(xr.detach(), x).mean().item():.2f}  {time.time() - t0:.0f} s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = heldout_psnr(model, photos["test"])
            model.train()
            history.append({"step": step + 1, "heldout_psnr_db": round(h, 2), "seconds": round(time.time() - t0)})
            print(f"  held-out PSNR (bf16) {h:.2f} dB", flush=True)
            if args.snapshots and step + 1 < args.steps:  # for pilot experiments while it trains
                model.to(memory_format=torch.contiguous_format).save_pretrained(f"{args.snapshots}/step{step + 1}")
                model.to(memory_format=torch.channels_last)
    train_s = time.time() - t0

    model.eval()
    with torch.no_grad():
        zs = torch.cat([model.encode(wallpapers.random_crops(imgs, 64, g, wallpapers.SIZE)).latent_dist.sample()
                        for _ in range(8)])
        shift, scale = zs.mean().item(), 1.0 / zs.std().item()
        held = heldout_psnr(model, photos["test"])
    model.register_to_config(scaling_factor=round(scale, 5), shift_factor=round(shift, 5))
    out = Path(args.out)
    model.to(memory_format=torch.contiguous_format).half().save_pretrained(out)
    record = {
        "command": "python " + " ".join(sys.argv),
        "train_seconds": round(train_s, 1),
        "machine": "shared 2-core development machine, one thread, bf16 autocast",
        "settings": vars(args),
        "train_photos": list(photos["train"]),
        "test_photos": list(photos["test"]),
        "scaling_factor": round(scale, 5),
        "shift_factor": round(shift, 5),
        "heldout_psnr_db_fp32": round(held, 2),
        "heldout_crops": "100 (wallpapers.py crops test): 64 px, half native, half 2x downscaled",
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
